//! Operations an app asks of a running [`crate::Session`] that need the relay (approving a new
//! device, listing or ending sessions, recovery, the directory, chat members), as small
//! sans-IO state machines: [`Device::op_request`] makes the next request (with the req id the
//! session core gives it), [`Device::op_answer`] takes the relay's answer and says what comes
//! next ([`Step`]). The session runs them while it syncs, over its own connection: none opens
//! another, none needs the session stopped.
//!
//! An operation that must see everything the relay has first (a revocation covers every device
//! and chat of the account; a member change names the chat's newest epoch) starts once the
//! session is caught up ([`Op::sync_first`]); one the relay refuses as made for keys or members
//! that moved on (`StaleEpoch`) is made again after the session caught up again, at most
//! [`MAX_OP_TRIES`] times.

use crate::device::error::Error;
use crate::device::local::{ContactInfo, Device, LinkCode, SessionInfo};
use crate::proto::cert::DeviceCert;
use crate::proto::crypto::RecoveryKey;
use crate::proto::directory::{check_username, Membership};
use crate::proto::ids::{AccountId, ChatId, DeviceId};
use crate::proto::wire::{ClientFrame, ErrorCode, RelayFrame, ReqId};

/// Most times an operation is made again after the relay refused it as stale.
pub(crate) const MAX_OP_TRIES: u32 = 3;

/// An operation a session carries out for the app. Made by the [`crate::Session`] methods.
#[derive(Debug)]
pub(crate) struct Op {
    kind: Kind,
    tries: u32,
}

#[derive(Debug)]
enum Kind {
    /// Approve the device showing `code`: who waits under it, then the approval.
    Approve {
        code: LinkCode,
        stage: ApproveStage,
    },
    Sessions,
    Revoke {
        device: DeviceId,
    },
    SetSessionTtl {
        days: u32,
    },
    RecoveryKey {
        key: Option<RecoveryKey>,
    },
    SetUsername {
        name: Option<String>,
    },
    Lookup {
        username: String,
        confirm: Option<String>,
    },
    ChangeMembers {
        chat: ChatId,
        change: Membership,
    },
    Accept {
        account: AccountId,
        accept: bool,
    },
    Invite {
        account: AccountId,
    },
    Invitations,
}

#[derive(Debug)]
enum ApproveStage {
    Lookup,
    Info(Box<RelayFrame>),
    Sent(Box<DeviceCert>),
}

/// What an operation gives back when it is done.
#[derive(Debug)]
pub(crate) enum OpOut {
    Done,
    Approved(DeviceId, String),
    Sessions(Vec<SessionInfo>, u32),
    RecoveryKey(RecoveryKey),
    Contact(ContactInfo),
    Invitations(Vec<(AccountId, u64)>),
}

/// What comes after an answer.
#[derive(Debug)]
pub(crate) enum Step {
    /// Done.
    Done(OpOut),
    /// Make the next request now ([`Device::op_request`]).
    Next,
    /// Make the request again once the session is caught up.
    AfterSync,
}

impl Op {
    fn new(kind: Kind) -> Op {
        Op { kind, tries: 0 }
    }

    pub(crate) fn approve(code: LinkCode) -> Op {
        Op::new(Kind::Approve { code, stage: ApproveStage::Lookup })
    }

    pub(crate) fn sessions() -> Op {
        Op::new(Kind::Sessions)
    }

    pub(crate) fn revoke(device: DeviceId) -> Op {
        Op::new(Kind::Revoke { device })
    }

    pub(crate) fn set_session_ttl(days: u32) -> Op {
        Op::new(Kind::SetSessionTtl { days })
    }

    pub(crate) fn recovery_key() -> Op {
        Op::new(Kind::RecoveryKey { key: None })
    }

    pub(crate) fn set_username(name: Option<String>) -> Op {
        Op::new(Kind::SetUsername { name })
    }

    pub(crate) fn lookup(username: String, confirm: Option<String>) -> Op {
        Op::new(Kind::Lookup { username, confirm })
    }

    pub(crate) fn change_members(chat: ChatId, change: Membership) -> Op {
        Op::new(Kind::ChangeMembers { chat, change })
    }

    pub(crate) fn accept(account: AccountId, accept: bool) -> Op {
        Op::new(Kind::Accept { account, accept })
    }

    pub(crate) fn invite(account: AccountId) -> Op {
        Op::new(Kind::Invite { account })
    }

    pub(crate) fn invitations() -> Op {
        Op::new(Kind::Invitations)
    }

    /// Whether it starts only once the session is caught up: it must be made for everything
    /// the relay has (the account's devices and chats, a chat's members and epoch, the keys
    /// other accounts' log entries brought before a lookup pins newer ones).
    pub(crate) fn sync_first(&self) -> bool {
        matches!(self.kind, Kind::Revoke { .. } | Kind::ChangeMembers { .. } | Kind::Lookup { .. })
    }
}

impl Device {
    /// The operation's next request, made with `req`.
    pub(crate) fn op_request(&mut self, op: &mut Op, req: ReqId) -> Result<ClientFrame, Error> {
        self.login()?;
        Ok(match &mut op.kind {
            Kind::Approve { code, stage } => match std::mem::replace(stage, ApproveStage::Lookup) {
                ApproveStage::Lookup => Device::approve_lookup(code, req),
                ApproveStage::Info(info) => {
                    let (frame, cert) = self.approve_request(code, *info, req)?;
                    *stage = ApproveStage::Sent(Box::new(cert));
                    frame
                }
                ApproveStage::Sent(_) => unreachable!("a sent approval is only answered"),
            },
            Kind::Sessions => ClientFrame::ListDevices { req },
            Kind::Revoke { device } => self.revoke_request(device, req)?,
            Kind::SetSessionTtl { days } => ClientFrame::SetSessionTtl { req, days: *days },
            Kind::RecoveryKey { key } => {
                let (frame, k) = self.recovery_request(req)?;
                *key = Some(k);
                frame
            }
            Kind::SetUsername { name } => {
                if let Some(n) = name {
                    check_username(n)?;
                }
                ClientFrame::SetUsername { req, name: name.clone() }
            }
            Kind::Lookup { username, .. } => {
                check_username(username)?;
                ClientFrame::Lookup { req, username: username.clone() }
            }
            Kind::ChangeMembers { chat, change } => self.member_change_request(*chat, change.clone(), req)?,
            Kind::Accept { account, accept } => ClientFrame::Accept { req, account: *account, accept: *accept },
            Kind::Invite { account } => ClientFrame::Invite { req, account: *account },
            Kind::Invitations => ClientFrame::ListInvitations { req },
        })
    }

    /// Takes the relay's answer to the operation's last request.
    pub(crate) fn op_answer(&mut self, op: &mut Op, frame: RelayFrame) -> Result<Step, Error> {
        if let RelayFrame::Error { code, message, .. } = frame {
            op.tries += 1;
            return match code {
                ErrorCode::StaleEpoch if op.tries < MAX_OP_TRIES => Ok(Step::AfterSync),
                ErrorCode::SessionRevoked => Err(Error::SessionRefused),
                code => Err(Error::Relay { code, message }),
            };
        }
        let unexpected = || Error::Relay { code: ErrorCode::Internal, message: "unexpected answer".into() };
        Ok(match (&mut op.kind, frame) {
            (Kind::Approve { stage, .. }, info @ RelayFrame::LinkInfo { .. }) => {
                *stage = ApproveStage::Info(Box::new(info));
                Step::Next
            }
            (Kind::Approve { stage: ApproveStage::Sent(cert), .. }, RelayFrame::Done { .. }) => {
                let (id, name) = self.approve_done(cert)?;
                Step::Done(OpOut::Approved(id, name))
            }
            (Kind::Sessions, reply @ RelayFrame::Devices { .. }) => {
                let (sessions, ttl) = self.sessions_from(reply)?;
                Step::Done(OpOut::Sessions(sessions, ttl))
            }
            (Kind::Revoke { device }, RelayFrame::Done { .. }) => {
                self.revoke_done(device)?;
                Step::Done(OpOut::Done)
            }
            (Kind::RecoveryKey { key }, RelayFrame::Done { .. }) => {
                Step::Done(OpOut::RecoveryKey(key.take().ok_or_else(unexpected)?))
            }
            (
                Kind::SetSessionTtl { .. }
                | Kind::SetUsername { .. }
                | Kind::ChangeMembers { .. }
                | Kind::Accept { .. }
                | Kind::Invite { .. },
                RelayFrame::Done { .. },
            ) => Step::Done(OpOut::Done),
            (Kind::Invitations, RelayFrame::Invitations { from, .. }) => Step::Done(OpOut::Invitations(from)),
            (Kind::Lookup { username, confirm }, reply @ RelayFrame::Accounts { .. }) => {
                let (username, confirm) = (username.clone(), confirm.clone());
                Step::Done(OpOut::Contact(self.lookup_answer(&username, confirm.as_deref(), reply)?))
            }
            _ => return Err(unexpected()),
        })
    }
}
