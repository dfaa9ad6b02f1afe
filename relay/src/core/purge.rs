//! When the store's deleted ranges are emptied. A deletion (an account, a chat, a device)
//! removes its records in its batch's transaction and leaves the big ranges (a chat's deltas, a
//! device's dedup index, an account's log) to be emptied afterwards, a chunk of keys at a time
//! (`store/purge.rs`), so that deleting a large account never holds the relay for long.
//!
//! The core decides when and how much: nothing until every deletion written so far is
//! durable (a crash then cannot leave a deletion undone with its data half gone), then
//! [`PURGE_CHUNK`] keys each time the driver asks [`RelayCore::purge_due`] (between two
//! batches, and again and again while no input waits), until the driver reports with
//! [`Input::Purged`] that nothing is left. Ranges a crash leaves are emptied when the store
//! opens.

use super::*;

/// Keys the driver removes at a time: a deletion of 1,677 deltas of 60 KB held the core for
/// ~0.5 s when removed at once (docs/benchmarks.md), ~0.3 ms a key; 128 of them take a few
/// tens of ms at most.
pub const PURGE_CHUNK: usize = 128;

impl RelayCore {
    /// How many keys of deleted ranges the driver should remove now (then report
    /// [`Input::Purged`]), if any.
    pub fn purge_due(&self) -> Option<usize> {
        self.purge_after.filter(|t| *t <= self.durable_token).map(|_| PURGE_CHUNK)
    }

    /// Notes the deletions among `out`'s writes: their ranges are to be emptied once they are
    /// durable.
    pub(super) fn note_deletions(&mut self, out: &[Effect]) {
        for e in out {
            if let Effect::Write { token, ops } = e {
                if ops.iter().any(StoreOp::is_deletion) {
                    self.purge_after = Some(self.purge_after.unwrap_or(0).max(*token));
                }
            }
        }
    }

    /// The driver removed a chunk; `more` when some are left.
    pub(super) fn purged(&mut self, more: bool) {
        // A deletion written after the chunk was asked for keeps its own turn.
        if !more && self.purge_after.is_some_and(|t| t <= self.durable_token) {
            self.purge_after = None;
        }
    }
}
