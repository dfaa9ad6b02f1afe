//! One chat as an Automerge document, and the only door through which outside bytes reach
//! Automerge.
//!
//! Layout: the root map holds `title` (a string), `messages` (a list of maps) and `reactions`
//! (a map whose keys are `"<message id> <account> <reaction>"`). A message map holds `id`,
//! `author`, `device`, `text`, `ts`, optionally `reply_to` (a message id) and `attachments` (a
//! list, reserved for media, made with the message when it has any). Containers are made only
//! by the genesis change or with their message, so no two devices ever make competing ones;
//! reactions live at the root rather than in a map per message because the apply cost grows
//! with the operations per message.
//! An edit puts a new `text` and `edited` (its time); a delete for everyone puts `deleted` (its
//! time) and an empty `text`, and a deleted message shows no text even if an edit made at the
//! same time on another device wins the `text` register. List order is the display order;
//! Automerge orders concurrent inserts the same way on every device.
//!
//! The root also holds `read`: per device, how many messages (from the top of the display
//! order) it has read (keys `"<account> <device>"`, integer values). An account has read as far
//! as the furthest of its devices; that gives the unread count on every device of the account
//! and the read receipts the other members see. A count, not a message id, so that reading the
//! marks costs nothing per message; a message inserted concurrently above a mark shifts it by
//! one, the same way on every device.
//!
//! The root structure is made by a deterministic *genesis* change (fixed actor derived from the
//! chat id, time 0), which every device creates on its own and which therefore has the same
//! hash everywhere: no device ever makes a competing `messages` list.
//!
//! Every Automerge call on bytes that came from outside the device goes through
//! [`ChatDoc::apply_untrusted`]: size limit, `catch_unwind`, and a poisoned flag so that the
//! caller reloads the document from its store if Automerge panicked half-way.
//!
//! Changes whose dependencies have not arrived wait in a bounded queue of the document's own
//! (not Automerge's): each change is checked against its device's sequence when it is applied,
//! since Automerge applies a change that skips seqs but then saves a document that does not
//! load.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use serde::Serialize;

use crate::proto::ids::{AccountId, ChatId, DeviceId};

#[path = "doc_authorship.rs"]
mod authorship;
#[path = "doc_sync.rs"]
mod sync;
#[path = "doc_view.rs"]
mod view;
pub(crate) use authorship::message_id_prefix;
pub use authorship::Author;
use authorship::Touched;
pub use automerge::sync::State as SyncState;
pub use sync::{MAX_SYNC_CHANGES, MAX_SYNC_MESSAGE_BYTES};

/// Largest change accepted from outside, in bytes (the relay caps sealed deltas at 64 KiB).
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Most operations in one change accepted from outside. A message is six operations; the
/// byte limit alone does not bound the work, since run-length encoding lets a 1 KiB change
/// carry a million list inserts (seconds of CPU and a gigabyte and more of memory to apply).
pub const MAX_CHANGE_OPS: usize = 1024;
/// Longest reaction (an emoji or a short word), in bytes.
pub const MAX_REACTION_BYTES: usize = 32;

/// Most changes held back until their dependencies arrive. Changes normally arrive in causal
/// order (the relay's log order is one), so only a device that lost changes, or a hostile one,
/// fills this; when it is full, a change that cannot be applied yet is refused
/// ([`DocError::TooManyPending`]).
pub const MAX_PENDING_CHANGES: usize = 1024;
/// Most bytes of changes held back in one document (changes are up to [`MAX_CHANGE_BYTES`]
/// each, so the count alone allowed 64 MiB a document). With at most
/// `DOC_CACHE` (64) chat documents in memory, what a device holds back is at most 16 MiB
/// however many chats others put it in; past it a change that cannot be applied yet is refused
/// ([`DocError::TooManyPending`]).
pub const MAX_PENDING_BYTES: usize = 256 * 1024;

/// Why a document operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// Outside bytes larger than [`MAX_CHANGE_BYTES`].
    #[error("change of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Automerge rejected the bytes.
    #[error("malformed change: {0}")]
    Malformed(String),
    /// The change carries more operations than [`MAX_CHANGE_OPS`].
    #[error("change of {0} operations exceeds the limit")]
    TooManyOps(usize),
    /// Automerge panicked on the bytes; the document must be reloaded from the store.
    #[error("automerge panicked on untrusted bytes; the document was reloaded")]
    Panicked,
    /// The document lacks the chat structure (it was damaged).
    #[error("the chat document has no message list")]
    NoMessageList,
    /// The change carries a value the document could not save and load back: a negative
    /// commit time. Automerge saves commit times delta-encoded with saturating arithmetic, so
    /// one such change would make every later snapshot of the chat fail to load.
    #[error("change has an out-of-range {0}")]
    OutOfRange(&'static str),
    /// The change does not continue its device's sequence (seq one more than the device's last
    /// change, operation counters above its last ones). Automerge would apply it, but a saved
    /// document holding it does not load.
    #[error("change does not continue its device's sequence")]
    NotInSequence,
    /// The change's bytes are not the form Automerge writes for its content. A change's hash is
    /// that of its bytes, but a saved document keeps only the content and encodes it again on
    /// loading: the hash would change and the document not load ("mismatching heads").
    #[error("change is not canonically encoded")]
    NonCanonical,
    /// The change does something its sender may not (see the authorship rules in
    /// `doc_authorship.rs`): edit another account's message, react as another account, ...
    #[error("change refused: it {0}")]
    Forbidden(&'static str),
    /// [`MAX_PENDING_CHANGES`] changes, or [`MAX_PENDING_BYTES`], already wait for their
    /// dependencies.
    #[error("too many changes wait for changes that have not arrived")]
    TooManyPending,
    /// No message with that id in the chat.
    #[error("no message {0} in this chat")]
    UnknownMessage(String),
    /// The message was deleted for everyone; it cannot be edited or reacted to.
    #[error("message {0} was deleted")]
    Deleted(String),
    /// A reaction that is empty, longer than [`MAX_REACTION_BYTES`], or holds whitespace.
    #[error("a reaction is one emoji or word of at most {MAX_REACTION_BYTES} bytes")]
    BadReaction,
}

/// A message as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Unique id (hex).
    pub id: String,
    /// The author's account.
    pub author: String,
    /// The device that wrote it.
    pub device: String,
    /// The text.
    pub text: String,
    /// When it was written on its device, milliseconds since the Unix epoch.
    pub ts: i64,
    /// The message it answers.
    pub reply_to: Option<String>,
    /// When its text was last edited (by its author's device's clock).
    pub edited: Option<i64>,
    /// Deleted for everyone (its text is gone).
    pub deleted: bool,
    /// Reactions: each reaction with the accounts that gave it, sorted.
    pub reactions: BTreeMap<String, Vec<String>>,
    /// Attachments (reserved for media; none are made yet).
    pub attachments: Vec<String>,
    /// The accounts other than the author's that have read it (read receipts), sorted.
    pub read_by: Vec<String>,
}

/// What a change from outside did to the messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DocUpdate {
    /// Messages it added.
    pub added: Vec<Message>,
    /// Messages already there that it edited, deleted or reacted to, as they are now.
    pub changed: Vec<Message>,
    /// Accounts whose read mark it moved, with the message they have now read up to.
    pub read: Vec<(String, String)>,
    /// The change was in the document already (applied, held back, or this device's own):
    /// nothing changed, and the store has it (the caller need not store it again).
    pub known: bool,
}

/// A chat's Automerge document.
pub struct ChatDoc {
    doc: Automerge,
    poisoned: bool,
    /// Per Automerge actor: the seq and max op of its last applied change, which its next
    /// change must continue.
    actors: BTreeMap<ActorId, (u64, u64)>,
    /// Changes whose dependencies are missing, oldest first, at most [`MAX_PENDING_CHANGES`].
    /// Not saved: the store keeps them as changes, and loading queues them again.
    pending: Vec<Change>,
    /// Who sent the changes from outside, by their actor (see [`Author`]); the store keeps it.
    authors: BTreeMap<ActorId, Author>,
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `None`. The panic message is not printed: the caller reports
/// the failure as a typed error.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    r.ok()
}

/// Refuses a change whose commit time the saved document cannot hold (see
/// [`DocError::OutOfRange`]): non-negative times never overflow a delta. Own changes are in
/// range by construction (see [`commit_time`]); seqs and operation counters are checked against
/// the device's sequence when the change is applied.
fn check_savable(change: &Change) -> Result<(), DocError> {
    if change.timestamp() < 0 {
        return Err(DocError::OutOfRange("commit time"));
    }
    Ok(())
}

/// Refuses a change whose bytes Automerge would not write itself (see
/// [`DocError::NonCanonical`]): decoded and encoded again, it must keep its hash.
fn check_canonical(change: &Change) -> Result<(), DocError> {
    match guarded(|| Change::from(change.decode())) {
        Some(again) if again.hash() == change.hash() => Ok(()),
        _ => Err(DocError::NonCanonical),
    }
}

/// A commit time for an own change: the wall clock can be set before 1970 (or a message's time
/// be anything), and negative times break saving (see [`DocError::OutOfRange`]).
fn commit_time(ms: i64) -> i64 {
    ms.max(0)
}

/// The Automerge actor a device writes as: derived from its id, so it is stable across restarts.
pub(crate) fn device_actor(device: &DeviceId) -> ActorId {
    let h = blake3::hash(device.0.as_bytes());
    ActorId::from(&h.as_bytes()[..16])
}

fn genesis_actor(chat: ChatId) -> ActorId {
    let mut h = blake3::Hasher::new();
    h.update(b"stratus-genesis");
    h.update(&chat.0);
    ActorId::from(&h.finalize().as_bytes()[..16])
}

impl ChatDoc {
    /// A new document holding only the chat's genesis change.
    ///
    /// ```
    /// use stratus_engine::doc::{new_message, Author, ChatDoc};
    /// use stratus_engine::{AccountId, ChatId, DeviceId};
    ///
    /// let (chat, alice, bob) = (ChatId([9; 16]), AccountId([1; 16]), AccountId([2; 16]));
    /// let (laptop, phone) = (DeviceId("laptop".into()), DeviceId("phone".into()));
    /// let (mut a, mut b) = (ChatDoc::new(chat, &laptop), ChatDoc::new(chat, &phone));
    /// let change = a.add_message(&new_message(alice, &laptop, "hi", 1_700_000_000_000, [1; 16]))?;
    /// // What arrives from outside goes through the checks: here, that the change is the
    /// // laptop's own and writes only what its account may.
    /// let added = b.apply_untrusted(&change, &Author { account: alice, device: laptop.clone() })?;
    /// assert_eq!(added[0].text, "hi");
    /// // Bob's device cannot pass it off as its own.
    /// let again = a.add_message(&new_message(alice, &laptop, "again", 1_700_000_000_001, [2; 16]))?;
    /// assert!(b.apply_untrusted(&again, &Author { account: bob, device: phone }).is_err());
    /// assert_eq!(b.messages().len(), 1);
    /// # Ok::<(), stratus_engine::doc::DocError>(())
    /// ```
    pub fn new(chat: ChatId, device: &DeviceId) -> Self {
        let mut doc = Automerge::new().with_actor(genesis_actor(chat));
        doc.transact_with::<_, _, automerge::AutomergeError, _>(
            |_| CommitOptions::default().with_time(0),
            |tx| {
                tx.put_object(ROOT, "messages", ObjType::List)?;
                tx.put_object(ROOT, "read", ObjType::Map)?;
                tx.put_object(ROOT, "reactions", ObjType::Map)?;
                Ok(())
            },
        )
        .expect("building the genesis change cannot fail");
        let mut d =
            ChatDoc { doc, poisoned: false, actors: BTreeMap::new(), pending: Vec::new(), authors: BTreeMap::new() };
        // The genesis change counts like any other (its operation counters are the first).
        d.note_last_local_change();
        d.doc.set_actor(device_actor(device));
        d
    }

    /// The document's heads (for [`ChatDoc::changes_since`]).
    pub fn head_hashes(&self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
    }

    /// The bytes of the changes applied since `heads` (this device's own and those from
    /// outside), in causal order; not those waiting for their dependencies.
    pub fn changes_since(&self, heads: &[automerge::ChangeHash]) -> Vec<Vec<u8>> {
        self.doc.get_changes(heads).into_iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// Loads a document saved by this device (snapshot plus changes, in order, and who sent the
    /// changes from outside). The bytes come from the device's own store but are still guarded:
    /// a damaged store gives an error.
    pub fn load(
        chat: ChatId,
        device: &DeviceId,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
        authors: &[Author],
    ) -> Result<Self, DocError> {
        let mut d = match snapshot {
            Some(s) => {
                let doc = guarded(|| Automerge::load(s))
                    .ok_or(DocError::Panicked)?
                    .map_err(|e| DocError::Malformed(e.to_string()))?;
                let mut actors = BTreeMap::new();
                // In causal order, so each actor's last change comes last.
                for c in doc.get_changes(&[]) {
                    actors.insert(c.actor_id().clone(), (c.seq(), c.max_op()));
                }
                ChatDoc { doc, poisoned: false, actors, pending: Vec::new(), authors: BTreeMap::new() }
            }
            None => ChatDoc::new(chat, device),
        };
        d.authors.extend(authors.iter().map(|a| (device_actor(&a.device), a.clone())));
        d.doc.set_actor(device_actor(device));
        for c in changes {
            let change = guarded(|| Change::from_bytes(c.to_vec()))
                .ok_or(DocError::Panicked)?
                .map_err(|e| DocError::Malformed(e.to_string()))?;
            match d.integrate(change, &mut Touched::default()) {
                // Stored while it waited for its dependencies, refused once they came: it was
                // never part of the document.
                Err(DocError::NotInSequence | DocError::Forbidden(_)) => {}
                r => r?,
            }
        }
        Ok(d)
    }

    /// Applies `change` if its dependencies are present, else holds it back; then applies every
    /// held-back change that became ready. An error is about `change`; a held-back change that
    /// fails its checks when its turn comes is dropped. What the changes applied touch is added
    /// to `touched`.
    fn integrate(&mut self, change: Change, touched: &mut Touched) -> Result<(), DocError> {
        let hash = change.hash();
        if self.doc.get_change_by_hash(&hash).is_some() || self.pending.iter().any(|c| c.hash() == hash) {
            return Ok(());
        }
        if !self.is_ready(&change) {
            let held: usize = self.pending.iter().map(|c| c.raw_bytes().len()).sum();
            if self.pending.len() >= MAX_PENDING_CHANGES || held + change.raw_bytes().len() > MAX_PENDING_BYTES {
                return Err(DocError::TooManyPending);
            }
            self.pending.push(change);
            return Ok(());
        }
        self.apply_ready(change, touched)?;
        while let Some(i) = self.pending.iter().position(|c| self.is_ready(c)) {
            let next = self.pending.remove(i);
            if let Err(DocError::Panicked) = self.apply_ready(next, touched) {
                return Err(DocError::Panicked);
            }
        }
        Ok(())
    }

    fn is_ready(&self, change: &Change) -> bool {
        change.deps().iter().all(|d| self.doc.get_change_by_hash(d).is_some())
    }

    /// Applies a change whose dependencies are present, if it continues its actor's sequence.
    fn apply_ready(&mut self, change: Change, touched: &mut Touched) -> Result<(), DocError> {
        let actor = change.actor_id().clone();
        let (seq, max_op) = self.actors.get(&actor).copied().unwrap_or((0, 0));
        if change.seq() != seq + 1 || change.start_op().get() <= max_op {
            return Err(DocError::NotInSequence);
        }
        // A change's first operation counter is one above the largest its author had seen,
        // all of it in the change's dependencies, which are here: a larger one would raise the
        // document's counter to where local writes overflow it (automerge then panics on every
        // write, and on reload).
        let highest = self.actors.values().map(|(_, m)| *m).max().unwrap_or(0);
        if change.start_op().get() > highest.saturating_add(1) {
            return Err(DocError::OutOfRange("operation counter"));
        }
        let mine = if &actor != self.doc.get_actor() {
            let from = self.authors.get(&actor).ok_or(DocError::Forbidden("comes from a device never heard from"))?;
            self.check_authorship(&change, from)?
        } else {
            Touched::default()
        };
        let next = (change.seq(), change.max_op());
        match guarded(|| self.doc.apply_changes([change])) {
            None => {
                self.poisoned = true;
                Err(DocError::Panicked)
            }
            Some(Err(e)) => Err(DocError::Malformed(e.to_string())),
            Some(Ok(())) => {
                self.actors.insert(actor, next);
                touched.extend(mine);
                Ok(())
            }
        }
    }

    fn note_last_local_change(&mut self) {
        if let Some(c) = self.doc.get_last_local_change() {
            self.actors.insert(c.actor_id().clone(), (c.seq(), c.max_op()));
        }
    }

    /// Applies change bytes that came from outside the device, sent by `from`; returns the
    /// messages the change added (see [`ChatDoc::apply_untrusted_update`]).
    pub fn apply_untrusted(&mut self, bytes: &[u8], from: &Author) -> Result<Vec<Message>, DocError> {
        Ok(self.apply_untrusted_update(bytes, from)?.added)
    }

    /// True if changes of `from`'s device were seen before (else the caller stores `from` with
    /// the change, see [`ChatDoc::load`]).
    pub fn knows_author(&self, from: &Author) -> bool {
        let actor = device_actor(&from.device);
        // This device's own needs no record (its changes from outside are only copies).
        &actor == self.doc.get_actor() || self.authors.contains_key(&actor)
    }

    /// Applies change bytes that came from outside the device, sent by `from` (the account and
    /// device the relay stamped on the delta); the change may do only what `from` may (see
    /// `doc_authorship.rs`). Never panics; on error nothing changed, except after
    /// [`DocError::Panicked`], when [`ChatDoc::is_poisoned`] is true and the caller must reload
    /// the document from its store. Returns the messages the change (and any held-back change
    /// it let through) added and changed.
    pub fn apply_untrusted_update(&mut self, bytes: &[u8], from: &Author) -> Result<DocUpdate, DocError> {
        if bytes.len() > MAX_CHANGE_BYTES {
            return Err(DocError::TooLarge(bytes.len()));
        }
        let change = guarded(|| Change::from_bytes(bytes.to_vec()))
            .ok_or(DocError::Panicked)?
            .map_err(|e| DocError::Malformed(e.to_string()))?;
        if change.len() > MAX_CHANGE_OPS {
            return Err(DocError::TooManyOps(change.len()));
        }
        check_savable(&change)?;
        check_canonical(&change)?;
        // This device's own changes are in the document before they leave it: one that comes
        // back is a copy; any other that claims to be this device's (by its actor or by the
        // sender the relay names) is forged, and would skip the authorship rules, which this
        // device's own changes do not go through (issue 15, item 7).
        let own = self.doc.get_actor();
        if change.actor_id() == own || &device_actor(&from.device) == own {
            if self.doc.get_change_by_hash(&change.hash()).is_some() {
                return Ok(DocUpdate { known: true, ..DocUpdate::default() });
            }
            return Err(DocError::Forbidden("claims to come from this device"));
        }
        // Every entry of `authors` is keyed by its device's actor (but for fuzzing, see
        // `fuzz_trust_sender`).
        match self.authors.get(change.actor_id()) {
            Some(known) if known == from => {}
            None if change.actor_id() == &device_actor(&from.device) => {
                self.authors.insert(change.actor_id().clone(), from.clone());
            }
            _ => return Err(DocError::Forbidden("is not written by the device that sent it")),
        }
        let hash = change.hash();
        if self.doc.get_change_by_hash(&hash).is_some() || self.pending.iter().any(|c| c.hash() == hash) {
            return Ok(DocUpdate { known: true, ..DocUpdate::default() });
        }
        let mut touched = Touched::default();
        self.integrate(change, &mut touched)?;
        let Some(list) = self.messages_obj() else { return Ok(DocUpdate::default()) };
        let mut update = DocUpdate::default();
        let marks = self.read_marks();
        // Where an object the change named is: a message's index in the list, or its own.
        let import = |obj: &str| guarded(|| self.doc.import(obj)).and_then(Result::ok).map(|(id, _)| id);
        let parent = |obj: &ObjId| guarded(|| self.doc.parents(obj).ok().and_then(|mut p| p.next())).flatten();
        let index_in_list = |obj: &ObjId| match parent(obj) {
            Some(p) if p.obj == list => match p.prop {
                automerge::Prop::Seq(i) => Some(i),
                automerge::Prop::Map(_) => None,
            },
            _ => None,
        };
        let mut added = std::collections::BTreeSet::new();
        for obj in touched.new_messages.iter().filter_map(|o| import(o)) {
            if let Some(i) = index_in_list(&obj) {
                if let Some(m) = self.message_at(&obj, i, &marks) {
                    added.insert(i);
                    update.added.push(m);
                }
            }
        }
        let mut changed: std::collections::BTreeSet<usize> =
            touched.messages.iter().filter_map(|o| import(o)).filter_map(|m| index_in_list(&m)).collect();
        changed.extend(
            touched
                .attachments
                .iter()
                .filter_map(|o| import(o))
                .filter_map(|a| parent(&a))
                .filter_map(|p| index_in_list(&p.obj)),
        );
        let (reacted, readers) = (touched.reacted, touched.readers);
        // A reaction names its message by id: one walk of the list finds them all (a change
        // may touch up to MAX_CHANGE_OPS messages; a walk per message would cost that many).
        if !reacted.is_empty() {
            changed.extend(
                (0..self.doc.length(&list))
                    .filter(|i| self.message_id_at(&list, *i).is_some_and(|id| reacted.contains(&id))),
            );
        }
        for i in changed.into_iter().filter(|i| !added.contains(i)) {
            if let Ok(Some((Value::Object(ObjType::Map), m))) = self.doc.get(&list, i) {
                update.changed.extend(self.message_at(&m, i, &marks));
            }
        }
        for account in readers {
            if let Some(id) = marks.get(&account).and_then(|i| self.message_id_at(&list, *i)) {
                update.read.push((account, id));
            }
        }
        Ok(update)
    }

    /// Fuzzing only: takes `from` as the sender of changes of the actor of `bytes` (if they are a
    /// change), whatever its device's actor: a fuzzer mutating changes finds no device id whose
    /// actor they carry, and would never get past the sender check.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn fuzz_trust_sender(&mut self, bytes: &[u8], from: &Author) {
        if let Some(Ok(change)) = guarded(|| Change::from_bytes(bytes.to_vec())) {
            self.authors.insert(change.actor_id().clone(), from.clone());
        }
    }

    /// The changes that wait for their dependencies (which a snapshot does not hold).
    pub fn pending_changes(&self) -> Vec<Vec<u8>> {
        self.pending.iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// True after Automerge panicked inside this document.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Sets the title; returns the change's bytes. Setting the title it already has gives an
    /// empty change (Automerge makes none for a put of the value already there).
    pub fn set_title(&mut self, title: &str, now_ms: i64) -> Vec<u8> {
        let options = || CommitOptions::default().with_time(commit_time(now_ms));
        let done = self
            .doc
            .transact_with::<_, _, automerge::AutomergeError, _>(|_| options(), |tx| tx.put(ROOT, "title", title))
            .expect("putting a string on the root cannot fail");
        if done.hash.is_none() {
            self.doc.empty_commit(options());
        }
        self.last_change()
    }

    /// Appends a message; returns the change's bytes.
    pub fn add_message(&mut self, msg: &Message) -> Result<Vec<u8>, DocError> {
        let list = self.messages_obj().ok_or(DocError::NoMessageList)?;
        let len = self.doc.length(&list);
        self.doc
            .transact_with::<_, _, automerge::AutomergeError, _>(
                |_| CommitOptions::default().with_time(commit_time(msg.ts)),
                |tx| {
                    let m = tx.insert_object(&list, len, ObjType::Map)?;
                    tx.put(&m, "id", msg.id.as_str())?;
                    tx.put(&m, "author", msg.author.as_str())?;
                    tx.put(&m, "device", msg.device.as_str())?;
                    tx.put(&m, "text", msg.text.as_str())?;
                    tx.put(&m, "ts", msg.ts)?;
                    if let Some(to) = &msg.reply_to {
                        tx.put(&m, "reply_to", to.as_str())?;
                    }
                    if !msg.attachments.is_empty() {
                        let a = tx.put_object(&m, "attachments", ObjType::List)?;
                        for (i, att) in msg.attachments.iter().enumerate() {
                            tx.insert(&a, i, att.as_str())?;
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|e| DocError::Malformed(e.error.to_string()))?;
        Ok(self.last_change())
    }

    /// Edits a message's text; returns the change's bytes. Every device shows the latest edit
    /// (concurrent edits: the one Automerge orders last, the same everywhere) and that it was
    /// edited.
    pub fn edit_message(&mut self, id: &str, text: &str, now_ms: i64) -> Result<Vec<u8>, DocError> {
        let m = self.live_message(id)?;
        self.change(now_ms, |tx| {
            tx.put(&m, "text", text)?;
            tx.put(&m, "edited", now_ms)
        })
    }

    /// Deletes a message for everyone: its text and attachments go, and it shows as deleted.
    pub fn delete_message(&mut self, id: &str, now_ms: i64) -> Result<Vec<u8>, DocError> {
        let m = self.find_message(id)?;
        let attachments = match self.doc.get(&m, "attachments") {
            Ok(Some((Value::Object(ObjType::List), a))) => Some((self.doc.length(&a), a)),
            _ => None,
        };
        self.change(now_ms, |tx| {
            tx.put(&m, "text", "")?;
            tx.put(&m, "deleted", now_ms)?;
            if let Some((n, a)) = &attachments {
                for i in (0..*n).rev() {
                    tx.delete(a, i)?;
                }
            }
            Ok(())
        })
    }

    /// Adds (or with `add` false removes) `account`'s reaction to a message.
    pub fn react(
        &mut self,
        id: &str,
        account: &AccountId,
        reaction: &str,
        add: bool,
        now_ms: i64,
    ) -> Result<Vec<u8>, DocError> {
        if reaction.is_empty() || reaction.len() > MAX_REACTION_BYTES || reaction.chars().any(char::is_whitespace) {
            return Err(DocError::BadReaction);
        }
        self.live_message(id)?;
        let reactions = self.root_map("reactions").ok_or(DocError::NoMessageList)?;
        let key = format!("{id} {account} {reaction}");
        let present = matches!(self.doc.get(&reactions, key.as_str()), Ok(Some(_)));
        self.change(now_ms, |tx| match (add, present) {
            (true, _) => tx.put(&reactions, key.as_str(), true),
            (false, true) => tx.delete(&reactions, key.as_str()),
            (false, false) => Ok(()),
        })
    }

    /// Marks the chat read by `account`'s `device` up to message `id` (never back: a mark
    /// before the device's current one changes nothing).
    pub fn mark_read(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        id: &str,
        now_ms: i64,
    ) -> Result<Vec<u8>, DocError> {
        let list = self.messages_obj().ok_or(DocError::NoMessageList)?;
        let read = self.read_obj().ok_or(DocError::NoMessageList)?;
        let index = self.index_of(&list, id).ok_or_else(|| DocError::UnknownMessage(id.to_string()))?;
        let key = format!("{account} {}", device.0);
        let count = index as i64 + 1;
        let current = self.int_at(&read, &key).unwrap_or(0);
        self.change(now_ms, |tx| match count > current {
            true => tx.put(&read, key.as_str(), count),
            false => Ok(()),
        })
    }

    fn read_obj(&self) -> Option<ObjId> {
        self.root_map("read")
    }

    fn root_map(&self, key: &str) -> Option<ObjId> {
        match self.doc.get(ROOT, key) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
            _ => None,
        }
    }

    fn message_id_at(&self, list: &ObjId, i: usize) -> Option<String> {
        match self.doc.get(list, i) {
            Ok(Some((Value::Object(ObjType::Map), m))) => self.str_at(&m, "id"),
            _ => None,
        }
    }

    fn index_of(&self, list: &ObjId, id: &str) -> Option<usize> {
        (0..self.doc.length(list)).find(|i| self.message_id_at(list, *i).as_deref() == Some(id))
    }

    /// Commits one change made by `f` (an empty one if `f` changed nothing, so that every
    /// local action has a change to send) and returns its bytes.
    fn change(
        &mut self,
        now_ms: i64,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), automerge::AutomergeError>,
    ) -> Result<Vec<u8>, DocError> {
        let options = || CommitOptions::default().with_time(commit_time(now_ms));
        let done = self
            .doc
            .transact_with::<_, _, automerge::AutomergeError, _>(|_| options(), f)
            .map_err(|e| DocError::Malformed(e.error.to_string()))?;
        if done.hash.is_none() {
            self.doc.empty_commit(options());
        }
        Ok(self.last_change())
    }

    /// The message map with this id.
    fn find_message(&self, id: &str) -> Result<ObjId, DocError> {
        let list = self.messages_obj().ok_or(DocError::NoMessageList)?;
        (0..self.doc.length(&list))
            .filter_map(|i| match self.doc.get(&list, i) {
                Ok(Some((Value::Object(ObjType::Map), m))) => Some(m),
                _ => None,
            })
            .find(|m| self.str_at(m, "id").as_deref() == Some(id))
            .ok_or_else(|| DocError::UnknownMessage(id.to_string()))
    }

    /// The message map with this id, if it is not deleted.
    fn live_message(&self, id: &str) -> Result<ObjId, DocError> {
        let m = self.find_message(id)?;
        if matches!(self.doc.get(&m, "deleted"), Ok(Some(_))) {
            return Err(DocError::Deleted(id.to_string()));
        }
        Ok(m)
    }

    fn str_at(&self, obj: &ObjId, key: &str) -> Option<String> {
        match self.doc.get(obj, key) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    fn int_at(&self, obj: &ObjId, key: &str) -> Option<i64> {
        match self.doc.get(obj, key) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Int(t) => Some(*t),
                _ => None,
            },
            _ => None,
        }
    }

    fn last_change(&mut self) -> Vec<u8> {
        self.note_last_local_change();
        self.doc.get_last_local_change().expect("a change was just committed").raw_bytes().to_vec()
    }

    fn messages_obj(&self) -> Option<ObjId> {
        match self.doc.get(ROOT, "messages") {
            Ok(Some((Value::Object(ObjType::List), id))) => Some(id),
            _ => None,
        }
    }

    /// The document saved whole (for the store's snapshot), without DEFLATE: the texts in it
    /// are sealed, so compressing them gains nothing and cost 3% of a busy device's CPU
    /// (compactions every few thousand changes). Loading reads either form.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save_nocompress()
    }
}

/// A new message authored on this device. The first 8 bytes of `id` are replaced with the
/// device's message id prefix.
pub fn new_message(author: AccountId, device: &DeviceId, text: &str, ts: i64, mut id: [u8; 16]) -> Message {
    id[..8].copy_from_slice(&message_id_prefix(device));
    Message {
        id: hex::encode(id),
        author: author.to_string(),
        device: device.0.clone(),
        text: text.to_string(),
        ts,
        reply_to: None,
        edited: None,
        deleted: false,
        reactions: BTreeMap::new(),
        attachments: Vec::new(),
        read_by: Vec::new(),
    }
}

#[cfg(test)]
#[path = "doc_tests.rs"]
mod tests;
