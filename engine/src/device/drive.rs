//! The device side of a sync driver, without I/O: carries out the [`SyncCore`]'s outputs that
//! touch only the device (apply a delta, store a cursor, drop an acknowledged outbox item, load
//! the outbox) and hands back what needs a transport or an app ([`Action`]).
//!
//! [`crate::Session`] runs it over libp2p and tokio; the deterministic simulator in `tests/`
//! runs the same code over a simulated network, so both exercise one implementation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::Rng;

use crate::device::core::{SyncCore, SyncInput, SyncOutput};
use crate::device::doc::{DocUpdate, Message};
use crate::device::error::Error;
use crate::device::group_commit::BarrierStart;
use crate::device::local::{Device, KeyWork, LocalWrites, MessageOp, SecretMessage, StagedDeltas};
use crate::device::session_core::{SessionCore, SessionInput, Work};
use crate::device::store::{Barrier, OutboxItem};
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{AccountId, ChatId, ClientSeq, SecretId, Seq};
use crate::proto::wire::{ChatKind, ClientFrame, Delta, ErrorCode, RelayFrame};

/// What a session tells the app.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A message appeared in a chat (from another device, or written here when `local`).
    MessageAdded { chat: ChatId, message: Message, local: bool },
    /// A message already shown changed: edited, deleted for everyone, or reacted to (from
    /// another device, or here when `local`). `message` is how it is now.
    MessageChanged { chat: ChatId, message: Message, local: bool },
    /// An account's read mark in a chat moved (another device of this account read it, or
    /// another member did: a read receipt). `up_to` is the message it has read up to.
    Read { chat: ChatId, account: String, up_to: String },
    /// Someone is typing in a chat (another device of a member, this account's included): show
    /// it for [`crate::proto::wire::TYPING_SHOWN_MS`] unless another comes. Never stored.
    Typing { chat: ChatId, account: String, device: String },
    /// A chat became readable on this device.
    ChatAdded { chat: ChatId },
    /// This account is no longer a member of a chat (it left, or was removed): what the device
    /// has stays readable; nothing more arrives or can be written.
    ChatLeft { chat: ChatId },
    /// A message written here is durable on the relay at `seq` (`None`: a retry of one stored
    /// long ago).
    Acked { chat: ChatId, client_seq: ClientSeq, seq: Option<Seq> },
    /// The relay refused a delta for good; it was dropped from the outbox.
    Rejected { chat: ChatId, client_seq: ClientSeq, code: ErrorCode, message: String },
    /// Connected to the relay and accepted.
    Connected,
    /// The connection failed or broke; the session retries.
    Disconnected { reason: String },
    /// Caught up with every head the relay reported.
    CaughtUp,
    /// Caught up and the outbox is empty.
    Idle,
    /// Something failed that the app should show; sync goes on.
    Error { message: String },
    /// The relay showed this device a version of the account log that another device of the
    /// account contradicts (its signed checkpoint at `seq` hashes differently; docs/crypto.md,
    /// "Account log forks"): entries were hidden, changed or added for one of them. The app
    /// should warn the user; sync goes on.
    AccountLogForked { seq: Seq },
    /// A message of a secret chat arrived (its text and its key), from the other device.
    SecretMessage { chat: SecretId, message: SecretMessage },
    /// Another account's device offered a secret chat; it waits for
    /// [`crate::Session::secret_accept`] (offers taken at once by the auto-accept setting come
    /// as [`Event::SecretLinked`]).
    SecretOffered { chat: SecretId, from: Box<DeviceCert> },
    /// A secret chat's link to the other device is up: what waited on either side passes now.
    SecretLinked { chat: SecretId },
    /// A secret chat was closed by the other device (it is deleted here), or this device's close
    /// reached it.
    SecretClosed { chat: SecretId },
    /// A secret chat's message disappeared (its self-destruct timer ran out).
    SecretExpired { chat: SecretId, message: String },
    /// The account ended this device's session (another device revoked it, or it expired),
    /// and the relay proved it: the account's data on this device is deleted (the device is
    /// logged out, with a new identity on its next open) and the session stops.
    SessionRevoked,
    /// The relay refuses this device's session without a proof that the account ended it (a
    /// revocation signed by the account, or an expiry after long enough away): the session
    /// stops and nothing is deleted. Starting a session again asks the relay again.
    SessionRefused,
    /// The relay does not serve this device's version of the sync protocol (`message`, the
    /// relay's words, names both and which side to upgrade): the session stops.
    VersionRefused { message: String },
    /// The relay's operator refuses this account: it suspended (`AccountSuspended`), banned
    /// (`AccountBanned`) or deleted (`AccountDeleted`) it, and `message` says so. Nothing is
    /// deleted here; the session keeps reconnecting with its backoff (a suspension may be
    /// lifted), so an app shows this rather than waits.
    Refused { code: ErrorCode, message: String },
}

/// What the driver must do after [`Device::carry_out`], in order.
#[derive(Debug)]
pub enum Action {
    /// Send this frame to the relay.
    Send(ClientFrame),
    /// Tell the app.
    Emit(Event),
    /// A reply to a request the driver made itself (with a req id from [`SyncCore::next_req`]).
    Reply(RelayFrame),
    /// The relay asked to wait: feed [`SyncInput::Resume`] to the core after this many
    /// milliseconds (a later one replaces an earlier one).
    RetryAfter(u32),
}

/// A batch of the app's writes carried out on the documents and stored, not yet durable
/// ([`Device::stage_writes`]).
pub(crate) struct StagedWrites {
    staged: Vec<Result<(Message, OutboxItem, u64), Error>>,
    /// Whether the store took them.
    stored: Result<(), String>,
}

impl StagedWrites {
    /// Whether a barrier is owed: something was stored.
    pub(crate) fn needs_barrier(&self) -> bool {
        self.stored.is_ok() && self.staged.iter().any(Result::is_ok)
    }

    /// The client seqs of the items stored.
    pub(crate) fn client_seqs(&self) -> impl Iterator<Item = ClientSeq> + '_ {
        let stored = self.stored.is_ok();
        self.staged.iter().filter_map(move |s| s.as_ref().ok().filter(|_| stored).map(|(_, item, _)| item.client_seq))
    }
}

/// Most deltas and acks carried out together (see [`Device::carry_out`]).
const MAX_APPLY_BATCH: usize = 512;

/// Deltas (per chat, in order, chats in the order they came), acks, cursor moves and sends
/// that came together (see [`Device::carry_out`]).
#[derive(Default)]
struct Run {
    deltas: Vec<(ChatId, Vec<Delta>)>,
    acks: Vec<(ClientSeq, ChatId, Option<Seq>)>,
    /// Each chat's furthest cursor move (the device's own deltas acknowledged).
    cursors: BTreeMap<ChatId, Seq>,
    sends: Vec<ClientFrame>,
    len: usize,
}

/// What the deltas of a run did: of those staged, and of those stored (only these reach the
/// app); and whether some could not be stored.
#[derive(Default)]
struct RunUpdates {
    staged: Vec<(ChatId, DocUpdate)>,
    stored: Vec<(ChatId, DocUpdate)>,
    lost: bool,
}

impl Run {
    /// Whether `output` joins a run: what the run carries out in its own order (sends first,
    /// then acks, deltas and cursors) means the same as in the order they came.
    fn takes(output: &SyncOutput) -> bool {
        matches!(
            output,
            SyncOutput::ApplyDelta(_) | SyncOutput::Acked { .. } | SyncOutput::Cursor { .. } | SyncOutput::Send(_)
        )
    }

    fn add(&mut self, output: SyncOutput) {
        match output {
            SyncOutput::ApplyDelta(d) => match self.deltas.iter_mut().find(|(c, _)| *c == d.chat) {
                Some((_, list)) => list.push(d),
                None => self.deltas.push((d.chat, vec![d])),
            },
            SyncOutput::Acked { client_seq, chat, seq } => self.acks.push((client_seq, chat, seq)),
            SyncOutput::Cursor { chat, seq } => {
                let at = self.cursors.entry(chat).or_default();
                *at = (*at).max(seq);
            }
            SyncOutput::Send(frame) => self.sends.push(frame),
            // Nothing else joins a run (see `Run::takes`).
            _ => return,
        }
        self.len += 1;
    }
}

/// What one write of [`Device::write_batch`] came to: the message as it is now and the client
/// seq of its delta.
pub type Written = Result<(Message, ClientSeq), Error>;

impl Device {
    /// Feeds `input` at `now` to the session core and carries out what its sync outputs ask of
    /// this device ([`Device::carry_out`]): returns what is left for the driver, in order.
    pub fn session_step(&mut self, session: &mut SessionCore, now: u64, input: SessionInput) -> Vec<Work> {
        self.session_steps(session, now, vec![input])
    }

    /// [`Device::session_step`] for several inputs at once (frames that arrived together):
    /// the core takes them in order, then this device carries out all their outputs, so that
    /// deltas of one chat among them are applied and stored together. The core allows for it:
    /// what it learns from the device's follow-up inputs (a chat ready, a key missing) it may
    /// learn after the later frames.
    pub fn session_steps(&mut self, session: &mut SessionCore, now: u64, inputs: Vec<SessionInput>) -> Vec<Work> {
        let mut work = Vec::new();
        let mut outputs = Vec::new();
        for input in inputs {
            let (w, o) = session.handle(now, input);
            work.extend(w);
            outputs.extend(o);
        }
        let actions = self.carry_out(session.sync(), outputs);
        work.extend(session.actions(now, actions));
        work
    }

    /// A session core for this device as its store stands (see [`Device::start_core`]); its
    /// reconnect jitter comes from the device's RNG.
    pub fn start_session(&mut self) -> Result<SessionCore, Error> {
        let sync = self.start_core()?;
        Ok(SessionCore::new(sync, self.rng.gen()))
    }

    /// A sync core for this device as its store stands: account cursor, outbox, and every chat
    /// it can read at its cursor.
    pub fn start_core(&self) -> Result<SyncCore, Error> {
        let mut core = SyncCore::new(self.store.account_cursor()?, self.outbox_len() > 0)
            .with_incarnation(self.store.incarnation()?);
        for (chat, _, cursor) in self.store.chats()? {
            core.handle(SyncInput::ChatReady { chat, cursor });
        }
        if self.key_work_due()? {
            core.handle(SyncInput::RotationDue(true));
        }
        Ok(core)
    }

    /// Writes a message ([`Device::compose`]) and queues it with `core`. Returns the message,
    /// the client seq of its delta, and what the driver must do now.
    pub fn send(
        &mut self,
        core: &mut SyncCore,
        chat: ChatId,
        text: &str,
    ) -> Result<(Message, ClientSeq, Vec<Action>), Error> {
        self.write(core, chat, &MessageOp::Send { text: text.to_string(), reply_to: None })
    }

    /// Carries out `write` ([`Device::write_local`]) and queues it with `core`. Returns the message
    /// as it is now, the client seq of its delta, and what the driver must do now.
    pub fn write(
        &mut self,
        core: &mut SyncCore,
        chat: ChatId,
        write: &MessageOp,
    ) -> Result<(Message, ClientSeq, Vec<Action>), Error> {
        let (mut results, actions) = self.write_batch(core, &[(chat, write.clone())]);
        let (message, client_seq) = results.pop().expect("one result per write")?;
        Ok((message, client_seq, actions))
    }

    /// Carries out `writes` in order ([`Device::write_local`]) with one store barrier for all of
    /// them (a group commit: an app sending thousands of messages a second pays one fsync per
    /// batch, not per message), then queues those that succeeded with `core`. Nothing of the
    /// batch is answered or sent before the barrier. Returns one result per write, in order,
    /// and what the driver must do now. (The session's driver does the same in steps, to wait
    /// for the disk on a blocking thread while it takes the relay's frames: see
    /// `group_commit.rs`.)
    pub fn write_batch(&mut self, core: &mut SyncCore, writes: &[(ChatId, MessageOp)]) -> (Vec<Written>, Vec<Action>) {
        self.stage_batch(writes.to_vec());
        let mut answers = Vec::new();
        let mut actions = Vec::new();
        loop {
            let barrier = match self.start_barrier() {
                BarrierStart::Nothing => break,
                BarrierStart::Done => Ok(()),
                BarrierStart::Run(b) => b.barrier().map_err(|e| e.to_string()),
            };
            let (a, more) = self.barrier_done(core, barrier);
            answers.extend(a);
            actions.extend(more);
        }
        // This batch was staged last (a session's driver, the only other stager, owns its
        // device while it runs).
        (answers.pop().unwrap_or_default(), actions)
    }

    /// The first half of [`Device::write_batch`]: `writes` carried out on the documents and
    /// stored in one write, not yet durable.
    pub(crate) fn stage_writes(&mut self, writes: &[(ChatId, MessageOp)]) -> StagedWrites {
        let mut local = LocalWrites::default();
        let staged = writes.iter().map(|(chat, write)| self.write_staged(*chat, write, &mut local)).collect();
        let stored = self.store_writes(&mut local).map_err(|e| e.to_string());
        StagedWrites { staged, stored }
    }

    /// What makes this device's writes durable, to run where waiting for the disk blocks
    /// nothing else (see [`Device::write_batch`]).
    pub(crate) fn barrier_handle(&self) -> Barrier {
        self.store.barrier_handle()
    }

    /// The second half of [`Device::write_batch`], once the barrier after
    /// [`Device::stage_writes`] is done (or failed, with its error).
    pub(crate) fn finish_writes(
        &mut self,
        core: &mut SyncCore,
        writes: &[(ChatId, MessageOp)],
        staged: StagedWrites,
        barrier: Result<(), String>,
    ) -> (Vec<Written>, Vec<Action>) {
        let durable = staged.stored.and(barrier);
        let mut results = Vec::with_capacity(writes.len());
        let mut events = Vec::new();
        let mut outputs = Vec::new();
        let mut compact = BTreeMap::new();
        for ((chat, write), staged) in writes.iter().zip(staged.staged) {
            let (message, item, stored) = match (staged, &durable) {
                (Ok(s), Ok(())) => s,
                (Ok(_), Err(e)) => {
                    results.push(Err(Error::NotDurable(e.clone())));
                    continue;
                }
                (Err(e), _) => {
                    results.push(Err(e));
                    continue;
                }
            };
            compact.insert(*chat, stored);
            events.push(Action::Emit(self.written_event(*chat, write, &message)));
            results.push(Ok((message, item.client_seq)));
            // As stored now: sealed again if a rotation came between staging and here.
            let item = match self.store.outbox_item(item.client_seq) {
                Ok(Some(now)) => now,
                _ => item,
            };
            outputs.extend(core.handle(SyncInput::OutboxAdded(item)));
        }
        for (chat, stored) in compact {
            if let Err(e) = self.maybe_compact(chat, stored) {
                events.push(Action::Emit(Event::Error { message: format!("compacting chat {chat}: {e}") }));
            }
        }
        events.extend(self.carry_out(core, outputs));
        (results, events)
    }

    /// What the app is told of a write made here.
    fn written_event(&self, chat: ChatId, write: &MessageOp, message: &Message) -> Event {
        match write {
            MessageOp::Send { .. } => Event::MessageAdded { chat, message: message.clone(), local: true },
            MessageOp::Read { id } => Event::Read {
                chat,
                account: self.account().map(|a| a.to_string()).unwrap_or_default(),
                up_to: id.clone(),
            },
            _ => Event::MessageChanged { chat, message: message.clone(), local: true },
        }
    }

    /// Creates a chat ([`Device::new_chat`]) and queues its creation and title with `core`; it
    /// works offline, and the relay gets the chat when the outbox drains ([`Event::Acked`] for
    /// the first client seq). Returns the chat and what the driver must do now.
    pub fn create_chat(&mut self, core: &mut SyncCore, title: &str) -> Result<(ChatId, Vec<Action>), Error> {
        let (chat, items) = self.new_chat(title)?;
        Ok((chat, self.queue_new_chat(core, chat, items)))
    }

    /// Gives `core` a chat made here (ready at seq 0) and its outbox items, in order.
    fn queue_new_chat(&mut self, core: &mut SyncCore, chat: ChatId, items: Vec<OutboxItem>) -> Vec<Action> {
        let mut outputs = core.handle(SyncInput::ChatReady { chat, cursor: Seq(0) });
        for item in items {
            outputs.extend(core.handle(SyncInput::OutboxAdded(item)));
        }
        let mut actions = vec![Action::Emit(Event::ChatAdded { chat })];
        actions.extend(self.carry_out(core, outputs));
        actions
    }

    /// Creates a direct chat or a group with `others` ([`Device::new_chat_with`]) and queues it
    /// with `core`, like [`Device::create_chat`].
    pub fn create_chat_with(
        &mut self,
        core: &mut SyncCore,
        kind: ChatKind,
        title: &str,
        others: &[AccountId],
    ) -> Result<(ChatId, Vec<Action>), Error> {
        let (chat, items) = self.new_chat_with(kind, title, others)?;
        Ok((chat, self.queue_new_chat(core, chat, items)))
    }

    /// Renames a chat ([`Device::rename_local`]) and queues the change with `core`.
    pub fn rename(&mut self, core: &mut SyncCore, chat: ChatId, title: &str) -> Result<Vec<Action>, Error> {
        let item = self.rename_local(chat, title)?;
        let outputs = core.handle(SyncInput::OutboxAdded(item));
        Ok(self.carry_out(core, outputs))
    }

    /// Carries out `outputs` of `core`: everything that touches only this device is done here
    /// (follow-up inputs go back to `core`), the rest comes back as [`Action`]s in order.
    /// Failures of single steps become [`Event::Error`]; sync goes on.
    pub fn carry_out(&mut self, core: &mut SyncCore, outputs: Vec<SyncOutput>) -> Vec<Action> {
        let mut actions = Vec::new();
        if core.is_connected() {
            if let Err(e) = self.note_reached() {
                actions.push(Action::Emit(Event::Error { message: format!("recording the session: {e}") }));
            }
        }
        let mut queue = VecDeque::from(outputs);
        let mut waiting = std::collections::BTreeSet::new();
        let error = |message: String| Action::Emit(Event::Error { message });
        while let Some(o) = queue.pop_front() {
            match o {
                SyncOutput::Send(frame) => actions.push(Action::Send(frame)),
                SyncOutput::ApplyDelta(_) | SyncOutput::Acked { .. } | SyncOutput::Cursor { .. } => {
                    // With the deltas, acks, cursor moves and sends right after it (pages, or
                    // pushes and acks that came together, each ack followed by the next
                    // append), whatever their chats: stored with one write each.
                    let mut run = Run::default();
                    run.add(o);
                    while run.len < MAX_APPLY_BATCH && queue.front().is_some_and(Run::takes) {
                        if let Some(next) = queue.pop_front() {
                            run.add(next);
                        }
                    }
                    actions.extend(self.carry_out_run(core, run, &mut waiting, &mut queue));
                }
                SyncOutput::ApplyAccountEntry(entry) => {
                    match self.apply_account_entry(&entry) {
                        Ok(applied) => {
                            if let Some(due) = applied.rotation_due {
                                queue.extend(core.handle(SyncInput::RotationDue(due)));
                            }
                            if let Some(chat) = applied.left {
                                // What waits for the chat goes out once more as it is (a refused item
                                // may hold back the ones after it): the relay refuses it for good now.
                                match self.store.outbox_after(ClientSeq(0), usize::MAX) {
                                    Ok(items) => {
                                        let mine: Vec<_> = items.into_iter().filter(|i| i.chat == chat).collect();
                                        if !mine.is_empty() {
                                            queue.extend(core.handle(SyncInput::Resealed(mine)));
                                        }
                                    }
                                    Err(e) => actions.push(error(e.to_string())),
                                }
                                actions.push(Action::Emit(Event::ChatLeft { chat }));
                            }
                            if !applied.resealed.is_empty() {
                                queue.extend(core.handle(SyncInput::Resealed(applied.resealed)));
                            }
                            if let Some(chat) = applied.chat {
                                let cursor = self.cursor(chat).unwrap_or_default();
                                queue.extend(core.handle(SyncInput::ChatReady { chat, cursor }));
                                if applied.new_chat {
                                    actions.push(Action::Emit(Event::ChatAdded { chat }));
                                }
                            }
                        }
                        Err(Error::AccountLogForked(f)) => {
                            actions.push(Action::Emit(Event::AccountLogForked { seq: f.seq }))
                        }
                        Err(e) => actions.push(error(format!("account log entry {}: {e}", entry.seq))),
                    }
                    // Carried out, applied or not: the outbox may go once every entry is.
                    queue.extend(core.handle(SyncInput::AccountApplied(entry.seq)));
                }
                SyncOutput::Rejected { client_seq, chat, code, message } => {
                    if let Err(e) = self.store.outbox_remove(client_seq) {
                        actions.push(error(e.to_string()));
                    }
                    actions.push(Action::Emit(Event::Rejected { chat, client_seq, code, message }));
                }
                SyncOutput::LoadOutbox { after, max } => {
                    let (items, more) = match self.store.outbox_after(after, max + 1) {
                        Ok(mut items) => {
                            // Writes not yet durable reach the core when they are
                            // (`group_commit.rs`), not from here.
                            if let Some(bound) = self.durable_bound() {
                                items.retain(|i| i.client_seq < bound);
                            }
                            let more = items.len() > max;
                            items.truncate(max);
                            (items, more)
                        }
                        Err(e) => {
                            actions.push(error(e.to_string()));
                            (Vec::new(), false)
                        }
                    };
                    queue.extend(core.handle(SyncInput::OutboxLoaded { items, more }));
                }
                SyncOutput::Stale { client_seq, chat } => match self.remake_stale(client_seq) {
                    Ok(items) if !items.is_empty() => queue.extend(core.handle(SyncInput::Resealed(items))),
                    // Remade once the new keys arrive in the account log, or by key work.
                    Ok(_) if self.relook_due() => queue.extend(core.handle(SyncInput::RotationDue(true))),
                    Ok(_) => {}
                    Err(e) => actions.push(error(format!("chat {chat} client seq {}: {e}", client_seq.0))),
                },
                SyncOutput::Typing { chat, account, device } => {
                    actions.push(Action::Emit(Event::Typing { chat, account: account.to_string(), device: device.0 }))
                }
                SyncOutput::Rotate { req } => {
                    let work = self.key_work(req);
                    actions.extend(self.key_work_step(core, work, &mut queue));
                }
                SyncOutput::Looked { req, accounts } => {
                    let work = self.take_lookup(&accounts).and_then(|()| self.key_work(req));
                    // A second lookup only while lookups bring keys (a group has more members
                    // than one lookup asks for).
                    let work = match work {
                        Ok(KeyWork::Lookup(_)) if accounts.is_empty() => {
                            Err(Error::Untrusted("the directory does not know a member of the chat"))
                        }
                        work => work,
                    };
                    actions.extend(self.key_work_step(core, work, &mut queue));
                }
                SyncOutput::KeyWorkStale => self.forget_looked_up(),
                SyncOutput::KeyWorkDone => {
                    if let Err(e) = self.key_work_done() {
                        actions.push(error(e.to_string()));
                    }
                    if self.key_work_due().unwrap_or(false) {
                        queue.extend(core.handle(SyncInput::RotationDue(true)));
                    }
                }
                SyncOutput::Reply(frame) => actions.push(Action::Reply(frame)),
                SyncOutput::RetryAfter { ms } => actions.push(Action::RetryAfter(ms)),
                SyncOutput::Rewind { incarnation, account, chats, resend_after } => {
                    if let Err(e) = self.store.rewind(incarnation, account, &chats, resend_after) {
                        actions.push(error(format!("rewinding after the relay's restore: {e}")));
                    }
                }
                SyncOutput::Error { code: ErrorCode::UnsupportedVersion, message } => {
                    actions.push(Action::Emit(Event::VersionRefused { message }))
                }
                SyncOutput::Error {
                    code: code @ (ErrorCode::AccountSuspended | ErrorCode::AccountBanned | ErrorCode::AccountDeleted),
                    message,
                } => actions.push(Action::Emit(Event::Refused { code, message })),
                SyncOutput::Error { code, message } => actions.push(error(format!("relay: {message} ({code:?})"))),
                SyncOutput::NotRegistered => actions.push(error("the relay does not know this device".into())),
                SyncOutput::Revoked { proof } => {
                    if !self.session_end_proven(proof.as_deref()) {
                        actions.push(Action::Emit(Event::SessionRefused));
                        break;
                    }
                    if let Err(e) = self.wipe_account() {
                        actions.push(error(format!("deleting the account's data: {e}")));
                    }
                    actions.push(Action::Emit(Event::SessionRevoked));
                    // Nothing after this applies to a device that no longer has an account.
                    break;
                }
            }
        }
        actions
    }

    /// Carries out a run: its sends, the acks with one store write, then the deltas chat by
    /// chat into their documents and all of them into the store with one write, then the
    /// cursor moves; the app hears of what the deltas did only once they are stored. Deltas
    /// and cursors of a chat in `waiting` (a delta before them lacks its key) wait with it.
    fn carry_out_run(
        &mut self,
        core: &mut SyncCore,
        run: Run,
        waiting: &mut BTreeSet<ChatId>,
        queue: &mut VecDeque<SyncOutput>,
    ) -> Vec<Action> {
        let error = |message: String| Action::Emit(Event::Error { message });
        // Frames for the relay (the next appends, fetches) need nothing of the run stored.
        let mut actions: Vec<Action> = run.sends.into_iter().map(Action::Send).collect();
        if !run.acks.is_empty() {
            let seqs: Vec<ClientSeq> = run.acks.iter().map(|(cs, _, _)| *cs).collect();
            if let Err(e) = self.store.outbox_acked_many(&seqs) {
                actions.push(error(e.to_string()));
            }
            for (client_seq, chat, seq) in run.acks {
                // A chat whose next epoch waited for its creation to reach the relay.
                if seq.is_none() && self.store.rekey_due().is_ok_and(|d| d.contains_key(&chat)) {
                    queue.extend(core.handle(SyncInput::RotationDue(true)));
                }
                actions.push(Action::Emit(Event::Acked { chat, client_seq, seq }));
            }
        }
        let mut staged = StagedDeltas::default();
        let mut done = RunUpdates::default();
        for (chat, batch) in run.deltas {
            if waiting.contains(&chat) {
                continue;
            }
            let mut rest = &batch[..];
            while !rest.is_empty() {
                let applied = match self.stage_deltas(chat, rest, &mut staged) {
                    Ok(a) => a,
                    Err(e) => {
                        actions.push(error(format!("chat {chat} seq {}: {e}", rest[0].seq)));
                        // The document may be ahead of what is staged: what is staged is
                        // stored, and the document read again from the store.
                        actions.extend(self.store_run(&mut staged, &mut done));
                        self.drop_doc(chat);
                        rest = &rest[1..];
                        continue;
                    }
                };
                done.staged.extend(applied.updates.into_iter().map(|u| (chat, u)));
                for (seq, e) in applied.errors {
                    actions.push(error(format!("chat {chat} seq {seq}: {e}")));
                }
                actions.extend(applied.compaction.into_iter().map(|e| error(format!("compacting chat {chat}: {e}"))));
                if let Some(seq) = applied.no_key {
                    // It and the chat's deltas after it wait for the key.
                    waiting.insert(chat);
                    queue.extend(core.handle(SyncInput::KeyMissing { chat, seq }));
                    break;
                }
                rest = &rest[applied.consumed..];
            }
        }
        // Also with nothing left staged: what a broken document made store early is told now.
        actions.extend(self.store_run(&mut staged, &mut done));
        // A chat's cursor passes the device's own acknowledged deltas (a plain write: the
        // cursor is only ever moved on). Not for a chat whose deltas wait for a key, nor past
        // deltas that could not be stored.
        for (chat, seq) in run.cursors {
            if waiting.contains(&chat) || done.lost {
                continue;
            }
            match self.store.cursor(chat) {
                Ok(at) if at >= seq => {}
                Ok(_) => {
                    if let Err(e) = self.store.set_cursor(chat, seq) {
                        actions.push(error(e.to_string()));
                    }
                }
                Err(e) => actions.push(error(e.to_string())),
            }
        }
        for (chat, update) in done.stored {
            let added = update.added.into_iter().map(|message| Event::MessageAdded { chat, message, local: false });
            let changed =
                update.changed.into_iter().map(|message| Event::MessageChanged { chat, message, local: false });
            let read = update.read.into_iter().map(|(account, up_to)| Event::Read { chat, account, up_to });
            actions.extend(added.chain(changed).chain(read).map(Action::Emit));
        }
        actions
    }

    /// Stores what a run staged ([`Device::store_staged`]); the updates of what it stored
    /// move on to be told to the app, those of what it could not store are dropped.
    fn store_run(&mut self, staged: &mut StagedDeltas, done: &mut RunUpdates) -> Vec<Action> {
        let error = |message: String| Action::Emit(Event::Error { message });
        match self.store_staged(staged) {
            Ok(failed) => {
                done.stored.append(&mut done.staged);
                failed.into_iter().map(|e| error(format!("compacting: {e}"))).collect()
            }
            Err(e) => {
                done.staged.clear();
                done.lost = true;
                vec![error(format!("storing applied deltas: {e}"))]
            }
        }
    }

    /// What to do with the next step of the key work: send it, or with nothing (more) to do or
    /// a failure, tell the core it is no longer due.
    fn key_work_step(
        &mut self,
        core: &mut SyncCore,
        work: Result<KeyWork, Error>,
        queue: &mut VecDeque<SyncOutput>,
    ) -> Option<Action> {
        match work {
            Ok(KeyWork::Send(frame) | KeyWork::Lookup(frame)) => Some(Action::Send(frame)),
            Ok(KeyWork::Remade(items)) => {
                queue.extend(core.handle(SyncInput::Resealed(items)));
                queue.extend(core.handle(SyncInput::RotationDue(false)));
                if self.key_work_due().unwrap_or(false) {
                    queue.extend(core.handle(SyncInput::RotationDue(true)));
                }
                None
            }
            Ok(KeyWork::Nothing) => {
                queue.extend(core.handle(SyncInput::RotationDue(false)));
                None
            }
            Err(e) => {
                self.forget_looked_up();
                queue.extend(core.handle(SyncInput::RotationDue(false)));
                Some(Action::Emit(Event::Error { message: format!("renewing keys: {e}") }))
            }
        }
    }
}
