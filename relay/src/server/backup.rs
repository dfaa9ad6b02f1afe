//! The core task's side of a backup made while the relay runs (decided by
//! [`crate::backups::Backups`]): starts the copy on a thread of its own, hands it every batch
//! applied meanwhile, and, once the copy has caught up, pauses between two batches to make the
//! store durable and have the copy sealed. Split out of `tasks.rs` for size.

use std::sync::atomic::{AtomicU64, Ordering};

use super::tasks::Driver;
use super::*;
use crate::backups::{batch_bytes, AfterBatch, Copied};
use crate::core::StoreOp;
use crate::store::BackupCopy;
use stratus_engine::proto::wire::Incarnation;

/// What the core task hands the copy's thread.
pub(super) enum Feed {
    /// A batch applied to the store, and what it counts for in the queue.
    Ops(Vec<StoreOp>, u64),
    /// The core task is paused and the store durable: apply what is left, seal, answer.
    Seal(oneshot::Sender<Result<Incarnation, StoreError>>),
}

/// A backup under way, as the core task holds it.
pub(super) struct BackupTask {
    id: u64,
    to: PathBuf,
    feed: std::sync::mpsc::Sender<Feed>,
    /// Bytes of the handed batches the copy has applied.
    copied: Arc<AtomicU64>,
    reply: oneshot::Sender<Result<Incarnation, String>>,
    started: std::time::Instant,
}

/// An operator asked for a backup into `to` (the batch's writes so far are applied).
pub(super) fn start<S: RelayStore>(
    d: &mut Driver<S>,
    to: PathBuf,
    reply: oneshot::Sender<Result<Incarnation, String>>,
) {
    let id = match d.backups.start() {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(to = %to.display(), error = %e, "backup refused");
            let _ = reply.send(Err(e));
            return;
        }
    };
    // On the core task, between two batches: it makes the directory and opens the copy's empty
    // sled store, 0.6–7 ms in a debug build on a busy machine (docs/benchmarks.md); logged as
    // `begin_ms`.
    let begun = std::time::Instant::now();
    let copy = match d.store.backup_begin(&to) {
        Ok(c) => c,
        Err(e) => {
            d.backups.ended(id);
            tracing::warn!(to = %to.display(), error = %e, "backup failed");
            let _ = reply.send(Err(e.to_string()));
            return;
        }
    };
    let (feed, rx) = std::sync::mpsc::channel();
    let copied = Arc::new(AtomicU64::new(0));
    let (c, news) = (copied.clone(), d.copy_news.clone());
    // A thread of its own, not the runtime's blocking pool: a relay that stops does not wait
    // for a copy under way.
    let spawned = std::thread::Builder::new().name("backup".into()).spawn(move || copy_beside(id, copy, rx, c, news));
    if let Err(e) = spawned {
        d.backups.ended(id);
        let _ = reply.send(Err(format!("cannot start the backup's thread: {e}")));
        return;
    }
    let begin_ms = begun.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(to = %to.display(), begin_ms, "backup started: copying beside the running relay");
    d.backup = Some(BackupTask { id, to, feed, copied, reply, started: std::time::Instant::now() });
}

/// Hands a batch just applied to the store to the backup under way, if any.
pub(super) fn feed<S>(d: &mut Driver<S>, ops: Vec<StoreOp>) {
    let Some(task) = &d.backup else { return };
    let bytes = batch_bytes(&ops);
    let failed = match d.backups.batch_applied(bytes, task.copied.load(Ordering::Relaxed)) {
        AfterBatch::Nothing => None,
        AfterBatch::Forward => match task.feed.send(Feed::Ops(ops, bytes)) {
            Ok(()) => None,
            Err(_) => Some("the backup's copy stopped (see the relay's log)".to_string()),
        },
        AfterBatch::Fail(m) => Some(m),
    };
    if let Some(m) = failed {
        fail(d, m);
    }
}

fn fail<S>(d: &mut Driver<S>, message: String) {
    if let Some(t) = d.backup.take() {
        d.backups.ended(t.id);
        tracing::warn!(to = %t.to.display(), error = %message, "backup failed");
        let _ = t.reply.send(Err(message));
    }
}

/// The copy's thread says it has caught up (or failed): at this batch boundary, make the store
/// durable and have the copy sealed, the core task paused meanwhile.
pub(super) async fn copied<S: RelayStore>(d: &mut Driver<S>, id: u64, result: Result<(), String>) {
    if d.backups.copied(id) == Copied::Stale {
        return;
    }
    if let Err(e) = result {
        return fail(d, e);
    }
    let Some(task) = d.backup.take() else { return };
    let paused = std::time::Instant::now();
    let s = d.store.clone();
    let mut barrier_ms = 0;
    let r = match tokio::task::spawn_blocking(move || s.barrier()).await {
        Ok(Ok(())) => {
            barrier_ms = paused.elapsed().as_millis() as u64;
            let (tx, rx) = oneshot::channel();
            match task.feed.send(Feed::Seal(tx)) {
                Ok(()) => match rx.await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("the backup's copy stopped (see the relay's log)".into()),
                },
                Err(_) => Err("the backup's copy stopped (see the relay's log)".into()),
            }
        }
        Ok(Err(e)) => Err(format!("the store's barrier failed: {e}")),
        Err(e) => Err(format!("the store's barrier failed: {e}")),
    };
    d.backups.ended(id);
    match &r {
        Ok(_) => tracing::info!(
            to = %task.to.display(),
            secs = task.started.elapsed().as_secs_f64(),
            paused_ms = paused.elapsed().as_millis() as u64,
            barrier_ms,
            "backup done"
        ),
        Err(e) => tracing::warn!(to = %task.to.display(), error = %e, "backup failed"),
    }
    let _ = task.reply.send(r);
}

/// Most bytes (as [`batch_bytes`] counts them) of queued batches the copy applies as one
/// transaction. Applied one by one, the batches cost the copy what they cost the store (sled
/// pays per transaction), and a copy with less of the CPU than the core task never caught up;
/// applied together they give the same result (in order, each key's last write wins, and a
/// deleted range is emptied after the whole run, as nothing is written into it again).
const COALESCE_BYTES: u64 = 32 * 1024 * 1024;

/// What the copy's thread took from its queue.
struct Run {
    ops: Vec<StoreOp>,
    bytes: u64,
    /// The seal that came after the run, if one did.
    seal: Option<oneshot::Sender<Result<Incarnation, StoreError>>>,
    /// Nothing more will come (the backup failed meanwhile, or the relay stops).
    gone: bool,
}

/// Takes the batches waiting (after `first`, if given) up to [`COALESCE_BYTES`], a seal, or
/// an empty queue, whichever comes first.
fn take_run(rx: &std::sync::mpsc::Receiver<Feed>, first: Option<Feed>) -> Run {
    use std::sync::mpsc::TryRecvError;
    let mut run = Run { ops: Vec::new(), bytes: 0, seal: None, gone: false };
    let mut next = first.map(Ok);
    loop {
        match next.take().unwrap_or_else(|| rx.try_recv()) {
            Ok(Feed::Ops(ops, n)) => {
                run.ops.extend(ops);
                run.bytes += n;
                if run.bytes >= COALESCE_BYTES {
                    return run;
                }
            }
            Ok(Feed::Seal(reply)) => {
                run.seal = Some(reply);
                return run;
            }
            Err(TryRecvError::Empty) => return run,
            Err(TryRecvError::Disconnected) => {
                run.gone = true;
                return run;
            }
        }
    }
}

/// The copy's thread: the fuzzy copy, then the batches handed meanwhile; tells the core task
/// once none is left, then goes on applying them until told to seal.
fn copy_beside(
    id: u64,
    mut copy: Box<dyn BackupCopy>,
    rx: std::sync::mpsc::Receiver<Feed>,
    copied: Arc<AtomicU64>,
    news: mpsc::WeakSender<CoreMsg>,
) {
    let caught_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<bool, StoreError> {
        copy.copy()?;
        // Twice: what was written during the copy, made durable, then what was written
        // meanwhile (less), so that the seal the relay waits for has little left to write.
        for _ in 0..2 {
            loop {
                let run = take_run(&rx, None);
                if !run.ops.is_empty() {
                    copy.apply(&run.ops)?;
                    copied.fetch_add(run.bytes, Ordering::Relaxed);
                }
                if let Some(reply) = run.seal {
                    // The core task seals only once told: never here.
                    let _ =
                        reply.send(Err(StoreError::Backup("the backup was sealed before its copy was made".into())));
                    return Ok(false);
                }
                if run.gone {
                    return Ok(false);
                }
                if run.bytes < COALESCE_BYTES {
                    break;
                }
            }
            copy.barrier()?;
        }
        Ok(true)
    }));
    let result = match caught_up {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => return,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the backup's copy failed unexpectedly (see the relay's log)".into()),
    };
    let failed = result.is_err();
    match news.upgrade() {
        Some(tx) if tx.blocking_send(CoreMsg::BackupCopied { id, result }).is_ok() => {}
        _ => return,
    }
    if failed {
        return;
    }
    let mut broken: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let run = take_run(&rx, Some(first));
        if broken.is_none() && !run.ops.is_empty() {
            if let Err(e) = copy.apply(&run.ops) {
                broken = Some(e.to_string());
            }
        }
        copied.fetch_add(run.bytes, Ordering::Relaxed);
        if let Some(reply) = run.seal {
            let _ = reply.send(match broken {
                Some(e) => Err(StoreError::Backup(e)),
                None => copy.seal(),
            });
            return;
        }
        if run.gone {
            return;
        }
    }
}
