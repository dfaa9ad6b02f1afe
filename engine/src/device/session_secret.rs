//! The secret chats of a [`crate::Session`], the driver's half: carries out what
//! [`SecretLinks`] (sans-IO, which decides everything about the links) asks for with libp2p,
//! and reports back what came of it.
//!
//! The session task owns the device, so every secret stream has a small pump task that moves
//! its frames to and from the session; the session feeds them to [`SecretLinks`] one at a time.
//! Nothing here awaits the network in the session task itself (dials and listening run in
//! tasks of their own), so a slow or hostile peer holds up only its own stream. Each stream
//! has [`CONN_QUEUE`] frames waiting to go out; a peer that does not read loses its stream.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::device::drive::Event;
use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::net::{NetError, NetHandle, SecretStream};
use crate::device::peer_links::LinkNo;
use crate::device::secret_links::{SecretLinks, SecretOut};
use crate::proto::ids::{AccountId, DeviceId, SecretId};

pub use crate::device::secret_links::MAX_CONNS;

/// How long a session's start waits for its circuit reservation.
pub(crate) const LISTEN_FIRST_WAIT: Duration = Duration::from_secs(5);
/// Frames waiting to go out on one stream.
pub const CONN_QUEUE: usize = 256;

/// What the pump, dial and listen tasks tell the session.
pub(super) enum HubEvent {
    Listened(Result<(), String>),
    Dialed { chat: SecretId, result: Result<SecretStream, String> },
    Frame(LinkNo, Vec<u8>),
    Closed(LinkNo, Option<String>),
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
        conn: LinkNo,
        account: AccountId,
    },
}

pub(super) struct SecretHub {
    net: NetHandle,
    relay: String,
    tcp: Option<Multiaddr>,
    incoming: libp2p_stream::IncomingStreams,
    tx: mpsc::Sender<HubEvent>,
    rx: mpsc::Receiver<HubEvent>,
    /// The way to each link's stream (its pump task); nothing else is kept here.
    streams: HashMap<LinkNo, mpsc::Sender<Vec<u8>>>,
    links: SecretLinks,
    /// The hub's clock: ms since this instant are the links' time.
    epoch: Instant,
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
        Ok(SecretHub {
            net,
            relay,
            tcp,
            incoming,
            tx,
            rx,
            streams: HashMap::new(),
            links: SecretLinks::new(device, 0)?,
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Listens now (before the session first dials the relay, so that the relay connection
    /// reuses the listening port and DCUtR punches holes to it). Waits at most
    /// [`LISTEN_FIRST_WAIT`] for the relay's reservation; if it is slower, sync starts and the
    /// listening is asked for again (a no-op once it stands).
    pub(super) async fn listen_first(&mut self, device: &mut Device) {
        let now = self.now();
        // The first tick asks to listen (and nothing else: dials wait for the listening).
        let outs = self.links.tick(device, now);
        debug_assert!(outs.iter().all(|o| matches!(o, SecretOut::Listen)));
        let listen = self.net.listen_secret(self.tcp.clone(), &self.relay);
        let r = match tokio::time::timeout(LISTEN_FIRST_WAIT, listen).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the relay has not granted the reservation yet".into()),
        };
        let now = self.now();
        self.links.listened(now, r);
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
        let now = self.now();
        match self.links.next_wake(device, now) {
            Some(ms) => self.epoch + Duration::from_millis(ms),
            None => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Runs what is due: listening, opening streams, dropping those that did not come up in
    /// time, the self-destruct timers.
    pub(super) fn tick(&mut self, device: &mut Device) -> Vec<HubOut> {
        let now = self.now();
        let outs = self.links.tick(device, now);
        self.carry(device, outs)
    }

    /// Handles what a task or another device brought.
    pub(super) fn handle(&mut self, device: &mut Device, input: Input) -> Vec<HubOut> {
        let now = self.now();
        match input {
            Input::Incoming(peer, stream) => {
                if let Some(link) = self.links.incoming(device, now, DeviceId(peer.to_string())) {
                    self.attach(link, SecretStream::from(stream));
                }
                Vec::new()
            }
            Input::Event(HubEvent::Listened(r)) => {
                self.links.listened(now, r);
                Vec::new()
            }
            Input::Event(HubEvent::Dialed { chat, result }) => {
                let (stream, result) = match result {
                    Ok(s) => (Some(s), Ok(())),
                    Err(e) => (None, Err(e)),
                };
                let (link, outs) = self.links.dialed(device, now, chat, result);
                if let (Some(link), Some(stream)) = (link, stream) {
                    self.attach(link, stream);
                }
                self.carry(device, outs)
            }
            Input::Event(HubEvent::Frame(link, frame)) => {
                let outs = self.links.frame(device, now, link, &frame);
                self.carry(device, outs)
            }
            Input::Event(HubEvent::Closed(link, why)) => {
                self.streams.remove(&link);
                let why = why.as_deref().unwrap_or("the other device closed the stream");
                let outs = self.links.closed(device, now, link, why);
                self.carry(device, outs)
            }
        }
    }

    /// Goes on with the conn that waited for a lookup of its offering account's keys.
    pub(super) fn looked_up(&mut self, device: &mut Device, conn: LinkNo) -> Vec<HubOut> {
        let now = self.now();
        let outs = self.links.looked_up(device, now, conn);
        self.carry(device, outs)
    }

    /// This device wrote, read, started, accepted or closed in `chat`: a live link carries it
    /// now, else a stream is opened for it.
    pub(super) fn touched(&mut self, device: &mut Device, chat: SecretId) -> Vec<HubOut> {
        let now = self.now();
        let outs = self.links.touched(device, now, chat);
        self.carry(device, outs)
    }

    /// The session's relay connection came (back) up: the circuit reservation went with the
    /// old one, so listen again (a no-op if it stands).
    /// `at`: the relay address the session connected on, which circuits use from now on
    /// (reserving and dialing through an address the relay is not reached at would fail).
    pub(super) fn relay_up(&mut self, at: Option<String>) {
        if let Some(at) = at {
            self.relay = at;
        }
        let now = self.now();
        self.links.relay_up(now);
    }

    fn attach(&mut self, link: LinkNo, stream: SecretStream) {
        let (out, rx) = mpsc::channel(CONN_QUEUE);
        tokio::spawn(pump(link, stream, rx, self.tx.clone()));
        self.streams.insert(link, out);
    }

    /// Carries out what the links decided; what is for the session comes back.
    fn carry(&mut self, device: &mut Device, outs: Vec<SecretOut>) -> Vec<HubOut> {
        let mut queue = std::collections::VecDeque::from(outs);
        let mut back = Vec::new();
        while let Some(o) = queue.pop_front() {
            match o {
                SecretOut::Listen => {
                    let (mut net, relay, tcp, tx) =
                        (self.net.clone(), self.relay.clone(), self.tcp.clone(), self.tx.clone());
                    tokio::spawn(async move {
                        let r = net.listen_secret(tcp, &relay).await.map_err(|e| e.to_string());
                        let _ = tx.send(HubEvent::Listened(r)).await;
                    });
                }
                SecretOut::Dial { chat, peer } => {
                    let Ok(p) = peer.0.parse::<PeerId>() else {
                        let now = self.now();
                        let (_, outs) = self.links.dialed(device, now, chat, Err("not a peer id".into()));
                        queue.extend(outs);
                        continue;
                    };
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
                SecretOut::Send { link, frames } => {
                    let Some(stream) = self.streams.get(&link) else { continue };
                    if frames.into_iter().any(|f| stream.try_send(f).is_err()) {
                        let now = self.now();
                        queue.extend(self.links.stream_full(device, now, link));
                    }
                }
                SecretOut::Close { link, reason } => {
                    // Dropping the sender ends the pump, which closes the stream.
                    if self.streams.remove(&link).is_some() {
                        tracing::debug!(link, %reason, "secret stream closed");
                    }
                }
                SecretOut::Emit(e) => back.push(HubOut::Emit(e)),
                SecretOut::Lookup { link, account } => back.push(HubOut::Lookup { conn: link, account }),
            }
        }
        back
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
