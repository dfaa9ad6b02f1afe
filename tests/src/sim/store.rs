//! The simulated relay store: what the relay has written, and what of it an fsync barrier has
//! made durable. A crash keeps only the durable part, as a power cut would.
//!
//! It keeps the same records as `stratus_relay::store::SledStore` and recovers the same index
//! from them (`recover` mirrors `SledStore::recover`); `memstore_matches_sledstore` in
//! tests/tests/simulator.rs holds the two to the same answers.

use std::collections::{BTreeMap, BTreeSet};

use stratus_engine::proto::cert::{AccountPublic, DeviceCert};
use stratus_engine::proto::directory::SignedGen;
use stratus_engine::proto::wire::{AccountEntry, AccountEvent, Delta, Incarnation, WrappedKey, MAX_PAGE_BYTES};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};
use stratus_relay::core::{
    AccountAdmin, AccountSettings, ApprovedLink, ChatRecord, DeviceState, Recovered, RecoveryRecord, Registration,
    StoreOp, DEDUP_WINDOW,
};

#[derive(Clone, Default)]
struct State {
    accounts: BTreeMap<AccountId, AccountPublic>,
    devices: BTreeMap<DeviceId, DeviceCert>,
    chats: BTreeMap<ChatId, ChatRecord>,
    deltas: BTreeMap<(ChatId, Seq), Delta>,
    dedup: BTreeMap<(DeviceId, ClientSeq), (ChatId, Seq)>,
    log: BTreeMap<(AccountId, Seq), AccountEvent>,
    links: BTreeMap<[u8; 32], ApprovedLink>,
    device_states: BTreeMap<DeviceId, DeviceState>,
    settings: BTreeMap<AccountId, AccountSettings>,
    recoveries: BTreeMap<[u8; 32], RecoveryRecord>,
    gens: BTreeMap<(AccountId, u32), SignedGen>,
    usernames: BTreeMap<AccountId, String>,
    chat_keys: BTreeMap<(ChatId, Epoch, AccountId), WrappedKey>,
    usage: BTreeMap<AccountId, u64>,
    session_ends: BTreeMap<DeviceId, AccountEntry>,
    accepted: BTreeSet<(AccountId, AccountId)>,
    invitations: BTreeMap<(AccountId, AccountId), u64>,
    account_admin: BTreeMap<AccountId, AccountAdmin>,
    registration: Registration,
    invites: BTreeMap<[u8; 32], u64>,
}

impl State {
    fn apply(&mut self, ops: &[StoreOp]) {
        for op in ops {
            match op {
                StoreOp::PutAccount(a) => {
                    self.accounts.insert(a.id, a.clone());
                }
                StoreOp::PutDevice(c) => {
                    self.devices.insert(c.body.device.clone(), c.clone());
                }
                StoreOp::PutChat(id, r) => {
                    self.chats.insert(*id, r.clone());
                }
                StoreOp::PutDelta(d) => {
                    self.deltas.insert((d.chat, d.seq), d.clone());
                    self.dedup.insert((d.device.clone(), d.client_seq), (d.chat, d.seq));
                }
                StoreOp::PutAccountEntry(a, e) => {
                    self.log.insert((*a, e.seq), e.event.clone());
                }
                StoreOp::PutApprovedLink(id, l) => {
                    self.links.insert(*id, l.clone());
                }
                StoreOp::PutDeviceState(d, state) => {
                    self.device_states.insert(d.clone(), *state);
                }
                StoreOp::PutAccountSettings(a, settings) => {
                    self.settings.insert(*a, *settings);
                }
                StoreOp::PutRecovery(id, r) => {
                    self.recoveries.insert(*id, r.clone());
                }
                StoreOp::PutAccountGen(g) => {
                    self.gens.insert((g.body.account, g.body.generation), g.clone());
                }
                StoreOp::PutUsername(a, Some(name)) => {
                    self.usernames.insert(*a, name.clone());
                }
                StoreOp::PutUsername(a, None) => {
                    self.usernames.remove(a);
                }
                StoreOp::DeleteRecovery(id) => {
                    self.recoveries.remove(id);
                }
                StoreOp::DeleteApprovedLink(id) => {
                    self.links.remove(id);
                }
                StoreOp::PutChatKeys(chat, epoch, keys) => {
                    for k in keys {
                        self.chat_keys.insert((*chat, *epoch, k.account), k.clone());
                    }
                }
                StoreOp::PutUsage(a, bytes) => {
                    self.usage.insert(*a, *bytes);
                }
                StoreOp::PutSessionEnd(d, e) => {
                    self.session_ends.insert(d.clone(), e.clone());
                }
                StoreOp::PutAccepted(a, b, true) => {
                    self.accepted.insert((*a, *b));
                }
                StoreOp::PutAccepted(a, b, false) => {
                    self.accepted.remove(&(*a, *b));
                }
                StoreOp::PutInvitation(a, b, Some(at)) => {
                    self.invitations.insert((*a, *b), *at);
                }
                StoreOp::PutInvitation(a, b, None) => {
                    self.invitations.remove(&(*a, *b));
                }
                StoreOp::PutAccountAdmin(a, r) => {
                    self.account_admin.insert(*a, r.clone());
                }
                StoreOp::PutRegistration(r) => self.registration = *r,
                // The simulator makes no restores: no list to forget.
                StoreOp::ForgetRedoDeletions => {}
                StoreOp::PutInvite(digest, Some(at)) => {
                    self.invites.insert(*digest, *at);
                }
                StoreOp::PutInvite(digest, None) => {
                    self.invites.remove(digest);
                }
                StoreOp::DeleteDevice(d) => {
                    self.devices.remove(d);
                    self.device_states.remove(d);
                    self.session_ends.remove(d);
                    self.dedup.retain(|(device, _), _| device != d);
                }
                StoreOp::DeleteChat(c) => {
                    self.chats.remove(c);
                    self.deltas.retain(|(chat, _), _| chat != c);
                    self.chat_keys.retain(|(chat, _, _), _| chat != c);
                }
                StoreOp::DeleteAccountData(a) => {
                    self.settings.remove(a);
                    self.usage.remove(a);
                    self.log.retain(|(account, _), _| account != a);
                }
            }
        }
    }
}

/// An in-memory relay store with an explicit durability line.
#[derive(Default)]
pub struct MemStore {
    visible: State,
    durable: State,
    pending: Vec<Vec<StoreOp>>,
    /// The store's life, as `SledStore` keeps it in its `meta` tree (set to the mirror's when
    /// one runs; restores are not simulated yet, so the floors stay empty).
    pub incarnation: Incarnation,
}

impl MemStore {
    /// Applies one batch atomically; visible at once, durable after [`MemStore::make_durable`].
    pub fn apply(&mut self, ops: Vec<StoreOp>) {
        self.visible.apply(&ops);
        self.pending.push(ops);
    }

    /// Number of batches applied and not yet durable.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A barrier that began when `batches` batches were pending has completed.
    pub fn make_durable(&mut self, batches: usize) {
        for ops in self.pending.drain(..batches.min(self.pending.len())) {
            self.durable.apply(&ops);
        }
    }

    /// Power loss: everything not behind a completed barrier is gone.
    pub fn crash(&mut self) {
        self.visible = self.durable.clone();
        self.pending.clear();
    }

    /// Every durable delta of `chat`, in seq order.
    pub fn durable_log(&self, chat: ChatId) -> Vec<Delta> {
        self.durable.deltas.range((chat, Seq(0))..=(chat, Seq(u64::MAX))).map(|(_, d)| d.clone()).collect()
    }

    /// The durable delta at `(chat, seq)`.
    pub fn durable_delta(&self, chat: ChatId, seq: Seq) -> Option<&Delta> {
        self.durable.deltas.get(&(chat, seq))
    }

    /// The durable record of a chat.
    pub fn durable_chat(&self, chat: ChatId) -> Option<&ChatRecord> {
        self.durable.chats.get(&chat)
    }

    /// Every durable chat.
    pub fn durable_chats(&self) -> Vec<ChatId> {
        self.durable.chats.keys().copied().collect()
    }

    /// Every durable account with the head of its log.
    pub fn durable_accounts(&self) -> Vec<(AccountId, Seq)> {
        self.durable
            .accounts
            .keys()
            .map(|a| {
                let head = self.durable.log.range((*a, Seq(0))..=(*a, Seq(u64::MAX))).next_back().map(|((_, s), _)| *s);
                (*a, head.unwrap_or_default())
            })
            .collect()
    }

    /// The durable keys of one epoch of a chat, by account.
    pub fn durable_chat_keys(&self, chat: ChatId, epoch: Epoch) -> Vec<WrappedKey> {
        let lo = (chat, epoch, AccountId([0; 16]));
        let hi = (chat, epoch, AccountId([0xff; 16]));
        self.durable.chat_keys.range(lo..=hi).map(|(_, k)| k.clone()).collect()
    }

    /// Like `SledStore::read_chat`, on what is visible.
    pub fn read_chat(&self, chat: ChatId, after: Seq, upto: Seq, max: u32) -> Vec<Delta> {
        let mut out = Vec::new();
        if after >= upto {
            return out;
        }
        let mut bytes = 0usize;
        for d in self.visible.deltas.range((chat, Seq(after.0 + 1))..=(chat, upto)).map(|(_, d)| d) {
            bytes += d.sealed.len();
            if !out.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            out.push(d.clone());
            if out.len() >= max as usize {
                break;
            }
        }
        out
    }

    /// Like `SledStore::read_account`, on what is visible.
    pub fn read_account(&self, account: AccountId, after: Seq, upto: Seq, max: u32) -> Vec<AccountEntry> {
        if after >= upto {
            return Vec::new();
        }
        self.visible
            .log
            .range((account, Seq(after.0 + 1))..=(account, upto))
            .take(max as usize)
            .map(|((_, seq), event)| AccountEntry { seq: *seq, event: event.clone() })
            .collect()
    }

    /// Like `SledStore::recover`, on what is visible (call it after [`MemStore::crash`] to
    /// recover what survived).
    pub fn recover(&self) -> Recovered {
        let s = &self.visible;
        let mut r = Recovered::default();
        for a in s.accounts.values() {
            let head = s.log.range((a.id, Seq(0))..=(a.id, Seq(u64::MAX))).next_back().map(|((_, seq), _)| *seq);
            r.account_heads.push((a.id, head.unwrap_or_default()));
            r.accounts.push(a.clone());
        }
        for (id, cert) in &s.devices {
            let mut recent: Vec<_> = s
                .dedup
                .range((id.clone(), ClientSeq(0))..=(id.clone(), ClientSeq(u64::MAX)))
                .rev()
                .take(DEDUP_WINDOW)
                .map(|((_, cs), (chat, seq))| (*cs, *chat, *seq))
                .collect();
            recent.reverse();
            r.recent_appends.push((id.clone(), recent));
            r.devices.push(cert.clone());
        }
        r.approved_links = s.links.iter().map(|(k, v)| (*k, v.clone())).collect();
        r.device_states = s.device_states.iter().map(|(k, v)| (k.clone(), *v)).collect();
        r.account_settings = s.settings.iter().map(|(k, v)| (*k, *v)).collect();
        r.recoveries = s.recoveries.iter().map(|(k, v)| (*k, v.clone())).collect();
        r.account_gens = s.gens.values().cloned().collect();
        r.usernames = s.usernames.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, record) in &s.chats {
            let head = s.deltas.range((*id, Seq(0))..=(*id, Seq(u64::MAX))).next_back().map(|((_, seq), _)| *seq);
            r.chats.push((*id, record.clone(), head.unwrap_or_default()));
        }
        r.usage = s.usage.iter().map(|(k, v)| (*k, *v)).collect();
        r.session_ends = s.session_ends.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        r.accepted = s.accepted.iter().copied().collect();
        r.invitations = s.invitations.iter().map(|((a, b), at)| (*a, *b, *at)).collect();
        r.account_admin = s.account_admin.iter().map(|(a, r)| (*a, r.clone())).collect();
        r.registration = s.registration;
        r.invites = s.invites.iter().map(|(d, at)| (*d, *at)).collect();
        r.incarnation = self.incarnation;
        r
    }
}
