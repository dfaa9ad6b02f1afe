//! [`RelayLink`]: a sync stream to the relay run by its own task, reading while it writes.
//! Part of `net.rs`; split out for size.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::Compat;

use super::{NetError, RelayStream};
use crate::proto::wire::{self, ClientFrame, RelayFrame};

/// Frames waiting to be written to the relay on one [`RelayLink`]. The sync core keeps few
/// requests in flight (appends, pages, its own and the app's requests are each capped), so a
/// full queue means the relay has stopped taking bytes: [`RelayLink::send`] fails and the
/// session treats the connection as lost.
pub(crate) const LINK_OUT_QUEUE: usize = 512;
/// Frames read from the relay and waiting for the session. When it is full the link stops
/// reading (the relay then sees a slow reader and drops pushes, which the device fetches later)
/// but goes on writing.
pub(crate) const LINK_IN_QUEUE: usize = 64;
/// Frames the link writes before one flush, at most.
const MAX_FRAMES_PER_WRITE: usize = 64;

/// A sync stream to the relay run by its own task, which reads and writes at once: a write
/// the relay is slow to take never stops frames from being read, and a session busy applying
/// never stops its requests from going out. (A single task owns both halves of the stream, so
/// no wake-up is lost between two tasks sharing it.)
pub(crate) struct RelayLink {
    out: mpsc::Sender<ClientFrame>,
    inc: mpsc::Receiver<Result<RelayFrame, NetError>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// An error [`RelayLink::try_recv`] took, for [`RelayLink::recv`] to report.
    failed: Option<NetError>,
}

/// Why [`RelayLink::send`] did not queue a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkFull {
    /// [`LINK_OUT_QUEUE`] frames wait already: the relay is not taking bytes.
    #[error("the relay is not taking frames")]
    Full,
    /// The link's task ended (the stream broke).
    #[error("the connection to the relay ended")]
    Ended,
}

impl RelayLink {
    /// Starts the link's task on `stream`.
    pub fn start(stream: RelayStream) -> RelayLink {
        let (out, out_rx) = mpsc::channel(LINK_OUT_QUEUE);
        let (in_tx, inc) = mpsc::channel(LINK_IN_QUEUE);
        let task = tokio::spawn(pump(stream, out_rx, in_tx));
        RelayLink { out, inc, task: Some(task), failed: None }
    }

    /// Queues a frame to send; never waits.
    pub fn send(&self, frame: ClientFrame) -> Result<(), LinkFull> {
        self.out.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkFull::Full,
            mpsc::error::TrySendError::Closed(_) => LinkFull::Ended,
        })
    }

    /// The next frame from the relay; `Ok(None)` once the relay closed the stream (cancel safe).
    pub async fn recv(&mut self) -> Result<Option<RelayFrame>, NetError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.inc.recv().await {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    /// The next frame if one has arrived already, without waiting (`None`: none yet; the
    /// stream's end or error comes from [`RelayLink::recv`]).
    pub fn try_recv(&mut self) -> Option<RelayFrame> {
        match self.inc.try_recv() {
            Ok(Ok(frame)) => Some(frame),
            Ok(Err(e)) => {
                // Reported by the next `recv`.
                self.failed = Some(e);
                None
            }
            Err(_) => None,
        }
    }

    /// Sends what is queued, closes the sending side and waits, at most `limit`, for the relay
    /// to close its side (then it has read everything). Frames arriving meanwhile are dropped.
    pub async fn close(mut self, limit: Duration) {
        // Dropping the only sender tells the task to finish.
        drop(std::mem::replace(&mut self.out, mpsc::channel(1).0));
        let Some(mut task) = self.task.take() else { return };
        let inc = &mut self.inc;
        let drain = async { while inc.recv().await.is_some() {} };
        if tokio::time::timeout(limit, async { tokio::join!(drain, &mut task) }).await.is_err() {
            task.abort();
        }
    }
}

impl Drop for RelayLink {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

type FrameSink = futures::stream::SplitSink<Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>, bytes::Bytes>;
type Writing = std::pin::Pin<Box<dyn std::future::Future<Output = (FrameSink, std::io::Result<()>)> + Send>>;

/// The link's task: see [`RelayLink`].
async fn pump(
    stream: RelayStream,
    mut out_rx: mpsc::Receiver<ClientFrame>,
    in_tx: mpsc::Sender<Result<RelayFrame, NetError>>,
) {
    let (sink, mut source) = stream.framed.split();
    // The sink is moved into the write under way and comes back with its result, so that the
    // read branch never waits for a write.
    let mut idle_sink = Some(sink);
    let mut writing: Option<Writing> = None;
    let mut closing = false;
    let mut permit = None;
    loop {
        tokio::select! {
            (sink, r) = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                if let Err(e) = r {
                    let _ = in_tx.send(Err(e.into())).await;
                    return;
                }
                idle_sink = Some(sink);
            }
            frame = out_rx.recv(), if idle_sink.is_some() && !closing => {
                let mut sink = idle_sink.take().expect("guarded");
                match frame {
                    Some(first) => {
                        // With the frames queued behind it, written together and flushed once:
                        // one flush per frame costs a yamux frame, a Noise message and a
                        // syscall each.
                        let mut frames = vec![first];
                        while frames.len() < MAX_FRAMES_PER_WRITE {
                            match out_rx.try_recv() {
                                Ok(f) => frames.push(f),
                                Err(_) => break,
                            }
                        }
                        let encoded: Vec<bytes::Bytes> = frames
                            .iter()
                            .filter_map(|f| match wire::encode(f) {
                                Ok(b) => Some(bytes::Bytes::from(b)),
                                Err(e) => {
                                    tracing::error!(error = %e, "dropping a frame that does not encode");
                                    None
                                }
                            })
                            .collect();
                        writing = Some(Box::pin(async move {
                            let mut r = Ok(());
                            for b in encoded {
                                r = sink.feed(b).await;
                                if r.is_err() {
                                    break;
                                }
                            }
                            if r.is_ok() {
                                r = SinkExt::<bytes::Bytes>::flush(&mut sink).await;
                            }
                            (sink, r)
                        }));
                    }
                    None => {
                        // The session is done: flush, close our side, read until the relay's.
                        closing = true;
                        writing = Some(Box::pin(async move {
                            let r = SinkExt::<bytes::Bytes>::close(&mut sink).await;
                            (sink, r)
                        }));
                    }
                }
            }
            p = in_tx.clone().reserve_owned(), if permit.is_none() => match p {
                Ok(p) => permit = Some(p),
                Err(_) if closing => permit = None,
                Err(_) => return,
            },
            item = source.next(), if permit.is_some() || closing => {
                let item = match item {
                    None => Ok(None),
                    Some(Err(e)) => Err(NetError::from(e)),
                    Some(Ok(bytes)) => wire::decode::<RelayFrame>(&bytes).map(Some).map_err(NetError::from),
                };
                let end = !matches!(item, Ok(Some(_)));
                if let Some(p) = permit.take() {
                    if let Some(r) = item.transpose() {
                        p.send(r);
                    }
                }
                if end {
                    return;
                }
            }
        }
    }
}
