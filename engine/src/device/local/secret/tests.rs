//! Two devices of two accounts with a secret chat, their link driven by hand: the frames
//! each sends are handed to the other until both are quiet.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::SeedableRng;

use super::*;
use crate::device::secret::{Ends, Handshake, Pattern};
use crate::device::store::Login;
use crate::proto::cert::{AccountKeys, DeviceCertBody};

static NOW: AtomicI64 = AtomicI64::new(1_800_000_000_000);

fn now() -> i64 {
    NOW.load(Ordering::SeqCst)
}

fn device(dir: &Path, name: &str, seed: u64) -> Device {
    let mut d = Device::open_seeded(&dir.join(name), seed).unwrap();
    d.set_clock(now);
    log_in(&mut d, name);
    d
}

/// Logs `d` in as the first device of a new account of its own (no relay involved).
pub(in crate::device::local) fn log_in(d: &mut Device, name: &str) {
    let keys = AccountKeys::generate(&mut d.rng);
    let account = keys.public();
    let body = DeviceCertBody {
        account: account.id,
        device: d.id().clone(),
        device_x25519: d.identity.x25519_public(),
        name: name.into(),
        created_ms: 0,
    };
    let cert = keys.certify(body);
    d.identity.log_in(Login { account, keys, cert, relay: "x".into() });
}

/// Alice starts a secret chat with bob's device; bob's device takes it.
fn pair(dir: &Path) -> (Device, Device, SecretId) {
    let (mut alice, mut bob) = (device(dir, "alice", 1), device(dir, "bob", 2));
    let id = alice.secret_start(bob.login().unwrap().cert.clone()).unwrap();
    bob.secret_offered(id, alice.login().unwrap().cert.clone(), true, true).unwrap();
    alice.secret_accept(id).unwrap();
    (alice, bob, id)
}

/// A KK handshake between the two; returns both links and what each sends first.
fn connect(alice: &mut Device, bob: &mut Device, id: SecretId) -> (SecretLink, SecretLink, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (da, db) = (alice.id().clone(), bob.id().clone());
    let ends = Ends { chat: id, initiator: &da, responder: &db };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (sa, sb) = (*alice.identity.x25519_secret(), *bob.identity.x25519_secret());
    let mut i = Handshake::new(Pattern::KK, true, &ends, &sa, &bob.identity.x25519_public(), &mut rng).unwrap();
    let mut r = Handshake::new(Pattern::KK, false, &ends, &sb, &alice.identity.x25519_public(), &mut rng).unwrap();
    r.read(&i.write(b"").unwrap()).unwrap();
    i.read(&r.write(b"").unwrap()).unwrap();
    let (la, fa) = alice.secret_link_up(id, i.finish(now()).unwrap()).unwrap();
    let (lb, fb) = bob.secret_link_up(id, r.finish(now()).unwrap()).unwrap();
    (la, lb, fa, fb)
}

/// Hands frames back and forth until neither side has anything to send; returns what each
/// side's frames did on the other (alice's updates first).
fn pump(
    (alice, la): (&mut Device, &mut SecretLink),
    (bob, lb): (&mut Device, &mut SecretLink),
    mut to_bob: Vec<Vec<u8>>,
    mut to_alice: Vec<Vec<u8>>,
) -> (Vec<SecretUpdate>, Vec<SecretUpdate>) {
    let (mut at_alice, mut at_bob) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        if to_bob.is_empty() && to_alice.is_empty() {
            return (at_alice, at_bob);
        }
        let mut next_to_alice = Vec::new();
        for f in to_bob.drain(..) {
            let (out, u) = bob.secret_receive(lb, &f).unwrap();
            next_to_alice.extend(out);
            at_bob.push(u);
        }
        to_alice.extend(next_to_alice);
        for f in to_alice.drain(..) {
            let (out, u) = alice.secret_receive(la, &f).unwrap();
            to_bob.extend(out);
            at_alice.push(u);
        }
    }
    panic!("the link never went quiet");
}

fn texts(d: &mut Device, id: SecretId) -> Vec<String> {
    d.secret_messages(id).unwrap().into_iter().map(|m| m.message.text).collect()
}

#[test]
fn messages_written_offline_arrive_when_the_link_comes_up_and_replies_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    for t in ["one", "two", "three"] {
        alice.secret_send(id, t, None).unwrap();
    }
    assert!(texts(&mut bob, id).is_empty());
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    let (_, at_bob) = pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    assert_eq!(texts(&mut bob, id), ["one", "two", "three"]);
    let arrived: Vec<String> = at_bob.iter().flat_map(|u| u.added.iter().map(|m| m.message.text.clone())).collect();
    assert_eq!(arrived, ["one", "two", "three"], "each reported once, when it can be read");

    bob.secret_send(id, "hi alice", None).unwrap();
    let out = bob.secret_flush(&mut lb).unwrap();
    pump((&mut alice, &mut la), (&mut bob, &mut lb), Vec::new(), out);
    assert_eq!(texts(&mut alice, id), ["one", "two", "three", "hi alice"]);
    assert_eq!(texts(&mut bob, id), texts(&mut alice, id));
    assert!(alice.store.message_keys(id).unwrap().iter().all(|(_, k)| k.delivered || !k.mine));
}

#[test]
fn a_message_disappears_on_both_devices_its_time_after_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    alice.secret_send(id, "stays", None).unwrap();
    let gone = alice.secret_send(id, "burn after reading", Some(5)).unwrap();
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);

    NOW.fetch_add(60_000, Ordering::SeqCst);
    assert!(bob.secret_expire().unwrap().is_empty(), "no timer runs before it is read");
    let read_at = now();
    bob.secret_read(id, &gone.message.id).unwrap();
    assert_eq!(bob.secret_next_expiry().unwrap(), Some(read_at + 5_000));
    let out = bob.secret_flush(&mut lb).unwrap();
    pump((&mut alice, &mut la), (&mut bob, &mut lb), Vec::new(), out);
    assert_eq!(alice.secret_next_expiry().unwrap(), Some(read_at + 5_000), "the writer's timer starts too");

    let key = alice.store.message_keys(id).unwrap().into_iter().find(|(m, _)| *m == gone.message.id).unwrap().1.key;
    NOW.fetch_add(4_000, Ordering::SeqCst);
    assert!(alice.secret_expire().unwrap().is_empty());
    NOW.fetch_add(1_000, Ordering::SeqCst);
    for d in [&mut alice, &mut bob] {
        assert_eq!(d.secret_expire().unwrap(), [(id, gone.message.id.clone())]);
        assert_eq!(texts(d, id), ["stays"]);
        let doc = d.secret_doc(id).unwrap();
        assert_eq!(doc.message_count(), 2, "the document keeps the sealed text, its key is gone");
    }
    // Found by review: the same key sent again (the writer missed the acknowledgement) must
    // not bring the message back.
    let again = la.seal(&[SecretFrame::Keys(vec![(gone.message.id.clone(), key)])], now()).unwrap();
    bob.secret_receive(&mut lb, &again[0]).unwrap();
    assert_eq!(texts(&mut bob, id), ["stays"]);
}

#[test]
fn closing_deletes_the_chat_on_both_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    alice.secret_send(id, "hello", None).unwrap();
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    bob.secret_close(id).unwrap();
    assert!(bob.secret_chats().unwrap().is_empty());
    assert!(matches!(bob.secret_messages(id), Err(Error::UnknownSecret(_))));
    // The peer learns it over the next link.
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    let (at_alice, _) = pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    assert!(at_alice.iter().any(|u| u.closed));
    assert!(alice.secret_chats().unwrap().is_empty());
    assert!(
        alice.store.message_keys(id).unwrap().is_empty()
            && alice.store.secret_doc_parts(id).unwrap() == (None, Vec::new())
    );
    assert!(bob.store.secret(id).unwrap().is_none(), "the closing record is gone once told");
}

#[test]
fn a_tampered_message_kills_the_link_and_a_forged_change_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    let hello = alice.secret_send(id, "hello", None).unwrap();
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);

    let mut frame = alice.secret_send(id, "x", None).map(|_| alice.secret_flush(&mut la).unwrap()).unwrap();
    frame[0][5] ^= 1;
    assert!(matches!(bob.secret_receive(&mut lb, &frame[0]), Err(Error::Secret(_))));
    assert!(bob.secret_receive(&mut lb, &frame[1]).is_err(), "the link is dead");

    // Bob's device edits alice's message in its copy and syncs it over a fresh link.
    let doc = bob.secret_doc(id).unwrap();
    doc.edit_message(&hello.message.id, "bob was here", now()).unwrap();
    let saved = doc.save();
    bob.store.put_secret_doc(id, &saved).unwrap();
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    let mut refused = false;
    let (mut to_alice, mut to_bob) = (fb, fa);
    for _ in 0..10 {
        let mut next = Vec::new();
        for f in to_bob.drain(..) {
            next.extend(bob.secret_receive(&mut lb, &f).unwrap().0);
        }
        to_alice.extend(next);
        for f in to_alice.drain(..) {
            match alice.secret_receive(&mut la, &f) {
                Ok((out, _)) => to_bob.extend(out),
                Err(Error::Doc(crate::device::doc::DocError::Forbidden(_))) => refused = true,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(refused);
    assert_eq!(texts(&mut alice, id)[0], "hello");
}

#[test]
fn many_messages_in_flight_across_re_keys_all_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    let mut in_flight = Vec::new();
    for i in 0..60 {
        alice.secret_send(id, &format!("m{i}"), None).unwrap();
        in_flight.extend(alice.secret_flush(&mut la).unwrap());
    }
    assert!(in_flight.len() > 100, "more than one key's worth: {}", in_flight.len());
    pump((&mut alice, &mut la), (&mut bob, &mut lb), in_flight, Vec::new());
    assert_eq!(texts(&mut bob, id).len(), 60);
}

#[test]
fn a_chat_stored_change_by_change_and_compacted_reopens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    // Past one compaction on both devices, with changes from both.
    let n = SECRET_COMPACT_AFTER as usize + 20;
    let mut want = Vec::new();
    for i in 0..n {
        let (writer, link) = if i % 2 == 0 { (&mut alice, &mut la) } else { (&mut bob, &mut lb) };
        writer.secret_send(id, &format!("m{i}"), None).unwrap();
        want.push(format!("m{i}"));
        let out = writer.secret_flush(link).unwrap();
        match i % 2 {
            0 => pump((&mut alice, &mut la), (&mut bob, &mut lb), out, Vec::new()),
            _ => pump((&mut alice, &mut la), (&mut bob, &mut lb), Vec::new(), out),
        };
    }
    let last = want.last().unwrap().clone();
    let upto = bob.secret_messages(id).unwrap().into_iter().find(|m| m.message.text == last).unwrap();
    bob.secret_read(id, &upto.message.id).unwrap();
    let stored = bob.store.secret_doc_parts(id).unwrap().1.len();
    assert!(stored < 30, "compacted: {stored} changes after the snapshot");
    assert!(stored > 0, "changes since the snapshot are stored one by one");

    // Reopened from the store (the changes of the other device checked again on load).
    let bob_id = bob.id().clone();
    drop((bob, lb));
    let mut bob = Device::open_seeded(&dir.path().join("bob"), 3).unwrap();
    assert_eq!(*bob.id(), bob_id);
    assert_eq!(texts(&mut bob, id), want);
    assert_eq!(texts(&mut alice, id), want);
    let read = bob.secret_messages(id).unwrap().into_iter().filter(|m| !m.message.read_by.is_empty()).count();
    assert!(read > 0, "bob's read mark was stored");
}

#[test]
fn both_sides_learn_what_they_share_so_sync_messages_stay_small() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, id) = pair(dir.path());
    let (mut la, mut lb, fa, fb) = connect(&mut alice, &mut bob, id);
    pump((&mut alice, &mut la), (&mut bob, &mut lb), fa, fb);
    for i in 0..30 {
        alice.secret_send(id, &format!("m{i}"), None).unwrap();
        let out = alice.secret_flush(&mut la).unwrap();
        pump((&mut alice, &mut la), (&mut bob, &mut lb), out, Vec::new());
        let heads = alice.secret_doc(id).unwrap().head_hashes();
        // Without it the writer's summary of what the reader has covers every change since the
        // link came up, and grows with each message.
        assert_eq!(la.sync.shared_heads, heads, "message {i}: alice knows bob has it");
        assert_eq!(lb.sync.shared_heads, heads, "message {i}");
    }
}

/// Feeds frames from one conn to the other until neither has more; returns the last steps.
fn drive(
    (a, ca): (&mut Device, &mut SecretConn),
    (b, cb): (&mut Device, &mut SecretConn),
    first: Vec<u8>,
) -> (Option<Step>, Option<Step>) {
    let (mut to_b, mut to_a, mut last_a, mut last_b) = (vec![first], Vec::new(), None, None);
    for _ in 0..20 {
        for f in to_b.drain(..) {
            let (out, step) = b.secret_step(cb, &f).unwrap();
            to_a.extend(out);
            last_b = Some(step);
        }
        for f in to_a.drain(..) {
            let (out, step) = a.secret_step(ca, &f).unwrap();
            to_b.extend(out);
            last_a = Some(step);
        }
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
    }
    (last_a, last_b)
}

#[test]
fn a_declined_offer_reaches_its_sender_and_a_late_opening_does_not_bring_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = (device(dir.path(), "alice", 1), device(dir.path(), "bob", 2));
    let id = alice.secret_start(bob.login().unwrap().cert.clone()).unwrap();
    bob.secret_offered(id, alice.login().unwrap().cert.clone(), true, false).unwrap();
    assert!(matches!(bob.secret_send(id, "not yet", None), Err(Error::SecretNotAccepted(_))));
    assert!(matches!(bob.secret_connect(id), Err(Error::SecretNotAccepted(_))));

    // Alice's device opens a stream for the offer; its opening is still on the way when bob
    // declines.
    let (mut late, late_opening) = alice.secret_connect(id).unwrap();
    bob.secret_close(id).unwrap();
    let (mut from_bob, opening) = bob.secret_connect(id).unwrap();
    let mut at_alice = alice.secret_incoming(bob.id().clone());
    let (bob_step, alice_step) = drive((&mut bob, &mut from_bob), (&mut alice, &mut at_alice), opening);
    assert_eq!(alice_step, Some(Step::Ended(Ended::Gone(id))));
    assert_eq!(bob_step, Some(Step::Ended(Ended::Gone(id))));
    assert!(alice.secret_chats().unwrap().is_empty() && bob.store.secret(id).unwrap().is_none());

    let mut at_bob = bob.secret_incoming(alice.id().clone());
    let (alice_step, _) = drive((&mut alice, &mut late), (&mut bob, &mut at_bob), late_opening);
    assert_eq!(alice_step, Some(Step::Ended(Ended::Gone(id))));
    assert!(bob.secret_chats().unwrap().is_empty(), "not recorded as a new offer");
}
