//! The `relay_core` target's model of the relay's store: what the core's writes put there,
//! the durable part and everything written (a crash keeps only the first). Split out of
//! `relay_core.rs` for size.

use super::*;

/// What the store holds: the durable part, or everything written.
#[derive(Default, Clone)]
pub(super) struct Store {
    pub(super) accounts: BTreeMap<AccountId, AccountPublic>,
    pub(super) devices: BTreeMap<DeviceId, DeviceCert>,
    pub(super) chats: BTreeMap<ChatId, ChatRecord>,
    pub(super) deltas: BTreeMap<(ChatId, Seq), Delta>,
    pub(super) entries: BTreeMap<(AccountId, Seq), AccountEntry>,
    pub(super) approved: BTreeMap<[u8; 32], ApprovedLink>,
    pub(super) states: BTreeMap<DeviceId, DeviceState>,
    pub(super) settings: BTreeMap<AccountId, AccountSettings>,
    pub(super) recoveries: BTreeMap<[u8; 32], RecoveryRecord>,
    pub(super) gens: BTreeMap<(AccountId, u32), SignedGen>,
    pub(super) usernames: BTreeMap<AccountId, String>,
    pub(super) usage: BTreeMap<AccountId, u64>,
    pub(super) session_ends: BTreeMap<DeviceId, AccountEntry>,
    pub(super) accepted: BTreeMap<(AccountId, AccountId), ()>,
    pub(super) invitations: BTreeMap<(AccountId, AccountId), u64>,
    pub(super) admin: BTreeMap<AccountId, AccountAdmin>,
    pub(super) registration: Registration,
    pub(super) invites: BTreeMap<[u8; 32], u64>,
}

impl Store {
    pub(super) fn apply(&mut self, ops: &[StoreOp]) {
        for op in ops {
            match op.clone() {
                StoreOp::PutAccount(a) => {
                    self.accounts.insert(a.id, a);
                }
                StoreOp::PutDevice(c) => {
                    self.devices.insert(c.body.device.clone(), c);
                }
                StoreOp::PutChat(id, r) => {
                    self.chats.insert(id, r);
                }
                StoreOp::PutDelta(d) => {
                    self.deltas.insert((d.chat, d.seq), d);
                }
                StoreOp::PutAccountEntry(a, e) => {
                    self.entries.insert((a, e.seq), e);
                }
                StoreOp::PutApprovedLink(id, l) => {
                    self.approved.insert(id, l);
                }
                StoreOp::DeleteApprovedLink(id) => {
                    self.approved.remove(&id);
                }
                StoreOp::PutDeviceState(d, s) => {
                    self.states.insert(d, s);
                }
                StoreOp::PutAccountSettings(a, s) => {
                    self.settings.insert(a, s);
                }
                StoreOp::PutRecovery(id, r) => {
                    self.recoveries.insert(id, r);
                }
                StoreOp::DeleteRecovery(id) => {
                    self.recoveries.remove(&id);
                }
                StoreOp::PutAccountGen(g) => {
                    self.gens.insert((g.body.account, g.body.generation), g);
                }
                StoreOp::PutUsername(a, name) => {
                    match name {
                        Some(n) => self.usernames.insert(a, n),
                        None => self.usernames.remove(&a),
                    };
                }
                // The relay never reads a chat's keys back; only the count matters here.
                StoreOp::PutChatKeys(..) => {}
                StoreOp::PutUsage(a, bytes) => {
                    self.usage.insert(a, bytes);
                }
                StoreOp::PutSessionEnd(d, e) => {
                    self.session_ends.insert(d, e);
                }
                StoreOp::PutAccepted(a, b, true) => {
                    self.accepted.insert((a, b), ());
                }
                StoreOp::PutAccepted(a, b, false) => {
                    self.accepted.remove(&(a, b));
                }
                StoreOp::PutInvitation(a, b, Some(at)) => {
                    self.invitations.insert((a, b), at);
                }
                StoreOp::PutInvitation(a, b, None) => {
                    self.invitations.remove(&(a, b));
                }
                StoreOp::PutAccountAdmin(a, r) => {
                    self.admin.insert(a, r);
                }
                StoreOp::PutRegistration(r) => self.registration = r,
                // The target makes no restores: no list to forget.
                StoreOp::ForgetRedoDeletions => {}
                StoreOp::PutInvite(digest, at) => {
                    match at {
                        Some(at) => self.invites.insert(digest, at),
                        None => self.invites.remove(&digest),
                    };
                }
                StoreOp::DeleteDevice(d) => {
                    self.devices.remove(&d);
                    self.states.remove(&d);
                    self.session_ends.remove(&d);
                }
                StoreOp::DeleteChat(c) => {
                    self.chats.remove(&c);
                    self.deltas.retain(|(chat, _), _| *chat != c);
                }
                StoreOp::DeleteAccountData(a) => {
                    self.settings.remove(&a);
                    self.usage.remove(&a);
                    self.entries.retain(|(account, _), _| *account != a);
                }
            }
        }
    }

    pub(super) fn chat_head(&self, chat: ChatId) -> Seq {
        self.deltas.range((chat, Seq(0))..=(chat, Seq(u64::MAX))).next_back().map_or(Seq(0), |(k, _)| k.1)
    }

    pub(super) fn account_head(&self, account: AccountId) -> Seq {
        self.entries.range((account, Seq(0))..=(account, Seq(u64::MAX))).next_back().map_or(Seq(0), |(k, _)| k.1)
    }

    /// What the relay's store would recover after a crash.
    pub(super) fn recover(&self) -> Recovered {
        let mut recent: BTreeMap<DeviceId, Vec<(ClientSeq, ChatId, Seq)>> = BTreeMap::new();
        for d in self.deltas.values() {
            recent.entry(d.device.clone()).or_default().push((d.client_seq, d.chat, d.seq));
        }
        Recovered {
            accounts: self.accounts.values().cloned().collect(),
            devices: self.devices.values().cloned().collect(),
            chats: self.chats.iter().map(|(id, r)| (*id, r.clone(), self.chat_head(*id))).collect(),
            account_heads: self.accounts.keys().map(|a| (*a, self.account_head(*a))).collect(),
            recent_appends: self
                .devices
                .keys()
                .map(|dev| {
                    let mut r = recent.remove(dev).unwrap_or_default();
                    r.sort();
                    let cut = r.len().saturating_sub(DEDUP_WINDOW);
                    (dev.clone(), r.split_off(cut))
                })
                .collect(),
            approved_links: self.approved.iter().map(|(k, v)| (*k, v.clone())).collect(),
            device_states: self.states.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            account_settings: self.settings.iter().map(|(k, v)| (*k, *v)).collect(),
            recoveries: self.recoveries.iter().map(|(k, v)| (*k, v.clone())).collect(),
            account_gens: self.gens.values().cloned().collect(),
            usernames: self.usernames.iter().map(|(k, v)| (*k, v.clone())).collect(),
            usage: self.usage.iter().map(|(k, v)| (*k, *v)).collect(),
            session_ends: self.session_ends.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            accepted: self.accepted.keys().copied().collect(),
            invitations: self.invitations.iter().map(|((a, b), at)| (*a, *b, *at)).collect(),
            account_admin: self.admin.iter().map(|(a, r)| (*a, r.clone())).collect(),
            registration: self.registration,
            invites: self.invites.iter().map(|(d, at)| (*d, *at)).collect(),
            incarnation: Default::default(),
            floors: Default::default(),
            // The target makes no restores.
            redo_deletions: Vec::new(),
        }
    }
}
