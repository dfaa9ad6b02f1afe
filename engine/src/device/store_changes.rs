//! The device store's chat changes as they come: remote deltas applied with their chats'
//! cursors, and local changes with their outbox items, each batch in one atomic write (a
//! session stores what came together at once: sled's per-transaction cost, not the bytes, is
//! what a busy device pays). Part of [`DeviceStore`]; split out of `store.rs` for size.

use super::*;

impl DeviceStore {
    /// Stores a remote change and moves the cursor to `seq`, atomically. `change` is `None` for
    /// a delta that failed to open or apply: the cursor still passes it. Returns the number of
    /// changes now stored after the chat's snapshot.
    pub fn apply_remote(&self, chat: ChatId, seq: Seq, change: Option<&[u8]>) -> Result<u64, StoreError> {
        self.apply_remote_many(chat, &[(seq, change)])
    }

    /// [`DeviceStore::apply_remote`] for several deltas of one chat in order, atomically: the
    /// changes stored and the cursor at the last seq.
    pub fn apply_remote_many(&self, chat: ChatId, deltas: &[RemoteEntry]) -> Result<u64, StoreError> {
        let stored = self.apply_remote_chats(&[(chat, deltas)])?;
        Ok(stored.first().copied().unwrap_or(0))
    }

    /// [`DeviceStore::apply_remote_many`] for several chats in one atomic write (the deltas a
    /// session took from the relay together, whatever their chats). Returns, for each entry in
    /// the order given, its chat's number of changes then stored after its snapshot.
    pub fn apply_remote_chats(&self, chats: &[(ChatId, &[RemoteEntry])]) -> Result<Vec<u64>, StoreError> {
        let mut next = BTreeMap::new();
        for (chat, _) in chats {
            if !next.contains_key(chat) {
                next.insert(*chat, self.next_change_n(*chat)?);
            }
        }
        let mut counts = Vec::with_capacity(chats.len());
        atomic(&[&self.changes, &self.cursors], |b| {
            for (chat, deltas) in chats {
                let n = next.get_mut(chat).expect("every chat numbered above");
                for (_, change) in deltas.iter() {
                    if let Some(c) = change {
                        b.insert(0, change_key(*chat, *n), *c);
                        *n += 1;
                    }
                }
                if let Some((last, _)) = deltas.last() {
                    b.insert(1, chat.0, &last.0.to_be_bytes()[..]);
                }
                counts.push(*n);
            }
        })?;
        self.next_change_cache().extend(next);
        Ok(counts)
    }

    /// Stores a local change with its outbox item, advancing the client seq, atomically; not yet
    /// durable, see [`DeviceStore::barrier`]. Returns the number of changes now stored after the
    /// chat's snapshot.
    pub fn store_local(&self, chat: ChatId, change: &[u8], item: &OutboxItem) -> Result<u64, StoreError> {
        self.store_local_many(&[(chat, change, item)])?;
        self.next_change_n(chat)
    }

    /// [`DeviceStore::store_local`] for several local changes (of any chats, with consecutive
    /// client seqs) in one atomic write, as a batch of the app's writes comes.
    pub fn store_local_many(&self, writes: &[(ChatId, &[u8], &OutboxItem)]) -> Result<(), StoreError> {
        let mut next = BTreeMap::new();
        for (chat, _, _) in writes {
            if !next.contains_key(chat) {
                next.insert(*chat, self.next_change_n(*chat)?);
            }
        }
        atomic(&[&self.changes, &self.outbox, &self.meta], |b| {
            for (chat, change, item) in writes {
                let n = next.get_mut(chat).expect("every chat numbered above");
                b.insert(0, change_key(*chat, *n), *change);
                *n += 1;
                b.insert(1, item.client_seq.0.to_be_bytes(), enc(*item));
            }
            if let Some((_, _, item)) = writes.last() {
                b.insert(2, "next_client_seq", &(item.client_seq.0 + 1).to_be_bytes()[..]);
            }
        })?;
        self.next_change_cache().extend(next);
        Ok(())
    }

    /// The number of changes stored after a chat's snapshot.
    pub fn changes_stored(&self, chat: ChatId) -> Result<u64, StoreError> {
        self.next_change_n(chat)
    }
}
