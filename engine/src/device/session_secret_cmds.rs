//! The session's secret chat commands and its own requests of the relay for them (key
//! lookups): part of `session.rs`'s driver, split out for size.

use super::{Driver, Pending, SecretCmd};
use crate::device::error::Error;
use crate::device::session_secret::HubOut;
use crate::proto::wire::{ClientFrame, RelayFrame, ReqId};

impl Driver {
    pub(super) async fn secret_command(&mut self, cmd: SecretCmd) {
        let Some(hub) = self.hub.as_mut() else {
            return refuse(cmd);
        };
        let device = &mut self.device;
        match cmd {
            SecretCmd::Devices { account, reply } => {
                let looked = matches!(device.is_contact(account), Ok(true));
                let frame = |req| match looked {
                    true => ClientFrame::AccountDevices { req, account },
                    false => ClientFrame::LookupAccounts { req, accounts: vec![account] },
                };
                self.request(frame, Pending::Devices { account, looked, reply }).await;
            }
            SecretCmd::Start { peer, reply } => {
                let r = device.secret_start(*peer);
                if let Ok(chat) = r {
                    self.pending_outs.extend(hub.touched(device, chat));
                }
                let _ = reply.send(r);
            }
            SecretCmd::Accept { chat, reply } => match device.secret(chat) {
                Ok(c) if !c.verified => {
                    let account = c.peer_cert.body.account;
                    let frame = |req| ClientFrame::LookupAccounts { req, accounts: vec![account] };
                    self.request(frame, Pending::Accept(chat, reply)).await;
                }
                Ok(_) => {
                    let r = device.secret_accept(chat);
                    self.pending_outs.extend(hub.touched(device, chat));
                    let _ = reply.send(r);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            SecretCmd::Send { chat, text, ttl_s, reply } => {
                let r = device.secret_send(chat, &text, ttl_s);
                if r.is_ok() {
                    self.pending_outs.extend(hub.touched(device, chat));
                }
                let _ = reply.send(r);
            }
            SecretCmd::Messages { chat, reply } => {
                let _ = reply.send(device.secret_messages(chat));
            }
            SecretCmd::Read { chat, upto, reply } => {
                let r = device.secret_read(chat, &upto);
                if r.is_ok() {
                    self.pending_outs.extend(hub.touched(device, chat));
                }
                let _ = reply.send(r);
            }
            SecretCmd::Close { chat, reply } => {
                let r = device.secret_close(chat);
                if r.is_ok() {
                    self.pending_outs.extend(hub.touched(device, chat));
                }
                let _ = reply.send(r);
            }
            SecretCmd::Chats { reply } => {
                let _ = reply.send(device.secret_chats());
            }
            SecretCmd::Fingerprint { chat, reply } => {
                let _ = reply.send(device.secret_fingerprint(chat));
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        if !outs.is_empty() {
            self.hub_outs(outs).await;
        }
    }

    /// Sends a request of the session's own; its answer comes to [`Driver::answered`], or
    /// [`Driver::unanswered`] when it will not come (not connected, or the connection went).
    pub(super) async fn request(&mut self, frame: impl FnOnce(ReqId) -> ClientFrame, pending: Pending) {
        let token = self.next_token;
        self.next_token += 1;
        self.waiting.insert(token, pending);
        let work = self.core.request(token, frame);
        self.carry(vec![work]).await;
    }

    /// A request of the session's own that will not be answered (the connection went).
    pub(super) fn unanswered(&mut self, pending: Pending) {
        match pending {
            Pending::ConnLookup(conn) => {
                if let Some(hub) = self.hub.as_mut() {
                    let outs = hub.looked_up(&mut self.device, conn);
                    self.pending_outs.extend(outs);
                }
            }
            Pending::Accept(_, reply) => {
                let _ = reply.send(Err(Error::Offline));
            }
            Pending::Devices { reply, .. } => {
                let _ = reply.send(Err(Error::Offline));
            }
        }
    }

    /// The relay answered a request of the session's own.
    pub(super) async fn answered(&mut self, pending: Pending, frame: RelayFrame) {
        let refused = |frame: &RelayFrame| match frame {
            RelayFrame::Error { code, message, .. } => Error::Relay { code: *code, message: message.clone() },
            _ => Error::Relay { code: crate::proto::wire::ErrorCode::Internal, message: "unexpected answer".into() },
        };
        if let RelayFrame::Accounts { accounts, .. } = &frame {
            if let Err(e) = self.device.take_accounts(accounts) {
                tracing::info!(error = %e, "an account's keys from the relay were refused");
            }
        }
        match pending {
            Pending::ConnLookup(_) => self.unanswered(pending),
            Pending::Accept(chat, reply) => {
                let r = self.device.secret_accept_checked(chat);
                if let (Ok(()), Some(hub)) = (&r, self.hub.as_mut()) {
                    let outs = hub.touched(&mut self.device, chat);
                    self.pending_outs.extend(outs);
                }
                let _ = reply.send(r);
            }
            Pending::Devices { account, looked: false, reply } => match frame {
                RelayFrame::Accounts { .. } => {
                    let frame = |req| ClientFrame::AccountDevices { req, account };
                    self.request(frame, Pending::Devices { account, looked: true, reply }).await;
                }
                other => {
                    let _ = reply.send(Err(refused(&other)));
                }
            },
            Pending::Devices { account, looked: true, reply } => {
                let r = match frame {
                    f @ RelayFrame::AccountDevices { .. } => self.device.secret_devices_from(account, f),
                    other => Err(refused(&other)),
                };
                let _ = reply.send(r);
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        self.hub_outs(outs).await;
    }

    pub(super) async fn hub_outs(&mut self, outs: Vec<HubOut>) {
        for o in outs {
            match o {
                HubOut::Emit(e) => self.emit(e),
                HubOut::Lookup { conn, account } => {
                    let frame = |req| ClientFrame::LookupAccounts { req, accounts: vec![account] };
                    Box::pin(self.request(frame, Pending::ConnLookup(conn))).await;
                }
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        if !outs.is_empty() {
            Box::pin(self.hub_outs(outs)).await;
        }
    }
}

/// Answers a secret chat command when the session does not run secret chats.
pub(super) fn refuse(cmd: SecretCmd) {
    let no = || Error::SecretChatsOff;
    match cmd {
        SecretCmd::Devices { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Start { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Accept { reply, .. } | SecretCmd::Read { reply, .. } | SecretCmd::Close { reply, .. } => {
            drop(reply.send(Err(no())))
        }
        SecretCmd::Send { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Messages { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Chats { reply } => drop(reply.send(Err(no()))),
        SecretCmd::Fingerprint { reply, .. } => drop(reply.send(Err(no()))),
    }
}
