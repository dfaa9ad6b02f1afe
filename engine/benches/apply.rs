//! Per-message CPU cost of a chat document as it grows.
//!
//! * `apply_one_message/N`: a chat with N messages receives one new message change written by
//!   another device, through [`ChatDoc::apply_untrusted`] (the path every received delta takes
//!   after it has been opened). One device sends all the changes. Target: median <= 50 µs at
//!   N = 100k.
//! * `apply_one_message_two_senders/N`: the same, but the changes come from two devices taking
//!   turns (each has seen the other's messages before writing), as in a real conversation.
//!   Automerge 0.6.1 makes every 32nd change of such a history cost O(history); criterion's
//!   estimates are over per-sample averages, so here they track the mean, not the typical apply.
//! * `send_one_message/N`: the CPU part of sending: [`ChatDoc::add_message`] plus
//!   [`seal_delta`] of the change bytes. No disk, no network.
//!
//! The history is written by three devices (two accounts) taking turns in runs of 1..=4
//! messages, each device receiving the others' changes through `apply_untrusted` as it would in
//! real use; it is saved at 1k, 10k and 100k messages. The receiver is a fourth device loaded
//! from that snapshot (as a device does at start-up). Changes are generated before measuring,
//! causally ordered, and applied one by one, so every iteration applies a change the document
//! has not seen. After `batch_len(N)` changes the receiver is reloaded from the snapshot outside
//! the timed region, so the document stays between N and N + batch_len(N) messages.
//!
//! Loading a 100k-message snapshot takes ~20 s with automerge 0.6.1, so at the largest size the
//! senders are the history's writers themselves (already at the snapshot state) rather than
//! loaded copies. Building the history takes about a minute; the whole run about three minutes
//! on a 2-core machine. Results and their reading: `docs/benchmarks.md`.
//!
//! Run: `cargo bench -p stratus-engine --bench apply`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use stratus_engine::doc::{new_message, Author, ChatDoc, Message};
use stratus_engine::proto::crypto::{seal_delta, ChatKey, DeltaAd};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch};

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
const LARGEST: usize = 100_000;
const CHAT: ChatId = ChatId([0x5a; 16]);
/// Accounts of the history's writers (devices 1, 2 and 3).
const WRITER_ACCOUNTS: [u8; 3] = [1, 1, 2];
/// The receiving device (a phone of account 1 that only reads).
const RECEIVER: u8 = 4;

/// A PeerId-shaped device id (52 characters, like an Ed25519 libp2p PeerId).
fn device(n: u8) -> DeviceId {
    DeviceId(format!("12D3KooW{}", hex::encode([n; 22])))
}

fn account(n: u8) -> AccountId {
    AccountId([n; 16])
}

/// Chat-like text, 20..=160 characters.
fn text(rng: &mut StdRng) -> String {
    const WORDS: [&str; 16] = [
        "hello", "are", "you", "coming", "tonight", "the", "train", "is", "late", "again", "see", "you", "at", "eight",
        "ok", "thanks",
    ];
    let target = rng.gen_range(20..=160);
    let mut s = String::with_capacity(target + 8);
    while s.len() < target {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s
}

fn message(rng: &mut StdRng, author: AccountId, dev: &DeviceId, ts: i64) -> Message {
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    new_message(author, dev, &text(rng), ts, id)
}

/// Writer `i`: device `i + 1`, of account `WRITER_ACCOUNTS[i]`.
fn writer(i: usize) -> Author {
    Author { account: account(WRITER_ACCOUNTS[i]), device: device(i as u8 + 1) }
}

fn load(snapshot: &[u8], dev: &DeviceId) -> ChatDoc {
    ChatDoc::load(CHAT, dev, Some(snapshot), &[], &[]).expect("load snapshot")
}

/// Saved chat documents of each size in [`SIZES`], and the writers' documents at the largest.
struct Histories {
    snapshots: Vec<(usize, Vec<u8>)>,
    last_ts: i64,
    /// Writer `i` (device `i + 1`) at the largest size, until a benchmark takes it.
    writers: Vec<Option<ChatDoc>>,
}

impl Histories {
    fn snapshot(&self, n: usize) -> &[u8] {
        &self.snapshots.iter().find(|(m, _)| *m == n).expect("a built size").1
    }

    /// Writer `i`'s document at size `n`: the build's own document at the largest size (once),
    /// otherwise loaded from the snapshot.
    fn writer(&mut self, n: usize, i: usize) -> ChatDoc {
        if n == LARGEST {
            if let Some(d) = self.writers[i].take() {
                return d;
            }
        }
        load(self.snapshot(n), &device(i as u8 + 1))
    }
}

/// Three devices of two accounts write in turns of 1..=4 messages; after each message the
/// other two devices receive it.
fn build_histories() -> Histories {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    let devs: Vec<DeviceId> = (1..=3).map(device).collect();
    let mut docs: Vec<ChatDoc> = devs.iter().map(|d| ChatDoc::new(CHAT, d)).collect();
    let mut snapshots = Vec::new();
    let mut ts = 1_700_000_000_000i64;
    let mut who = 0;
    let mut run_left = 0;
    for i in 1..=LARGEST {
        if run_left == 0 {
            who = (who + rng.gen_range(1..devs.len())) % devs.len();
            run_left = rng.gen_range(1..=4);
        }
        run_left -= 1;
        ts += rng.gen_range(1_000..60_000);
        let from = Author { account: account(WRITER_ACCOUNTS[who]), device: devs[who].clone() };
        let m = message(&mut rng, from.account, &devs[who], ts);
        let change = docs[who].add_message(&m).expect("add_message");
        for (j, d) in docs.iter_mut().enumerate() {
            if j != who {
                assert_eq!(d.apply_untrusted(&change, &from).expect("apply").len(), 1);
            }
        }
        if SIZES.contains(&i) {
            let snap = docs[0].save();
            eprintln!("history: {i} messages, snapshot {} KiB, built in {:.1?}", snap.len() / 1024, started.elapsed());
            snapshots.push((i, snap));
        }
    }
    Histories { snapshots, last_ts: ts, writers: docs.into_iter().map(Some).collect() }
}

/// How many changes to apply before the receiver is reloaded from the snapshot (outside the
/// timed region): 10% growth (12% at 100k, sized so that no reload is needed there, because
/// loading a 100k-message snapshot takes ~20 s and criterion's warm-up counts wall time).
fn batch_len(n: usize) -> usize {
    if n >= LARGEST {
        12_000
    } else {
        (n / 10).max(100)
    }
}

/// Criterion settings per size. At 100k the measuring time is chosen so that warm-up plus
/// measurement stay within `batch_len` iterations at this machine's speed (`per_iter_us`: the
/// expected cost of one iteration).
fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, n: usize, per_iter_us: f64) {
    if n >= LARGEST {
        let budget = 0.8 * batch_len(n) as f64 * per_iter_us / 1e6;
        g.sample_size(10).warm_up_time(Duration::from_millis(20)).measurement_time(Duration::from_secs_f64(budget));
    } else {
        g.sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    }
}

/// `batch_len(n)` changes, one new message each, written by `senders` taking turns in runs of
/// `run` messages; every sender receives the others' changes before writing.
fn generate(senders: &mut [(ChatDoc, Author)], n: usize, run: usize, last_ts: i64) -> Vec<(Vec<u8>, Author)> {
    let mut rng = StdRng::seed_from_u64(n as u64);
    let mut ts = last_ts;
    (0..batch_len(n))
        .map(|k| {
            ts += 1_000;
            let who = (k / run) % senders.len();
            let (doc, from) = &mut senders[who];
            let change = doc.add_message(&message(&mut rng, from.account, &from.device, ts)).expect("add_message");
            let from = from.clone();
            for (j, (other, _)) in senders.iter_mut().enumerate() {
                if j != who {
                    other.apply_untrusted(&change, &from).expect("apply");
                }
            }
            (change, from)
        })
        .collect()
}

/// Measures `apply_untrusted` of `changes`, in order, on a receiver loaded from `snap`.
fn bench_changes(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
    snap: &[u8],
    changes: &[(Vec<u8>, Author)],
) {
    let receiver_dev = device(RECEIVER);
    // A receiver loaded from the snapshot that has applied the first few changes untimed: the
    // first applies after a load pay for cold caches and growing the history's tables.
    const UNTIMED: usize = 3;
    let fresh = || {
        let mut r = load(snap, &receiver_dev);
        for (c, from) in &changes[..UNTIMED] {
            assert_eq!(r.apply_untrusted(c, from).expect("apply").len(), 1, "each change adds one message");
        }
        r
    };
    let mut receiver = fresh();
    assert_eq!(receiver.message_count(), n + UNTIMED);
    let mut next = UNTIMED;
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                if next == changes.len() {
                    receiver = fresh();
                    next = UNTIMED;
                }
                let k = left.min(changes.len() - next);
                let batch = &changes[next..next + k];
                let start = Instant::now();
                for (ch, from) in batch {
                    black_box(receiver.apply_untrusted(black_box(ch), from).expect("apply"));
                }
                total += start.elapsed();
                next += k;
                left -= k;
            }
            total
        })
    });
}

fn bench_apply(c: &mut Criterion, h: &mut Histories) {
    let mut g = c.benchmark_group("apply_one_message");
    for &n in &SIZES {
        configure(&mut g, n, 45.0);
        // Writer 0 (device 1, account 1) sends everything.
        let mut senders = [(h.writer(n, 0), writer(0))];
        let changes = generate(&mut senders, n, 1, h.last_ts);
        drop(senders);
        bench_changes(&mut g, n, h.snapshot(n), &changes);
    }
    g.finish();
}

fn bench_apply_two_senders(c: &mut Criterion, h: &mut Histories) {
    let mut g = c.benchmark_group("apply_one_message_two_senders");
    for &n in &SIZES {
        configure(&mut g, n, 400.0);
        // Writers 1 and 2 (devices 2 and 3, accounts 1 and 2) take turns, two messages each.
        let mut senders = [(h.writer(n, 1), writer(1)), (h.writer(n, 2), writer(2))];
        let changes = generate(&mut senders, n, 2, h.last_ts);
        drop(senders);
        bench_changes(&mut g, n, h.snapshot(n), &changes);
    }
    g.finish();
}

fn bench_send(c: &mut Criterion, h: &Histories) {
    let mut g = c.benchmark_group("send_one_message");
    let n = LARGEST;
    configure(&mut g, n, 25.0);
    let snap = h.snapshot(n);
    let dev = device(RECEIVER);
    let key = ChatKey([7; 32]);
    let mut rng = StdRng::seed_from_u64(42);
    let mut ts = h.last_ts;
    let msgs: Vec<Message> = (0..batch_len(n))
        .map(|_| {
            ts += 1_000;
            message(&mut rng, account(1), &dev, ts)
        })
        .collect();
    let mut doc = load(snap, &dev);
    let mut next = 0;
    let mut seq = 0u64;
    let mut nonce_rng = rand::thread_rng();
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                if next == msgs.len() {
                    doc = load(snap, &dev);
                    next = 0;
                }
                let k = left.min(msgs.len() - next);
                let batch = &msgs[next..next + k];
                let start = Instant::now();
                for m in batch {
                    seq += 1;
                    let change = doc.add_message(black_box(m)).expect("add_message");
                    let ad = DeltaAd {
                        chat: CHAT,
                        epoch: Epoch(0),
                        device: &dev,
                        account: account(1),
                        client_seq: ClientSeq(seq),
                    };
                    black_box(seal_delta(&key, &ad, &change, &mut nonce_rng));
                }
                total += start.elapsed();
                next += k;
                left -= k;
            }
            total
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut h = build_histories();
    bench_apply(&mut c, &mut h);
    bench_apply_two_senders(&mut c, &mut h);
    bench_send(&mut c, &h);
    c.final_summary();
}
