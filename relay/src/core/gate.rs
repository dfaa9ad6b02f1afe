//! The connection gate: how many connections the relay holds, in total, per peer, and still in
//! their handshake, and how many sync streams each peer has open; sans-IO.
//!
//! The driver (`server/gate.rs`) reports each connection's handshake, establishment and close
//! and each sync stream's opening and end, and carries out the refusals (a connection over a
//! limit is denied right after its handshake, a stream over it is reset). It is generic over the
//! transport's peer and connection ids so that it knows nothing of them.
//!
//! Nothing outlives what it counts: a peer's entry goes with its last connection and its last
//! stream, so a flood of fresh identities that connect and leave leaves no trace here (the
//! `connection_limits` behaviour this replaces kept an empty entry per peer ever seen).

use std::collections::{BTreeMap, BTreeSet};

use crate::limits::Limits;

/// Why the gate refused a connection or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// Too many connections in their handshake ([`Limits::max_connections`], at most 1,024).
    #[error("too many connections in their handshake ({0})")]
    Handshakes(u32),
    /// Too many established connections ([`Limits::max_connections`]).
    #[error("too many connections ({0})")]
    Connections(u32),
    /// Too many established connections from this peer ([`Limits::max_connections_per_peer`]).
    #[error("too many connections from this peer ({0})")]
    PeerConnections(u32),
    /// Too many sync streams on this peer's connections ([`Limits::max_streams_per_connection`]
    /// per connection).
    #[error("too many sync streams on this peer's connections ({0})")]
    Streams(u32),
}

/// One peer's open connections and sync streams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PeerEntry {
    connections: u32,
    streams: u32,
}

/// The counts; `P` is the transport's peer id, `C` its connection id.
#[derive(Debug)]
pub struct ConnectionGate<P, C> {
    max_connections: u32,
    max_per_peer: u32,
    max_handshakes: u32,
    max_streams_per_connection: u32,
    /// Connections in their handshake.
    handshakes: BTreeSet<C>,
    /// Established connections and their peers.
    established: BTreeMap<C, P>,
    /// Peers with a connection or a stream open.
    peers: BTreeMap<P, PeerEntry>,
}

impl<P: Ord + Clone, C: Ord + Copy> ConnectionGate<P, C> {
    /// An empty gate enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        ConnectionGate {
            max_connections: limits.max_connections,
            max_per_peer: limits.max_connections_per_peer,
            // Handshakes in progress cost memory too; allow a reasonable share.
            max_handshakes: limits.max_connections.min(1024),
            max_streams_per_connection: limits.max_streams_per_connection,
            handshakes: BTreeSet::new(),
            established: BTreeMap::new(),
            peers: BTreeMap::new(),
        }
    }

    /// A connection came in and starts its handshake.
    pub fn handshake_started(&mut self, conn: C) -> Result<(), GateRefusal> {
        if self.handshakes.len() >= self.max_handshakes as usize {
            return Err(GateRefusal::Handshakes(self.max_handshakes));
        }
        self.handshakes.insert(conn);
        Ok(())
    }

    /// A connection's handshake failed (or it was refused before it ended).
    pub fn handshake_failed(&mut self, conn: C) {
        self.handshakes.remove(&conn);
    }

    /// A connection finished its handshake with `peer`: whether it may stay. It is counted once
    /// [`ConnectionGate::established`] reports it (the transport may still refuse it for other
    /// reasons in between).
    pub fn admit(&mut self, conn: C, peer: &P) -> Result<(), GateRefusal> {
        self.handshakes.remove(&conn);
        if self.established.len() >= self.max_connections as usize {
            return Err(GateRefusal::Connections(self.max_connections));
        }
        if self.peers.get(peer).map_or(0, |p| p.connections) >= self.max_per_peer {
            return Err(GateRefusal::PeerConnections(self.max_per_peer));
        }
        Ok(())
    }

    /// A connection admitted is established.
    pub fn established(&mut self, conn: C, peer: P) {
        if self.established.insert(conn, peer.clone()).is_none() {
            self.peers.entry(peer).or_default().connections += 1;
        }
    }

    /// A connection closed.
    pub fn closed(&mut self, conn: C) {
        self.handshakes.remove(&conn);
        if let Some(peer) = self.established.remove(&conn) {
            self.change(&peer, |p| p.connections = p.connections.saturating_sub(1));
        }
    }

    /// A sync stream from `peer` opened: whether it may stay (its streams are held to the limit
    /// times its connections, at least one: the transport does not say which connection a
    /// stream came on). Counted until [`ConnectionGate::stream_closed`] when admitted.
    pub fn stream_opened(&mut self, peer: &P) -> Result<(), GateRefusal> {
        let entry = self.peers.get(peer).copied().unwrap_or_default();
        let allowed = self.max_streams_per_connection.saturating_mul(entry.connections.max(1));
        if entry.streams >= allowed {
            return Err(GateRefusal::Streams(allowed));
        }
        self.peers.entry(peer.clone()).or_default().streams += 1;
        Ok(())
    }

    /// A sync stream admitted by [`ConnectionGate::stream_opened`] ended.
    pub fn stream_closed(&mut self, peer: &P) {
        self.change(peer, |p| p.streams = p.streams.saturating_sub(1));
    }

    /// Established connections.
    pub fn connections(&self) -> usize {
        self.established.len()
    }

    /// Peers with a connection or stream open (the entries the gate holds).
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Connections in their handshake.
    pub fn handshakes(&self) -> usize {
        self.handshakes.len()
    }

    fn change(&mut self, peer: &P, f: impl FnOnce(&mut PeerEntry)) {
        if let Some(p) = self.peers.get_mut(peer) {
            f(p);
            if *p == PeerEntry::default() {
                self.peers.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_connections: u32, per_peer: u32, streams: u32) -> ConnectionGate<u64, u64> {
        ConnectionGate::new(&Limits {
            max_connections,
            max_connections_per_peer: per_peer,
            max_streams_per_connection: streams,
            ..Limits::default()
        })
    }

    /// One connection (and a stream on it) of `peer`, through the gate as the driver reports it.
    fn connect(g: &mut ConnectionGate<u64, u64>, conn: u64, peer: u64) -> Result<(), GateRefusal> {
        g.handshake_started(conn)?;
        g.admit(conn, &peer)?;
        g.established(conn, peer);
        Ok(())
    }

    /// The leak the gate replaces: every peer that connected and left is forgotten, whatever
    /// order its connection and its stream end in.
    #[test]
    fn peers_that_left_leave_nothing() {
        let mut g = gate(100, 8, 4);
        for i in 0..10_000u64 {
            connect(&mut g, i, i).expect("admitted");
            g.stream_opened(&i).expect("a stream");
            if i % 2 == 0 {
                g.closed(i);
                g.stream_closed(&i);
            } else {
                g.stream_closed(&i);
                g.closed(i);
            }
        }
        // Handshakes that failed, and peers whose stream came after their connection went.
        for i in 10_000..10_100u64 {
            g.handshake_started(i).expect("room");
            g.handshake_failed(i);
            g.stream_opened(&i).expect("a stream");
            g.stream_closed(&i);
        }
        assert_eq!((g.peers(), g.connections(), g.handshakes()), (0, 0, 0));
    }

    #[test]
    fn limits_in_total_per_peer_and_per_stream() {
        let mut g = gate(3, 2, 2);
        connect(&mut g, 1, 7).expect("first");
        connect(&mut g, 2, 7).expect("second");
        assert_eq!(connect(&mut g, 3, 7), Err(GateRefusal::PeerConnections(2)));
        connect(&mut g, 4, 8).expect("another peer");
        assert_eq!(connect(&mut g, 5, 9), Err(GateRefusal::Connections(3)));
        // A refused connection is not counted; a closed one makes room.
        assert_eq!((g.connections(), g.handshakes()), (3, 0));
        g.closed(4);
        connect(&mut g, 6, 9).expect("room again");
        // Streams: the limit times the peer's connections.
        for _ in 0..4 {
            g.stream_opened(&7).expect("within 2 × 2");
        }
        assert_eq!(g.stream_opened(&7), Err(GateRefusal::Streams(4)));
        g.stream_closed(&7);
        g.stream_opened(&7).expect("one ended");
    }

    #[test]
    fn handshakes_are_bounded() {
        let mut g = gate(2, 8, 4);
        g.handshake_started(1).expect("one");
        g.handshake_started(2).expect("two");
        assert_eq!(g.handshake_started(3), Err(GateRefusal::Handshakes(2)));
        g.handshake_failed(1);
        g.handshake_started(3).expect("room");
        // A refused established connection ends its handshake too.
        assert!(g.admit(2, &5).is_ok());
        assert_eq!(g.handshakes(), 1);
    }
}
