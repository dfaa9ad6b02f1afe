//! The device's libp2p side: one swarm per device, one sync stream to the relay, and the
//! connections to other devices for secret chats.
//!
//! libp2p only carries bytes here: the swarm task dials and keeps connections; the sync stream
//! is a plain framed stream from `libp2p-stream`, and all protocol logic lives in the sans-IO
//! [`crate::core::SyncCore`] (and, for secret chats, in [`crate::secret`]).
//!
//! Secret chats: a device that is to be reachable listens on TCP and reserves a circuit on the
//! relay (circuit relay v2, [`NetHandle::listen_secret`]). The other device dials it through the
//! relay ([`NetHandle::connect_peer`]); DCUtR then tries a direct connection using the addresses
//! identify observed, and when one comes up the relayed connection is closed, so that the next
//! secret stream runs on the direct one. Where the upgrade fails, the circuit carries the
//! session (the relay sees only the devices' encrypted connection, within its circuit limits).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{dcutr, identify, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::proto::wire::{self, ClientFrame, FrameError, RelayFrame, MAX_FRAME_BYTES};

/// How long a dial plus stream negotiation may take before the relay counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Network failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The relay address is not a multiaddr ending in `/p2p/<peer id>`.
    #[error("relay address {0:?} must be a multiaddr ending in /p2p/<peer id>")]
    BadAddress(String),
    /// The relay address is over a transport a device does not dial (QUIC, say).
    #[error(
        "relay address {0:?}: a device dials /ip4, /ip6, /dns, /dns4 or /dns6, then /tcp/PORT, then \
         optionally /ws or /wss, then /p2p/<peer id>"
    )]
    UnsupportedAddress(String),
    /// A relay address list is empty, or longer than [`MAX_RELAY_ADDRS`].
    #[error("a relay needs between 1 and {MAX_RELAY_ADDRS} addresses, not {0}")]
    AddressCount(usize),
    /// The relay could not be reached.
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The stream broke.
    #[error("connection to the relay lost: {0}")]
    Io(#[from] std::io::Error),
    /// The relay sent a frame that does not decode.
    #[error("relay sent a bad frame: {0}")]
    Frame(#[from] FrameError),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

enum SwarmCmd {
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Listen on TCP at `tcp` (if given), then on the relay's circuit once identify ran with
    /// the relay.
    Listen {
        tcp: Option<Multiaddr>,
        relay: (PeerId, Multiaddr),
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Connect to `peer` through the relay's circuit (once identify ran with the relay).
    DialPeer {
        peer: PeerId,
        relay: (PeerId, Multiaddr),
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Whether each connection to `peer` runs through a relay, and whether DCUtR gave up on a
    /// direct one.
    Paths {
        peer: PeerId,
        reply: oneshot::Sender<(Vec<bool>, bool)>,
    },
}

/// The secret chat protocol's stream.
pub const SECRET_PROTOCOL: &str = "/stratus/secret/1";

/// A running libp2p swarm for this device. Dropping it stops the swarm. Its methods are
/// [`NetHandle`]'s (a handle works from other tasks too).
pub struct Net {
    handle: NetHandle,
    task: tokio::task::JoinHandle<()>,
}

/// A handle on a [`Net`]'s swarm, for other tasks; it stops working when the `Net` is dropped.
#[derive(Clone)]
pub struct NetHandle {
    control: libp2p_stream::Control,
    cmd: mpsc::Sender<SwarmCmd>,
}

impl std::ops::Deref for Net {
    type Target = NetHandle;
    fn deref(&self) -> &NetHandle {
        &self.handle
    }
}

impl std::ops::DerefMut for Net {
    fn deref_mut(&mut self) -> &mut NetHandle {
        &mut self.handle
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Most addresses a device keeps for its relay: each failed one costs a dial per round, so a
/// longer list is refused ([`NetError::AddressCount`]).
pub const MAX_RELAY_ADDRS: usize = 8;

/// Parses a relay's addresses, separated by whitespace (how a device's login keeps them, in
/// the order they are tried), each `…/p2p/<peer id>` (see [`parse_relay_addr`]).
pub fn parse_relay_addrs(s: &str) -> Result<Vec<(PeerId, Multiaddr)>, NetError> {
    let addrs = s.split_whitespace().map(parse_relay_addr).collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() || addrs.len() > MAX_RELAY_ADDRS {
        return Err(NetError::AddressCount(addrs.len()));
    }
    Ok(addrs)
}

/// Splits `…/p2p/<peer id>` into the peer id and the full address. The transports a device
/// dials: `/ip4/…/tcp/…`, `/ip6/…`, `/dns/…`, `/dns4/…`, `/dns6/…` (resolved with the
/// system's resolver), each also as WebSocket (`…/tcp/…/ws`) or secure WebSocket
/// (`…/tcp/443/wss`, checked against the web's root certificates).
pub fn parse_relay_addr(s: &str) -> Result<(PeerId, Multiaddr), NetError> {
    let addr: Multiaddr = s.parse().map_err(|_| NetError::BadAddress(s.into()))?;
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        return Err(NetError::BadAddress(s.into()));
    };
    let parts: Vec<Protocol> = addr.iter().collect();
    let dialable = match &parts[..] {
        [host, Protocol::Tcp(_), rest @ .., Protocol::P2p(_)] => {
            matches!(
                host,
                Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)
            ) && matches!(rest, [] | [Protocol::Ws(_)] | [Protocol::Wss(_)] | [Protocol::Tls, Protocol::Ws(_)])
        }
        _ => false,
    };
    match dialable {
        true => Ok((peer, addr)),
        false => Err(NetError::UnsupportedAddress(s.into())),
    }
}

impl Net {
    /// Starts the swarm with the device's keypair. Must be called inside a tokio runtime.
    pub fn start(keypair: Keypair) -> Result<Net, NetError> {
        let (dns, dns_opts) = dns_config();
        let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_other_transport(|key| websocket(key, dns.clone(), dns_opts.clone()))
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_dns_config(dns, dns_opts)
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_behaviour(|key, relay_client| Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(identify::Config::new("/stratus/1.0.0".into(), key.public())),
                ping: ping::Behaviour::default(),
                relay_client,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
            })
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        let control = swarm.behaviour().stream.new_control();
        let (cmd, cmd_rx) = mpsc::channel::<SwarmCmd>(8);
        let task = tokio::spawn(swarm_task(swarm, cmd_rx));
        Ok(Net { handle: NetHandle { control, cmd }, task })
    }

    /// A handle for other tasks.
    pub fn handle(&self) -> NetHandle {
        self.handle.clone()
    }
}

/// The system's DNS settings; where it has none (no `/etc/resolv.conf`, as on Android), none:
/// `/dns…` addresses then fail to resolve when dialed, IP addresses still work.
fn dns_config() -> (libp2p::dns::ResolverConfig, libp2p::dns::ResolverOpts) {
    hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no system DNS settings: /dns addresses will not resolve");
        (libp2p::dns::ResolverConfig::new(), libp2p::dns::ResolverOpts::default())
    })
}

/// WebSocket (`…/ws`) and secure WebSocket (`…/wss`, TLS against the web's roots) over DNS and
/// TCP. Names resolve inside it, so that TLS checks the certificate against the host name;
/// libp2p's own builder would read the system's DNS settings and fail without them.
fn websocket(
    key: &Keypair,
    dns: libp2p::dns::ResolverConfig,
    dns_opts: libp2p::dns::ResolverOpts,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    use libp2p::core::muxing::StreamMuxerBox;
    use libp2p::core::upgrade::Version;
    use libp2p::Transport;
    let tcp = libp2p::tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let ws = libp2p::websocket::Config::new(libp2p::dns::tokio::Transport::custom(tcp, dns, dns_opts));
    Ok(ws
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

impl NetHandle {
    /// Makes this device reachable for secret chats: listens on TCP at `tcp` (e.g.
    /// `/ip4/0.0.0.0/tcp/0`; without it, no direct connection can be made, and the relay
    /// carries every secret chat) and reserves a circuit on the relay at `relay`. Returns once
    /// the relay accepted the reservation (it is renewed on its own).
    pub async fn listen_secret(&mut self, tcp: Option<Multiaddr>, relay: &str) -> Result<(), NetError> {
        let relay = parse_relay_addr(relay)?;
        self.ask(|reply| SwarmCmd::Listen { tcp, relay, reply }).await
    }

    /// Connects to the device `peer` through the relay at `relay` (unless connected already),
    /// then waits, at most [`DIRECT_WAIT`], for DCUtR to replace the relayed connection with a
    /// direct one (streams opened before that would be cut when the relayed one closes).
    /// Returns whether the connection is direct; if not, the relay carries it.
    pub async fn connect_peer(&mut self, peer: PeerId, relay: &str) -> Result<bool, NetError> {
        let relay = parse_relay_addr(relay)?;
        self.ask(|reply| SwarmCmd::DialPeer { peer, relay, reply }).await?;
        let deadline = tokio::time::Instant::now() + DIRECT_WAIT;
        loop {
            let (paths, gave_up) = self.paths_and_outcome(peer).await;
            if !paths.is_empty() && paths.iter().all(|relayed| !relayed) {
                return Ok(true);
            }
            if gave_up || tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// For each connection to `peer`: whether it runs through a relay.
    pub async fn paths(&mut self, peer: PeerId) -> Vec<bool> {
        self.paths_and_outcome(peer).await.0
    }

    async fn paths_and_outcome(&mut self, peer: PeerId) -> (Vec<bool>, bool) {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(SwarmCmd::Paths { peer, reply }).await.is_err() {
            return (Vec::new(), false);
        }
        rx.await.unwrap_or_default()
    }

    /// Opens a secret chat stream to `peer` (connected before with [`NetHandle::connect_peer`]).
    pub async fn open_secret(&mut self, peer: PeerId) -> Result<SecretStream, NetError> {
        let fut = self.control.open_stream(peer, StreamProtocol::new(SECRET_PROTOCOL));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| NetError::Unreachable("timed out".into()))?
            .map_err(|e| NetError::Unreachable(e.to_string()))?;
        Ok(SecretStream::new(stream))
    }

    /// The secret chat streams other devices open to this one (once per swarm).
    pub fn accept_secret(&mut self) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.control.accept(StreamProtocol::new(SECRET_PROTOCOL)).map_err(|e| NetError::Unreachable(e.to_string()))
    }

    async fn ask(&mut self, cmd: impl FnOnce(oneshot::Sender<Result<(), String>>) -> SwarmCmd) -> Result<(), NetError> {
        let fut = async {
            let (reply, rx) = oneshot::channel();
            self.cmd.send(cmd(reply)).await.map_err(|_| NetError::Unreachable("network task stopped".into()))?;
            rx.await.map_err(|_| NetError::Unreachable("network task stopped".into()))?.map_err(NetError::Unreachable)
        };
        tokio::time::timeout(SECRET_CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| NetError::Unreachable("timed out".into()))?
    }

    /// Dials the relay (if not connected) and opens a sync stream.
    pub async fn open(&mut self, peer: PeerId, addr: Multiaddr) -> Result<RelayStream, NetError> {
        let fut = async {
            let (reply, rx) = oneshot::channel();
            self.cmd
                .send(SwarmCmd::Dial { peer, addr, reply })
                .await
                .map_err(|_| NetError::Unreachable("network task stopped".into()))?;
            rx.await
                .map_err(|_| NetError::Unreachable("network task stopped".into()))?
                .map_err(NetError::Unreachable)?;
            let stream = self
                .control
                .open_stream(peer, StreamProtocol::new(wire::PROTOCOL))
                .await
                .map_err(|e| NetError::Unreachable(e.to_string()))?;
            Ok(RelayStream::new(stream))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut).await.map_err(|_| NetError::Unreachable("timed out".into()))?
    }
}

/// What the swarm task waits for on behalf of callers.
#[derive(Default)]
struct Waiting {
    /// Dials, answered when a connection to the peer is up.
    dials: Vec<(PeerId, oneshot::Sender<Result<(), String>>)>,
    /// Work that needs identify to have run with the relay first (for DCUtR's addresses).
    after_identify: Vec<(PeerId, SwarmCmd)>,
    /// Circuit listens, answered when the relay accepts the reservation.
    reservations: Vec<(PeerId, oneshot::Sender<Result<(), String>>)>,
    /// Work that waits for a TCP listener to be up: a connection to the relay made before it
    /// would not use its port, and DCUtR would then punch to a port nobody listens on.
    after_listen: Vec<(libp2p::core::transport::ListenerId, PeerId, SwarmCmd)>,
    /// TCP listeners by the address asked for: listening again on one is a no-op.
    tcp: std::collections::BTreeMap<Multiaddr, libp2p::core::transport::ListenerId>,
    /// Circuit listeners by relay (one each: listening again is a no-op while it lives), and
    /// the relays whose reservation stands.
    circuits: std::collections::BTreeMap<PeerId, libp2p::core::transport::ListenerId>,
    reserved: std::collections::BTreeSet<PeerId>,
}

impl Waiting {
    /// Forgets work whose caller stopped waiting (timed out): retried listens and dials would
    /// otherwise pile up while the relay does not answer.
    fn prune(&mut self) {
        self.dials.retain(|(_, r)| !r.is_closed());
        self.reservations.retain(|(_, r)| !r.is_closed());
        self.after_identify.retain(|(_, c)| !abandoned(c));
        self.after_listen.retain(|(_, _, c)| !abandoned(c));
    }
}

/// Whether the caller of `c` stopped waiting for its answer.
fn abandoned(c: &SwarmCmd) -> bool {
    match c {
        SwarmCmd::Dial { reply, .. } | SwarmCmd::Listen { reply, .. } | SwarmCmd::DialPeer { reply, .. } => {
            reply.is_closed()
        }
        SwarmCmd::Paths { reply, .. } => reply.is_closed(),
    }
}

/// Whether `addr` is loopback exactly when the relay `c` connects to is (or either has no IP).
fn same_kind(addr: &Multiaddr, c: &SwarmCmd) -> bool {
    let loopback = |a: &Multiaddr| {
        a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(ip.is_loopback()),
            Protocol::Ip6(ip) => Some(ip.is_loopback()),
            _ => None,
        })
    };
    match c {
        SwarmCmd::Listen { relay, .. } => match (loopback(addr), loopback(&relay.1)) {
            (Some(a), Some(r)) => a == r,
            _ => true,
        },
        _ => true,
    }
}

/// Whether `addr` runs through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

async fn swarm_task(mut swarm: libp2p::Swarm<Behaviour>, mut cmd_rx: mpsc::Receiver<SwarmCmd>) {
    use libp2p::swarm::ConnectionId;
    let mut waiting = Waiting::default();
    // Peers identify ran with (their observed address of us is known).
    let mut identified: std::collections::BTreeSet<PeerId> = Default::default();
    // Connections through a relay, by peer: closed once DCUtR made a direct one.
    let mut relayed: std::collections::BTreeMap<PeerId, Vec<ConnectionId>> = Default::default();
    let mut paths: std::collections::BTreeMap<ConnectionId, (PeerId, bool)> = Default::default();
    // Peers DCUtR gave up on since their last relayed connection came up.
    let mut no_direct: std::collections::BTreeSet<PeerId> = Default::default();
    loop {
        tokio::select! {
            c = cmd_rx.recv() => {
                let Some(c) = c else { return };
                waiting.prune();
                match c {
                    SwarmCmd::Dial { peer, addr, reply } => {
                        if swarm.is_connected(&peer) {
                            let _ = reply.send(Ok(()));
                        } else if let Err(e) = swarm.dial(addr) {
                            let _ = reply.send(Err(e.to_string()));
                        } else {
                            waiting.dials.push((peer, reply));
                        }
                    }
                    SwarmCmd::Listen { tcp, relay, reply } => {
                        let relay_peer = relay.0;
                        // A TCP listener asked for before is up, or its wait is under way.
                        let tcp = tcp.filter(|t| !waiting.tcp.contains_key(t));
                        let listener = match tcp.map(|t| (swarm.listen_on(t.clone()), t)) {
                            Some((Err(e), _)) => {
                                let _ = reply.send(Err(e.to_string()));
                                continue;
                            }
                            Some((Ok(l), t)) => {
                                waiting.tcp.insert(t, l);
                                Some(l)
                            }
                            None => None,
                        };
                        let c = SwarmCmd::Listen { tcp: None, relay, reply };
                        match listener {
                            Some(l) => waiting.after_listen.push((l, relay_peer, c)),
                            None => after_identify(&mut swarm, &mut waiting, &identified, relay_peer, c),
                        }
                    }
                    c @ SwarmCmd::DialPeer { .. } => {
                        let SwarmCmd::DialPeer { peer, relay, reply } = c else { unreachable!() };
                        if swarm.is_connected(&peer) {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        let relay_peer = relay.0;
                        after_identify(&mut swarm, &mut waiting, &identified, relay_peer, SwarmCmd::DialPeer { peer, relay, reply });
                    }
                    SwarmCmd::Paths { peer, reply } => {
                        let p = paths.values().filter(|(p, _)| *p == peer).map(|(_, r)| *r).collect();
                        let _ = reply.send((p, no_direct.contains(&peer)));
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    // A listener on 0.0.0.0 comes up interface by interface; the relay
                    // connection can reuse its port once one of the relay's kind (loopback or
                    // not) is up.
                    let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting.after_listen)
                        .into_iter()
                        .partition(|(l, _, c)| *l == listener_id && same_kind(&address, c));
                    waiting.after_listen = keep;
                    for (_, relay_peer, c) in ready {
                        after_identify(&mut swarm, &mut waiting, &identified, relay_peer, c);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    let r = is_relayed(endpoint.get_remote_address());
                    paths.insert(connection_id, (peer_id, r));
                    if r {
                        relayed.entry(peer_id).or_default().push(connection_id);
                        no_direct.remove(&peer_id);
                    }
                    for (_, r) in extract(&mut waiting.dials, peer_id) {
                        let _ = r.send(Ok(()));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                    paths.remove(&connection_id);
                    if num_established == 0 {
                        // The next connection runs identify again (its observed address may
                        // differ); work waiting for it must wait again.
                        identified.remove(&peer_id);
                    }
                    if let Some(v) = relayed.get_mut(&peer_id) {
                        v.retain(|c| *c != connection_id);
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                    for (_, r) in extract(&mut waiting.dials, peer_id) {
                        let _ = r.send(Err(error.to_string()));
                    }
                    // Work that waited for identify with a relay that cannot be reached.
                    if !swarm.is_connected(&peer_id) {
                        for (_, c) in extract(&mut waiting.after_identify, peer_id) {
                            fail(c, error.to_string());
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, .. })) => {
                    identified.insert(peer_id);
                    let (ready, keep): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut waiting.after_identify).into_iter().partition(|(p, _)| *p == peer_id);
                    waiting.after_identify = keep;
                    for (_, c) in ready {
                        run_after_identify(&mut swarm, &mut waiting, c);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    ..
                })) => {
                    waiting.reserved.insert(relay_peer_id);
                    for (_, r) in extract(&mut waiting.reservations, relay_peer_id) {
                        let _ = r.send(Ok(()));
                    }
                }
                SwarmEvent::ListenerClosed { listener_id, addresses, reason, .. } => {
                    // A circuit listener closes (without an error) when the relay connection
                    // goes: its reservation is gone, and listening again makes a new one.
                    tracing::info!(?addresses, ?reason, "a listener closed");
                    let why = reason.err().map_or("the listener closed".to_string(), |e| e.to_string());
                    if let Some(relay) = waiting.circuits.iter().find(|(_, l)| **l == listener_id).map(|(r, _)| *r) {
                        waiting.circuits.remove(&relay);
                        waiting.reserved.remove(&relay);
                        for (_, r) in extract(&mut waiting.reservations, relay) {
                            let _ = r.send(Err(why.clone()));
                        }
                    }
                    waiting.tcp.retain(|_, l| *l != listener_id);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => {
                    match result {
                        Ok(_) => {
                            tracing::info!(peer = %remote_peer_id, "direct connection made; closing the relayed one");
                            for c in relayed.remove(&remote_peer_id).unwrap_or_default() {
                                swarm.close_connection(c);
                            }
                        }
                        Err(e) => {
                            tracing::info!(peer = %remote_peer_id, %e, "no direct connection; the relay carries it");
                            no_direct.insert(remote_peer_id);
                        }
                    }
                }
                _ => {}
            },
        }
    }
}

/// Runs `c` now if identify ran with `relay_peer`, else once it has (dialing the relay if
/// needed).
fn after_identify(
    swarm: &mut libp2p::Swarm<Behaviour>,
    waiting: &mut Waiting,
    identified: &std::collections::BTreeSet<PeerId>,
    relay_peer: PeerId,
    c: SwarmCmd,
) {
    if identified.contains(&relay_peer) {
        return run_after_identify(swarm, waiting, c);
    }
    if !swarm.is_connected(&relay_peer) {
        let addr = match &c {
            SwarmCmd::Listen { relay, .. } | SwarmCmd::DialPeer { relay, .. } => relay.1.clone(),
            _ => return,
        };
        if let Err(e) = swarm.dial(addr) {
            fail(c, e.to_string());
            return;
        }
    }
    waiting.after_identify.push((relay_peer, c));
}

fn run_after_identify(swarm: &mut libp2p::Swarm<Behaviour>, waiting: &mut Waiting, c: SwarmCmd) {
    match c {
        SwarmCmd::Listen { relay, reply, .. } if waiting.circuits.contains_key(&relay.0) => {
            match waiting.reserved.contains(&relay.0) {
                true => drop(reply.send(Ok(()))),
                false => waiting.reservations.push((relay.0, reply)),
            }
        }
        SwarmCmd::Listen { relay, reply, .. } => match swarm.listen_on(relay.1.with(Protocol::P2pCircuit)) {
            Ok(l) => {
                waiting.circuits.insert(relay.0, l);
                waiting.reservations.push((relay.0, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        },
        SwarmCmd::DialPeer { peer, relay, reply } => {
            let addr = relay.1.with(Protocol::P2pCircuit).with(Protocol::P2p(peer));
            match swarm.dial(addr) {
                Ok(()) => {
                    waiting.dials.push((peer, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
        other => fail(other, "not a command that waits for identify".into()),
    }
}

fn fail(c: SwarmCmd, e: String) {
    match c {
        SwarmCmd::Dial { reply, .. } | SwarmCmd::Listen { reply, .. } | SwarmCmd::DialPeer { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        SwarmCmd::Paths { reply, .. } => {
            let _ = reply.send((Vec::new(), false));
        }
    }
}

fn extract<T>(v: &mut Vec<(PeerId, T)>, peer: PeerId) -> Vec<(PeerId, T)> {
    let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(v).into_iter().partition(|(p, _)| *p == peer);
    *v = keep;
    hit
}

/// How long [`NetHandle::connect_peer`] waits for a direct connection to replace a relayed one.
pub const DIRECT_WAIT: Duration = Duration::from_secs(5);

/// How long reaching another device (through the relay, identify first) may take.
pub const SECRET_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A framed secret chat stream to another device: frames of at most one Noise message.
pub struct SecretStream {
    framed: SecretFramed,
}

type SecretFramed = Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>;

async fn send_frame(
    sink: &mut (impl SinkExt<bytes::Bytes, Error = std::io::Error> + Unpin),
    bytes: &[u8],
) -> Result<(), NetError> {
    sink.send(bytes::Bytes::copy_from_slice(bytes)).await?;
    Ok(())
}

async fn recv_frame(
    stream: &mut (impl futures::Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin),
) -> Result<Option<Vec<u8>>, NetError> {
    match stream.next().await {
        None => Ok(None),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(bytes)) => Ok(Some(bytes.to_vec())),
    }
}

impl From<libp2p::Stream> for SecretStream {
    fn from(stream: libp2p::Stream) -> Self {
        SecretStream::new(stream)
    }
}

impl SecretStream {
    fn new(stream: libp2p::Stream) -> Self {
        let max = crate::secret::noise::MAX_FRAME_BYTES;
        let codec = LengthDelimitedCodec::builder().max_frame_length(max).new_codec();
        SecretStream { framed: Framed::new(stream.compat(), codec) }
    }

    /// Sends one frame.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        send_frame(&mut self.framed, bytes).await
    }

    /// Receives one frame; `Ok(None)` when the peer closed the stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        recv_frame(&mut self.framed).await
    }

    /// Closes the sending side.
    pub async fn close(&mut self) {
        let _ = SinkExt::<bytes::Bytes>::close(&mut self.framed).await;
    }

    /// The sending and the receiving half, to use at once (a side that only sends while the
    /// other does too would wait for ever once both flow-control windows are full).
    pub fn split(self) -> (SecretSender, SecretReceiver) {
        let (sink, stream) = self.framed.split();
        (SecretSender { sink }, SecretReceiver { stream })
    }
}

/// The sending half of a [`SecretStream`].
pub struct SecretSender {
    sink: futures::stream::SplitSink<SecretFramed, bytes::Bytes>,
}

impl SecretSender {
    /// Sends one frame.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        send_frame(&mut self.sink, bytes).await
    }

    /// Closes the sending side.
    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}

/// The receiving half of a [`SecretStream`].
pub struct SecretReceiver {
    stream: futures::stream::SplitStream<SecretFramed>,
}

impl SecretReceiver {
    /// Receives one frame; `Ok(None)` when the peer closed the stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        recv_frame(&mut self.stream).await
    }
}

/// A framed sync stream to the relay.
pub struct RelayStream {
    framed: Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>,
}

impl RelayStream {
    fn new(stream: libp2p::Stream) -> Self {
        let codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec();
        RelayStream { framed: Framed::new(stream.compat(), codec) }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), NetError> {
        let bytes = wire::encode(frame)?;
        self.framed.send(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Closes the sending side (after everything sent before) and waits, at most `limit`, for
    /// the relay to close its side: then the relay has read everything sent. Frames that
    /// arrive meanwhile are dropped (the session is ending).
    pub async fn close_and_drain(&mut self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            if SinkExt::<bytes::Bytes>::close(&mut self.framed).await.is_ok() {
                while let Ok(Some(_)) = self.recv().await {}
            }
        })
        .await;
    }

    /// Sends arbitrary bytes as one frame (for tests and protocol tools: garbage frames).
    #[doc(hidden)]
    pub async fn send_raw_frame(&mut self, body: &[u8]) -> Result<(), NetError> {
        self.framed.send(bytes::Bytes::copy_from_slice(body)).await?;
        Ok(())
    }

    /// Writes arbitrary bytes to the stream, unframed (for tests: a bad length prefix).
    #[doc(hidden)]
    pub async fn send_unframed(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        use futures::AsyncWriteExt;
        let io = self.framed.get_mut().get_mut();
        io.write_all(bytes).await?;
        io.flush().await?;
        Ok(())
    }

    /// Receives one frame; `Ok(None)` when the relay closed the stream.
    pub async fn recv(&mut self) -> Result<Option<RelayFrame>, NetError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(bytes)) => Ok(Some(wire::decode(&bytes)?)),
        }
    }
}

mod link;
pub(crate) use link::RelayLink;
