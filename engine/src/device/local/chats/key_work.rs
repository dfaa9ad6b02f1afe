//! The requests a device owes for keys, and the state of the one under way: the account's
//! rotation after a session expired, a chat's next epoch after its members changed (with
//! earlier epochs' keys for members added with their history), and chat creations the relay
//! refused as stale, wrapped again to the members' current keys. Other members' current keys
//! are looked up first ([`KeyWork::Lookup`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::{ChatMeta, OutboxBody, OutboxItem};
use crate::proto::cert::AccountGen;
use crate::proto::crypto::{wrap_chat_key, ChatKey};
use crate::proto::directory::{DirectoryEntry, KeyTerms, MAX_LOOKUP_ACCOUNTS, MAX_SHARED_EPOCHS};
use crate::proto::ids::{AccountId, ChatId, ClientSeq, Epoch};
use crate::proto::wire::{ClientFrame, NewEpoch, ReqId, WrappedKey};

/// What this device must send next for the account's or its chats' keys (see
/// [`crate::core::SyncOutput::Rotate`]).
#[derive(Debug)]
pub(crate) enum KeyWork {
    /// This request (a `Rotate` or `Rekey`).
    Send(ClientFrame),
    /// First these accounts' current keys: a `LookupAccounts` with the same req id. Ask again
    /// with the answer.
    Lookup(ClientFrame),
    /// Outbox items made again (a chat creation wrapped to the members' new keys): hand them
    /// to the core like resealed ones.
    Remade(Vec<OutboxItem>),
    /// Nothing is due.
    Nothing,
}

/// The key work under way, and what it waits for.
#[derive(Default)]
pub(in crate::device::local) struct KeyWorkState {
    /// Chats whose creation the relay refused as made with keys a rotation ended, before this
    /// device had the new keys: made again when the rotation arrives.
    stale_creations: BTreeSet<ChatId>,
    /// Other accounts' current keys, looked up for the key work under way.
    fresh: BTreeMap<AccountId, AccountGen>,
    /// The chat and epoch of the last `Rekey` sent (see [`Device::key_work_done`]).
    rekey_sent: Option<(ChatId, Epoch)>,
    /// Chats whose creation the relay refused as stale while this device's keys were current:
    /// another member's keys moved on, and the creation is wrapped again after a lookup.
    relook: BTreeSet<ChatId>,
}

impl Device {
    /// Takes the answer to a `LookupAccounts` made for key work: the accounts' current keys,
    /// used by the next [`Device::key_work`].
    pub(crate) fn take_lookup(&mut self, accounts: &[DirectoryEntry]) -> Result<(), Error> {
        let mut first_error = None;
        for entry in accounts {
            match self.take_chain(&entry.chain) {
                Ok(gen) => {
                    self.key_state.fresh.insert(entry.chain.id(), gen);
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `key` wrapped to each of `members` and signed on `terms`: to this account's current keys,
    /// and to the others' as last looked up (in this key work, or else as last seen).
    pub(crate) fn grant(
        &mut self,
        key: &ChatKey,
        terms: &KeyTerms,
        members: &BTreeSet<AccountId>,
    ) -> Result<Vec<WrappedKey>, Error> {
        let login = self.login()?.clone();
        let mut keys = Vec::with_capacity(members.len());
        for account in members {
            let gen = self.current_gen(*account)?;
            keys.push(login.keys.grant_chat_key(key, terms, &gen, true, &mut self.rng));
        }
        Ok(keys)
    }

    /// An account's current keys: this account's own, or another's as looked up in this key
    /// work, or else as last seen.
    fn current_gen(&self, account: AccountId) -> Result<AccountGen, Error> {
        let login = self.login()?;
        if account == login.account.id {
            return Ok(login.keys.current());
        }
        if let Some(g) = self.key_state.fresh.get(&account) {
            return Ok(g.clone());
        }
        let c = self.store.contact(account)?.ok_or(Error::Untrusted("no keys known for a member"))?;
        Ok(c.chain.verify()?.pop().expect("a chain has its genesis"))
    }

    /// The earlier epochs' keys for the members who join at this epoch: whole to those added
    /// with their history, only the transport key to the others (they can apply the document,
    /// not read its older texts). The newest [`MAX_SHARED_EPOCHS`] epochs this device has.
    fn history_grants(
        &mut self,
        meta: &ChatMeta,
        terms: &KeyTerms,
        joining: &BTreeSet<AccountId>,
        share_with: &BTreeSet<AccountId>,
    ) -> Result<Vec<NewEpoch>, Error> {
        let login = self.login()?.clone();
        let mut epochs: BTreeMap<Epoch, (Option<&ChatKey>, ChatKey)> =
            meta.transport_only.iter().map(|(e, t)| (*e, (None, t.clone()))).collect();
        epochs.extend(meta.keys.iter().map(|(e, k)| (*e, (Some(k), k.transport()))));
        let mut out = Vec::new();
        for (epoch, (whole, transport)) in epochs.iter().rev().take(MAX_SHARED_EPOCHS).rev() {
            let terms = KeyTerms { epoch: *epoch, ..terms.clone() };
            let mut keys = Vec::new();
            for account in joining {
                let gen = self.current_gen(*account)?;
                let key = match whole {
                    Some(k) if share_with.contains(account) => {
                        login.keys.grant_chat_key(k, &terms, &gen, true, &mut self.rng)
                    }
                    _ => {
                        // Wrapped as it is: a transport key (the device may hold no more).
                        let wrapped =
                            wrap_chat_key(transport, terms.chat, *epoch, *account, &gen.kem_key, &mut self.rng);
                        let signature = login.keys.sign_chat_key(&terms, *account, gen.generation, false, &wrapped);
                        WrappedKey {
                            account: *account,
                            generation: gen.generation,
                            content: false,
                            key: wrapped,
                            signature,
                        }
                    }
                };
                keys.push(key);
            }
            out.push(NewEpoch { chat: terms.chat, epoch: *epoch, keys });
        }
        Ok(out)
    }

    /// The relay took the key work sent last (or had none due). A `Rekey` whose chat got no
    /// newer epoch meanwhile was not due on the relay (the account log brings a new epoch before
    /// the answer): the chat is no longer due here either.
    pub(crate) fn key_work_done(&mut self) -> Result<(), Error> {
        self.key_state.fresh.clear();
        let Some((chat, epoch)) = self.key_state.rekey_sent.take() else { return Ok(()) };
        let newest = self.store.chat(chat)?.and_then(|m| m.current().map(|(e, _)| e));
        let mut due = self.store.rekey_due()?;
        if newest == Some(epoch) && due.remove(&chat).is_some() {
            self.store.set_rekey_due(&due)?;
        }
        Ok(())
    }

    /// Whether this device has key work to do: a rotation of the account's keys, or a chat's
    /// next epoch after its members changed.
    pub(crate) fn key_work_due(&self) -> Result<bool, Error> {
        Ok(self.store.rotation_due()? || !self.store.rekey_due()?.is_empty() || !self.key_state.relook.is_empty())
    }

    /// The next request of this device's key work: the account's rotation if one is due, else
    /// the next epoch of a chat whose members changed (with earlier epochs' keys for members
    /// added with their history) — after a lookup of the members' current keys.
    pub(crate) fn key_work(&mut self, req: ReqId) -> Result<KeyWork, Error> {
        self.key_state.rekey_sent = None;
        if self.store.rotation_due()? {
            return Ok(KeyWork::Send(self.rotate_request(req)?));
        }
        let me = self.login()?.account.id;
        while let Some(chat) = self.key_state.relook.first().copied() {
            let items = self.store.outbox_after(ClientSeq(0), usize::MAX)?;
            let create = items.into_iter().find(|i| i.chat == chat && matches!(i.body, OutboxBody::CreateChat { .. }));
            let (Some(create), Some(meta)) = (create, self.store.chat(chat)?) else {
                self.key_state.relook.remove(&chat);
                continue;
            };
            let missing: Vec<AccountId> =
                meta.members.iter().filter(|a| **a != me && !self.key_state.fresh.contains_key(a)).copied().collect();
            if !missing.is_empty() {
                let accounts = missing.into_iter().take(MAX_LOOKUP_ACCOUNTS).collect();
                return Ok(KeyWork::Lookup(ClientFrame::LookupAccounts { req, accounts }));
            }
            self.key_state.relook.remove(&chat);
            let remade = self.rekey_creation(&create)?;
            self.key_state.fresh.clear();
            return Ok(KeyWork::Remade(remade));
        }
        let due = self.store.rekey_due()?;
        let pending = self.pending_chats()?;
        for (chat, want) in due.clone() {
            let Some(meta) = self.store.chat(chat)?.filter(|m| !m.left && m.current().is_some()) else {
                let mut stored = self.store.rekey_due()?;
                stored.remove(&chat);
                self.store.set_rekey_due(&stored)?;
                continue;
            };
            if pending.contains(&chat) {
                // Its creation has not reached the relay yet: rekeyed once it has.
                continue;
            }
            let joining: BTreeSet<AccountId> = want.joining.intersection(&meta.members).copied().collect();
            let missing: Vec<AccountId> =
                meta.members.iter().filter(|a| **a != me && !self.key_state.fresh.contains_key(a)).copied().collect();
            if !missing.is_empty() {
                let accounts = missing.into_iter().take(MAX_LOOKUP_ACCOUNTS).collect();
                return Ok(KeyWork::Lookup(ClientFrame::LookupAccounts { req, accounts }));
            }
            let (newest, _) = meta.current().expect("filtered above");
            let epoch = Epoch(newest.0.checked_add(1).ok_or(Error::Rotation("a chat ran out of key epochs"))?);
            let key = ChatKey::random(&mut self.rng);
            let terms = KeyTerms { chat, kind: meta.kind, epoch, members: meta.members.clone() };
            let keys = self.grant(&key, &terms, &meta.members)?;
            let history = match joining.is_empty() {
                true => Vec::new(),
                false => self.history_grants(&meta, &terms, &joining, &want.share_with)?,
            };
            // The looked-up keys stay for a retry after `RateLimited` (looking them up again
            // would use up the rate again); they go once the relay took it or found it stale.
            self.key_state.rekey_sent = Some((chat, newest));
            return Ok(KeyWork::Send(ClientFrame::Rekey { req, epoch: NewEpoch { chat, epoch, keys }, history }));
        }
        Ok(KeyWork::Nothing)
    }

    /// Forgets the other accounts' keys looked up for the key work under way (it ended, failed,
    /// or was made for keys that moved on).
    pub(crate) fn forget_looked_up(&mut self) {
        self.key_state.fresh.clear();
    }

    /// Whether a chat creation waits to be wrapped again after a lookup of its members' keys.
    pub(crate) fn relook_due(&self) -> bool {
        !self.key_state.relook.is_empty()
    }

    /// Makes an outbox item the relay refused as stale again under this device's newest keys,
    /// and returns what changed (nothing while those keys have not arrived: the account log
    /// brings them, and applying it makes the item again).
    pub(crate) fn remake_stale(&mut self, cs: ClientSeq) -> Result<Vec<OutboxItem>, Error> {
        let Some(item) = self.store.outbox_item(cs)? else { return Ok(Vec::new()) };
        match &item.body {
            OutboxBody::CreateChat { kind, keys } => {
                let current = self.login()?.keys.current();
                let members = keys.iter().map(|k| k.account).collect();
                let terms = KeyTerms { chat: item.chat, kind: *kind, epoch: item.epoch, members };
                let signed_now = keys.iter().all(|k| current.verify_chat_key(&terms, k).is_ok());
                if signed_now {
                    // The relay has a newer generation than this device (wait for it), or another
                    // member's keys moved on (look them up and wrap the key again: key work).
                    self.key_state.stale_creations.insert(item.chat);
                    if keys.len() > 1 {
                        self.key_state.relook.insert(item.chat);
                    }
                    Ok(Vec::new())
                } else {
                    self.rekey_creation(&item)
                }
            }
            OutboxBody::Delta { .. } => self.reseal(item.chat),
        }
    }

    /// Makes the creations the relay refused as stale again, now that new keys are here.
    pub(in crate::device::local) fn rekey_stale_creations(&mut self) -> Result<Vec<OutboxItem>, Error> {
        let mut out = Vec::new();
        for chat in std::mem::take(&mut self.key_state.stale_creations) {
            let items = self.store.outbox_after(ClientSeq(0), usize::MAX)?;
            if let Some(item) = items.iter().find(|i| i.chat == chat && matches!(i.body, OutboxBody::CreateChat { .. }))
            {
                out.extend(self.rekey_creation(item)?);
            }
        }
        Ok(out)
    }

    /// Makes a chat creation the relay refused as stale (so the relay has no such chat) again
    /// under the current generation: the chat key wrapped to the members' current keys and
    /// signed anew. The key itself stays: the texts of the chat's waiting messages are sealed
    /// under it inside their changes, which cannot be made again. (The old wrapping reached only
    /// the relay, which refused it; see docs/crypto.md, "Rotation".) Returns the changed item.
    fn rekey_creation(&mut self, item: &OutboxItem) -> Result<Vec<OutboxItem>, Error> {
        let OutboxBody::CreateChat { kind, .. } = item.body else { return Ok(Vec::new()) };
        let meta = self.store.chat(item.chat)?.ok_or(Error::UnknownChat(item.chat))?;
        let key = meta.keys.get(&item.epoch).cloned().ok_or(Error::UnknownChat(item.chat))?;
        let terms = KeyTerms { chat: item.chat, kind, epoch: item.epoch, members: meta.members.clone() };
        let keys = self.grant(&key, &terms, &meta.members)?;
        let create = OutboxItem { body: OutboxBody::CreateChat { kind, keys }, ..item.clone() };
        self.store.replace_outbox(std::slice::from_ref(&create), None)?;
        Ok(vec![create])
    }
}
