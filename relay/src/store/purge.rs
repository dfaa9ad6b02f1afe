//! Emptying what deletions left in the big trees (see the module docs of `store.rs`): the
//! `purges` entries name ranges (a chat's deltas and keys, a device's dedup index, an
//! account's log) that a sled transaction cannot scan. The relay empties them a chunk at a
//! time when its core says (`core/purge.rs`, [`SledStore::purge_some`]); opening the store,
//! and a backup's copy, empty them at once ([`SledStore::purge`]). Part of the store; split out of `store.rs`
//! for size.

use super::*;

/// What a `purges` entry empties: the first byte of its key, then the range's prefix.
pub(super) const PURGE_DELTAS: u8 = b'd';
pub(super) const PURGE_CHAT_KEYS: u8 = b'k';
pub(super) const PURGE_DEDUP: u8 = b'q';
pub(super) const PURGE_ACCOUNT_LOG: u8 = b'l';

pub(super) fn purge_key(what: u8, prefix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + prefix.len());
    k.push(what);
    k.extend_from_slice(prefix);
    k
}

impl SledStore {
    /// Empties the ranges the `purges` entries name, then the entries. Not atomic, and need
    /// not be: run again, it finishes what a crash left.
    pub(super) fn purge(&self) -> Result<(), StoreError> {
        while self.purge_some(usize::MAX)? {}
        Ok(())
    }

    /// Removes at most `max_keys` keys of the ranges the `purges` entries name, and each entry
    /// whose range is empty; true while entries are left.
    pub(super) fn purge_some(&self, max_keys: usize) -> Result<bool, StoreError> {
        let mut left = max_keys;
        for kv in self.purges.iter() {
            let (key, _) = kv?;
            let Some((what, prefix)) = key.split_first() else { continue };
            let tree = match *what {
                PURGE_DELTAS => &self.deltas,
                PURGE_CHAT_KEYS => &self.chat_keys,
                PURGE_DEDUP => &self.dedup,
                PURGE_ACCOUNT_LOG => &self.account_log,
                _ => return Err(StoreError::Corrupt("purge entry")),
            };
            let mut batch = sled::Batch::default();
            let mut full = false;
            for k in tree.scan_prefix(prefix).keys() {
                if left == 0 {
                    full = true;
                    break;
                }
                batch.remove(k?);
                left -= 1;
            }
            tree.apply_batch(batch)?;
            if full {
                return Ok(true);
            }
            self.purges.remove(&key)?;
        }
        Ok(false)
    }
}
