//! The invariants, checked as the run goes and at its end (listed in the module docs).

use super::*;

impl Sim {
    // ---- invariants ----

    pub(super) fn check_identity(&mut self, chat: ChatId, seq: Seq, who: (DeviceId, ClientSeq), what: &str) -> Check {
        match self.seen.get(&(chat, seq)) {
            Some(prev) if *prev != who => Err(format!(
                "chat {chat} seq {} {what} as {}#{} but was {}#{} before",
                seq.0, who.0 .0, who.1 .0, prev.0 .0, prev.1 .0
            )),
            Some(_) => Ok(()),
            None => {
                self.seen.insert((chat, seq), who);
                Ok(())
            }
        }
    }

    pub(super) fn check_next(&mut self, dev: usize, chat: ChatId, seq: Seq) -> Check {
        let d = &mut self.devs[dev];
        let last = d.applied.entry(chat).or_default();
        if seq != last.next() {
            return Err(format!("{} applied chat {chat} seq {} right after seq {}", d.name, seq.0, last.0));
        }
        *last = seq;
        Ok(())
    }

    /// What the relay shows a device must be durable.
    pub(super) fn check_relay_frame(&self, frame: &RelayFrame) -> Check {
        let shown: Vec<(ChatId, Seq)> = match frame {
            RelayFrame::Acked { chat, seq, .. } => vec![(*chat, *seq)],
            RelayFrame::Push { delta } => vec![(delta.chat, delta.seq)],
            RelayFrame::ChatPage { deltas, .. } => deltas.iter().map(|d| (d.chat, d.seq)).collect(),
            _ => Vec::new(),
        };
        if let RelayFrame::Behind { chats, .. } = frame {
            if let Some((chat, head)) =
                chats.iter().find(|(chat, head)| head.0 > 0 && self.relay.store.durable_delta(*chat, *head).is_none())
            {
                return Err(format!("the relay said chat {chat} was at seq {} before it was durable", head.0));
            }
        }
        match shown.into_iter().find(|(chat, seq)| self.relay.store.durable_delta(*chat, *seq).is_none()) {
            Some((chat, seq)) => Err(format!("the relay showed chat {chat} seq {} before it was durable", seq.0)),
            None => Ok(()),
        }
    }

    pub(super) fn observe_relay_frame(&mut self, dev: usize, frame: &RelayFrame) -> Check {
        match frame {
            RelayFrame::Acked { chat, client_seq, seq, .. } => {
                let who = (self.devs[dev].id.clone(), *client_seq);
                self.check_identity(*chat, *seq, who.clone(), "acknowledged")?;
                self.acked.insert((*chat, *seq), who);
            }
            RelayFrame::Push { delta } => {
                self.check_identity(delta.chat, delta.seq, (delta.device.clone(), delta.client_seq), "pushed")?
            }
            RelayFrame::ChatPage { deltas, .. } => {
                for d in deltas {
                    self.check_identity(d.chat, d.seq, (d.device.clone(), d.client_seq), "paged")?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn check_acked_durable(&self) -> Check {
        for ((chat, seq), (device, cs)) in &self.acked {
            match self.relay.store.durable_delta(*chat, *seq) {
                Some(d) if d.device == *device && d.client_seq == *cs => {}
                Some(d) => {
                    return Err(format!(
                        "acknowledged chat {chat} seq {} is now another delta ({}#{})",
                        seq.0, d.device.0, d.client_seq.0
                    ))
                }
                None => return Err(format!("acknowledged chat {chat} seq {} was lost", seq.0)),
            }
        }
        Ok(())
    }

    pub(super) fn converged(&mut self) -> Result<bool, String> {
        if self.relay.core.is_none() || self.relay.store.pending() > 0 || self.relay.barrier_running {
            return Ok(false);
        }
        if let Some(r) = &self.revoking {
            // The revocation completes once faults stop, and the revoked device learns of it.
            if !r.done || !self.devs[r.target].gone {
                return Ok(false);
            }
        }
        let live = |d: &Dev| !d.gone;
        if !self
            .devs
            .iter()
            .filter(|d| live(d))
            .all(|d| d.conn.is_some() && d.core.as_ref().is_some_and(|c| c.sync_ref().is_idle()))
        {
            return Ok(false);
        }
        // A chat whose creation never reached the relay before its device's session ended is
        // gone with that device.
        let durable: BTreeSet<ChatId> = self.relay.store.durable_chats().into_iter().collect();
        let lost = |sim: &Sim, chat: &ChatId| !durable.contains(chat) && sim.devs[sim.creators[chat]].gone;
        // The member change completes once faults stop (unless the group was lost so).
        if self.departure.as_ref().is_some_and(|d| !d.done) && !self.group.is_some_and(|g| lost(self, &g)) {
            return Ok(false);
        }
        // The departed account's devices no longer follow the group: they must show it left,
        // and none of what the others wrote after.
        let gone_from = |account: usize| self.departure.as_ref().filter(|d| d.account == account).and(self.group);
        let chats: Vec<Vec<ChatId>> = self
            .chats
            .iter()
            .enumerate()
            .map(|(a, cs)| cs.iter().filter(|c| !lost(self, c) && gone_from(a) != Some(**c)).copied().collect())
            .collect();
        if let (Some(d), Some(group)) = (self.departure.as_ref().filter(|d| d.done), self.group) {
            let (after, account) = (d.written_after.clone(), d.account);
            let devs: Vec<usize> =
                (0..self.devs.len()).filter(|x| self.devs[*x].account == account && live(&self.devs[*x])).collect();
            for dev in devs {
                let device = self.dev_mut(dev);
                let left =
                    device.chats().map_err(|e| e.to_string())?.iter().any(|c| c.id == group.to_string() && c.left);
                if !left {
                    return Ok(false);
                }
                let shown = device.messages(group).map_err(|e| e.to_string())?;
                if let Some(m) = shown.iter().find(|m| after.contains(&m.id)) {
                    return Err(format!("a device of the departed account shows {} written after it left", m.id));
                }
            }
        }
        for dev in (0..self.devs.len()).filter(|d| live(&self.devs[*d])) {
            let account = self.devs[dev].account;
            for &chat in &chats[account] {
                let head = self.relay.store.durable_log(chat).last().map(|d| d.seq).unwrap_or_default();
                if self.devs[dev].applied.get(&chat).copied().unwrap_or_default() != head {
                    return Ok(false);
                }
            }
        }
        for (account, chats) in chats.iter().enumerate() {
            let devs: Vec<usize> =
                (0..self.devs.len()).filter(|d| self.devs[*d].account == account && live(&self.devs[*d])).collect();
            for chat in chats {
                let mut first: Option<(Vec<String>, Vec<stratus_engine::Message>)> = None;
                for &dev in &devs {
                    let device = self.dev_mut(dev);
                    let (heads, messages) = match (device.heads(*chat), device.messages(*chat)) {
                        (Ok(h), Ok(m)) => (h, m),
                        (Err(stratus_engine::Error::UnknownChat(_)), _) => return Ok(false),
                        (Err(e), _) | (_, Err(e)) => return Err(e.to_string()),
                    };
                    match &first {
                        None => first = Some((heads, messages)),
                        Some((h, m)) => {
                            if *h != heads || *m != messages {
                                return Ok(false);
                            }
                        }
                    }
                }
                let shown: BTreeSet<String> =
                    first.map(|(_, m)| m.into_iter().map(|m| m.id).collect()).unwrap_or_default();
                // A revoked device's messages the relay never acknowledged may be lost with it.
                // So may the departed account's messages to the group that the relay refused.
                let expected = |id: &&String| match self.written_by.get(*id) {
                    Some((by, cs)) if self.devs[*by].gone || self.departed(*by, *chat) => {
                        self.devs[*by].acked.contains(cs)
                    }
                    _ => true,
                };
                if let Some(missing) = self.written.get(chat).and_then(|w| w.difference(&shown).find(|id| expected(id)))
                {
                    return Err(format!("every device is idle but message {missing} of chat {chat} is missing"));
                }
            }
        }
        Ok(true)
    }

    pub(super) fn final_checks(&self) -> Check {
        self.check_acked_durable()?;
        if let Some(sled) = &self.relay.mirror {
            let theirs = sled.recover().map_err(|e| e.to_string())?;
            if format!("{theirs:?}") != format!("{:?}", self.relay.store.recover()) {
                return Err("the simulated store and sled recover different indexes".into());
            }
            for chat in self.relay.store.durable_chats() {
                let head = self.relay.store.durable_log(chat).len() as u64;
                for after in 0..=head {
                    let theirs = sled.read_chat(chat, Seq(after), Seq(head), 3).map_err(|e| e.to_string())?;
                    if theirs != self.relay.store.read_chat(chat, Seq(after), Seq(head), 3) {
                        return Err(format!("the simulated store and sled page chat {chat} after {after} differently"));
                    }
                }
            }
            // Account logs: sled stores key chains once and puts them back when it reads.
            for (account, head) in self.relay.store.durable_accounts() {
                let theirs = sled.read_account(account, Seq(0), head, 3).map_err(|e| e.to_string())?;
                if theirs != self.relay.store.read_account(account, Seq(0), head, 3) {
                    return Err(format!("the simulated store and sled read account {account}'s log differently"));
                }
            }
        }
        for chat in self.relay.store.durable_chats() {
            // Each epoch's keys are records of their own: the newest epoch's are wrapped to
            // exactly the members, unless a change since calls for the next.
            let record = self.relay.store.durable_chat(chat).ok_or("a durable chat has a record")?;
            let holders: BTreeSet<_> =
                self.relay.store.durable_chat_keys(chat, record.newest).iter().map(|k| k.account).collect();
            if !record.rekey_due && holders != record.members {
                return Err(format!("chat {chat}'s epoch {} has keys for {holders:?}", record.newest.0));
            }
            let log = self.relay.store.durable_log(chat);
            let mut ids = BTreeSet::new();
            for (i, d) in log.iter().enumerate() {
                if d.seq != Seq(i as u64 + 1) {
                    return Err(format!("chat {chat}'s log has seq {} at position {}", d.seq.0, i + 1));
                }
                if !ids.insert((d.device.clone(), d.client_seq)) {
                    return Err(format!("chat {chat} stores {}#{} twice", d.device.0, d.client_seq.0));
                }
            }
        }
        for (chat, head, epoch) in self.revoking.iter().flat_map(|r| &r.rotated) {
            if let Some(d) = self.relay.store.durable_log(*chat).iter().find(|d| d.seq > *head && d.epoch < *epoch) {
                return Err(format!(
                    "chat {chat} stored seq {} under epoch {} after the rotation began epoch {}",
                    d.seq.0, d.epoch.0, epoch.0
                ));
            }
        }
        for d in self.devs.iter().filter(|d| !d.gone) {
            let outbox = d.device.as_ref().map(Device::outbox_len).unwrap_or_default();
            if outbox > 0 {
                return Err(format!("{} still has {outbox} deltas in its outbox", d.name));
            }
        }
        Ok(())
    }

    pub(super) fn diagnose(&self) -> String {
        let mut out = Vec::new();
        if let Some(r) = &self.revoking {
            out.push(format!("{} revokes {}: done {}", self.devs[r.by].name, self.devs[r.target].name, r.done));
        }
        out.push(format!(
            "relay {} pending {} barrier {}",
            if self.relay.core.is_some() { "up" } else { "down" },
            self.relay.store.pending(),
            self.relay.barrier_running
        ));
        for d in &self.devs {
            out.push(format!(
                "{}: {} conn {:?} idle {} outbox {} applied {:?} ({})",
                d.name,
                if d.gone {
                    "gone"
                } else if d.device.is_some() {
                    "up"
                } else {
                    "down"
                },
                d.conn,
                d.core.as_ref().is_some_and(|c| c.sync_ref().is_idle()),
                d.device.as_ref().map(Device::outbox_len).unwrap_or_default(),
                d.applied.values().map(|s| s.0).collect::<Vec<_>>(),
                d.core.as_ref().map(|c| c.sync_ref().summary()).unwrap_or_default()
            ));
        }
        out.join("; ")
    }
}
