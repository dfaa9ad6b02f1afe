//! Consent (issue 15, item 3): who may put an account into a chat, and who may see its devices.
//! Part of [`RelayCore`].
//!
//! An account is named in a chat's creation, or added to a group, only by an account it accepts
//! chats from (`Accept`); any other gets `NotAllowed` and changes nothing. Anyone may ask with an
//! invitation (`Invite`), which waits until the account accepts or declines it, at most
//! [`MAX_INVITATIONS`] at once. Without this, any account could fill another's chat limit and
//! make its devices hold the chats' documents. An account's devices (`AccountDevices`, for
//! secret chats) are shown to the account itself, with whether each is connected, and to the
//! accounts it accepts or shares a chat with, without that.

use super::*;

/// Most accounts one account accepts chats from; more are refused with `TooLarge`.
pub const MAX_ACCEPTED: usize = 4096;
/// Most invitations waiting for one account; more are refused with `TooLarge` until it answers
/// some (the others it accepts can still add it).
pub const MAX_INVITATIONS: usize = 64;

type Refusal = (ErrorCode, String);

impl RelayCore {
    /// Whether `account` accepts chats from `other` (every account accepts itself).
    pub(super) fn accepts(&self, account: AccountId, other: AccountId) -> bool {
        account == other || self.accounts.get(&account).is_some_and(|a| a.accepts.contains(&other))
    }

    /// Refuses naming `accounts` in a chat by `by` unless each of them accepts chats from it.
    pub(super) fn check_consent<'a>(
        &self,
        by: AccountId,
        mut accounts: impl Iterator<Item = &'a AccountId>,
    ) -> Result<(), Refusal> {
        match accounts.find(|a| !self.accepts(**a, by)) {
            Some(a) => Err((
                ErrorCode::NotAllowed,
                format!("account {a} has not accepted chats from this account: invite it, and add it once it accepts"),
            )),
            None => Ok(()),
        }
    }

    /// Whether `asker` may see `account`'s devices: its own, or an account that accepts it or
    /// shares a chat with it.
    fn shows_devices(&self, asker: AccountId, account: AccountId) -> bool {
        if self.accepts(account, asker) {
            return true;
        }
        let (Some(a), Some(b)) = (self.accounts.get(&asker), self.accounts.get(&account)) else { return false };
        a.chats.intersection(&b.chats).next().is_some()
    }

    /// `AccountDevices`, `Accept`, `Invite` and `ListInvitations` from a logged-in device.
    pub(super) fn consent_frame(
        &mut self,
        conn: ConnId,
        account: AccountId,
        frame: ClientFrame,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        match frame {
            ClientFrame::AccountDevices { req, account: of } => {
                let online: BTreeSet<&DeviceId> = self.conns.values().map(|c| &c.device).collect();
                let own = of == account;
                let devices = self
                    .accounts
                    .get(&of)
                    .filter(|_| self.shows_devices(account, of))
                    .into_iter()
                    .flat_map(|a| a.devices.iter())
                    .filter_map(|d| self.devices.get(d).filter(|s| !s.state.revoked).map(|s| (d, s)))
                    .map(|(d, s)| (s.cert.clone(), own && online.contains(d)))
                    .collect();
                out.push(Effect::Send { conn, frame: RelayFrame::AccountDevices { req, account: of, devices } });
                Ok(())
            }
            ClientFrame::Accept { req, account: other, accept } => {
                if other == account {
                    return Err((ErrorCode::NotAllowed, "an account always accepts itself".into()));
                }
                if !self.is_live(&other) {
                    return Err((ErrorCode::NotFound, format!("no account {other}")));
                }
                let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
                if accept && !a.accepts.contains(&other) && a.accepts.len() >= MAX_ACCEPTED {
                    return Err((ErrorCode::TooLarge, format!("an account accepts at most {MAX_ACCEPTED} others")));
                }
                let mut ops = Vec::new();
                let changed = if accept { a.accepts.insert(other) } else { a.accepts.remove(&other) };
                if changed {
                    ops.push(StoreOp::PutAccepted(account, other, accept));
                }
                if a.invitations.remove(&other).is_some() {
                    ops.push(StoreOp::PutInvitation(account, other, None));
                }
                self.commit_or_done(conn, req, account, ops, out);
                Ok(())
            }
            ClientFrame::Invite { req, account: invitee } => {
                if invitee == account {
                    return Err((ErrorCode::NotAllowed, "an account always accepts itself".into()));
                }
                let Some(b) = self.accounts.get_mut(&invitee).filter(|b| !b.admin.deleted) else {
                    return Err((ErrorCode::NotFound, format!("no account {invitee}")));
                };
                let mut ops = Vec::new();
                if !b.accepts.contains(&account) && !b.invitations.contains_key(&account) {
                    if b.invitations.len() >= MAX_INVITATIONS {
                        return Err((
                            ErrorCode::TooLarge,
                            format!("{MAX_INVITATIONS} invitations already wait for account {invitee}"),
                        ));
                    }
                    b.invitations.insert(account, now_ms);
                    ops.push(StoreOp::PutInvitation(invitee, account, Some(now_ms)));
                }
                self.commit_or_done(conn, req, account, ops, out);
                Ok(())
            }
            ClientFrame::ListInvitations { req } => {
                let mut from: Vec<(AccountId, u64)> =
                    self.accounts[&account].invitations.iter().map(|(a, at)| (*a, *at)).collect();
                from.sort_by_key(|(a, at)| (*at, *a));
                out.push(Effect::Send { conn, frame: RelayFrame::Invitations { req, from } });
                Ok(())
            }
            _ => unreachable!("the caller passes only the frames above"),
        }
    }

    /// Writes `ops` and answers `Done` once durable; with nothing to write, once what came
    /// before is durable.
    fn commit_or_done(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        ops: Vec<StoreOp>,
        out: &mut Vec<Effect>,
    ) {
        if ops.is_empty() {
            self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        } else {
            self.commit_and_answer(conn, req, account, ops, Vec::new(), out);
        }
    }
}
