//! Chats with other accounts: direct chats and groups, member changes, and the chat keys the
//! account log brings for them (see docs/crypto.md, "Members"). The directory of other
//! accounts is the identity's ([`Device::lookup`]); the key epochs a change starts are key work
//! ([`Device::key_work`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::device::error::Error;
use crate::device::local::chats::account_log::Applied;
use crate::device::local::chats::check_text;
use crate::device::local::Device;
use crate::device::store::{ChatMeta, OutboxBody, OutboxItem, RekeyDue};
use crate::proto::cert::AccountGen;
use crate::proto::crypto::{unwrap_chat_key, ChatKey};
use crate::proto::directory::{AccountChain, KeyTerms, MemberChange, MemberChangeBody, Membership};
use crate::proto::ids::{AccountId, ChatId, Epoch};
use crate::proto::wire::{ChatKind, ClientFrame, ReqId, WrappedKey, MAX_CHAT_MEMBERS};

impl Device {
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

    /// The request that changes a chat's members, signed by this account; the chat's next key
    /// epoch follows (a member's device makes it, see `Device::key_work`).
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
}
