//! The deterministic whole-system simulator.
//!
//! Several accounts with several devices each and one relay, built from the real parts that
//! hold the decisions: the relay's sans-IO [`RelayCore`], each device's sans-IO [`SyncCore`] and
//! its real [`Device`] (sled store, Automerge documents, sealing) driven by the same
//! [`Device::carry_out`] the libp2p session uses. Only the network, the clock and the relay's
//! disk are simulated, and one seed drives every choice, so a seed replays exactly; the
//! [`Report::trace_hash`] of two runs of one seed is equal.
//!
//! Faults, while `faults_until` lasts:
//! * delay: each frame takes the device's base latency plus jitter; frames on one connection
//!   stay in order (TCP and yamux guarantee that, and the protocol relies on it);
//! * loss: a lost frame kills its connection in that direction (nothing after it arrives); each
//!   end notices after a detection timeout, as libp2p's ping would;
//! * duplication and reordering, where a real network produces them above TCP: a device that
//!   lost a reply resends on its next connection (a duplicate), and frames of a dead connection
//!   still reach the relay after its replacement's (reordering across connections);
//! * partitions, one-way or both ways, and devices offline for long periods;
//! * device restarts (memory lost, sled store kept) and relay crashes that lose everything not
//!   behind a completed fsync barrier ([`MemStore`]); slow barriers; failing barriers (the relay
//!   exits, like the real one);
//! * in three worlds of ten, one device of the first account ends another's session mid-run;
//! * in half the worlds, tight relay limits (a few requests per second, one to eight appends and
//!   one to four pages in flight), so that devices are answered `RateLimited` and wait.
//!
//! Invariants, checked as the run goes and at its end:
//! * the relay acknowledges or shows a delta only once it is durable;
//! * no acknowledged delta is lost, across any number of relay crashes;
//! * one `(chat, seq)` always names the same delta, and no delta is stored twice;
//! * each device applies each chat's deltas exactly once, in seq order, with no gap;
//! * a device's stored cursors never go back (checked across its restarts);
//! * nothing is rejected and no device reports an error;
//! * once a revocation is durable, the relay sends the revoked device nothing but
//!   `SessionRevoked`; the revoked device deletes its store when it hears that, and its
//!   messages the relay never acknowledged are allowed to be lost with it;
//! * once faults stop, sync terminates: within `converge_within` every device is idle and the
//!   devices of each account show the same chats, heads and messages, holding every message
//!   written.

mod store;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratus_engine::core::{SyncCore, SyncInput, SyncOutput};
use stratus_engine::proto::wire::{ClientFrame, ErrorCode, RelayFrame};
use stratus_engine::{Action, ChatId, ClientSeq, Device, DeviceId, Event, Seq};
use stratus_relay::core::{ConnId, Effect, Input, RelayCore, StoreOp};
use stratus_relay::limits::Limits;
use stratus_relay::store::{RelayStore, SledStore};

pub use store::MemStore;

/// One millisecond of simulated time (the unit is the microsecond).
pub const MS: u64 = 1_000;
/// One second of simulated time.
pub const SEC: u64 = 1_000_000;

const C2R: usize = 0;
const R2C: usize = 1;
const BACKOFF_MIN: u64 = 100 * MS;
const BACKOFF_MAX: u64 = 5 * SEC;
const CHECK_EVERY: u64 = 250 * MS;
const TRACE_TAIL: usize = 80;
const RELAY_NAME: &str = "/sim/relay";

thread_local! {
    static NOW_MS: Cell<i64> = const { Cell::new(0) };
}

/// The devices' clock: simulated time, as milliseconds since the Unix epoch.
fn sim_now_ms() -> i64 {
    NOW_MS.with(Cell::get)
}

/// The shape of one simulated world and the intensity of its faults; all drawn from the seed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Devices of each account (the first creates the account, the others are linked).
    pub devices: Vec<usize>,
    /// Chats each account creates.
    pub chats_per_account: usize,
    /// Messages each device writes.
    pub messages_per_device: u32,
    /// Faults happen before this time.
    pub faults_until: u64,
    /// Sync must have converged this long after faults stop.
    pub converge_within: u64,
    /// Chance that a frame is lost.
    pub loss: f64,
    /// Mean time between relay crashes (`None`: none).
    pub relay_crash_every: Option<u64>,
    /// Mean time between chats each device creates during the run.
    pub create_chat_every: Option<u64>,
    /// Mean time between each device's restarts.
    pub device_restart_every: Option<u64>,
    /// Mean time between each device's partitions (one-way or both).
    pub partition_every: Option<u64>,
    /// Mean time between each device's long offline periods.
    pub offline_every: Option<u64>,
    /// Chance that an fsync barrier is slow (up to 3 s).
    pub slow_barrier: f64,
    /// Chance that an fsync barrier fails (the relay exits and restarts).
    pub failing_barrier: f64,
    /// The relay's limits: the defaults, or tight ones that make it answer `RateLimited` often.
    pub limits: Limits,
    /// When one device of the first account ends another's session (`None`: no revocation).
    pub revoke_at: Option<u64>,
}

impl Config {
    /// A world drawn from `seed`: 1–3 accounts of 1–3 devices, and a fault mix from calm to
    /// hostile.
    pub fn from_seed(seed: u64) -> Config {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5157_a7a5);
        let accounts = rng.gen_range(1..=3);
        let devices = (0..accounts).map(|i| if i == 0 { rng.gen_range(2..=3) } else { rng.gen_range(1..=3) }).collect();
        let intensity: f64 = if rng.gen_bool(0.1) { 0.0 } else { rng.gen_range(0.2..1.0) };
        let every = |rng: &mut StdRng, mean_s: u64| {
            (intensity > 0.0 && rng.gen_bool(0.8)).then(|| ((mean_s as f64 / intensity) as u64) * SEC)
        };
        Config {
            seed,
            devices,
            chats_per_account: rng.gen_range(1..=2),
            messages_per_device: rng.gen_range(2..=8),
            faults_until: 30 * SEC,
            converge_within: 60 * SEC,
            loss: intensity * [0.0, 0.002, 0.01, 0.03][rng.gen_range(0..4)],
            create_chat_every: rng.gen_bool(0.5).then_some(40 * SEC),
            relay_crash_every: every(&mut rng, 10),
            device_restart_every: every(&mut rng, 30),
            partition_every: every(&mut rng, 20),
            offline_every: every(&mut rng, 60),
            slow_barrier: intensity * 0.01,
            failing_barrier: intensity * 0.002,
            revoke_at: rng.gen_bool(0.3).then(|| rng.gen_range(SEC..20 * SEC)),
            limits: if rng.gen_bool(0.5) {
                Limits { min_session_age_ms: 0, ..Limits::default() }
            } else {
                Limits {
                    min_session_age_ms: 0,
                    requests_per_second: rng.gen_range(5..=50),
                    request_burst: rng.gen_range(2..=10),
                    max_appends_in_flight_per_device: rng.gen_range(1..=8),
                    max_fetches_in_flight_per_device: rng.gen_range(1..=4),
                    ..Limits::default()
                }
            },
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// blake3 of every event the run processed, in order: equal for equal seeds.
    pub trace_hash: String,
    /// Events processed.
    pub events: u64,
    /// Messages written.
    pub messages: usize,
    /// Appends the relay acknowledged.
    pub acked: usize,
    /// Relay crashes.
    pub relay_crashes: u32,
    /// Device restarts.
    pub device_restarts: u32,
    /// Connections that broke (loss, partition, offline, crash).
    pub broken_connections: u32,
    /// Frames lost.
    pub lost_frames: u32,
    /// `RateLimited` answers devices waited out.
    pub rate_limited: u32,
    /// Sessions ended by another device mid-run.
    pub revocations: u32,
    /// Simulated time from the end of faults to convergence.
    pub converged_after: u64,
}

/// A violated invariant, with the seed that replays it and the last events before it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Simulated time of the failure.
    pub at: u64,
    /// What went wrong.
    pub message: String,
    /// The last events.
    pub trace_tail: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} failed at {}: {}", self.seed, fmt_time(self.at), self.message)?;
        writeln!(f, "last events:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: SEED={} cargo test -p stratus-tests --test simulator -- --nocapture", self.seed)
    }
}

fn fmt_time(t: u64) -> String {
    format!("{}.{:06}s", t / SEC, t % SEC)
}

#[derive(Debug)]
enum Ev {
    ToRelay {
        conn: ConnId,
        frame: ClientFrame,
    },
    ToDevice {
        conn: ConnId,
        frame: RelayFrame,
    },
    /// The device notices that its connection is gone.
    DeviceLost {
        conn: ConnId,
    },
    /// The relay notices.
    RelayLost {
        conn: ConnId,
    },
    Connect {
        dev: usize,
    },
    Compose {
        dev: usize,
    },
    CreateChat {
        dev: usize,
    },
    /// The revoking device asks the relay to end the target's session (again, until it is done).
    Revoke,
    /// The device's wait after a `RateLimited` answer is over (unless a later one replaced it).
    Resume {
        dev: usize,
        generation: u64,
    },
    BarrierDone {
        epoch: u32,
        covering: u64,
        batches: usize,
        fails: bool,
    },
    RelayCrash,
    RelayStart,
    DeviceRestart {
        dev: usize,
    },
    DeviceUp {
        dev: usize,
    },
    Offline {
        dev: usize,
        until: u64,
    },
    Partition {
        dev: usize,
        dir: usize,
        until: u64,
    },
    Heal,
    Check,
}

struct Conn {
    dev: usize,
    epoch: u32,
    dev_open: bool,
    relay_open: bool,
    /// Per direction: a frame was lost, nothing more arrives.
    lost: [bool; 2],
    /// Per direction: the last delivery time (frames stay in order).
    floor: [u64; 2],
    doomed: bool,
}

struct Dev {
    name: String,
    account: usize,
    home: PathBuf,
    id: DeviceId,
    device: Option<Device>,
    core: Option<SyncCore>,
    conn: Option<ConnId>,
    latency: u64,
    offline_until: u64,
    partition_until: [u64; 2],
    backoff: u64,
    connect_scheduled: bool,
    /// Last seq applied per chat, as the checks saw it.
    applied: BTreeMap<ChatId, Seq>,
    written: u32,
    /// Bumped by each `RetryAfter` and restart; a `Resume` of an older one is stale.
    resume_gen: u64,
    /// Client seqs the relay acknowledged to it.
    acked: BTreeSet<ClientSeq>,
    /// Its session was ended and it deleted the account's data: the simulation leaves it be.
    gone: bool,
}

/// The world's revocation, if it has one.
struct Revoking {
    by: usize,
    target: usize,
    req: Option<stratus_engine::proto::wire::ReqId>,
    /// The revoker got `Done`: the revocation is durable.
    done: bool,
}

struct RelaySim {
    core: Option<RelayCore>,
    store: MemStore,
    epoch: u32,
    written: u64,
    barrier_running: bool,
    /// A real sled store that gets every write too, to hold [`MemStore`] to its answers.
    mirror: Option<SledStore>,
}

/// One simulated world.
pub struct Sim {
    cfg: Config,
    rng: StdRng,
    now: u64,
    order: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    faults: bool,
    relay: RelaySim,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// The relay's clock during setup, in ms; the run's clock continues from it.
    setup_ms: u64,
    devs: Vec<Dev>,
    chats: Vec<Vec<ChatId>>,
    /// Every message written: chat → message ids.
    written: BTreeMap<ChatId, BTreeSet<String>>,
    /// Who wrote each message, under which client seq.
    written_by: BTreeMap<String, (usize, ClientSeq)>,
    revoking: Option<Revoking>,
    /// Who created each chat.
    creators: BTreeMap<ChatId, usize>,
    /// Every `(chat, seq)` a device was shown or acknowledged, and whose delta it is.
    seen: BTreeMap<(ChatId, Seq), (DeviceId, ClientSeq)>,
    /// Every acknowledgement the relay gave.
    acked: BTreeMap<(ChatId, Seq), (DeviceId, ClientSeq)>,
    hasher: blake3::Hasher,
    tail: VecDeque<String>,
    report: Report,
}

type Check = Result<(), String>;

impl Sim {
    /// Builds the world for `cfg` with device homes under `dir`, and runs account creation,
    /// linking and chat creation (fault-free) through the relay core.
    pub fn new(cfg: Config, dir: &Path) -> Result<Sim, Failure> {
        Self::build(cfg, dir, None)
    }

    /// Like [`Sim::new`], and every relay write also goes to a real [`SledStore`]; at the end
    /// both stores must recover the same index and page the same deltas. Only meaningful
    /// without relay crashes (the sled store keeps what the simulated crash loses).
    pub fn with_sled_mirror(cfg: Config, dir: &Path) -> Result<Sim, Failure> {
        let sled = SledStore::open(&dir.join("relay-mirror")).map_err(|e| Failure {
            seed: cfg.seed,
            at: 0,
            message: format!("sled mirror: {e}"),
            trace_tail: Vec::new(),
        })?;
        Self::build(cfg, dir, Some(sled))
    }

    fn build(cfg: Config, dir: &Path, sled: Option<SledStore>) -> Result<Sim, Failure> {
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(cfg.seed),
            now: 0,
            order: 0,
            queue: BTreeMap::new(),
            faults: true,
            relay: RelaySim {
                core: Some(RelayCore::new(Default::default(), cfg.limits.clone())),
                store: MemStore::default(),
                epoch: 0,
                written: 0,
                barrier_running: false,
                mirror: None,
            },
            conns: BTreeMap::new(),
            next_conn: 1,
            setup_ms: 0,
            devs: Vec::new(),
            chats: Vec::new(),
            written: BTreeMap::new(),
            written_by: BTreeMap::new(),
            revoking: None,
            creators: BTreeMap::new(),
            seen: BTreeMap::new(),
            acked: BTreeMap::new(),
            hasher: blake3::Hasher::new(),
            tail: VecDeque::new(),
            report: Report { seed: cfg.seed, ..Report::default() },
            cfg,
        };
        sim.relay.mirror = sled;
        NOW_MS.with(|c| c.set(1_800_000_000_000));
        sim.setup(dir).map_err(|m| sim.failure(format!("setup: {m}")))?;
        Ok(sim)
    }

    fn failure(&self, message: String) -> Failure {
        Failure { seed: self.cfg.seed, at: self.now, message, trace_tail: self.tail.iter().cloned().collect() }
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.order += 1;
        self.queue.insert((at.max(self.now), self.order), ev);
    }

    fn poisson(&mut self, mean: u64) -> u64 {
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        (-(u.ln()) * mean as f64) as u64
    }

    // ---- setup ----

    fn setup(&mut self, dir: &Path) -> Check {
        for (a, &n) in self.cfg.devices.clone().iter().enumerate() {
            for i in 0..n {
                let name = format!("a{a}d{i}");
                let home = dir.join(&name);
                let mut device = Device::open_seeded(&home, self.rng.gen()).map_err(|e| e.to_string())?;
                device.set_clock(sim_now_ms);
                let latency = self.rng.gen_range(1..=20) * MS;
                self.devs.push(Dev {
                    name,
                    account: a,
                    home,
                    id: device.id().clone(),
                    device: Some(device),
                    core: None,
                    conn: None,
                    latency,
                    offline_until: 0,
                    partition_until: [0; 2],
                    backoff: BACKOFF_MIN,
                    connect_scheduled: false,
                    applied: BTreeMap::new(),
                    written: 0,
                    resume_gen: 0,
                    acked: BTreeSet::new(),
                    gone: false,
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
        for dev in 0..self.devs.len() {
            let d = &mut self.devs[dev];
            let core = d.device.as_ref().expect("up").start_core().map_err(|e| e.to_string())?;
            d.core = Some(core);
            let at = self.rng.gen_range(0..100 * MS);
            self.schedule_connect(dev, at);
            let at = self.poisson(3 * SEC);
            self.schedule(at, Ev::Compose { dev });
        }
        self.schedule_faults();
        if let Some(at) = self.cfg.revoke_at {
            if self.cfg.devices[0] >= 2 {
                let by = self.rng.gen_range(0..self.cfg.devices[0]);
                let target = (by + self.rng.gen_range(1..self.cfg.devices[0])) % self.cfg.devices[0];
                self.revoking = Some(Revoking { by, target, req: None, done: false });
                self.schedule(at, Ev::Revoke);
            }
        }
        self.schedule(self.cfg.faults_until, Ev::Heal);
        Ok(())
    }

    fn dev_mut(&mut self, dev: usize) -> &mut Device {
        self.devs[dev].device.as_mut().expect("the device is up")
    }

    fn setup_conn(&mut self, dev: usize) -> Result<ConnId, String> {
        let conn = self.open_conn(dev);
        self.direct(conn, ClientFrame::Hello { version: stratus_engine::proto::wire::PROTOCOL_VERSION })?;
        Ok(conn)
    }

    fn setup_close(&mut self, conn: ConnId) -> Check {
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

    fn expect_done(&mut self, conn: ConnId, frame: ClientFrame) -> Check {
        let sent = self.direct(conn, frame)?;
        if sent.iter().any(|(c, f)| *c == conn && matches!(f, RelayFrame::Done { .. })) {
            Ok(())
        } else {
            Err(format!("expected done, got {sent:?}"))
        }
    }

    /// Feeds a frame to the relay core and carries out its effects at once, every write made
    /// durable on the spot; returns the frames sent, per connection.
    fn direct(&mut self, conn: ConnId, frame: ClientFrame) -> Result<Vec<(ConnId, RelayFrame)>, String> {
        let core = self.relay.core.as_mut().expect("the relay is up during setup");
        // Setup requests are a second apart, so that even tight rate limits let them through.
        self.setup_ms += 1000;
        let now_ms = self.setup_ms;
        let mut queue = VecDeque::from(core.handle(Input::Frame { conn, frame, now_ms }));
        let mut sent = Vec::new();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Send { conn, frame } => sent.push((conn, frame)),
                Effect::Close { conn } => return Err(format!("the relay closed setup connection {conn}")),
                Effect::Write { token, ops } => {
                    mirror(&self.relay.mirror, &ops)?;
                    self.relay.store.apply(ops);
                    self.relay.store.make_durable(usize::MAX);
                    queue.extend(core.handle(Input::Durable { token }));
                }
                Effect::ReadChat { conn, req, chat, after, upto, max } => {
                    let deltas = self.relay.store.read_chat(chat, after, upto, max);
                    sent.push((conn, RelayFrame::ChatPage { req, chat, deltas, head: upto }));
                    queue.extend(core.handle(Input::PageSent { conn }));
                }
                Effect::ReadAccount { conn, req, account, after, upto, max } => {
                    let entries = self.relay.store.read_account(account, after, upto, max);
                    sent.push((conn, RelayFrame::AccountPage { req, entries, head: upto }));
                    queue.extend(core.handle(Input::PageSent { conn }));
                }
            }
        }
        if let Some((_, RelayFrame::Error { code, message, .. })) = sent.iter().find(|(c, _)| *c == conn) {
            return Err(format!("relay refused: {message} ({code:?})"));
        }
        Ok(sent)
    }

    fn open_conn(&mut self, dev: usize) -> ConnId {
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

    fn schedule_faults(&mut self) {
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
        }
    }

    // ---- the run ----

    /// Runs to convergence (or to a violated invariant).
    pub fn run(mut self) -> Result<Report, Failure> {
        while let Some(((at, _), ev)) = self.queue.pop_first() {
            self.now = at;
            NOW_MS.with(|c| c.set(1_800_000_000_000 + (at / MS) as i64));
            self.report.events += 1;
            let line = format!("{} {}", fmt_time(at), describe(&ev));
            self.hasher.update(line.as_bytes());
            self.hasher.update(b"\n");
            if !matches!(ev, Ev::Check) {
                if self.tail.len() == TRACE_TAIL {
                    self.tail.pop_front();
                }
                self.tail.push_back(line);
            }
            let done = self.step(ev).map_err(|m| self.failure(m))?;
            if done {
                self.final_checks().map_err(|m| self.failure(m))?;
                self.report.trace_hash = self.hasher.finalize().to_hex().to_string();
                self.report.acked = self.acked.len();
                self.report.messages = self.written.values().map(BTreeSet::len).sum();
                return Ok(self.report);
            }
        }
        Err(self.failure("the event queue ran dry before convergence".into()))
    }

    fn step(&mut self, ev: Ev) -> Result<bool, String> {
        match ev {
            Ev::ToRelay { conn, frame } => {
                let c = &self.conns[&conn];
                if c.relay_open && c.epoch == self.relay.epoch {
                    if let Some(core) = self.relay.core.as_mut() {
                        let now_ms = self.setup_ms + self.now / MS;
                        let effects = core.handle(Input::Frame { conn, frame, now_ms });
                        self.relay_effects(effects)?;
                    }
                }
            }
            Ev::ToDevice { conn, frame } => {
                let dev = self.conns[&conn].dev;
                if self.conns[&conn].dev_open && self.devs[dev].conn == Some(conn) {
                    self.observe_relay_frame(dev, &frame)?;
                    self.device_input(dev, SyncInput::Frame(Box::new(frame)))?;
                }
            }
            Ev::DeviceLost { conn } => self.device_lost(conn)?,
            Ev::RelayLost { conn } => self.relay_lost(conn)?,
            Ev::Connect { dev } => self.connect(dev)?,
            Ev::Compose { dev } => self.compose(dev)?,
            Ev::CreateChat { dev } => self.create_chat(dev)?,
            Ev::Revoke => self.revoke()?,
            Ev::Resume { dev, generation } => {
                if self.devs[dev].resume_gen == generation {
                    self.device_input(dev, SyncInput::Resume)?;
                }
            }
            Ev::BarrierDone { epoch, covering, batches, fails } => {
                if epoch == self.relay.epoch && self.relay.core.is_some() {
                    if fails {
                        // The real relay exits non-zero rather than acknowledge; it is restarted.
                        self.relay_crash()?;
                    } else {
                        self.relay.barrier_running = false;
                        self.relay.store.make_durable(batches);
                        let effects = self.relay.core.as_mut().expect("up").handle(Input::Durable { token: covering });
                        self.relay_effects(effects)?;
                        self.maybe_barrier();
                    }
                }
            }
            Ev::RelayCrash => {
                if self.faults && self.relay.core.is_some() {
                    self.relay_crash()?;
                }
            }
            Ev::RelayStart => {
                if self.relay.core.is_none() {
                    // The real relay runs a barrier before serving: all it recovered is durable.
                    self.relay.core = Some(RelayCore::new(self.relay.store.recover(), self.cfg.limits.clone()));
                }
            }
            Ev::DeviceRestart { dev } => {
                if self.faults && self.devs[dev].device.is_some() && !self.devs[dev].gone {
                    self.device_down(dev)?;
                    let at = self.now + self.rng.gen_range(100 * MS..3 * SEC);
                    self.schedule(at, Ev::DeviceUp { dev });
                }
            }
            Ev::DeviceUp { dev } => self.device_up(dev)?,
            Ev::Offline { dev, until } => {
                if self.faults {
                    self.devs[dev].offline_until = self.devs[dev].offline_until.max(until);
                    if let Some(conn) = self.devs[dev].conn {
                        // The device sees its network go; the relay finds out by timeout.
                        self.schedule(self.now + MS, Ev::DeviceLost { conn });
                        self.kill_conn(conn, [C2R, R2C], false);
                    }
                }
            }
            Ev::Partition { dev, dir, until } => {
                if self.faults {
                    let p = &mut self.devs[dev].partition_until[dir];
                    *p = (*p).max(until);
                    if let Some(conn) = self.devs[dev].conn {
                        self.kill_conn(conn, [dir, dir], true);
                    }
                }
            }
            Ev::Heal => {
                self.faults = false;
                for dev in 0..self.devs.len() {
                    let d = &mut self.devs[dev];
                    d.offline_until = 0;
                    d.partition_until = [0; 2];
                    if d.device.is_none() {
                        self.schedule(self.now, Ev::DeviceUp { dev });
                    }
                }
                if self.relay.core.is_none() {
                    self.schedule(self.now, Ev::RelayStart);
                }
                self.schedule(self.now + CHECK_EVERY, Ev::Check);
            }
            Ev::Check => {
                if self.converged()? {
                    self.report.converged_after = self.now - self.cfg.faults_until;
                    return Ok(true);
                }
                if self.now > self.cfg.faults_until + self.cfg.converge_within {
                    return Err(format!(
                        "no convergence {} after faults stopped: {}",
                        fmt_time(self.cfg.converge_within),
                        self.diagnose()
                    ));
                }
                self.schedule(self.now + CHECK_EVERY, Ev::Check);
            }
        }
        Ok(false)
    }

    // ---- network ----

    fn cut(&self, dev: usize, dir: usize) -> bool {
        let d = &self.devs[dev];
        d.offline_until > self.now || d.partition_until[dir] > self.now
    }

    /// Marks `dirs` of `conn` lost; both ends notice after a detection timeout (the device's
    /// only if `device_detects`, otherwise the caller tells it).
    fn kill_conn(&mut self, conn: ConnId, dirs: [usize; 2], device_detects: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        for d in dirs {
            c.lost[d] = true;
        }
        if c.doomed {
            return;
        }
        c.doomed = true;
        self.report.broken_connections += 1;
        let dev_at = self.now + self.rng.gen_range(2 * SEC..20 * SEC);
        let relay_at = self.now + self.rng.gen_range(2 * SEC..20 * SEC);
        if device_detects {
            self.schedule(dev_at, Ev::DeviceLost { conn });
        }
        self.schedule(relay_at, Ev::RelayLost { conn });
    }

    fn transmit(&mut self, conn: ConnId, dir: usize, ev: Ev) {
        let Some(c) = self.conns.get(&conn) else { return };
        if c.lost[dir] {
            return;
        }
        let dev = c.dev;
        let lose = self.cut(dev, dir) || (self.faults && self.cfg.loss > 0.0 && self.rng.gen_bool(self.cfg.loss));
        if lose {
            self.report.lost_frames += 1;
            self.kill_conn(conn, [dir, dir], true);
            return;
        }
        let latency = self.devs[dev].latency + self.rng.gen_range(0..=self.devs[dev].latency);
        let c = self.conns.get_mut(&conn).expect("checked");
        let at = (self.now + latency).max(c.floor[dir]);
        c.floor[dir] = at;
        self.schedule(at, ev);
    }

    fn schedule_connect(&mut self, dev: usize, at: u64) {
        if !self.devs[dev].connect_scheduled {
            self.devs[dev].connect_scheduled = true;
            self.schedule(at, Ev::Connect { dev });
        }
    }

    fn connect(&mut self, dev: usize) -> Check {
        self.devs[dev].connect_scheduled = false;
        if self.devs[dev].gone || self.devs[dev].device.is_none() || self.devs[dev].conn.is_some() {
            return Ok(());
        }
        if self.relay.core.is_none() || self.cut(dev, C2R) || self.cut(dev, R2C) {
            let d = &mut self.devs[dev];
            let backoff = d.backoff;
            d.backoff = (d.backoff * 2).min(BACKOFF_MAX);
            let jitter = self.rng.gen_range(0..=backoff / 4);
            // A failed dial takes a while to fail (refused: a round trip; no route: a timeout).
            let fail_after = self.rng.gen_range(self.devs[dev].latency * 2..=SEC);
            self.schedule_connect(dev, self.now + fail_after + backoff + jitter);
            return Ok(());
        }
        let conn = self.open_conn(dev);
        let d = &mut self.devs[dev];
        d.conn = Some(conn);
        d.backoff = BACKOFF_MIN;
        self.device_input(dev, SyncInput::Connected)
    }

    fn device_lost(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        c.dev_open = false;
        let dev = c.dev;
        if self.devs[dev].conn == Some(conn) {
            self.devs[dev].conn = None;
            self.device_input(dev, SyncInput::Disconnected)?;
            let d = &self.devs[dev];
            let at = self.now + d.backoff + self.rng.gen_range(0..=d.backoff / 4);
            self.schedule_connect(dev, at);
        }
        Ok(())
    }

    fn relay_lost(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        if c.relay_open && c.epoch == self.relay.epoch {
            c.relay_open = false;
            if let Some(core) = self.relay.core.as_mut() {
                let effects = core.handle(Input::Closed { conn });
                self.relay_effects(effects)?;
            }
        }
        Ok(())
    }

    // ---- the relay ----

    fn relay_effects(&mut self, effects: Vec<Effect>) -> Check {
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
                    queue.extend(self.relay.core.as_mut().expect("up").handle(Input::PageSent { conn }));
                }
                Effect::ReadAccount { conn, req, account, after, upto, max } => {
                    let entries = self.relay.store.read_account(account, after, upto, max);
                    self.relay_send(conn, RelayFrame::AccountPage { req, entries, head: upto })?;
                    queue.extend(self.relay.core.as_mut().expect("up").handle(Input::PageSent { conn }));
                }
            }
        }
        Ok(())
    }

    fn relay_send(&mut self, conn: ConnId, frame: RelayFrame) -> Check {
        if let (Some(r), Some(c)) = (&self.revoking, self.conns.get(&conn)) {
            let session_ended = matches!(frame, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. });
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

    fn maybe_barrier(&mut self) {
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

    fn relay_crash(&mut self) -> Check {
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

    // ---- devices ----

    fn device_input(&mut self, dev: usize, input: SyncInput) -> Check {
        let Some(core) = self.devs[dev].core.as_mut() else { return Ok(()) };
        let outputs = core.handle(input);
        self.device_outputs(dev, outputs)
    }

    fn device_outputs(&mut self, dev: usize, outputs: Vec<SyncOutput>) -> Check {
        for o in &outputs {
            match o {
                SyncOutput::ApplyDelta(d) => {
                    self.check_identity(d.chat, d.seq, (d.device.clone(), d.client_seq), "applied")?;
                    self.check_next(dev, d.chat, d.seq)?;
                }
                SyncOutput::Cursor { chat, seq } => self.check_next(dev, *chat, *seq)?,
                _ => {}
            }
        }
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        let actions = device.carry_out(core, outputs);
        self.run_actions(dev, actions)
    }

    fn run_actions(&mut self, dev: usize, actions: Vec<Action>) -> Check {
        for action in actions {
            match action {
                Action::Send(frame) => {
                    if let Some(conn) = self.devs[dev].conn {
                        self.transmit(conn, C2R, Ev::ToRelay { conn, frame });
                    }
                }
                Action::Emit(Event::Rejected { chat, client_seq, code, message }) => {
                    return Err(format!(
                        "{} had chat {chat} client seq {} rejected: {message} ({code:?})",
                        self.devs[dev].name, client_seq.0
                    ))
                }
                Action::Emit(Event::Error { message }) => {
                    return Err(format!("{} reported an error: {message}", self.devs[dev].name))
                }
                Action::RetryAfter(ms) => {
                    let d = &mut self.devs[dev];
                    d.resume_gen += 1;
                    let ev = Ev::Resume { dev, generation: d.resume_gen };
                    self.report.rate_limited += 1;
                    self.schedule(self.now + u64::from(ms) * MS, ev);
                }
                Action::Emit(Event::Acked { client_seq, .. }) => {
                    self.devs[dev].acked.insert(client_seq);
                }
                Action::Emit(Event::SessionRevoked) => {
                    let r = self.revoking.as_ref().ok_or("a session ended without a revocation")?;
                    if r.target != dev {
                        return Err(format!(
                            "{} was told its session ended; the target was another",
                            self.devs[dev].name
                        ));
                    }
                    if self.devs[dev].home.join("store").exists() {
                        return Err(format!(
                            "{}'s store is still on disk after its session ended",
                            self.devs[dev].name
                        ));
                    }
                    let d = &mut self.devs[dev];
                    d.gone = true;
                    d.conn = None;
                    d.core = None;
                    return Ok(());
                }
                Action::Reply(frame) => self.revoke_reply(dev, frame)?,
                Action::Emit(_) => {}
            }
        }
        Ok(())
    }

    fn create_chat(&mut self, dev: usize) -> Check {
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        let title = format!("{}'s chat", d.name);
        let (chat, actions) =
            device.create_chat(core, &title).map_err(|e| format!("{} creates a chat: {e}", d.name))?;
        let account = d.account;
        self.chats[account].push(chat);
        self.creators.insert(chat, dev);
        self.run_actions(dev, actions)
    }

    fn revoke(&mut self) -> Check {
        let Some(r) = self.revoking.as_ref() else { return Ok(()) };
        if r.done {
            return Ok(());
        }
        let (by, target) = (r.by, r.target);
        // Asked again until done: a request lost with its connection is not in any outbox.
        self.schedule(self.now + 5 * SEC, Ev::Revoke);
        let target_id = self.devs[target].id.clone();
        let d = &mut self.devs[by];
        let (Some(device), Some(core), Some(conn)) = (d.device.as_mut(), d.core.as_mut(), d.conn) else {
            return Ok(());
        };
        if !core.is_connected() {
            return Ok(());
        }
        let req = core.next_req();
        let frame = device.revoke_request(&target_id, req).map_err(|e| e.to_string())?;
        self.revoking.as_mut().expect("checked").req = Some(req);
        self.transmit(conn, C2R, Ev::ToRelay { conn, frame });
        Ok(())
    }

    fn revoke_reply(&mut self, dev: usize, frame: RelayFrame) -> Check {
        let Some(r) = self.revoking.as_mut() else { return Err(format!("unexpected reply {frame:?}")) };
        if r.by != dev || frame.req() != r.req {
            return Ok(());
        }
        match frame {
            RelayFrame::Done { .. } => {
                r.done = true;
                self.report.revocations += 1;
                let target = self.devs[r.target].id.clone();
                self.dev_mut(dev).revoke_done(&target).map_err(|e| e.to_string())
            }
            // Asked again by the next `Revoke` event (the sync core hands a limited request of
            // the driver's back as an error with the `RateLimited` code).
            RelayFrame::RateLimited { .. } | RelayFrame::Error { code: ErrorCode::RateLimited, .. } => Ok(()),
            other => Err(format!("the revocation was refused: {other:?}")),
        }
    }

    fn compose(&mut self, dev: usize) -> Check {
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
        let d = &mut self.devs[dev];
        let (Some(device), Some(core)) = (d.device.as_mut(), d.core.as_mut()) else { return Ok(()) };
        match device.send(core, chat, &text) {
            Ok((message, client_seq, actions)) => {
                d.written += 1;
                self.written_by.insert(message.id.clone(), (dev, client_seq));
                self.written.entry(chat).or_default().insert(message.id);
                self.run_actions(dev, actions)
            }
            // A linked device learns the chat's key from the account log: not yet.
            Err(stratus_engine::Error::UnknownChat(_)) => Ok(()),
            Err(e) => Err(format!("{} could not write: {e}", self.devs[dev].name)),
        }
    }

    fn device_down(&mut self, dev: usize) -> Check {
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
        let d = &mut self.devs[dev];
        d.core = None;
        d.device = None;
        d.resume_gen += 1;
        Ok(())
    }

    fn device_up(&mut self, dev: usize) -> Check {
        if self.devs[dev].gone || self.devs[dev].device.is_some() {
            return Ok(());
        }
        let seed = self.rng.gen();
        let d = &mut self.devs[dev];
        let mut device = reopen(&d.home, seed).map_err(|e| format!("{} reopens: {e}", d.name))?;
        device.set_clock(sim_now_ms);
        for s in device.chats().map_err(|e| e.to_string())? {
            let chat: ChatId = s.id.parse().map_err(|_| "chat id")?;
            let tracked = d.applied.get(&chat).copied().unwrap_or_default();
            if Seq(s.seq) != tracked {
                return Err(format!(
                    "{} restarted with chat {chat} at seq {} but had applied {}",
                    d.name, s.seq, tracked.0
                ));
            }
        }
        d.core = Some(device.start_core().map_err(|e| e.to_string())?);
        d.device = Some(device);
        d.backoff = BACKOFF_MIN;
        self.schedule_connect(dev, self.now);
        Ok(())
    }

    // ---- invariants ----

    fn check_identity(&mut self, chat: ChatId, seq: Seq, who: (DeviceId, ClientSeq), what: &str) -> Check {
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

    fn check_next(&mut self, dev: usize, chat: ChatId, seq: Seq) -> Check {
        let d = &mut self.devs[dev];
        let last = d.applied.entry(chat).or_default();
        if seq != last.next() {
            return Err(format!("{} applied chat {chat} seq {} right after seq {}", d.name, seq.0, last.0));
        }
        *last = seq;
        Ok(())
    }

    /// What the relay shows a device must be durable.
    fn check_relay_frame(&self, frame: &RelayFrame) -> Check {
        let shown: Vec<(ChatId, Seq)> = match frame {
            RelayFrame::Acked { chat, seq, .. } => vec![(*chat, *seq)],
            RelayFrame::Push { delta } => vec![(delta.chat, delta.seq)],
            RelayFrame::ChatPage { deltas, .. } => deltas.iter().map(|d| (d.chat, d.seq)).collect(),
            _ => Vec::new(),
        };
        match shown.into_iter().find(|(chat, seq)| self.relay.store.durable_delta(*chat, *seq).is_none()) {
            Some((chat, seq)) => Err(format!("the relay showed chat {chat} seq {} before it was durable", seq.0)),
            None => Ok(()),
        }
    }

    fn observe_relay_frame(&mut self, dev: usize, frame: &RelayFrame) -> Check {
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

    fn check_acked_durable(&self) -> Check {
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

    fn converged(&mut self) -> Result<bool, String> {
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
            .all(|d| d.conn.is_some() && d.core.as_ref().is_some_and(SyncCore::is_idle))
        {
            return Ok(false);
        }
        // A chat whose creation never reached the relay before its device's session ended is
        // gone with that device.
        let durable: BTreeSet<ChatId> = self.relay.store.durable_chats().into_iter().collect();
        let lost = |sim: &Sim, chat: &ChatId| !durable.contains(chat) && sim.devs[sim.creators[chat]].gone;
        let chats: Vec<Vec<ChatId>> =
            self.chats.iter().map(|cs| cs.iter().filter(|c| !lost(self, c)).copied().collect()).collect();
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
                let expected = |id: &&String| match self.written_by.get(*id) {
                    Some((by, cs)) if self.devs[*by].gone => self.devs[*by].acked.contains(cs),
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

    fn final_checks(&self) -> Check {
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
        }
        for chat in self.relay.store.durable_chats() {
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
        for d in self.devs.iter().filter(|d| !d.gone) {
            let outbox = d.device.as_ref().map(Device::outbox_len).unwrap_or_default();
            if outbox > 0 {
                return Err(format!("{} still has {outbox} deltas in its outbox", d.name));
            }
        }
        Ok(())
    }

    fn diagnose(&self) -> String {
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
                "{}: {} conn {:?} idle {} outbox {} applied {:?}",
                d.name,
                if d.gone {
                    "gone"
                } else if d.device.is_some() {
                    "up"
                } else {
                    "down"
                },
                d.conn,
                d.core.as_ref().is_some_and(SyncCore::is_idle),
                d.device.as_ref().map(Device::outbox_len).unwrap_or_default(),
                d.applied.values().map(|s| s.0).collect::<Vec<_>>()
            ));
        }
        out.join("; ")
    }
}

fn mirror(sled: &Option<SledStore>, ops: &[StoreOp]) -> Check {
    match sled {
        Some(s) => s.apply(ops).map_err(|e| format!("sled mirror: {e}")),
        None => Ok(()),
    }
}

/// Opens a device again after its restart. sled 0.34 releases its file lock from a background
/// thread shortly after the last handle drops, so an immediate reopen may find it still held;
/// the wait is wall-clock only and changes nothing simulated.
fn reopen(home: &Path, seed: u64) -> Result<Device, stratus_engine::Error> {
    let mut tries = 0;
    loop {
        match Device::open_seeded(home, seed) {
            Err(e) if tries < 500 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn describe(ev: &Ev) -> String {
    match ev {
        Ev::ToRelay { conn, frame } => format!("c{conn} -> relay {}", short_client(frame)),
        Ev::ToDevice { conn, frame } => format!("relay -> c{conn} {}", short_relay(frame)),
        other => format!("{other:?}"),
    }
}

fn short_client(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Append { req, chat, client_seq, sealed, .. } => {
            format!("append req {req} chat {chat} cs {} ({} B {})", client_seq.0, sealed.len(), digest(sealed))
        }
        other => format!("{other:?}"),
    }
}

fn short_relay(f: &RelayFrame) -> String {
    let seqs = |ds: &[stratus_engine::proto::wire::Delta]| ds.iter().map(|d| d.seq.0).collect::<Vec<_>>();
    match f {
        RelayFrame::Push { delta } => {
            format!("push chat {} seq {} ({})", delta.chat, delta.seq.0, digest(&delta.sealed))
        }
        RelayFrame::ChatPage { req, chat, deltas, head } => {
            format!("page req {req} chat {chat} seqs {:?} head {}", seqs(deltas), head.0)
        }
        RelayFrame::AccountPage { req, entries, head } => {
            format!(
                "account page req {req} seqs {:?} head {}",
                entries.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
                head.0
            )
        }
        RelayFrame::PushAccount { entry } => format!("push account seq {}", entry.seq.0),
        other => format!("{other:?}"),
    }
}

fn digest(b: &[u8]) -> String {
    blake3::hash(b).to_hex()[..12].to_string()
}
