//! Two to five replicas of one chat, edited on any device and exchanging their changes in any
//! order, duplicates included. Checks, on every run:
//!
//! * after everything reaches everyone, all replicas have equal heads, equal messages (in the
//!   same order) and equal titles, whatever order the changes came in (Automerge queues a
//!   change whose dependencies are missing and applies it once they arrive);
//! * each replica reported every message exactly once: its own from `add_message`, the others
//!   from `apply_untrusted`'s return value, which is what the app shows as new;
//! * a save/load round trip keeps heads and messages (message times are arbitrary: the commit
//!   time follows them);
//! * changes made by honest replicas are never refused.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use stratus_engine::doc::{new_message, Author, ChatDoc};
use stratus_engine::{AccountId, ChatId, DeviceId};

/// Most operations per run: keeps each run to milliseconds.
const MAX_OPS: usize = 64;

#[derive(Debug, Arbitrary)]
struct Input {
    replicas: u8,
    ops: Vec<Op>,
    /// How the final "everything to everyone" is ordered.
    last: Finish,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Message {
        dev: u8,
        text: u8,
        ts: i64,
    },
    Title {
        dev: u8,
        title: u8,
        now_ms: i64,
    },
    /// One produced change (by index) to one replica.
    Deliver {
        change: u16,
        to: u8,
    },
    /// A run of produced changes, newest first when `reverse` (the least causal order).
    DeliverRun {
        first: u16,
        count: u8,
        to: u8,
        reverse: bool,
    },
    /// Save the replica and load it back, as a restart does.
    Reload {
        dev: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Finish {
    InOrder,
    Reversed,
    /// Interleaved by a stride: change `i * stride mod n` for i in 0..n (stride made coprime).
    Strided(u16),
}

struct Replica {
    id: DeviceId,
    doc: ChatDoc,
    /// How often each message id was reported to the app on this replica.
    reported: BTreeMap<String, u32>,
}

impl Replica {
    fn deliver(&mut self, (change, from): &(Vec<u8>, Author)) {
        let added = self.doc.apply_untrusted(change, from).expect("a change made by a replica applies");
        for m in added {
            *self.reported.entry(m.id).or_default() += 1;
        }
    }
}

fuzz_target!(|input: Input| {
    let chat = ChatId([5; 16]);
    let account = AccountId([6; 16]);
    let n = 2 + input.replicas as usize % 4;
    let mut replicas: Vec<Replica> = (0..n)
        .map(|i| {
            let id = DeviceId(format!("device-{i}"));
            Replica { doc: ChatDoc::new(chat, &id), id, reported: BTreeMap::new() }
        })
        .collect();
    // Each with its sender: every replica is a device of one account.
    let mut changes: Vec<(Vec<u8>, Author)> = Vec::new();
    let mut next_id = 0u32;

    for op in input.ops.into_iter().take(MAX_OPS) {
        match op {
            Op::Message { dev, text, ts } => {
                let r = &mut replicas[dev as usize % n];
                next_id += 1;
                let mut id = [0u8; 16];
                id[8..12].copy_from_slice(&next_id.to_be_bytes());
                let msg = new_message(account, &r.id, &format!("m{text}"), ts, id);
                let from = Author { account, device: r.id.clone() };
                changes.push((r.doc.add_message(&msg).expect("the genesis list exists"), from));
                *r.reported.entry(msg.id).or_default() += 1;
            }
            Op::Title { dev, title, now_ms } => {
                let r = &mut replicas[dev as usize % n];
                let from = Author { account, device: r.id.clone() };
                changes.push((r.doc.set_title(&format!("t{title}"), now_ms), from));
            }
            Op::Deliver { change, to } if !changes.is_empty() => {
                let c = &changes[change as usize % changes.len()];
                replicas[to as usize % n].deliver(c);
            }
            Op::DeliverRun { first, count, to, reverse } if !changes.is_empty() => {
                let first = first as usize % changes.len();
                let last = (first + count as usize % 16).min(changes.len());
                let r = &mut replicas[to as usize % n];
                let mut run: Vec<&(Vec<u8>, Author)> = changes[first..last].iter().collect();
                if reverse {
                    run.reverse();
                }
                for c in run {
                    r.deliver(c);
                }
            }
            Op::Deliver { .. } | Op::DeliverRun { .. } => {}
            Op::Reload { dev } => {
                let r = &mut replicas[dev as usize % n];
                let loaded = ChatDoc::load(chat, &r.id, Some(&r.doc.save()), &[], &[]).expect("a saved document loads");
                assert_eq!(loaded.heads(), r.doc.heads(), "save/load keeps the heads");
                assert_eq!(loaded.messages(), r.doc.messages(), "save/load keeps the messages");
                r.doc = loaded;
            }
        }
    }

    let order: Vec<usize> = match input.last {
        Finish::InOrder => (0..changes.len()).collect(),
        Finish::Reversed => (0..changes.len()).rev().collect(),
        Finish::Strided(stride) => {
            let len = changes.len().max(1);
            let mut s = stride as usize % len;
            while gcd(s, len) != 1 {
                s += 1;
            }
            (0..changes.len()).map(|i| i * s % len).collect()
        }
    };
    for r in replicas.iter_mut() {
        for &i in &order {
            r.deliver(&changes[i]);
        }
    }

    let first = &replicas[0];
    for r in &replicas[1..] {
        assert_eq!(r.doc.heads(), first.doc.heads(), "{} and {} have different heads", r.id, first.id);
        assert_eq!(r.doc.messages(), first.doc.messages(), "{} and {} show different messages", r.id, first.id);
        assert_eq!(r.doc.title(), first.doc.title(), "{} and {} show different titles", r.id, first.id);
    }
    for r in &replicas {
        let shown: BTreeMap<String, u32> = r.doc.messages().into_iter().map(|m| (m.id, 1)).collect();
        assert_eq!(r.doc.message_count(), shown.len(), "{}: every list entry is a message, ids unique", r.id);
        assert_eq!(r.reported, shown, "{}: each message reported to the app exactly once", r.id);
        let loaded = ChatDoc::load(chat, &r.id, Some(&r.doc.save()), &[], &[]).expect("a saved document loads");
        assert_eq!(loaded.heads(), r.doc.heads(), "save/load keeps the heads");
    }
});

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
