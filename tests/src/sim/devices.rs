//! The devices: feeding their sync cores, carrying out what they ask, writing, revoking, restarts.

use super::*;

impl Sim {
    // ---- devices ----

    /// Feeds the device's session core (at the simulated time) and carries out what it asks.
    pub(super) fn device_input(&mut self, dev: usize, input: SessionInput) -> Check {
        let now_ms = self.now / MS;
        let Some(core) = self.devs[dev].core.as_mut() else { return Ok(()) };
        let (work, outputs) = core.handle(now_ms, input);
        self.run_work(dev, work)?;
        self.device_outputs(dev, outputs)
    }

    pub(super) fn device_outputs(&mut self, dev: usize, outputs: Vec<SyncOutput>) -> Check {
        for o in &outputs {
            match o {
                SyncOutput::ApplyDelta(d) => {
                    self.check_identity(d.chat, d.seq, (d.device.clone(), d.client_seq), "applied")?;
                    self.check_next(dev, d.chat, d.seq)?;
                }
                SyncOutput::Cursor { chat, seq } => self.check_next(dev, *chat, *seq)?,
                SyncOutput::RetryAfter { .. } => self.report.rate_limited += 1,
                _ => {}
            }
        }
        let touched: BTreeSet<ChatId> = outputs
            .iter()
            .filter_map(|o| match o {
                SyncOutput::ApplyDelta(d) => Some(d.chat),
                _ => None,
            })
            .collect();
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        let actions = device.carry_out(core.sync(), outputs);
        // A delta whose epoch key had not arrived yet was not applied: the device's cursor
        // stayed before it, and it comes again once the key is here.
        for chat in touched {
            let stored = device.cursor(chat).map_err(|e| e.to_string())?;
            let last = d.applied.entry(chat).or_default();
            if stored < *last {
                *last = stored;
                self.report.key_waits += 1;
            }
        }
        self.run_actions(dev, actions)
    }

    /// What a local write or the sync core's outputs asked of the driver.
    pub(super) fn run_actions(&mut self, dev: usize, actions: Vec<Action>) -> Check {
        let now_ms = self.now / MS;
        let Some(core) = self.devs[dev].core.as_mut() else { return Ok(()) };
        let work = core.actions(now_ms, actions);
        self.run_work(dev, work)
    }

    /// Carries out the session core's work, then schedules its next wake-up.
    pub(super) fn run_work(&mut self, dev: usize, work: Vec<Work>) -> Check {
        for w in work {
            match w {
                Work::Connect { .. } => {
                    // Dialing takes a round trip before it succeeds or fails.
                    let at = self.now + 2 * self.devs[dev].latency;
                    let life = self.devs[dev].life;
                    self.schedule(at, Ev::Connect { dev, life });
                }
                Work::Close => {
                    if let Some(conn) = self.devs[dev].conn.take() {
                        self.report.watchdog_closes += 1;
                        self.drop_conn(conn);
                    }
                }
                Work::Send(frame) => {
                    if let Some(conn) = self.devs[dev].conn {
                        self.transmit(conn, C2R, Ev::ToRelay { conn, frame });
                    }
                }
                Work::Answer { token, frame } => {
                    self.revoke_reply(dev, token, &frame)?;
                    self.change_reply(dev, token, &frame)?;
                }
                // Asked again by the next `Revoke` or `ChangeMembers` event; the simulation parks
                // nothing.
                Work::Unanswered { .. } | Work::Ready { .. } => {}
                Work::Emit(event) => self.emitted(dev, event)?,
            }
            if self.devs[dev].gone {
                return Ok(());
            }
        }
        self.schedule_wake(dev);
        Ok(())
    }

    /// Schedules the wake-up the device's session core asks for, unless one is due then.
    pub(super) fn schedule_wake(&mut self, dev: usize) {
        let d = &self.devs[dev];
        let Some(next) = d.core.as_ref().and_then(SessionCore::next_wake) else { return };
        let at = (next * MS).max(self.now);
        if d.wake == Some(at) {
            return;
        }
        let life = d.life;
        self.devs[dev].wake = Some(at);
        self.schedule(at, Ev::Wake { dev, life, at });
    }

    fn emitted(&mut self, dev: usize, event: Event) -> Check {
        match event {
            // What the departed account had queued for the group is refused for good.
            Event::Rejected { chat, code: ErrorCode::NotMember, .. } if self.departed(dev, chat) => {}
            Event::Rejected { chat, client_seq, code, message } => {
                return Err(format!(
                    "{} had chat {chat} client seq {} rejected: {message} ({code:?})",
                    self.devs[dev].name, client_seq.0
                ))
            }
            Event::Error { message } => return Err(format!("{} reported an error: {message}", self.devs[dev].name)),
            Event::Acked { client_seq, .. } => {
                self.devs[dev].acked.insert(client_seq);
            }
            Event::SessionRevoked => {
                let r = self.revoking.as_ref().ok_or("a session ended without a revocation")?;
                if r.target != dev {
                    return Err(format!("{} was told its session ended; the target was another", self.devs[dev].name));
                }
                if !self.devs[dev].disk.is_empty() {
                    return Err(format!("{}'s store is still on disk after its session ended", self.devs[dev].name));
                }
                let d = &mut self.devs[dev];
                d.gone = true;
                d.conn = None;
                d.core = None;
            }
            // The relay here is honest: it always shows the revocation it acted on.
            Event::SessionRefused => {
                return Err(format!("{} was refused its session without a proof", self.devs[dev].name))
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn create_chat(&mut self, dev: usize) -> Check {
        self.settle(dev)?;
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        let title = format!("{}'s chat", d.name);
        let (chat, actions) =
            device.create_chat(core.sync(), &title).map_err(|e| format!("{} creates a chat: {e}", d.name))?;
        let account = d.account;
        self.chats[account].push(chat);
        self.creators.insert(chat, dev);
        self.run_actions(dev, actions)
    }

    pub(super) fn revoke(&mut self) -> Check {
        let Some(r) = self.revoking.as_ref() else { return Ok(()) };
        if r.done {
            return Ok(());
        }
        let (by, target) = (r.by, r.target);
        // Asked again until done: a request lost with its connection is not in any outbox.
        self.schedule(self.now + 5 * SEC, Ev::Revoke);
        let target_id = self.devs[target].id.clone();
        let d = &mut self.devs[by];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else {
            return Ok(());
        };
        if !core.sync_ref().is_connected() {
            return Ok(());
        }
        self.next_token += 1;
        let token = self.next_token;
        let work = core.try_request(token, |req| device.revoke_request(&target_id, req)).map_err(|e| e.to_string())?;
        self.revoking.as_mut().expect("checked").req = Some(token);
        self.run_work(by, vec![work])
    }

    /// Whether `dev`'s account is the one leaving the group `chat`.
    pub(super) fn departed(&self, dev: usize, chat: ChatId) -> bool {
        self.departure.as_ref().is_some_and(|d| d.account == self.devs[dev].account) && self.group == Some(chat)
    }

    pub(super) fn change_members(&mut self) -> Check {
        let (Some(d), Some(chat)) = (self.departure.as_ref(), self.group) else { return Ok(()) };
        if d.done {
            return Ok(());
        }
        let (by, removed) = (d.by, d.removed);
        let last = self.cfg.devices[..d.account].iter().sum::<usize>();
        // Asked again until done: a request lost with its connection is not in any outbox.
        self.schedule(self.now + 5 * SEC, Ev::ChangeMembers);
        let Some(account) = self.devs[last].device.as_ref().and_then(Device::account) else { return Ok(()) };
        let change = match removed {
            true => stratus_engine::proto::directory::Membership::Remove { account },
            false => stratus_engine::proto::directory::Membership::Leave,
        };
        let dv = &mut self.devs[by];
        let (Some(device), Some(core)) = (dv.device.as_mut(), dv.core.as_mut()) else {
            return Ok(());
        };
        if !core.sync_ref().is_connected() {
            return Ok(());
        }
        self.next_token += 1;
        let token = self.next_token;
        let work = match core.try_request(token, |req| device.member_change_request(chat, change, req)) {
            Ok(w) => w,
            // Not a member of it yet (the group reaches a device through the account log), or
            // no longer (the change was made and its answer lost): asked again, or done.
            Err(stratus_engine::Error::UnknownChat(_)) => return Ok(()),
            Err(stratus_engine::Error::NotMember(_)) => return self.departure_done(),
            Err(e) => return Err(e.to_string()),
        };
        self.departure.as_mut().expect("checked").req = Some(token);
        self.run_work(by, vec![work])
    }

    fn departure_done(&mut self) -> Check {
        let d = self.departure.as_mut().expect("a departure");
        if !d.done {
            d.done = true;
            self.report.member_changes += 1;
        }
        Ok(())
    }

    pub(super) fn change_reply(&mut self, dev: usize, token: u64, frame: &RelayFrame) -> Check {
        let Some(d) = self.departure.as_ref() else { return Ok(()) };
        if d.by != dev || d.req != Some(token) {
            return Ok(());
        }
        match frame {
            RelayFrame::Done { .. } => self.departure_done(),
            // The account is not a member any more (the answer to an earlier attempt was lost).
            RelayFrame::Error { code: ErrorCode::NotMember, .. } => self.departure_done(),
            // Asked again by the next event: limited, or made for an epoch the chat moved past.
            RelayFrame::RateLimited { .. }
            | RelayFrame::Error { code: ErrorCode::RateLimited | ErrorCode::StaleEpoch, .. } => Ok(()),
            other => Err(format!("the member change was refused: {other:?}")),
        }
    }

    pub(super) fn revoke_reply(&mut self, dev: usize, token: u64, frame: &RelayFrame) -> Check {
        let Some(r) = self.revoking.as_mut() else { return Ok(()) };
        if r.by != dev || r.req != Some(token) {
            return Ok(());
        }
        match frame {
            RelayFrame::Done { .. } => {
                r.done = true;
                self.report.revocations += 1;
                // The rotation is durable with the revocation: every chat the account had then
                // has its new epoch (chats created since start at epoch 0 under the new keys),
                // and the relay stores nothing under an older one after it.
                let account = self.devs[dev].account;
                let store = &self.relay.store;
                r.rotated = self.chats[account]
                    .iter()
                    .filter_map(|c| store.durable_chat(*c).map(|rec| (*c, rec)))
                    .map(|(c, rec)| {
                        let head = store.durable_log(c).last().map(|d| d.seq).unwrap_or_default();
                        (c, head, rec.newest)
                    })
                    .collect();
                let target = self.devs[r.target].id.clone();
                self.dev_mut(dev).revoke_done(&target).map_err(|e| e.to_string())
            }
            // Asked again by the next `Revoke` event (the sync core hands a limited request of
            // the driver's back as an error with the `RateLimited` code). `StaleEpoch`: the
            // revoker has not synced a device or chat the relay has; by then it will have.
            RelayFrame::RateLimited { .. }
            | RelayFrame::Error { code: ErrorCode::RateLimited | ErrorCode::StaleEpoch, .. } => Ok(()),
            other => Err(format!("the revocation was refused: {other:?}")),
        }
    }

    pub(super) fn compose(&mut self, dev: usize) -> Check {
        if !self.faults || self.devs[dev].written >= self.cfg.messages_per_device {
            return Ok(());
        }
        let next = self.now + self.poisson(3 * SEC).max(MS);
        self.schedule(next, Ev::Compose { dev });
        if self.devs[dev].device.is_none() {
            return Ok(());
        }
        let account = self.devs[dev].account;
        let chat = self.chats[account][self.rng.gen_range(0..self.chats[account].len())];
        let text = format!("{} #{}", self.devs[dev].name, self.devs[dev].written);
        let (pick, kind) = (self.rng.gen::<usize>(), self.rng.gen_range(0..10u8));
        self.settle(dev)?;
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        // Three times in ten, something done to a message the device shows instead: an edit or
        // delete of its account's, a reaction, a read mark. They must converge like messages.
        let shown = device.messages(chat).unwrap_or_default();
        if kind < 3 && !shown.is_empty() {
            let m = &shown[pick % shown.len()];
            let op = match pick % 4 {
                0 => MessageOp::Edit { id: m.id.clone(), text: format!("{text} (edit)") },
                1 => MessageOp::Delete { id: m.id.clone() },
                2 => MessageOp::React { id: m.id.clone(), reaction: "👍".into(), add: pick % 8 < 4 },
                _ => MessageOp::Read { id: m.id.clone() },
            };
            return match device.write(core.sync(), chat, &op) {
                Ok((_, _, actions)) => self.run_actions(dev, actions),
                // Another account's message, or one deleted already; a group it left.
                Err(
                    stratus_engine::Error::NotYours(_)
                    | stratus_engine::Error::Doc(_)
                    | stratus_engine::Error::NotMember(_),
                ) => Ok(()),
                Err(e) => Err(format!("{} could not {op:?}: {e}", self.devs[dev].name)),
            };
        }
        if self.send_message(dev, chat, &text)? {
            self.devs[dev].written += 1;
        }
        Ok(())
    }

    /// Writes one message on `dev` into `chat` and records it for the checks; false when the
    /// device cannot write there (yet).
    fn send_message(&mut self, dev: usize, chat: ChatId, text: &str) -> Result<bool, String> {
        Ok(self.send_batch(dev, &[(chat, MessageOp::Send { text: text.to_string(), reply_to: None })])? == 1)
    }

    /// The next messages of a burst: every device of the first account writes [`Config::burst`]'s
    /// count of messages [`BURST_GAP`] apart (2,000 messages/s each), faults or not. They are
    /// written in batches of one to eight under one store barrier, as a session's group commit
    /// takes the sends waiting for it (the batch size comes from the message count, not the
    /// RNG, so that seeds replay the runs they did before batching).
    pub(super) fn burst(&mut self, dev: usize, left: u32) -> Check {
        if left == 0 {
            return Ok(());
        }
        let take = (1 + (left as usize * 7 + dev) % 8).min(left as usize) as u32;
        self.schedule(self.now + u64::from(take) * BURST_GAP, Ev::Burst { dev, left: left - take });
        if self.devs[dev].device.is_none() {
            return Ok(());
        }
        let account = self.devs[dev].account;
        let writes: Vec<_> = (0..take)
            .map(|i| {
                let n = left - i;
                let chat = self.chats[account][n as usize % self.chats[account].len()];
                (chat, MessageOp::Send { text: format!("{} burst #{n}", self.devs[dev].name), reply_to: None })
            })
            .collect();
        self.stage(dev, writes)
    }

    /// Writes `writes` on `dev` under one barrier ([`Device::write_batch`]), after every write it
    /// staged before, and records them for the checks; how many it could write.
    fn send_batch(&mut self, dev: usize, writes: &[(ChatId, MessageOp)]) -> Result<u32, String> {
        self.settle(dev)?;
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(0) };
        let (results, actions) = device.write_batch(core.sync(), writes);
        let written = self.record_written(dev, writes, results)?;
        self.run_actions(dev, actions)?;
        Ok(written)
    }

    pub(super) fn device_down(&mut self, dev: usize) -> Check {
        self.report.device_restarts += 1;
        if let Some(conn) = self.devs[dev].conn.take() {
            let c = self.conns.get_mut(&conn).expect("open");
            c.dev_open = false;
            c.lost = [true; 2];
            if !c.doomed {
                c.doomed = true;
                // A killed process's sockets are reset; a powered-off phone's time out.
                let at = self.now + if self.rng.gen_bool(0.5) { MS } else { self.rng.gen_range(2 * SEC..20 * SEC) };
                self.schedule(at, Ev::RelayLost { conn });
            }
        }
        let power_loss = self.rng.gen_bool(0.5);
        let d = &mut self.devs[dev];
        d.core = None;
        d.device = None;
        d.life += 1;
        d.wake = None;
        d.inbox.clear();
        // Staged writes go unanswered (what of them was durable is sent after the restart).
        d.unsettled.clear();
        d.barrier = None;
        if power_loss {
            // What was not made durable is gone, but for a prefix of it (sled writes in order).
            let keep = self.rng.gen_range(0..=d.disk.unsynced());
            d.disk.crash(keep);
            d.crashed = true;
            self.report.device_crashes += 1;
        }
        Ok(())
    }

    pub(super) fn device_up(&mut self, dev: usize) -> Check {
        if self.devs[dev].gone || self.devs[dev].device.is_some() {
            return Ok(());
        }
        let seed = self.rng.gen();
        let d = &mut self.devs[dev];
        let mut device = Device::open_mem(&d.disk, seed).map_err(|e| format!("{} reopens: {e}", d.name))?;
        device.set_clock(sim_now_ms);
        let mut stored = BTreeMap::new();
        for s in device.chats().map_err(|e| e.to_string())? {
            let chat: ChatId = s.id.parse().map_err(|_| "chat id")?;
            stored.insert(chat, Seq(s.seq));
        }
        let crashed = std::mem::take(&mut d.crashed);
        for (chat, tracked) in d.applied.iter_mut() {
            let now = stored.get(chat).copied().unwrap_or_default();
            // A crash may take back what was applied and not yet durable (it is fetched again);
            // nothing else may move a cursor, and nothing moves one forward.
            if now > *tracked || (now < *tracked && !crashed) {
                return Err(format!(
                    "{} restarted with chat {chat} at seq {} but had applied {}",
                    d.name, now.0, tracked.0
                ));
            }
            self.report.lost_applies += (tracked.0 - now.0) as u32;
            *tracked = now;
        }
        d.core = Some(device.start_session().map_err(|e| e.to_string())?);
        d.device = Some(device);
        self.schedule_wake(dev);
        Ok(())
    }
}
