//! What an account may store on the relay (see [`Limits::max_account_bytes`]). Part of
//! [`RelayCore`].
//!
//! Every write made on an account's behalf is counted against it: the deltas its devices
//! append, and the records and account log entries its requests make (in other accounts' logs
//! too: whoever hands out a chat's keys pays for them). The count is stored with the write that
//! changes it ([`StoreOp::PutUsage`]), so it survives restarts. It only grows: the relay deletes
//! almost nothing, and a count that rewriting could lower could be gamed. Once the count has
//! reached the quota, appends, new chats and added members get `QuotaExceeded`; what keeps an
//! account safe and its chats going is still taken (and counted): revocations, rotations, new
//! key epochs, leaving, removing, linking, recovery keys. Each of those is bounded by another
//! limit (generations, sessions, members, the member change rate).

use serde::Serialize;
use stratus_engine::proto::wire::MAX_FRAME_BYTES;

use super::*;

/// What a stored delta costs besides its sealed bytes: its key, its `(device, client seq)`
/// index entry, and what is stored with it (sender, account, epoch, client seq).
pub const DELTA_OVERHEAD_BYTES: u64 = 192;
/// What any other record costs besides its encoding: its key and the store's bookkeeping.
const RECORD_OVERHEAD_BYTES: u64 = 64;

fn size<T: Serialize + ?Sized>(v: &T) -> u64 {
    postcard::experimental::serialized_size(v).map_or(MAX_FRAME_BYTES as u64, |n| n as u64)
}

/// An account log entry's stored size: its chain, if any, is stored once elsewhere (see
/// [`StoredEvent`]).
fn event_bytes(e: &AccountEvent) -> u64 {
    match e {
        AccountEvent::ChatAdded { signer_chain: Some(c), .. }
        | AccountEvent::MembersChanged { by_chain: Some(c), .. } => size(e).saturating_sub(size(c)) + 5,
        _ => size(e),
    }
}

impl StoreOp {
    /// About how many bytes this operation stores (what it replaces is not subtracted).
    pub fn stored_bytes(&self) -> u64 {
        let record = match self {
            StoreOp::PutDelta(d) => return d.sealed.len() as u64 + DELTA_OVERHEAD_BYTES,
            StoreOp::PutChatKeys(_, _, keys) => return keys.iter().map(|k| size(k) + RECORD_OVERHEAD_BYTES).sum(),
            StoreOp::PutUsage(..)
            | StoreOp::DeleteRecovery(_)
            | StoreOp::DeleteApprovedLink(_)
            | StoreOp::DeleteDevice(_)
            | StoreOp::DeleteChat(_)
            | StoreOp::DeleteAccountData(_)
            | StoreOp::ForgetRedoDeletions => return 0,
            StoreOp::PutAccount(a) => size(a),
            StoreOp::PutDevice(c) => size(c),
            StoreOp::PutChat(_, r) => size(r),
            StoreOp::PutAccountEntry(_, e) => event_bytes(&e.event),
            StoreOp::PutDeviceState(_, s) => size(s),
            StoreOp::PutSessionEnd(_, e) => size(e),
            StoreOp::PutAccepted(..) => 32,
            StoreOp::PutInvitation(..) => 40,
            StoreOp::PutAccountSettings(_, s) => size(s),
            StoreOp::PutRecovery(_, r) => size(r),
            StoreOp::PutAccountGen(g) => size(g),
            StoreOp::PutUsername(_, n) => n.as_ref().map_or(0, |n| n.len() as u64),
            StoreOp::PutApprovedLink(_, l) => size(l),
            // The operator's records: counted against no account.
            StoreOp::PutAccountAdmin(..) | StoreOp::PutRegistration(_) | StoreOp::PutInvite(..) => return 0,
        };
        record + RECORD_OVERHEAD_BYTES
    }
}

impl RelayCore {
    /// Refuses a request that would take `account` past its quota with `adding` bytes more
    /// (requests whose size is only known once made ask with 1: refused once the quota is
    /// reached, and may pass it by their own size).
    pub(super) fn check_quota(&self, account: AccountId, adding: u64) -> Result<(), (ErrorCode, String)> {
        let a = self.accounts.get(&account);
        // The operator's quota for this account, if it set one (`core/admin.rs`), else the
        // relay's.
        let quota = a.and_then(|a| a.admin.quota).unwrap_or(self.limits.max_account_bytes);
        let used = a.map_or(0, |a| a.stored_bytes);
        if quota != 0 && used.saturating_add(adding) > quota {
            return Err((
                ErrorCode::QuotaExceeded,
                format!("this account has stored {used} bytes on this relay, which allows an account {quota}"),
            ));
        }
        Ok(())
    }

    /// Writes `ops` in one batch, counting what they store against `account` (the new count
    /// is written with them).
    pub(super) fn write_for(&mut self, account: AccountId, mut ops: Vec<StoreOp>, out: &mut Vec<Effect>) {
        let bytes: u64 = ops.iter().map(StoreOp::stored_bytes).sum();
        if let Some(a) = self.accounts.get_mut(&account) {
            a.stored_bytes = a.stored_bytes.saturating_add(bytes);
            ops.push(StoreOp::PutUsage(account, a.stored_bytes));
        }
        let token = self.token();
        out.push(Effect::Write { token, ops });
    }
}
