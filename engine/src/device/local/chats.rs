//! The cloud chats on this device (the chats concern): the chat documents in memory
//! ([`ChatDocs`]), listing them, creating one, and applying what the relay delivers to them.
//!
//! The children: [`messages`] (what a user does to a chat's messages), [`members`] (direct
//! chats and groups, member changes and the chat keys they bring), [`account_log`] (applying
//! the account log's entries) and [`key_work`] (the requests a device owes for keys: the
//! account's rotation, a chat's next epoch, creations wrapped again).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::device::doc::{Author, ChatDoc, DocUpdate};
use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::{DeviceStore, OutboxItem, RemoteEntry, COMPACT_AFTER_CHANGES};
use crate::proto::ids::{ChatId, DeviceId, Seq};
use crate::proto::wire::{ChatKind, Delta};

mod account_log;
mod key_work;
mod members;
mod messages;

pub(crate) use account_log::Applied;
pub(crate) use key_work::KeyWork;
pub(super) use key_work::KeyWorkState;
pub(super) use messages::check_text;
pub use messages::MessageOp;

/// Most chat documents kept in memory; beyond it the least recently opened is dropped (it
/// reloads from the store when needed).
pub(crate) const DOC_CACHE: usize = 64;

/// A chat as listed to users (also as the device daemon's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSummary {
    /// Its id.
    pub id: String,
    /// Title, if set.
    pub title: Option<String>,
    /// Kind.
    pub kind: String,
    /// Number of messages.
    pub messages: usize,
    /// Last applied seq from the relay.
    pub seq: u64,
    /// Messages of other accounts after this account's read mark.
    pub unread: usize,
    /// The other member accounts: by username where this device pinned one, else by id.
    pub members: Vec<String>,
    /// This account is no longer a member.
    pub left: bool,
}

/// The chat documents in memory: at most [`DOC_CACHE`]; beyond it the least recently used is
/// dropped (it reloads from the store when needed).
#[derive(Default)]
pub(super) struct ChatDocs {
    docs: BTreeMap<ChatId, ChatDoc>,
    order: Vec<ChatId>,
}

impl ChatDocs {
    /// A chat's document, loaded from `store` on first use.
    fn get(&mut self, store: &DeviceStore, me: &DeviceId, chat: ChatId) -> Result<&mut ChatDoc, Error> {
        if !self.docs.contains_key(&chat) {
            if store.chat(chat)?.is_none() {
                return Err(Error::UnknownChat(chat));
            }
            let (snap, changes) = store.doc_parts(chat)?;
            let doc = ChatDoc::load(chat, me, snap.as_deref(), &changes, &store.authors(chat)?)?;
            if self.docs.len() >= DOC_CACHE {
                let evict = self.order.remove(0);
                self.docs.remove(&evict);
            }
            self.docs.insert(chat, doc);
            self.order.push(chat);
        } else if self.order.last() != Some(&chat) {
            // Used again: last to go (at most DOC_CACHE entries to move).
            self.order.retain(|c| *c != chat);
            self.order.push(chat);
        }
        Ok(self.docs.get_mut(&chat).expect("inserted above"))
    }

    fn forget(&mut self, chat: ChatId) {
        self.docs.remove(&chat);
        self.order.retain(|c| *c != chat);
    }

    /// Drops every document (the account's data is being deleted).
    pub(super) fn clear(&mut self) {
        self.docs.clear();
        self.order.clear();
    }
}

impl Device {
    pub(crate) fn doc(&mut self, chat: ChatId) -> Result<&mut ChatDoc, Error> {
        self.docs.get(&self.store, self.identity.id(), chat)
    }

    pub(crate) fn drop_doc(&mut self, chat: ChatId) {
        self.docs.forget(chat);
    }

    /// Rewrites the chat's snapshot once `stored` changes pile up after it ([`compact_after`]).
    pub(crate) fn maybe_compact(&mut self, chat: ChatId, stored: u64) -> Result<(), Error> {
        if stored >= compact_after(chat) {
            let doc = self.doc(chat)?;
            let (snap, pending) = (doc.save(), doc.pending_changes());
            self.store.compact(chat, &snap, &pending)?;
        }
        Ok(())
    }

    /// Every chat on this device.
    pub fn chats(&mut self) -> Result<Vec<ChatSummary>, Error> {
        let mut out = Vec::new();
        let account = self.account();
        for (chat, meta, seq) in self.store.chats()? {
            let mut members = Vec::new();
            for m in meta.members.iter().filter(|m| Some(**m) != account) {
                let name = self.store.contact(*m)?.and_then(|c| c.username);
                members.push(name.unwrap_or_else(|| m.to_string()));
            }
            // Counted over what this device may read (a member who joined without the history
            // does not see the older messages).
            let visible = self.messages(chat)?;
            let doc = self.doc(chat)?;
            let unread = match account {
                Some(a) => {
                    let mark = doc.read_up_to(&a);
                    let from = mark.and_then(|id| visible.iter().position(|m| m.id == id)).map_or(0, |i| i + 1);
                    let me = a.to_string();
                    visible[from..].iter().filter(|m| m.author != me && !m.deleted).count()
                }
                None => 0,
            };
            out.push(ChatSummary {
                members,
                left: meta.left,
                unread,
                id: chat.to_string(),
                title: doc.title(),
                kind: format!("{:?}", meta.kind).to_lowercase(),
                messages: visible.len(),
                seq: seq.0,
            });
        }
        Ok(out)
    }

    /// A chat's document heads (equal heads: equal chat).
    pub fn heads(&mut self, chat: ChatId) -> Result<Vec<String>, Error> {
        Ok(self.doc(chat)?.heads())
    }

    /// The last seq of `chat` this device applied (or passed).
    pub fn cursor(&self, chat: ChatId) -> Result<Seq, Error> {
        Ok(self.store.cursor(chat)?)
    }

    /// Creates a notes chat (this account alone) locally: key, genesis document, and two outbox
    /// items, durable before it returns: the chat's creation on the relay and its title delta.
    /// Give both to the sync core in order, with [`crate::core::SyncInput::ChatReady`] at seq 0
    /// ([`Device::create_chat`] does all of it); the creation is retried like any outbox item
    /// until the relay has it. (See [`Device::new_chat_with`] for direct chats and groups.)
    pub fn new_chat(&mut self, title: &str) -> Result<(ChatId, Vec<OutboxItem>), Error> {
        self.new_chat_with(ChatKind::Notes, title, &[])
    }

    /// Opens and applies deltas of one chat from the relay to its document, in order, and
    /// stages them in `staged` for one store write with the other chats' deltas that came
    /// together ([`Device::store_staged`]: until then nothing of them is stored and the cursor
    /// has not moved). A delta that fails to open or apply is skipped (the cursor still moves)
    /// and reported in [`AppliedDeltas::errors`]; it never stalls the chat. Stops early at a
    /// delta whose key has not arrived ([`AppliedDeltas::no_key`]: the cursor stays before it)
    /// or after one that broke the document in memory (what is staged is stored at once, and
    /// the document is read again from the store for the rest); [`AppliedDeltas::consumed`]
    /// says how far it got. The messages in the updates are revealed (their texts opened).
    pub(crate) fn stage_deltas(
        &mut self,
        chat: ChatId,
        deltas: &[Delta],
        staged: &mut StagedDeltas,
    ) -> Result<AppliedDeltas, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let mut done = AppliedDeltas::default();
        let mut entries: Vec<Staged> = Vec::with_capacity(deltas.len());
        let mut poisoned = false;
        for delta in deltas {
            let opened = match meta.transport(delta.epoch) {
                // From before this account joined (or while it was away), and not shared with
                // it: passed over.
                None if meta.current().is_some_and(|(e, _)| delta.epoch < e) => {
                    entries.push((delta.seq, None));
                    continue;
                }
                // A new epoch whose key is still on its way in the account log (the relay only
                // stores deltas under epochs it has): the cursor stays, the delta comes again.
                None => {
                    done.no_key = Some(delta.seq);
                    break;
                }
                Some(key) => crate::proto::crypto::open_delta(&key, &delta.ad(), &delta.sealed),
            };
            let plain = match opened {
                Ok(p) => p,
                Err(e) => {
                    entries.push((delta.seq, None));
                    done.errors.push((delta.seq, e.into()));
                    continue;
                }
            };
            let from = Author { account: delta.account, device: delta.device.clone() };
            if !self.doc(chat)?.knows_author(&from) {
                self.store.put_author(chat, &from)?;
            }
            let doc = self.doc(chat)?;
            match doc.apply_untrusted_update(&plain, &from) {
                // Stored already (it came before, or it is this device's own): only the
                // cursor moves. After a crash that kept part of a run's store (see
                // `DeviceStore::apply_remote_chats`), the deltas come again and are these.
                Ok(update) if update.known => entries.push((delta.seq, None)),
                Ok(update) => {
                    entries.push((delta.seq, Some(plain)));
                    done.updates.push(update);
                }
                Err(e) => {
                    poisoned = doc.is_poisoned();
                    entries.push((delta.seq, None));
                    done.errors.push((delta.seq, e.into()));
                    if poisoned {
                        break;
                    }
                }
            }
        }
        done.consumed = entries.len();
        staged.push(chat, entries);
        if poisoned {
            // What was applied before is stored first: the document is read again from the
            // store for the deltas after this one.
            self.drop_doc(chat);
            done.compaction = self.store_staged(staged)?;
        }
        for update in &mut done.updates {
            update.added = messages::reveal_with(&meta, chat, std::mem::take(&mut update.added));
            update.changed = messages::reveal_with(&meta, chat, std::mem::take(&mut update.changed));
        }
        Ok(done)
    }

    /// Stores what [`Device::stage_deltas`] staged, every chat in one write, and compacts the
    /// chats that need it. On failure the staged chats' documents (ahead of the store) are
    /// dropped, to be read again from the store, and nothing staged counts as applied. Returns
    /// the compactions that failed (the deltas are stored all the same).
    pub(crate) fn store_staged(&mut self, staged: &mut StagedDeltas) -> Result<Vec<Error>, Error> {
        let chats = std::mem::take(&mut staged.chats);
        if chats.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<(ChatId, Vec<RemoteEntry>)> =
            chats.iter().map(|(chat, e)| (*chat, e.iter().map(|(s, c)| (*s, c.as_deref())).collect())).collect();
        let list: Vec<(ChatId, &[RemoteEntry])> = refs.iter().map(|(c, e)| (*c, &e[..])).collect();
        let counts = match self.store.apply_remote_chats(&list) {
            Ok(counts) => counts,
            Err(e) => {
                for (chat, _) in &chats {
                    self.drop_doc(*chat);
                }
                return Err(e.into());
            }
        };
        // A chat's last count is its current one.
        let latest: BTreeMap<ChatId, u64> = chats.iter().map(|(c, _)| *c).zip(counts).collect();
        let mut errors = Vec::new();
        for (chat, stored) in latest {
            if let Err(e) = self.maybe_compact(chat, stored) {
                errors.push(e);
            }
        }
        Ok(errors)
    }
}

/// Deltas applied to chats' documents and not yet stored: [`Device::stage_deltas`] adds to
/// it, [`Device::store_staged`] stores it.
#[derive(Debug, Default)]
pub(crate) struct StagedDeltas {
    /// Per chat (a chat may come more than once), its deltas in order: the change, or `None`
    /// for one passed over.
    chats: Vec<(ChatId, Vec<Staged>)>,
}

/// A staged delta: its seq, and its change (`None` for one passed over).
type Staged = (Seq, Option<Vec<u8>>);

impl StagedDeltas {
    fn push(&mut self, chat: ChatId, entries: Vec<Staged>) {
        if entries.is_empty() {
            return;
        }
        match self.chats.last_mut() {
            Some((c, e)) if *c == chat => e.extend(entries),
            _ => self.chats.push((chat, entries)),
        }
    }
}

/// What [`Device::stage_deltas`] did.
#[derive(Debug, Default)]
pub(crate) struct AppliedDeltas {
    /// How many of the deltas it took (applied or skipped); the rest are for another call.
    pub consumed: usize,
    /// What each applied delta did, in order.
    pub updates: Vec<DocUpdate>,
    /// The deltas skipped, and why.
    pub errors: Vec<(Seq, Error)>,
    /// The delta it stopped before: its key has not arrived.
    pub no_key: Option<Seq>,
    /// Compactions that failed when what was staged had to be stored early.
    pub compaction: Vec<Error>,
}

/// How many changes pile up after `chat`'s snapshot before it is rewritten: from
/// [`COMPACT_AFTER_CHANGES`] to 1.875 times it, by the chat's id. A rewrite holds the device's
/// session for tens of milliseconds per megabyte of document; chats written together (an app's
/// burst into each of them) then rewrite theirs at different times, not all in one step.
pub(crate) fn compact_after(chat: ChatId) -> u64 {
    COMPACT_AFTER_CHANGES + u64::from(chat.0[15] % 8) * (COMPACT_AFTER_CHANGES / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_rewrite_their_snapshots_at_different_counts_within_bounds() {
        let counts: std::collections::BTreeSet<u64> = (0..=255u8)
            .map(|b| {
                let mut id = [7u8; 16];
                id[15] = b;
                compact_after(ChatId(id))
            })
            .collect();
        assert_eq!(counts.len(), 8, "{counts:?}");
        assert_eq!(counts.first(), Some(&COMPACT_AFTER_CHANGES));
        assert!(*counts.last().unwrap() < 2 * COMPACT_AFTER_CHANGES);
    }
}
