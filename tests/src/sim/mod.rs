//! The deterministic whole-system simulator.
//!
//! Several accounts with several devices each and one relay, built from the real parts that
//! hold the decisions: the relay's sans-IO [`RelayCore`], each device's sans-IO [`SyncCore`] and
//! its real [`Device`] (sled store, Automerge documents, sealing) driven by the same
//! [`Device::carry_out`] the libp2p session uses. Only the network, the clock and the relay's
//! disk are simulated, and one seed drives every choice, so a seed replays exactly; the
//! [`Report::trace_hash`] of two runs of one seed is equal. Devices write messages, and three
//! writes in ten are instead an edit or delete of one of the account's messages, a reaction or
//! a read mark.
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
//! * in three worlds of ten, one device of the first account ends another's session mid-run,
//!   which rotates the account's keys (the other devices' outbox items sealed under the old
//!   epochs are refused as stale and sealed again);
//! * in half the worlds, tight relay limits (a few requests per second, one to eight appends and
//!   one to four pages in flight, a push backlog of a few frames, a stall timeout of seconds),
//!   so that devices are answered `RateLimited` and wait, pushes to them are dropped and they
//!   are told `Behind`, and streams whose frames were lost are cut off by the relay.
//!
//! The relay hears that frames were written to a device ([`Input::Sent`]) when they arrive at
//! it, and gets [`Input::Tick`] every simulated second.
//!
//! Invariants, checked as the run goes and at its end:
//! * the relay acknowledges or shows a delta only once it is durable;
//! * no acknowledged delta is lost, across any number of relay crashes;
//! * one `(chat, seq)` always names the same delta, and no delta is stored twice;
//! * each device applies each chat's deltas exactly once, in seq order, with no gap (a delta
//!   that came before its epoch's key is taken again once the key is there);
//! * a device's stored cursors never go back (checked across its restarts);
//! * nothing is rejected and no device reports an error;
//! * once a revocation is durable, the relay sends the revoked device nothing but the proof
//!   (`SessionEnded`, the signed revocation) and `SessionRevoked`; the revoked device checks
//!   the proof and deletes its store, and its messages the relay never acknowledged are
//!   allowed to be lost with it; no device is refused its session without a proof;
//! * after a rotation, no chat stores a delta under an epoch older than the rotation's;
//! * once faults stop, sync terminates: within `converge_within` every device is idle and the
//!   devices of each account show the same chats, heads and messages, holding every message
//!   written.

mod check;
mod devices;
mod network;
mod relay;
mod setup;
mod store;
mod trace;
mod writes;

use trace::{describe, short_relay};

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratus_engine::core::SyncOutput;
use stratus_engine::proto::wire::{ClientFrame, ErrorCode, RelayFrame};
use stratus_engine::session_core::{SessionCore, SessionInput, Work};
use stratus_engine::MemDisk;
use stratus_engine::{Action, ChatId, ClientSeq, Device, DeviceId, Event, MessageOp, Seq};
use stratus_relay::core::{frame_cost, ConnId, Effect, Input, RelayCore, StoreOp};
use stratus_relay::limits::{Limits, MIN_APPEND_BYTES_BURST};
use stratus_relay::store::{RelayStore, SledStore};

pub use store::MemStore;

/// One millisecond of simulated time (the unit is the microsecond).
pub const MS: u64 = 1_000;
/// One second of simulated time.
pub const SEC: u64 = 1_000_000;
/// Time between two messages of a burst from one device (2,000 messages/s).
pub const BURST_GAP: u64 = 500;
/// Most frames a slow device takes in one step (the session's `MAX_FRAMES_PER_STEP`).
pub const SESSION_FRAMES_PER_STEP: usize = 512;

const C2R: usize = 0;
const R2C: usize = 1;
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
    /// With two accounts or more, every account is in one group; at this time the last account
    /// leaves it or is removed by the creator (`None`: no member change).
    pub member_change_at: Option<u64>,
    /// Mean time between a device's sync stream dying without the device being told (the relay
    /// side goes, no reset arrives): only the device's session core can notice (`None`: never).
    pub silent_drop_every: Option<u64>,
    /// When every device of the first account writes this many messages [`BURST_GAP`] apart
    /// (2,000 messages/s each, several writers at once); only with the relay's default limits.
    pub burst: Option<(u64, u32)>,
    /// A device that takes this long over each frame from the relay (it applies slower than
    /// the relay pushes): frames wait for it in order.
    pub slow_device: Option<(usize, u64)>,
}

impl Config {
    /// A world drawn from `seed`: 1–3 accounts of 1–3 devices, and a fault mix from calm to
    /// hostile.
    pub fn from_seed(seed: u64) -> Config {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5157_a7a5);
        let accounts = rng.gen_range(1..=3);
        let devices: Vec<usize> =
            (0..accounts).map(|i| if i == 0 { rng.gen_range(2..=3) } else { rng.gen_range(1..=3) }).collect();
        let intensity: f64 = if rng.gen_bool(0.1) { 0.0 } else { rng.gen_range(0.2..1.0) };
        let every = |rng: &mut StdRng, mean_s: u64| {
            (intensity > 0.0 && rng.gen_bool(0.8)).then(|| ((mean_s as f64 / intensity) as u64) * SEC)
        };
        let default_limits = rng.gen_bool(0.5);
        let first_account = devices[0];
        Config {
            silent_drop_every: every(&mut rng, 30),
            burst: (default_limits && rng.gen_bool(0.3))
                .then(|| (rng.gen_range(SEC..20 * SEC), rng.gen_range(50..=150))),
            slow_device: rng.gen_bool(0.3).then(|| (rng.gen_range(0..first_account), rng.gen_range(MS..20 * MS))),
            seed,
            devices,
            chats_per_account: rng.gen_range(1..=2),
            messages_per_device: rng.gen_range(2..=8),
            faults_until: 30 * SEC,
            // The liveness bound: a device whose stream died silently while nothing waited
            // probes after PROBE_AFTER_MS and gives up after SILENCE_MS more, then reconnects
            // (backoff) and catches up.
            converge_within: 75 * SEC,
            loss: intensity * [0.0, 0.002, 0.01, 0.03][rng.gen_range(0..4)],
            create_chat_every: rng.gen_bool(0.5).then_some(40 * SEC),
            relay_crash_every: every(&mut rng, 10),
            device_restart_every: every(&mut rng, 30),
            partition_every: every(&mut rng, 20),
            offline_every: every(&mut rng, 60),
            slow_barrier: intensity * 0.01,
            failing_barrier: intensity * 0.002,
            revoke_at: rng.gen_bool(0.3).then(|| rng.gen_range(SEC..20 * SEC)),
            member_change_at: rng.gen_bool(0.5).then(|| rng.gen_range(SEC..25 * SEC)),
            limits: if default_limits {
                Limits { min_session_age_ms: 0, ..Limits::default() }
            } else {
                Limits {
                    min_session_age_ms: 0,
                    requests_per_second: rng.gen_range(5..=50),
                    request_burst: rng.gen_range(2..=10),
                    max_appends_in_flight_per_device: rng.gen_range(1..=8),
                    max_fetches_in_flight_per_device: rng.gen_range(1..=4),
                    max_push_backlog_bytes: rng.gen_range(1..=16) * 256,
                    stalled_reader_ms: rng.gen_range(2_000..=10_000),
                    append_bytes_per_second: rng.gen_range(2_000..=50_000),
                    append_bytes_burst: rng.gen_range(MIN_APPEND_BYTES_BURST..=2 * MIN_APPEND_BYTES_BURST),
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
    /// Connections a device's session core dropped as dead (silent too long).
    pub watchdog_closes: u32,
    /// Streams that died without the device being told.
    pub silent_drops: u32,
    /// Device restarts that lost writes not yet made durable (power loss).
    pub device_crashes: u32,
    /// Deltas a device had applied and lost in a crash (fetched again).
    pub lost_applies: u32,
    /// Messages written in bursts.
    pub burst_messages: u32,
    /// Frames lost.
    pub lost_frames: u32,
    /// `RateLimited` answers devices waited out.
    pub rate_limited: u32,
    /// Sessions ended by another device mid-run (each rotates the account's keys).
    pub revocations: u32,
    /// Outbox items the relay refused as sealed under a key epoch a rotation ended (each is
    /// sealed again and sent again).
    pub stale_epochs: u32,
    /// Deltas a device got before the key of their epoch (after a rotation) and took again
    /// once it came.
    pub key_waits: u32,
    /// Members that left a group or were removed (each starts the group's next key epoch).
    pub member_changes: u32,
    /// `Behind` frames devices got (pushes to them had been dropped).
    pub behind: u32,
    /// Streams the relay cut off for not reading (frames lost on the way to the device).
    pub cut_off: u32,
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
    /// The device's session core asked to connect ([`Work::Connect`]): the dial reaches the
    /// relay, or fails, now. `life` is the device's process: a restart ignores older dials.
    Connect {
        dev: usize,
        life: u64,
    },
    /// A dial failed (the relay is down, or the device cut off).
    ConnectFailed {
        dev: usize,
        life: u64,
    },
    Compose {
        dev: usize,
    },
    CreateChat {
        dev: usize,
    },
    /// The revoking device asks the relay to end the target's session (again, until it is done).
    Revoke,
    /// The group's member change is asked for (again, until it is done).
    ChangeMembers,
    /// The device's session core asked to be woken now ([`SessionCore::next_wake`]), unless it
    /// asked for another time since.
    Wake {
        dev: usize,
        life: u64,
        at: u64,
    },
    BarrierDone {
        epoch: u32,
        covering: u64,
        batches: usize,
        fails: bool,
    },
    /// A device's store barrier is done (`writes.rs`).
    DeviceBarrier {
        dev: usize,
        life: u64,
    },
    RelayCrash,
    RelayStart,
    /// The device's stream dies without the device hearing of it.
    SilentDrop {
        dev: usize,
    },
    /// A slow device takes the next frame waiting for it.
    DeviceTake {
        dev: usize,
    },
    /// The next message of a burst; `left` more to go.
    Burst {
        dev: usize,
        left: u32,
    },
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
    /// The relay driver's one-second timer.
    Tick,
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
    /// The device's store, in memory with an explicit durability line: a restart may crash it.
    disk: MemDisk,
    /// Its last restart lost what was not durable.
    crashed: bool,
    id: DeviceId,
    device: Option<Device>,
    core: Option<SessionCore>,
    conn: Option<ConnId>,
    latency: u64,
    offline_until: u64,
    partition_until: [u64; 2],
    /// The wake-up scheduled for its session core, if any.
    wake: Option<u64>,
    /// Last seq applied per chat, as the checks saw it.
    applied: BTreeMap<ChatId, Seq>,
    written: u32,
    /// Bumped by each restart: dials and wake-ups of an earlier process are stale.
    life: u64,
    /// Frames from the relay waiting for a slow device ([`Config::slow_device`]), and until
    /// when it is busy with the last one.
    inbox: VecDeque<(ConnId, RelayFrame)>,
    busy_until: u64,
    /// Client seqs the relay acknowledged to it.
    acked: BTreeSet<ClientSeq>,
    /// Its session was ended and it deleted the account's data: the simulation leaves it be.
    gone: bool,
    /// Its bursts' batches staged and not yet answered, and the barrier under way for them.
    unsettled: VecDeque<Vec<(ChatId, MessageOp)>>,
    barrier: Option<stratus_engine::store::Barrier>,
}

/// The world's member change, if it has one: the last account leaves the group (or is
/// removed from it by the group's creator).
struct Departure {
    /// The device asking for it.
    by: usize,
    /// The account that goes.
    account: usize,
    /// Removed by the creator (else it leaves).
    removed: bool,
    /// The token of the request in flight (its answer comes as [`Work::Answer`]).
    req: Option<u64>,
    /// The change is durable on the relay.
    done: bool,
    /// Messages the other accounts wrote to the group after that: the departed account's
    /// devices must never show one.
    written_after: BTreeSet<String>,
}

/// The world's revocation, if it has one.
struct Revoking {
    by: usize,
    target: usize,
    /// The token of the request in flight (its answer comes as [`Work::Answer`]).
    req: Option<u64>,
    /// The revoker got `Done`: the revocation is durable.
    done: bool,
    /// At `Done`: each chat of the account, its durable head and the epoch the rotation began.
    /// Nothing after that head may be sealed under an older epoch.
    rotated: Vec<(ChatId, Seq, stratus_engine::Epoch)>,
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
    /// The chat every account is in (with two accounts or more).
    group: Option<ChatId>,
    departure: Option<Departure>,
    /// Who created each chat.
    creators: BTreeMap<ChatId, usize>,
    /// Every `(chat, seq)` a device was shown or acknowledged, and whose delta it is.
    seen: BTreeMap<(ChatId, Seq), (DeviceId, ClientSeq)>,
    /// Every acknowledgement the relay gave.
    acked: BTreeMap<(ChatId, Seq), (DeviceId, ClientSeq)>,
    /// Tokens for the app requests the simulation makes through session cores.
    next_token: u64,
    hasher: blake3::Hasher,
    tail: VecDeque<String>,
    report: Report,
}

type Check = Result<(), String>;

impl Sim {
    /// Builds the world for `cfg` (device stores on memory disks), and runs account creation,
    /// linking and chat creation (fault-free) through the relay core.
    pub fn new(cfg: Config) -> Result<Sim, Failure> {
        Self::build(cfg, None)
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
        Self::build(cfg, Some(sled))
    }

    fn build(cfg: Config, sled: Option<SledStore>) -> Result<Sim, Failure> {
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
            group: None,
            departure: None,
            creators: BTreeMap::new(),
            seen: BTreeMap::new(),
            acked: BTreeMap::new(),
            next_token: 0,
            hasher: blake3::Hasher::new(),
            tail: VecDeque::new(),
            report: Report { seed: cfg.seed, ..Report::default() },
            cfg,
        };
        if let Some(s) = &sled {
            sim.relay.store.incarnation = s.incarnation().map_err(|e| sim.failure(format!("sled mirror: {e}")))?;
        }
        sim.relay.mirror = sled;
        NOW_MS.with(|c| c.set(1_800_000_000_000));
        sim.setup().map_err(|m| sim.failure(format!("setup: {m}")))?;
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
                match self.cfg.slow_device {
                    // A slow device takes its frames one at a time, in order; the relay hears
                    // them written only as it takes them (no buffer between them).
                    Some((slow, _)) if slow == dev => {
                        let d = &mut self.devs[dev];
                        d.inbox.push_back((conn, frame));
                        if d.inbox.len() == 1 {
                            let at = d.busy_until.max(self.now);
                            self.schedule(at, Ev::DeviceTake { dev });
                        }
                    }
                    _ => {
                        self.written_to_device(conn, &frame)?;
                        self.device_frame(dev, conn, frame)?;
                    }
                }
            }
            Ev::DeviceTake { dev } => {
                // It takes every frame that waits (of one connection, at most a session's
                // step's worth) and carries them out together, as the session does.
                let cost = self.cfg.slow_device.map_or(0, |(_, c)| c);
                let d = &mut self.devs[dev];
                let Some(&(conn, _)) = d.inbox.front() else { return Ok(false) };
                let mut frames = Vec::new();
                while frames.len() < SESSION_FRAMES_PER_STEP && d.inbox.front().is_some_and(|(c, _)| *c == conn) {
                    frames.push(d.inbox.pop_front().expect("looked at").1);
                }
                d.busy_until = self.now + cost * frames.len() as u64;
                if !d.inbox.is_empty() {
                    let at = d.busy_until;
                    self.schedule(at, Ev::DeviceTake { dev });
                }
                for frame in &frames {
                    self.written_to_device(conn, frame)?;
                }
                self.device_frames(dev, conn, frames)?;
            }
            Ev::DeviceLost { conn } => self.device_lost(conn)?,
            Ev::SilentDrop { dev } => {
                if let (true, Some(conn)) = (self.faults, self.devs[dev].conn) {
                    self.report.silent_drops += 1;
                    // Nothing more arrives either way, and only the relay hears of it.
                    let c = self.conns.get_mut(&conn).expect("open");
                    c.lost = [true; 2];
                    c.doomed = true;
                    self.schedule(self.now + MS, Ev::RelayLost { conn });
                }
            }
            Ev::Burst { dev, left } => self.burst(dev, left)?,
            Ev::DeviceBarrier { dev, life } => self.device_barrier(dev, life)?,
            Ev::RelayLost { conn } => self.relay_lost(conn)?,
            Ev::Connect { dev, life } => {
                if self.devs[dev].life == life {
                    self.connect(dev)?;
                }
            }
            Ev::ConnectFailed { dev, life } => {
                if self.devs[dev].life == life {
                    self.device_input(dev, SessionInput::ConnectFailed("the relay is unreachable".into()))?;
                }
            }
            Ev::Compose { dev } => self.compose(dev)?,
            Ev::CreateChat { dev } => self.create_chat(dev)?,
            Ev::Revoke => self.revoke()?,
            Ev::ChangeMembers => self.change_members()?,
            Ev::Wake { dev, life, at } => {
                if self.devs[dev].life == life && self.devs[dev].wake == Some(at) {
                    self.devs[dev].wake = None;
                    self.device_input(dev, SessionInput::Timeout)?;
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
            Ev::Tick => {
                if let Some(core) = self.relay.core.as_mut() {
                    let effects = core.handle(Input::Tick { now_ms: self.now / MS });
                    self.relay_effects(effects)?;
                }
                self.schedule(self.now + SEC, Ev::Tick);
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
}

fn mirror(sled: &Option<SledStore>, ops: &[StoreOp]) -> Check {
    match sled {
        Some(s) => s.apply(ops).map_err(|e| format!("sled mirror: {e}")),
        None => Ok(()),
    }
}
