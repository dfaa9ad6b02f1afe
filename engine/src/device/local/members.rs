//! Chats with other accounts: the directory (usernames, other accounts' keys pinned on first
//! use, safety numbers), direct chats and groups, member changes, and the key epochs they start
//! (see docs/crypto.md, "Members"). Part of [`Device`]; split out of `local.rs` for size.

use std::collections::BTreeSet;

use super::*;
use crate::device::store::RekeyDue;
use crate::proto::crypto::wrap_chat_key;
use crate::proto::directory::{
    AccountChain, DirectoryEntry, KeyTerms, MemberChange, MemberChangeBody, Membership, MAX_LOOKUP_ACCOUNTS,
    MAX_SHARED_EPOCHS,
};
use crate::proto::wire::{NewEpoch, MAX_CHAT_MEMBERS};

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

impl Device {
    /// Takes the answer to a `LookupAccounts` made for key work: the accounts' current keys,
    /// used by the next [`Device::key_work`].
    pub(crate) fn take_lookup(&mut self, accounts: &[DirectoryEntry]) -> Result<(), Error> {
        let mut first_error = None;
        for entry in accounts {
            match self.take_chain(&entry.chain) {
                Ok(gen) => {
                    self.fresh.insert(entry.chain.id(), gen);
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    // ---- chats with other accounts ----

    /// Creates a direct chat (`others` is one account) or a group locally, its first key
    /// wrapped to each member's keys as this device last looked them up; queued like
    /// [`Device::new_chat`].
    pub fn new_chat_with(
        &mut self,
        kind: ChatKind,
        title: &str,
        others: &[AccountId],
    ) -> Result<(ChatId, Vec<OutboxItem>), Error> {
        check_text(title)?;
        let me = self.login()?.account.id;
        let members: BTreeSet<AccountId> = others.iter().copied().chain([me]).collect();
        let fits = match kind {
            ChatKind::Notes => members.len() == 1,
            ChatKind::Direct => members.len() == 2,
            ChatKind::Group => members.len() <= MAX_CHAT_MEMBERS,
        };
        if !fits || members.len() != others.len() + 1 {
            return Err(Error::Untrusted("a notes chat has no other member, a direct chat one, a group at most 1023"));
        }
        let chat = ChatId::random(&mut self.rng);
        let epoch = Epoch(0);
        let key = ChatKey::random(&mut self.rng);
        let terms = KeyTerms { chat, kind, epoch, members: members.clone() };
        let keys = self.grant(&key, &terms, &members)?;
        let meta = ChatMeta {
            kind,
            keys: BTreeMap::from([(epoch, key)]),
            transport_only: BTreeMap::new(),
            members,
            left: false,
            changes: 0,
        };
        let create = OutboxItem {
            client_seq: self.store.next_client_seq()?,
            chat,
            epoch,
            body: OutboxBody::CreateChat { kind, keys },
        };
        self.store.create_chat(chat, &meta, &create)?;
        let now = self.now_ms();
        let change = self.doc(chat)?.set_title(title, now);
        let title = self.seal_and_store(chat, &change)?;
        Ok((chat, vec![create, title]))
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
        if let Some(g) = self.fresh.get(&account) {
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

    /// The request that changes a chat's members, signed by this account; the chat's next key
    /// epoch follows (a member's device makes it, see [`Device::key_work`]).
    pub fn member_change_request(
        &mut self,
        chat: ChatId,
        change: Membership,
        req: ReqId,
    ) -> Result<ClientFrame, Error> {
        let login = self.login()?.clone();
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        if meta.left {
            return Err(Error::NotMember(chat));
        }
        let base_epoch = meta.current().map(|(e, _)| e).unwrap_or_default();
        let body = MemberChangeBody { chat, base_epoch, seq: meta.changes, by: login.account.id, change };
        Ok(ClientFrame::ChangeMembers { req, change: login.keys.sign_member_change(body) })
    }

    /// Changes a chat's members on the relay (sync first, so that the change is made for the
    /// chat's newest epoch).
    pub async fn change_members(&mut self, chat: ChatId, change: Membership) -> Result<(), Error> {
        let request = self.member_change_request(chat, change, 1)?;
        self.one_request(request, 1).await?;
        Ok(())
    }

    /// Applies a chat key from the account log: signed by this account (checked against the
    /// generation the log has reached) or by a member whose keys come with it; wrapped to the
    /// generation of this account's keys the log has reached. A key for a newer epoch than this
    /// device has sets the chat's members (the signature covers them) and reseals the outbox.
    pub(super) fn apply_chat_key(
        &mut self,
        terms: &KeyTerms,
        key: &WrappedKey,
        signer: AccountId,
        signer_chain: Option<&AccountChain>,
        gen: &AccountGen,
    ) -> Result<Applied, Error> {
        let login = self.login()?.clone();
        let me = login.account.id;
        let chat = terms.chat;
        let known = self.store.chat(chat)?;
        if key.account != me {
            return Err(Error::Cert(crate::proto::cert::CertError::WrongAccount));
        }
        let signer_gen = if signer == me {
            gen.clone()
        } else {
            // A notes chat takes keys from this account only; a key the relay wrapped would let
            // it read and forge the chat.
            let chain = signer_chain.filter(|c| c.id() == signer && terms.kind != ChatKind::Notes);
            let chain = chain.ok_or(Error::Untrusted("a chat key from another account without its keys"))?;
            // Handed out by a member: of the epoch it names, and of the chat as this device
            // knows it (also one it left: only a member of it then may bring it back).
            if !terms.members.contains(&signer) || known.as_ref().is_some_and(|m| !m.members.contains(&signer)) {
                return Err(Error::Untrusted("a chat key from an account that is not a member"));
            }
            self.take_chain(chain)?
        };
        signer_gen.verify_chat_key(terms, key)?;
        // The bundle must hold this generation's KEM secret, and it must be the generation the
        // log has reached (a bundle that disagrees with the log unwraps nothing).
        let kem = match login.keys.kem_secret_of(gen.generation) {
            Some(k)
                if key.generation == gen.generation && login.keys.generation(gen.generation).as_ref() == Some(gen) =>
            {
                k
            }
            _ => return Err(Error::Rotation("this device has no keys of the generation the chat key is wrapped in")),
        };
        let chat_key = unwrap_chat_key(&key.key, chat, terms.epoch, me, &kem)?;
        let new_chat = known.is_none();
        let mut meta = known.unwrap_or(ChatMeta {
            kind: terms.kind,
            keys: BTreeMap::new(),
            transport_only: BTreeMap::new(),
            members: terms.members.clone(),
            left: false,
            changes: 0,
        });
        if meta.kind != terms.kind {
            return Err(Error::Untrusted("a chat key for another kind of chat"));
        }
        // An epoch's key never changes: a second, different key for it (even one the account
        // signed, e.g. with keys a revoked device still holds) is refused.
        let transport = if key.content { chat_key.transport() } else { chat_key.clone() };
        if meta.transport(terms.epoch).is_some_and(|t| t.0 != transport.0) {
            return Err(Error::Rotation("a chat key for an epoch that already has another"));
        }
        if !key.content {
            // An earlier epoch's transport key, for a member who joined without the history.
            if !meta.keys.contains_key(&terms.epoch) {
                meta.transport_only.insert(terms.epoch, chat_key);
            }
            self.store.put_chat(chat, &meta)?;
            return Ok(Applied { chat: Some(chat), new_chat, ..Applied::default() });
        }
        let newer = meta.current().is_none_or(|(e, _)| terms.epoch > e);
        meta.transport_only.remove(&terms.epoch);
        meta.keys.insert(terms.epoch, chat_key);
        if newer {
            meta.members = terms.members.clone();
            meta.left = false;
            meta.changes = 0;
            let mut due = self.store.rekey_due()?;
            if due.remove(&chat).is_some() {
                self.store.set_rekey_due(&due)?;
            }
        }
        self.store.put_chat(chat, &meta)?;
        // A new epoch after a rotation or member change: what waits in the outbox goes out
        // under it.
        let resealed = if newer && terms.epoch.0 > 0 { self.reseal(chat)? } else { Vec::new() };
        Ok(Applied { chat: Some(chat), new_chat, resealed, ..Applied::default() })
    }

    /// Applies a member change from the account log: checked against its maker's keys, taken
    /// only for the epoch it was made in and from a member. If this account is gone from the
    /// chat, the chat is marked left; otherwise the chat's next epoch is due from this device.
    pub(super) fn apply_member_change(
        &mut self,
        change: &MemberChange,
        by_chain: Option<&AccountChain>,
        gen: &AccountGen,
    ) -> Result<Applied, Error> {
        let me = self.login()?.account.id;
        let b = &change.body;
        let by_gen = if b.by == me {
            gen.clone()
        } else {
            let chain = by_chain.filter(|c| c.id() == b.by);
            self.take_chain(chain.ok_or(Error::Untrusted("a member change from another account without its keys"))?)?
        };
        by_gen.verify_member_change(change)?;
        // Added to a chat this device does not have yet: its key comes with the next epoch.
        let Some(mut meta) = self.store.chat(b.chat)?.filter(|m| !m.left) else { return Ok(Applied::default()) };
        // The change this chat took last, applied again: a crash took back the account cursor
        // that passed it (the chat's record and what is due were written together with it, so
        // they are there). Nothing more to do but what it asked of the key work.
        let in_place = meta.current().map(|(e, _)| e) == Some(b.base_epoch);
        if in_place && b.seq + 1 == meta.changes && b.apply(&meta.members) == meta.members {
            return Ok(Applied { rotation_due: Some(true), ..Applied::default() });
        }
        // Taken only in its place: for the chat's newest epoch, after as many changes in it as
        // it says (an old change cannot be replayed).
        if !in_place || b.seq != meta.changes {
            return Err(Error::Untrusted("a member change made for another state of the chat"));
        }
        if !meta.members.contains(&b.by) {
            return Err(Error::Untrusted("a member change by an account that is not a member"));
        }
        let fits = match &b.change {
            Membership::Add { accounts, .. } => accounts.iter().all(|a| !meta.members.contains(a)),
            Membership::Remove { account } => meta.members.contains(account) && *account != b.by,
            Membership::Leave => true,
        };
        if !fits || (meta.kind != ChatKind::Group && !matches!(b.change, Membership::Leave)) {
            return Err(Error::Untrusted("a member change that does not fit the chat"));
        }
        meta.changes += 1;
        meta.members = b.apply(&meta.members);
        let mut due = self.store.rekey_due()?;
        let applied = if b.departed() == Some(me) {
            meta.left = true;
            due.remove(&b.chat);
            Applied { left: Some(b.chat), ..Applied::default() }
        } else {
            let entry = due.entry(b.chat).or_insert_with(RekeyDue::default);
            if let Membership::Add { accounts, share_history } = &b.change {
                entry.joining.extend(accounts.iter().copied());
                if *share_history {
                    entry.share_with.extend(accounts.iter().copied());
                }
            }
            Applied { rotation_due: Some(true), ..Applied::default() }
        };
        self.store.put_chat_and_rekey_due(b.chat, &meta, &due)?;
        Ok(applied)
    }

    /// The relay took the key work sent last (or had none due). A `Rekey` whose chat got no
    /// newer epoch meanwhile was not due on the relay (the account log brings a new epoch before
    /// the answer): the chat is no longer due here either.
    pub(crate) fn key_work_done(&mut self) -> Result<(), Error> {
        self.fresh.clear();
        let Some((chat, epoch)) = self.rekey_sent.take() else { return Ok(()) };
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
        Ok(self.store.rotation_due()? || !self.store.rekey_due()?.is_empty() || !self.relook.is_empty())
    }

    /// The next request of this device's key work: the account's rotation if one is due, else
    /// the next epoch of a chat whose members changed (with earlier epochs' keys for members
    /// added with their history) — after a lookup of the members' current keys.
    pub(crate) fn key_work(&mut self, req: ReqId) -> Result<KeyWork, Error> {
        self.rekey_sent = None;
        if self.store.rotation_due()? {
            return Ok(KeyWork::Send(self.rotate_request(req)?));
        }
        let me = self.login()?.account.id;
        while let Some(chat) = self.relook.first().copied() {
            let items = self.store.outbox_after(crate::proto::ids::ClientSeq(0), usize::MAX)?;
            let create = items.into_iter().find(|i| i.chat == chat && matches!(i.body, OutboxBody::CreateChat { .. }));
            let (Some(create), Some(meta)) = (create, self.store.chat(chat)?) else {
                self.relook.remove(&chat);
                continue;
            };
            let missing: Vec<AccountId> =
                meta.members.iter().filter(|a| **a != me && !self.fresh.contains_key(a)).copied().collect();
            if !missing.is_empty() {
                let accounts = missing.into_iter().take(MAX_LOOKUP_ACCOUNTS).collect();
                return Ok(KeyWork::Lookup(ClientFrame::LookupAccounts { req, accounts }));
            }
            self.relook.remove(&chat);
            let remade = self.rekey_creation(&create)?;
            self.fresh.clear();
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
                meta.members.iter().filter(|a| **a != me && !self.fresh.contains_key(a)).copied().collect();
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
            self.rekey_sent = Some((chat, newest));
            return Ok(KeyWork::Send(ClientFrame::Rekey { req, epoch: NewEpoch { chat, epoch, keys }, history }));
        }
        Ok(KeyWork::Nothing)
    }
}
