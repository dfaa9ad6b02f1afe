//! Devices' checkpoints of their account log (docs/crypto.md, "Account log forks"): a device
//! states, signed by its account, what the log it was shown hashes to up to a position; the
//! relay logs it for the account's other devices to compare with their own. The relay cannot
//! check the hash (it does not hash the log); it checks who signed it and bounds how many there
//! are. Part of [`RelayCore`].

use super::*;
use stratus_engine::proto::account_chain::Checkpoint;

impl RelayCore {
    pub(super) fn checkpoint(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        device: &DeviceId,
        checkpoint: Checkpoint,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if checkpoint.by != *device {
            return Err((ErrorCode::ProtocolViolation, "a device sends only its own checkpoint".into()));
        }
        if checkpoint.seq > self.accounts[&account].log_head {
            return Err((ErrorCode::ProtocolViolation, "the checkpoint names a position past the account log".into()));
        }
        // One checkpoint per position at most: each must cover an entry after the last one,
        // so that checkpoints alone never grow the log (each device's comes after some other
        // entry).
        if self.checkpoints.get(&account).is_some_and(|last| checkpoint.seq <= *last) {
            return Err((
                ErrorCode::AlreadyExists,
                "the account log has a checkpoint at or after that position".into(),
            ));
        }
        self.check_signed(account, "the checkpoint", |g| g.verify_checkpoint(&checkpoint))?;
        let mut ops = Vec::new();
        let entry = self.log_entry(account, AccountEvent::Checkpoint { checkpoint }, &mut ops);
        self.checkpoints.insert(account, entry.seq);
        self.write_for(account, ops, out);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }
}
