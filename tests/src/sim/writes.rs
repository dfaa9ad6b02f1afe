//! The simulated devices' bursts of writes, through the device's group commit as the session's
//! driver runs it (`group_commit.rs` in the engine): a batch is staged at once, the barrier
//! under way completes [`DISK_BARRIER`] later while the relay's frames keep coming (and further
//! batches wait for the next barrier), and only then are the writes answered and sent. A crash
//! meanwhile loses them unanswered. Anything else that queues writes settles them first.

use super::*;
use stratus_engine::BarrierStart;

/// How long a device's store barrier takes (fixed: the RNG's draws stay as they were, so seeds
/// replay the runs they did before).
const DISK_BARRIER: u64 = 2 * MS;

/// The results of a batch of writes, one per write, as the device answers them.
type Answers = Vec<stratus_engine::Written>;

impl Sim {
    /// Stages `writes` (a burst's, counted in the report once answered) on `dev`, and starts a
    /// barrier for them unless one is under way.
    pub(super) fn stage(&mut self, dev: usize, writes: Vec<(ChatId, MessageOp)>) -> Check {
        let d = &mut self.devs[dev];
        let Some(device) = d.device.as_mut() else { return Ok(()) };
        device.stage_batch(writes.clone());
        d.unsettled.push_back(writes);
        self.start_device_barrier(dev)
    }

    fn start_device_barrier(&mut self, dev: usize) -> Check {
        loop {
            let d = &mut self.devs[dev];
            let Some(device) = d.device.as_mut() else { return Ok(()) };
            match device.start_barrier() {
                BarrierStart::Nothing => return Ok(()),
                BarrierStart::Done => self.writes_done(dev, Ok(()))?,
                BarrierStart::Run(barrier) => {
                    d.barrier = Some(barrier);
                    let life = d.life;
                    self.schedule(self.now + DISK_BARRIER, Ev::DeviceBarrier { dev, life });
                    return Ok(());
                }
            }
        }
    }

    /// The barrier `dev` started in its process `life` is done.
    pub(super) fn device_barrier(&mut self, dev: usize, life: u64) -> Check {
        if self.devs[dev].life != life {
            return Ok(());
        }
        let Some(barrier) = self.devs[dev].barrier.take() else { return Ok(()) };
        self.writes_done(dev, barrier.barrier().map_err(|e| e.to_string()))?;
        self.start_device_barrier(dev)
    }

    fn writes_done(&mut self, dev: usize, barrier: Result<(), String>) -> Check {
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        let (answers, actions) = device.barrier_done(core.sync(), barrier);
        for results in answers {
            let writes = self.devs[dev].unsettled.pop_front().unwrap_or_default();
            self.report.burst_messages += self.record_written(dev, &writes, results)?;
        }
        self.run_actions(dev, actions)
    }

    /// Makes every write `dev` staged durable now, answered and sent: before anything else that
    /// queues writes of its own.
    pub(super) fn settle(&mut self, dev: usize) -> Check {
        while self.devs[dev].device.as_ref().is_some_and(Device::writes_unsettled) {
            match self.devs[dev].barrier.take() {
                Some(barrier) => self.writes_done(dev, barrier.barrier().map_err(|e| e.to_string()))?,
                None => {
                    self.start_device_barrier(dev)?;
                    if self.devs[dev].barrier.is_none() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records the writes `dev` had answered for the checks; how many succeeded.
    pub(super) fn record_written(
        &mut self,
        dev: usize,
        writes: &[(ChatId, MessageOp)],
        results: Answers,
    ) -> Result<u32, String> {
        let mut written = 0;
        for ((chat, _), result) in writes.iter().zip(results) {
            match result {
                Ok((message, client_seq)) => {
                    let account = self.devs[dev].account;
                    if let Some(dep) =
                        self.departure.as_mut().filter(|p| p.done && p.account != account && Some(*chat) == self.group)
                    {
                        dep.written_after.insert(message.id.clone());
                    }
                    self.written_by.insert(message.id.clone(), (dev, client_seq));
                    self.written.entry(*chat).or_default().insert(message.id);
                    written += 1;
                }
                // A linked device learns the chat's key from the account log: not yet. A group the
                // account left.
                Err(stratus_engine::Error::UnknownChat(_) | stratus_engine::Error::NotMember(_)) => {}
                Err(e) => return Err(format!("{} could not write: {e}", self.devs[dev].name)),
            }
        }
        Ok(written)
    }
}
