//! Secret chats over peer links, without I/O: the device stays reachable for other devices,
//! answers every secret stream opened to it, and opens one to the peer of each chat with
//! something waiting, retrying with backoff until it is delivered. Links stay up while both
//! devices run. [`PeerLinks`] holds the link rules; this adds what a secret chat needs: one
//! [`SecretConn`] (the chat's sans-IO protocol) per stream, which chats have something waiting,
//! the offers told to the app, and the self-destruct timers.
//!
//! The session's driver (`session_secret.rs`) carries out the [`SecretOut`]s over the network and
//! reports what came of them; the secret-link simulator (`secret_links_sim.rs`) does the same
//! over a simulated network, so both run this code. Time (`now`) is milliseconds on the
//! driver's monotonic clock; message expiry uses the device's own clock.
//!
//! Bounds: [`MAX_CONNS`] streams at once, `MAX_OPENING` (32) of them opened by other devices
//! and not up yet, at most `MAX_DIALING` (16) being opened; a stream not up within
//! `OPENING_TIMEOUT` (10 s) is dropped; a stream whose frames the driver cannot queue (the peer does
//! not read) is dropped ([`SecretLinks::stream_full`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::device::drive::Event;
use crate::device::error::Error;
use crate::device::local::{Device, Ended, SecretConn, Step, OPENING_TIMEOUT};
use crate::device::peer_links::{Dialed, LinkLimits, LinkNo, LinkOut, PeerLinks};
use crate::device::store::SecretState;
use crate::proto::ids::{AccountId, DeviceId, SecretId};

/// Most secret streams at once (a live link stays up while both devices run).
pub const MAX_CONNS: usize = 1024;
/// Most secret streams other devices opened that are not up yet (each is dropped after
/// [`OPENING_TIMEOUT`]).
pub(crate) const MAX_OPENING: usize = 32;
/// Most streams being opened to other devices at once (the rest wait their turn).
pub(crate) const MAX_DIALING: usize = 16;
/// First wait before a chat's peer is dialed again; doubles up to [`RETRY_MAX_MS`].
const RETRY_MIN_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 300_000;
/// How long before a chat the peer has not accepted yet is offered again.
const PENDING_RETRY_MS: u64 = 300_000;
/// How long after failing to become reachable it is tried again.
const LISTEN_RETRY_MS: u64 = 5_000;
/// How long after failing to delete expired messages it is tried again.
const EXPIRE_RETRY_MS: i64 = 5_000;

/// The peer-link limits of secret chats.
pub(crate) fn limits() -> LinkLimits {
    LinkLimits {
        max_links: MAX_CONNS,
        max_opening: MAX_OPENING,
        max_dialing: MAX_DIALING,
        opening_timeout_ms: OPENING_TIMEOUT.as_millis() as u64,
        retry_min_ms: RETRY_MIN_MS,
        retry_max_ms: RETRY_MAX_MS,
        listen_retry_ms: LISTEN_RETRY_MS,
    }
}

/// What the driver is to do for the secret chats.
#[derive(Debug)]
pub enum SecretOut {
    /// Become reachable for other devices, then report [`SecretLinks::listened`].
    Listen,
    /// Open a stream to `peer` for `chat`, then report [`SecretLinks::dialed`].
    Dial { chat: SecretId, peer: DeviceId },
    /// Send these frames on the link, in order (if the stream cannot take them, report
    /// [`SecretLinks::stream_full`]).
    Send { link: LinkNo, frames: Vec<Vec<u8>> },
    /// Drop the link's stream (closing it).
    Close { link: LinkNo, reason: String },
    /// Tell the app.
    Emit(Event),
    /// Look `account`'s keys up on the relay, then report [`SecretLinks::looked_up`] for the
    /// link.
    Lookup { link: LinkNo, account: AccountId },
}

/// A device's secret chat links. See the module docs.
pub struct SecretLinks {
    links: PeerLinks<SecretId>,
    conns: BTreeMap<LinkNo, SecretConn>,
    /// Chats written in here since a link last had nothing more to carry.
    dirty: BTreeSet<SecretId>,
    /// When the next message disappears, on the device's clock (`None`: to be read again
    /// from the store).
    next_expiry: Option<Option<i64>>,
    /// Offers already told to the app.
    told: BTreeSet<SecretId>,
}

impl SecretLinks {
    /// The links of `device` at `now`: every chat with something for its peer is due at once.
    pub fn new(device: &Device, now: u64) -> Result<SecretLinks, Error> {
        let due = device.secret_chats_to_reach()?.into_iter().map(|(c, _)| c);
        Ok(SecretLinks {
            links: PeerLinks::new(limits(), now, due),
            conns: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_expiry: None,
            told: BTreeSet::new(),
        })
    }

    /// Streams open (up or not).
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// No stream is open.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The links that are up for `chat`.
    pub fn live(&self, chat: SecretId) -> Vec<LinkNo> {
        self.links.live(chat)
    }

    /// When [`SecretLinks::tick`] is next due on the driver's clock, if ever: `device_now` and
    /// `now` are the same instant on the device's clock and the driver's.
    pub fn next_wake(&mut self, device: &Device, now: u64) -> Option<u64> {
        let mut at = self.links.next_wake();
        if self.next_expiry.is_none() {
            self.next_expiry = Some(device.secret_next_expiry().unwrap_or(None));
        }
        if let Some(Some(ms)) = self.next_expiry {
            let t = now + (ms - device.now_ms()).max(0) as u64;
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    /// Runs what is due: listening, opening streams, dropping those that did not come up in
    /// time, the self-destruct timers.
    pub fn tick(&mut self, device: &mut Device, now: u64) -> Vec<SecretOut> {
        let mut outs = Vec::new();
        for o in self.links.tick(now) {
            self.link_out(device, now, o, &mut outs);
        }
        if self.next_expiry.is_some_and(|t| t.is_some_and(|ms| ms <= device.now_ms())) {
            self.next_expiry = None;
            match device.secret_expire() {
                Ok(gone) => outs.extend(
                    gone.into_iter().map(|(chat, message)| SecretOut::Emit(Event::SecretExpired { chat, message })),
                ),
                Err(e) => {
                    // Tried again in a while, not at once (the store may be full or broken).
                    self.next_expiry = Some(Some(device.now_ms() + EXPIRE_RETRY_MS));
                    outs.push(SecretOut::Emit(Event::Error { message: e.to_string() }));
                }
            }
        }
        outs
    }

    fn link_out(&mut self, device: &mut Device, now: u64, o: LinkOut<SecretId>, outs: &mut Vec<SecretOut>) {
        match o {
            LinkOut::Listen => outs.push(SecretOut::Listen),
            LinkOut::Dial(chat) => match device.secret_peer(chat) {
                Some(peer) => outs.push(SecretOut::Dial { chat, peer }),
                // The chat went: nothing to dial.
                None => {
                    self.links.dialed(now, chat, false);
                }
            },
            LinkOut::Close(link, reason) => self.drop_link(device, now, link, reason, outs),
        }
    }

    /// Reachability was sought (see [`SecretOut::Listen`]).
    pub fn listened(&mut self, now: u64, result: Result<(), String>) {
        if let Err(e) = &result {
            tracing::info!(error = %e, "not reachable for secret chats yet; retrying");
        }
        self.links.listened(now, result.is_ok());
    }

    /// The relay connection came (back) up: the circuit reservation went with the old one, so
    /// listen again (a no-op if it stands).
    pub fn relay_up(&mut self, now: u64) {
        self.links.reconnected(now);
    }

    /// A dial for `chat` ended. `Some(link)`: attach the stream as that link (the outputs hold
    /// its first frame); `None`: drop the stream, if any.
    pub fn dialed(
        &mut self,
        device: &mut Device,
        now: u64,
        chat: SecretId,
        result: Result<(), String>,
    ) -> (Option<LinkNo>, Vec<SecretOut>) {
        if let Err(e) = &result {
            tracing::debug!(%chat, error = %e, "the other device is not reachable");
        }
        match self.links.dialed(now, chat, result.is_ok()) {
            Dialed::Attach(link) => match device.secret_connect(chat) {
                Ok((conn, first)) => {
                    self.conns.insert(link, conn);
                    (Some(link), vec![SecretOut::Send { link, frames: vec![first] }])
                }
                Err(e) => {
                    tracing::debug!(%chat, error = %e, "the chat went while its stream opened");
                    self.links.closed(link);
                    (None, Vec::new())
                }
            },
            Dialed::Unneeded => (None, Vec::new()),
            Dialed::Failed => {
                self.retry_if_waiting(device, now, chat);
                (None, Vec::new())
            }
        }
    }

    /// The device `peer` (authenticated by the transport) opened a stream to this one. `Some`:
    /// attach it as that link; `None`: too many streams, drop it.
    pub fn incoming(&mut self, device: &Device, now: u64, peer: DeviceId) -> Option<LinkNo> {
        let Some(link) = self.links.incoming(now) else {
            tracing::info!(%peer, "too many secret streams; one dropped");
            return None;
        };
        self.conns.insert(link, device.secret_incoming(peer));
        Some(link)
    }

    /// A frame arrived on a link.
    pub fn frame(&mut self, device: &mut Device, now: u64, link: LinkNo, frame: &[u8]) -> Vec<SecretOut> {
        let Some(conn) = self.conns.get_mut(&link) else { return Vec::new() };
        let result = device.secret_step(conn, frame);
        self.stepped(device, now, link, result)
    }

    /// A link's stream ended (the other device closed it, or the transport broke).
    pub fn closed(&mut self, device: &mut Device, now: u64, link: LinkNo, why: &str) -> Vec<SecretOut> {
        let mut outs = Vec::new();
        self.drop_link(device, now, link, why.to_string(), &mut outs);
        // The stream is gone already: no close to carry out.
        outs.retain(|o| !matches!(o, SecretOut::Close { link: l, .. } if *l == link));
        outs
    }

    /// The driver could not queue a frame for the link: the other device does not read.
    pub fn stream_full(&mut self, device: &mut Device, now: u64, link: LinkNo) -> Vec<SecretOut> {
        let mut outs = Vec::new();
        self.drop_link(device, now, link, "the other device does not read".into(), &mut outs);
        outs
    }

    /// Goes on with the link whose opening waited for a lookup of its offering account's keys.
    pub fn looked_up(&mut self, device: &mut Device, now: u64, link: LinkNo) -> Vec<SecretOut> {
        let Some(conn) = self.conns.get_mut(&link) else { return Vec::new() };
        let result = device.secret_looked_up(conn);
        self.stepped(device, now, link, result)
    }

    /// This device wrote, read, started, accepted or closed in `chat`: a live link carries it
    /// now, else a stream is opened for it.
    pub fn touched(&mut self, device: &mut Device, now: u64, chat: SecretId) -> Vec<SecretOut> {
        self.next_expiry = None;
        self.dirty.insert(chat);
        let mut outs = Vec::new();
        for link in self.links.touched(now, chat) {
            let Some(conn) = self.conns.get_mut(&link) else { continue };
            match device.secret_conn_flush(conn) {
                Ok(frames) if frames.is_empty() => {}
                Ok(frames) => outs.push(SecretOut::Send { link, frames }),
                Err(e) => self.drop_link(device, now, link, e.to_string(), &mut outs),
            }
        }
        outs
    }

    fn stepped(
        &mut self,
        device: &mut Device,
        now: u64,
        link: LinkNo,
        result: Result<(Vec<Vec<u8>>, Step), Error>,
    ) -> Vec<SecretOut> {
        let mut outs = Vec::new();
        let (frames, step) = match result {
            Ok(r) => r,
            Err(e) => {
                self.drop_link(device, now, link, e.to_string(), &mut outs);
                return outs;
            }
        };
        let Some(conn) = self.conns.get(&link) else { return outs };
        let (opened_here, named) = (conn.opened_here(), conn.chat());
        if let Some(chat) = named {
            self.links.named(link, chat);
        }
        let settled = device.secret_conn_settled(conn);
        // Sent first: an answer goes out before its stream is dropped below.
        if !frames.is_empty() {
            outs.push(SecretOut::Send { link, frames });
        }
        match step {
            Step::Continue => {}
            Step::Lookup(account) => outs.push(SecretOut::Lookup { link, account }),
            Step::Up(chat) => {
                self.next_expiry = None;
                let mine_wins = device.secret_peer(chat).is_some_and(|peer| *device.id() < peer);
                for o in self.links.up(now, link, chat, mine_wins) {
                    self.link_out(device, now, o, &mut outs);
                }
                outs.push(SecretOut::Emit(Event::SecretLinked { chat }));
            }
            Step::Update(update) => {
                let chat = named.expect("a live link names its chat");
                self.next_expiry = None;
                if settled {
                    self.dirty.remove(&chat);
                }
                outs.extend(
                    update.added.into_iter().map(|message| SecretOut::Emit(Event::SecretMessage { chat, message })),
                );
                if update.closed {
                    self.end_link(link, "the chat was closed", &mut outs);
                    self.forget(chat);
                    outs.push(SecretOut::Emit(Event::SecretClosed { chat }));
                }
            }
            Step::Ended(Ended::Pending(chat)) => {
                self.end_link(link, "the chat waits for the other device's user", &mut outs);
                if opened_here {
                    // Closed here while the opening was under way: tell the other device now.
                    let closing = device.secret_state(chat) == Some(SecretState::Closing);
                    let wait = if closing { 0 } else { PENDING_RETRY_MS };
                    self.links.retry_at(now + wait, chat);
                } else if let (true, Some(from)) = (self.told.insert(chat), device.secret_offer(chat)) {
                    outs.push(SecretOut::Emit(Event::SecretOffered { chat, from: Box::new(from) }));
                }
            }
            Step::Ended(Ended::Gone(chat)) => {
                self.end_link(link, "the chat is gone", &mut outs);
                self.forget(chat);
                outs.push(SecretOut::Emit(Event::SecretClosed { chat }));
            }
        }
        outs
    }

    /// Ends a link for good (its chat's fate is decided by the caller): no retry.
    fn end_link(&mut self, link: LinkNo, why: &str, outs: &mut Vec<SecretOut>) {
        if self.conns.remove(&link).is_some() {
            self.links.closed(link);
            outs.push(SecretOut::Close { link, reason: why.to_string() });
        }
    }

    /// Drops a link (closing its stream); a chat with something waiting is tried again later.
    fn drop_link(&mut self, device: &Device, now: u64, link: LinkNo, why: String, outs: &mut Vec<SecretOut>) {
        let Some(conn) = self.conns.remove(&link) else { return };
        tracing::debug!(link, peer = %conn.peer(), reason = %why, "secret stream ended");
        outs.push(SecretOut::Close { link, reason: why });
        if let Some(chat) = self.links.closed(link) {
            self.retry_if_waiting(device, now, chat);
        }
    }

    /// Tries `chat` again later if it has something for the other device.
    fn retry_if_waiting(&mut self, device: &Device, now: u64, chat: SecretId) {
        if self.dirty.contains(&chat) || device.secret_waiting(chat).unwrap_or(false) {
            self.links.retry(now, chat);
        }
    }

    fn forget(&mut self, chat: SecretId) {
        self.links.forget(chat);
        self.dirty.remove(&chat);
        self.told.remove(&chat);
        self.next_expiry = None;
    }
}
