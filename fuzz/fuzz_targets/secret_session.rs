//! A secret chat's session reader: arbitrary bytes as handshake messages (KK and XX, either
//! side), then an established channel whose messages are delivered, tampered with, dropped,
//! duplicated or replaced with garbage, and whose payloads are read as frames. Nothing may
//! panic; untouched messages in order must open to what was sealed; a tampered, dropped-before
//! or repeated one must fail, and the channel must then refuse everything.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use stratus_engine::secret::{Channel, Ends, Handshake, Pattern, SecretFrame};
use stratus_engine::{DeviceId, SecretId};

#[derive(Debug, Arbitrary)]
struct Input {
    kk: bool,
    seed: u64,
    /// Fed to a fresh responder, and to an initiator after its first message.
    handshake_garbage: Vec<Vec<u8>>,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// Seals a payload (at most 200 KB: several fragments) from one side.
    Send { to_b: bool, len: u32, fill: u8 },
    /// Delivers the next message in order.
    Deliver { to_b: bool },
    /// Flips a bit of the next message and delivers it.
    Tamper { to_b: bool, at: u16, bit: u8 },
    /// Loses the next message.
    Drop { to_b: bool },
    /// Delivers the next message twice.
    Duplicate { to_b: bool },
    /// Delivers garbage.
    Garbage { to_b: bool, bytes: Vec<u8> },
    /// Reads arbitrary bytes as a frame.
    Frame { bytes: Vec<u8> },
    /// Moves the clock (re-keys by time).
    Wait { ms: u32 },
}

/// One direction: its receiver's channel, messages in flight with what they carry, and
/// whether the receiver is dead (an error was seen) or must fail next (a message was lost).
struct Direction {
    in_flight: VecDeque<(Vec<u8>, Option<Vec<u8>>)>,
    dead: bool,
    gap: bool,
}

fuzz_target!(|input: Input| {
    let pattern = if input.kk { Pattern::KK } else { Pattern::XX };
    let (a_secret, b_secret) = ([1u8; 32], [2u8; 32]);
    let a_public = x25519(&a_secret);
    let b_public = x25519(&b_secret);
    let (da, db) = (DeviceId("a".into()), DeviceId("b".into()));
    let ends = Ends { chat: SecretId([3; 16]), initiator: &da, responder: &db };
    let mut rng = StdRng::seed_from_u64(input.seed);

    for g in input.handshake_garbage.iter().take(8) {
        let mut r = Handshake::new(pattern, false, &ends, &b_secret, &a_public, &mut rng).unwrap();
        let _ = r.read(g);
        let mut i = Handshake::new(pattern, true, &ends, &a_secret, &b_public, &mut rng).unwrap();
        i.write(b"").unwrap();
        assert!(i.read(g).is_err() || g.len() >= 32, "short garbage never completes a handshake");
    }

    let mut i = Handshake::new(pattern, true, &ends, &a_secret, &b_public, &mut rng).unwrap();
    let mut r = Handshake::new(pattern, false, &ends, &b_secret, &a_public, &mut rng).unwrap();
    while !(i.is_finished() && r.is_finished()) {
        let (from, to) = if i.is_my_turn() { (&mut i, &mut r) } else { (&mut r, &mut i) };
        let m = from.write(b"").unwrap();
        to.read(&m).unwrap();
    }
    let mut now = 0i64;
    let mut chans: [Channel; 2] = [i.finish(now).unwrap(), r.finish(now).unwrap()];
    let mut dirs = [
        Direction { in_flight: VecDeque::new(), dead: false, gap: false },
        Direction { in_flight: VecDeque::new(), dead: false, gap: false },
    ];

    for step in input.steps.into_iter().take(64) {
        match step {
            Step::Send { to_b, len, fill } => {
                let (from, to) = if to_b { (0, 1) } else { (1, 0) };
                let payload = vec![fill; len as usize % 200_000];
                // A channel that saw a bad message is dead both ways.
                let Ok(messages) = chans[from].seal(&payload, now) else {
                    assert!(dirs[from].dead, "a live channel refused to seal");
                    continue;
                };
                let last = messages.len() - 1;
                for (k, m) in messages.into_iter().enumerate() {
                    dirs[to].in_flight.push_back((m, (k == last).then(|| payload.clone())));
                }
            }
            Step::Deliver { to_b } => deliver(&mut chans, &mut dirs, to_b),
            Step::Tamper { to_b, at, bit } => {
                let to = usize::from(to_b);
                if let Some((m, _)) = dirs[to].in_flight.front_mut() {
                    let k = at as usize % m.len();
                    m[k] ^= 1 << (bit % 8);
                    dirs[to].gap = true;
                }
                deliver(&mut chans, &mut dirs, to_b);
            }
            Step::Drop { to_b } => {
                let d = &mut dirs[usize::from(to_b)];
                if d.in_flight.pop_front().is_some() {
                    d.gap = true;
                }
            }
            Step::Duplicate { to_b } => {
                let to = usize::from(to_b);
                if let Some(front) = dirs[to].in_flight.front().cloned() {
                    deliver(&mut chans, &mut dirs, to_b);
                    dirs[to].in_flight.push_front(front);
                    dirs[to].gap = true;
                    deliver(&mut chans, &mut dirs, to_b);
                }
            }
            Step::Garbage { to_b, bytes } => {
                let to = usize::from(to_b);
                if chans[to].open(&bytes).is_ok() {
                    panic!("garbage opened");
                }
                dirs[to].dead = true;
            }
            Step::Frame { bytes } => {
                let _ = SecretFrame::decode(&bytes);
            }
            Step::Wait { ms } => now += i64::from(ms) * 1000,
        }
    }
});

/// Delivers the next message of a direction and checks the outcome.
fn deliver(chans: &mut [Channel; 2], dirs: &mut [Direction; 2], to_b: bool) {
    let to = usize::from(to_b);
    let Some((m, payload)) = dirs[to].in_flight.pop_front() else { return };
    let opened = chans[to].open(&m);
    let d = &mut dirs[to];
    if d.dead || d.gap {
        assert!(opened.is_err(), "a message after a tampered, lost or repeated one opened");
        d.dead = true;
        return;
    }
    match (opened, payload) {
        (Ok(Some(got)), Some(want)) => assert_eq!(got, want, "a payload came out other than it went in"),
        (Ok(None), None) => {}
        (r, p) => panic!("an untouched message in order: {r:?}, expected a payload: {}", p.is_some()),
    }
}

fn x25519(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}
