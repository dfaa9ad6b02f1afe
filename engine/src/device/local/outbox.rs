//! The outbox (the outbox concern): local changes sealed under their chat's current key into
//! durable outbox items, and sealed again under a chat's newest key after a rotation or a
//! member change (same client seqs). Sending them is the sync core's job.

use std::collections::BTreeSet;

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::{ChatMeta, OutboxBody, OutboxItem};
use crate::proto::crypto::{seal_delta, DeltaAd};
use crate::proto::ids::{ChatId, ClientSeq};

impl Device {
    /// Number of sealed deltas waiting for the relay.
    pub fn outbox_len(&self) -> usize {
        self.store.outbox_len()
    }

    /// Seals `change` of `chat` into an outbox item and stores both durably.
    pub(super) fn seal_and_store(&mut self, chat: ChatId, change: &[u8]) -> Result<OutboxItem, Error> {
        let (item, stored) = self.seal_and_stage(chat, change)?;
        self.store.barrier()?;
        self.maybe_compact(chat, stored)?;
        Ok(item)
    }

    /// Seals `change` of `chat` into an outbox item and stores both, not yet durably: the caller
    /// makes a barrier before the item goes anywhere, then [`Device::maybe_compact`] with the
    /// returned count of changes stored after the chat's snapshot.
    pub(super) fn seal_and_stage(&mut self, chat: ChatId, change: &[u8]) -> Result<(OutboxItem, u64), Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let (epoch, key) = meta.current().ok_or(Error::UnknownChat(chat))?;
        let client_seq = self.store.next_client_seq()?;
        let ad = DeltaAd { chat, epoch, device: self.identity.id(), account: self.login()?.account.id, client_seq };
        let sealed = seal_delta(&key.transport(), &ad, change, &mut self.rng);
        let item = OutboxItem { client_seq, chat, epoch, body: OutboxBody::Delta { sealed, plain: change.to_vec() } };
        let stored = self.store.store_local(chat, change, &item)?;
        Ok((item, stored))
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
