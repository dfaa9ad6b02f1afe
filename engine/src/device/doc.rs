//! One chat as an Automerge document, and the only door through which outside bytes reach
//! Automerge.
//!
//! Layout: the root map holds `title` (a string) and `messages` (a list of maps with `id`,
//! `author`, `device`, `text`, `ts`). List order is the display order; Automerge orders
//! concurrent inserts the same way on every device.
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

use automerge::patches::TextRepresentation;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, Change, ObjId, ObjType, PatchAction, PatchLog, ReadDoc, ScalarValue, TextEncoding, Value, ROOT,
};
use serde::Serialize;

use crate::proto::ids::{AccountId, ChatId, DeviceId};

/// Largest change accepted from outside, in bytes (the relay caps sealed deltas at 64 KiB).
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Most operations in one change accepted from outside. A message is six operations; the
/// byte limit alone does not bound the work, since run-length encoding lets a 1 KiB change
/// carry a million list inserts (seconds of CPU and a gigabyte and more of memory to apply).
pub const MAX_CHANGE_OPS: usize = 1024;
/// Most changes held back until their dependencies arrive. Changes normally arrive in causal
/// order (the relay's log order is one), so only a device that lost changes, or a hostile one,
/// fills this; when it is full, a change that cannot be applied yet is refused
/// ([`DocError::TooManyPending`]).
pub const MAX_PENDING_CHANGES: usize = 1024;

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
    /// [`MAX_PENDING_CHANGES`] changes already wait for their dependencies.
    #[error("too many changes wait for changes that have not arrived")]
    TooManyPending,
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
pub fn device_actor(device: &DeviceId) -> ActorId {
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
    pub fn new(chat: ChatId, device: &DeviceId) -> Self {
        let mut doc = Automerge::new().with_actor(genesis_actor(chat));
        doc.transact_with::<_, _, automerge::AutomergeError, _>(
            |_| CommitOptions::default().with_time(0),
            |tx| {
                tx.put_object(ROOT, "messages", ObjType::List)?;
                Ok(())
            },
        )
        .expect("building the genesis change cannot fail");
        doc.set_actor(device_actor(device));
        let mut d = ChatDoc { doc, poisoned: false, actors: BTreeMap::new(), pending: Vec::new() };
        d.note_last_local_change();
        d
    }

    /// Loads a document saved by this device (snapshot plus changes, in order). The bytes come
    /// from the device's own store but are still guarded: a damaged store gives an error.
    pub fn load(
        chat: ChatId,
        device: &DeviceId,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
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
                ChatDoc { doc, poisoned: false, actors, pending: Vec::new() }
            }
            None => ChatDoc::new(chat, device),
        };
        d.doc.set_actor(device_actor(device));
        let mut log = PatchLog::null();
        for c in changes {
            let change = guarded(|| Change::from_bytes(c.to_vec()))
                .ok_or(DocError::Panicked)?
                .map_err(|e| DocError::Malformed(e.to_string()))?;
            match d.integrate(change, &mut log) {
                // Stored while it waited for its dependencies, refused once they came: it was
                // never part of the document.
                Err(DocError::NotInSequence) => {}
                r => r?,
            }
        }
        Ok(d)
    }

    /// Applies `change` if its dependencies are present, else holds it back; then applies every
    /// held-back change that became ready. An error is about `change`; a held-back change that
    /// fails its checks when its turn comes is dropped.
    fn integrate(&mut self, change: Change, log: &mut PatchLog) -> Result<(), DocError> {
        let hash = change.hash();
        if self.doc.get_change_by_hash(&hash).is_some() || self.pending.iter().any(|c| c.hash() == hash) {
            return Ok(());
        }
        if !self.is_ready(&change) {
            if self.pending.len() >= MAX_PENDING_CHANGES {
                return Err(DocError::TooManyPending);
            }
            self.pending.push(change);
            return Ok(());
        }
        self.apply_ready(change, log)?;
        while let Some(i) = self.pending.iter().position(|c| self.is_ready(c)) {
            let next = self.pending.remove(i);
            if let Err(DocError::Panicked) = self.apply_ready(next, log) {
                return Err(DocError::Panicked);
            }
        }
        Ok(())
    }

    fn is_ready(&self, change: &Change) -> bool {
        change.deps().iter().all(|d| self.doc.get_change_by_hash(d).is_some())
    }

    /// Applies a change whose dependencies are present, if it continues its actor's sequence.
    fn apply_ready(&mut self, change: Change, log: &mut PatchLog) -> Result<(), DocError> {
        let actor = change.actor_id().clone();
        let (seq, max_op) = self.actors.get(&actor).copied().unwrap_or((0, 0));
        if change.seq() != seq + 1 || change.start_op().get() <= max_op {
            return Err(DocError::NotInSequence);
        }
        let next = (change.seq(), change.max_op());
        match guarded(|| self.doc.apply_changes_log_patches([change], log)) {
            None => {
                self.poisoned = true;
                Err(DocError::Panicked)
            }
            Some(Err(e)) => Err(DocError::Malformed(e.to_string())),
            Some(Ok(())) => {
                self.actors.insert(actor, next);
                Ok(())
            }
        }
    }

    fn note_last_local_change(&mut self) {
        if let Some(c) = self.doc.get_last_local_change() {
            self.actors.insert(c.actor_id().clone(), (c.seq(), c.max_op()));
        }
    }

    /// Applies change bytes that came from outside the device. Never panics; on error nothing
    /// changed, except after [`DocError::Panicked`], when [`ChatDoc::is_poisoned`] is true and the
    /// caller must reload the document from its store. Returns the messages the change added.
    pub fn apply_untrusted(&mut self, bytes: &[u8]) -> Result<Vec<Message>, DocError> {
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
        let mut log = PatchLog::active(TextRepresentation::String(TextEncoding::UnicodeCodePoint));
        self.integrate(change, &mut log)?;
        let Some(list) = self.messages_obj() else { return Ok(Vec::new()) };
        let patches = guarded(|| self.doc.make_patches(&mut log)).unwrap_or_default();
        let mut added = Vec::new();
        for p in patches {
            if p.obj != list {
                continue;
            }
            if let PatchAction::Insert { values, .. } = p.action {
                for (_, obj, _) in values.iter() {
                    added.extend(self.message_at(obj));
                }
            }
        }
        Ok(added)
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
                    Ok(())
                },
            )
            .map_err(|e| DocError::Malformed(e.error.to_string()))?;
        Ok(self.last_change())
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

    /// The title, if one was set.
    pub fn title(&self) -> Option<String> {
        match self.doc.get(ROOT, "title") {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Number of messages.
    pub fn message_count(&self) -> usize {
        self.messages_obj().map(|l| self.doc.length(&l)).unwrap_or(0)
    }

    /// Every message, in display order. Entries that do not have the message shape (written by
    /// a buggy or hostile device) are skipped.
    pub fn messages(&self) -> Vec<Message> {
        let Some(list) = self.messages_obj() else { return Vec::new() };
        let n = self.doc.length(&list);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            if let Ok(Some((Value::Object(ObjType::Map), m))) = self.doc.get(&list, i) {
                out.extend(self.message_at(&m));
            }
        }
        out
    }

    fn message_at(&self, m: &ObjId) -> Option<Message> {
        let s = |k: &str| match self.doc.get(m, k) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        };
        let ts = match self.doc.get(m, "ts") {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Int(t) => Some(*t),
                _ => None,
            },
            _ => None,
        };
        Some(Message { id: s("id")?, author: s("author")?, device: s("device")?, text: s("text")?, ts: ts? })
    }

    /// The document saved whole (for the store's snapshot).
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The document's heads, hex, sorted: equal heads mean equal documents.
    pub fn heads(&self) -> Vec<String> {
        let mut h: Vec<String> = self.doc.get_heads().iter().map(|h| h.to_string()).collect();
        h.sort();
        h
    }
}

/// A new message authored on this device.
pub fn new_message(author: AccountId, device: &DeviceId, text: &str, ts: i64, id: [u8; 16]) -> Message {
    Message { id: hex::encode(id), author: author.to_string(), device: device.0.clone(), text: text.to_string(), ts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: &str) -> DeviceId {
        DeviceId(n.into())
    }

    #[test]
    fn two_devices_converge_on_one_message_list() {
        let chat = ChatId([9; 16]);
        let mut a = ChatDoc::new(chat, &dev("a"));
        let mut b = ChatDoc::new(chat, &dev("b"));
        let acct = AccountId([1; 16]);
        let ca = a.add_message(&new_message(acct, &dev("a"), "from a", 1, [1; 16])).unwrap();
        let cb = b.add_message(&new_message(acct, &dev("b"), "from b", 2, [2; 16])).unwrap();
        assert_eq!(a.apply_untrusted(&cb).unwrap()[0].text, "from b");
        assert_eq!(b.apply_untrusted(&ca).unwrap().len(), 1);
        assert!(b.apply_untrusted(&ca).unwrap().is_empty()); // duplicates are harmless
        assert_eq!(a.messages(), b.messages());
        assert_eq!(a.messages().len(), 2);
        assert_eq!(a.heads(), b.heads());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut a = ChatDoc::new(ChatId([1; 16]), &dev("a"));
        assert!(a.apply_untrusted(b"not a change").is_err());
        assert!(a.apply_untrusted(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 2]).is_err());
        assert!(matches!(a.apply_untrusted(&vec![0; MAX_CHANGE_BYTES + 1]), Err(DocError::TooLarge(_))));
        assert!(!a.is_poisoned());
    }

    #[test]
    fn a_change_with_too_many_ops_is_refused_before_it_is_applied() {
        let chat = ChatId([4; 16]);
        let mut evil = ChatDoc::new(chat, &dev("evil"));
        let list = evil.messages_obj().unwrap();
        evil.doc
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                for i in 0..(MAX_CHANGE_OPS + 1) {
                    tx.insert(&list, i, 1_i64)?;
                }
                Ok(())
            })
            .unwrap();
        let bomb = evil.last_change();
        assert!(bomb.len() < 4096, "run-length encoding keeps it small: {} bytes", bomb.len());
        let mut victim = ChatDoc::new(chat, &dev("v"));
        assert_eq!(victim.apply_untrusted(&bomb), Err(DocError::TooManyOps(MAX_CHANGE_OPS + 1)));
        assert_eq!(victim.message_count(), 0);
    }

    /// Found by the property test `doc_props::save_and_load_keep_the_document`: a device whose
    /// messages carry times far apart (the commit time was the message's time) saved a document
    /// that failed to load ("mismatching heads"): Automerge delta-encodes commit times with
    /// saturating arithmetic.
    #[test]
    fn messages_with_any_times_save_and_load() {
        let chat = ChatId([5; 16]);
        let mut a = ChatDoc::new(chat, &dev("a"));
        for (i, ts) in [3399525330959665061, -5823846705895110748, i64::MIN, i64::MAX].into_iter().enumerate() {
            a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "", ts, [i as u8; 16])).unwrap();
        }
        a.set_title("t", i64::MIN);
        let b = ChatDoc::load(chat, &dev("a"), Some(&a.save()), &[]).unwrap();
        assert_eq!(b.heads(), a.heads());
        assert_eq!(b.messages(), a.messages());
        assert_eq!(b.messages()[2].ts, i64::MIN, "the message keeps its time; only the commit time is clamped");
    }

    /// The same hole from outside: a change from another device (buggy, or hostile and holding
    /// the chat key) with a commit time far below the others, or a seq that skips (found by the
    /// fuzz target `apply_untrusted`: a change of an empty actor at seq 2,302,102,470,655 with
    /// no dependencies), applies in Automerge but makes every later snapshot unloadable, i.e.
    /// the chat unreadable on the device once the store compacts it. Such changes are refused.
    #[test]
    fn changes_a_snapshot_could_not_hold_are_refused() {
        let chat = ChatId([6; 16]);
        let mut evil = ChatDoc::new(chat, &dev("evil"));
        let honest = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), "x", 5, [1; 16])).unwrap();
        let tampered = |edit: &dyn Fn(&mut automerge::ExpandedChange)| {
            let mut e = Change::from_bytes(honest.clone()).unwrap().decode();
            edit(&mut e);
            Change::from(e).raw_bytes().to_vec()
        };
        // Automerge's own parser refuses operation counters above `u32::MAX`.
        let refused_by_automerge = tampered(&|e| e.start_op = std::num::NonZeroU64::new(1 << 63).unwrap());
        assert!(Change::from_bytes(refused_by_automerge.clone()).is_err());
        let mut victim = ChatDoc::new(chat, &dev("v"));
        assert!(matches!(victim.apply_untrusted(&refused_by_automerge), Err(DocError::Malformed(_))));

        let fuzz_crasher = hex::decode("856f4a830aff750801150000ffffffffff42f1f10500000000000000004040").unwrap();
        let cases = [
            ("commit time", tampered(&|e| e.time = i64::MIN), DocError::OutOfRange("commit time")),
            ("seq gap", tampered(&|e| e.seq = 3), DocError::NotInSequence),
            ("seq past i64::MAX", tampered(&|e| e.seq = 1 << 63), DocError::NotInSequence),
            ("fuzz crasher", fuzz_crasher, DocError::NotInSequence),
            // Also found by `apply_untrusted`: an empty change whose bytes encode its content in
            // a form Automerge does not write; loading re-encodes it and finds other heads.
            (
                "non-canonical bytes",
                hex::decode("856f4a830e087748011a00000135060000010000078070f55c3a5fff0093ff4a83f95b84").unwrap(),
                DocError::NonCanonical,
            ),
        ];
        for (what, bytes, error) in cases {
            // What Automerge alone makes of it: the change applies, the saved document does not load.
            let mut raw = ChatDoc::new(chat, &dev("v")).doc;
            raw.set_actor(device_actor(&dev("v")));
            raw.transact_with::<_, _, automerge::AutomergeError, _>(
                |_| CommitOptions::default().with_time(1_700_000_000_000),
                |tx| tx.put(ROOT, "title", "mine"),
            )
            .unwrap();
            raw.apply_changes([Change::from_bytes(bytes.clone()).unwrap()]).unwrap();
            assert!(Automerge::load(&raw.save()).is_err(), "{what}: automerge now saves it; the check may go");

            let mut victim = ChatDoc::new(chat, &dev("v"));
            victim.set_title("mine", 1_700_000_000_000);
            assert_eq!(victim.apply_untrusted(&bytes), Err(error), "{what}");
            let reloaded = ChatDoc::load(chat, &dev("v"), Some(&victim.save()), &[]).unwrap();
            assert_eq!(reloaded.heads(), victim.heads());
        }
    }

    /// A change that skips seqs cannot slip in by waiting for its dependencies: it is checked
    /// when they arrive, and dropped.
    #[test]
    fn a_held_back_change_is_checked_when_its_dependencies_arrive() {
        let chat = ChatId([7; 16]);
        let mut evil = ChatDoc::new(chat, &dev("evil"));
        let first = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), "1", 5, [1; 16])).unwrap();
        let second = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), "2", 6, [2; 16])).unwrap();
        let mut skipping = Change::from_bytes(second).unwrap().decode();
        skipping.seq = 9;
        let skipping = Change::from(skipping).raw_bytes().to_vec();

        let mut victim = ChatDoc::new(chat, &dev("v"));
        assert_eq!(victim.apply_untrusted(&skipping), Ok(vec![]), "held back: its dependency is missing");
        assert_eq!(victim.apply_untrusted(&first).unwrap().len(), 1, "the dependency applies; the other is dropped");
        assert_eq!(victim.message_count(), 1);
        let reloaded = ChatDoc::load(chat, &dev("v"), Some(&victim.save()), &[]).unwrap();
        assert_eq!(reloaded.heads(), victim.heads());
        // The store keeps both as changes, in arrival order: loading them gives the same.
        let replayed = ChatDoc::load(chat, &dev("v"), None, &[skipping, first]).unwrap();
        assert_eq!(replayed.heads(), victim.heads());
    }

    #[test]
    fn changes_waiting_for_dependencies_are_bounded() {
        let chat = ChatId([8; 16]);
        let mut evil = ChatDoc::new(chat, &dev("evil"));
        let change = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), "x", 5, [1; 16])).unwrap();
        let waiting = |i: u32| {
            let mut e = Change::from_bytes(change.clone()).unwrap().decode();
            let mut missing = [0u8; 32];
            missing[..4].copy_from_slice(&i.to_be_bytes());
            e.deps = vec![automerge::ChangeHash(missing)];
            Change::from(e).raw_bytes().to_vec()
        };
        let mut victim = ChatDoc::new(chat, &dev("v"));
        for i in 0..MAX_PENDING_CHANGES as u32 {
            assert_eq!(victim.apply_untrusted(&waiting(i)), Ok(vec![]));
        }
        assert_eq!(victim.apply_untrusted(&waiting(u32::MAX)), Err(DocError::TooManyPending));
        assert_eq!(victim.apply_untrusted(&waiting(0)), Ok(vec![]), "a repeat is no new change");
    }

    /// Found by the property test `doc_props::save_and_load_keep_the_document`: a device that
    /// had made no change yet set the title the chat already had; Automerge made no change and
    /// `set_title` panicked looking for it (a device with earlier changes got its previous
    /// change back, to be sent again under a new client seq).
    #[test]
    fn setting_the_title_it_already_has_gives_a_new_change() {
        let chat = ChatId([2; 16]);
        let mut a = ChatDoc::new(chat, &dev("a"));
        let mut c = ChatDoc::new(chat, &dev("c"));
        let first = a.set_title("", 1);
        c.apply_untrusted(&first).unwrap();
        let again = c.set_title("", 2);
        assert_ne!(again, first);
        assert_eq!(a.apply_untrusted(&again), Ok(vec![]));
        assert_eq!(a.heads(), c.heads());
        let third = a.set_title("", 3);
        assert!(third != first && third != again, "a device with earlier changes gets a new one too");
        assert_eq!(ChatDoc::load(chat, &dev("a"), Some(&a.save()), &[]).unwrap().heads(), a.heads());
    }

    #[test]
    fn reload_from_snapshot_and_changes() {
        let chat = ChatId([3; 16]);
        let mut a = ChatDoc::new(chat, &dev("a"));
        let c1 = a.set_title("t", 5);
        let snap = ChatDoc::new(chat, &dev("a")).save();
        let c2 = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "x", 6, [7; 16])).unwrap();
        let b = ChatDoc::load(chat, &dev("a"), Some(&snap), &[c1, c2]).unwrap();
        assert_eq!(b.messages(), a.messages());
        assert_eq!(b.title().as_deref(), Some("t"));
    }
}
