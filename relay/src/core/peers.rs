//! What one peer may cost the relay apart from any account: requests before it has a session,
//! malformed frames, recovery attempts. Part of [`RelayCore`].
//!
//! A peer is a transport identity (its device id), authenticated by the transport; anyone can make
//! a new one, so these budgets bound what one connection-holding peer does, and the connection
//! limits bound how many there are at once. None of them is relay-wide: a peer that spends its
//! own budget leaves everyone else's alone. A peer's entry lives while it has a stream open and
//! until its budgets are full again (a full bucket is the same as a new one, so dropping it then
//! changes nothing, and reconnecting never refills a budget early).

use super::*;
use crate::core::records::{RECOVERY_ATTEMPTS_PER_SECOND, RECOVERY_BURST};

/// One peer's budgets.
#[derive(Debug, Default)]
pub(super) struct Peer {
    /// Its open streams.
    streams: u32,
    /// Its requests while it has no session (see [`Limits::unregistered_requests_per_second`]).
    requests: TokenBucket,
    /// Its recovery lookups and registrations ([`RECOVERY_ATTEMPTS_PER_SECOND`]).
    recovery: TokenBucket,
}

impl Peer {
    /// It has a stream open (a connected device, not one kept for its budgets).
    pub(super) fn has_streams(&self) -> bool {
        self.streams > 0
    }
}

impl RelayCore {
    pub(super) fn peer_opened(&mut self, device: &DeviceId) {
        self.peers.entry(device.clone()).or_default().streams += 1;
    }

    pub(super) fn peer_closed(&mut self, device: &DeviceId) {
        if let Some(p) = self.peers.get_mut(device) {
            p.streams = p.streams.saturating_sub(1);
        }
    }

    /// Takes one request from the budget of a peer without a session; the wait when it is
    /// spent.
    pub(super) fn peer_over_rate(&mut self, device: &DeviceId, now_ms: u64) -> Option<u32> {
        let (rate, burst) = (self.limits.unregistered_requests_per_second, self.limits.unregistered_request_burst);
        self.peers.entry(device.clone()).or_default().requests.take(now_ms, rate, burst).err()
    }

    /// Takes one recovery attempt from the peer's budget, or answers `RateLimited`.
    pub(super) fn recovery_attempt(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> bool {
        let p = self.peers.entry(device.clone()).or_default();
        match p.recovery.take(now_ms, RECOVERY_ATTEMPTS_PER_SECOND, RECOVERY_BURST) {
            Ok(()) => true,
            Err(retry_after_ms) => {
                out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms } });
                false
            }
        }
    }

    /// Drops the entries of peers gone whose budgets are full again (on the driver's tick).
    pub(super) fn prune_peers(&mut self) {
        let now = self.frame_clock_ms;
        let (rate, burst) = (self.limits.unregistered_requests_per_second, self.limits.unregistered_request_burst);
        self.peers.retain(|_, p| {
            p.streams > 0
                || !p.requests.is_full(now, rate, burst)
                || !p.recovery.is_full(now, RECOVERY_ATTEMPTS_PER_SECOND, RECOVERY_BURST)
        });
    }

    /// A frame that did not decode. It costs its peer a request (from its device's budget, or
    /// the budget of a peer without a session); one over the budget closes the stream instead
    /// of being answered, so a flood of garbage costs the relay one answer per allowed request.
    pub(super) fn bad_frame(&mut self, conn: ConnId, error: FrameError, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get(&conn) else { return };
        if let FrameError::TooLarge(_) = error {
            out.push(error_frame(conn, None, ErrorCode::FrameTooLarge, error.to_string()));
            out.push(Effect::Close { conn });
            return;
        }
        self.frame_clock_ms = self.frame_clock_ms.max(now_ms);
        let device = c.device.clone();
        let registered = c.account.is_some();
        let over = match self.devices.get_mut(&device) {
            Some(d) if registered => {
                d.bucket.take(now_ms, self.limits.requests_per_second, self.limits.request_burst).is_err()
            }
            _ => self.peer_over_rate(&device, now_ms).is_some(),
        };
        if over {
            out.push(error_frame(
                conn,
                None,
                ErrorCode::MalformedFrame,
                "too many malformed frames; closing the stream",
            ));
            out.push(Effect::Close { conn });
            return;
        }
        out.push(error_frame(conn, None, ErrorCode::MalformedFrame, error.to_string()));
    }
}
