//! The relay's side of the simulation: carrying out the relay core's effects (writes to its
//! store, frames to devices, the fsync barrier, kills), and the relay's crashes and restarts.

use super::*;

impl Sim {
    pub(super) fn relay_effects(&mut self, effects: Vec<Effect>) -> Check {
        let mut queue = VecDeque::from(effects);
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Send { conn, frame } => {
                    self.check_relay_frame(&frame)?;
                    self.relay_send(conn, frame)?;
                }
                Effect::Close { conn } => {
                    let c = self.conns.get_mut(&conn).ok_or("close of an unknown connection")?;
                    c.relay_open = false;
                    let at = c.floor[R2C].max(self.now) + MS;
                    if let Some(core) = self.relay.core.as_mut() {
                        queue.extend(core.handle(Input::Closed { conn }));
                    }
                    self.schedule(at, Ev::DeviceLost { conn });
                }
                Effect::Kill { conn } => {
                    // The relay resets the stream (the core has already closed it); frames on
                    // the wire still arrive.
                    self.report.cut_off += 1;
                    let c = self.conns.get_mut(&conn).ok_or("kill of an unknown connection")?;
                    c.relay_open = false;
                    let at = c.floor[R2C].max(self.now) + MS;
                    self.schedule(at, Ev::DeviceLost { conn });
                }
                Effect::Write { token, ops } => {
                    mirror(&self.relay.mirror, &ops)?;
                    self.relay.store.apply(ops);
                    self.relay.written = token;
                    self.maybe_barrier();
                }
                Effect::ReadChat { conn, req, chat, after, upto, max } => {
                    let deltas = self.relay.store.read_chat(chat, after, upto, max);
                    let frame = RelayFrame::ChatPage { req, chat, deltas, head: upto };
                    self.check_relay_frame(&frame)?;
                    self.relay_send(conn, frame)?;
                }
                Effect::ReadAccount { conn, req, account, after, upto, max } => {
                    let entries = self.relay.store.read_account(account, after, upto, max);
                    self.relay_send(conn, RelayFrame::AccountPage { req, entries, head: upto })?;
                }
                Effect::Admin { id, .. } => return Err(format!("an answer to operator command {id}, never given")),
            }
        }
        Ok(())
    }

    /// A frame the relay sent on `conn` reached the device: the relay's transport reports it
    /// written (a page by number, anything else by its cost).
    pub(super) fn written_to_device(&mut self, conn: ConnId, frame: &RelayFrame) -> Check {
        if matches!(frame, RelayFrame::Behind { .. }) {
            self.report.behind += 1;
        }
        let c = &self.conns[&conn];
        if !c.relay_open || !c.dev_open || c.epoch != self.relay.epoch {
            return Ok(());
        }
        let Some(core) = self.relay.core.as_mut() else { return Ok(()) };
        let page = matches!(frame, RelayFrame::ChatPage { .. } | RelayFrame::AccountPage { .. });
        let input = if page {
            Input::Sent { conn, bytes: 0, pages: 1 }
        } else {
            Input::Sent { conn, bytes: frame_cost(frame), pages: 0 }
        };
        let effects = core.handle(input);
        self.relay_effects(effects)
    }

    pub(super) fn relay_send(&mut self, conn: ConnId, frame: RelayFrame) -> Check {
        if matches!(frame, RelayFrame::Error { code: ErrorCode::StaleEpoch, .. }) {
            self.report.stale_epochs += 1;
        }
        if let (Some(r), Some(c)) = (&self.revoking, self.conns.get(&conn)) {
            let session_ended = matches!(
                frame,
                RelayFrame::Error { code: ErrorCode::SessionRevoked, .. } | RelayFrame::SessionEnded { .. }
            );
            if r.done && c.dev == r.target && !session_ended {
                return Err(format!(
                    "the relay sent {} a frame after its session ended: {}",
                    self.devs[c.dev].name,
                    short_relay(&frame)
                ));
            }
        }
        if self.conns.get(&conn).is_some_and(|c| c.relay_open) {
            self.transmit(conn, R2C, Ev::ToDevice { conn, frame });
        }
        Ok(())
    }

    pub(super) fn maybe_barrier(&mut self) {
        if self.relay.barrier_running || self.relay.store.pending() == 0 {
            return;
        }
        self.relay.barrier_running = true;
        let slow = self.faults && self.rng.gen_bool(self.cfg.slow_barrier);
        let fails = self.faults && self.rng.gen_bool(self.cfg.failing_barrier);
        let took = if slow { self.rng.gen_range(200 * MS..3 * SEC) } else { self.rng.gen_range(100..2 * MS) };
        let ev = Ev::BarrierDone {
            epoch: self.relay.epoch,
            covering: self.relay.written,
            batches: self.relay.store.pending(),
            fails,
        };
        self.schedule(self.now + took, ev);
    }

    pub(super) fn relay_crash(&mut self) -> Check {
        self.report.relay_crashes += 1;
        self.relay.core = None;
        self.relay.epoch += 1;
        self.relay.barrier_running = false;
        self.relay.store.crash();
        let open: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.relay_open).map(|(id, _)| *id).collect();
        for conn in open {
            let c = self.conns.get_mut(&conn).expect("listed");
            c.relay_open = false;
            c.lost = [true; 2];
            if c.dev_open && !c.doomed {
                // The kernel resets the dead process's connections.
                c.doomed = true;
                let at = self.now + self.rng.gen_range(MS..100 * MS);
                self.schedule(at, Ev::DeviceLost { conn });
            }
        }
        self.check_acked_durable()?;
        let at = self.now + if self.faults { self.rng.gen_range(100 * MS..3 * SEC) } else { 0 };
        self.schedule(at, Ev::RelayStart);
        Ok(())
    }
}
