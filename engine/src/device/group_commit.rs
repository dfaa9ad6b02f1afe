//! The app's writes between stored and durable: a group commit whose barrier need not hold up
//! anything else.
//!
//! [`Device::stage_batch`] carries a batch of writes out on the documents and stores it, not yet
//! durable; [`Device::start_barrier`] covers every batch stored so far with one barrier, unless
//! one is under way; [`Device::barrier_done`] answers the covered batches, in order, and queues
//! their outbox items with the sync core. Between start and done the driver goes on taking the
//! relay's frames (and the app's writes, which wait for the next barrier): the session's task no
//! longer waits for the disk, and the writes that come while it does share one barrier.
//!
//! Nothing goes to the relay before it is durable here (a client seq sent and then lost in a
//! crash would be given again to another delta): the sync core learns of a write only once its
//! barrier is done, and the outbox it loads from the store stops before the first write not yet
//! durable ([`Device::durable_bound`]). Client seqs are given at staging, in order, so a barrier
//! done for one batch is done for every batch staged before it.

use std::collections::VecDeque;

use crate::device::core::SyncCore;
use crate::device::drive::{Action, StagedWrites, Written};
use crate::device::local::{Device, MessageOp};
use crate::device::store::Barrier;
use crate::proto::ids::{ChatId, ClientSeq};

/// Batches stored and not yet answered, oldest first (a field of [`Device`]).
#[derive(Default)]
pub(crate) struct Unsettled {
    batches: VecDeque<Batch>,
    /// How many of the oldest batches the barrier under way covers (0: none under way).
    covered: usize,
}

struct Batch {
    writes: Vec<(ChatId, MessageOp)>,
    staged: StagedWrites,
}

/// What the driver does after [`Device::start_barrier`].
pub enum BarrierStart {
    /// Nothing to do: no batch waits, or a barrier is already under way.
    Nothing,
    /// The covered batches need no barrier (nothing of them was stored): call
    /// [`Device::barrier_done`] with `Ok(())` now.
    Done,
    /// Run this barrier where waiting for the disk blocks nothing else, then call
    /// [`Device::barrier_done`] with its outcome.
    Run(Barrier),
}

impl Device {
    /// Carries `writes` out on the documents and stores them in one write, not yet durable.
    /// Their answers come from [`Device::barrier_done`], in the order the batches were staged.
    ///
    /// The group commit for drivers that wait for the disk off their own thread (the session's
    /// driver, the simulator): stage the app's writes as they come, [`Device::start_barrier`],
    /// take the relay's frames meanwhile, and [`Device::barrier_done`] when the barrier is.
    /// Anything else that queues writes (a chat created, members changed) comes only once no
    /// write is unsettled ([`Device::writes_unsettled`]), so that client seqs reach the relay in
    /// order. [`Device::write_batch`] does the three at once.
    pub fn stage_batch(&mut self, writes: Vec<(ChatId, MessageOp)>) {
        let staged = self.stage_writes(&writes);
        self.unsettled.batches.push_back(Batch { writes, staged });
    }

    /// Covers every batch staged so far with one barrier, unless one is under way.
    pub fn start_barrier(&mut self) -> BarrierStart {
        let u = &mut self.unsettled;
        if u.covered > 0 || u.batches.is_empty() {
            return BarrierStart::Nothing;
        }
        u.covered = u.batches.len();
        match u.batches.iter().any(|b| b.staged.needs_barrier()) {
            true => BarrierStart::Run(self.barrier_handle()),
            false => BarrierStart::Done,
        }
    }

    /// The barrier [`Device::start_barrier`] asked for is done (or failed, with its error):
    /// answers every batch it covered, in order (one result per write), and queues their items
    /// with `core`. Returns the answers and what the driver must do now.
    pub fn barrier_done(
        &mut self,
        core: &mut SyncCore,
        barrier: Result<(), String>,
    ) -> (Vec<Vec<Written>>, Vec<Action>) {
        let covered = std::mem::take(&mut self.unsettled.covered);
        let batches: Vec<Batch> = self.unsettled.batches.drain(..covered).collect();
        let mut answers = Vec::with_capacity(batches.len());
        let mut actions = Vec::new();
        for batch in batches {
            let (written, a) = self.finish_writes(core, &batch.writes, batch.staged, barrier.clone());
            answers.push(written);
            actions.extend(a);
        }
        (answers, actions)
    }

    /// Whether writes wait for a barrier (staged, or covered by one under way).
    pub fn writes_unsettled(&self) -> bool {
        !self.unsettled.batches.is_empty()
    }

    /// The first client seq not yet known durable: outbox items from it on are not loaded for
    /// the relay yet (`None`: every stored item is durable).
    pub(crate) fn durable_bound(&self) -> Option<ClientSeq> {
        self.unsettled.batches.iter().flat_map(|b| b.staged.client_seqs()).min()
    }
}
