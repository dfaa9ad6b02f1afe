//! The relay driver: libp2p, one task per device stream, the core task, the barrier task.
//!
//! Bounds (each documented where it is defined):
//! * [`INPUT_QUEUE`] frames wait for the core task; readers wait when it is full.
//! * What waits for each device is bounded by the core in bytes (pushes dropped past
//!   [`Limits::max_push_backlog_bytes`], a device that stops reading cut off after
//!   [`Limits::stalled_reader_ms`], answers capped by [`crate::limits::MAX_QUEUED_BYTES`]; see
//!   `core/backlog.rs`). The core task carries out the cut ([`Effect::Kill`]): the stream task
//!   is stopped even while it waits to write, and its queue is dropped. Each stream's queue is
//!   also bounded in frames ([`output_queue`]), sized so that the core's bounds keep it from
//!   filling; a stream whose queue fills anyway is cut off the same way.
//! * [`Limits`]: connections in total and per peer and sync streams per connection (the
//!   sans-IO [`crate::core::ConnectionGate`], carried out by `server/gate.rs`), frame size
//!   (here), the rest in the core.
//!
//! A store write or barrier that fails stops the relay, except for lack of space
//! ([`StoreError::is_disk_full`]): then the driver applies no more writes, runs no more
//! barriers, and tells the core ([`Input::WriteFailed`]), which refuses what would write and
//! serves what is durable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use stratus_engine::proto::wire::{self, ClientFrame, RelayFrame, MAX_FRAME_BYTES};
use stratus_engine::DeviceId;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminRequest, AdminSocket};
use crate::core::{AdminAnswer, AdminId, AdminRefusal, ConnId, Effect, Input, RelayCore, FRAME_OVERHEAD_BYTES};
use crate::limits::{Limits, LimitsError, MAX_QUEUED_BYTES};
use crate::metrics::{Health, Metrics};
use crate::store::{RelayStore, SledStore, StoreError};

mod backup;
mod gate;
use gate::{Gate, SharedGate, StreamSlot};
pub mod http;
mod stream;
mod tasks;
use tasks::{barrier_loop, core_loop, tick_loop};

/// Frames from all device streams waiting for the core task.
pub const INPUT_QUEUE: usize = 4096;
/// Most inputs the core task takes in one go; their writes share one store transaction.
pub const CORE_BATCH: usize = 256;
/// How often the core task is given [`Input::Tick`] (the stall timer's resolution).
pub const TICK: Duration = Duration::from_secs(1);

/// Most frames waiting to be written to one device stream: as many as the core lets wait
/// ([`MAX_QUEUED_BYTES`] / [`FRAME_OVERHEAD_BYTES`], every frame costing at least that much, plus
/// the device's pages in flight) and some slack for `Close`. The core cuts a stream off before
/// it gets there; one that fills its queue anyway (a bug) is cut off by the driver. The queue
/// takes memory only for what waits in it.
pub fn output_queue(limits: &Limits) -> usize {
    let frames = MAX_QUEUED_BYTES / FRAME_OVERHEAD_BYTES;
    usize::try_from(frames).unwrap_or(usize::MAX / 2) + limits.max_fetches_in_flight_per_device as usize + 16
}

/// Relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sled store and the relay's identity key live.
    pub data_dir: PathBuf,
    /// Where the owner-only admin socket is bound (`crate::admin`); `None`: `admin.sock` in
    /// `data_dir`.
    pub admin_socket: Option<PathBuf>,
    /// Address to listen on (TCP: `/ip4/…/tcp/PORT`).
    pub listen: Multiaddr,
    /// Address to serve WebSocket on as well (`/ip4/…/tcp/PORT/ws`), e.g. behind a reverse
    /// proxy that terminates TLS for devices dialing `…/tcp/443/wss`; none when `None`.
    pub listen_ws: Option<Multiaddr>,
    /// Addresses devices reach the relay at besides the ones it listens on (given to devices
    /// reachable through it, see [`Limits::max_reservations`]).
    pub external_addresses: Vec<Multiaddr>,
    /// What one peer, connection or device may hold or ask for at once.
    pub limits: Limits,
    /// Where the admin HTTP listener serves metrics and health (`server/http.rs`); off when
    /// `None`. It has no authentication: the caller decides whether the address may be reached
    /// from other hosts (the binary's settings refuse that unless allowed).
    pub admin_http: Option<SocketAddr>,
    /// How long a shutdown waits for the drain (what was accepted answered, every device
    /// stream closed; see [`run`]) before it exits anyway.
    pub shutdown_grace: Duration,
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store failed; acknowledgements stopped.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory or identity key could not be used.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    /// A bug stopped part of the relay; it exits rather than serve half-working.
    #[error("internal error: {0}")]
    Bug(String),
    /// libp2p could not be set up or could not listen.
    #[error("network: {0}")]
    Network(String),
    /// A limit in the configuration cannot be enforced.
    #[error("configuration: {0}")]
    Limits(#[from] LimitsError),
    /// The admin HTTP listener could not listen.
    #[error("admin http listener on {0}: {1}")]
    AdminHttp(SocketAddr, std::io::Error),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: Gate,
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// Circuit relay v2, for secret chats between devices that cannot reach each other
    /// directly: they carry only the devices' end-to-end encrypted connection.
    relay: relay::Behaviour,
}

/// Most addresses the relay takes as its own from what devices observed of it (identify): a
/// device could report anything.
const MAX_OBSERVED_ADDRESSES: usize = 8;

/// What the core hands a stream task to write.
///
/// Frames are boxed: a stream's queue (tokio's mpsc) allocates its slots 32 at a time when it
/// is made, and 32 unboxed `RelayFrame`s are ~9 KiB for every connected device, idle or not.
enum Outgoing {
    Frame(Box<RelayFrame>),
    /// The answer to a fetch: once written, it is reported as a page in [`Input::Sent`].
    Page(Box<RelayFrame>),
    Close,
}

/// The core task's handle on one stream task.
struct StreamHandle {
    tx: mpsc::Sender<Outgoing>,
    /// Stops the stream task at once, even while it waits for the peer to take bytes.
    kill: CancellationToken,
}

enum CoreMsg {
    Open {
        conn: ConnId,
        device: DeviceId,
        handle: StreamHandle,
    },
    Input(Input),
    /// From the admin socket: carried out between two batches of writes.
    Admin(AdminRequest),
    /// From a backup's copy: it has caught up with the batches applied since it began (or
    /// failed), see `server/backup.rs`.
    BackupCopied {
        id: u64,
        result: Result<(), String>,
    },
}

/// Length-delimited frames with separate limits each way: a device's frames are held to
/// [`Limits::max_frame_bytes`], the relay's own to [`MAX_FRAME_BYTES`] (pages may be larger
/// than what an operator lets devices send).
struct RelayCodec {
    read: LengthDelimitedCodec,
    write: LengthDelimitedCodec,
}

impl RelayCodec {
    fn new(max_frame_bytes: usize) -> Self {
        RelayCodec {
            read: LengthDelimitedCodec::builder().max_frame_length(max_frame_bytes).new_codec(),
            write: LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec(),
        }
    }
}

impl Decoder for RelayCodec {
    type Item = bytes::BytesMut;
    type Error = std::io::Error;
    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        self.read.decode(src)
    }
}

impl Encoder<bytes::Bytes> for RelayCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: bytes::Bytes, dst: &mut bytes::BytesMut) -> Result<(), Self::Error> {
        self.write.encode(item, dst)
    }
}

/// The devices with a session on this relay (registered, not revoked): only they may reserve
/// a circuit or open one. Kept current from the store writes the core makes.
type Registered = Arc<std::sync::RwLock<std::collections::BTreeSet<PeerId>>>;

fn peer_of(device: &stratus_engine::DeviceId) -> Option<PeerId> {
    device.0.parse().ok()
}

/// Keeps [`Registered`] current with a batch of store writes.
fn note_devices(registered: &Registered, ops: &[crate::core::StoreOp]) {
    for op in ops {
        match op {
            crate::core::StoreOp::PutDevice(cert) => {
                let mut r = registered.write().unwrap_or_else(|e| e.into_inner());
                r.extend(peer_of(&cert.body.device));
            }
            crate::core::StoreOp::PutDeviceState(d, s) if s.revoked => {
                let mut r = registered.write().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = peer_of(d) {
                    r.remove(&p);
                }
            }
            crate::core::StoreOp::DeleteDevice(d) => {
                let mut r = registered.write().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = peer_of(d) {
                    r.remove(&p);
                }
            }
            _ => {}
        }
    }
}

/// The circuit relay's limits from the relay's; only devices with a session are served.
fn circuit_config(limits: &Limits, registered: &Registered) -> relay::Config {
    let admit = |registered: Registered| {
        move |peer: PeerId, _: &Multiaddr, _: std::time::Instant| {
            registered.read().unwrap_or_else(|e| e.into_inner()).contains(&peer)
        }
    };
    let mut config = relay::Config {
        max_reservations: limits.max_reservations as usize,
        max_reservations_per_peer: 4,
        reservation_duration: Duration::from_secs(3600),
        max_circuits: limits.max_circuits as usize,
        max_circuits_per_peer: limits.max_circuits_per_peer as usize,
        max_circuit_duration: Duration::from_secs(u64::from(limits.max_circuit_secs)),
        max_circuit_bytes: limits.max_circuit_bytes,
        ..relay::Config::default()
    };
    config.reservation_rate_limiters.push(Box::new(admit(registered.clone())));
    config.circuit_src_rate_limiters.push(Box::new(admit(registered.clone())));
    config
}

/// Loads the relay's libp2p identity from `dir/identity.key`, creating it on first start, so
/// the relay keeps its PeerId (and devices their configured address) across restarts.
pub fn load_identity(dir: &Path) -> Result<Keypair, ServerError> {
    let path = dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| ServerError::Network(format!("identity key {} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| ServerError::Network(e.to_string()))?;
            let tmp = dir.join("identity.key.tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(kp)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the relay until `shutdown` resolves (clean exit) or the store fails (error).
/// `ready` receives the full address (`…/p2p/<peer id>`) once the relay listens.
///
/// Shutdown is a lame-duck drain: `/readyz` turns not ready, the listeners close (new
/// connections are refused), the admin socket stops, and the core is told to drain
/// ([`Input::Drain`]: nothing new is taken, what was accepted is answered once durable, then
/// every stream is closed). Once the core is drained, or after [`Config::shutdown_grace`]
/// whatever is left, a last barrier makes everything written durable and `run` returns `Ok`.
pub async fn run(
    config: Config,
    ready: impl FnOnce(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    // The admin listener first: `/healthz` answers, and `/readyz` says so, while the store opens.
    let observer = Observer::start(&config, false).await?;
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Arc::new(SledStore::open(&config.data_dir.join("store"))?);
    observer.health.store_opened();
    serve(config, store, observer, ready, shutdown).await
}

/// Longest a clean shutdown waits for the devices' connections to close gracefully once
/// their streams are closed.
const CONNECTION_CLOSE_WAIT: Duration = Duration::from_secs(3);

/// [`run`] over any [`RelayStore`] (tests wrap the sled store to hold back or fail barriers).
pub async fn run_with_store<S: RelayStore>(
    config: Config,
    store: Arc<S>,
    ready: impl FnOnce(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let observer = Observer::start(&config, true).await?;
    serve(config, store, observer, ready, shutdown).await
}

/// The relay's metrics and readiness, and the admin HTTP listener serving them when configured
/// (stopped when this is dropped).
struct Observer {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    http: Option<tokio::task::JoinHandle<()>>,
}

impl Observer {
    /// Binds and starts the admin HTTP listener when configured; `store_open` when the store
    /// is open already.
    async fn start(config: &Config, store_open: bool) -> Result<Observer, ServerError> {
        let (metrics, health) = (Arc::new(Metrics::new()), Arc::new(Health::default()));
        if store_open {
            health.store_opened();
        }
        let http = match config.admin_http {
            Some(addr) => {
                let listener = http::bind(addr).await.map_err(|e| ServerError::AdminHttp(addr, e))?;
                let local = listener.local_addr().map_err(|e| ServerError::AdminHttp(addr, e))?;
                tracing::info!(addr = %local, "admin http listening (/metrics, /healthz, /readyz)");
                Some(tokio::spawn(http::serve(listener, metrics.clone(), health.clone())))
            }
            None => None,
        };
        Ok(Observer { metrics, health, http })
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(h) = &self.http {
            h.abort();
        }
    }
}

/// Updates the store's size on disk every [`STORE_SIZE_EVERY`] (it may list files, so not on
/// the core task).
async fn store_size_loop<S: RelayStore>(store: Arc<S>, metrics: Arc<Metrics>) {
    loop {
        let s = store.clone();
        if let Ok(Some(bytes)) = tokio::task::spawn_blocking(move || s.size_on_disk()).await {
            metrics.store_bytes(bytes);
        }
        tokio::time::sleep(STORE_SIZE_EVERY).await;
    }
}

/// How often the store's size on disk is measured for the metrics.
pub const STORE_SIZE_EVERY: Duration = Duration::from_secs(10);

async fn serve<S: RelayStore>(
    config: Config,
    store: Arc<S>,
    observer: Observer,
    ready: impl FnOnce(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let Observer { metrics, health, .. } = &observer;
    let (metrics, health) = (metrics.clone(), health.clone());
    config.limits.validate()?;
    std::fs::create_dir_all(&config.data_dir)?;
    let keypair = load_identity(&config.data_dir)?;
    // What a crash left in the page cache but not on the disk is about to be treated as durable
    // (served, pushed, re-acknowledged): make it so before anything is served.
    {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.barrier()).await.map_err(|e| ServerError::Bug(e.to_string()))??;
    }
    health.first_barrier_done();
    let recovered = store.recover()?;
    let incarnation = recovered.incarnation;
    let core = RelayCore::new(recovered, config.limits.clone());
    // Devices with a session, of accounts the operator does not refuse: only they may use the
    // circuits.
    let registered = Registered::default();
    registered.write().unwrap_or_else(|e| e.into_inner()).extend(core.served_devices().iter().filter_map(peer_of));
    let limits = config.limits.clone();
    let socket = config.admin_socket.clone().unwrap_or_else(|| config.data_dir.join(crate::admin::SOCKET_NAME));
    let admin = AdminSocket::bind(&socket).await.map_err(|e| ServerError::Network(e.to_string()))?;
    tracing::info!(
        store = %incarnation.store.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        generation = incarnation.generation,
        "store opened"
    );

    let gate = SharedGate::new(&limits, metrics.clone());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| ServerError::Network(e.to_string()))?
        // Plain WebSocket over TCP, served only when `listen_ws` asks for it; TLS is a proxy's
        // job. Built here rather than with the builder's `with_websocket`, which also resolves
        // names and so needs the system's DNS settings: a relay only listens.
        .with_other_transport(|key| {
            use libp2p::core::upgrade::Version;
            use libp2p::Transport;
            let tcp = libp2p::tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                libp2p::websocket::Config::new(tcp)
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer)))
                    .boxed(),
            )
        })
        .map_err(|e| ServerError::Network(e.to_string()))?
        .with_behaviour(|key| Behaviour {
            gate: Gate(gate.clone()),
            stream: libp2p_stream::Behaviour::new(),
            identify: identify::Behaviour::new(identify::Config::new("/stratus/1.0.0".into(), key.public())),
            ping: ping::Behaviour::default(),
            relay: relay::Behaviour::new(key.public().to_peer_id(), circuit_config(&limits, &registered)),
        })
        .map_err(|e| ServerError::Network(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let peer_id = *swarm.local_peer_id();
    let tcp_listener = swarm.listen_on(config.listen.clone()).map_err(|e| ServerError::Network(e.to_string()))?;
    let mut ws_listener = match &config.listen_ws {
        Some(ws) => Some(swarm.listen_on(ws.clone()).map_err(|e| ServerError::Network(format!("{ws}: {e}")))?),
        None => None,
    };
    let listeners: Vec<_> = std::iter::once(tcp_listener).chain(ws_listener).collect();
    let mut tcp_addr: Option<Multiaddr> = None;
    let listen_addr = loop {
        if let (Some(a), None) = (&tcp_addr, ws_listener) {
            break a.clone();
        }
        match swarm.select_next_some().await {
            libp2p::swarm::SwarmEvent::NewListenAddr { listener_id, address } if Some(listener_id) == ws_listener => {
                tracing::info!(addr = %address.clone().with(libp2p::multiaddr::Protocol::P2p(peer_id)), "websocket listening");
                ws_listener = None;
            }
            libp2p::swarm::SwarmEvent::NewListenAddr { listener_id, address } if listener_id == tcp_listener => {
                tcp_addr.get_or_insert(address);
            }
            libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                return Err(ServerError::Network(error.to_string()))
            }
            libp2p::swarm::SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                return Err(ServerError::Network(e.to_string()))
            }
            _ => {}
        }
    };
    // A reservation is only granted with an address to reach the relay at.
    swarm.add_external_address(listen_addr.clone());
    for a in &config.external_addresses {
        swarm.add_external_address(a.clone());
    }
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming =
        control.accept(StreamProtocol::new(wire::PROTOCOL)).map_err(|e| ServerError::Network(e.to_string()))?;
    health.listening();
    ready(listen_addr.with(libp2p::multiaddr::Protocol::P2p(peer_id)));

    let observers = registered.clone();
    // Cancelled when the relay starts to drain: its listeners close; established connections
    // stay until their streams are closed.
    let stop_listening = CancellationToken::new();
    let stop = stop_listening.clone();
    // Cancelled once drained: every connection is closed gracefully (what the streams wrote
    // last, such as the final acknowledgements, is sent before the connection goes), and the
    // task ends when none is left.
    let close_connections = CancellationToken::new();
    let closing = close_connections.clone();
    let mut swarm_task = tokio::spawn(async move {
        use libp2p::swarm::SwarmEvent;
        let mut listening = true;
        let mut ending = false;
        loop {
            if ending && swarm.connected_peers().next().is_none() {
                return;
            }
            let event = tokio::select! {
                event = swarm.select_next_some() => event,
                () = stop.cancelled(), if listening => {
                    listening = false;
                    for l in &listeners {
                        swarm.remove_listener(*l);
                    }
                    tracing::info!("listeners closed: new connections are refused");
                    continue;
                }
                () = closing.cancelled(), if !ending => {
                    ending = true;
                    let peers: Vec<PeerId> = swarm.connected_peers().copied().collect();
                    for p in peers {
                        let _ = swarm.disconnect_peer_id(p);
                    }
                    continue;
                }
            };
            match &event {
                SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                    tracing::info!(%send_back_addr, %error, "connection refused");
                }
                SwarmEvent::NewListenAddr { address, .. } => swarm.add_external_address(address.clone()),
                // Only what the relay's own devices observed: anyone else could fill the list.
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                    peer_id, info, ..
                })) if swarm.external_addresses().count() < MAX_OBSERVED_ADDRESSES
                    && observers.read().unwrap_or_else(|e| e.into_inner()).contains(peer_id)
                    && !info.observed_addr.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit)) =>
                {
                    swarm.add_external_address(info.observed_addr.clone());
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => tracing::debug!(?e, "circuit relay"),
                _ => {}
            }
            tracing::trace!(?event, "swarm");
        }
    });

    let (in_tx, in_rx) = mpsc::channel::<CoreMsg>(INPUT_QUEUE);
    let accept_tx = in_tx.clone();
    let accept_task = tokio::spawn(async move {
        let mut next_conn: ConnId = 1;
        while let Some((peer, stream)) = incoming.next().await {
            // The gate holds the peer's streams to the limit per connection (see `core/gate.rs`).
            let Some(slot) = gate.stream(peer) else {
                drop(stream);
                continue;
            };
            let conn = next_conn;
            next_conn += 1;
            let queue = output_queue(&limits);
            tokio::spawn(stream::connection(
                conn,
                peer,
                stream,
                accept_tx.clone(),
                limits.max_frame_bytes,
                queue,
                slot,
            ));
        }
    });

    let (written_tx, written_rx) = watch::channel(0u64);
    let (drained_tx, mut drained_rx) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<StoreError>(1);
    let barrier_task =
        tokio::spawn(barrier_loop(store.clone(), written_rx, in_tx.clone(), fatal_tx.clone(), metrics.clone()));
    let core_task = tokio::spawn(core_loop(
        core,
        store.clone(),
        (in_rx, in_tx.downgrade()),
        (written_tx, drained_tx),
        fatal_tx,
        registered,
        metrics.clone(),
    ));
    let size_task = tokio::spawn(store_size_loop(store.clone(), metrics.clone()));
    let tick_task = tokio::spawn(tick_loop(in_tx.clone()));
    let (admin_tx, mut admin_rx) = mpsc::channel::<AdminRequest>(1);
    let admin_task = tokio::spawn(admin.serve(admin_tx, config.data_dir.clone()));
    let admin_core = in_tx.clone();
    let admin_fwd = tokio::spawn(async move {
        while let Some(r) = admin_rx.recv().await {
            if admin_core.send(CoreMsg::Admin(r)).await.is_err() {
                return;
            }
        }
    });

    let mut core_task = core_task;
    // The core task ends only on a bug (a panic): stop rather than serve without it.
    let bug = |r: Result<(), tokio::task::JoinError>| {
        ServerError::Bug(match r {
            Err(e) if e.is_panic() => "the core task panicked".into(),
            _ => "the core task stopped".into(),
        })
    };
    let mut result = tokio::select! {
        () = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(ServerError::Store(e)),
        r = &mut core_task => Err(bug(r)),
    };
    if result.is_ok() {
        // The lame-duck drain (see `run`).
        health.shutting_down(None);
        stop_listening.cancel();
        admin_task.abort();
        admin_fwd.abort();
        tracing::info!(grace_secs = config.shutdown_grace.as_secs(), "shutting down: draining the devices' streams");
        let _ = in_tx.send(CoreMsg::Input(Input::Drain)).await;
        result = tokio::select! {
            r = drained_rx.wait_for(|d| *d) => match r {
                Ok(_) => Ok(()),
                Err(_) => Err(ServerError::Bug("the core task stopped while draining".into())),
            },
            () = tokio::time::sleep(config.shutdown_grace) => {
                tracing::warn!("the shutdown grace ran out; closing the streams left");
                Ok(())
            }
            Some(e) = fatal_rx.recv() => Err(ServerError::Store(e)),
            r = &mut core_task => Err(bug(r)),
        };
    }
    if result.is_ok() {
        // The streams are closed; the connections under them are closed gracefully, so that
        // what was written last reaches the devices, for at most a few seconds.
        close_connections.cancel();
        let _ = tokio::time::timeout(CONNECTION_CLOSE_WAIT, &mut swarm_task).await;
    }
    health.shutting_down(result.as_ref().err().map(ToString::to_string));
    size_task.abort();
    accept_task.abort();
    core_task.abort();
    barrier_task.abort();
    tick_task.abort();
    admin_task.abort();
    admin_fwd.abort();
    swarm_task.abort();
    if result.is_ok() {
        // Make whatever was written durable before a clean exit.
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.barrier()).await.map_err(|e| ServerError::Network(e.to_string()))??;
        tracing::info!("stopped: everything written is durable");
    }
    result
}
