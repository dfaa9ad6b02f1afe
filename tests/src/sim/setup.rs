//! Building the world: devices, accounts, links and chats (fault-free), and the fault schedule.

use super::*;

impl Sim {
    // ---- setup ----

    pub(super) fn setup(&mut self) -> Check {
        for (a, &n) in self.cfg.devices.clone().iter().enumerate() {
            for i in 0..n {
                let name = format!("a{a}d{i}");
                let disk = MemDisk::new();
                let mut device = Device::open_mem(&disk, self.rng.gen()).map_err(|e| e.to_string())?;
                device.set_clock(sim_now_ms);
                let latency = self.rng.gen_range(1..=20) * MS;
                self.devs.push(Dev {
                    name,
                    account: a,
                    disk,
                    crashed: false,
                    id: device.id().clone(),
                    device: Some(device),
                    core: None,
                    conn: None,
                    latency,
                    offline_until: 0,
                    partition_until: [0; 2],
                    wake: None,
                    applied: BTreeMap::new(),
                    written: 0,
                    life: 0,
                    inbox: VecDeque::new(),
                    busy_until: 0,
                    acked: BTreeSet::new(),
                    gone: false,
                    unsettled: VecDeque::new(),
                    barrier: None,
                });
            }
        }
        let mut first = 0;
        for (a, &n) in self.cfg.devices.clone().iter().enumerate() {
            let owner = first;
            let conn = self.setup_conn(owner)?;
            let request =
                self.dev_mut(owner).create_account_request(RELAY_NAME, "owner", 1).map_err(|e| e.to_string())?;
            self.expect_done(conn, request)?;
            self.dev_mut(owner).create_account_done().map_err(|e| e.to_string())?;
            for i in 1..n {
                let new = first + i;
                let code = self.dev_mut(new).link_code().map_err(|e| e.to_string())?;
                let waiting = self.setup_conn(new)?;
                let wait = self.dev_mut(new).link_request("linked", &code, 1).map_err(|e| e.to_string())?;
                self.direct(waiting, wait)?;
                let info = self.direct(conn, Device::approve_lookup(&code, 2))?;
                let info = info
                    .into_iter()
                    .find(|(c, f)| *c == conn && matches!(f, RelayFrame::LinkInfo { .. }))
                    .ok_or("no link info")?
                    .1;
                let (approve, cert) = self.dev_mut(owner).approve_request(&code, info, 3).map_err(|e| e.to_string())?;
                let replies = self.direct(conn, approve)?;
                let approved = replies
                    .into_iter()
                    .find(|(c, f)| *c == waiting && matches!(f, RelayFrame::LinkApproved { .. }))
                    .ok_or("no approval")?
                    .1;
                self.dev_mut(new).link_done(RELAY_NAME, &code, approved).map_err(|e| e.to_string())?;
                self.dev_mut(owner).approve_done(&cert).map_err(|e| e.to_string())?;
                self.setup_close(waiting)?;
            }
            // The chats go to the relay through the outbox, under faults like everything else.
            let mut chats = Vec::new();
            for c in 0..self.cfg.chats_per_account {
                let (chat, _) = self.dev_mut(owner).new_chat(&format!("chat {a}.{c}")).map_err(|e| e.to_string())?;
                self.creators.insert(chat, owner);
                chats.push(chat);
            }
            self.chats.push(chats);
            self.setup_close(conn)?;
            first += n;
        }
        if self.cfg.devices.len() >= 2 {
            self.setup_group()?;
        }
        for dev in 0..self.devs.len() {
            let d = &mut self.devs[dev];
            let core = d.device.as_mut().expect("up").start_session().map_err(|e| e.to_string())?;
            d.core = Some(core);
            // Devices start a little apart: each session core connects at its first wake-up.
            let at = self.rng.gen_range(0..100 * MS);
            d.wake = Some(at);
            let life = d.life;
            self.schedule(at, Ev::Wake { dev, life, at });
            let at = self.poisson(3 * SEC);
            self.schedule(at, Ev::Compose { dev });
        }
        self.schedule_faults();
        if let Some(at) = self.cfg.revoke_at {
            if self.cfg.devices[0] >= 2 {
                let by = self.rng.gen_range(0..self.cfg.devices[0]);
                let target = (by + self.rng.gen_range(1..self.cfg.devices[0])) % self.cfg.devices[0];
                self.revoking = Some(Revoking { by, target, req: None, done: false, rotated: Vec::new() });
                self.schedule(at, Ev::Revoke);
            }
        }
        if let (Some(at), Some(_)) = (self.cfg.member_change_at, self.group) {
            let account = self.cfg.devices.len() - 1;
            let removed = self.rng.gen_bool(0.5);
            let first_of = |a: usize| self.cfg.devices[..a].iter().sum::<usize>();
            // The creator's account removes, from a device whose session stays.
            let remover = self.revoking.as_ref().filter(|r| r.target == 0).map_or(0, |r| r.by);
            let by =
                if removed { remover } else { first_of(account) + self.rng.gen_range(0..self.cfg.devices[account]) };
            self.departure =
                Some(Departure { by, account, removed, req: None, done: false, written_after: BTreeSet::new() });
            self.schedule(at, Ev::ChangeMembers);
        }
        self.schedule(self.cfg.faults_until, Ev::Heal);
        self.schedule(SEC, Ev::Tick);
        Ok(())
    }

    /// The first account's first device makes a group of every account (its creation goes
    /// to the relay through the outbox, under faults).
    fn setup_group(&mut self) -> Check {
        let mut others = Vec::new();
        let mut first = 0;
        for &n in &self.cfg.devices {
            if first > 0 {
                others.push(self.devs[first].device.as_ref().and_then(Device::account).ok_or("no account")?);
            }
            first += n;
        }
        // Each other account accepts chats from the first (it could not be put in the group
        // otherwise).
        let creator = self.devs[0].device.as_ref().and_then(Device::account).ok_or("no account")?;
        let firsts: Vec<usize> =
            self.cfg.devices.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n))).collect();
        for first in firsts.into_iter().skip(1) {
            let conn = self.setup_conn(first)?;
            self.expect_done(conn, ClientFrame::Accept { req: 8, account: creator, accept: true })?;
            self.setup_close(conn)?;
        }
        let conn = self.setup_conn(0)?;
        let replies = self.direct(conn, ClientFrame::LookupAccounts { req: 9, accounts: others.clone() })?;
        let Some((_, RelayFrame::Accounts { accounts, .. })) = replies.into_iter().find(|(c, _)| *c == conn) else {
            return Err("no lookup answer".into());
        };
        self.dev_mut(0).take_accounts(&accounts).map_err(|e| e.to_string())?;
        let (chat, _) = self
            .dev_mut(0)
            .new_chat_with(stratus_engine::proto::wire::ChatKind::Group, "group", &others)
            .map_err(|e| e.to_string())?;
        self.setup_close(conn)?;
        self.creators.insert(chat, 0);
        for chats in &mut self.chats {
            chats.push(chat);
        }
        self.group = Some(chat);
        Ok(())
    }

    pub(super) fn dev_mut(&mut self, dev: usize) -> &mut Device {
        self.devs[dev].device.as_mut().expect("the device is up")
    }

    pub(super) fn setup_conn(&mut self, dev: usize) -> Result<ConnId, String> {
        let conn = self.open_conn(dev);
        self.direct(conn, ClientFrame::Hello { version: stratus_engine::proto::wire::PROTOCOL_VERSION })?;
        Ok(conn)
    }

    pub(super) fn setup_close(&mut self, conn: ConnId) -> Check {
        let core = self.relay.core.as_mut().expect("the relay is up during setup");
        for e in core.handle(Input::Closed { conn }) {
            match e {
                Effect::Write { token, ops } => {
                    mirror(&self.relay.mirror, &ops)?;
                    self.relay.store.apply(ops);
                    self.relay.store.make_durable(usize::MAX);
                    core.handle(Input::Durable { token });
                }
                other => return Err(format!("closing a setup connection: {other:?}")),
            }
        }
        self.conns.remove(&conn);
        Ok(())
    }

    pub(super) fn expect_done(&mut self, conn: ConnId, frame: ClientFrame) -> Check {
        let sent = self.direct(conn, frame)?;
        if sent.iter().any(|(c, f)| *c == conn && matches!(f, RelayFrame::Done { .. })) {
            Ok(())
        } else {
            Err(format!("expected done, got {sent:?}"))
        }
    }

    /// Feeds a frame to the relay core and carries out its effects at once, every write made
    /// durable on the spot and every frame written on the spot; returns the frames sent, per
    /// connection.
    pub(super) fn direct(&mut self, conn: ConnId, frame: ClientFrame) -> Result<Vec<(ConnId, RelayFrame)>, String> {
        let core = self.relay.core.as_mut().expect("the relay is up during setup");
        // Setup requests are a second apart, so that even tight rate limits let them through.
        self.setup_ms += 1000;
        let now_ms = self.setup_ms;
        let mut queue = VecDeque::from(core.handle(Input::Frame { conn, frame, now_ms }));
        let mut sent = Vec::new();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Send { conn, frame } => {
                    queue.extend(core.handle(Input::Sent { conn, bytes: frame_cost(&frame), pages: 0 }));
                    sent.push((conn, frame));
                }
                Effect::Close { conn } | Effect::Kill { conn } => {
                    return Err(format!("the relay closed setup connection {conn}"))
                }
                Effect::Write { token, ops } => {
                    mirror(&self.relay.mirror, &ops)?;
                    self.relay.store.apply(ops);
                    self.relay.store.make_durable(usize::MAX);
                    queue.extend(core.handle(Input::Durable { token }));
                }
                Effect::ReadChat { conn, req, chat, after, upto, max } => {
                    let deltas = self.relay.store.read_chat(chat, after, upto, max);
                    sent.push((conn, RelayFrame::ChatPage { req, chat, deltas, head: upto }));
                    queue.extend(core.handle(Input::Sent { conn, bytes: 0, pages: 1 }));
                }
                Effect::ReadAccount { conn, req, account, after, upto, max } => {
                    let entries = self.relay.store.read_account(account, after, upto, max);
                    sent.push((conn, RelayFrame::AccountPage { req, entries, head: upto }));
                    queue.extend(core.handle(Input::Sent { conn, bytes: 0, pages: 1 }));
                }
                Effect::Admin { id, .. } => return Err(format!("an answer to operator command {id}, never given")),
            }
        }
        if let Some((_, RelayFrame::Error { code, message, .. })) = sent.iter().find(|(c, _)| *c == conn) {
            return Err(format!("relay refused: {message} ({code:?})"));
        }
        Ok(sent)
    }

    pub(super) fn open_conn(&mut self, dev: usize) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                dev,
                epoch: self.relay.epoch,
                dev_open: true,
                relay_open: true,
                lost: [false; 2],
                floor: [0; 2],
                doomed: false,
            },
        );
        let device = self.devs[dev].id.clone();
        if let Some(core) = self.relay.core.as_mut() {
            let effects = core.handle(Input::Opened { conn, device });
            debug_assert!(effects.is_empty());
        }
        conn
    }

    pub(super) fn schedule_faults(&mut self) {
        let until = self.cfg.faults_until;
        let times = |sim: &mut Sim, mean: Option<u64>| -> Vec<u64> {
            let mut out = Vec::new();
            if let Some(mean) = mean {
                let mut t = sim.poisson(mean);
                while t < until {
                    out.push(t);
                    t += sim.poisson(mean).max(1);
                }
            }
            out
        };
        for t in times(self, self.cfg.relay_crash_every) {
            self.schedule(t, Ev::RelayCrash);
        }
        for dev in 0..self.devs.len() {
            for t in times(self, self.cfg.create_chat_every) {
                self.schedule(t, Ev::CreateChat { dev });
            }
            for t in times(self, self.cfg.device_restart_every) {
                self.schedule(t, Ev::DeviceRestart { dev });
            }
            for t in times(self, self.cfg.partition_every) {
                let dir = self.rng.gen_range(0..3);
                let until = t + self.rng.gen_range(500 * MS..10 * SEC);
                for d in [C2R, R2C] {
                    if dir == 2 || dir == d {
                        self.schedule(t, Ev::Partition { dev, dir: d, until });
                    }
                }
            }
            for t in times(self, self.cfg.offline_every) {
                let until = t + self.rng.gen_range(5 * SEC..25 * SEC);
                self.schedule(t, Ev::Offline { dev, until });
            }
            for t in times(self, self.cfg.silent_drop_every) {
                self.schedule(t, Ev::SilentDrop { dev });
            }
        }
        if let Some((at, count)) = self.cfg.burst {
            for dev in 0..self.cfg.devices[0] {
                self.schedule(at, Ev::Burst { dev, left: count });
            }
        }
    }
}
