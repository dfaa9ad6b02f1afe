//! What waits to be written to each device stream, and what the relay does when a device falls
//! behind or stops reading. Part of [`RelayCore`]; the policy lives here rather than in the
//! driver so that the simulator and the fuzzer run it.
//!
//! * Every frame handed to the driver in an [`Effect::Send`] counts its [`frame_cost`] against
//!   its stream until the driver reports it written ([`Input::Sent`]). Pages are not counted
//!   here: the fetch limit bounds them, and they count as waiting until sent.
//! * Answers to requests (acknowledgements, pages, errors, everything with a `req`) are never
//!   dropped: the device asked for them, and the asking is the flow control.
//! * Pushes (`Push`, `PushAccount`, `Typing`) to a stream with more than
//!   [`Limits::max_push_backlog_bytes`] waiting are dropped, and so is every push after them
//!   until the backlog falls to half of that. The stream remembers which chats (and whether the
//!   account log) it missed pushes for, at most the account's chats; then it sends one
//!   [`RelayFrame::Behind`] with their durable heads and the device fetches what it missed.
//!   Typing indicators are dropped sooner, once half the budget waits, and just dropped: they
//!   never start the dropping of other pushes, nor a `Behind`, nor a cut.
//! * A stream with frames or pages waiting and nothing written for
//!   [`Limits::stalled_reader_ms`] (by the driver's [`Input::Tick`]) is cut off at once
//!   ([`Effect::Kill`]): its device has stopped reading. So is one whose answers would pass
//!   [`MAX_QUEUED_BYTES`], a safety net that no device that reads ever reaches.

use super::*;
use crate::limits::MAX_QUEUED_BYTES;

/// What a frame waiting for a device costs beyond its encoded length: the 4-byte length prefix
/// and the frame's slot in the driver's queue (a `RelayFrame` is at most this large in memory;
/// a test checks it). It keeps a flood of tiny frames from looking free, and bounds the number
/// of frames waiting per stream by [`MAX_QUEUED_BYTES`] / this.
pub const FRAME_OVERHEAD_BYTES: u64 = 320;

/// What `frame` counts against its stream's backlog while it waits to be written: its encoded
/// length (what [`stratus_engine::proto::wire::encode`] gives) plus [`FRAME_OVERHEAD_BYTES`].
/// The driver reports written frames in the same unit ([`Input::Sent`]).
pub fn frame_cost(frame: &RelayFrame) -> u64 {
    // Counting the encoding allocates nothing; a frame too large to encode still counts as
    // the largest frame, and the driver reports it when it drops it.
    let len = postcard::experimental::serialized_size(frame).unwrap_or(stratus_engine::proto::wire::MAX_FRAME_BYTES);
    len as u64 + FRAME_OVERHEAD_BYTES
}

/// One stream's backlog. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    /// Cost of the frames handed to the driver and not yet reported written (pages excluded).
    pub(super) queued_bytes: u64,
    /// Pushes are being dropped: since one found the backlog over the budget, until it falls to
    /// half of it.
    dropping: bool,
    /// A push of the account log was dropped.
    missed_account: bool,
    /// Chats with a dropped push (at most the account's chats).
    missed_chats: BTreeSet<ChatId>,
    /// The tick at which something was waiting and no progress had been reported since.
    stalled_since_ms: Option<u64>,
}

impl RelayCore {
    /// Runs `effects` past each stream's backlog, in order: counts what each `Send` costs, drops
    /// pushes to a stream that has fallen behind, cuts a stream whose answers would pass
    /// [`MAX_QUEUED_BYTES`], and drops what was meant for a stream the core has closed.
    pub(super) fn admit(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut out = Vec::with_capacity(effects.len());
        for effect in effects {
            match effect {
                Effect::Send { conn, frame } => self.admit_send(conn, frame, &mut out),
                Effect::Close { conn } | Effect::ReadChat { conn, .. } | Effect::ReadAccount { conn, .. }
                    if !self.conns.contains_key(&conn) => {}
                other => out.push(other),
            }
        }
        out
    }

    fn admit_send(&mut self, conn: ConnId, frame: RelayFrame, out: &mut Vec<Effect>) {
        let budget = self.limits.max_push_backlog_bytes;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let b = &mut c.backlog;
        if let RelayFrame::Typing { .. } = frame {
            // Dropped first, and never a reason for anything else: a typing indicator goes out
            // only while the stream has less than half its push budget waiting, and one dropped
            // is not missed (no `Behind`, no other push dropped, never a cut).
            if b.dropping || b.queued_bytes + frame_cost(&frame) > budget / 2 {
                return;
            }
        }
        let push =
            matches!(frame, RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } | RelayFrame::Typing { .. });
        if push && (b.dropping || b.queued_bytes > budget) {
            b.dropping = true;
            match frame {
                RelayFrame::Push { delta } => {
                    b.missed_chats.insert(delta.chat);
                }
                RelayFrame::PushAccount { .. } => b.missed_account = true,
                _ => {}
            }
            return;
        }
        let cost = frame_cost(&frame);
        if b.queued_bytes + cost > MAX_QUEUED_BYTES {
            self.kill(conn, out);
            return;
        }
        b.queued_bytes += cost;
        out.push(Effect::Send { conn, frame });
    }

    /// The driver wrote `bytes` worth of frames and `pages` pages to `conn`.
    pub(super) fn sent(&mut self, conn: ConnId, bytes: u64, pages: u32, out: &mut Vec<Effect>) {
        let low_water = self.limits.max_push_backlog_bytes / 2;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let pages = pages.min(c.fetches_in_flight);
        c.fetches_in_flight -= pages;
        if let Some(d) = self.devices.get_mut(&c.device) {
            d.fetches_in_flight = d.fetches_in_flight.saturating_sub(pages);
        }
        let b = &mut c.backlog;
        b.queued_bytes = b.queued_bytes.saturating_sub(bytes);
        if bytes > 0 || pages > 0 {
            b.stalled_since_ms = None;
        }
        if !b.dropping || b.queued_bytes > low_water {
            return;
        }
        b.dropping = false;
        let missed_account = std::mem::take(&mut b.missed_account);
        let missed_chats = std::mem::take(&mut b.missed_chats);
        // A stream detached since (its session ended) gets nothing more.
        let Some(account) = c.account.and_then(|a| self.accounts.get(&a)) else { return };
        if !missed_account && missed_chats.is_empty() {
            return;
        }
        // Durable heads only; a chat the account has left since is not named (the account log
        // says it left).
        let chats = missed_chats
            .into_iter()
            .filter(|chat| account.chats.contains(chat))
            .filter_map(|chat| self.chats.get(&chat).map(|c| (chat, c.durable)))
            .collect();
        out.push(Effect::Send { conn, frame: RelayFrame::Behind { account_head: account.log_durable, chats } });
    }

    /// The driver's timer: cuts the streams that have had something waiting and nothing
    /// written for the stall timeout.
    pub(super) fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let stall_ms = self.limits.stalled_reader_ms;
        let mut stalled = Vec::new();
        for (id, c) in &mut self.conns {
            let b = &mut c.backlog;
            if b.queued_bytes == 0 && c.fetches_in_flight == 0 {
                b.stalled_since_ms = None;
                continue;
            }
            let since = *b.stalled_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= stall_ms {
                stalled.push(*id);
            }
        }
        for conn in stalled {
            self.kill(conn, out);
        }
    }

    /// Forgets `conn` and tells the driver to stop its stream at once.
    fn kill(&mut self, conn: ConnId, out: &mut Vec<Effect>) {
        self.close(conn, out);
        out.push(Effect::Kill { conn });
    }
}
