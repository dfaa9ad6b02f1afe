//! Peer links, without I/O: the bookkeeping and rules of a device's direct streams to other
//! devices, whatever they carry. Secret chats run over it now ([`crate::device::secret_links`]);
//! a user's own devices syncing directly will too. A link is for a *target* `K` (a secret
//! chat, a device): the layer above says which targets have something to carry, and this
//! decides when to become reachable, which targets to dial and when to retry, how many streams
//! may be open or opening, when an opening stream has taken too long, and which of two links
//! for one target stays.
//!
//! Time is milliseconds on the driver's monotonic clock, passed in. The driver carries out
//! [`LinkOut`]s (listen, dial) and reports what came of them; it keeps nothing but the streams
//! themselves. The session runs this over its network stack; the secret-link simulator runs it
//! over a simulated network.
//!
//! ```
//! use stratus_engine::peer_links::{Dialed, LinkLimits, LinkOut, PeerLinks};
//!
//! let limits = LinkLimits {
//!     max_links: 64, max_opening: 8, max_dialing: 4, opening_timeout_ms: 10_000,
//!     retry_min_ms: 1_000, retry_max_ms: 300_000, listen_retry_ms: 5_000,
//! };
//! // Targets are whatever the layer above links for: here device numbers. Device 7 has
//! // something waiting at time 0.
//! let mut links = PeerLinks::new(limits, 0, [7u32]);
//! assert_eq!(links.tick(0), vec![LinkOut::Listen]); // reachable first
//! links.listened(20, true);
//! assert_eq!(links.tick(20), vec![LinkOut::Dial(7)]);
//! // The dial failed: tried again after the backoff, which doubles each time.
//! assert_eq!(links.dialed(90, 7, false), Dialed::Failed);
//! links.retry(90, 7);
//! assert_eq!(links.next_wake(), Some(1_090));
//! assert_eq!(links.tick(1_090), vec![LinkOut::Dial(7)]);
//! let Dialed::Attach(link) = links.dialed(1_100, 7, true) else { unreachable!() };
//! assert!(links.up(1_150, link, 7, true).is_empty()); // no second link to close
//! assert_eq!(links.live(7), vec![link]);
//! ```

use std::collections::{BTreeMap, BTreeSet};

/// A stream's number, given by [`PeerLinks`] when it admits one.
pub type LinkNo = u64;

/// The bounds and timers of a device's peer links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLimits {
    /// Most streams at once (a live link stays up while both devices run).
    pub max_links: usize,
    /// Most streams opened by other devices and not up yet (more are refused).
    pub max_opening: usize,
    /// Most streams being dialed at once (other due targets wait their turn).
    pub max_dialing: usize,
    /// How long a stream may take to come up before it is dropped.
    pub opening_timeout_ms: u64,
    /// First wait before a target is dialed again; it doubles up to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest wait between two dials of a target.
    pub retry_max_ms: u64,
    /// How long after failing to become reachable it is tried again.
    pub listen_retry_ms: u64,
}

/// What the driver is to do for the peer links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOut<K> {
    /// Become reachable for other devices (a circuit reservation, a listener), then report
    /// [`PeerLinks::listened`].
    Listen,
    /// Open a stream for `K`, then report [`PeerLinks::dialed`].
    Dial(K),
    /// Drop this stream (closing it) for the reason given.
    Close(LinkNo, String),
}

/// What became of a dial ([`PeerLinks::dialed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialed {
    /// The stream is admitted as this link: attach it and send the opening.
    Attach(LinkNo),
    /// Not needed (the target has a link already): drop the stream.
    Unneeded,
    /// Not admitted now (too many links, or the dial failed): the target is retried later if
    /// the layer above says it has something waiting ([`PeerLinks::retry`]).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listen {
    /// Not yet (or again after a failure) at this time.
    At(u64),
    Trying,
    Up,
}

#[derive(Debug, Clone)]
struct Link<K> {
    /// What it is for; an incoming stream names it when its opening arrives.
    target: Option<K>,
    opened_here: bool,
    /// Until the link is up: when it is dropped.
    deadline: Option<u64>,
    /// Since when the link is up.
    up_since: Option<u64>,
}

/// A device's peer links. See the module docs.
#[derive(Debug)]
pub struct PeerLinks<K> {
    limits: LinkLimits,
    listen: Listen,
    links: BTreeMap<LinkNo, Link<K>>,
    next: LinkNo,
    /// Targets to dial, and from when.
    due: BTreeMap<K, u64>,
    /// The wait before each target's next retry.
    backoff: BTreeMap<K, u64>,
    dialing: BTreeSet<K>,
}

impl<K: Ord + Copy + std::fmt::Debug> PeerLinks<K> {
    /// Links at `now` for a device with something for each of `due`; reachability is sought
    /// at once.
    pub fn new(limits: LinkLimits, now: u64, due: impl IntoIterator<Item = K>) -> Self {
        PeerLinks {
            limits,
            listen: Listen::At(now),
            links: BTreeMap::new(),
            next: 0,
            due: due.into_iter().map(|k| (k, now)).collect(),
            backoff: BTreeMap::new(),
            dialing: BTreeSet::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &LinkLimits {
        &self.limits
    }

    /// Streams open (up or not).
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// No stream is open.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Whether the device is reachable for other devices.
    pub fn is_listening(&self) -> bool {
        self.listen == Listen::Up
    }

    /// What a link is for, if known.
    pub fn target(&self, no: LinkNo) -> Option<K> {
        self.links.get(&no)?.target
    }

    /// Whether a link is up.
    pub fn is_up(&self, no: LinkNo) -> bool {
        self.links.get(&no).is_some_and(|l| l.up_since.is_some())
    }

    /// Whether this device opened the link.
    pub fn opened_here(&self, no: LinkNo) -> bool {
        self.links.get(&no).is_some_and(|l| l.opened_here)
    }

    /// The links that are up for `target`.
    pub fn live(&self, target: K) -> Vec<LinkNo> {
        self.links.iter().filter(|(_, l)| l.target == Some(target) && l.up_since.is_some()).map(|(n, _)| *n).collect()
    }

    /// Every link's number.
    pub fn links(&self) -> Vec<LinkNo> {
        self.links.keys().copied().collect()
    }

    /// Whether a target is waiting to be dialed (or being dialed).
    pub fn is_due(&self, target: K) -> bool {
        self.due.contains_key(&target) || self.dialing.contains(&target)
    }

    /// When [`PeerLinks::tick`] next has something to do, if ever.
    pub fn next_wake(&self) -> Option<u64> {
        let mut at: Option<u64> = None;
        let mut take = |t: u64| at = Some(at.map_or(t, |a| a.min(t)));
        if let Listen::At(t) = self.listen {
            take(t);
        }
        if self.listen != Listen::Trying && self.dialing.len() < self.limits.max_dialing {
            if let Some(t) = self.due.iter().filter(|(k, _)| !self.dialing.contains(k)).map(|(_, t)| *t).min() {
                take(t);
            }
        }
        if let Some(t) = self.links.values().filter_map(|l| l.deadline).min() {
            take(t);
        }
        at
    }

    /// Runs what is due at `now`: seeking reachability, dialing due targets (not while
    /// reachability is being sought: a dial then reuses its port), dropping streams that did not
    /// come up in time. A dropped stream's target is reported by [`PeerLinks::closed`] as usual.
    pub fn tick(&mut self, now: u64) -> Vec<LinkOut<K>> {
        let mut out = Vec::new();
        if matches!(self.listen, Listen::At(t) if t <= now) {
            self.listen = Listen::Trying;
            out.push(LinkOut::Listen);
        }
        let late: Vec<LinkNo> =
            self.links.iter().filter(|(_, l)| l.deadline.is_some_and(|d| d <= now)).map(|(n, _)| *n).collect();
        for no in late {
            out.push(LinkOut::Close(no, "the other device did not answer in time".into()));
        }
        if self.listen != Listen::Trying {
            let ready: Vec<K> =
                self.due.iter().filter(|(k, t)| **t <= now && !self.dialing.contains(k)).map(|(k, _)| *k).collect();
            for target in ready {
                if self.dialing.len() >= self.limits.max_dialing {
                    break;
                }
                self.due.remove(&target);
                if self.links.values().any(|l| l.target == Some(target)) {
                    continue;
                }
                self.dialing.insert(target);
                out.push(LinkOut::Dial(target));
            }
        }
        out
    }

    /// Reachability was sought: up, or tried again after [`LinkLimits::listen_retry_ms`].
    pub fn listened(&mut self, now: u64, ok: bool) {
        self.listen = match ok {
            true => Listen::Up,
            false => Listen::At(now + self.limits.listen_retry_ms),
        };
    }

    /// The connection that made the device reachable came back: seek reachability again (its
    /// reservation went with the old one).
    pub fn reconnected(&mut self, now: u64) {
        if self.listen == Listen::Up {
            self.listen = Listen::At(now);
        }
    }

    /// A dial for `target` ended, opened (`ok`) or not.
    pub fn dialed(&mut self, now: u64, target: K, ok: bool) -> Dialed {
        self.dialing.remove(&target);
        if !ok {
            return Dialed::Failed;
        }
        if self.links.values().any(|l| l.target == Some(target)) {
            return Dialed::Unneeded;
        }
        if self.links.len() >= self.limits.max_links {
            return Dialed::Failed;
        }
        Dialed::Attach(self.add(now, Some(target), true))
    }

    /// Another device opened a stream to this one: admitted as a link, or refused (drop it) when
    /// there are too many streams or too many not up yet.
    pub fn incoming(&mut self, now: u64) -> Option<LinkNo> {
        let opening = self.links.values().filter(|l| !l.opened_here && l.up_since.is_none()).count();
        if self.links.len() >= self.limits.max_links || opening >= self.limits.max_opening {
            return None;
        }
        Some(self.add(now, None, false))
    }

    fn add(&mut self, now: u64, target: Option<K>, opened_here: bool) -> LinkNo {
        let no = self.next;
        self.next += 1;
        let deadline = Some(now + self.limits.opening_timeout_ms);
        self.links.insert(no, Link { target, opened_here, deadline, up_since: None });
        no
    }

    /// An incoming link's opening named its target.
    pub fn named(&mut self, no: LinkNo, target: K) {
        if let Some(l) = self.links.get_mut(&no) {
            l.target = Some(target);
        }
    }

    /// A link came up for `target`. If another link for it is up too, one goes, the same one on
    /// both devices: when both came up within the opening timeout (both devices dialed at
    /// once) the one opened by the device for which `mine_wins` holds stays (the other device
    /// is told the opposite); otherwise the older link is one the other device no longer has (a
    /// device dials only a target without a link) and the newest stays. Returns the links to
    /// close.
    pub fn up(&mut self, now: u64, no: LinkNo, target: K, mine_wins: bool) -> Vec<LinkOut<K>> {
        let Some(l) = self.links.get_mut(&no) else { return Vec::new() };
        l.target = Some(target);
        l.deadline = None;
        l.up_since = Some(now);
        self.backoff.remove(&target);
        self.due.remove(&target);
        let up: Vec<(LinkNo, bool, u64)> = self
            .links
            .iter()
            .filter(|(_, l)| l.target == Some(target))
            .filter_map(|(n, l)| Some((*n, l.opened_here, l.up_since?)))
            .collect();
        let newest = up.iter().map(|(_, _, t)| *t).max().unwrap_or(now);
        let fresh: Vec<&(LinkNo, bool, u64)> =
            up.iter().filter(|(_, _, t)| newest - *t < self.limits.opening_timeout_ms).collect();
        let keep = fresh
            .iter()
            .filter(|(_, here, _)| *here == mine_wins)
            .map(|(n, _, _)| *n)
            .max()
            .or_else(|| fresh.iter().map(|(n, _, _)| *n).max());
        up.iter()
            .filter(|(n, _, _)| Some(*n) != keep)
            .map(|(n, _, _)| LinkOut::Close(*n, "another link carries the same chat".into()))
            .collect()
    }

    /// A link is gone (closed by either side or dropped here). Returns its target when no other
    /// link is left for it: the layer above then [`PeerLinks::retry`]s it if it has something
    /// waiting.
    pub fn closed(&mut self, no: LinkNo) -> Option<K> {
        let target = self.links.remove(&no)?.target?;
        (!self.links.values().any(|l| l.target == Some(target))).then_some(target)
    }

    /// `target` has something new to carry: dial it now unless a link is up for it (the caller
    /// hands the news to the live links). Its backoff starts again.
    pub fn touched(&mut self, now: u64, target: K) -> Vec<LinkNo> {
        self.backoff.remove(&target);
        let live = self.live(target);
        if live.is_empty() && !self.dialing.contains(&target) {
            self.due.insert(target, now);
        }
        live
    }

    /// Dials `target` again after its backoff (doubling each time, up to the limit).
    pub fn retry(&mut self, now: u64, target: K) {
        let wait = self.backoff.get(&target).copied().unwrap_or(self.limits.retry_min_ms);
        self.backoff.insert(target, (wait * 2).min(self.limits.retry_max_ms));
        self.due.insert(target, now + wait);
    }

    /// Dials `target` again at `at` (an answer said to wait), not sooner.
    pub fn retry_at(&mut self, at: u64, target: K) {
        self.due.insert(target, at);
    }

    /// Nothing is to be dialed for `target` any more (it ended).
    pub fn forget(&mut self, target: K) {
        self.due.remove(&target);
        self.backoff.remove(&target);
    }
}

#[cfg(test)]
#[path = "peer_links_tests.rs"]
mod tests;
