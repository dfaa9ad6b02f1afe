//! One device stream's task: reads frames for the core and writes the frames the core sends,
//! both at once, and reports what it wrote ([`Input::Sent`]).
//!
//! One task does both directions, polling the framed stream's read half and write half from
//! one future: while a write waits for the device to take bytes, the device's frames are still
//! read and passed on (a device blocked sending while the relay is blocked writing to it would
//! otherwise wait for ever). (Splitting the framed stream into a reader task and a writer task
//! stalled the write direction now and then under a steady append load: a lost wake-up between
//! the split's lock and the yamux stream. One task polling both has no such hand-off.)

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Sink, SinkExt, Stream};
use libp2p::PeerId;
use stratus_engine::proto::wire::{self, ClientFrame, FrameError, RelayFrame};
use stratus_engine::DeviceId;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use super::{CoreMsg, Outgoing, RelayCodec, StreamHandle, StreamSlot};
use crate::core::{frame_cost, ConnId, Input, FRAME_OVERHEAD_BYTES};

/// Bytes written and not yet reported to the core that make the stream task report at once;
/// less is reported within [`REPORT_AFTER`]. (One report per frame would double the core's
/// inputs under load; the core's budgets are far larger than this.) Pages are reported at once:
/// the device's next fetch waits for the count.
const REPORT_BYTES: u64 = 16 * 1024;
/// Longest a stream task keeps a write unreported.
const REPORT_AFTER: Duration = Duration::from_millis(100);
/// Most frames a stream task hands to the framed stream before it flushes (and reads).
const WRITE_BATCH: usize = 64;

type Io = Framed<Compat<libp2p::Stream>, RelayCodec>;

/// What a stream task has written since it last said so: cost (see [`frame_cost`]) and pages.
#[derive(Default, Clone, Copy, PartialEq)]
struct Written {
    bytes: u64,
    pages: u32,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.bytes += other.bytes;
        self.pages += other.pages;
    }
}

enum WriteEvent {
    /// Frames went out to the transport.
    Flushed(Written),
    /// A `Close` was reached and everything before it is out.
    Closing,
    /// The stream failed.
    Failed,
}

/// The write half's state between polls.
#[derive(Default)]
struct Writer {
    /// A frame taken from the queue that the framed stream has not accepted yet, and its cost.
    next: Option<(bytes::Bytes, Written)>,
    /// Accepted and not yet flushed.
    unflushed: Written,
    /// A `Close` came: what was before it goes out, then the stream ends.
    closing: bool,
}

impl Writer {
    /// Moves frames from `rx` into `io` and flushes them; ready when some went out, when the
    /// stream is to close, or when it failed.
    fn poll_write(&mut self, io: &mut Io, rx: &mut mpsc::Receiver<Outgoing>, cx: &mut Context<'_>) -> Poll<WriteEvent> {
        let mut taken = 0;
        loop {
            if self.next.is_none() {
                if self.closing || taken == WRITE_BATCH {
                    break;
                }
                let (frame, page) = match rx.poll_recv(cx) {
                    Poll::Ready(Some(Outgoing::Frame(f))) => (f, false),
                    Poll::Ready(Some(Outgoing::Page(f))) => (f, true),
                    Poll::Ready(Some(Outgoing::Close) | None) => {
                        self.closing = true;
                        break;
                    }
                    Poll::Pending => break,
                };
                taken += 1;
                match encode(&frame, page) {
                    Ok(next) => self.next = Some(next),
                    // Reported as written: the core counted it.
                    Err(cost) => self.unflushed.add(cost),
                }
                continue;
            }
            match Sink::<bytes::Bytes>::poll_ready(Pin::new(&mut *io), cx) {
                Poll::Ready(Ok(())) => {
                    let (bytes, cost) = self.next.take().expect("checked above");
                    if Pin::new(&mut *io).start_send(bytes).is_err() {
                        return Poll::Ready(WriteEvent::Failed);
                    }
                    self.unflushed.add(cost);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(WriteEvent::Failed),
                Poll::Pending => break,
            }
        }
        if self.unflushed != Written::default() {
            return match Sink::<bytes::Bytes>::poll_flush(Pin::new(&mut *io), cx) {
                Poll::Ready(Ok(())) => Poll::Ready(WriteEvent::Flushed(std::mem::take(&mut self.unflushed))),
                Poll::Ready(Err(_)) => Poll::Ready(WriteEvent::Failed),
                Poll::Pending => Poll::Pending,
            };
        }
        if self.closing && self.next.is_none() {
            return Poll::Ready(WriteEvent::Closing);
        }
        Poll::Pending
    }
}

/// Encodes `frame` with what it costs the core's count; a frame that does not encode (a bug)
/// is dropped, and its cost comes back as the error so that it is still reported.
fn encode(frame: &RelayFrame, page: bool) -> Result<(bytes::Bytes, Written), Written> {
    match wire::encode(frame) {
        Ok(b) => {
            // Pages are counted by number, not bytes (see `Input::Sent`).
            let bytes = if page { 0 } else { b.len() as u64 + FRAME_OVERHEAD_BYTES };
            Ok((bytes::Bytes::from(b), Written { bytes, pages: u32::from(page) }))
        }
        Err(e) => {
            tracing::error!(error = %e, "dropping a frame that does not encode");
            let bytes = if page { 0 } else { frame_cost(frame) };
            Err(Written { bytes, pages: u32::from(page) })
        }
    }
}

/// The stream task. `queue` is the size of its bounded queue of frames to write (see
/// [`super::output_queue`]).
pub(super) async fn connection(
    conn: ConnId,
    peer: PeerId,
    stream: libp2p::Stream,
    core: mpsc::Sender<CoreMsg>,
    max_frame_bytes: usize,
    queue: usize,
    _slot: StreamSlot,
) {
    let mut io: Io = Framed::new(stream.compat(), RelayCodec::new(max_frame_bytes));
    // `Framed` gives each direction an 8 KiB buffer at once; empty ones grow with the frames
    // (the codec reserves a frame's length once it has read its prefix), so an idle device's
    // stream holds a few bytes instead of 16 KiB: a quarter of what 10,000 connected devices
    // cost the relay (docs/benchmarks.md, "Relay operations").
    *io.read_buffer_mut() = bytes::BytesMut::new();
    *io.write_buffer_mut() = bytes::BytesMut::new();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(queue);
    let kill = CancellationToken::new();
    let handle = StreamHandle { tx, kill: kill.clone() };
    if core.send(CoreMsg::Open { conn, device: DeviceId(peer.to_string()), handle }).await.is_err() {
        return;
    }
    let mut writer = Writer::default();
    let mut unreported = Written::default();
    let mut report_at: Option<tokio::time::Instant> = None;
    let mut reading = true;
    let mut killed = false;
    loop {
        let (wrote, read) = tokio::select! {
            biased;
            () = kill.cancelled() => {
                killed = true;
                break;
            }
            () = tokio::time::sleep_until(report_at.unwrap_or_else(tokio::time::Instant::now)), if report_at.is_some() => {
                report_at = None;
                if core.send(CoreMsg::Input(sent(conn, &mut unreported))).await.is_err() {
                    break;
                }
                continue;
            }
            turn = poll_fn(|cx| {
                let wrote = writer.poll_write(&mut io, &mut rx, cx);
                let read = if reading { Pin::new(&mut io).poll_next(cx) } else { Poll::Pending };
                if wrote.is_pending() && read.is_pending() {
                    Poll::Pending
                } else {
                    Poll::Ready((wrote, read))
                }
            }) => turn,
        };
        match wrote {
            Poll::Ready(WriteEvent::Flushed(w)) => {
                unreported.add(w);
                if unreported.pages > 0 || unreported.bytes >= REPORT_BYTES {
                    report_at = None;
                    if core.send(CoreMsg::Input(sent(conn, &mut unreported))).await.is_err() {
                        break;
                    }
                } else if report_at.is_none() {
                    report_at = Some(tokio::time::Instant::now() + REPORT_AFTER);
                }
            }
            Poll::Ready(WriteEvent::Closing) | Poll::Ready(WriteEvent::Failed) => break,
            Poll::Pending => {}
        }
        let Poll::Ready(item) = read else { continue };
        // Wall-clock time: sessions show when they were last active, and the rate limit only
        // uses differences (a clock stepped back just refills the bucket later).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let input = match item {
            Some(Ok(bytes)) => match wire::decode::<ClientFrame>(&bytes) {
                Ok(frame) => Input::Frame { conn, frame, now_ms },
                Err(error) => Input::BadFrame { conn, error, now_ms },
            },
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                // An oversized length prefix: the rest of the stream cannot be framed. The core
                // answers with an error and a close, which this loop still sends.
                reading = false;
                Input::BadFrame { conn, error: FrameError::TooLarge(0), now_ms }
            }
            Some(Err(_)) | None => break,
        };
        // The core's queue is bounded: this waits while the core is busy (the core never waits
        // for a stream, so this ends).
        if core.send(CoreMsg::Input(input)).await.is_err() {
            break;
        }
    }
    let _ = core.send(CoreMsg::Input(Input::Closed { conn })).await;
    if !killed {
        let _ = tokio::time::timeout(Duration::from_secs(5), SinkExt::<bytes::Bytes>::close(&mut io)).await;
    }
    // Dropping the stream resets it if it is not closed: a peer that stopped reading gets
    // nothing more, and what was queued for it is freed with `rx`.
}

fn sent(conn: ConnId, unreported: &mut Written) -> Input {
    let Written { bytes, pages } = std::mem::take(unreported);
    Input::Sent { conn, bytes, pages }
}
