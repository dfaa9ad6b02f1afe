//! The secret chats of a [`crate::Session`]: the device stays reachable for other devices (a
//! circuit reservation on the relay, and a TCP listener for direct connections), answers every
//! secret stream opened to it, and opens one to the peer of each chat with something waiting,
//! retrying with backoff until it is delivered. Links stay up while both devices run.
//!
//! The session task owns the device, so every secret stream has a small pump task that moves
//! its frames to and from the session; the session feeds them to the stream's [`SecretConn`]
//! (sans-IO) one at a time. Nothing here awaits the network in the session task itself, so a
//! slow or hostile peer holds up only its own stream.
//!
//! Bounds: [`MAX_CONNS`] streams at once, [`MAX_OPENING`] of them opened by other devices and not
//! up yet (more opened to this device are dropped), each with
//! [`CONN_QUEUE`] frames waiting to go out (a peer that does not read loses its stream); a stream
//! not up within [`OPENING_TIMEOUT`] is dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::device::drive::Event;
use crate::device::error::Error;
use crate::device::local::{Device, Ended, SecretConn, Step, OPENING_TIMEOUT};
use crate::device::net::{NetError, NetHandle, SecretStream};
use crate::device::store::SecretState;
use crate::proto::ids::{AccountId, DeviceId, SecretId};

/// Most secret streams at once (a live link stays up while both devices run).
pub const MAX_CONNS: usize = 1024;
/// Most secret streams other devices opened that are not up yet (each is dropped after
/// [`OPENING_TIMEOUT`]).
pub(crate) const MAX_OPENING: usize = 32;
/// How long a session's start waits for its circuit reservation.
pub(crate) const LISTEN_FIRST_WAIT: Duration = Duration::from_secs(5);
/// Most streams being opened to other devices at once (the rest wait their turn).
pub(crate) const MAX_DIALING: usize = 16;
/// Frames waiting to go out on one stream.
pub const CONN_QUEUE: usize = 256;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long before a chat the peer has not accepted yet is offered again.
const PENDING_RETRY: Duration = Duration::from_secs(300);

/// What the pump and dial tasks tell the session.
pub(super) enum HubEvent {
    Listened(Result<(), String>),
    Dialed { chat: SecretId, result: Result<SecretStream, String> },
    Frame(u64, Vec<u8>),
    Closed(u64, Option<String>),
}

/// What the session task waits for on the hub's behalf.
pub(super) enum Input {
    Event(HubEvent),
    Incoming(PeerId, libp2p::Stream),
}

/// What the session is to do for the hub.
#[derive(Debug)]
pub(super) enum HubOut {
    Emit(Event),
    /// Look `account`'s keys up on the relay, then call [`SecretHub::looked_up`] for `conn`.
    Lookup {
        conn: u64,
        account: AccountId,
    },
}

enum Listen {
    /// Not yet (or again after a failure) at this time.
    At(Instant),
    Trying,
    Up,
}

struct Conn {
    conn: SecretConn,
    out: mpsc::Sender<Vec<u8>>,
    /// Until the link is up: when it is dropped.
    deadline: Option<Instant>,
    /// Since when the link is up.
    up_since: Option<Instant>,
}

pub(super) struct SecretHub {
    net: NetHandle,
    relay: String,
    tcp: Option<Multiaddr>,
    incoming: libp2p_stream::IncomingStreams,
    tx: mpsc::Sender<HubEvent>,
    rx: mpsc::Receiver<HubEvent>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Chats to open a stream for, and when.
    due: BTreeMap<SecretId, Instant>,
    backoff: HashMap<SecretId, Duration>,
    dialing: BTreeSet<SecretId>,
    /// Chats written in here since a link last had nothing more to carry.
    dirty: BTreeSet<SecretId>,
    listen: Listen,
    /// When the next message disappears (`None`: to be read again from the store).
    next_expiry: Option<Option<i64>>,
    /// Offers already told to the app.
    told: BTreeSet<SecretId>,
}

impl SecretHub {
    pub(super) fn new(
        net: NetHandle,
        relay: String,
        tcp: Option<Multiaddr>,
        device: &Device,
    ) -> Result<SecretHub, Error> {
        let mut net = net;
        let incoming = net.accept_secret()?;
        let (tx, rx) = mpsc::channel(64);
        let now = Instant::now();
        let due = device.secret_chats_to_reach()?.into_iter().map(|(c, _)| (c, now)).collect();
        Ok(SecretHub {
            net,
            relay,
            tcp,
            incoming,
            tx,
            rx,
            conns: HashMap::new(),
            next_conn: 0,
            due,
            backoff: HashMap::new(),
            dialing: BTreeSet::new(),
            dirty: BTreeSet::new(),
            listen: Listen::At(now),
            next_expiry: None,
            told: BTreeSet::new(),
        })
    }

    /// Listens now (before the session first dials the relay, so that the relay connection
    /// reuses the listening port and DCUtR punches holes to it). Waits at most
    /// [`LISTEN_FIRST_WAIT`] for the relay's reservation; if it is slower, sync starts and the
    /// listening is asked for again (a no-op once it stands).
    pub(super) async fn listen_first(&mut self) {
        let listen = self.net.listen_secret(self.tcp.clone(), &self.relay);
        let r = match tokio::time::timeout(LISTEN_FIRST_WAIT, listen).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the relay has not granted the reservation yet".into()),
        };
        self.listened(r);
    }

    fn listened(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.listen = Listen::Up,
            Err(e) => {
                tracing::info!(error = %e, "not reachable for secret chats yet; retrying");
                self.listen = Listen::At(Instant::now() + Duration::from_secs(5));
            }
        }
    }

    /// The next thing to handle (cancel safe).
    pub(super) async fn recv(&mut self) -> Input {
        tokio::select! {
            e = self.rx.recv() => Input::Event(e.expect("the hub holds a sender")),
            s = self.incoming.next() => match s {
                Some((peer, stream)) => Input::Incoming(peer, stream),
                None => std::future::pending().await,
            },
        }
    }

    /// When [`SecretHub::tick`] is due.
    pub(super) fn wake_at(&mut self, device: &Device) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut at = far;
        if let Listen::At(t) = self.listen {
            at = at.min(t);
        }
        if matches!(self.listen, Listen::Up | Listen::At(_)) && self.dialing.len() < MAX_DIALING {
            if let Some(t) = self.due.iter().filter(|(c, _)| !self.dialing.contains(c)).map(|(_, t)| *t).min() {
                at = at.min(t);
            }
        }
        if let Some(t) = self.conns.values().filter_map(|c| c.deadline).min() {
            at = at.min(t);
        }
        if self.next_expiry.is_none() {
            self.next_expiry = Some(device.secret_next_expiry().unwrap_or(None));
        }
        if let Some(Some(ms)) = self.next_expiry {
            let wait = (ms - device.now_ms()).max(0) as u64;
            at = at.min(Instant::now() + Duration::from_millis(wait));
        }
        at
    }

    /// Runs what is due: listening, opening streams, dropping those that did not come up in
    /// time, the self-destruct timers.
    pub(super) fn tick(&mut self, device: &mut Device) -> Vec<HubOut> {
        let now = Instant::now();
        let mut outs = Vec::new();
        if matches!(self.listen, Listen::At(t) if t <= now) {
            self.listen = Listen::Trying;
            let (mut net, relay, tcp, tx) = (self.net.clone(), self.relay.clone(), self.tcp.clone(), self.tx.clone());
            tokio::spawn(async move {
                let r = net.listen_secret(tcp, &relay).await.map_err(|e| e.to_string());
                let _ = tx.send(HubEvent::Listened(r)).await;
            });
        }
        let late: Vec<u64> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(n, _)| *n).collect();
        for no in late {
            self.drop_conn(device, no, "the other device did not answer in time");
        }
        if !matches!(self.listen, Listen::Trying) {
            let ready: Vec<SecretId> =
                self.due.iter().filter(|(c, t)| **t <= now && !self.dialing.contains(c)).map(|(c, _)| *c).collect();
            for chat in ready {
                if self.dialing.len() >= MAX_DIALING {
                    break;
                }
                self.dial(device, chat);
            }
        }
        if self.next_expiry.is_some_and(|t| t.is_some_and(|ms| ms <= device.now_ms())) {
            self.next_expiry = None;
            match device.secret_expire() {
                Ok(gone) => outs.extend(
                    gone.into_iter().map(|(chat, message)| HubOut::Emit(Event::SecretExpired { chat, message })),
                ),
                Err(e) => {
                    // Tried again in a while, not at once (the store may be full or broken).
                    self.next_expiry = Some(Some(device.now_ms() + 5_000));
                    outs.push(HubOut::Emit(Event::Error { message: e.to_string() }));
                }
            }
        }
        outs
    }

    /// Opens a stream for `chat` unless one is open or being opened.
    fn dial(&mut self, device: &Device, chat: SecretId) {
        self.due.remove(&chat);
        if self.conns.values().any(|c| c.conn.chat() == Some(chat)) {
            return;
        }
        let Some(peer) = device.secret_peer(chat) else { return };
        let Ok(p) = peer.0.parse::<PeerId>() else { return };
        self.dialing.insert(chat);
        let (mut net, relay, tx) = (self.net.clone(), self.relay.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = async {
                net.connect_peer(p, &relay).await?;
                net.open_secret(p).await
            }
            .await
            .map_err(|e| e.to_string());
            let _ = tx.send(HubEvent::Dialed { chat, result }).await;
        });
    }

    /// Handles what a task or another device brought.
    pub(super) fn handle(&mut self, device: &mut Device, input: Input) -> Vec<HubOut> {
        match input {
            Input::Incoming(peer, stream) => {
                let opening = self.conns.values().filter(|c| !c.conn.opened_here() && c.up_since.is_none()).count();
                if self.conns.len() >= MAX_CONNS || opening >= MAX_OPENING {
                    tracing::info!(%peer, "too many secret streams; one dropped");
                    return Vec::new();
                }
                let conn = device.secret_incoming(DeviceId(peer.to_string()));
                self.add_conn(conn, SecretStream::from(stream), Vec::new());
                Vec::new()
            }
            Input::Event(HubEvent::Listened(r)) => {
                self.listened(r);
                Vec::new()
            }
            Input::Event(HubEvent::Dialed { chat, result }) => {
                self.dialing.remove(&chat);
                let stream = match result {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%chat, error = %e, "the other device is not reachable");
                        self.retry_if_waiting(device, chat);
                        return Vec::new();
                    }
                };
                if self.conns.values().any(|c| c.conn.chat() == Some(chat)) {
                    return Vec::new();
                }
                if self.conns.len() >= MAX_CONNS {
                    self.retry(chat);
                    return Vec::new();
                }
                match device.secret_connect(chat) {
                    Ok((conn, first)) => self.add_conn(conn, stream, vec![first]),
                    Err(e) => tracing::debug!(%chat, error = %e, "the chat went while its stream opened"),
                }
                Vec::new()
            }
            Input::Event(HubEvent::Frame(no, frame)) => {
                let Some(c) = self.conns.get_mut(&no) else { return Vec::new() };
                let result = device.secret_step(&mut c.conn, &frame);
                self.stepped(device, no, result)
            }
            Input::Event(HubEvent::Closed(no, why)) => {
                self.drop_conn(device, no, why.as_deref().unwrap_or("the other device closed the stream"));
                Vec::new()
            }
        }
    }

    /// Goes on with the conn that waited for a lookup of its offering account's keys.
    pub(super) fn looked_up(&mut self, device: &mut Device, no: u64) -> Vec<HubOut> {
        let Some(c) = self.conns.get_mut(&no) else { return Vec::new() };
        let result = device.secret_looked_up(&mut c.conn);
        self.stepped(device, no, result)
    }

    /// This device wrote, read, started, accepted or closed in `chat`: a live link carries it
    /// now, else a stream is opened for it.
    pub(super) fn touched(&mut self, device: &mut Device, chat: SecretId) {
        self.next_expiry = None;
        self.dirty.insert(chat);
        self.backoff.remove(&chat);
        let live: Vec<u64> =
            self.conns.iter().filter(|(_, c)| c.conn.is_up() && c.conn.chat() == Some(chat)).map(|(n, _)| *n).collect();
        if live.is_empty() {
            self.due.insert(chat, Instant::now());
        }
        for no in live {
            let c = self.conns.get_mut(&no).expect("listed above");
            let result = device.secret_conn_flush(&mut c.conn);
            match result {
                Ok(out) => self.send(device, no, out),
                Err(e) => self.drop_conn(device, no, &e.to_string()),
            }
        }
    }

    fn stepped(&mut self, device: &mut Device, no: u64, result: Result<(Vec<Vec<u8>>, Step), Error>) -> Vec<HubOut> {
        let (out, step) = match result {
            Ok(r) => r,
            Err(e) => {
                self.drop_conn(device, no, &e.to_string());
                return Vec::new();
            }
        };
        let Some(c) = self.conns.get_mut(&no) else { return Vec::new() };
        let (opened_here, named) = (c.conn.opened_here(), c.conn.chat());
        let settled = device.secret_conn_settled(&c.conn);
        // Sent first (an answer goes out before its stream is dropped below); if the stream
        // cannot take it, it is dropped, and what the step did is still handled.
        self.send(device, no, out);
        let mut outs = Vec::new();
        match step {
            Step::Continue => {}
            Step::Lookup(account) => outs.push(HubOut::Lookup { conn: no, account }),
            Step::Up(chat) => {
                if let Some(c) = self.conns.get_mut(&no) {
                    c.deadline = None;
                    c.up_since = Some(Instant::now());
                }
                self.next_expiry = None;
                self.backoff.remove(&chat);
                self.due.remove(&chat);
                outs.push(HubOut::Emit(Event::SecretLinked { chat }));
                self.keep_one(device, chat);
            }
            Step::Update(update) => {
                let chat = named.expect("a live link names its chat");
                self.next_expiry = None;
                if settled {
                    self.dirty.remove(&chat);
                }
                outs.extend(
                    update.added.into_iter().map(|message| HubOut::Emit(Event::SecretMessage { chat, message })),
                );
                if update.closed {
                    self.conns.remove(&no);
                    self.forget(chat);
                    outs.push(HubOut::Emit(Event::SecretClosed { chat }));
                }
            }
            Step::Ended(Ended::Pending(chat)) => {
                self.conns.remove(&no);
                if opened_here {
                    // Closed here while the opening was under way: tell the other device now.
                    let closing = device.secret_state(chat) == Some(SecretState::Closing);
                    let wait = if closing { Duration::ZERO } else { PENDING_RETRY };
                    self.due.insert(chat, Instant::now() + wait);
                } else if let (true, Some(from)) = (self.told.insert(chat), device.secret_offer(chat)) {
                    outs.push(HubOut::Emit(Event::SecretOffered { chat, from: Box::new(from) }));
                }
            }
            Step::Ended(Ended::Gone(chat)) => {
                self.conns.remove(&no);
                self.forget(chat);
                outs.push(HubOut::Emit(Event::SecretClosed { chat }));
            }
        }
        outs
    }

    /// Two links for one chat. Both devices opened one at once (both came up within
    /// [`OPENING_TIMEOUT`]): the one opened by the device with the smaller id stays, on both
    /// devices alike. Otherwise the older link is one the other device no longer has (a device
    /// opens a link only for a chat without one): the new one stays.
    fn keep_one(&mut self, device: &Device, chat: SecretId) {
        let up: Vec<(u64, bool, Instant)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.conn.chat() == Some(chat))
            .filter_map(|(n, c)| Some((*n, c.conn.opened_here(), c.up_since?)))
            .collect();
        let Some(newest) = up.iter().map(|(_, _, t)| *t).max() else { return };
        let fresh: Vec<&(u64, bool, Instant)> =
            up.iter().filter(|(_, _, t)| newest.duration_since(*t) < OPENING_TIMEOUT).collect();
        let Some(peer) = device.secret_peer(chat) else { return };
        let mine_wins = *device.id() < peer;
        let keep = fresh
            .iter()
            .filter(|(_, here, _)| *here == mine_wins)
            .map(|(n, _, _)| *n)
            .max()
            .or_else(|| fresh.iter().map(|(n, _, _)| *n).max());
        for (n, _, _) in &up {
            if Some(*n) != keep {
                self.conns.remove(n);
            }
        }
    }

    fn forget(&mut self, chat: SecretId) {
        self.due.remove(&chat);
        self.backoff.remove(&chat);
        self.dirty.remove(&chat);
        self.told.remove(&chat);
        self.next_expiry = None;
    }

    fn add_conn(&mut self, conn: SecretConn, stream: SecretStream, first: Vec<Vec<u8>>) {
        let no = self.next_conn;
        self.next_conn += 1;
        let (out, rx) = mpsc::channel(CONN_QUEUE);
        for f in first {
            let _ = out.try_send(f);
        }
        tokio::spawn(pump(no, stream, rx, self.tx.clone()));
        let deadline = Some(Instant::now() + OPENING_TIMEOUT);
        self.conns.insert(no, Conn { conn, out, deadline, up_since: None });
    }

    fn send(&mut self, device: &Device, no: u64, out: Vec<Vec<u8>>) {
        let Some(c) = self.conns.get(&no) else { return };
        for f in out {
            if c.out.try_send(f).is_err() {
                self.drop_conn(device, no, "the other device does not read");
                return;
            }
        }
    }

    /// Drops a stream (closing it); a chat with something waiting is tried again later.
    fn drop_conn(&mut self, device: &Device, no: u64, why: &str) {
        let Some(c) = self.conns.remove(&no) else { return };
        tracing::debug!(conn = no, peer = %c.conn.peer(), reason = why, "secret stream ended");
        let Some(chat) = c.conn.chat() else { return };
        if self.conns.values().any(|o| o.conn.chat() == Some(chat)) {
            return;
        }
        self.retry_if_waiting(device, chat);
    }

    /// Tries `chat` again later if it has something for the other device.
    fn retry_if_waiting(&mut self, device: &Device, chat: SecretId) {
        if self.dirty.contains(&chat) || device.secret_waiting(chat).unwrap_or(false) {
            self.retry(chat);
        }
    }

    /// The session's relay connection came (back) up: the circuit reservation went with the
    /// old one, so listen again (a no-op if it stands).
    pub(super) fn relay_up(&mut self) {
        if matches!(self.listen, Listen::Up) {
            self.listen = Listen::At(Instant::now());
        }
    }

    fn retry(&mut self, chat: SecretId) {
        let b = self.backoff.get(&chat).copied().unwrap_or(RETRY_MIN);
        self.backoff.insert(chat, (b * 2).min(RETRY_MAX));
        self.due.insert(chat, Instant::now() + b);
    }
}

/// Moves one stream's frames between the libp2p stream and the session, receiving while it
/// sends, until either ends.
async fn pump(no: u64, stream: SecretStream, mut out: mpsc::Receiver<Vec<u8>>, tx: mpsc::Sender<HubEvent>) {
    let (mut sender, mut receiver) = stream.split();
    let sending = async {
        while let Some(f) = out.recv().await {
            sender.send(&f).await?;
        }
        // The session dropped the stream.
        sender.close().await;
        Ok(())
    };
    let receiving = async {
        loop {
            match receiver.recv().await? {
                Some(frame) => {
                    if tx.send(HubEvent::Frame(no, frame)).await.is_err() {
                        return Ok(());
                    }
                }
                None => return Err(NetError::Unreachable("the other device closed the stream".into())),
            }
        }
    };
    let ended: Result<(), NetError> = tokio::select! {
        r = sending => r,
        r = receiving => r,
    };
    if let Err(e) = ended {
        let _ = tx.send(HubEvent::Closed(no, Some(e.to_string()))).await;
    }
}
