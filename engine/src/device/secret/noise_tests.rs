//! The Noise session driven directly: both sides in one test, bytes moved by hand.

use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::{PublicKey, StaticSecret};

use super::*;

struct Side {
    secret: [u8; 32],
    public: [u8; 32],
}

fn side(seed: u8) -> Side {
    let secret = [seed; 32];
    Side { secret, public: PublicKey::from(&StaticSecret::from(secret)).to_bytes() }
}

fn devices() -> (DeviceId, DeviceId) {
    (DeviceId("alice-phone".into()), DeviceId("bob-laptop".into()))
}

const CHAT: SecretId = SecretId([7; 16]);

/// Runs a whole handshake; returns both channels (initiator's first).
fn connect(pattern: Pattern) -> (Channel, Channel) {
    let (a, b) = (side(1), side(2));
    let (da, db) = devices();
    let ends = Ends { chat: CHAT, initiator: &da, responder: &db };
    let mut rng = StdRng::seed_from_u64(1);
    let mut i = Handshake::new(pattern, true, &ends, &a.secret, &b.public, &mut rng).unwrap();
    let mut r = Handshake::new(pattern, false, &ends, &b.secret, &a.public, &mut rng).unwrap();
    run(&mut i, &mut r).unwrap();
    (i.finish(0).unwrap(), r.finish(0).unwrap())
}

/// Moves handshake messages until both are finished.
fn run(i: &mut Handshake, r: &mut Handshake) -> Result<(), SecretError> {
    for _ in 0..4 {
        if i.is_finished() && r.is_finished() {
            return Ok(());
        }
        let (from, to) = if i.is_my_turn() { (&mut *i, &mut *r) } else { (&mut *r, &mut *i) };
        let m = from.write(b"")?;
        to.read(&m)?;
    }
    Ok(())
}

fn one(messages: Vec<Vec<u8>>) -> Vec<u8> {
    assert_eq!(messages.len(), 1);
    messages.into_iter().next().unwrap()
}

#[test]
fn kk_and_xx_handshakes_give_working_channels_both_ways() {
    for pattern in [Pattern::KK, Pattern::XX] {
        let (mut a, mut b) = connect(pattern);
        let m = one(a.seal(b"hello bob", 1).unwrap());
        assert!(!m.windows(9).any(|w| w == b"hello bob"), "ciphertext only");
        assert_eq!(b.open(&m).unwrap().as_deref(), Some(&b"hello bob"[..]));
        let m = one(b.seal(b"hello alice", 1).unwrap());
        assert_eq!(a.open(&m).unwrap().as_deref(), Some(&b"hello alice"[..]));
        let empty = one(a.seal(b"", 1).unwrap());
        assert_eq!(b.open(&empty).unwrap(), Some(vec![]));
    }
}

#[test]
fn a_peer_with_another_key_than_its_certificate_is_refused() {
    let (a, b, mallory) = (side(1), side(2), side(3));
    let (da, db) = devices();
    let ends = Ends { chat: CHAT, initiator: &da, responder: &db };
    let mut rng = StdRng::seed_from_u64(2);
    // XX: mallory completes the handshake with her own key; alice expected bob's.
    let mut i = Handshake::new(Pattern::XX, true, &ends, &a.secret, &b.public, &mut rng).unwrap();
    let mut r = Handshake::new(Pattern::XX, false, &ends, &mallory.secret, &a.public, &mut rng).unwrap();
    run(&mut i, &mut r).unwrap();
    assert_eq!(i.finish(0).unwrap_err(), SecretError::WrongPeer);
    // KK: mallory cannot even read alice's first message (it is encrypted to bob's key).
    let mut i = Handshake::new(Pattern::KK, true, &ends, &a.secret, &b.public, &mut rng).unwrap();
    let mut r = Handshake::new(Pattern::KK, false, &ends, &mallory.secret, &a.public, &mut rng).unwrap();
    assert!(matches!(run(&mut i, &mut r), Err(SecretError::Handshake(_))));
}

#[test]
fn a_handshake_does_not_move_to_another_chat_or_pair() {
    let (a, b) = (side(1), side(2));
    let (da, db) = devices();
    let mut rng = StdRng::seed_from_u64(3);
    let other_chat = Ends { chat: SecretId([8; 16]), initiator: &da, responder: &db };
    let swapped = Ends { chat: CHAT, initiator: &db, responder: &da };
    for (pattern, theirs) in [(Pattern::KK, &other_chat), (Pattern::XX, &other_chat), (Pattern::KK, &swapped)] {
        let ends = Ends { chat: CHAT, initiator: &da, responder: &db };
        let mut i = Handshake::new(pattern, true, &ends, &a.secret, &b.public, &mut rng).unwrap();
        let mut r = Handshake::new(pattern, false, theirs, &b.secret, &a.public, &mut rng).unwrap();
        assert!(run(&mut i, &mut r).is_err(), "{pattern:?}");
    }
}

#[test]
fn tampered_replayed_reordered_dropped_and_reflected_messages_are_refused() {
    type Attack = fn(&mut Channel, &mut Channel, [Vec<u8>; 3]) -> Result<Option<Vec<u8>>, SecretError>;
    let attacks: [(&str, Attack); 5] = [
        ("tampered", |_, b, [m, ..]| {
            let mut m = m;
            m[3] ^= 1;
            b.open(&m)
        }),
        ("replayed", |_, b, [m, ..]| {
            b.open(&m).unwrap();
            b.open(&m)
        }),
        ("reordered", |_, b, [_, m2, _]| b.open(&m2)),
        ("dropped", |_, b, [m, _, m3]| {
            b.open(&m).unwrap();
            b.open(&m3)
        }),
        ("reflected", |a, _, [m, ..]| a.open(&m)),
    ];
    for (what, attack) in attacks {
        let (mut a, mut b) = connect(Pattern::KK);
        let sent = [0, 1, 2].map(|i| one(a.seal(&[i; 10], 1).unwrap()));
        assert_eq!(attack(&mut a, &mut b, sent.clone()), Err(SecretError::Decrypt), "{what}");
        // The channel is dead: even the right next message is refused.
        let dead = if what == "reflected" { &mut a } else { &mut b };
        assert!(dead.open(&sent[0]).is_err(), "{what}");
        assert!(dead.seal(b"x", 1).is_err(), "{what}");
    }
}

#[test]
fn keys_change_after_100_messages_or_7_days_and_messages_in_flight_still_open() {
    let (mut a, mut b) = connect(Pattern::XX);
    // 250 messages sealed before the peer reads any: three re-keys happen in flight.
    let mut flight = Vec::new();
    for i in 0..250u32 {
        flight.push(one(a.seal(&i.to_be_bytes(), 1).unwrap()));
        assert_eq!(a.sent_under_key, u64::from(i + 1) % REKEY_AFTER_MESSAGES);
    }
    for (i, m) in flight.iter().enumerate() {
        assert_eq!(b.open(m).unwrap(), Some((i as u32).to_be_bytes().to_vec()));
    }
    // The other way, interleaved.
    for i in 0..150u32 {
        let m = one(b.seal(&i.to_be_bytes(), 1).unwrap());
        assert_eq!(a.open(&m).unwrap(), Some(i.to_be_bytes().to_vec()));
    }
    // Seven days on, the next message is the last under its key.
    let m = one(a.seal(b"a week later", REKEY_AFTER_MS + 1).unwrap());
    assert_eq!((a.sent_under_key, a.key_since_ms), (0, REKEY_AFTER_MS + 1));
    assert_eq!(b.open(&m).unwrap().as_deref(), Some(&b"a week later"[..]));
    let m = one(a.seal(b"and after", REKEY_AFTER_MS + 2).unwrap());
    assert_eq!(b.open(&m).unwrap().as_deref(), Some(&b"and after"[..]));
}

#[test]
fn large_payloads_travel_in_fragments_and_have_a_limit() {
    let (mut a, mut b) = connect(Pattern::KK);
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let messages = a.seal(&big, 1).unwrap();
    assert_eq!(messages.len(), 4);
    assert!(messages.iter().all(|m| m.len() <= MAX_FRAME_BYTES));
    let opened: Vec<Option<Vec<u8>>> = messages.iter().map(|m| b.open(m).unwrap()).collect();
    assert!(opened[..3].iter().all(Option::is_none));
    assert_eq!(opened[3].as_deref(), Some(&big[..]));
    assert_eq!(a.seal(&vec![0; MAX_PAYLOAD_BYTES + 1], 1).unwrap_err(), SecretError::TooLarge);
}

#[test]
fn garbage_in_a_handshake_is_an_error() {
    let (a, b) = (side(1), side(2));
    let (da, db) = devices();
    let ends = Ends { chat: CHAT, initiator: &da, responder: &db };
    let mut rng = StdRng::seed_from_u64(4);
    // XX's first message is an ephemeral key and a clear payload: any 32 bytes or more of it
    // read, but not a payload above the limit. KK's is encrypted to the responder.
    let oversize = vec![9u8; MAX_FRAME_BYTES + 1];
    let cases = [
        (Pattern::KK, [&b""[..], &[0u8; 31], &[1u8; 200], &oversize]),
        (Pattern::XX, [&b""[..], &[0u8; 31], &[1u8; 2000], &oversize]),
    ];
    for (pattern, garbage) in cases {
        for g in garbage {
            let mut r = Handshake::new(pattern, false, &ends, &b.secret, &a.public, &mut rng).unwrap();
            assert!(r.read(g).is_err(), "{pattern:?} {}", g.len());
        }
    }
}

#[test]
fn both_users_see_the_same_fingerprint() {
    let (a, b, c) = (side(1), side(2), side(3));
    let f = fingerprint(CHAT, &a.public, &b.public);
    assert_eq!(f, fingerprint(CHAT, &b.public, &a.public));
    assert_eq!(f.len(), 8 * 5 + 7);
    assert_ne!(f, fingerprint(CHAT, &a.public, &c.public));
    assert_ne!(f, fingerprint(SecretId([8; 16]), &a.public, &b.public));
}
