//! Key rotation: the revoking device makes the account's next generation of keys and a new key
//! epoch in every chat; every device takes them from the account log and seals what waits in
//! its outbox again under them (see docs/crypto.md, "Rotation"). Part of [`Device`]; split out
//! of `local.rs` for size.

use std::collections::BTreeSet;

use super::*;
use crate::proto::cert::Rotation;
use crate::proto::directory::KeyTerms;
use crate::proto::ids::ClientSeq;

/// What applying an account log entry changed that the sync core must hear of.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Applied {
    /// A chat that got a key: readable from now on (again, if deltas of the new epoch waited).
    pub chat: Option<ChatId>,
    /// The chat is new on this device.
    pub new_chat: bool,
    /// Outbox items sealed again under new keys (same client seqs).
    pub resealed: Vec<OutboxItem>,
    /// Key work became due from this device (`Some(true)`: a session expired, or a chat's
    /// members changed) or the account's keys were rotated (`Some(false)`).
    pub rotation_due: Option<bool>,
    /// This account is no longer a member of the chat.
    pub left: Option<ChatId>,
}

impl Device {
    /// The generation of the account's keys the account log has reached at its cursor.
    pub(crate) fn log_gen(&self) -> Result<AccountGen, Error> {
        match self.store.account_gen()? {
            Some(g) => Ok(g),
            None => Ok(self.login()?.account.genesis()),
        }
    }

    /// Chats whose creation still waits in the outbox.
    pub(super) fn pending_chats(&self) -> Result<BTreeSet<ChatId>, Error> {
        Ok(self
            .store
            .outbox_after(ClientSeq(0), usize::MAX)?
            .into_iter()
            .filter(|i| matches!(i.body, OutboxBody::CreateChat { .. }))
            .map(|i| i.chat)
            .collect())
    }

    /// Applies a rotation from the account log: checks it against the generation the log has
    /// reached, takes this device's new bundle (only if its keys are the signed ones and it
    /// keeps every past generation this device has), and makes the chat creations the relay
    /// refused as stale again under the new keys. (A creation the relay took before the rotation
    /// is not made again: the rotation gave that chat a new epoch, which reseals its deltas.) The log's generation moves on even when the bundle
    /// cannot be taken: the chain of signatures holds, and later entries are checked against it.
    pub(super) fn apply_rotation(
        &mut self,
        rotation: &Rotation,
        gen: &AccountGen,
        next_gen: &mut Option<AccountGen>,
    ) -> Result<Applied, Error> {
        let next = gen.verify_rotation(rotation)?;
        let result = self.take_bundle(rotation, &next);
        *next_gen = Some(next.clone());
        self.store.set_rotation_due(false)?;
        // The chats with other members are due their next epoch from this account's devices
        // (the relay stores nothing more in them until one comes).
        let me = gen.account;
        let mut due = self.store.rekey_due()?;
        for (chat, meta, _) in self.store.chats()? {
            if !meta.left && meta.members.len() > 1 && meta.members.contains(&me) {
                due.entry(chat).or_default();
            }
        }
        self.store.set_rekey_due(&due)?;
        let rekey = !due.is_empty();
        result.map(|applied| Applied { rotation_due: Some(rekey), ..applied })
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
                    self.stale_creations.insert(item.chat);
                    if keys.len() > 1 {
                        self.relook.insert(item.chat);
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
    pub(super) fn rekey_stale_creations(&mut self) -> Result<Vec<OutboxItem>, Error> {
        let mut out = Vec::new();
        for chat in std::mem::take(&mut self.stale_creations) {
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
    pub(super) fn rekey_creation(&mut self, item: &OutboxItem) -> Result<Vec<OutboxItem>, Error> {
        let OutboxBody::CreateChat { kind, .. } = item.body else { return Ok(Vec::new()) };
        let meta = self.store.chat(item.chat)?.ok_or(Error::UnknownChat(item.chat))?;
        let key = meta.keys.get(&item.epoch).cloned().ok_or(Error::UnknownChat(item.chat))?;
        let terms = KeyTerms { chat: item.chat, kind, epoch: item.epoch, members: meta.members.clone() };
        let keys = self.grant(&key, &terms, &meta.members)?;
        let create = OutboxItem { body: OutboxBody::CreateChat { kind, keys }, ..item.clone() };
        self.store.replace_outbox(std::slice::from_ref(&create), None)?;
        Ok(vec![create])
    }

    /// Seals the outbox deltas of `chat` that are under an older epoch again under its newest.
    pub(crate) fn reseal(&mut self, chat: ChatId) -> Result<Vec<OutboxItem>, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let items = self.store.outbox_after(ClientSeq(0), usize::MAX)?;
        let changed = self.sealed_again(chat, &meta, &items);
        if !changed.is_empty() {
            self.store.replace_outbox(&changed, None)?;
        }
        Ok(changed)
    }

    /// `items`' deltas of `chat` under an older epoch, sealed under the chat's newest key.
    fn sealed_again(&mut self, chat: ChatId, meta: &ChatMeta, items: &[OutboxItem]) -> Vec<OutboxItem> {
        let (Some((epoch, key)), Some(account)) = (meta.current(), self.account()) else { return Vec::new() };
        let key = key.transport();
        let mut out = Vec::new();
        for item in items.iter().filter(|i| i.chat == chat && i.epoch < epoch) {
            let OutboxBody::Delta { plain, .. } = &item.body else { continue };
            let ad = DeltaAd { chat, epoch, device: self.identity.id(), account, client_seq: item.client_seq };
            let sealed = seal_delta(&key, &ad, plain, &mut self.rng);
            out.push(OutboxItem { epoch, body: OutboxBody::Delta { sealed, plain: plain.clone() }, ..item.clone() });
        }
        out
    }
}
