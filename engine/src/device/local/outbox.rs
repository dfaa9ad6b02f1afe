//! The outbox (the outbox concern): local changes sealed under their chat's current key into
//! durable outbox items, and sealed again under a chat's newest key after a rotation or a
//! member change (same client seqs). Sending them is the sync core's job.

use std::collections::{BTreeMap, BTreeSet};

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::{ChatMeta, OutboxBody, OutboxItem};
use crate::proto::crypto::{seal_delta, DeltaAd};
use crate::proto::ids::{ChatId, ClientSeq};

/// Local changes sealed and not yet stored: [`Device::seal_and_stage`] adds to it,
/// [`Device::store_writes`] stores them all in one write.
#[derive(Default)]
pub(crate) struct LocalWrites {
    /// Each change with its chat and outbox item, in client-seq order.
    items: Vec<(ChatId, Vec<u8>, OutboxItem)>,
    /// The client seq the next one gets (read from the store for the first).
    next_client_seq: Option<ClientSeq>,
    /// Each chat's number of changes after its snapshot once these are stored.
    stored: BTreeMap<ChatId, u64>,
}

impl Device {
    /// Number of sealed deltas waiting for the relay.
    pub fn outbox_len(&self) -> usize {
        self.store.outbox_len()
    }

    /// Seals `change` of `chat` into an outbox item and stores both durably.
    pub(super) fn seal_and_store(&mut self, chat: ChatId, change: &[u8]) -> Result<OutboxItem, Error> {
        let mut writes = LocalWrites::default();
        let (item, stored) = self.seal_and_stage(chat, change, &mut writes)?;
        self.store_writes(&mut writes)?;
        self.store.barrier()?;
        self.maybe_compact(chat, stored)?;
        Ok(item)
    }

    /// Seals `change` of `chat` into an outbox item and adds both to `writes`, to be stored with
    /// the others in one write ([`Device::store_writes`]), and made durable by a barrier before
    /// the item goes anywhere; then [`Device::maybe_compact`] with the returned count of
    /// changes stored after the chat's snapshot.
    pub(super) fn seal_and_stage(
        &mut self,
        chat: ChatId,
        change: &[u8],
        writes: &mut LocalWrites,
    ) -> Result<(OutboxItem, u64), Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let (epoch, key) = meta.current().ok_or(Error::UnknownChat(chat))?;
        let client_seq = match writes.next_client_seq {
            Some(cs) => cs,
            None => self.store.next_client_seq()?,
        };
        let stored = match writes.stored.get(&chat) {
            Some(n) => *n,
            None => self.store.changes_stored(chat)?,
        } + 1;
        let ad = DeltaAd { chat, epoch, device: self.identity.id(), account: self.login()?.account.id, client_seq };
        let sealed = seal_delta(&key.transport(), &ad, change, &mut self.rng);
        let item = OutboxItem { client_seq, chat, epoch, body: OutboxBody::Delta { sealed, plain: change.to_vec() } };
        writes.next_client_seq = Some(ClientSeq(client_seq.0 + 1));
        writes.stored.insert(chat, stored);
        writes.items.push((chat, change.to_vec(), item.clone()));
        Ok((item, stored))
    }

    /// Stores what [`Device::seal_and_stage`] added to `writes`, in one write (not yet
    /// durable). On failure nothing of it is stored, and the documents it changed (ahead of the
    /// store) are dropped, to be read again from the store.
    pub(crate) fn store_writes(&mut self, writes: &mut LocalWrites) -> Result<(), Error> {
        let LocalWrites { items, .. } = std::mem::take(writes);
        let refs: Vec<(ChatId, &[u8], &OutboxItem)> = items.iter().map(|(c, ch, i)| (*c, &ch[..], i)).collect();
        if refs.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.store_local_many(&refs) {
            for (chat, _, _) in &items {
                self.drop_doc(*chat);
            }
            return Err(e.into());
        }
        Ok(())
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
