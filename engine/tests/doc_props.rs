//! Properties of the chat document model: replicas that exchange all their changes, in any
//! order and with duplicates, end equal; saving and loading keeps a document; applying a change
//! twice changes nothing the second time.

mod common;

use proptest::collection::vec;
use proptest::prelude::*;
use stratus_engine::doc::{new_message, Author, ChatDoc};
use stratus_engine::{AccountId, ChatId, DeviceId};

const CHAT: ChatId = ChatId([8; 16]);

#[derive(Debug, Clone)]
enum Edit {
    Message {
        dev: u8,
        text: String,
        ts: i64,
    },
    Title {
        dev: u8,
        title: String,
    },
    /// On a message the replica has (the `target`-th, if any): 0 edit, 1 delete for everyone
    /// (both only of its account's messages, as the device's API allows), 2 add a reaction,
    /// 3 remove it, 4 mark the chat read up to it.
    Change {
        dev: u8,
        target: u8,
        kind: u8,
        text: String,
    },
}

/// Two rounds of local edits on 2–4 replicas; between them some changes reach some replicas
/// (so round-two changes depend on others' round-one changes); `orders` are per-replica sort
/// keys for the final delivery of everything.
#[derive(Debug, Clone)]
struct Scenario {
    replicas: usize,
    first: Vec<Edit>,
    between: Vec<(u8, u8)>,
    second: Vec<Edit>,
    orders: Vec<Vec<u32>>,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<u8>(), "\\PC{0,12}", any::<i64>()).prop_map(|(dev, text, ts)| Edit::Message { dev, text, ts }),
        1 => (any::<u8>(), "\\PC{0,8}").prop_map(|(dev, title)| Edit::Title { dev, title }),
        3 => (any::<u8>(), any::<u8>(), 0u8..5, "[a-z]{1,4}")
            .prop_map(|(dev, target, kind, text)| Edit::Change { dev, target, kind, text }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        2usize..=4,
        vec(edit(), 0..10),
        vec((any::<u8>(), any::<u8>()), 0..12),
        vec(edit(), 0..10),
        vec(vec(any::<u32>(), 20), 4),
    )
        .prop_map(|(replicas, first, between, second, orders)| Scenario {
            replicas,
            first,
            between,
            second,
            orders,
        })
}

/// A device. Replicas 0 and 2 are devices of account 1, replicas 1 and 3 of account 2.
struct Replica {
    id: DeviceId,
    account: AccountId,
    doc: ChatDoc,
}

struct Run {
    replicas: Vec<Replica>,
    /// Every change made, in the order made (a causal order), with its sender.
    changes: Vec<(Vec<u8>, Author)>,
    /// Messages written.
    written: usize,
}

impl Run {
    fn new(n: usize) -> Self {
        let replicas = (0..n)
            .map(|i| {
                let id = DeviceId(format!("device-{i}"));
                Replica { doc: ChatDoc::new(CHAT, &id), id, account: AccountId([(i % 2) as u8 + 1; 16]) }
            })
            .collect();
        Run { replicas, changes: Vec::new(), written: 0 }
    }

    fn edit(&mut self, e: &Edit) {
        let n = self.replicas.len();
        let dev = match e {
            Edit::Message { dev, .. } | Edit::Title { dev, .. } | Edit::Change { dev, .. } => *dev as usize % n,
        };
        let change = match e {
            Edit::Message { dev, text, ts } => {
                let r = &mut self.replicas[*dev as usize % n];
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&(self.changes.len() as u64).to_be_bytes());
                self.written += 1;
                r.doc.add_message(&new_message(r.account, &r.id, text, *ts, id)).unwrap()
            }
            Edit::Title { dev, title } => self.replicas[*dev as usize % n].doc.set_title(title, 7),
            Edit::Change { dev, target, kind, text } => {
                let r = &mut self.replicas[*dev as usize % n];
                let messages = r.doc.messages();
                if messages.is_empty() {
                    return;
                }
                let message = &messages[*target as usize % messages.len()];
                let (id, account) = (message.id.clone(), r.account);
                if *kind < 2 && message.author != account.to_string() {
                    return;
                }
                let made = match kind {
                    0 => r.doc.edit_message(&id, text, 9),
                    1 => r.doc.delete_message(&id, 9),
                    4 => r.doc.mark_read(&account, &r.id, &id, 9),
                    k => r.doc.react(&id, &account, text, *k == 2, 9),
                };
                match made {
                    Ok(c) => c,
                    // A message deleted here cannot be edited or reacted to.
                    Err(stratus_engine::doc::DocError::Deleted(_)) => return,
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let r = &self.replicas[dev];
        self.changes.push((change, Author { account: r.account, device: r.id.clone() }));
    }

    fn deliver(&mut self, change: usize, to: usize) {
        let (c, from) = &self.changes[change];
        self.replicas[to].doc.apply_untrusted(c, from).expect("a replica's change applies");
    }

    fn authors(&self) -> Vec<Author> {
        self.replicas.iter().map(|r| Author { account: r.account, device: r.id.clone() }).collect()
    }

    /// Plays the scenario up to the final exchange.
    fn play(s: &Scenario) -> Run {
        let mut run = Run::new(s.replicas);
        s.first.iter().for_each(|e| run.edit(e));
        for &(change, to) in &s.between {
            if !run.changes.is_empty() {
                run.deliver(change as usize % run.changes.len(), to as usize % s.replicas);
            }
        }
        s.second.iter().for_each(|e| run.edit(e));
        run
    }

    /// Every change to every replica, each replica in its own order.
    fn exchange_all(&mut self, orders: &[Vec<u32>]) {
        for to in 0..self.replicas.len() {
            let keys = &orders[to % orders.len()];
            let mut order: Vec<usize> = (0..self.changes.len()).collect();
            order.sort_by_key(|&i| (keys[i % keys.len()], i));
            for i in order {
                self.deliver(i, to);
            }
        }
    }
}

fn assert_same(a: &ChatDoc, b: &ChatDoc) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.heads(), b.heads());
    prop_assert_eq!(a.messages(), b.messages());
    prop_assert_eq!(a.title(), b.title());
    Ok(())
}

proptest! {
    #![proptest_config(common::config(256))]

    #[test]
    fn replicas_converge_whatever_the_delivery_order(s in scenario()) {
        let mut run = Run::play(&s);
        run.exchange_all(&s.orders);
        let first = &run.replicas[0].doc;
        prop_assert_eq!(first.message_count(), run.written);
        for r in &run.replicas[1..] {
            assert_same(first, &r.doc)?;
        }
        // Display order is a function of the document: asking again, or asking a replica that
        // got everything in the order it was made, gives the same list.
        prop_assert_eq!(first.messages(), first.messages());
        let mut fresh = ChatDoc::new(CHAT, &DeviceId("fresh".into()));
        for (c, from) in &run.changes {
            fresh.apply_untrusted(c, from).unwrap();
        }
        assert_same(first, &fresh)?;
    }

    #[test]
    fn save_and_load_keep_the_document(s in scenario()) {
        let mut run = Run::play(&s);
        for r in &run.replicas {
            let loaded = ChatDoc::load(CHAT, &r.id, Some(&r.doc.save()), &[], &[]).unwrap();
            assert_same(&r.doc, &loaded)?;
        }
        run.exchange_all(&s.orders);
        // The store's other form: no snapshot, every change in the order it was stored.
        let r = &run.replicas[0];
        let changes: Vec<Vec<u8>> = run.changes.iter().map(|(c, _)| c.clone()).collect();
        let replayed = ChatDoc::load(CHAT, &r.id, None, &changes, &run.authors()).unwrap();
        assert_same(&r.doc, &replayed)?;
    }

    #[test]
    fn applying_a_change_again_changes_nothing(s in scenario()) {
        let mut run = Run::play(&s);
        run.exchange_all(&s.orders);
        for r in run.replicas.iter_mut() {
            let (heads, messages) = (r.doc.heads(), r.doc.messages());
            // Its own changes and everybody else's, all already applied.
            for (c, from) in &run.changes {
                prop_assert_eq!(r.doc.apply_untrusted(c, from).unwrap(), vec![]);
            }
            prop_assert_eq!(r.doc.heads(), heads);
            prop_assert_eq!(r.doc.messages(), messages);
        }
    }
}
