//! Properties of the device's sync core, driven against a model relay written here: an
//! in-memory log per chat and for the account, pages of random size, pushes of other devices'
//! deltas, random disconnects and restarts. Checked on every step: each applied delta continues
//! its chat's cursor, account entries continue the account cursor, every outbox item is
//! acknowledged exactly once (once more after a restore that lost it), and no more than the
//! allowed appends and fetches are unanswered. The relay is also backed up and restored from an
//! older backup (a new incarnation, docs/protocol.md "Restores"). Checked at the end, after the
//! faults stop: the core reaches `is_idle` with every chat and the account log caught up and
//! the outbox empty, each chat's deltas as the device applied them are the relay's log, and
//! the relay holds every delta the device wrote.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::collection::vec;
use proptest::prelude::*;
use stratus_engine::core::{SyncCore, SyncInput, SyncOutput, MAX_APPENDS_IN_FLIGHT, MAX_FETCHES_IN_FLIGHT};
use stratus_engine::proto::cert::{DeviceCert, DeviceCertBody};
use stratus_engine::proto::wire::{
    AccountEntry, AccountEvent, ClientFrame, Delta, Incarnation, RelayFrame, ReqId, Restored, PROTOCOL_VERSION,
};
use stratus_engine::store::{OutboxBody, OutboxItem};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

/// Steps after which a run without faults must have settled.
const SETTLE_STEPS: usize = 100_000;

#[derive(Debug, Clone)]
enum Step {
    /// The next frame in flight to the relay arrives.
    ToRelay,
    /// The next frame in flight to the device arrives.
    ToDevice,
    /// The device writes `n` deltas to a chat.
    Send {
        chat: u8,
        n: u8,
    },
    /// Another device's delta lands in a chat.
    Remote {
        chat: u8,
    },
    /// A new account log entry.
    RemoteAccount,
    /// The stream breaks; frames in flight are lost.
    Disconnect,
    Connect,
    /// The device restarts: a new core from what its store holds.
    Restart,
    /// A chat's key arrives: the device can open its deltas from now on.
    KeyArrives {
        chat: u8,
    },
    /// The operator backs the relay up.
    Backup,
    /// The operator restores the last backup: the device's stream breaks, and the relay's logs
    /// go back to the backup's under a new incarnation.
    Restore,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => Just(Step::ToRelay),
        8 => Just(Step::ToDevice),
        3 => (any::<u8>(), prop_oneof![4 => Just(1u8), 1 => 1u8..64]).prop_map(|(chat, n)| Step::Send { chat, n }),
        2 => any::<u8>().prop_map(|chat| Step::Remote { chat }),
        1 => Just(Step::RemoteAccount),
        1 => Just(Step::Disconnect),
        2 => Just(Step::Connect),
        1 => Just(Step::Restart),
        1 => any::<u8>().prop_map(|chat| Step::KeyArrives { chat }),
        1 => Just(Step::Backup),
        1 => Just(Step::Restore),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Deltas already in each chat's log (1–3 chats).
    backlog: Vec<u8>,
    /// Which chats' keys the device has from the start.
    ready: Vec<bool>,
    account_backlog: u8,
    /// Page sizes the relay uses, in turn.
    pages: Vec<u32>,
    steps: Vec<Step>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (vec(0u8..40, 1..=3), vec(any::<bool>(), 3), 0u8..6, vec(1u32..8, 1..8), vec(step(), 0..250)).prop_map(
        |(backlog, ready, account_backlog, pages, steps)| Scenario { backlog, ready, account_backlog, pages, steps },
    )
}

fn me() -> DeviceId {
    DeviceId("me".into())
}

fn other() -> DeviceId {
    DeviceId("other".into())
}

/// The relay as the protocol describes it, everything durable at once.
struct ModelRelay {
    chats: BTreeMap<ChatId, Vec<Delta>>,
    account: Vec<AccountEntry>,
    /// This device's stored appends: client seq → (chat, seq).
    dedup: BTreeMap<ClientSeq, (ChatId, Seq)>,
    /// The device's stream is up and said hello (pushes go to it).
    attached: bool,
    pages: Vec<u32>,
    next_page: usize,
    other_client_seq: u64,
    incarnation: Incarnation,
    /// The last backup: the logs and the dedup index.
    backup: Option<Backup>,
    /// After a restore: the lowest head each log had at any restore.
    floors: Option<(Seq, BTreeMap<ChatId, Seq>)>,
}

#[derive(Clone)]
struct Backup {
    chats: BTreeMap<ChatId, Vec<Delta>>,
    account: Vec<AccountEntry>,
    dedup: BTreeMap<ClientSeq, (ChatId, Seq)>,
}

impl ModelRelay {
    fn restore(&mut self) -> bool {
        let Some(b) = self.backup.clone() else { return false };
        let (mut account, mut chats) = self.floors.take().unwrap_or((Seq(u64::MAX), BTreeMap::new()));
        account = account.min(Seq(b.account.len() as u64));
        for (c, log) in &b.chats {
            let f = chats.entry(*c).or_insert(Seq(u64::MAX));
            *f = (*f).min(Seq(log.len() as u64));
        }
        self.floors = Some((account, chats));
        self.chats = b.chats;
        self.account = b.account;
        self.dedup = b.dedup;
        self.incarnation.generation += 1;
        true
    }

    fn remote_delta(&mut self, chat: ChatId) -> Delta {
        self.other_client_seq += 1;
        let log = self.chats.get_mut(&chat).expect("a chat of the scenario");
        let delta = Delta {
            chat,
            seq: Seq(log.len() as u64 + 1),
            epoch: Epoch(0),
            device: other(),
            account: AccountId([2; 16]),
            client_seq: ClientSeq(self.other_client_seq),
            sealed: vec![1; 3],
        };
        log.push(delta.clone());
        delta
    }

    fn account_entry(&mut self) -> AccountEntry {
        let cert = DeviceCert {
            body: DeviceCertBody {
                account: AccountId([1; 16]),
                device: DeviceId(format!("device-{}", self.account.len())),
                device_x25519: [0; 32],
                name: "d".into(),
                created_ms: 0,
            },
            signature: vec![0; 64],
        };
        let entry = AccountEntry { seq: Seq(self.account.len() as u64 + 1), event: AccountEvent::DeviceAdded { cert } };
        self.account.push(entry.clone());
        entry
    }

    fn page_size(&mut self, max: u32) -> usize {
        let n = self.pages[self.next_page % self.pages.len()];
        self.next_page += 1;
        n.min(max) as usize
    }

    /// Answers one frame from the device.
    fn handle(&mut self, frame: ClientFrame) -> Vec<RelayFrame> {
        match frame {
            ClientFrame::Hello { version } => {
                assert_eq!(version, PROTOCOL_VERSION);
                self.attached = true;
                vec![RelayFrame::Hello { version, account: Some(AccountId([1; 16])), incarnation: self.incarnation }]
            }
            ClientFrame::SyncState { req } => vec![RelayFrame::SyncState {
                req,
                account_head: Seq(self.account.len() as u64),
                chats: self.chats.iter().map(|(c, log)| (*c, Seq(log.len() as u64))).collect(),
                restored: self.floors.as_ref().map(|(account, chats)| Restored {
                    account_floor: *account,
                    chats: chats.iter().map(|(c, s)| (*c, *s)).collect(),
                    client_seq: self.dedup.keys().next_back().copied().unwrap_or_default(),
                }),
            }],
            ClientFrame::FetchChat { req, chat, after, max } => {
                let n = self.page_size(max);
                let log = &self.chats[&chat];
                let from = (after.0 as usize).min(log.len());
                let deltas = log[from..(from + n).min(log.len())].to_vec();
                vec![RelayFrame::ChatPage { req, chat, deltas, head: Seq(log.len() as u64) }]
            }
            ClientFrame::FetchAccount { req, after, max } => {
                let n = self.page_size(max);
                let from = (after.0 as usize).min(self.account.len());
                let entries = self.account[from..(from + n).min(self.account.len())].to_vec();
                vec![RelayFrame::AccountPage { req, entries, head: Seq(self.account.len() as u64) }]
            }
            ClientFrame::Append { req, chat, epoch, client_seq, sealed } => {
                if let Some(&(chat, seq)) = self.dedup.get(&client_seq) {
                    return vec![RelayFrame::Acked { req, chat, client_seq, seq }];
                }
                let log = self.chats.get_mut(&chat).expect("the device appends to its chats");
                let seq = Seq(log.len() as u64 + 1);
                log.push(Delta { chat, seq, epoch, device: me(), account: AccountId([1; 16]), client_seq, sealed });
                self.dedup.insert(client_seq, (chat, seq));
                // No push back to the device that sent it.
                vec![RelayFrame::Acked { req, chat, client_seq, seq }]
            }
            other => panic!("the sync core sent a frame it has no business sending: {other:?}"),
        }
    }
}

/// The device: its sync core, its store (cursors, outbox) and the stream.
struct World {
    relay: ModelRelay,
    core: SyncCore,
    connected: bool,
    to_relay: VecDeque<ClientFrame>,
    to_device: VecDeque<RelayFrame>,
    chat_ids: Vec<ChatId>,
    ready: BTreeSet<ChatId>,
    cursors: BTreeMap<ChatId, Seq>,
    account_cursor: Seq,
    outbox: BTreeMap<ClientSeq, OutboxItem>,
    /// Acknowledged items, kept to be sent again to a restored relay.
    sent: BTreeMap<ClientSeq, OutboxItem>,
    /// The relay incarnation the store keeps.
    incarnation: Option<Incarnation>,
    /// Each chat's deltas as the device applied them (or passed, its own), in order.
    applied: BTreeMap<ChatId, Vec<Delta>>,
    next_client_seq: u64,
    acked: BTreeSet<ClientSeq>,
    appends_unanswered: BTreeSet<ReqId>,
    fetches_unanswered: BTreeSet<ReqId>,
}

impl World {
    fn new(s: &Scenario) -> Result<World, TestCaseError> {
        let chat_ids: Vec<ChatId> = (0..s.backlog.len()).map(|i| ChatId([i as u8 + 1; 16])).collect();
        let mut relay = ModelRelay {
            chats: chat_ids.iter().map(|c| (*c, Vec::new())).collect(),
            account: Vec::new(),
            dedup: BTreeMap::new(),
            attached: false,
            pages: s.pages.clone(),
            next_page: 0,
            other_client_seq: 0,
            incarnation: Incarnation { store: [3; 16], generation: 0 },
            backup: None,
            floors: None,
        };
        for (chat, n) in chat_ids.iter().zip(&s.backlog) {
            for _ in 0..*n {
                relay.remote_delta(*chat);
            }
        }
        for _ in 0..s.account_backlog {
            relay.account_entry();
        }
        let mut w = World {
            relay,
            core: SyncCore::new(Seq(0), false),
            connected: false,
            to_relay: VecDeque::new(),
            to_device: VecDeque::new(),
            cursors: chat_ids.iter().map(|c| (*c, Seq(0))).collect(),
            ready: BTreeSet::new(),
            chat_ids,
            account_cursor: Seq(0),
            outbox: BTreeMap::new(),
            sent: BTreeMap::new(),
            incarnation: None,
            applied: BTreeMap::new(),
            next_client_seq: 1,
            acked: BTreeSet::new(),
            appends_unanswered: BTreeSet::new(),
            fetches_unanswered: BTreeSet::new(),
        };
        for (i, chat) in w.chat_ids.clone().into_iter().enumerate() {
            if s.ready[i] {
                w.key_arrives(chat)?;
            }
        }
        Ok(w)
    }

    fn chat(&self, i: u8) -> ChatId {
        self.chat_ids[i as usize % self.chat_ids.len()]
    }

    fn key_arrives(&mut self, chat: ChatId) -> Result<(), TestCaseError> {
        if self.ready.insert(chat) {
            self.input(SyncInput::ChatReady { chat, cursor: self.cursors[&chat] })?;
        }
        Ok(())
    }

    /// Feeds one input and carries out the outputs, as the session driver does.
    fn input(&mut self, input: SyncInput) -> Result<(), TestCaseError> {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for output in self.core.handle(input) {
                self.output(output, &mut inputs)?;
            }
        }
        Ok(())
    }

    fn output(&mut self, output: SyncOutput, inputs: &mut VecDeque<SyncInput>) -> Result<(), TestCaseError> {
        match output {
            SyncOutput::Send(frame) => {
                prop_assert!(self.connected, "sent {frame:?} without a stream");
                match &frame {
                    ClientFrame::Append { req, .. } => {
                        self.appends_unanswered.insert(*req);
                    }
                    ClientFrame::FetchChat { req, .. } | ClientFrame::FetchAccount { req, .. } => {
                        self.fetches_unanswered.insert(*req);
                    }
                    _ => {}
                }
                prop_assert!(self.appends_unanswered.len() <= MAX_APPENDS_IN_FLIGHT, "too many appends in flight");
                prop_assert!(self.fetches_unanswered.len() <= MAX_FETCHES_IN_FLIGHT, "too many fetches in flight");
                self.to_relay.push_back(frame);
            }
            SyncOutput::ApplyDelta(delta) => {
                prop_assert!(self.ready.contains(&delta.chat), "a delta of a chat without its key");
                let cursor = self.cursors[&delta.chat];
                prop_assert_eq!(delta.seq, cursor.next(), "a delta that does not continue the cursor");
                prop_assert_eq!(&self.relay.chats[&delta.chat][cursor.0 as usize], &delta, "not the stored delta");
                self.cursors.insert(delta.chat, delta.seq);
                self.applied.entry(delta.chat).or_default().push(delta);
            }
            SyncOutput::Cursor { chat, seq } => {
                let cursor = self.cursors[&chat];
                prop_assert_eq!(seq, cursor.next(), "a cursor move that skips");
                let own = self.relay.chats[&chat][cursor.0 as usize].clone();
                prop_assert_eq!(&own.device, &me(), "skipped another's delta");
                self.cursors.insert(chat, seq);
                self.applied.entry(chat).or_default().push(own);
            }
            SyncOutput::ApplyAccountEntry(entry) => {
                prop_assert_eq!(entry.seq, self.account_cursor.next(), "an entry that does not continue the cursor");
                self.account_cursor = entry.seq;
                inputs.push_back(SyncInput::AccountApplied(entry.seq));
            }
            SyncOutput::Acked { client_seq, chat, seq } => {
                prop_assert!(self.acked.insert(client_seq), "client seq {client_seq:?} acknowledged twice");
                let item = self.outbox.remove(&client_seq);
                prop_assert!(item.as_ref().is_some_and(|i| i.chat == chat), "an ack for no outbox item");
                self.sent.extend(item.map(|i| (client_seq, i)));
                if let Some(seq) = seq {
                    let stored = &self.relay.chats[&chat][seq.0 as usize - 1];
                    prop_assert_eq!((&stored.device, stored.client_seq), (&me(), client_seq));
                }
            }
            SyncOutput::LoadOutbox { after, max } => {
                let mut items = self.outbox.range(ClientSeq(after.0 + 1)..).map(|(_, i)| i.clone());
                let loaded: Vec<OutboxItem> = items.by_ref().take(max).collect();
                let more = items.next().is_some();
                inputs.push_back(SyncInput::OutboxLoaded { items: loaded, more });
            }
            SyncOutput::Rewind { incarnation, account, chats, resend_after } => {
                self.incarnation = Some(incarnation);
                self.account_cursor = self.account_cursor.min(account);
                for (chat, seq) in chats {
                    let c = self.cursors.entry(chat).or_default();
                    *c = (*c).min(seq);
                    self.applied.entry(chat).or_default().truncate(seq.0 as usize);
                }
                if let Some(after) = resend_after {
                    let back = self.sent.split_off(&ClientSeq(after.0 + 1));
                    for cs in back.keys() {
                        self.acked.remove(cs);
                    }
                    self.outbox.extend(back);
                }
            }
            other => prop_assert!(false, "the model relay is correct, yet: {other:?}"),
        }
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::ToRelay => {
                if let Some(frame) = self.to_relay.pop_front() {
                    let replies = self.relay.handle(frame);
                    self.to_device.extend(replies);
                }
            }
            Step::ToDevice => {
                if let Some(frame) = self.to_device.pop_front() {
                    match &frame {
                        RelayFrame::Acked { req, .. } => {
                            self.appends_unanswered.remove(req);
                        }
                        RelayFrame::ChatPage { req, .. } | RelayFrame::AccountPage { req, .. } => {
                            self.fetches_unanswered.remove(req);
                        }
                        _ => {}
                    }
                    self.input(SyncInput::Frame(Box::new(frame)))?;
                }
            }
            Step::Send { chat, n } => {
                let chat = self.chat(*chat);
                if self.ready.contains(&chat) {
                    for _ in 0..*n {
                        let client_seq = ClientSeq(self.next_client_seq);
                        self.next_client_seq += 1;
                        let item = OutboxItem {
                            client_seq,
                            chat,
                            epoch: Epoch(0),
                            body: OutboxBody::Delta { sealed: vec![2; 4], plain: Vec::new() },
                        };
                        self.outbox.insert(client_seq, item.clone());
                        self.input(SyncInput::OutboxAdded(item))?;
                    }
                }
            }
            Step::Remote { chat } => {
                let delta = self.relay.remote_delta(self.chat(*chat));
                if self.relay.attached {
                    self.to_device.push_back(RelayFrame::Push { delta });
                }
            }
            Step::RemoteAccount => {
                let entry = self.relay.account_entry();
                if self.relay.attached {
                    self.to_device.push_back(RelayFrame::PushAccount { entry });
                }
            }
            Step::Disconnect => {
                if self.connected {
                    self.drop_stream();
                    self.input(SyncInput::Disconnected)?;
                }
            }
            Step::Connect => {
                if !self.connected {
                    self.connected = true;
                    self.input(SyncInput::Connected)?;
                }
            }
            Step::Restart => {
                self.drop_stream();
                self.core =
                    SyncCore::new(self.account_cursor, !self.outbox.is_empty()).with_incarnation(self.incarnation);
                for chat in std::mem::take(&mut self.ready) {
                    self.key_arrives(chat)?;
                }
            }
            Step::KeyArrives { chat } => self.key_arrives(self.chat(*chat))?,
            Step::Backup => {
                let r = &self.relay;
                self.relay.backup =
                    Some(Backup { chats: r.chats.clone(), account: r.account.clone(), dedup: r.dedup.clone() });
            }
            Step::Restore => {
                if self.relay.restore() && self.connected {
                    self.drop_stream();
                    self.input(SyncInput::Disconnected)?;
                }
            }
        }
        Ok(())
    }

    fn drop_stream(&mut self) {
        self.connected = false;
        self.relay.attached = false;
        self.to_relay.clear();
        self.to_device.clear();
        self.appends_unanswered.clear();
        self.fetches_unanswered.clear();
    }

    /// No more faults: connect, every key known, deliver until nothing is in flight.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.step(&Step::Connect)?;
        for chat in self.chat_ids.clone() {
            self.key_arrives(chat)?;
        }
        for _ in 0..SETTLE_STEPS {
            if self.to_relay.is_empty() && self.to_device.is_empty() {
                return Ok(());
            }
            self.step(&Step::ToRelay)?;
            self.step(&Step::ToDevice)?;
        }
        prop_assert!(false, "still talking after {SETTLE_STEPS} steps");
        Ok(())
    }
}

proptest! {
    #![proptest_config(common::config(512))]

    #[test]
    fn sync_core_against_a_model_relay(s in scenario()) {
        let mut w = World::new(&s)?;
        for step in &s.steps {
            w.step(step)?;
        }
        w.settle()?;
        prop_assert!(w.core.is_idle(), "settled but not idle");
        prop_assert!(w.outbox.is_empty(), "outbox items never acknowledged: {:?}", w.outbox.keys());
        for (chat, log) in &w.relay.chats {
            prop_assert_eq!(w.cursors[chat], Seq(log.len() as u64), "chat {} not caught up", chat);
        }
        prop_assert_eq!(w.account_cursor, Seq(w.relay.account.len() as u64), "account log not caught up");
        for (chat, log) in &w.relay.chats {
            let applied = w.applied.get(chat).map(Vec::as_slice).unwrap_or_default();
            prop_assert!(applied == log.as_slice(), "chat {} applied {} deltas, not the relay's {}", chat, applied.len(), log.len());
        }
        let stored: BTreeSet<ClientSeq> =
            w.relay.chats.values().flatten().filter(|d| d.device == me()).map(|d| d.client_seq).collect();
        let written: BTreeSet<ClientSeq> = (1..w.next_client_seq).map(ClientSeq).collect();
        prop_assert_eq!(stored, written, "the relay lacks deltas the device wrote");
    }
}
