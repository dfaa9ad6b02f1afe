//! The device store's chat changes as they come: remote deltas applied with their chats'
//! cursors (changes first, cursors last), and local changes with their outbox items in one
//! atomic write; a session stores what came together at once. Part of [`DeviceStore`]; split
//! out of `store.rs` for size.

use super::*;

impl DeviceStore {
    /// Stores remote changes of several chats and moves each chat's cursor to its last seq
    /// (the deltas a session took from the relay together, whatever their chats), every change
    /// before any cursor: a crash keeps a prefix of it (see the comment inside); an entry whose
    /// change is `None` (a delta that failed to open or apply, or one already stored) only
    /// moves the cursor past it. Returns, for each entry in the order given, its chat's number
    /// of changes then stored after its snapshot.
    pub fn apply_remote_chats(&self, chats: &[(ChatId, &[RemoteEntry])]) -> Result<Vec<u64>, StoreError> {
        let mut next = BTreeMap::new();
        for (chat, _) in chats {
            if !next.contains_key(chat) {
                next.insert(*chat, self.next_change_n(*chat)?);
            }
        }
        let mut counts = Vec::with_capacity(chats.len());
        let mut cursors = BTreeMap::new();
        // Every change before any cursor, as plain writes: a crash keeps a prefix, so a cursor
        // that survives has all its chat's changes before it, and changes kept without their
        // cursor come again from the relay and are passed over as known (`stage_deltas`).
        let written = in_order(&[&self.changes, &self.cursors], |b| {
            for (chat, deltas) in chats {
                let n = next.get_mut(chat).expect("every chat numbered above");
                for (_, change) in deltas.iter() {
                    if let Some(c) = change {
                        b.insert(0, change_key(*chat, *n), *c);
                        *n += 1;
                    }
                }
                if let Some((last, _)) = deltas.last() {
                    cursors.insert(*chat, *last);
                }
                counts.push(*n);
            }
            for (chat, last) in cursors {
                b.insert(1, chat.0, &last.0.to_be_bytes()[..]);
            }
        });
        if written.is_err() {
            // Some of the changes may be stored: their chats are numbered again from the store,
            // so that the next changes do not overwrite them.
            let mut cache = self.next_change_cache();
            for (chat, _) in chats {
                cache.remove(chat);
            }
        }
        written?;
        self.next_change_cache().extend(next);
        Ok(counts)
    }

    /// Stores local changes (of any chats, with consecutive client seqs) with their outbox
    /// items, advancing the client seq, in one atomic write, as a batch of the app's writes
    /// comes; not yet durable, see [`DeviceStore::barrier`].
    pub fn store_local_many(&self, writes: &[(ChatId, &[u8], &OutboxItem)]) -> Result<(), StoreError> {
        let mut next = BTreeMap::new();
        for (chat, _, _) in writes {
            if !next.contains_key(chat) {
                next.insert(*chat, self.next_change_n(*chat)?);
            }
        }
        self.journal.atomic(&[&self.changes, &self.outbox, &self.meta], |b| {
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
