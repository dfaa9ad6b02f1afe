//! A full disk: the driver reports [`Input::WriteFailed`] when a write or a barrier fails for
//! lack of space, and the relay goes on without writing. Part of [`RelayCore`].
//!
//! From then on nothing more is written, so nothing more becomes durable: every answer and push
//! that waited for a barrier is dropped (answers become refusals), every request that would
//! write is refused, and what is durable is served as before (pages, sync states, directory
//! lookups). The refusal is `Internal` with a message that says why: devices keep such an
//! append in their outbox and send it again on their next connection, so nothing a device wrote
//! is lost; it is stored once the operator has freed space and restarted the relay. (The store
//! cannot be trusted to write again after a failed write until it is reopened, so the relay does
//! not try.) What the core changed in memory for writes that never reached the disk is never
//! revealed: reads are capped at durable heads, and the pushes and answers that would have
//! revealed it are gone.

use super::*;

/// The answer to a request that would write, once the disk is full.
pub(super) fn storage_full(conn: ConnId, req: ReqId) -> Effect {
    error_frame(
        conn,
        Some(req),
        ErrorCode::Internal,
        "the relay's disk is full: it stores nothing more until its operator frees space and restarts it; what is \
         stored can still be read",
    )
}

/// Whether `frame` asks the relay to store something.
pub(super) fn writes(frame: &ClientFrame) -> bool {
    matches!(
        frame,
        ClientFrame::CreateAccount { .. }
            | ClientFrame::LinkApprove { .. }
            | ClientFrame::Recover { .. }
            | ClientFrame::PutRecovery { .. }
            | ClientFrame::SetSessionTtl { .. }
            | ClientFrame::Revoke { .. }
            | ClientFrame::Rotate { .. }
            | ClientFrame::CreateChat { .. }
            | ClientFrame::Append { .. }
            | ClientFrame::SetUsername { .. }
            | ClientFrame::ChangeMembers { .. }
            | ClientFrame::Rekey { .. }
            | ClientFrame::Accept { .. }
            | ClientFrame::Invite { .. }
            | ClientFrame::Checkpoint { .. }
    )
}

impl RelayCore {
    /// The disk is full (see the module docs).
    pub(super) fn write_failed(&mut self, out: &mut Vec<Effect>) {
        if self.storage_failed {
            return;
        }
        self.storage_failed = true;
        for (_, d) in std::mem::take(&mut self.deferred) {
            self.refuse_deferred(d, out);
        }
    }

    /// Whether the disk has been found full.
    pub fn storage_failed(&self) -> bool {
        self.storage_failed
    }

    /// Drops what waited for a barrier that will never come: an answer becomes a refusal, a
    /// push is dropped.
    pub(super) fn refuse_deferred(&mut self, d: Deferred, out: &mut Vec<Effect>) {
        let (conn, frame) = match d {
            Deferred::Send(conn, frame) => (conn, frame),
            Deferred::AppendDone(conn, device, frame) => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.appends_in_flight = d.appends_in_flight.saturating_sub(1);
                }
                (conn, frame)
            }
            Deferred::EndSession(conn) => return self.send_session_end(conn, false, out),
            Deferred::Admin(id, _) => return out.push(Effect::Admin { id, answer: Err(AdminRefusal::storage_full()) }),
            Deferred::ChatDurable { .. } | Deferred::AccountDurable { .. } => return,
        };
        if let (Some(req), true) = (frame.req(), self.conns.get(&conn).is_some_and(|c| !c.ending && !c.refused)) {
            out.push(storage_full(conn, req));
        }
    }
}
