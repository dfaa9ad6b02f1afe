//! The device's libp2p side: one swarm per device, one sync stream to the relay.
//!
//! libp2p only carries bytes here: the swarm task dials and keeps connections; the sync stream
//! is a plain framed stream from `libp2p-stream`, and all protocol logic lives in the sans-IO
//! [`crate::core::SyncCore`].

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
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
}

enum SwarmCmd {
    Dial { peer: PeerId, addr: Multiaddr, reply: oneshot::Sender<Result<(), String>> },
}

/// A running libp2p swarm for this device. Dropping it stops the swarm.
pub struct Net {
    control: libp2p_stream::Control,
    cmd: mpsc::Sender<SwarmCmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Splits `…/p2p/<peer id>` into the peer id and the full address.
pub fn parse_relay_addr(s: &str) -> Result<(PeerId, Multiaddr), NetError> {
    let addr: Multiaddr = s.parse().map_err(|_| NetError::BadAddress(s.into()))?;
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok((peer, addr)),
        _ => Err(NetError::BadAddress(s.into())),
    }
}

impl Net {
    /// Starts the swarm with the device's keypair. Must be called inside a tokio runtime.
    pub fn start(keypair: Keypair) -> Result<Net, NetError> {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_behaviour(|key| Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(identify::Config::new("/stratus/1.0.0".into(), key.public())),
                ping: ping::Behaviour::default(),
            })
            .map_err(|e| NetError::Unreachable(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        let control = swarm.behaviour().stream.new_control();
        let (cmd, mut cmd_rx) = mpsc::channel::<SwarmCmd>(8);
        let task = tokio::spawn(async move {
            let mut waiting: Vec<(PeerId, oneshot::Sender<Result<(), String>>)> = Vec::new();
            loop {
                tokio::select! {
                    Some(c) = cmd_rx.recv() => match c {
                        SwarmCmd::Dial { peer, addr, reply } => {
                            if swarm.is_connected(&peer) {
                                let _ = reply.send(Ok(()));
                            } else if let Err(e) = swarm.dial(addr) {
                                let _ = reply.send(Err(e.to_string()));
                            } else {
                                waiting.retain(|(_, r)| !r.is_closed());
                                waiting.push((peer, reply));
                            }
                        }
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            for (_, r) in extract(&mut waiting, peer_id) {
                                let _ = r.send(Ok(()));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                            for (_, r) in extract(&mut waiting, peer_id) {
                                let _ = r.send(Err(error.to_string()));
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(Net { control, cmd, task })
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

fn extract<T>(v: &mut Vec<(PeerId, T)>, peer: PeerId) -> Vec<(PeerId, T)> {
    let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(v).into_iter().partition(|(p, _)| *p == peer);
    *v = keep;
    hit
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
