//! Automerge's sync protocol for a document shared with one peer directly (secret chats), with
//! the same door for outside bytes as [`ChatDoc::apply_untrusted_update`]: every change a sync
//! message carries is checked and applied through it, and Automerge's own sync code sees the
//! message only without its changes (for the heads, needs and bloom filters it keeps in the
//! [`SyncState`]). Part of [`ChatDoc`]; split out of `doc.rs` for size.

use std::collections::BTreeSet;

use automerge::sync::{ChunkList, Message as SyncMessage, MessageVersion, State as SyncState, SyncDoc};
use automerge::{ChangeHash, ReadDoc};

use super::{guarded, Author, ChatDoc, DocError, DocUpdate};

/// Largest sync message accepted from a peer (a secret chat's channel carries payloads of at
/// most 8 MiB).
pub const MAX_SYNC_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Most changes one sync message may carry.
pub const MAX_SYNC_CHANGES: usize = 4096;
/// Most bloom filters ("have"s) one sync message may carry (automerge sends one).
const MAX_HAVES: usize = 16;

/// Whether an encoded bloom filter's parameters are ones Automerge would use (it uses 10 bits
/// per entry and 7 probes): a filter with no bits divides by zero when read, one with billions
/// of probes allocates and loops for each change tested against it.
fn bloom_in_range(bytes: &[u8]) -> bool {
    fn leb(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut b = bytes;
    if b.is_empty() {
        return true;
    }
    match (leb(&mut b), leb(&mut b), leb(&mut b)) {
        (Some(_), Some(bits), Some(probes)) => (1..=32).contains(&bits) && (1..=32).contains(&probes),
        _ => false,
    }
}

impl ChatDoc {
    /// The next sync message for the peer that `state` tracks, if there is anything to say. It
    /// is written in the first version of the format and offers no capabilities, so an honest
    /// peer answers with changes, never a whole document.
    pub fn sync_message(&self, state: &mut SyncState) -> Option<Vec<u8>> {
        // Guarded: it reads the peer's bloom filters (checked in `receive_sync`, but the state
        // is the caller's).
        let mut message = guarded(|| self.doc.generate_sync_message(state)).flatten()?;
        message.need = self.needs(&message.need);
        message.supported_capabilities = None;
        message.version = MessageVersion::V1;
        Some(message.encode())
    }

    /// What to ask the peer for. Automerge asks for the dependencies of the changes waiting in
    /// its own queue, but the changes waiting here are held by [`ChatDoc`] (checked, not yet
    /// applied), which Automerge does not see: without this, a change whose dependency the peer
    /// did not send (its bloom filter of this side's changes gave a false positive for it) waits
    /// for ever, and the two sides stay quiet with different heads. Automerge's own needs stay,
    /// but for changes held here (asking for them again would get nothing: the peer's sync
    /// state has them as sent).
    fn needs(&self, automerge_needs: &[ChangeHash]) -> Vec<ChangeHash> {
        if self.pending.is_empty() {
            return automerge_needs.to_vec();
        }
        let held: BTreeSet<ChangeHash> = self.pending.iter().map(|c| c.hash()).collect();
        let mut need: BTreeSet<ChangeHash> = automerge_needs.iter().filter(|h| !held.contains(h)).copied().collect();
        for change in &self.pending {
            for dep in change.deps() {
                if !held.contains(dep) && self.doc.get_change_by_hash(dep).is_none() {
                    need.insert(*dep);
                }
            }
        }
        need.into_iter().collect()
    }

    /// Applies a sync message from the peer `from`: each change it carries goes through the
    /// checks of [`ChatDoc::apply_untrusted_update`] (a refused change refuses the message; the
    /// changes before it stay applied, as they would arriving one by one), then `state` learns
    /// the peer's heads and needs. Returns what the changes did to the messages.
    pub fn receive_sync(&mut self, state: &mut SyncState, bytes: &[u8], from: &Author) -> Result<DocUpdate, DocError> {
        if bytes.len() > MAX_SYNC_MESSAGE_BYTES {
            return Err(DocError::TooLarge(bytes.len()));
        }
        let mut message = guarded(|| SyncMessage::decode(bytes))
            .ok_or(DocError::Panicked)?
            .map_err(|e| DocError::Malformed(e.to_string()))?;
        if message.changes.len() > MAX_SYNC_CHANGES {
            return Err(DocError::TooManyPending);
        }
        if message.have.len() > MAX_HAVES || !message.have.iter().all(|h| bloom_in_range(&h.bloom.to_bytes())) {
            return Err(DocError::OutOfRange("bloom filter"));
        }
        let changes: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
        let mut update = DocUpdate::default();
        for change in &changes {
            let u = self.apply_untrusted_update(change, from)?;
            update.added.extend(u.added);
            update.changed.extend(u.changed);
            update.read.extend(u.read);
        }
        message.changes = ChunkList::empty();
        // Automerge takes a message without changes whose heads equal ours for an
        // acknowledgement, and stays quiet. Here the changes were applied above: the peer must
        // still hear this side's new heads, or it never learns what both have (its next
        // messages would then summarise every change since).
        let last_sent = state.last_sent_heads.clone();
        let result = guarded(|| self.doc.receive_sync_message(state, message));
        if !changes.is_empty() {
            state.last_sent_heads = last_sent;
        }
        match result {
            None => {
                self.poisoned = true;
                Err(DocError::Panicked)
            }
            Some(Err(e)) => Err(DocError::Malformed(e.to_string())),
            Some(Ok(())) => Ok(update),
        }
    }
}
