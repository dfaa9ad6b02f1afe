//! The connection gate's driver: a libp2p behaviour that reports connections to the sans-IO
//! [`ConnectionGate`] and denies those it refuses; the accept task asks it for each sync stream
//! ([`StreamSlot`]).
//!
//! It replaces libp2p's `connection_limits` behaviour, which kept an entry per peer ever seen
//! (so a flood of fresh identities grew the relay without bound). The gate's sizes go to the
//! metrics on every change (`connections`, `gate_peers`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use libp2p::core::{transport::PortUse, Endpoint};
use libp2p::swarm::{
    behaviour::ConnectionEstablished, dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm,
    ListenFailure, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::core::ConnectionGate;
use crate::limits::Limits;
use crate::metrics::Metrics;

/// The gate, shared by the swarm task (connections) and the accept task (streams).
#[derive(Clone)]
pub(super) struct SharedGate {
    gate: Arc<Mutex<ConnectionGate<PeerId, ConnectionId>>>,
    metrics: Arc<Metrics>,
}

impl SharedGate {
    pub(super) fn new(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        SharedGate { gate: Arc::new(Mutex::new(ConnectionGate::new(limits))), metrics }
    }

    /// Runs `f` on the gate and reports its sizes.
    fn with<T>(&self, f: impl FnOnce(&mut ConnectionGate<PeerId, ConnectionId>) -> T) -> T {
        let mut g: MutexGuard<'_, _> = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut g);
        self.metrics.gate(g.connections(), g.peers());
        out
    }

    /// A sync stream from `peer`: its place, or `None` when the gate refuses it.
    pub(super) fn stream(&self, peer: PeerId) -> Option<StreamSlot> {
        match self.with(|g| g.stream_opened(&peer)) {
            Ok(()) => Some(StreamSlot { peer, gate: self.clone() }),
            Err(e) => {
                tracing::info!(%peer, %e, "resetting a new sync stream");
                None
            }
        }
    }
}

/// Gives a sync stream's place back when its task ends, however it ends.
pub(super) struct StreamSlot {
    peer: PeerId,
    gate: SharedGate,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.gate.with(|g| g.stream_closed(&self.peer));
    }
}

/// The behaviour: reports and denies, nothing else.
pub(super) struct Gate(pub(super) SharedGate);

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        conn: ConnectionId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0.with(|g| g.handshake_started(conn)).map_err(ConnectionDenied::new)
    }

    fn handle_established_inbound_connection(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.with(|g| g.admit(conn, &peer)).map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.with(|g| g.admit(conn, &peer)).map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished { peer_id, connection_id, .. }) => {
                self.0.with(|g| g.established(connection_id, peer_id));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.0.with(|g| g.closed(connection_id));
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.0.with(|g| g.handshake_failed(connection_id));
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
