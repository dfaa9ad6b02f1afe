//! What the relay decides about a backup made while it runs (sans-IO; the core task in
//! `server/tasks.rs` carries it out, the store's [`BackupCopy`](crate::store::BackupCopy) does
//! the copying).
//!
//! A backup copies the store on a thread of its own while the core task goes on applying
//! batches; every batch applied meanwhile is handed to the copy too, which applies it after its
//! fuzzy copy. The batches handed over and not yet applied to the copy wait in memory: at most
//! [`BACKUP_QUEUE_BYTES`] of them. Past that the backup fails (the relay goes on as if none had
//! been asked) rather than pausing the relay until the copy catches up: the copy is slowest
//! while it reads the whole store, and a pause then would be as long as the stop-the-world
//! backup this replaces. The operator is told to try again when the relay is less busy.
//! Once the copy has caught up, the core task stops between two batches, makes the store
//! durable (a barrier), has the copy apply the few batches left and seal itself, and goes on:
//! the backup is the store at that batch boundary, holding everything acknowledged before it.

use crate::core::StoreOp;

/// Most bytes of batches handed to a backup's copy and not yet applied to it (estimated by
/// [`batch_bytes`]). At 5,000 appends/s of small deltas (~0.5 KiB each with their records),
/// this holds about 200 s of writes: a store of ~18 GiB copied at ~11 s per GiB (the shared
/// test machine, docs/benchmarks.md).
pub const BACKUP_QUEUE_BYTES: u64 = 512 * 1024 * 1024;

/// Bytes a store operation is counted as in the queue: its payload and a fixed allowance for
/// the ids and records around it.
const OP_OVERHEAD: u64 = 256;

/// What a batch of store operations is counted as in a backup's queue.
pub fn batch_bytes(ops: &[StoreOp]) -> u64 {
    ops.iter()
        .map(|op| match op {
            StoreOp::PutDelta(d) => OP_OVERHEAD + d.sealed.len() as u64,
            StoreOp::PutRecovery(_, r) => OP_OVERHEAD + r.sealed.len() as u64,
            StoreOp::PutChatKeys(_, _, keys) => OP_OVERHEAD * (1 + keys.len() as u64),
            _ => OP_OVERHEAD,
        })
        .sum()
}

/// The backup under way, if any.
#[derive(Debug, Default)]
pub struct Backups {
    running: Option<Running>,
    last_id: u64,
}

#[derive(Debug)]
struct Running {
    id: u64,
    /// Bytes of batches handed to the copy since it began.
    sent: u64,
    /// The copy has caught up and is being sealed.
    sealing: bool,
}

/// What to do with a batch just applied to the store.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterBatch {
    /// No backup runs.
    Nothing,
    /// Hand it to the copy.
    Forward,
    /// The backup fails with this message (the queue is full); drop the copy.
    Fail(String),
}

/// What to do when the copy says it has caught up.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// Pause between two batches: barrier, then seal the copy.
    Seal,
    /// A message about a backup that has already ended (it failed meanwhile): ignore it.
    Stale,
}

impl Backups {
    /// An operator asks for a backup: its id, or why not.
    pub fn start(&mut self) -> Result<u64, String> {
        if self.running.is_some() {
            return Err("a backup is already running; wait for it to finish".into());
        }
        self.last_id += 1;
        let id = self.last_id;
        self.running = Some(Running { id, sent: 0, sealing: false });
        Ok(id)
    }

    /// A batch of `bytes` (see [`batch_bytes`]) was applied to the store; the copy has applied
    /// `copied` bytes of what it was handed so far.
    pub fn batch_applied(&mut self, bytes: u64, copied: u64) -> AfterBatch {
        let Some(r) = &mut self.running else { return AfterBatch::Nothing };
        let queued = (r.sent + bytes).saturating_sub(copied);
        if queued > BACKUP_QUEUE_BYTES {
            self.running = None;
            return AfterBatch::Fail(format!(
                "the relay wrote faster than the backup could copy ({} MiB of writes waiting for the copy, at most \
                 {} MiB); the relay goes on unchanged, the directory holds an incomplete copy (no manifest): back up \
                 again into a new or empty directory when the relay is less busy",
                queued >> 20,
                BACKUP_QUEUE_BYTES >> 20
            ));
        }
        r.sent += bytes;
        AfterBatch::Forward
    }

    /// The copy of backup `id` has caught up with the batches handed to it.
    pub fn copied(&mut self, id: u64) -> Copied {
        match &mut self.running {
            Some(r) if r.id == id && !r.sealing => {
                r.sealing = true;
                Copied::Seal
            }
            _ => Copied::Stale,
        }
    }

    /// Backup `id` ended (done or failed).
    pub fn ended(&mut self, id: u64) {
        if self.running.as_ref().is_some_and(|r| r.id == id) {
            self.running = None;
        }
    }

    /// The backup under way.
    pub fn running(&self) -> Option<u64> {
        self.running.as_ref().map(|r| r.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_backup_at_a_time_and_batches_go_to_it_while_it_runs() {
        let mut b = Backups::default();
        assert_eq!(b.batch_applied(100, 0), AfterBatch::Nothing);
        let id = b.start().unwrap();
        assert!(b.start().unwrap_err().contains("already running"));
        assert_eq!(b.batch_applied(100, 0), AfterBatch::Forward);
        assert_eq!(b.copied(id + 1), Copied::Stale);
        assert_eq!(b.copied(id), Copied::Seal);
        assert_eq!(b.copied(id), Copied::Stale, "sealed once");
        assert_eq!(b.batch_applied(100, 100), AfterBatch::Forward, "what arrives before the pause goes too");
        b.ended(id);
        assert_eq!(b.running(), None);
        assert_eq!(b.batch_applied(100, 0), AfterBatch::Nothing);
        assert!(b.start().is_ok(), "a new backup after the last ended");
    }

    #[test]
    fn a_full_queue_fails_the_backup_and_only_the_copys_progress_frees_it() {
        let mut b = Backups::default();
        let id = b.start().unwrap();
        assert_eq!(b.batch_applied(BACKUP_QUEUE_BYTES, 0), AfterBatch::Forward);
        // The copy applied half: room for half again.
        assert_eq!(b.batch_applied(BACKUP_QUEUE_BYTES / 2, BACKUP_QUEUE_BYTES / 2), AfterBatch::Forward);
        match b.batch_applied(1, BACKUP_QUEUE_BYTES / 2) {
            AfterBatch::Fail(m) => assert!(m.contains("faster than the backup could copy"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.running(), None);
        assert_eq!(b.copied(id), Copied::Stale, "the copy's news of a failed backup is ignored");
        assert_eq!(b.batch_applied(1, 0), AfterBatch::Nothing);
    }
}
