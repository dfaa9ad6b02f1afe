//! The session's own decisions, sans-IO: when to connect and reconnect, when a paused sync
//! resumes, when a quiet connection is probed or taken as dead, which relay replies answer the
//! app's own requests, and which changes of state the app hears of.
//!
//! [`SessionCore`] wraps the [`SyncCore`]. The driver (the async `Session`, or the simulator)
//! feeds it [`SessionInput`]s with the time, hands the sync outputs to
//! [`crate::Device::carry_out`] (see [`crate::Device::session_step`], which does both), and
//! carries out the returned [`Work`] in order. It calls back with [`SessionInput::Timeout`] at
//! [`SessionCore::next_wake`]. The core never reads the clock; its jitter comes from a seeded
//! RNG, so the simulator replays it.
//!
//! Rules:
//! * Connecting: at start, then after a failure or a loss, after a backoff that starts at
//!   [`BACKOFF_MIN_MS`] and doubles per failed round up to [`BACKOFF_MAX_MS`], plus up to a
//!   quarter of it in jitter. A connection that came up resets it.
//! * The relay may have several addresses ([`SessionCore::with_addresses`]): a round tries
//!   them in order, starting from the one that worked last, the next one at once after a
//!   failure; the backoff comes only once every address of the round failed. A lost
//!   connection starts the next round from the address it ran on.
//! * A connection on which requests wait and nothing arrives for [`SILENCE_MS`] is taken as
//!   dead ([`Work::Close`], then reconnect): a stream whose peer vanished without a reset would
//!   otherwise hold the session for good. One on which nothing waits is probed after
//!   [`PROBE_AFTER_MS`] of quiet ([`SyncInput::Probe`]), which also fetches anything a lost
//!   push would have brought.
//! * App requests (a lookup for a secret chat, say) get a relay req id from the sync core and
//!   are answered with [`Work::Answer`]; when the connection goes first, with
//!   [`Work::Unanswered`]. At most [`MAX_APP_REQUESTS`] wait at once; more are refused at once.
//! * An app request that must see everything the relay has first waits, parked, until the
//!   session is connected and caught up, with none of the device's own key work under way
//!   ([`Work::Ready`]), at most [`PARK_MS`]. One refused as stale parks again after
//!   [`SessionInput::Refresh`], so that it waits for the relay's heads as they are now.
//! * Once the relay says the session was ended ([`Event::SessionRevoked`], or without a proof
//!   [`Event::SessionRefused`]), or that it does not serve this device's protocol version
//!   ([`Event::VersionRefused`]), nothing reconnects.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::core::{SyncCore, SyncInput, SyncOutput};
use crate::device::drive::{Action, Event};
use crate::proto::wire::{ClientFrame, RelayFrame, ReqId};

/// First wait before connecting again after a failure or a loss.
pub const BACKOFF_MIN_MS: u64 = 100;
/// Longest wait between connection attempts (before jitter).
pub const BACKOFF_MAX_MS: u64 = 5_000;
/// A connection with requests waiting that brings nothing for this long is taken as dead.
pub const SILENCE_MS: u64 = 20_000;
/// A connection with nothing waiting that brings nothing for this long is probed.
pub const PROBE_AFTER_MS: u64 = 30_000;
/// Most app requests waiting for the relay at once; more are answered
/// [`Work::Unanswered`] at once.
pub const MAX_APP_REQUESTS: usize = 64;
/// Longest an app request parked until the session is caught up ([`SessionCore::park`])
/// waits; then it is answered [`Work::Unanswered`].
pub const PARK_MS: u64 = 30_000;

/// What the driver tells the session core.
#[derive(Debug)]
pub enum SessionInput {
    /// A stream to the relay is open (after [`Work::Connect`]).
    Connected,
    /// Opening the stream failed.
    ConnectFailed(String),
    /// The stream broke or the relay closed it.
    Lost(String),
    /// A frame from the relay.
    Frame(Box<RelayFrame>),
    /// [`SessionCore::next_wake`] has come.
    Timeout,
    /// An app request was refused as made for keys or members that moved on: ask the relay
    /// for its heads again ([`SyncInput::Refresh`]) before it is made again.
    Refresh,
}

/// What the driver carries out, in order.
#[derive(Debug, PartialEq)]
pub enum Work {
    /// Open a stream to the relay at its address number `addr` (an index into the list the
    /// driver gave [`SessionCore::with_addresses`] the length of); report
    /// [`SessionInput::Connected`] or [`SessionInput::ConnectFailed`].
    Connect { addr: usize },
    /// Drop the stream without waiting for anything on it (the core already counts it lost).
    Close,
    /// Send this frame on the stream.
    Send(ClientFrame),
    /// Tell the app.
    Emit(Event),
    /// The relay's answer to the app request `token`.
    Answer { token: u64, frame: RelayFrame },
    /// The app request `token` will not be answered: not connected, or the connection went.
    Unanswered { token: u64 },
    /// The app request `token` parked with [`SessionCore::park`] can be made now: the
    /// session is caught up.
    Ready { token: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected; connect at this time.
    Down { retry_at: u64 },
    /// [`Work::Connect`] is being carried out.
    Connecting,
    /// Connected; something last arrived at `heard`.
    Up { heard: u64 },
    /// The relay ended this device's session: nothing more.
    Ended,
}

/// What the app has been told, so that it hears of each change once.
#[derive(Debug, Default, Clone, Copy)]
struct Shown {
    connected: bool,
    caught_up: bool,
    idle: bool,
}

/// The session's state machine. See the module docs.
pub struct SessionCore {
    sync: SyncCore,
    link: Link,
    backoff_ms: u64,
    resume_at: Option<u64>,
    /// App requests waiting for the relay: relay req id → the driver's token.
    requests: BTreeMap<ReqId, u64>,
    /// App requests parked until the session is connected (or caught up, when `true`): token →
    /// (when they give up, whether they wait to be caught up).
    parked: BTreeMap<u64, (u64, bool)>,
    shown: Shown,
    rng: StdRng,
    /// How many addresses the relay has (at least 1).
    addrs: usize,
    /// The address tried next, or the one connected to.
    addr: usize,
    /// Addresses that failed in this round, since the last connection or backoff.
    failed_in_round: usize,
}

impl SessionCore {
    /// A session core over `sync`; `seed` drives the reconnect jitter. It connects at the
    /// first [`SessionInput::Timeout`] (at once: [`SessionCore::next_wake`] is 0).
    pub fn new(sync: SyncCore, seed: u64) -> Self {
        SessionCore {
            sync,
            link: Link::Down { retry_at: 0 },
            backoff_ms: BACKOFF_MIN_MS,
            resume_at: None,
            requests: BTreeMap::new(),
            parked: BTreeMap::new(),
            shown: Shown::default(),
            rng: StdRng::seed_from_u64(seed),
            addrs: 1,
            addr: 0,
            failed_in_round: 0,
        }
    }

    /// The relay has `addrs` addresses (0 counts as 1), tried in order: [`Work::Connect`]
    /// names one by its index.
    pub fn with_addresses(mut self, addrs: usize) -> Self {
        self.addrs = addrs.max(1);
        self
    }

    /// The sync core, for [`crate::Device::carry_out`] and for local writes that queue into it.
    pub fn sync(&mut self) -> &mut SyncCore {
        &mut self.sync
    }

    /// The sync core, to read its state.
    pub fn sync_ref(&self) -> &SyncCore {
        &self.sync
    }

    /// True once the relay ended this device's session.
    pub fn is_ended(&self) -> bool {
        self.link == Link::Ended
    }

    /// When to feed [`SessionInput::Timeout`] next (ms on the driver's clock), if ever.
    pub fn next_wake(&self) -> Option<u64> {
        let link = match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Up { heard } if self.waiting() => Some(heard + SILENCE_MS),
            Link::Up { heard } => Some(heard + PROBE_AFTER_MS),
            Link::Connecting | Link::Ended => None,
        };
        let parked = self.parked.values().map(|(at, _)| *at).min();
        [link, self.resume_at, parked].into_iter().flatten().min()
    }

    fn waiting(&self) -> bool {
        self.sync.is_waiting() || !self.requests.is_empty()
    }

    /// Handles `input` at `now`: what the driver does itself, and the sync outputs for
    /// [`crate::Device::carry_out`], whose actions come back through [`SessionCore::actions`].
    pub fn handle(&mut self, now: u64, input: SessionInput) -> (Vec<Work>, Vec<SyncOutput>) {
        let mut work = Vec::new();
        let mut sync = Vec::new();
        match input {
            SessionInput::Connected if self.link == Link::Connecting => {
                self.link = Link::Up { heard: now };
                self.backoff_ms = BACKOFF_MIN_MS;
                self.failed_in_round = 0;
                sync = self.sync.handle(SyncInput::Connected);
            }
            // A stream opened after the session ended or was lost meanwhile: not ours.
            SessionInput::Connected => work.push(Work::Close),
            SessionInput::ConnectFailed(reason) if self.link == Link::Connecting => {
                self.addr = (self.addr + 1) % self.addrs;
                self.failed_in_round += 1;
                if self.failed_in_round < self.addrs {
                    // The next address of this round, at once.
                    self.link = Link::Down { retry_at: now };
                } else {
                    self.failed_in_round = 0;
                    self.down(now);
                }
                work.push(Work::Emit(Event::Disconnected { reason }));
            }
            SessionInput::ConnectFailed(_) => {}
            SessionInput::Lost(reason) => {
                if matches!(self.link, Link::Up { .. }) {
                    self.lost(now, reason, &mut work);
                }
            }
            SessionInput::Frame(frame) => {
                if let Link::Up { heard } = &mut self.link {
                    *heard = now;
                    sync = self.sync.handle(SyncInput::Frame(frame));
                }
            }
            SessionInput::Refresh => sync = self.sync.handle(SyncInput::Refresh),
            SessionInput::Timeout => {
                let late: Vec<u64> = self.parked.iter().filter(|(_, (at, _))| *at <= now).map(|(t, _)| *t).collect();
                for token in late {
                    self.parked.remove(&token);
                    work.push(Work::Unanswered { token });
                }
                if self.resume_at.is_some_and(|t| t <= now) {
                    self.resume_at = None;
                    sync = self.sync.handle(SyncInput::Resume);
                }
                match self.link {
                    Link::Down { retry_at } if retry_at <= now => {
                        self.link = Link::Connecting;
                        work.push(Work::Connect { addr: self.addr });
                    }
                    Link::Up { heard } if self.waiting() && now >= heard + SILENCE_MS => {
                        work.push(Work::Close);
                        self.lost(now, "the relay stopped answering".into(), &mut work);
                    }
                    Link::Up { heard } if !self.waiting() && now >= heard + PROBE_AFTER_MS => {
                        // Probed once per quiet spell: the answer (or silence) moves `heard` on.
                        self.link = Link::Up { heard: now };
                        sync.extend(self.sync.handle(SyncInput::Probe));
                    }
                    _ => {}
                }
            }
        }
        (work, sync)
    }

    /// Sends an app request: `make` builds its frame with the req id the relay answers to.
    /// Its answer comes as [`Work::Answer`] with `token`.
    pub fn request(&mut self, token: u64, make: impl FnOnce(ReqId) -> ClientFrame) -> Work {
        match self.try_request(token, |req| Ok::<_, std::convert::Infallible>(make(req))) {
            Ok(w) => w,
            Err(never) => match never {},
        }
    }

    /// [`SessionCore::request`] with a frame that may fail to be made: then nothing is sent
    /// and nothing waits.
    pub fn try_request<E>(
        &mut self,
        token: u64,
        make: impl FnOnce(ReqId) -> Result<ClientFrame, E>,
    ) -> Result<Work, E> {
        if !self.sync.is_connected() || self.requests.len() >= MAX_APP_REQUESTS {
            return Ok(Work::Unanswered { token });
        }
        let req = self.sync.next_req();
        let frame = make(req)?;
        self.requests.insert(req, token);
        Ok(Work::Send(frame))
    }

    /// Parks the app request `token` until the session is connected, or with `caught_up` until
    /// it is also caught up with the relay: then [`Work::Ready`] comes (at once if it is now),
    /// or after [`PARK_MS`] [`Work::Unanswered`].
    pub fn park(&mut self, now: u64, token: u64, caught_up: bool) -> Vec<Work> {
        if self.link == Link::Ended {
            return vec![Work::Unanswered { token }];
        }
        self.parked.insert(token, (now + PARK_MS, caught_up));
        let mut work = Vec::new();
        self.release(&mut work);
        work
    }

    fn release(&mut self, work: &mut Vec<Work>) {
        if !matches!(self.link, Link::Up { .. }) || !self.sync.is_connected() || self.parked.is_empty() {
            return;
        }
        // What must see everything the relay has also waits for the device's own key work.
        let caught_up = self.sync.is_caught_up() && !self.sync.key_work_pending();
        let ready: Vec<u64> = self.parked.iter().filter(|(_, (_, c))| caught_up || !c).map(|(t, _)| *t).collect();
        for token in ready {
            self.parked.remove(&token);
            work.push(Work::Ready { token });
        }
    }

    /// Turns what [`crate::Device::carry_out`] asked for into work for the driver, and tells
    /// the app of changes in the session's state.
    pub fn actions(&mut self, now: u64, actions: Vec<Action>) -> Vec<Work> {
        let mut work = Vec::new();
        for action in actions {
            match action {
                Action::Send(frame) => work.push(Work::Send(frame)),
                Action::Emit(
                    event @ (Event::SessionRevoked | Event::SessionRefused | Event::VersionRefused { .. }),
                ) => {
                    if matches!(self.link, Link::Up { .. }) {
                        work.push(Work::Close);
                    }
                    self.link = Link::Ended;
                    self.resume_at = None;
                    work.extend(self.unanswered());
                    work.extend(std::mem::take(&mut self.parked).into_keys().map(|token| Work::Unanswered { token }));
                    work.push(Work::Emit(event));
                }
                Action::Emit(event) => work.push(Work::Emit(event)),
                Action::RetryAfter(ms) => self.resume_at = Some(now + u64::from(ms)),
                Action::Reply(frame) => match frame.req().and_then(|r| self.requests.remove(&r)) {
                    Some(token) => work.push(Work::Answer { token, frame }),
                    None => tracing::debug!(?frame, "a reply nobody waits for"),
                },
            }
        }
        self.show(&mut work);
        self.release(&mut work);
        work
    }

    fn show(&mut self, work: &mut Vec<Work>) {
        let connected = self.sync.is_connected();
        let caught_up = self.sync.is_caught_up();
        let idle = self.sync.is_idle();
        if connected && !self.shown.connected {
            work.push(Work::Emit(Event::Connected));
        }
        if caught_up && !self.shown.caught_up {
            work.push(Work::Emit(Event::CaughtUp));
        }
        if idle && !self.shown.idle {
            work.push(Work::Emit(Event::Idle));
        }
        self.shown = Shown { connected, caught_up, idle };
    }

    fn down(&mut self, now: u64) {
        let jitter = self.rng.gen_range(0..=self.backoff_ms / 4);
        self.link = Link::Down { retry_at: now + self.backoff_ms + jitter };
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    fn lost(&mut self, now: u64, reason: String, work: &mut Vec<Work>) {
        // The sync core's Disconnected has no outputs: it forgets what waited on the stream.
        let _ = self.sync.handle(SyncInput::Disconnected);
        self.failed_in_round = 0;
        self.down(now);
        work.extend(self.unanswered());
        self.shown = Shown::default();
        work.push(Work::Emit(Event::Disconnected { reason }));
    }

    fn unanswered(&mut self) -> Vec<Work> {
        std::mem::take(&mut self.requests).into_values().map(|token| Work::Unanswered { token }).collect()
    }
}

#[cfg(test)]
#[path = "session_core_tests.rs"]
mod tests;
