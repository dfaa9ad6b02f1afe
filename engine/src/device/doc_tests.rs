//! The chat document driven directly.

use super::*;

fn dev(n: &str) -> DeviceId {
    DeviceId(n.into())
}

/// The sender of a change made by one of these tests' devices: devices whose name starts with
/// `b` are account 2's, the others account 1's.
fn who(change: &[u8]) -> Author {
    let names = ["a", "b", "b2", "c", "v", "evil", "alice", "bob-phone", "bob-laptop"];
    let actor = Change::from_bytes(change.to_vec()).ok().map(|c| c.actor_id().clone());
    let name = names.into_iter().find(|n| Some(device_actor(&dev(n))) == actor).unwrap_or("unknown");
    let account = AccountId([if name.starts_with('b') { 2 } else { 1 }; 16]);
    Author { account, device: dev(name) }
}

/// The tests' way to apply a change from outside: its sender is found by [`who`].
trait Take {
    fn take(&mut self, change: &[u8]) -> Result<Vec<Message>, DocError>;
    fn take_update(&mut self, change: &[u8]) -> Result<DocUpdate, DocError>;
}

impl Take for ChatDoc {
    fn take(&mut self, change: &[u8]) -> Result<Vec<Message>, DocError> {
        self.apply_untrusted(change, &who(change))
    }
    fn take_update(&mut self, change: &[u8]) -> Result<DocUpdate, DocError> {
        self.apply_untrusted_update(change, &who(change))
    }
}

#[test]
fn two_devices_converge_on_one_message_list() {
    let chat = ChatId([9; 16]);
    let mut a = ChatDoc::new(chat, &dev("a"));
    let mut b = ChatDoc::new(chat, &dev("b"));
    let ca = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "from a", 1, [1; 16])).unwrap();
    let cb = b.add_message(&new_message(AccountId([2; 16]), &dev("b"), "from b", 2, [2; 16])).unwrap();
    assert_eq!(a.take(&cb).unwrap()[0].text, "from b");
    assert_eq!(b.take(&ca).unwrap().len(), 1);
    assert!(b.take(&ca).unwrap().is_empty()); // duplicates are harmless
    assert_eq!(a.messages(), b.messages());
    assert_eq!(a.messages().len(), 2);
    assert_eq!(a.heads(), b.heads());
}

/// A change the document has (applied, held back, or its own) is reported as known, so that
/// the device passes it over instead of storing it again (a crash can keep a run's changes
/// without their cursor; they then come again).
#[test]
fn a_change_the_document_has_is_reported_as_known() {
    let chat = ChatId([9; 16]);
    let mut a = ChatDoc::new(chat, &dev("a"));
    let mut b = ChatDoc::new(chat, &dev("b"));
    let ca = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "from a", 1, [1; 16])).unwrap();
    let first = b.take_update(&ca).unwrap();
    assert!(!first.known && first.added.len() == 1);
    let again = b.take_update(&ca).unwrap();
    assert!(again.known && again.added.is_empty(), "applied before");
    let held = waiting_for(&ca, 1);
    assert!(!b.take_update(&held).unwrap().known, "held back, new");
    assert!(b.take_update(&held).unwrap().known, "held back before");
    let own = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "mine", 2, [2; 16])).unwrap();
    assert!(a.take_update(&own).unwrap().known, "this device's own");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut a = ChatDoc::new(ChatId([1; 16]), &dev("a"));
    assert!(a.take(b"not a change").is_err());
    assert!(a.take(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 2]).is_err());
    assert!(matches!(a.take(&vec![0; MAX_CHANGE_BYTES + 1]), Err(DocError::TooLarge(_))));
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
    assert_eq!(victim.take(&bomb), Err(DocError::TooManyOps(MAX_CHANGE_OPS + 1)));
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
    let b = ChatDoc::load(chat, &dev("a"), Some(&a.save()), &[], &[]).unwrap();
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
    assert!(matches!(victim.take(&refused_by_automerge), Err(DocError::Malformed(_))));

    let fuzz_crasher = hex::decode("856f4a830aff750801150000ffffffffff42f1f10500000000000000004040").unwrap();
    let cases = [
        ("commit time", tampered(&|e| e.time = i64::MIN), DocError::OutOfRange("commit time")),
        ("seq gap", tampered(&|e| e.seq = 3), DocError::NotInSequence),
        ("seq past i64::MAX", tampered(&|e| e.seq = 1 << 63), DocError::NotInSequence),
        // Its actor is no device's (it would fail the sequence check too).
        ("fuzz crasher", fuzz_crasher, DocError::Forbidden("is not written by the device that sent it")),
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
        assert_eq!(victim.take(&bytes), Err(error), "{what}");
        let reloaded = ChatDoc::load(chat, &dev("v"), Some(&victim.save()), &[], &[]).unwrap();
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
    assert_eq!(victim.take(&skipping), Ok(vec![]), "held back: its dependency is missing");
    assert_eq!(victim.take(&first).unwrap().len(), 1, "the dependency applies; the other is dropped");
    assert_eq!(victim.message_count(), 1);
    let reloaded = ChatDoc::load(chat, &dev("v"), Some(&victim.save()), &[], &[]).unwrap();
    assert_eq!(reloaded.heads(), victim.heads());
    // The store keeps both as changes, in arrival order: loading them gives the same.
    let evil_author = who(&first);
    let replayed = ChatDoc::load(chat, &dev("v"), None, &[skipping, first], &[evil_author]).unwrap();
    assert_eq!(replayed.heads(), victim.heads());
}

/// `change` made to depend on a change nobody has (number `i`): it waits for it.
fn waiting_for(change: &[u8], i: u32) -> Vec<u8> {
    let mut e = Change::from_bytes(change.to_vec()).unwrap().decode();
    let mut missing = [0u8; 32];
    missing[..4].copy_from_slice(&i.to_be_bytes());
    e.deps = vec![automerge::ChangeHash(missing)];
    Change::from(e).raw_bytes().to_vec()
}

#[test]
fn changes_waiting_for_dependencies_are_bounded() {
    let chat = ChatId([8; 16]);
    let mut evil = ChatDoc::new(chat, &dev("evil"));
    let change = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), "x", 5, [1; 16])).unwrap();
    let waiting = |i: u32| waiting_for(&change, i);
    let mut victim = ChatDoc::new(chat, &dev("v"));
    for i in 0..MAX_PENDING_CHANGES as u32 {
        assert_eq!(victim.take(&waiting(i)), Ok(vec![]));
    }
    assert_eq!(victim.take(&waiting(u32::MAX)), Err(DocError::TooManyPending));
    assert_eq!(victim.take(&waiting(0)), Ok(vec![]), "a repeat is no new change");
}

/// Issue 15, item 3: what waits for its dependencies is bounded in bytes too, so that a member
/// who puts a device in many chats cannot make it hold 1,024 changes of 64 KiB in each.
#[test]
fn changes_waiting_for_dependencies_are_bounded_in_bytes() {
    let chat = ChatId([8; 16]);
    let mut evil = ChatDoc::new(chat, &dev("evil"));
    let text = "x".repeat(20_000);
    let change = evil.add_message(&new_message(AccountId([1; 16]), &dev("evil"), &text, 5, [1; 16])).unwrap();
    let waiting = |i: u32| waiting_for(&change, i);
    let size = waiting(0).len();
    assert!(size > 10_000, "{size}");
    let fit = (MAX_PENDING_BYTES / size) as u32;
    let mut victim = ChatDoc::new(chat, &dev("v"));
    for i in 0..fit {
        assert_eq!(victim.take(&waiting(i)), Ok(vec![]), "change {i} of {fit}");
    }
    assert_eq!(victim.take(&waiting(fit)), Err(DocError::TooManyPending));
    let held: usize = victim.pending_changes().iter().map(Vec::len).sum();
    assert!(held <= MAX_PENDING_BYTES && victim.pending_changes().len() < MAX_PENDING_CHANGES, "{held}");
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
    c.take(&first).unwrap();
    let again = c.set_title("", 2);
    assert_ne!(again, first);
    assert_eq!(a.take(&again), Ok(vec![]));
    assert_eq!(a.heads(), c.heads());
    let third = a.set_title("", 3);
    assert!(third != first && third != again, "a device with earlier changes gets a new one too");
    assert_eq!(ChatDoc::load(chat, &dev("a"), Some(&a.save()), &[], &[]).unwrap().heads(), a.heads());
}

#[test]
fn reload_from_snapshot_and_changes() {
    let chat = ChatId([3; 16]);
    let mut a = ChatDoc::new(chat, &dev("a"));
    let c1 = a.set_title("t", 5);
    let snap = ChatDoc::new(chat, &dev("a")).save();
    let c2 = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "x", 6, [7; 16])).unwrap();
    let b = ChatDoc::load(chat, &dev("a"), Some(&snap), &[c1, c2], &[]).unwrap();
    assert_eq!(b.messages(), a.messages());
    assert_eq!(b.title().as_deref(), Some("t"));
}

#[test]
fn replies_edits_deletes_and_reactions_converge_and_are_reported() {
    let chat = ChatId([4; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let (mut a, mut b) = (ChatDoc::new(chat, &da), ChatDoc::new(chat, &db));
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let first = new_message(alice, &da, "hello", 1, [1; 16]);
    let c1 = a.add_message(&first).unwrap();
    assert_eq!(b.take_update(&c1).unwrap().added.len(), 1);
    let mut reply = new_message(bob, &db, "hi back", 2, [2; 16]);
    reply.reply_to = Some(first.id.clone());
    let c2 = b.add_message(&reply).unwrap();
    a.take(&c2).unwrap();
    assert_eq!(a.messages()[1].reply_to.as_deref(), Some(first.id.as_str()));

    // An edit and two reactions reach the other side as changes of the message.
    let c3 = a.edit_message(&first.id, "hello, world", 3).unwrap();
    let update = b.take_update(&c3).unwrap();
    assert!(update.added.is_empty());
    assert_eq!(update.changed.len(), 1);
    assert_eq!((update.changed[0].text.as_str(), update.changed[0].edited), ("hello, world", Some(3)));
    let c4 = b.react(&first.id, &bob, "👍", true, 4).unwrap();
    let c5 = a.react(&first.id, &alice, "👍", true, 4).unwrap();
    a.take(&c4).unwrap();
    b.take(&c5).unwrap();
    let thumbs = vec![alice.to_string(), bob.to_string()];
    assert_eq!(a.messages()[0].reactions.get("👍"), Some(&thumbs));
    let c6 = b.react(&first.id, &bob, "👍", false, 5).unwrap();
    assert_eq!(a.take_update(&c6).unwrap().changed[0].reactions["👍"], vec![alice.to_string()]);
    assert_eq!(b.react(&first.id, &bob, "two words", true, 5), Err(DocError::BadReaction));

    // A delete and an edit made at the same time on two devices of the author's account: the
    // message is deleted everywhere, its text gone whichever write Automerge orders last.
    let mut a2 = ChatDoc::load(chat, &dev("c"), Some(&a.save()), &[], &[]).unwrap();
    let edit = a.edit_message(&first.id, "edited meanwhile", 6).unwrap();
    let delete = a2.delete_message(&first.id, 6).unwrap();
    a.take(&delete).unwrap();
    a2.take(&edit).unwrap();
    b.take(&edit).unwrap();
    b.take(&delete).unwrap();
    for doc in [&a, &a2, &b] {
        let m = &doc.messages()[0];
        assert!(m.deleted && m.text.is_empty() && m.reactions.is_empty(), "{m:?}");
    }
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a2.heads(), b.heads());
    assert_eq!(a.messages(), b.messages());
    assert!(matches!(a.edit_message(&first.id, "again", 7), Err(DocError::Deleted(_))));
    assert!(matches!(a.edit_message("nope", "x", 7), Err(DocError::UnknownMessage(_))));
    // And it stays so through a snapshot.
    let loaded = ChatDoc::load(chat, &da, Some(&a.save()), &[], &[]).unwrap();
    assert_eq!(loaded.messages(), a.messages());
}

#[test]
fn read_marks_clear_unread_on_the_accounts_other_devices_and_show_as_receipts() {
    let chat = ChatId([5; 16]);
    let (da, b1, b2) = (dev("alice"), dev("bob-phone"), dev("bob-laptop"));
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let mut a = ChatDoc::new(chat, &da);
    let (mut p, mut l) = (ChatDoc::new(chat, &b1), ChatDoc::new(chat, &b2));
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let m = new_message(alice, &da, "hi", i64::from(i), [i + 1; 16]);
        ids.push(m.id.clone());
        let c = a.add_message(&m).unwrap();
        p.take(&c).unwrap();
        l.take(&c).unwrap();
    }
    assert_eq!((p.unread(&bob), l.unread(&bob), a.unread(&alice)), (3, 3, 0));

    // The phone reads two; the laptop's count drops too, and alice sees the receipts.
    let read = p.mark_read(&bob, &b1, &ids[1], 10).unwrap();
    assert_eq!(l.take_update(&read).unwrap().read, vec![(bob.to_string(), ids[1].clone())]);
    a.take(&read).unwrap();
    assert_eq!((p.unread(&bob), l.unread(&bob)), (1, 1));
    let receipts: Vec<usize> = a.messages().iter().map(|m| m.read_by.len()).collect();
    assert_eq!(receipts, [1, 1, 0]);
    assert_eq!(a.read_up_to(&bob), Some(ids[1].clone()));

    // A device that marks an earlier message does not move the account back.
    let back = l.mark_read(&bob, &b2, &ids[0], 11).unwrap();
    p.take(&back).unwrap();
    assert_eq!((p.unread(&bob), l.unread(&bob)), (1, 1));
    let all = l.mark_read(&bob, &b2, &ids[2], 12).unwrap();
    p.take(&all).unwrap();
    assert_eq!(p.unread(&bob), 0);
}

/// Bob holds the chat's key like every member, and crafts changes his device's API would not
/// make. Each is refused whole, the document unchanged; his device's honest changes that
/// build on a refused one never apply (they wait for it, among the bounded pending changes).
#[test]
fn a_member_cannot_write_as_another() {
    let chat = ChatId([6; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let mut a = ChatDoc::new(chat, &da);
    let hello = new_message(alice, &da, "hello", 1, [1; 16]);
    let c1 = a.add_message(&hello).unwrap();
    type Craft<'a> = Box<dyn Fn(&mut ChatDoc) -> Vec<u8> + 'a>;
    let crafted: Vec<(&str, Craft)> = vec![
        ("edit alice's message", Box::new(|b: &mut ChatDoc| b.doc_edit_first("text", "bob was here"))),
        ("delete alice's message", Box::new(|b: &mut ChatDoc| b.doc_edit_first("deleted", 5_i64))),
        ("react as alice", Box::new(|b: &mut ChatDoc| b.react(&hello.id, &alice, "👎", true, 5).unwrap())),
        ("mark read as alice", Box::new(|b: &mut ChatDoc| b.mark_read(&alice, &da, &hello.id, 5).unwrap())),
        (
            "mark read as another bob device",
            Box::new(|b: &mut ChatDoc| b.mark_read(&bob, &dev("b2"), &hello.id, 5).unwrap()),
        ),
        (
            "write as alice",
            Box::new(|b: &mut ChatDoc| b.add_message(&new_message(alice, &dev("b"), "hi", 5, [2; 16])).unwrap()),
        ),
        (
            "write as alice's device",
            Box::new(|b: &mut ChatDoc| b.add_message(&new_message(bob, &da, "hi", 5, [2; 16])).unwrap()),
        ),
        (
            "reuse alice's message id",
            Box::new(|b: &mut ChatDoc| {
                let m = Message { id: hello.id.clone(), ..new_message(bob, &dev("b"), "hi", 5, [2; 16]) };
                b.add_message(&m).unwrap()
            }),
        ),
        (
            "remove a message from the list",
            Box::new(|b: &mut ChatDoc| {
                let list = b.messages_obj().unwrap();
                b.change(5, |tx| tx.delete(&list, 0)).unwrap()
            }),
        ),
        (
            "set another root key",
            Box::new(|b: &mut ChatDoc| b.change(5, |tx| tx.put(ROOT, "admin", "bob").map(|_| ())).unwrap()),
        ),
        (
            "overwrite a read mark with text",
            Box::new(|b: &mut ChatDoc| {
                let read = b.read_obj().unwrap();
                let key = format!("{bob} b");
                b.change(5, move |tx| tx.put(&read, key.as_str(), "x")).unwrap()
            }),
        ),
    ];
    for (what, craft) in &crafted {
        let mut b = ChatDoc::new(chat, &db);
        b.take(&c1).unwrap();
        let evil = craft(&mut b);
        let honest = b.set_title("bob's", 6);
        let (heads, messages) = (a.heads(), a.messages());
        assert!(matches!(a.take(&evil), Err(DocError::Forbidden(_))), "{what}");
        assert_eq!(a.take(&honest), Ok(vec![]), "{what}: what builds on it waits, for ever");
        assert_eq!((a.heads(), a.messages()), (heads.clone(), messages.clone()), "{what}");
    }
    // Bob's own writes are his to make, from any of his devices.
    let mut b = ChatDoc::new(chat, &db);
    b.take(&c1).unwrap();
    let with_file = Message { attachments: vec!["file".into()], ..new_message(bob, &db, "see", 7, [5; 16]) };
    let mut changes = vec![
        b.react(&hello.id, &bob, "👍", true, 6).unwrap(),
        b.mark_read(&bob, &db, &hello.id, 6).unwrap(),
        b.set_title("bob's title", 6),
        b.add_message(&new_message(bob, &db, "mine", 7, [3; 16])).unwrap(),
        b.add_message(&with_file).unwrap(),
    ];
    let mut b2 = ChatDoc::load(chat, &dev("b2"), Some(&b.save()), &[], &[]).unwrap();
    changes.push(b2.edit_message(&with_file.id, "see this", 8).unwrap());
    changes.push(b2.delete_message(&with_file.id, 9).unwrap());
    changes.push(b2.react(&hello.id, &bob, "👍", false, 9).unwrap());
    for change in &changes {
        a.apply_untrusted(change, &who(change)).unwrap();
    }
    b.take(&changes[5]).unwrap();
    b.take(&changes[6]).unwrap();
    b.take(&changes[7]).unwrap();
    assert_eq!(a.heads(), b.heads());
    assert!(a.messages()[2].deleted && a.messages()[2].attachments.is_empty());
    // A change whose sender the relay names wrongly (another device of the same account).
    let mut b = ChatDoc::new(chat, &db);
    b.take(&c1).unwrap();
    let mine = b.add_message(&new_message(bob, &db, "x", 7, [4; 16])).unwrap();
    let elsewhere = Author { account: bob, device: dev("b2") };
    assert_eq!(
        a.apply_untrusted(&mine, &elsewhere),
        Err(DocError::Forbidden("is not written by the device that sent it"))
    );
}

/// The rules also hold for a change that waited for its dependencies, and for changes loaded
/// from the store.
#[test]
fn a_held_back_change_is_checked_for_authorship_when_it_applies() {
    let chat = ChatId([7; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let mut a = ChatDoc::new(chat, &da);
    let mut b = ChatDoc::new(chat, &db);
    let c1 = a.add_message(&new_message(AccountId([1; 16]), &da, "hello", 1, [1; 16])).unwrap();
    b.take(&c1).unwrap();
    let evil = b.doc_edit_first("text", "bob was here");
    let mut v = ChatDoc::new(chat, &dev("v"));
    assert_eq!(v.take(&evil), Ok(vec![]), "held back");
    assert_eq!(v.pending_changes().len(), 1);
    assert_eq!(v.take(&c1).unwrap().len(), 1, "alice's message applies; bob's edit is dropped");
    assert_eq!(v.messages()[0].text, "hello");
    let authors = [who(&c1), who(&evil)];
    let loaded = ChatDoc::load(chat, &dev("v"), None, &[evil.clone(), c1.clone()], &authors).unwrap();
    assert_eq!(loaded.heads(), v.heads());
    let unknown = ChatDoc::load(chat, &dev("v"), None, &[c1, evil], &authors[..1]).unwrap();
    assert_eq!(unknown.heads(), v.heads(), "a change from a device the store has no author for is dropped");
}

impl ChatDoc {
    /// Puts `value` at `key` of the first message, whoever wrote it.
    fn doc_edit_first(&mut self, key: &str, value: impl Into<ScalarValue>) -> Vec<u8> {
        let list = self.messages_obj().unwrap();
        let Ok(Some((_, m))) = self.doc.get(&list, 0) else { panic!("no message") };
        let value = value.into();
        self.change(5, |tx| tx.put(&m, key, value)).unwrap()
    }
}

/// Two devices sync one document over Automerge's sync protocol (as a secret chat does): both
/// end equal; a hostile change inside a sync message is refused like any other.
#[test]
fn two_devices_sync_directly_and_the_checks_still_hold() {
    let chat = ChatId([9; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let (mut a, mut b) = (ChatDoc::new(chat, &da), ChatDoc::new(chat, &db));
    let hello = new_message(alice, &da, "hello", 1, [1; 16]);
    a.add_message(&hello).unwrap();
    b.add_message(&new_message(bob, &db, "hi", 2, [2; 16])).unwrap();
    let (from_a, from_b) = (Author { account: alice, device: da.clone() }, Author { account: bob, device: db.clone() });
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    sync_until_quiet((&mut a, &mut sa, &from_a), (&mut b, &mut sb, &from_b));
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.messages().len(), 2);

    // Bob edits alice's message; his sync message carries the change and is refused.
    let evil = b.doc_edit_first("text", "bob was here");
    let mut message = automerge::sync::Message::decode(&b.sync_message(&mut sb).unwrap()).unwrap();
    assert_eq!(message.changes.iter().next(), Some(&evil[..]));
    message.changes = vec![evil].into();
    assert!(matches!(a.receive_sync(&mut sa, &message.encode(), &from_b), Err(DocError::Forbidden(_))));
    assert_eq!(a.messages()[0].text, "hello");
    assert!(matches!(a.receive_sync(&mut sa, b"garbage", &from_b), Err(DocError::Malformed(_))));
}

/// Exchanges sync messages between two documents until both are quiet.
fn sync_until_quiet(
    (a, sa, from_a): (&mut ChatDoc, &mut SyncState, &Author),
    (b, sb, from_b): (&mut ChatDoc, &mut SyncState, &Author),
) {
    for _ in 0..10 {
        let (ma, mb) = (a.sync_message(sa), b.sync_message(sb));
        if ma.is_none() && mb.is_none() {
            return;
        }
        if let Some(m) = ma {
            b.receive_sync(sb, &m, from_a).unwrap();
        }
        if let Some(m) = mb {
            a.receive_sync(sa, &m, from_b).unwrap();
        }
    }
    panic!("sync does not end");
}

/// Found by the secret-link simulator (one seed in a thousand): the peer's bloom filter of
/// this side's changes gives a false positive for a change `x`, so `x` is not sent but a later
/// change `y` that depends on it is. `y` waits here (held by the document, out of Automerge's
/// sight), so Automerge never asked for `x`, and both sides went quiet with different heads for
/// good. The document now asks for the dependencies of what it holds.
#[test]
fn a_change_whose_dependency_the_peer_did_not_send_is_asked_for() {
    let chat = ChatId([9; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let (mut a, mut b) = (ChatDoc::new(chat, &da), ChatDoc::new(chat, &db));
    let (from_a, from_b) = (Author { account: alice, device: da.clone() }, Author { account: bob, device: db.clone() });
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    b.add_message(&new_message(bob, &db, "hi", 1, [1; 16])).unwrap();
    sync_until_quiet((&mut a, &mut sa, &from_a), (&mut b, &mut sb, &from_b));

    let x = a.add_message(&new_message(alice, &da, "x", 2, [2; 16])).unwrap();
    let y = a.add_message(&new_message(alice, &da, "y", 3, [3; 16])).unwrap();
    let mut message = automerge::sync::Message::decode(&a.sync_message(&mut sa).unwrap()).unwrap();
    assert_eq!(message.changes.iter().count(), 2);
    // As if b's bloom filter had claimed `x`: only `y` goes, and `x` was never sent.
    message.changes = vec![y].into();
    sa.sent_hashes.remove(&Change::from_bytes(x).unwrap().hash());
    b.receive_sync(&mut sb, &message.encode(), &from_a).unwrap();
    assert_eq!(b.messages().len(), 1, "y waits for x");

    // And b's filters go on claiming `x` (an empty "have": a sends only what b names).
    for _ in 0..10 {
        let ma = a.sync_message(&mut sa);
        let mb = b.sync_message(&mut sb).map(|m| {
            let mut m = automerge::sync::Message::decode(&m).unwrap();
            m.have = Vec::new();
            m.encode()
        });
        if ma.is_none() && mb.is_none() {
            break;
        }
        if let Some(m) = ma {
            b.receive_sync(&mut sb, &m, &from_a).unwrap();
        }
        if let Some(m) = mb {
            a.receive_sync(&mut sa, &m, &from_b).unwrap();
        }
    }
    assert_eq!(a.heads(), b.heads());
    assert_eq!(b.messages().iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["hi", "x", "y"]);
}

/// Found by review: a change whose first operation counter is far above anything in its
/// dependencies raised the document's counter to where later local writes pass what
/// Automerge can parse (the saved chat would not load).
#[test]
fn a_change_that_jumps_the_operation_counter_is_refused() {
    let chat = ChatId([3; 16]);
    let mut evil = ChatDoc::new(chat, &dev("evil"));
    let honest = evil.set_title("t", 5);
    let mut e = Change::from_bytes(honest).unwrap().decode();
    // (Automerge's parser refuses counters above u32::MAX; one just below passes it.)
    e.start_op = std::num::NonZeroU64::new(u64::from(u32::MAX) - 1).unwrap();
    let jump = Change::from(e).raw_bytes().to_vec();
    let mut victim = ChatDoc::new(chat, &dev("v"));
    assert_eq!(victim.take(&jump), Err(DocError::OutOfRange("operation counter")));
    victim.set_title("mine", 6);
    assert_eq!(victim.title().as_deref(), Some("mine"), "the victim still writes");
}

/// Found by review: a peer's bloom filter with no bits, or billions of probes, made
/// Automerge's sync code divide by zero or allocate gigabytes.
#[test]
fn a_sync_message_with_a_bloom_filter_out_of_range_is_refused() {
    let chat = ChatId([4; 16]);
    let (a, mut b) = (ChatDoc::new(chat, &dev("a")), ChatDoc::new(chat, &dev("b")));
    let mut state = SyncState::new();
    let mut message = automerge::sync::Message::decode(&a.sync_message(&mut SyncState::new()).unwrap()).unwrap();
    // num_entries 1, 10 bits per entry, u32::MAX probes, then the bits.
    let bad: &[u8] = &[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0];
    let bloom = automerge::sync::BloomFilter::try_from(bad).unwrap();
    message.have = vec![automerge::sync::Have { last_sync: vec![], bloom }];
    let from = Author { account: AccountId([1; 16]), device: dev("a") };
    assert_eq!(b.receive_sync(&mut state, &message.encode(), &from), Err(DocError::OutOfRange("bloom filter")));
}

/// Issue 15, item 7: a change that comes from outside and claims to be this device's (its
/// actor, or the sender the relay names) is refused, unless it is a copy of one of this
/// device's own (a relay hands those back on a catch-up): this device's own changes skip the
/// authorship rules, so a forged one must never be taken for one.
#[test]
fn a_change_from_outside_that_claims_to_be_this_devices_is_refused_unless_it_is_a_copy() {
    let chat = ChatId([5; 16]);
    let mut a = ChatDoc::new(chat, &dev("a"));
    let mine = a.add_message(&new_message(AccountId([1; 16]), &dev("a"), "mine", 1, [1; 16])).unwrap();
    let a_author = Author { account: AccountId([1; 16]), device: dev("a") };
    let copy = a.apply_untrusted_update(&mine, &a_author).unwrap();
    assert!(copy.added.is_empty(), "a copy of its own change changes nothing");

    // A change made elsewhere under this device's actor (a forger holding the chat key).
    let mut forger = ChatDoc::new(chat, &dev("a"));
    let forged = forger.add_message(&new_message(AccountId([1; 16]), &dev("a"), "forged", 2, [2; 16])).unwrap();
    assert!(matches!(a.apply_untrusted_update(&forged, &a_author), Err(DocError::Forbidden(_))));
    // Named by the relay as this device's, though another device wrote it.
    let mut b = ChatDoc::new(chat, &dev("b"));
    let theirs = b.add_message(&new_message(AccountId([2; 16]), &dev("b"), "theirs", 3, [3; 16])).unwrap();
    assert!(matches!(a.apply_untrusted_update(&theirs, &a_author), Err(DocError::Forbidden(_))));
    assert_eq!(a.messages().iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["mine"]);
    assert!(!a.is_poisoned());
}

#[test]
fn what_a_change_touches_is_reported_also_for_held_back_changes_and_deletes() {
    let chat = ChatId([6; 16]);
    let (da, db) = (dev("a"), dev("b"));
    let (mut a, mut b) = (ChatDoc::new(chat, &da), ChatDoc::new(chat, &db));
    let alice = AccountId([1; 16]);
    let mut first = new_message(alice, &da, "one", 1, [1; 16]);
    first.attachments = vec!["photo".into(), "voice".into()];
    let second = new_message(alice, &da, "two", 2, [2; 16]);
    let (c1, c2) = (a.add_message(&first).unwrap(), a.add_message(&second).unwrap());
    // The second comes first: held back, nothing to report; then both, in list order.
    assert_eq!(b.take_update(&c2).unwrap(), DocUpdate::default());
    let texts: Vec<String> = b.take_update(&c1).unwrap().added.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["one", "two"]);
    // A delete (which also empties the attachment list) is one change of that message.
    let delete = a.delete_message(&first.id, 3).unwrap();
    let update = b.take_update(&delete).unwrap();
    assert!(update.added.is_empty() && update.read.is_empty());
    assert_eq!(update.changed.len(), 1);
    assert!(update.changed[0].deleted && update.changed[0].attachments.is_empty());
    assert_eq!(update.changed[0].id, first.id);
    // A title is no message's business.
    let title = a.set_title("plans", 4);
    assert_eq!(b.take_update(&title).unwrap(), DocUpdate::default());
}
