//! The relay driver's own tasks: the core task (feeds the core and carries out its effects,
//! applying each batch's writes as one transaction), the barrier task (group commit: one fsync
//! for every write applied since the last) and the tick task. Split out of `server.rs` for size.

use super::*;

pub(super) async fn barrier_loop<S: RelayStore>(
    store: Arc<S>,
    mut written: watch::Receiver<u64>,
    in_tx: mpsc::Sender<CoreMsg>,
    fatal: mpsc::Sender<StoreError>,
    metrics: Arc<Metrics>,
) {
    let mut done = 0u64;
    loop {
        if written.wait_for(|t| *t > done).await.is_err() {
            return;
        }
        let target = *written.borrow_and_update();
        let s = store.clone();
        let (started, start) = (metrics.barrier_started(), std::time::Instant::now());
        match tokio::task::spawn_blocking(move || s.barrier()).await {
            Ok(Ok(())) => {
                metrics.barrier_done(started, start.elapsed());
                done = target;
                if in_tx.send(CoreMsg::Input(Input::Durable { token: target })).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) if e.is_disk_full() => {
                // Nothing since the last good barrier is acknowledged, ever: no barrier runs
                // again. The relay stays up for reads.
                tracing::error!(error = %e, "{DISK_FULL}");
                let _ = in_tx.send(CoreMsg::Input(Input::WriteFailed)).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "fsync barrier failed; no further acknowledgements");
                let _ = fatal.send(e).await;
                return;
            }
            Err(e) => {
                let _ = fatal.send(StoreError::Barrier(std::io::Error::other(e.to_string()))).await;
                return;
            }
        }
    }
}

/// Logged when a write or barrier fails for lack of space.
const DISK_FULL: &str = "the disk is full: the relay stores nothing more and keeps serving what it has; free space \
                         and restart it";

/// Gives the core the time every [`TICK`], on a monotonic clock that starts at 0.
pub(super) async fn tick_loop(in_tx: mpsc::Sender<CoreMsg>) {
    let start = tokio::time::Instant::now();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if in_tx.send(CoreMsg::Input(Input::Tick { now_ms })).await.is_err() {
            return;
        }
    }
}

/// What the core task carries out the core's effects with.
pub(super) struct Driver<S> {
    pub(super) store: Arc<S>,
    conns: BTreeMap<ConnId, StreamHandle>,
    /// The writes of the inputs taken so far in this batch, and the newest token among them.
    ops: Vec<crate::core::StoreOp>,
    batch_token: u64,
    registered: Registered,
    /// A write failed for lack of space: nothing is written any more.
    disk_full: bool,
    metrics: Arc<Metrics>,
    /// Operators' commands waiting for the core's answer, by the id given with them.
    admin_replies: BTreeMap<AdminId, oneshot::Sender<Result<AdminAnswer, AdminRefusal>>>,
    next_admin: AdminId,
    /// The backup under way, what decides about it, and how its copy's thread reaches the
    /// core task (see `server/backup.rs`).
    pub(super) backup: Option<super::backup::BackupTask>,
    pub(super) backups: crate::backups::Backups,
    pub(super) copy_news: mpsc::WeakSender<CoreMsg>,
}

impl<S: RelayStore> Driver<S> {
    /// Feeds `input` to the core and carries out what it asks, and what that asks in turn.
    fn run(&mut self, core: &mut RelayCore, input: Input) {
        let mut queue = std::collections::VecDeque::from(core.handle(input));
        while let Some(effect) = queue.pop_front() {
            if let Some(conn) = self.carry_out(effect) {
                queue.extend(core.handle(Input::Closed { conn }));
            }
        }
    }

    /// Carries out one effect; returns a stream that had to be dropped (its queue was full).
    fn carry_out(&mut self, effect: Effect) -> Option<ConnId> {
        let conns = &mut self.conns;
        let mut send = |conn: ConnId, out: Outgoing| -> Option<ConnId> {
            match conns.get(&conn).map(|h| h.tx.try_send(out)) {
                // The stream's task has ended (the device closed its side): its own
                // `Closed` follows the frames it read, in order, and ends the conn
                // then. Ending it here would drop those frames.
                Some(Ok(())) | Some(Err(mpsc::error::TrySendError::Closed(_))) | None => None,
                Some(Err(mpsc::error::TrySendError::Full(_))) => {
                    // The core's byte bounds should have cut it off first.
                    tracing::error!(conn, "a device's output queue is full; disconnecting it");
                    if let Some(h) = conns.remove(&conn) {
                        h.kill.cancel();
                    }
                    Some(conn)
                }
            }
        };
        match effect {
            Effect::Send { conn, frame } => {
                self.metrics.frame_sent(&frame);
                if let RelayFrame::Error { req, code, message } = &frame {
                    tracing::debug!(conn, ?req, ?code, %message, "refused");
                }
                if let RelayFrame::RateLimited { req, retry_after_ms } = &frame {
                    tracing::debug!(conn, req, retry_after_ms, "rate limited");
                }
                send(conn, Outgoing::Frame(Box::new(frame)))
            }
            Effect::Close { conn } => {
                send(conn, Outgoing::Close);
                None
            }
            Effect::Kill { conn } => {
                // The core has forgotten the stream; its task's own `Closed` changes
                // nothing.
                tracing::warn!(conn, "device is not reading; disconnecting it");
                self.metrics.stalled_disconnect();
                if let Some(h) = conns.remove(&conn) {
                    h.kill.cancel();
                }
                None
            }
            Effect::Write { token, ops: more } => {
                if self.disk_full {
                    // The core writes nothing once told; this would be a bug, and is dropped.
                    tracing::error!(token, "a write after the disk was found full; dropped");
                    return None;
                }
                note_devices(&self.registered, &more);
                self.ops.extend(more);
                self.batch_token = self.batch_token.max(token);
                None
            }
            Effect::ReadChat { conn, req, chat, after, upto, max } => {
                let frame = match self.store.read_chat(chat, after, upto, max) {
                    Ok(deltas) => RelayFrame::ChatPage { req, chat, deltas, head: upto },
                    Err(e) => internal(req, e),
                };
                send(conn, Outgoing::Page(Box::new(frame)))
            }
            Effect::ReadAccount { conn, req, account, after, upto, max } => {
                let frame = match self.store.read_account(account, after, upto, max) {
                    Ok(entries) => RelayFrame::AccountPage { req, entries, head: upto },
                    Err(e) => internal(req, e),
                };
                send(conn, Outgoing::Page(Box::new(frame)))
            }
            Effect::Admin { id, answer } => {
                match &answer {
                    Ok(_) => tracing::info!(id, "admin command done"),
                    Err(e) => tracing::info!(id, code = e.code.name(), message = %e.message, "admin command refused"),
                }
                if let Some(reply) = self.admin_replies.remove(&id) {
                    let _ = reply.send(answer);
                }
                None
            }
        }
    }
}

pub(super) async fn core_loop<S: RelayStore>(
    mut core: RelayCore,
    store: Arc<S>,
    (mut in_rx, copy_news): (mpsc::Receiver<CoreMsg>, mpsc::WeakSender<CoreMsg>),
    (written, drained): (watch::Sender<u64>, watch::Sender<bool>),
    fatal: mpsc::Sender<StoreError>,
    registered: Registered,
    metrics: Arc<Metrics>,
) {
    // The writes of every input drained in one go are applied as one sled transaction: sled
    // 0.34 pays two log-buffer rolls (two device writes) per transaction, which capped the relay
    // at ~6,400 appends/s with one transaction per append (docs/benchmarks.md). Nothing reveals
    // a write before its barrier, and the barrier only starts after the batch is applied.
    let mut d = Driver {
        store,
        conns: BTreeMap::new(),
        ops: Vec::new(),
        batch_token: 0,
        registered,
        disk_full: false,
        metrics,
        admin_replies: BTreeMap::new(),
        next_admin: 1,
        backup: None,
        backups: Default::default(),
        copy_news,
    };
    let mut batch: Vec<CoreMsg> = Vec::with_capacity(CORE_BATCH);
    loop {
        // While no input waits, what deletions left is emptied chunk after chunk.
        if in_rx.is_empty() && purge_chunk(&mut d, &mut core) {
            tokio::task::yield_now().await;
            continue;
        }
        if in_rx.recv_many(&mut batch, CORE_BATCH).await == 0 {
            return;
        }
        for msg in batch.drain(..) {
            let input = match msg {
                CoreMsg::Admin(AdminRequest::Backup { to, reply }) => {
                    // What the batch wrote so far goes in first: the copy begins at a batch
                    // boundary, and every batch applied after it is handed to it too.
                    if !apply_ops(&mut d, &mut core, &written, &fatal).await {
                        return;
                    }
                    super::backup::start(&mut d, to, reply);
                    continue;
                }
                CoreMsg::BackupCopied { id, result } => {
                    // The copy has caught up: the core pauses here, at a batch boundary, while
                    // the store is made durable and the copy sealed (a few batches' time).
                    if !apply_ops(&mut d, &mut core, &written, &fatal).await {
                        return;
                    }
                    super::backup::copied(&mut d, id, result).await;
                    continue;
                }
                CoreMsg::Admin(AdminRequest::Command { command, reply }) => {
                    let id = d.next_admin;
                    d.next_admin += 1;
                    d.admin_replies.insert(id, reply);
                    let input = Input::Admin { id, command };
                    log_input(&input);
                    d.run(&mut core, input);
                    // Its account may be served no longer, or again: the devices that may use
                    // the circuits follow.
                    let served: std::collections::BTreeSet<_> =
                        core.served_devices().iter().filter_map(peer_of).collect();
                    *d.registered.write().unwrap_or_else(|e| e.into_inner()) = served;
                    continue;
                }
                CoreMsg::Open { conn, device, handle } => {
                    d.conns.insert(conn, handle);
                    Input::Opened { conn, device }
                }
                CoreMsg::Input(i) => {
                    if let Input::Closed { conn } = &i {
                        d.conns.remove(conn);
                    }
                    if let Input::Tick { .. } = &i {
                        // Once a second: the counts that walk the core's index.
                        d.metrics.core_stats(&core.stats());
                    }
                    if let Input::WriteFailed = &i {
                        // From the barrier task: no write is applied from now on.
                        d.disk_full = true;
                        d.ops.clear();
                    }
                    i
                }
            };
            log_input(&input);
            d.run(&mut core, input);
        }
        if !apply_ops(&mut d, &mut core, &written, &fatal).await {
            return;
        }
        purge_chunk(&mut d, &mut core);
        // After the batch's writes are applied: the driver's last barrier covers them.
        if core.drained() {
            drained.send_replace(true);
        }
    }
}

/// Empties the chunk of what deletions left in the store that the core asks for, if it asks
/// (see `core/purge.rs`); true if it did. Nothing waits for it: the deleted data is never read
/// or written again, and what a crash leaves is emptied when the store opens.
fn purge_chunk<S: RelayStore>(d: &mut Driver<S>, core: &mut RelayCore) -> bool {
    let Some(max_keys) = core.purge_due() else { return false };
    let more = match d.store.purge_some(max_keys) {
        Ok(more) => more,
        Err(e) => {
            // Reported as done: tried again after the next deletion, finished at the next start.
            tracing::error!(error = %e, "emptying a deletion's data failed; it is finished when the relay starts again");
            false
        }
    };
    d.metrics.purged(more);
    d.run(core, Input::Purged { more });
    true
}

/// Applies the writes taken so far as one transaction and publishes their token for the
/// barrier task. False when the store failed for good (the relay stops).
async fn apply_ops<S: RelayStore>(
    d: &mut Driver<S>,
    core: &mut RelayCore,
    written: &watch::Sender<u64>,
    fatal: &mpsc::Sender<StoreError>,
) -> bool {
    if d.ops.is_empty() {
        return true;
    }
    match d.store.apply(&d.ops) {
        Ok(()) => {
            d.metrics.applied(&d.ops);
            written.send_replace(d.batch_token);
            if d.backup.is_some() {
                // Handed to the backup's copy; otherwise the vector keeps its capacity for the
                // next batch.
                let ops = std::mem::take(&mut d.ops);
                super::backup::feed(d, ops);
            } else {
                d.ops.clear();
            }
            true
        }
        Err(e) if e.is_disk_full() => {
            // Not applied (a batch is atomic) and never acknowledged; the token is not
            // published, so no barrier covers it.
            tracing::error!(error = %e, "{DISK_FULL}");
            d.ops.clear();
            d.disk_full = true;
            d.run(core, Input::WriteFailed);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "store write failed; no further acknowledgements");
            let _ = fatal.send(e).await;
            false
        }
    }
}

/// Logs what arrives without ever printing payload bytes (sealed as they are, they are the
/// devices' business).
fn log_input(input: &Input) {
    match input {
        Input::Opened { conn, device } => tracing::info!(conn, %device, "device stream opened"),
        Input::Closed { conn } => tracing::info!(conn, "device stream closed"),
        Input::BadFrame { conn, error, .. } => tracing::info!(conn, %error, "bad frame"),
        Input::Durable { token } => tracing::trace!(token, "barrier done"),
        Input::WriteFailed => tracing::warn!("writes are refused from now on (the disk is full)"),
        Input::Purged { more } => tracing::trace!(more, "purged a chunk"),
        Input::Drain => tracing::info!("draining: new requests are refused, streams close once answered"),
        Input::Sent { conn, bytes, pages } => tracing::trace!(conn, bytes, pages, "sent"),
        Input::Tick { now_ms } => tracing::trace!(now_ms, "tick"),
        Input::Admin { id, command } => tracing::info!(id, ?command, "admin command"),
        Input::Frame { conn, frame, .. } => match frame {
            ClientFrame::Append { req, chat, client_seq, sealed, .. } => {
                tracing::debug!(conn, req, %chat, client_seq = client_seq.0, bytes = sealed.len(), "append")
            }
            ClientFrame::FetchChat { req, chat, after, .. } => {
                tracing::debug!(conn, req, %chat, after = after.0, "fetch chat")
            }
            ClientFrame::FetchAccount { req, after, .. } => {
                tracing::debug!(conn, req, after = after.0, "fetch account log")
            }
            ClientFrame::CreateChat { req, chat, .. } => tracing::debug!(conn, req, %chat, "create chat"),
            ClientFrame::CreateAccount { req, account, invite, .. } => {
                tracing::debug!(conn, req, account = %account.id, invited = invite.is_some(), "create account")
            }
            ClientFrame::LinkWait { req, .. } => tracing::debug!(conn, req, "link wait"),
            ClientFrame::LinkLookup { req, .. } => tracing::debug!(conn, req, "link lookup"),
            ClientFrame::LinkApprove { req, .. } => tracing::debug!(conn, req, "link approve"),
            ClientFrame::SyncState { req } => tracing::debug!(conn, req, "sync state"),
            ClientFrame::Hello { version } => tracing::debug!(conn, version, "hello"),
            ClientFrame::ListDevices { req } => tracing::debug!(conn, req, "list devices"),
            ClientFrame::SetSessionTtl { req, days } => tracing::info!(conn, req, days, "set session ttl"),
            ClientFrame::PutRecovery { req, .. } => tracing::info!(conn, req, "put recovery bundle"),
            ClientFrame::FetchRecovery { req, .. } => tracing::info!(conn, req, "fetch recovery bundle"),
            ClientFrame::Recover { req, cert, .. } => {
                tracing::info!(conn, req, device = %cert.body.device, "recover")
            }
            ClientFrame::Typing { chat } => tracing::trace!(conn, %chat, "typing"),
            ClientFrame::Checkpoint { req, checkpoint } => {
                tracing::debug!(conn, req, seq = checkpoint.seq.0, "account log checkpoint")
            }
            ClientFrame::SetUsername { req, .. } => tracing::info!(conn, req, "set username"),
            ClientFrame::Lookup { req, .. } => tracing::debug!(conn, req, "directory lookup"),
            ClientFrame::LookupAccounts { req, accounts } => {
                tracing::debug!(conn, req, accounts = accounts.len(), "directory lookup by id")
            }
            ClientFrame::AccountDevices { req, account } => {
                tracing::debug!(conn, req, %account, "an account's devices")
            }
            ClientFrame::ChangeMembers { req, change } => {
                tracing::info!(conn, req, chat = %change.body.chat, "change members")
            }
            ClientFrame::Accept { req, account, accept } => tracing::info!(conn, req, %account, accept, "accept"),
            ClientFrame::Invite { req, account } => tracing::info!(conn, req, %account, "invite"),
            ClientFrame::ListInvitations { req } => tracing::debug!(conn, req, "list invitations"),
            ClientFrame::Rekey { req, epoch, history } => {
                tracing::info!(conn, req, chat = %epoch.chat, epoch = epoch.epoch.0, shared = history.len(), "rekey")
            }
            ClientFrame::Rotate { req, rotation, chats, .. } => {
                tracing::info!(conn, req, generation = rotation.body.generation, chats = chats.len(), "rotate")
            }
            ClientFrame::Revoke { req, revocation, rotation, chats, .. } => {
                tracing::info!(
                    conn,
                    req,
                    device = %revocation.body.device,
                    generation = rotation.body.generation,
                    chats = chats.len(),
                    "revoke and rotate"
                )
            }
        },
    }
}

fn internal(req: u64, e: StoreError) -> RelayFrame {
    tracing::error!(error = %e, "store read failed");
    RelayFrame::Error {
        req: Some(req),
        code: wire::ErrorCode::Internal,
        message: "the relay's store failed to read".into(),
    }
}
