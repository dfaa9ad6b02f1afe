//! Streams ending, and the relay's own end: the lame-duck drain. Part of [`RelayCore`]; split
//! out of `core.rs` for size.
//!
//! Drain ([`Input::Drain`], when the operator stops the relay): the driver has already stopped
//! listening, so no new connection comes; the core
//! * answers nothing new: a request on any stream gets [`RelayFrame::RateLimited`] with
//!   [`DRAIN_RETRY_MS`] (what the device does with it: keep the request, ask again later, which
//!   means of the restarted relay; an append refused so stays in its outbox), `Hello` and
//!   `Typing` get nothing;
//! * lets what it accepted finish: the answers, pushes and account entries that wait for a
//!   barrier go out as the driver's barriers complete, as ever;
//! * once nothing waits for a barrier, closes every stream (each after what is queued on it;
//!   a stream opened meanwhile is closed at once): there is no frame that says "going away",
//!   and a device whose stream closes reconnects with its usual backoff;
//! * is [`RelayCore::drained`] once every stream has closed. The driver then runs a last
//!   barrier and exits; it stops waiting after its grace time whatever is left (a device that
//!   does not read cannot hold the relay up: the driver closes anyway, and what the device was
//!   not told stays in its outbox).

use super::*;

/// How long a device is told to wait before asking again when the relay is shutting down:
/// about how long a restart takes.
pub const DRAIN_RETRY_MS: u32 = 2_000;

impl RelayCore {
    /// A stream ended: its counts go back, its last activity is written, its link wait ends.
    pub(super) fn close(&mut self, conn: ConnId, out: &mut Vec<Effect>) {
        self.detach(conn);
        if let Some(c) = self.conns.remove(&conn) {
            self.peer_closed(&c.device);
            if let Some(d) = self.devices.get_mut(&c.device) {
                d.fetches_in_flight = d.fetches_in_flight.saturating_sub(c.fetches_in_flight);
                // Its last activity, kept across restarts for the account's session list.
                let state = d.state;
                if !self.storage_failed {
                    let token = self.token();
                    out.push(Effect::Write { token, ops: vec![StoreOp::PutDeviceState(c.device.clone(), state)] });
                }
            }
        }
        self.links.retain(|_, l| l.conn != conn);
    }

    pub(super) fn detach(&mut self, conn: ConnId) {
        if let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.account.take()) {
            if let Some(set) = self.conns_by_account.get_mut(&a) {
                set.remove(&conn);
                if set.is_empty() {
                    self.conns_by_account.remove(&a);
                }
            }
        }
    }

    pub(super) fn attach(&mut self, conn: ConnId, account: AccountId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.account = Some(account);
            self.conns_by_account.entry(account).or_default().insert(conn);
        }
    }

    /// A frame that came while draining: refused as [`RelayFrame::RateLimited`] when it is a
    /// request, dropped otherwise.
    pub(super) fn refuse_while_draining(conn: ConnId, frame: &ClientFrame, out: &mut Vec<Effect>) {
        if !matches!(frame, ClientFrame::Hello { .. } | ClientFrame::Typing { .. }) {
            let frame = RelayFrame::RateLimited { req: frame.req(), retry_after_ms: DRAIN_RETRY_MS };
            out.push(Effect::Send { conn, frame });
        }
    }

    /// After every input while draining: once nothing waits for a barrier, every stream not
    /// yet told is closed.
    pub(super) fn drain_step(&mut self, out: &mut Vec<Effect>) {
        let Some(closed) = &mut self.draining else { return };
        if !self.deferred.is_empty() {
            return;
        }
        for conn in self.conns.keys() {
            if closed.insert(*conn) {
                out.push(Effect::Close { conn: *conn });
            }
        }
    }

    /// Whether a drain is done: asked to drain, nothing waits for a barrier, no stream is open.
    /// (What the streams' closing wrote, their last activity, is for the driver's last barrier.)
    pub fn drained(&self) -> bool {
        self.draining.is_some() && self.deferred.is_empty() && self.conns.is_empty()
    }

    /// Whether [`Input::Drain`] came.
    pub fn draining(&self) -> bool {
        self.draining.is_some()
    }
}
