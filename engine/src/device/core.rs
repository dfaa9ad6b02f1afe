//! The device's sync logic, sans-IO.
//!
//! Call [`SyncCore::handle`] with each [`SyncInput`] (connection up or down, a frame from the
//! relay, a new outbox item, a chat whose key became known) and carry out the returned
//! [`SyncOutput`]s in order. The core never reads the clock or touches the network or the store.
//!
//! Protocol on each connection: `Hello`, then `SyncState` to learn the durable heads; the
//! account log is pulled first (it announces chats and their keys), then every chat whose head
//! is past its cursor, in pages, with at most [`MAX_FETCHES_IN_FLIGHT`] pages requested at once
//! (that is the flow control: the relay only sends what was asked for). Pushes that continue a
//! cursor are applied directly; a push past a gap triggers a fetch of the gap. The outbox is sent
//! in client-seq order with at most [`MAX_APPENDS_IN_FLIGHT`] unacknowledged appends, and only
//! once the account log is applied as far as the relay has it ([`SyncInput::AccountApplied`])
//! with no rotation due: a device back from offline learns of a revocation, and seals its
//! outbox again under the new epochs, before anything of it leaves (under the old keys, a
//! relay that keeps what it is sent could read it with the revoked device's keys).
//!
//! A request the relay answers with `RateLimited` changed nothing there: the core takes it back
//! (an append becomes unsent again, a fetch is forgotten), stops sending requests and asks the
//! driver, with [`SyncOutput::RetryAfter`], for a [`SyncInput::Resume`] after the delay. Then,
//! once every append sent before has been answered, the unsent outbox items go out again in
//! client-seq order. The relay holds back a device's later client seqs behind a refused one
//! until it comes again; waiting for the earlier answers makes sure the relay sees the resent
//! items in client-seq order too (were one refused after the resend began, a later item could
//! be stored first, and the refused one, resent, would be answered `Duplicate` unstored).
//!
//! An outbox item the relay answers with `StaleEpoch` (sealed under a key epoch that a rotation
//! ended) is held back the same way, and everything after it too, until the driver hands it in
//! sealed again under the new keys ([`SyncInput::Resealed`]), which it does once it applied the
//! rotation from the account log.
//!
//! When a session of the account ended without a rotation (it expired), the driver says so
//! ([`SyncInput::RotationDue`]); once caught up, the core asks it for a `Rotate` request
//! ([`SyncOutput::Rotate`]), a few times per connection at most.
//!
//! Restores (docs/protocol.md, "Restores"): the relay's `Hello` names its store's
//! [`Incarnation`]. When it is not the one the device last saw ([`SyncCore::with_incarnation`]),
//! the relay's store was restored from a backup: seqs the device passed may since have been
//! given to other deltas. On the `SyncState` answer the core moves each cursor back to the
//! floor the relay reports (the seq up to which every incarnation's log is the same; 0 for a
//! chat made since, or when a relay never restored names a new store), and asks the driver
//! ([`SyncOutput::Rewind`]) to store the lower cursors and the new incarnation in one write and
//! to put back into the outbox the device's own acknowledged deltas the relay no longer holds
//! (after the relay's highest client seq of this device); then it fetches and sends as on any
//! connection. A relay whose heads are below the device's cursors under the same incarnation
//! (a store copied back by hand) is rewound to those heads the same way.
//!
//! ```
//! use stratus_engine::core::{SyncCore, SyncInput, SyncOutput};
//! use stratus_engine::proto::wire::{ClientFrame, RelayFrame};
//! use stratus_engine::Seq;
//!
//! // A device at the start of its account log, nothing in its outbox.
//! let mut core = SyncCore::new(Seq(0), false);
//! let out = core.handle(SyncInput::Connected);
//! assert!(matches!(out.as_slice(), [SyncOutput::Send(ClientFrame::Hello { .. })]));
//! // The relay's `Hello` in turn: the core asks for the durable heads.
//! let version = stratus_engine::proto::wire::PROTOCOL_VERSION;
//! let incarnation = stratus_engine::proto::wire::Incarnation { store: [7; 16], generation: 0 };
//! let hello = RelayFrame::Hello { version, account: Some(stratus_engine::AccountId([1; 16])), incarnation };
//! let out = core.handle(SyncInput::Frame(Box::new(hello)));
//! assert!(matches!(out.as_slice(), [SyncOutput::Send(ClientFrame::SyncState { .. })]));
//! assert!(core.is_connected() && !core.is_caught_up());
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::device::store::{OutboxBody, OutboxItem};
use crate::proto::directory::{AccountChain, DirectoryEntry};
use crate::proto::ids::{AccountId, ChatId, ClientSeq, DeviceId, Seq};
use crate::proto::wire::{
    AccountEntry, ClientFrame, Delta, ErrorCode, Incarnation, RelayFrame, ReqId, Restored, MAX_PAGE_DELTAS,
    PROTOCOL_VERSION,
};

/// Most catch-up pages (chat or account) requested and not yet answered.
pub const MAX_FETCHES_IN_FLIGHT: usize = 4;
/// Most appends sent and not yet acknowledged.
pub const MAX_APPENDS_IN_FLIGHT: usize = 64;
/// Most outbox items the core holds; more stay in the store until these are acknowledged.
pub const OUTBOX_WINDOW: usize = 256;
/// Longest pause a relay's retry-after can impose; a longer one is cut to this, so that a
/// relay's mistake cannot stall the device for days.
pub const MAX_RETRY_AFTER_MS: u32 = 60_000;

/// What the driver tells the core.
#[derive(Debug)]
pub enum SyncInput {
    /// A sync stream to the relay is open.
    Connected,
    /// The stream closed.
    Disconnected,
    /// A frame from the relay.
    Frame(Box<RelayFrame>),
    /// A new outbox item was stored durably.
    OutboxAdded(OutboxItem),
    /// Outbox items loaded from the store after a [`SyncOutput::LoadOutbox`]; `more` says whether
    /// the store holds more after them.
    OutboxLoaded { items: Vec<OutboxItem>, more: bool },
    /// The device can now open this chat's deltas (its key arrived); `cursor` is where it stands.
    ChatReady { chat: ChatId, cursor: Seq },
    /// The delay of a [`SyncOutput::RetryAfter`] has passed: send again.
    Resume,
    /// Outbox items sealed again under new keys after a rotation; they replace the items with
    /// the same client seqs.
    Resealed(Vec<OutboxItem>),
    /// The delta at `seq` of `chat` could not be applied: its epoch's key has not arrived. The
    /// chat waits (its cursor stays before `seq`) until [`SyncInput::ChatReady`] says the key
    /// is here, then fetches from there again.
    KeyMissing { chat: ChatId, seq: Seq },
    /// Whether the account's keys are due a rotation (a session expired; a rotation since
    /// clears it).
    RotationDue(bool),
    /// The connection has been quiet for a while: ask the relay for its heads again (a
    /// `SyncState`), which both shows the connection still carries answers and fetches
    /// anything a lost push would have brought. Ignored unless connected with nothing waiting.
    Probe,
    /// The driver carried out the [`SyncOutput::ApplyAccountEntry`] up to this seq (applied,
    /// or failed and reported). Until every entry the core handed out is carried out, no
    /// outbox item is sent: an entry may end a key epoch, and the items sealed under it are
    /// sealed again when it is applied ([`SyncInput::Resealed`]).
    AccountApplied(Seq),
    /// Ask the relay for its heads again, and count as not caught up until the answer is in
    /// and everything up to those heads is applied: the relay refused a request as made for
    /// keys or members that moved on (`StaleEpoch`), so what the device knows is behind.
    Refresh,
}

/// What the core asks the driver to do, in order.
#[derive(Debug, PartialEq)]
pub enum SyncOutput {
    /// Send a frame to the relay.
    Send(ClientFrame),
    /// Open and apply this delta, then store the chat's cursor as `delta.seq`.
    ApplyDelta(Delta),
    /// Apply this account log entry, then store the account cursor as `entry.seq`.
    ApplyAccountEntry(AccountEntry),
    /// The device's own delta is durable on the relay; drop it from the outbox.
    Acked { client_seq: ClientSeq, chat: ChatId, seq: Option<Seq> },
    /// The relay refused an outbox item as made with keys a rotation ended (`StaleEpoch`): make
    /// it again under the new keys and hand it back with [`SyncInput::Resealed`]. Until then it
    /// and everything after it wait.
    Stale { client_seq: ClientSeq, chat: ChatId },
    /// Someone typing in a chat (tell the app; nothing is stored).
    Typing { chat: ChatId, account: AccountId, device: DeviceId },
    /// Do the device's key work with this req id (see [`SyncInput::RotationDue`]): send a
    /// `Rotate` or `Rekey`, or first a `LookupAccounts` whose answer comes back as
    /// [`SyncOutput::Looked`].
    Rotate { req: ReqId },
    /// The accounts looked up for the key work of `req`: take them and go on with it.
    Looked { req: ReqId, accounts: Vec<DirectoryEntry> },
    /// The relay took the key work (or it was no longer due): feed
    /// [`SyncInput::RotationDue`] again if more is due.
    KeyWorkDone,
    /// The relay refused the key work as made for keys or members that moved on
    /// (`StaleEpoch`): it is asked for again, with the members' keys looked up again.
    KeyWorkStale,
    /// The relay refused the delta for good; drop it from the outbox and tell the app.
    Rejected { client_seq: ClientSeq, chat: ChatId, code: ErrorCode, message: String },
    /// A chat's cursor moved without a delta to apply (the device's own delta); store it.
    Cursor { chat: ChatId, seq: Seq },
    /// Load up to `max` outbox items after `after` and answer with [`SyncInput::OutboxLoaded`].
    LoadOutbox { after: ClientSeq, max: usize },
    /// A reply to a request the driver made with a req id from [`SyncCore::next_req`].
    Reply(RelayFrame),
    /// The relay reported an error not tied to one of the above.
    Error { code: ErrorCode, message: String },
    /// The relay does not know this device (never linked, or removed).
    NotRegistered,
    /// The relay ended this device's session: stop syncing. With `proof` (the account log
    /// entry that ended it and the account's keys, from `RelayFrame::SessionEnded`), and only
    /// if the device verifies it, delete the account's data here; without it, or if it does
    /// not verify, keep everything (an unsigned error proves nothing).
    Revoked { proof: Option<Box<(AccountEntry, AccountChain)>> },
    /// The relay is limiting this device: feed [`SyncInput::Resume`] after `ms` milliseconds.
    /// Until then the core sends no request. Emitted once per pause.
    RetryAfter { ms: u32 },
    /// The relay's logs are not the ones this device followed (restored from a backup, or its
    /// heads are below the device's cursors). In one store write: lower the account cursor to
    /// at most `account` and each listed chat's cursor to at most its seq (whether or not the
    /// chat can be read yet), and remember `incarnation`; with `resend_after`, put the
    /// device's acknowledged outbox items after that client seq back into the outbox (the
    /// relay lost them). The core then loads the outbox again from its start.
    Rewind { incarnation: Incarnation, account: Seq, chats: Vec<(ChatId, Seq)>, resend_after: Option<ClientSeq> },
}

#[derive(Debug, Default)]
struct ChatSync {
    cursor: Seq,
    known_head: Seq,
    fetching: Option<ReqId>,
    ready: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Offline,
    AwaitHello,
    AwaitState,
    Ready,
}

enum Pending {
    FetchChat(ChatId),
    FetchAccount,
    Append(ClientSeq),
    State,
    Rotate,
}

/// Most `Rotate` requests per connection: a relay that keeps answering `StaleEpoch` is not
/// asked forever.
const MAX_ROTATE_ATTEMPTS: u32 = 3;

/// An outbox item in the core's window.
struct Slot {
    item: OutboxItem,
    /// Sent on this connection and not yet answered (or answered and then dropped).
    sent: bool,
    /// Replaced by a resealed version since it was last sent: a `StaleEpoch` answer is for
    /// the old one.
    resealed: bool,
}

impl Slot {
    fn new(item: OutboxItem) -> Self {
        Slot { item, sent: false, resealed: false }
    }
}

/// The sync state machine. See the module docs.
pub struct SyncCore {
    phase: Phase,
    next_req: ReqId,
    account_cursor: Seq,
    /// The last account log entry the driver carried out ([`SyncInput::AccountApplied`]).
    account_applied: Seq,
    account_head: Seq,
    account_fetching: bool,
    chats: BTreeMap<ChatId, ChatSync>,
    pending: BTreeMap<ReqId, Pending>,
    outbox: VecDeque<Slot>,
    /// Client seqs the relay refused as sealed under an ended epoch, waiting to be resealed.
    stale: BTreeSet<ClientSeq>,
    outbox_more: bool,
    outbox_loading: bool,
    appends_in_flight: usize,
    fetches_in_flight: usize,
    /// Waiting for [`SyncInput::Resume`] after a `RateLimited` answer.
    paused: bool,
    /// A `SyncState` was rate limited: ask again on resume.
    state_retry: bool,
    /// An append was rate limited: send none until every append in flight is answered.
    resending: bool,
    /// The account's keys are due a rotation.
    rotation_due: bool,
    /// A `SyncState` asked for by [`SyncInput::Refresh`] or after a rotation, not yet answered.
    refreshing: Option<ReqId>,
    /// A `Rotate` request is in flight.
    rotating: bool,
    /// `Rotate` requests sent on this connection.
    rotate_attempts: u32,
    /// The relay's incarnation this device last synced with (`None`: never, or before it was
    /// kept).
    incarnation: Option<Incarnation>,
    /// The incarnation the relay named in this connection's `Hello`, until its `SyncState`.
    hello_incarnation: Option<Incarnation>,
    /// What the relay showed as the end of this device's session, until its `SessionRevoked`.
    session_end: Option<Box<(AccountEntry, AccountChain)>>,
}

impl SyncCore {
    /// A core for a device whose account log cursor is `account_cursor` and whose outbox holds
    /// more than nothing when `outbox_nonempty`.
    pub fn new(account_cursor: Seq, outbox_nonempty: bool) -> Self {
        SyncCore {
            phase: Phase::Offline,
            next_req: 1,
            account_cursor,
            account_applied: account_cursor,
            account_head: account_cursor,
            account_fetching: false,
            chats: BTreeMap::new(),
            pending: BTreeMap::new(),
            outbox: VecDeque::new(),
            stale: BTreeSet::new(),
            outbox_more: outbox_nonempty,
            outbox_loading: false,
            appends_in_flight: 0,
            fetches_in_flight: 0,
            paused: false,
            state_retry: false,
            resending: false,
            rotation_due: false,
            refreshing: None,
            rotating: false,
            rotate_attempts: 0,
            incarnation: None,
            hello_incarnation: None,
            session_end: None,
        }
    }

    /// The relay incarnation this device last synced with, as its store keeps it (see the
    /// module docs, "Restores").
    pub fn with_incarnation(mut self, known: Option<Incarnation>) -> Self {
        self.incarnation = known;
        self
    }

    /// A fresh request id for a request the driver sends itself; the reply comes back as
    /// [`SyncOutput::Reply`].
    pub fn next_req(&mut self) -> ReqId {
        let r = self.next_req;
        self.next_req += 1;
        r
    }

    /// True once connected, caught up with every head the relay reported, nothing waits in
    /// the outbox, and no rotation of the account's keys is due from this device.
    pub fn is_idle(&self) -> bool {
        self.is_caught_up() && self.outbox.is_empty() && !self.outbox_more && !self.key_work_pending()
    }

    /// True while the device's own key work (a rotation or new epochs after a member change)
    /// is due on this connection or under way: a request that must cover the account's keys
    /// as they stand waits for it.
    /// (A `Rotate` is in flight, or due and still to be asked on this connection.)
    pub fn key_work_pending(&self) -> bool {
        self.rotating || (self.rotation_due && self.rotate_attempts < MAX_ROTATE_ATTEMPTS)
    }

    /// True once connected and caught up with every head the relay reported.
    pub fn is_caught_up(&self) -> bool {
        self.phase == Phase::Ready
            && self.fetches_in_flight == 0
            && self.refreshing.is_none()
            && self.account_cursor >= self.account_head
            && self.chats.values().all(|c| !c.ready || c.cursor >= c.known_head)
    }

    /// A one-line summary of the core's state, for diagnostics (the simulator prints it when a
    /// world does not converge).
    pub fn summary(&self) -> String {
        let behind = self.chats.values().filter(|c| c.ready && c.cursor < c.known_head).count();
        format!(
            "{:?} paused {} pending {} fetches {} appends {} resending {} stale {} outbox {}{} behind {} account {}/{}",
            self.phase,
            self.paused,
            self.pending.len(),
            self.fetches_in_flight,
            self.appends_in_flight,
            self.resending,
            self.stale.len(),
            self.outbox.len(),
            if self.outbox_more { "+" } else { "" },
            behind,
            self.account_cursor.0,
            self.account_head.0,
        )
    }

    /// True while a request of the core's, or the `Hello` that opens a connection, waits for
    /// the relay's answer.
    pub fn is_waiting(&self) -> bool {
        !self.pending.is_empty() || self.phase == Phase::AwaitHello
    }

    /// True while a stream is up and the relay accepted this device.
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::AwaitState | Phase::Ready)
    }

    /// Handles one input; see the module docs.
    pub fn handle(&mut self, input: SyncInput) -> Vec<SyncOutput> {
        let mut out = Vec::new();
        match input {
            SyncInput::Connected => {
                self.phase = Phase::AwaitHello;
                self.session_end = None;
                out.push(SyncOutput::Send(ClientFrame::Hello { version: PROTOCOL_VERSION }));
            }
            SyncInput::Disconnected => {
                self.phase = Phase::Offline;
                self.pending.clear();
                self.hello_incarnation = None;
                self.state_retry = false;
                self.refreshing = None;
                self.resending = false;
                self.rotating = false;
                self.rotate_attempts = 0;
                self.account_fetching = false;
                self.fetches_in_flight = 0;
                self.appends_in_flight = 0;
                for c in self.chats.values_mut() {
                    c.fetching = None;
                }
                for slot in self.outbox.iter_mut() {
                    slot.sent = false;
                }
            }
            SyncInput::Frame(frame) => self.frame(*frame, &mut out),
            SyncInput::OutboxAdded(item) => {
                if !self.outbox_more && self.outbox.len() < OUTBOX_WINDOW {
                    self.outbox.push_back(Slot::new(item));
                } else {
                    self.outbox_more = true;
                }
            }
            SyncInput::OutboxLoaded { items, more } => {
                self.outbox_loading = false;
                let last = self.outbox.back().map(|s| s.item.client_seq).unwrap_or_default();
                for item in items.into_iter().filter(|i| i.client_seq > last) {
                    if self.outbox.len() >= OUTBOX_WINDOW {
                        break;
                    }
                    self.stale.remove(&item.client_seq);
                    self.outbox.push_back(Slot::new(item));
                }
                self.outbox_more = more || self.outbox.len() >= OUTBOX_WINDOW;
            }
            SyncInput::ChatReady { chat, cursor } => {
                let c = self.chats.entry(chat).or_default();
                c.ready = true;
                c.cursor = c.cursor.max(cursor);
                c.known_head = c.known_head.max(cursor);
            }
            SyncInput::Resealed(items) => {
                for item in items {
                    // Items past the window are loaded from the store, resealed, later.
                    self.stale.remove(&item.client_seq);
                    if let Some(slot) = self.outbox.iter_mut().find(|s| s.item.client_seq == item.client_seq) {
                        slot.resealed = slot.sent;
                        slot.item = item;
                    }
                }
            }
            SyncInput::RotationDue(due) => {
                self.rotation_due = due;
                if !due && self.rotating {
                    // Nothing (more) to send for it: the request under way is given up (a late
                    // answer to it is passed on as a reply nobody waits for).
                    self.rotating = false;
                    self.pending.retain(|_, p| !matches!(p, Pending::Rotate));
                }
            }
            SyncInput::KeyMissing { chat, seq } => {
                let c = self.chats.entry(chat).or_default();
                c.ready = false;
                c.cursor = c.cursor.min(Seq(seq.0.saturating_sub(1)));
                c.known_head = c.known_head.max(seq);
            }
            SyncInput::Probe => {
                if self.phase == Phase::Ready && self.pending.is_empty() {
                    let req = self.next_req();
                    self.pending.insert(req, Pending::State);
                    out.push(SyncOutput::Send(ClientFrame::SyncState { req }));
                }
            }
            SyncInput::AccountApplied(seq) => self.account_applied = self.account_applied.max(seq),
            SyncInput::Refresh => self.refresh(&mut out),
            SyncInput::Resume => {
                self.paused = false;
                if self.refreshing.is_some_and(|r| !self.pending.contains_key(&r)) {
                    // Its `SyncState` was rate limited: asked again.
                    self.refreshing = None;
                    self.refresh(&mut out);
                }
                if self.state_retry && self.phase == Phase::AwaitState {
                    self.state_retry = false;
                    let req = self.next_req();
                    self.pending.insert(req, Pending::State);
                    out.push(SyncOutput::Send(ClientFrame::SyncState { req }));
                }
            }
        }
        self.schedule(&mut out);
        out
    }

    fn frame(&mut self, frame: RelayFrame, out: &mut Vec<SyncOutput>) {
        match frame {
            RelayFrame::Hello { account, incarnation, .. } => {
                self.hello_incarnation = Some(incarnation);
                if account.is_none() {
                    self.phase = Phase::Offline;
                    out.push(SyncOutput::NotRegistered);
                    return;
                }
                self.phase = Phase::AwaitState;
                let req = self.next_req();
                self.pending.insert(req, Pending::State);
                out.push(SyncOutput::Send(ClientFrame::SyncState { req }));
            }
            RelayFrame::SyncState { req, account_head, chats, restored }
                if self.is(req, |p| matches!(p, Pending::State)) =>
            {
                self.pending.remove(&req);
                if self.refreshing == Some(req) {
                    self.refreshing = None;
                }
                if let Some(incarnation) = self.hello_incarnation.take() {
                    self.check_incarnation(incarnation, account_head, &chats, restored, out);
                }
                self.phase = Phase::Ready;
                self.account_head = self.account_head.max(account_head);
                for (chat, head) in chats {
                    let c = self.chats.entry(chat).or_default();
                    c.known_head = c.known_head.max(head);
                }
            }
            RelayFrame::Behind { account_head, chats } => {
                // Pushes were dropped: fetch what they carried (schedule does, past each cursor).
                self.account_head = self.account_head.max(account_head);
                for (chat, head) in chats {
                    let c = self.chats.entry(chat).or_default();
                    c.known_head = c.known_head.max(head);
                }
            }
            RelayFrame::AccountPage { req, entries, head } if self.is(req, |p| matches!(p, Pending::FetchAccount)) => {
                self.pending.remove(&req);
                self.account_fetching = false;
                self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                if entries.is_empty() {
                    self.account_head = head.max(self.account_cursor);
                }
                let before = self.account_cursor;
                let any = !entries.is_empty();
                for e in entries {
                    self.account_entry(e, out);
                }
                if any && self.account_cursor == before {
                    // Nothing continued the cursor: a gap. Do not ask again on this connection.
                    self.account_head = self.account_cursor;
                    out.push(SyncOutput::Error {
                        code: ErrorCode::Internal,
                        message: format!("relay sent the account log with a gap after seq {before}"),
                    });
                }
            }
            RelayFrame::PushAccount { entry } => {
                self.account_head = self.account_head.max(entry.seq);
                if !self.account_fetching {
                    self.account_entry(entry, out);
                }
            }
            RelayFrame::ChatPage { req, chat, deltas, head }
                if self.is(req, |p| matches!(p, Pending::FetchChat(c) if *c == chat)) =>
            {
                self.pending.remove(&req);
                self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                let c = self.chats.entry(chat).or_default();
                c.fetching = None;
                if deltas.is_empty() {
                    c.known_head = head.max(c.cursor);
                }
                c.known_head = c.known_head.max(head);
                for d in deltas {
                    if d.seq == c.cursor.next() {
                        c.cursor = d.seq;
                        out.push(SyncOutput::ApplyDelta(d));
                    } else if d.seq > c.cursor {
                        // A hole in a page: the relay broke its contract. Stop fetching this
                        // chat on this connection rather than asking for the same page forever.
                        c.known_head = c.cursor;
                        out.push(SyncOutput::Error {
                            code: ErrorCode::Internal,
                            message: format!("relay sent chat {chat} with a gap after seq {}", c.cursor),
                        });
                        break;
                    }
                }
            }
            // Until this connection's `SyncState` is answered the device does not know whether
            // the relay's logs are still the ones it followed (a restore): a delta pushed
            // meanwhile is fetched after it (its head counts it), not applied under a cursor
            // the rewind would not know to lower.
            RelayFrame::Push { .. } if self.phase != Phase::Ready => {}
            RelayFrame::Push { delta } => {
                let c = self.chats.entry(delta.chat).or_default();
                if c.ready && c.fetching.is_none() && delta.seq == c.cursor.next() {
                    c.cursor = delta.seq;
                    c.known_head = c.known_head.max(delta.seq);
                    out.push(SyncOutput::ApplyDelta(delta));
                } else {
                    c.known_head = c.known_head.max(delta.seq);
                }
            }
            RelayFrame::Acked { req, chat, client_seq, seq }
                if self.is(req, |p| matches!(p, Pending::Append(cs) if *cs == client_seq)) =>
            {
                self.pending.remove(&req);
                self.appends_in_flight = self.appends_in_flight.saturating_sub(1);
                self.outbox.retain(|s| s.item.client_seq != client_seq);
                out.push(SyncOutput::Acked { client_seq, chat, seq: Some(seq) });
                let c = self.chats.entry(chat).or_default();
                c.known_head = c.known_head.max(seq);
                if c.ready && c.fetching.is_none() && seq == c.cursor.next() {
                    c.cursor = seq;
                    out.push(SyncOutput::Cursor { chat, seq });
                }
            }
            RelayFrame::Duplicate { req, chat, client_seq }
                if self.is(req, |p| matches!(p, Pending::Append(cs) if *cs == client_seq)) =>
            {
                self.pending.remove(&req);
                self.appends_in_flight = self.appends_in_flight.saturating_sub(1);
                self.outbox.retain(|s| s.item.client_seq != client_seq);
                out.push(SyncOutput::Acked { client_seq, chat, seq: None });
            }
            RelayFrame::Done { req } if self.is(req, |p| matches!(p, Pending::Append(_))) => {
                // A chat creation from the outbox is on the relay.
                let Some(Pending::Append(client_seq)) = self.pending.remove(&req) else { unreachable!("checked") };
                self.appends_in_flight = self.appends_in_flight.saturating_sub(1);
                if let Some(pos) = self.outbox.iter().position(|s| s.item.client_seq == client_seq) {
                    let slot = self.outbox.remove(pos).expect("position is in range");
                    out.push(SyncOutput::Acked { client_seq, chat: slot.item.chat, seq: None });
                }
            }
            RelayFrame::Done { req } if self.is(req, |p| matches!(p, Pending::Rotate)) => {
                // Rotated, or no longer due: the account log brings the rotation either way.
                self.pending.remove(&req);
                self.rotating = false;
                self.rotation_due = false;
                self.rotate_attempts = 0;
                out.push(SyncOutput::KeyWorkDone);
                // Its entries (the new epochs) are in the account log now: the heads are asked
                // for again, and the outbox waits until they are read and applied.
                self.refresh(out);
            }
            RelayFrame::Accounts { req, accounts } if self.is(req, |p| matches!(p, Pending::Rotate)) => {
                out.push(SyncOutput::Looked { req, accounts });
            }
            RelayFrame::SessionEnded { entry, chain } => self.session_end = Some(Box::new((*entry, *chain))),
            RelayFrame::Error { code: ErrorCode::SessionRevoked, .. } => {
                self.phase = Phase::Offline;
                out.push(SyncOutput::Revoked { proof: self.session_end.take() });
            }
            RelayFrame::Error { req: Some(req), code, message } if self.is(req, |_| true) => {
                match self.pending.remove(&req) {
                    Some(Pending::Append(cs)) => {
                        self.appends_in_flight = self.appends_in_flight.saturating_sub(1);
                        let retry = matches!(code, ErrorCode::RateLimited | ErrorCode::Internal);
                        if code == ErrorCode::StaleEpoch {
                            // Not stored, and the relay holds back what comes after it: it goes
                            // again, first, once sealed under the new keys.
                            if let Some(slot) = self.outbox.iter_mut().find(|s| s.item.client_seq == cs) {
                                slot.sent = false;
                                if !std::mem::take(&mut slot.resealed) {
                                    self.stale.insert(cs);
                                    out.push(SyncOutput::Stale { client_seq: cs, chat: slot.item.chat });
                                }
                            }
                            self.resending = true;
                        } else if retry {
                            // Stays in the outbox; sent again on the next connection.
                            out.push(SyncOutput::Error { code, message });
                        } else if let Some(pos) = self.outbox.iter().position(|s| s.item.client_seq == cs) {
                            let slot = self.outbox.remove(pos).expect("position is in range");
                            out.push(SyncOutput::Rejected { client_seq: cs, chat: slot.item.chat, code, message });
                        }
                    }
                    Some(Pending::FetchChat(chat)) => {
                        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                        if let Some(c) = self.chats.get_mut(&chat) {
                            c.fetching = None;
                            // Do not ask again on this connection.
                            c.known_head = c.cursor;
                        }
                        // Not a member any more: the account log says so too (the chat is
                        // marked left when it is applied); nothing to report.
                        if code != ErrorCode::NotMember {
                            out.push(SyncOutput::Error { code, message });
                        }
                    }
                    Some(Pending::FetchAccount) => {
                        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                        self.account_fetching = false;
                        self.account_head = self.account_cursor;
                        out.push(SyncOutput::Error { code, message });
                    }
                    Some(Pending::Rotate) => {
                        self.rotating = false;
                        if code == ErrorCode::StaleEpoch {
                            out.push(SyncOutput::KeyWorkStale);
                        } else {
                            // Asked again only once the account log says so again.
                            self.rotation_due = false;
                            out.push(SyncOutput::Error { code, message });
                        }
                    }
                    Some(Pending::State) | None => {
                        if self.refreshing == Some(req) {
                            // Not answered: the next connection's heads will do.
                            self.refreshing = None;
                        }
                        out.push(SyncOutput::Error { code, message })
                    }
                }
            }
            RelayFrame::RateLimited { req, retry_after_ms } if self.is(req, |_| true) => {
                match self.pending.remove(&req) {
                    Some(Pending::Append(cs)) => {
                        self.appends_in_flight = self.appends_in_flight.saturating_sub(1);
                        // Not stored: it goes again, before anything after it, on resume.
                        if let Some(slot) = self.outbox.iter_mut().find(|s| s.item.client_seq == cs) {
                            slot.sent = false;
                        }
                        self.resending = true;
                    }
                    Some(Pending::FetchChat(chat)) => {
                        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                        if let Some(c) = self.chats.get_mut(&chat) {
                            c.fetching = None;
                        }
                    }
                    Some(Pending::FetchAccount) => {
                        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
                        self.account_fetching = false;
                    }
                    Some(Pending::State) => self.state_retry = true,
                    Some(Pending::Rotate) => {
                        // Asked again on resume; a wait is not a failed attempt.
                        self.rotating = false;
                        self.rotate_attempts = self.rotate_attempts.saturating_sub(1);
                    }
                    None => {}
                }
                if !self.paused {
                    self.paused = true;
                    out.push(SyncOutput::RetryAfter { ms: retry_after_ms.clamp(1, MAX_RETRY_AFTER_MS) });
                }
            }
            RelayFrame::RateLimited { req, retry_after_ms } => {
                // A request the driver made itself (creating a chat): it fails with a typed error.
                out.push(SyncOutput::Reply(RelayFrame::Error {
                    req: Some(req),
                    code: ErrorCode::RateLimited,
                    message: format!("the relay is limiting this device; try again in {retry_after_ms} ms"),
                }))
            }
            RelayFrame::Error { req: None, code, message } => out.push(SyncOutput::Error { code, message }),
            RelayFrame::Typing { chat, account, device } => out.push(SyncOutput::Typing { chat, account, device }),
            other => out.push(SyncOutput::Reply(other)),
        }
    }

    /// True when `req` is a request of ours of the kind `kind` accepts: a reply of the wrong
    /// kind for a req id (a buggy or hostile relay) is not taken as an answer.
    fn is(&self, req: ReqId, kind: impl Fn(&Pending) -> bool) -> bool {
        self.pending.get(&req).is_some_and(kind)
    }

    /// Asks for the heads again ([`SyncInput::Refresh`]); while connected only (a new
    /// connection asks for them anyway).
    fn refresh(&mut self, out: &mut Vec<SyncOutput>) {
        if self.phase == Phase::Ready && self.refreshing.is_none() {
            let req = self.next_req();
            self.pending.insert(req, Pending::State);
            self.refreshing = Some(req);
            out.push(SyncOutput::Send(ClientFrame::SyncState { req }));
        }
    }

    fn account_entry(&mut self, e: AccountEntry, out: &mut Vec<SyncOutput>) {
        if e.seq == self.account_cursor.next() {
            self.account_cursor = e.seq;
            out.push(SyncOutput::ApplyAccountEntry(e));
        }
    }
}

#[path = "core_schedule.rs"]
mod schedule;

#[path = "core_restore.rs"]
mod restore;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
