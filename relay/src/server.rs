//! The relay driver: libp2p, one task per device stream, the core task, the barrier task.
//!
//! Bounds (each documented where it is defined):
//! * [`INPUT_QUEUE`] frames wait for the core task; readers wait when it is full.
//! * [`OUTPUT_QUEUE`] frames wait for each device; a device that lets it fill is disconnected,
//!   which keeps the relay's memory flat when a peer stops reading. It catches up on reconnect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use stratus_engine::proto::wire::{self, ClientFrame, FrameError, RelayFrame, MAX_FRAME_BYTES};
use stratus_engine::DeviceId;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::core::{ConnId, Effect, Input, RelayCore};
use crate::store::{RelayStore, SledStore, StoreError};

/// Frames from all device streams waiting for the core task.
pub const INPUT_QUEUE: usize = 4096;
/// Frames waiting to be written to one device; when full the device is disconnected.
pub const OUTPUT_QUEUE: usize = 256;
/// Most inputs the core task takes in one go; their writes share one store transaction.
pub const CORE_BATCH: usize = 256;

/// Relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sled store and the relay's identity key live.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: Multiaddr,
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
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

enum Outgoing {
    Frame(RelayFrame),
    Close,
}

enum CoreMsg {
    Open { conn: ConnId, device: DeviceId, tx: mpsc::Sender<Outgoing> },
    Input(Input),
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
pub async fn run(
    config: Config,
    ready: impl FnOnce(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Arc::new(SledStore::open(&config.data_dir.join("store"))?);
    run_with_store(config, store, ready, shutdown).await
}

/// [`run`] over any [`RelayStore`] (tests wrap the sled store to hold back or fail barriers).
pub async fn run_with_store<S: RelayStore>(
    config: Config,
    store: Arc<S>,
    ready: impl FnOnce(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let keypair = load_identity(&config.data_dir)?;
    // What a crash left in the page cache but not on the disk is about to be treated as durable
    // (served, pushed, re-acknowledged): make it so before anything is served.
    {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.barrier()).await.map_err(|e| ServerError::Bug(e.to_string()))??;
    }
    let recovered = store.recover()?;
    let core = RelayCore::new(recovered);

    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| ServerError::Network(e.to_string()))?
        .with_behaviour(|key| Behaviour {
            stream: libp2p_stream::Behaviour::new(),
            identify: identify::Behaviour::new(identify::Config::new("/stratus/1.0.0".into(), key.public())),
            ping: ping::Behaviour::default(),
        })
        .map_err(|e| ServerError::Network(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let peer_id = *swarm.local_peer_id();
    swarm.listen_on(config.listen.clone()).map_err(|e| ServerError::Network(e.to_string()))?;
    let listen_addr = loop {
        match swarm.select_next_some().await {
            libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } => break address,
            libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                return Err(ServerError::Network(error.to_string()))
            }
            libp2p::swarm::SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                return Err(ServerError::Network(e.to_string()))
            }
            _ => {}
        }
    };
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming =
        control.accept(StreamProtocol::new(wire::PROTOCOL)).map_err(|e| ServerError::Network(e.to_string()))?;
    ready(listen_addr.with(libp2p::multiaddr::Protocol::P2p(peer_id)));

    let swarm_task = tokio::spawn(async move {
        loop {
            let event = swarm.select_next_some().await;
            tracing::trace!(?event, "swarm");
        }
    });

    let (in_tx, in_rx) = mpsc::channel::<CoreMsg>(INPUT_QUEUE);
    let accept_tx = in_tx.clone();
    let accept_task = tokio::spawn(async move {
        let mut next_conn: ConnId = 1;
        while let Some((peer, stream)) = incoming.next().await {
            let conn = next_conn;
            next_conn += 1;
            tokio::spawn(connection(conn, peer, stream, accept_tx.clone()));
        }
    });

    let (written_tx, written_rx) = watch::channel(0u64);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<StoreError>(1);
    let barrier_task = tokio::spawn(barrier_loop(store.clone(), written_rx, in_tx.clone(), fatal_tx.clone()));
    let core_task = tokio::spawn(core_loop(core, store.clone(), in_rx, written_tx, fatal_tx));

    let mut core_task = core_task;
    let result = tokio::select! {
        () = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(ServerError::Store(e)),
        // The core task ends only on a bug (a panic): stop rather than serve without it.
        r = &mut core_task => Err(ServerError::Bug(match r {
            Err(e) if e.is_panic() => "the core task panicked".into(),
            _ => "the core task stopped".into(),
        })),
    };
    accept_task.abort();
    core_task.abort();
    barrier_task.abort();
    swarm_task.abort();
    if result.is_ok() {
        // Make whatever was written durable before a clean exit.
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.barrier()).await.map_err(|e| ServerError::Network(e.to_string()))??;
    }
    result
}

async fn barrier_loop<S: RelayStore>(
    store: Arc<S>,
    mut written: watch::Receiver<u64>,
    in_tx: mpsc::Sender<CoreMsg>,
    fatal: mpsc::Sender<StoreError>,
) {
    let mut done = 0u64;
    loop {
        if written.wait_for(|t| *t > done).await.is_err() {
            return;
        }
        let target = *written.borrow_and_update();
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.barrier()).await {
            Ok(Ok(())) => {
                done = target;
                if in_tx.send(CoreMsg::Input(Input::Durable { token: target })).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "fsync barrier failed; no further acknowledgements");
                let _ = fatal.send(e).await;
                return;
            }
            Err(e) => {
                let _ = fatal.send(StoreError::Barrier(std::io::Error::other(e.to_string()))).await;
                return;
            }
        }
    }
}

async fn core_loop<S: RelayStore>(
    mut core: RelayCore,
    store: Arc<S>,
    mut in_rx: mpsc::Receiver<CoreMsg>,
    written: watch::Sender<u64>,
    fatal: mpsc::Sender<StoreError>,
) {
    let mut conns: BTreeMap<ConnId, mpsc::Sender<Outgoing>> = BTreeMap::new();
    // The writes of every input drained in one go are applied as one sled transaction: sled
    // 0.34 pays two log-buffer rolls (two device writes) per transaction, which capped the relay
    // at ~6,400 appends/s with one transaction per append (docs/benchmarks.md). Nothing reveals
    // a write before its barrier, and the barrier only starts after the batch is applied.
    let mut ops: Vec<crate::core::StoreOp> = Vec::new();
    let mut batch_token = 0u64;
    let mut batch: Vec<CoreMsg> = Vec::with_capacity(CORE_BATCH);
    while in_rx.recv_many(&mut batch, CORE_BATCH).await > 0 {
        for msg in batch.drain(..) {
            let input = match msg {
                CoreMsg::Open { conn, device, tx } => {
                    conns.insert(conn, tx);
                    Input::Opened { conn, device }
                }
                CoreMsg::Input(i) => {
                    if let Input::Closed { conn } = &i {
                        conns.remove(conn);
                    }
                    i
                }
            };
            log_input(&input);
            let mut queue = std::collections::VecDeque::from(core.handle(input));
            while let Some(effect) = queue.pop_front() {
                let send =
                    |conns: &mut BTreeMap<ConnId, mpsc::Sender<Outgoing>>, conn: ConnId, out: Outgoing| -> bool {
                        match conns.get(&conn).map(|tx| tx.try_send(out)) {
                            Some(Ok(())) | None => true,
                            Some(Err(_)) => {
                                tracing::warn!(conn, "device is not reading; disconnecting it");
                                conns.remove(&conn);
                                false
                            }
                        }
                    };
                let mut dropped = None;
                match effect {
                    Effect::Send { conn, frame } => {
                        if let RelayFrame::Error { req, code, message } = &frame {
                            tracing::debug!(conn, ?req, ?code, %message, "refused");
                        }
                        if !send(&mut conns, conn, Outgoing::Frame(frame)) {
                            dropped = Some(conn);
                        }
                    }
                    Effect::Close { conn } => {
                        send(&mut conns, conn, Outgoing::Close);
                    }
                    Effect::Write { token, ops: more } => {
                        ops.extend(more);
                        batch_token = batch_token.max(token);
                    }
                    Effect::ReadChat { conn, req, chat, after, upto, max } => {
                        let frame = match store.read_chat(chat, after, upto, max) {
                            Ok(deltas) => RelayFrame::ChatPage { req, chat, deltas, head: upto },
                            Err(e) => internal(req, e),
                        };
                        if !send(&mut conns, conn, Outgoing::Frame(frame)) {
                            dropped = Some(conn);
                        }
                    }
                    Effect::ReadAccount { conn, req, account, after, upto, max } => {
                        let frame = match store.read_account(account, after, upto, max) {
                            Ok(entries) => RelayFrame::AccountPage { req, entries, head: upto },
                            Err(e) => internal(req, e),
                        };
                        if !send(&mut conns, conn, Outgoing::Frame(frame)) {
                            dropped = Some(conn);
                        }
                    }
                }
                if let Some(conn) = dropped {
                    queue.extend(core.handle(Input::Closed { conn }));
                }
            }
        }
        if !ops.is_empty() {
            if let Err(e) = store.apply(&ops) {
                tracing::error!(error = %e, "store write failed; no further acknowledgements");
                let _ = fatal.send(e).await;
                return;
            }
            ops.clear();
            written.send_replace(batch_token);
        }
    }
}

/// Logs what arrives without ever printing payload bytes (sealed as they are, they are the
/// devices' business).
fn log_input(input: &Input) {
    match input {
        Input::Opened { conn, device } => tracing::info!(conn, %device, "device stream opened"),
        Input::Closed { conn } => tracing::info!(conn, "device stream closed"),
        Input::BadFrame { conn, error } => tracing::info!(conn, %error, "bad frame"),
        Input::Durable { token } => tracing::trace!(token, "barrier done"),
        Input::Frame { conn, frame } => match frame {
            ClientFrame::Append { req, chat, client_seq, sealed, .. } => {
                tracing::debug!(conn, req, %chat, client_seq = client_seq.0, bytes = sealed.len(), "append")
            }
            ClientFrame::FetchChat { req, chat, after, .. } => {
                tracing::debug!(conn, req, %chat, after = after.0, "fetch chat")
            }
            ClientFrame::FetchAccount { req, after, .. } => {
                tracing::debug!(conn, req, after = after.0, "fetch account log")
            }
            ClientFrame::CreateChat { req, chat, .. } => tracing::debug!(conn, req, %chat, "create chat"),
            ClientFrame::CreateAccount { req, account, .. } => {
                tracing::debug!(conn, req, account = %account.id, "create account")
            }
            ClientFrame::LinkWait { req, .. } => tracing::debug!(conn, req, "link wait"),
            ClientFrame::LinkLookup { req, .. } => tracing::debug!(conn, req, "link lookup"),
            ClientFrame::LinkApprove { req, .. } => tracing::debug!(conn, req, "link approve"),
            ClientFrame::SyncState { req } => tracing::debug!(conn, req, "sync state"),
            ClientFrame::Hello { version } => tracing::debug!(conn, version, "hello"),
        },
    }
}

fn internal(req: u64, e: StoreError) -> RelayFrame {
    tracing::error!(error = %e, "store read failed");
    RelayFrame::Error {
        req: Some(req),
        code: wire::ErrorCode::Internal,
        message: "the relay's store failed to read".into(),
    }
}

async fn connection(conn: ConnId, peer: PeerId, stream: libp2p::Stream, core: mpsc::Sender<CoreMsg>) {
    let codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec();
    let mut framed = Framed::new(stream.compat(), codec);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(OUTPUT_QUEUE);
    if core.send(CoreMsg::Open { conn, device: DeviceId(peer.to_string()), tx }).await.is_err() {
        return;
    }
    // One task reads and writes: frames for the core go out through a bounded channel (the
    // reader waits when the core is busy), frames for the device come in through another.
    // (Splitting the framed stream into a reader task and a writer task stalled the write
    // direction now and then under a steady append load: a lost wake-up between the split's
    // lock and the yamux stream. One task with `select!` has no such hand-off.)
    let mut reading = true;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outgoing::Frame(frame)) => {
                    let bytes = match wire::encode(&frame) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(error = %e, "dropping a frame that does not encode");
                            continue;
                        }
                    };
                    if framed.send(bytes::Bytes::from(bytes)).await.is_err() {
                        break;
                    }
                }
                Some(Outgoing::Close) | None => break,
            },
            item = framed.next(), if reading => {
                let input = match item {
                    Some(Ok(bytes)) => match wire::decode::<ClientFrame>(&bytes) {
                        Ok(frame) => Input::Frame { conn, frame },
                        Err(error) => Input::BadFrame { conn, error },
                    },
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                        // An oversized length prefix: the rest of the stream cannot be framed.
                        // The core answers with an error and a close, which this loop still sends.
                        reading = false;
                        Input::BadFrame { conn, error: FrameError::TooLarge(0) }
                    }
                    Some(Err(_)) | None => break,
                };
                if core.send(CoreMsg::Input(input)).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = core.send(CoreMsg::Input(Input::Closed { conn })).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), SinkExt::<bytes::Bytes>::close(&mut framed)).await;
}
