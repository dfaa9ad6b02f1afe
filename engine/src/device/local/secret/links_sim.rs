//! The secret-link simulator: devices of three accounts with secret chats between them, each
//! running [`SecretLinks`] (the same sans-IO code the session runs) over a simulated network,
//! deterministic from one seed. Faults for the first [`FAULTS_FOR`]: streams that break (both
//! ends told, or one end only after a ping timeout, as a dead connection is found), dials that
//! fail, both devices dialing each other at once, a network partition, device restarts (every
//! stream gone, the links' state rebuilt from the store), streams the driver cannot queue to.
//! Users write and read throughout, and start new chats that the other device's user accepts
//! once told of the offer.
//!
//! Invariants: no panic; a message is reported to the app at most once per device; and
//! liveness: within [`SETTLE`] of the faults stopping, both devices of every chat show the same
//! messages, every one written, nothing waits for a link, and at most one link per chat is up.
//!
//! `STRATUS_LINK_SIM_SEEDS=n` runs n seeds (default 40) from `STRATUS_LINK_SIM_BASE` (default
//! random); a failure prints its seed, and `STRATUS_LINK_SIM_BASE=seed STRATUS_LINK_SIM_SEEDS=1`
//! replays it.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::log_in;
use crate::device::drive::Event;
use crate::device::kv::MemDisk;
use crate::device::local::Device;
use crate::device::peer_links::LinkNo;
use crate::device::secret_links::{SecretLinks, SecretOut};
use crate::device::store::SecretState;
use crate::proto::ids::SecretId;

const MS: u64 = 1;
const SEC: u64 = 1_000;
/// How long faults and writes go on.
const FAULTS_FOR: u64 = 120 * SEC;
/// The liveness bound once faults stop: the longest retry backoff (300 s), an opening timeout
/// (10 s) and room for the dials and frames after it.
const SETTLE: u64 = 330 * SEC;
/// How long a dead connection goes unnoticed (libp2p's ping timeout is of this order).
const PING_TIMEOUT: u64 = 20 * SEC;
const WALL_START: i64 = 1_800_000_000_000;

thread_local! {
    static WALL: Cell<i64> = const { Cell::new(WALL_START) };
}

fn wall() -> i64 {
    WALL.with(|w| w.get())
}

#[derive(Debug)]
enum Ev {
    Tick(usize),
    Listened {
        dev: usize,
        life: u32,
        ok: bool,
    },
    Dialed {
        dev: usize,
        life: u32,
        chat: SecretId,
        to: usize,
    },
    Frame {
        stream: u64,
        to_side: usize,
        frame: Vec<u8>,
    },
    Closed {
        dev: usize,
        life: u32,
        link: LinkNo,
    },
    Write(usize),
    Break,
    Restart(usize),
    Back(usize),
    Partition(bool),
    /// A user starts a secret chat with another account's device.
    Offer,
    /// The user of `dev` accepts the offer of `chat` (told by `SecretOffered`).
    Accept {
        dev: usize,
        chat: SecretId,
    },
}

struct Node {
    device: Device,
    links: SecretLinks,
    /// Restarts so far: events for an earlier life are dropped.
    life: u32,
    up: bool,
    listening: bool,
    /// When a tick is scheduled.
    tick_at: Option<u64>,
    /// Each message reported, to catch a second report.
    reported: BTreeSet<String>,
    /// The stream of each link (and which end is this device's).
    streams: BTreeMap<LinkNo, (u64, usize)>,
}

struct Stream {
    /// Each end: device, its life, and its link (`None` once closed there).
    ends: [(usize, u32, Option<LinkNo>); 2],
    /// When the last frame each way is delivered (frames on a stream keep their order).
    last: [u64; 2],
}

struct Sim {
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: BTreeMap<usize, Ev>,
    next_ev: usize,
    nodes: Vec<Node>,
    streams: BTreeMap<u64, Stream>,
    next_stream: u64,
    chats: Vec<(SecretId, usize, usize)>,
    written: BTreeMap<SecretId, BTreeSet<String>>,
    partitioned: bool,
    report: Report,
}

/// What a run did, to see that the faults happen.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    messages: u64,
    links_up: u64,
    dials_failed: u64,
    breaks: u64,
    restarts: u64,
    partitions: u64,
    streams_full: u64,
    offers: u64,
}

impl Report {
    fn add(&mut self, o: Report) {
        self.messages += o.messages;
        self.links_up += o.links_up;
        self.dials_failed += o.dials_failed;
        self.breaks += o.breaks;
        self.restarts += o.restarts;
        self.partitions += o.partitions;
        self.streams_full += o.streams_full;
        self.offers += o.offers;
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let rng = StdRng::seed_from_u64(seed);
        WALL.with(|w| w.set(WALL_START));
        let mut nodes = Vec::new();
        for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
            let mut device = Device::open_mem(&MemDisk::new(), seed.wrapping_mul(31).wrapping_add(i as u64)).unwrap();
            device.set_clock(wall);
            log_in(&mut device, name);
            let links = SecretLinks::new(&device, 0).unwrap();
            nodes.push(Node {
                device,
                links,
                life: 0,
                up: true,
                listening: false,
                tick_at: None,
                reported: BTreeSet::new(),
                streams: BTreeMap::new(),
            });
        }
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_ev: 0,
            nodes,
            streams: BTreeMap::new(),
            next_stream: 0,
            chats: Vec::new(),
            written: BTreeMap::new(),
            partitioned: false,
            report: Report::default(),
        };
        // A chat between each two of them, started by the first, accepted by the other (the
        // offer's travel is the secret tests' business); a second between alice and bob.
        for (a, b) in [(0, 1), (1, 2), (2, 0), (0, 1)] {
            let cert_b = sim.nodes[b].device.login().unwrap().cert.clone();
            let cert_a = sim.nodes[a].device.login().unwrap().cert.clone();
            let id = sim.nodes[a].device.secret_start(cert_b).unwrap();
            sim.nodes[b].device.secret_offered(id, cert_a, true, true).unwrap();
            sim.nodes[a].device.secret_accept(id).unwrap();
            sim.chats.push((id, a, b));
        }
        for dev in 0..sim.nodes.len() {
            sim.nodes[dev].links = SecretLinks::new(&sim.nodes[dev].device, 0).unwrap();
            sim.schedule(0, Ev::Tick(dev));
            sim.nodes[dev].tick_at = Some(0);
            let first = sim.rng.gen_range(0..5 * SEC);
            sim.schedule(first, Ev::Write(dev));
        }
        let at = sim.rng.gen_range(SEC..20 * SEC);
        sim.schedule(at, Ev::Break);
        let at = sim.rng.gen_range(10 * SEC..FAULTS_FOR);
        let who = sim.rng.gen_range(0..3);
        sim.schedule(at, Ev::Restart(who));
        if sim.rng.gen_bool(0.5) {
            let at = sim.rng.gen_range(5 * SEC..FAULTS_FOR - 30 * SEC);
            sim.schedule(at, Ev::Partition(true));
        }
        let at = sim.rng.gen_range(5 * SEC..30 * SEC);
        sim.schedule(at, Ev::Offer);
        sim
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        let id = self.next_ev;
        self.next_ev += 1;
        self.events.insert(id, ev);
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, id)));
    }

    fn faults(&self) -> bool {
        self.now < FAULTS_FOR
    }

    fn latency(&mut self) -> u64 {
        self.rng.gen_range(MS..50 * MS)
    }

    fn run(&mut self) -> Result<Report, String> {
        let end = FAULTS_FOR + SETTLE;
        while let Some(Reverse((at, _, id))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            WALL.with(|w| w.set(WALL_START + at as i64));
            let ev = self.events.remove(&id).expect("scheduled");
            self.handle(ev)?;
        }
        self.check_end()?;
        Ok(self.report)
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Tick(dev) => {
                let node = &mut self.nodes[dev];
                if !node.up || node.tick_at != Some(self.now) {
                    return Ok(());
                }
                node.tick_at = None;
                let outs = node.links.tick(&mut node.device, self.now);
                self.carry(dev, outs)?;
            }
            Ev::Listened { dev, life, ok } => {
                let node = &mut self.nodes[dev];
                if node.life != life || !node.up {
                    return Ok(());
                }
                node.listening = ok;
                let result = if ok { Ok(()) } else { Err("no reservation".to_string()) };
                node.links.listened(self.now, result);
                self.carry(dev, Vec::new())?;
            }
            Ev::Dialed { dev, life, chat, to } => self.dialed(dev, life, chat, to)?,
            Ev::Frame { stream, to_side, frame } => {
                let Some(s) = self.streams.get(&stream) else { return Ok(()) };
                let (dev, life, link) = s.ends[to_side];
                let Some(link) = link.filter(|_| self.nodes[dev].life == life && self.nodes[dev].up) else {
                    return Ok(());
                };
                let node = &mut self.nodes[dev];
                let outs = node.links.frame(&mut node.device, self.now, link, &frame);
                self.carry(dev, outs)?;
            }
            Ev::Closed { dev, life, link } => {
                let node = &mut self.nodes[dev];
                if node.life != life || !node.up || node.streams.remove(&link).is_none() {
                    return Ok(());
                }
                let outs = node.links.closed(&mut node.device, self.now, link, "closed by the other end");
                self.carry(dev, outs)?;
            }
            Ev::Write(dev) => self.write(dev)?,
            Ev::Break => {
                if self.faults() {
                    let gap = self.rng.gen_range(SEC..15 * SEC);
                    self.schedule(self.now + gap, Ev::Break);
                    let open: Vec<u64> = self.streams.keys().copied().collect();
                    if !open.is_empty() {
                        let s = open[self.rng.gen_range(0..open.len())];
                        let silent = self.rng.gen_bool(0.3);
                        self.break_stream(s, silent);
                        self.report.breaks += 1;
                    }
                }
            }
            Ev::Restart(dev) => {
                if !self.nodes[dev].up {
                    return Ok(());
                }
                let open: Vec<u64> =
                    self.nodes[dev].streams.values().map(|(s, _)| *s).collect::<BTreeSet<_>>().into_iter().collect();
                for s in open {
                    let silent = self.rng.gen_bool(0.5);
                    self.break_stream(s, silent);
                }
                self.report.restarts += 1;
                let node = &mut self.nodes[dev];
                node.up = false;
                node.life += 1;
                node.listening = false;
                node.tick_at = None;
                node.streams.clear();
                let back = self.now + self.rng.gen_range(SEC..30 * SEC);
                self.schedule(back, Ev::Back(dev));
            }
            Ev::Back(dev) => {
                let node = &mut self.nodes[dev];
                node.up = true;
                node.device.secret_docs.clear();
                node.links = SecretLinks::new(&node.device, self.now).map_err(|e| e.to_string())?;
                self.carry(dev, Vec::new())?;
                if self.faults() {
                    let at = self.now + self.rng.gen_range(10 * SEC..60 * SEC);
                    let who = self.rng.gen_range(0..3);
                    self.schedule(at, Ev::Restart(who));
                }
            }
            Ev::Offer => {
                if self.faults() {
                    let gap = self.rng.gen_range(10 * SEC..40 * SEC);
                    self.schedule(self.now + gap, Ev::Offer);
                }
                let from = self.rng.gen_range(0..self.nodes.len());
                let to = (from + self.rng.gen_range(1..self.nodes.len())) % self.nodes.len();
                if !self.nodes[from].up {
                    return Ok(());
                }
                let cert = self.nodes[to].device.login().map_err(|e| e.to_string())?.cert.clone();
                let node = &mut self.nodes[from];
                let chat = node.device.secret_start(cert).map_err(|e| format!("start: {e}"))?;
                self.chats.push((chat, from, to));
                self.report.offers += 1;
                let outs = node.links.touched(&mut node.device, self.now, chat);
                self.carry(from, outs)?;
            }
            Ev::Accept { dev, chat } => {
                if !self.nodes[dev].up {
                    self.schedule(self.now + SEC, Ev::Accept { dev, chat });
                    return Ok(());
                }
                let node = &mut self.nodes[dev];
                if node.device.secret_offer(chat).is_some() {
                    node.device.secret_accept(chat).map_err(|e| format!("accept: {e}"))?;
                    let outs = node.links.touched(&mut node.device, self.now, chat);
                    self.carry(dev, outs)?;
                }
            }
            Ev::Partition(on) => {
                self.partitioned = on;
                if on {
                    self.report.partitions += 1;
                    for s in self.streams.keys().copied().collect::<Vec<_>>() {
                        self.break_stream(s, true);
                    }
                    let heal = self.now + self.rng.gen_range(5 * SEC..30 * SEC);
                    self.schedule(heal, Ev::Partition(false));
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, dev: usize) -> Result<(), String> {
        if !self.faults() {
            return Ok(());
        }
        let gap = self.rng.gen_range(100 * MS..4 * SEC);
        self.schedule(self.now + gap, Ev::Write(dev));
        if !self.nodes[dev].up {
            return Ok(());
        }
        // Chats it has and may write in: not an offer still waiting for this user.
        let node = &self.nodes[dev];
        let mine: Vec<SecretId> = self
            .chats
            .iter()
            .filter(|(_, a, b)| *a == dev || *b == dev)
            .map(|c| c.0)
            .filter(|c| node.device.secret(*c).is_ok_and(|s| s.state != SecretState::Invited))
            .collect();
        let chat = mine[self.rng.gen_range(0..mine.len())];
        let node = &mut self.nodes[dev];
        if self.rng.gen_bool(0.2) {
            // A read mark up to the newest message, if any.
            let newest =
                node.device.secret_messages(chat).map_err(|e| e.to_string())?.last().map(|m| m.message.id.clone());
            let Some(upto) = newest else { return Ok(()) };
            node.device.secret_read(chat, &upto).map_err(|e| format!("read: {e}"))?;
        } else {
            let text = format!("{dev}:{}", self.now);
            node.device.secret_send(chat, &text, None).map_err(|e| format!("send: {e}"))?;
            self.written.entry(chat).or_default().insert(text);
            self.report.messages += 1;
        }
        let node = &mut self.nodes[dev];
        let outs = node.links.touched(&mut node.device, self.now, chat);
        self.carry(dev, outs)
    }

    fn dialed(&mut self, dev: usize, life: u32, chat: SecretId, to: usize) -> Result<(), String> {
        if self.nodes[dev].life != life || !self.nodes[dev].up {
            return Ok(());
        }
        let reachable = !self.partitioned
            && self.nodes[to].up
            && self.nodes[to].listening
            && !(self.faults() && self.rng.gen_bool(0.1));
        let node = &mut self.nodes[dev];
        let result = if reachable { Ok(()) } else { Err("unreachable".to_string()) };
        self.report.dials_failed += u64::from(!reachable);
        let (link, outs) = node.links.dialed(&mut node.device, self.now, chat, result);
        let Some(link) = link.filter(|_| reachable) else { return self.carry(dev, outs) };
        let stream = self.next_stream;
        self.next_stream += 1;
        node.streams.insert(link, (stream, 0));
        let peer = node.device.id().clone();
        let to_life = self.nodes[to].life;
        let there = {
            let n = &mut self.nodes[to];
            n.links.incoming(&n.device, self.now, peer)
        };
        self.streams.insert(stream, Stream { ends: [(dev, life, Some(link)), (to, to_life, there)], last: [0; 2] });
        match there {
            Some(l) => {
                self.nodes[to].streams.insert(l, (stream, 1));
            }
            // Refused there: the stream closes at once.
            None => self.close_end(stream, 1),
        }
        self.carry(dev, outs)?;
        self.carry(to, Vec::new())
    }

    /// Carries out `outs` of `dev`'s links (and reschedules its tick).
    fn carry(&mut self, dev: usize, outs: Vec<SecretOut>) -> Result<(), String> {
        let mut queue = std::collections::VecDeque::from(outs);
        while let Some(o) = queue.pop_front() {
            match o {
                SecretOut::Listen => {
                    let (life, ok) = (self.nodes[dev].life, !(self.faults() && self.rng.gen_bool(0.1)));
                    let at = self.now + self.rng.gen_range(10 * MS..500 * MS);
                    self.schedule(at, Ev::Listened { dev, life, ok });
                }
                SecretOut::Dial { chat, peer } => {
                    let to = self.nodes.iter().position(|n| *n.device.id() == peer).ok_or("dialed a stranger")?;
                    let life = self.nodes[dev].life;
                    let at = self.now + self.rng.gen_range(10 * MS..300 * MS);
                    self.schedule(at, Ev::Dialed { dev, life, chat, to });
                }
                SecretOut::Send { link, frames } => {
                    let Some(&(stream, side)) = self.nodes[dev].streams.get(&link) else { continue };
                    if self.faults() && self.rng.gen_bool(0.002) {
                        let node = &mut self.nodes[dev];
                        node.streams.remove(&link);
                        self.report.streams_full += 1;
                        queue.extend(node.links.stream_full(&mut node.device, self.now, link));
                        self.close_end(stream, side);
                        continue;
                    }
                    for frame in frames {
                        let lat = self.latency();
                        // Broken already: the frames are lost, and the device hears of it.
                        let Some(s) = self.streams.get_mut(&stream) else { break };
                        let at = (self.now + lat).max(s.last[side]);
                        s.last[side] = at;
                        self.schedule(at, Ev::Frame { stream, to_side: 1 - side, frame });
                    }
                }
                SecretOut::Close { link, .. } => {
                    if let Some((stream, side)) = self.nodes[dev].streams.remove(&link) {
                        self.close_end(stream, side);
                    }
                }
                SecretOut::Emit(Event::SecretMessage { message, .. }) => {
                    if !self.nodes[dev].reported.insert(message.message.id.clone()) {
                        return Err(format!("device {dev} was told of message {} twice", message.message.id));
                    }
                }
                SecretOut::Emit(Event::SecretLinked { .. }) => self.report.links_up += 1,
                SecretOut::Emit(Event::SecretOffered { chat, .. }) => {
                    let at = self.now + self.rng.gen_range(100 * MS..10 * SEC);
                    self.schedule(at, Ev::Accept { dev, chat });
                }
                SecretOut::Emit(_) => {}
                // An offer from an account whose keys are not here: the lookup fails (no relay
                // here), so the offer waits for this device's user, who accepts when told.
                SecretOut::Lookup { link, .. } => {
                    let node = &mut self.nodes[dev];
                    queue.extend(node.links.looked_up(&mut node.device, self.now, link));
                }
            }
        }
        let node = &mut self.nodes[dev];
        if let Some(t) = node.links.next_wake(&node.device, self.now) {
            if node.tick_at.is_none_or(|s| t < s || s < self.now) {
                let t = t.max(self.now);
                node.tick_at = Some(t);
                self.schedule(t, Ev::Tick(dev));
            }
        }
        Ok(())
    }

    /// `side` of `stream` closes it: the other end hears it after a latency.
    fn close_end(&mut self, stream: u64, side: usize) {
        let lat = self.latency();
        let Some(s) = self.streams.get_mut(&stream) else { return };
        s.ends[side].2 = None;
        let (dev, life, link) = s.ends[1 - side];
        if let Some(link) = link {
            let at = (self.now + lat).max(s.last[side]);
            self.schedule(at, Ev::Closed { dev, life, link });
        } else {
            self.streams.remove(&stream);
        }
    }

    /// The network breaks `stream`: both ends hear it (after a ping timeout when `silent`).
    fn break_stream(&mut self, stream: u64, silent: bool) {
        let Some(s) = self.streams.remove(&stream) else { return };
        for (dev, life, link) in s.ends {
            let Some(link) = link else { continue };
            let wait = if silent { PING_TIMEOUT } else { self.latency() };
            self.schedule(self.now + wait, Ev::Closed { dev, life, link });
        }
    }

    fn check_end(&mut self) -> Result<(), String> {
        for &(chat, a, b) in &self.chats {
            let mut texts = Vec::new();
            for dev in [a, b] {
                let node = &mut self.nodes[dev];
                let state =
                    node.device.secret(chat).map(|c| c.state).map_err(|e| format!("device {dev}, chat {chat}: {e}"))?;
                if state != SecretState::Active {
                    return Err(format!("device {dev}: chat {chat} is {state:?}, not active"));
                }
                let mut t: Vec<String> = node
                    .device
                    .secret_messages(chat)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|m| m.message.text)
                    .collect();
                t.sort();
                if node.device.secret_waiting(chat).map_err(|e| e.to_string())? {
                    return Err(format!("device {dev} still has something waiting in chat {chat}"));
                }
                if node.links.live(chat).len() > 1 {
                    return Err(format!("device {dev} has {} links up for chat {chat}", node.links.live(chat).len()));
                }
                texts.push(t);
            }
            let written: Vec<String> = self.written.get(&chat).cloned().unwrap_or_default().into_iter().collect();
            if texts[0] != written || texts[1] != written {
                let mut state = String::new();
                for dev in [a, b] {
                    let n = &mut self.nodes[dev];
                    let doc = n.device.secret_doc(chat).map_err(|e| e.to_string())?;
                    let (in_doc, held) = (doc.messages().len(), doc.pending_changes().len());
                    let keys = n.device.store.message_keys(chat).map(|k| k.len()).unwrap_or(0);
                    let live = n.links.live(chat);
                    state += &format!(
                        "; device {dev}: {in_doc} in its document, {held} changes held, {keys} keys, links up {live:?}"
                    );
                }
                return Err(format!(
                    "chat {chat}: {} written, device {a} shows {}, device {b} shows {}{state}",
                    written.len(),
                    texts[0].len(),
                    texts[1].len()
                ));
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

#[test]
fn secret_links_deliver_everything_once_faults_stop() {
    let n = env_u64("STRATUS_LINK_SIM_SEEDS").unwrap_or(40);
    let base = env_u64("STRATUS_LINK_SIM_BASE").unwrap_or_else(rand::random);
    eprintln!("simulating secret links for {n} seeds from {base} (replay: STRATUS_LINK_SIM_BASE={base} STRATUS_LINK_SIM_SEEDS={n})");
    let mut total = Report::default();
    for seed in base..base.saturating_add(n) {
        match Sim::new(seed).run() {
            Ok(r) => total.add(r),
            Err(e) => panic!("seed {seed} failed: {e}\nreplay: STRATUS_LINK_SIM_BASE={seed} STRATUS_LINK_SIM_SEEDS=1"),
        }
    }
    eprintln!("{n} seeds: {total:?}");
}
