//! Secret chats on the device (the peer-links concern): start, accept, write, read,
//! self-destruct, close, and the work of a live link to the peer device (see
//! `crate::device::secret`). A secret chat's document is a [`ChatDoc`] like any chat's, kept in
//! the device's own trees and synced only over the link; [`SecretDocs`] holds the ones in
//! memory. [`conn`] is one secret stream without I/O, [`net`] drives it over libp2p.
//!
//! What this part of [`Device`] touches: the store's secret-chat trees, its own [`SecretDocs`],
//! the device's id, login and Noise static key, other accounts' keys (to check a peer's
//! certificate), the clock and the RNG; no cloud chat.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::RngCore;

use crate::device::doc::{new_message, ChatDoc, Message, MAX_SYNC_MESSAGE_BYTES};
use crate::device::error::Error;
use crate::device::local::chats::{check_text, DOC_CACHE};
use crate::device::local::Device;
use crate::device::secret::link::{open_text, seal_text, MAX_KEYS_PER_FRAME};
use crate::device::secret::{Channel, SecretFrame, SecretLink, SecretText};
use crate::device::store::{DeviceStore, MessageKey, SecretChat, SecretState};
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{ChatId, DeviceId, SecretId};

mod conn;
#[cfg(test)]
mod links_sim;
mod net;
#[cfg(test)]
pub(in crate::device::local) mod tests;

pub(crate) use conn::OPENING_TIMEOUT;
pub use conn::{Answer, Ended, Opening, SecretConn, Step};

/// A secret chat's message as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretMessage {
    /// The message (its text opened).
    #[serde(flatten)]
    pub message: Message,
    /// Seconds after it is read that it disappears, if it does.
    pub ttl_s: Option<u32>,
    /// When it disappears (its timer runs), milliseconds since the Unix epoch.
    pub expires_ms: Option<i64>,
}

/// What a frame from the peer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SecretUpdate {
    /// Messages that arrived (with their keys), or whose key arrived.
    pub added: Vec<SecretMessage>,
    /// The peer closed the chat; it is deleted here too.
    pub closed: bool,
}

/// A secret chat's document is saved whole (its snapshot) once this many changes were stored
/// after the last snapshot; each change is stored on its own in between.
pub(crate) const SECRET_COMPACT_AFTER: u64 = 256;

/// The document of a secret chat lives under a chat id made from the secret chat's id (it is
/// never a chat on the relay).
fn doc_chat(id: SecretId) -> ChatId {
    ChatId(id.0)
}

/// Secret chats' documents in memory, loaded on first use (a device has few secret chats; each
/// is saved to the store after every change, so any can be dropped): at most [`DOC_CACHE`],
/// a random one dropped when full.
#[derive(Default)]
pub(super) struct SecretDocs {
    docs: BTreeMap<SecretId, ChatDoc>,
}

impl SecretDocs {
    /// A secret chat's document, loaded from `store` on first use.
    fn get(
        &mut self,
        store: &DeviceStore,
        me: &DeviceId,
        rng: &mut StdRng,
        id: SecretId,
    ) -> Result<&mut ChatDoc, Error> {
        if !self.docs.contains_key(&id) {
            let chat = store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
            let (snapshot, changes) = store.secret_doc_parts(id)?;
            let snapshot = snapshot.ok_or(Error::UnknownSecret(id))?;
            let doc = ChatDoc::load(doc_chat(id), me, Some(&snapshot), &changes, &[chat.peer()])?;
            if self.docs.len() >= DOC_CACHE {
                let evict = *self.docs.keys().nth(rng.next_u32() as usize % DOC_CACHE).expect("full");
                self.docs.remove(&evict);
            }
            self.docs.insert(id, doc);
        }
        Ok(self.docs.get_mut(&id).expect("inserted above"))
    }

    /// Drops a secret chat's document (it reloads from the store when needed).
    fn forget(&mut self, id: SecretId) {
        self.docs.remove(&id);
    }

    /// Drops every document (the account's data is being deleted).
    pub(super) fn clear(&mut self) {
        self.docs.clear();
    }
}

impl Device {
    /// Starts a secret chat with the device of another account whose certificate is `peer`
    /// (checked by the caller, see [`Device::secret_devices`]). The chat waits for the peer
    /// device to accept.
    pub fn secret_start(&mut self, peer: DeviceCert) -> Result<SecretId, Error> {
        self.login()?;
        let id = SecretId::random(&mut self.rng);
        let chat = SecretChat {
            id,
            peer_cert: peer,
            verified: true,
            started_here: true,
            state: SecretState::Inviting,
            created_ms: self.now_ms(),
        };
        self.store.put_secret(&chat)?;
        self.store.put_secret_doc(id, &ChatDoc::new(doc_chat(id), self.identity.id()).save())?;
        self.store.barrier()?;
        Ok(id)
    }

    /// Records a secret chat the device with certificate `peer` offers; `verified` says
    /// whether the certificate checked against its account's keys, `accept` whether this
    /// device takes it at once (its auto-accept setting; only a verified offer is taken).
    pub fn secret_offered(
        &mut self,
        id: SecretId,
        peer: DeviceCert,
        verified: bool,
        accept: bool,
    ) -> Result<SecretChat, Error> {
        if let Some(known) = self.store.secret(id)? {
            return Ok(known);
        }
        let state = if accept && verified { SecretState::Active } else { SecretState::Invited };
        let chat = SecretChat { id, peer_cert: peer, verified, started_here: false, state, created_ms: self.now_ms() };
        self.store.put_secret(&chat)?;
        self.store.put_secret_doc(id, &ChatDoc::new(doc_chat(id), self.identity.id()).save())?;
        self.store.barrier()?;
        Ok(chat)
    }

    /// Accepts a secret chat the peer offered (or marks one started here as accepted by the
    /// peer).
    pub fn secret_accept(&mut self, id: SecretId) -> Result<(), Error> {
        let mut chat = self.secret(id)?;
        if chat.state != SecretState::Closing {
            chat.state = SecretState::Active;
            self.store.put_secret(&chat)?;
            self.store.barrier()?;
        }
        Ok(())
    }

    /// The record of a chat this device may write in: one it started, or accepted.
    fn secret_writable(&self, id: SecretId) -> Result<SecretChat, Error> {
        let chat = self.secret(id)?;
        match chat.state {
            SecretState::Invited => Err(Error::SecretNotAccepted(id)),
            _ => Ok(chat),
        }
    }

    /// One secret chat's record.
    pub fn secret(&self, id: SecretId) -> Result<SecretChat, Error> {
        self.store.secret(id)?.filter(|c| c.state != SecretState::Closing).ok_or(Error::UnknownSecret(id))
    }

    /// Whether secret chats offered by other devices (whose certificates check) are taken at
    /// once.
    pub fn secret_auto_accept(&self) -> Result<bool, Error> {
        Ok(self.store.secret_auto_accept()?)
    }

    /// Sets [`Device::secret_auto_accept`].
    pub fn set_secret_auto_accept(&mut self, on: bool) -> Result<(), Error> {
        self.store.set_secret_auto_accept(on)?;
        Ok(self.store.barrier()?)
    }

    /// The secret chats a link is to be opened for: accepted, started here, or closed here and
    /// not yet told to the peer (with the peer device of each).
    pub fn secret_chats_to_reach(&self) -> Result<Vec<(SecretId, DeviceId)>, Error> {
        Ok(self
            .store
            .secret_chats()?
            .into_iter()
            .filter(|c| c.state != SecretState::Invited)
            .map(|c| (c.id, c.peer_cert.body.device.clone()))
            .collect())
    }

    /// Every secret chat on this device (not those closed here and waiting to tell the peer).
    pub fn secret_chats(&self) -> Result<Vec<SecretChat>, Error> {
        Ok(self.store.secret_chats()?.into_iter().filter(|c| c.state != SecretState::Closing).collect())
    }

    /// Writes a message, disappearing `ttl_s` seconds after it is read if given. It waits on
    /// this device until a link to the peer carries it.
    pub fn secret_send(&mut self, id: SecretId, text: &str, ttl_s: Option<u32>) -> Result<SecretMessage, Error> {
        check_text(text)?;
        self.secret_writable(id)?;
        let account = self.login()?.account.id;
        let mut raw = [0u8; 16];
        self.rng.fill_bytes(&mut raw);
        let mut msg = new_message(account, self.identity.id(), "", self.now_ms(), raw);
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let sealed = seal_text(&key, id, &msg.id, &SecretText { text: text.to_string(), ttl_s }, &mut self.rng);
        let change = self.secret_doc(id)?.add_message(&Message { text: sealed, ..msg.clone() })?;
        self.store.put_message_key(
            id,
            &msg.id,
            &MessageKey { key, mine: true, delivered: false, expires_ms: None, gone: false },
        )?;
        self.store_secret_changes(id, &[change])?;
        self.store.barrier()?;
        msg.text = text.to_string();
        Ok(SecretMessage { message: msg, ttl_s, expires_ms: None })
    }

    /// A secret chat's messages in display order, with their texts: those whose key is gone
    /// (disappeared) or has not arrived yet are left out.
    pub fn secret_messages(&mut self, id: SecretId) -> Result<Vec<SecretMessage>, Error> {
        self.secret(id)?;
        let messages = self.secret_doc(id)?.messages();
        let keys: BTreeMap<String, MessageKey> = self.store.message_keys(id)?.into_iter().collect();
        Ok(self.open_messages(id, messages, |m| keys.get(m).cloned()))
    }

    /// Opens the texts of `messages` with their keys (from `key`); those whose key is gone, past
    /// its time (`secret_expire` has not run yet) or not here are left out.
    fn open_messages(
        &self,
        id: SecretId,
        messages: Vec<Message>,
        key: impl Fn(&str) -> Option<MessageKey>,
    ) -> Vec<SecretMessage> {
        let now = self.now_ms();
        messages
            .into_iter()
            .filter_map(|mut m| {
                let k = key(&m.id).filter(|k| !k.gone && k.expires_ms.is_none_or(|t| t > now))?;
                let opened = open_text(&k.key, id, &m.id, &m.text)?;
                m.text = if m.deleted { String::new() } else { opened.text };
                Some(SecretMessage { message: m, ttl_s: opened.ttl_s, expires_ms: k.expires_ms })
            })
            .collect()
    }

    /// [`Device::open_messages`] with each key read from the store.
    fn open_with_stored_keys(&self, id: SecretId, messages: Vec<Message>) -> Vec<SecretMessage> {
        self.open_messages(id, messages, |m| self.store.message_key(id, m).ok().flatten())
    }

    /// Marks the chat read up to message `upto`; the timers of the messages it covers start.
    pub fn secret_read(&mut self, id: SecretId, upto: &str) -> Result<(), Error> {
        self.secret_writable(id)?;
        let account = self.login()?.account.id;
        let device = self.identity.id().clone();
        let now = self.now_ms();
        let doc = self.secret_doc(id)?;
        let marks = doc.read_marks();
        let change = doc.mark_read(&account, &device, upto, now)?;
        // Timers first: a crash in between must not keep the mark without its timers.
        self.arm_newly_read(id, &marks)?;
        self.store_secret_changes(id, &[change])?;
        self.store.barrier()?;
        Ok(())
    }

    /// Starts the timers of the messages that read marks moved over since `before` (the marks
    /// then): on both devices, the reader's when it reads, the writer's when the mark arrives.
    fn arm_newly_read(&mut self, id: SecretId, before: &BTreeMap<String, usize>) -> Result<(), Error> {
        let after = self.secret_doc(id)?.read_marks();
        let moved = after.iter().filter(|(a, i)| before.get(*a).is_none_or(|b| b < *i));
        let Some(from) = moved.map(|(a, _)| before.get(a).map_or(0, |b| b + 1)).min() else { return Ok(()) };
        let to = after.values().copied().max().unwrap_or(0);
        let messages = self.secret_doc(id)?.messages_in(from, to);
        let read = self.open_with_stored_keys(id, messages);
        self.arm(id, &read)
    }

    /// Starts the timer of each of `messages` that has one and was read.
    fn arm(&mut self, id: SecretId, messages: &[SecretMessage]) -> Result<(), Error> {
        let now = self.now_ms();
        for m in messages {
            let (Some(ttl), None, false) = (m.ttl_s, m.expires_ms, m.message.read_by.is_empty()) else { continue };
            let Some(mut key) = self.store.message_key(id, &m.message.id)? else { continue };
            key.expires_ms = Some(now.saturating_add(i64::from(ttl) * 1000));
            self.store.put_message_key(id, &m.message.id, &key)?;
        }
        Ok(())
    }

    /// Stores changes made to a secret chat's document (compacting it now and then).
    fn store_secret_changes(&mut self, id: SecretId, changes: &[Vec<u8>]) -> Result<(), Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let stored = self.store.append_secret_changes(id, changes)?;
        if stored >= SECRET_COMPACT_AFTER {
            let doc = self.secret_doc(id)?;
            let pending = doc.pending_changes();
            // Compaction keeps the waiting changes: counting them would compact on every change
            // while many wait.
            if stored >= SECRET_COMPACT_AFTER + pending.len() as u64 {
                let snapshot = doc.save();
                self.store.compact_secret(id, &snapshot, &pending)?;
            }
        }
        Ok(())
    }

    /// Deletes the keys of the messages whose time is up (their texts are gone for good);
    /// returns them by chat. Call it when [`Device::secret_next_expiry`] comes.
    pub fn secret_expire(&mut self) -> Result<Vec<(SecretId, String)>, Error> {
        let now = self.now_ms();
        let mut gone = Vec::new();
        for (_, chat, m) in self.store.timers_due(Some(now), usize::MAX)? {
            let Some(k) = self.store.message_key(chat, &m)? else { continue };
            let tombstone = MessageKey { key: [0; 32], gone: true, delivered: true, ..k };
            self.store.put_message_key(chat, &m, &tombstone)?;
            gone.push((chat, m));
        }
        if !gone.is_empty() {
            self.store.barrier()?;
        }
        Ok(gone)
    }

    /// When the next message disappears, if a timer runs.
    pub fn secret_next_expiry(&self) -> Result<Option<i64>, Error> {
        Ok(self.store.timers_due(None, 1)?.first().map(|(t, _, _)| *t))
    }

    /// Closes a secret chat: deletes it here at once, and on the peer device when a link next
    /// reaches it.
    pub fn secret_close(&mut self, id: SecretId) -> Result<(), Error> {
        let mut chat = self.secret(id)?;
        chat.state = SecretState::Closing;
        self.forget_secret(id, Some(&chat))
    }

    /// A link to the peer came up (the handshake ended): what to send first. A chat closed
    /// here tells the peer, and is forgotten once the peer answers with its own `Close`.
    pub fn secret_link_up(&mut self, id: SecretId, channel: Channel) -> Result<(SecretLink, Vec<Vec<u8>>), Error> {
        let chat = self.store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
        let mut link = SecretLink::new(id, channel);
        if chat.state == SecretState::Closing {
            let out = link.seal(&[SecretFrame::Close], self.now_ms())?;
            return Ok((link, out));
        }
        let out = self.secret_flush(&mut link)?;
        Ok((link, out))
    }

    /// What the link is to carry now: the document's next sync message and the keys the peer
    /// does not have yet. Call it after writing or reading.
    pub fn secret_flush(&mut self, link: &mut SecretLink) -> Result<Vec<Vec<u8>>, Error> {
        let id = link.chat;
        if self.secret(id)?.state != SecretState::Active {
            return Ok(Vec::new());
        }
        let doc = self.secret_doc(id)?;
        let mut frames: Vec<SecretFrame> =
            doc.sync_message(&mut link.sync).map(SecretFrame::Sync).into_iter().collect();
        // Each key once per link (the stream is reliable; a new link sends what is still not
        // acknowledged), and at most a frame's worth not yet acknowledged: the peer takes keys
        // ahead of their messages only so far.
        let room = MAX_KEYS_PER_FRAME.saturating_sub(link.keys_sent.len());
        let undelivered: Vec<(String, [u8; 32])> = self
            .store
            .undelivered_keys(id)?
            .into_iter()
            .filter(|(m, _)| !link.keys_sent.contains(m))
            .take(room)
            .map(|(m, k)| (m, k.key))
            .collect();
        link.keys_sent.extend(undelivered.iter().map(|(m, _)| m.clone()));
        frames.extend(undelivered.chunks(MAX_KEYS_PER_FRAME).map(|c| SecretFrame::Keys(c.to_vec())));
        Ok(link.seal(&frames, self.now_ms())?)
    }

    /// Handles one channel message from the peer. Returns what to send back and what changed.
    /// An error leaves the link dead (drop it and close the connection); what was applied
    /// before stays.
    pub fn secret_receive(
        &mut self,
        link: &mut SecretLink,
        bytes: &[u8],
    ) -> Result<(Vec<Vec<u8>>, SecretUpdate), Error> {
        let id = link.chat;
        let Some(payload) = link.channel.open(bytes)? else { return Ok((Vec::new(), SecretUpdate::default())) };
        let mut update = SecretUpdate::default();
        let frame = SecretFrame::decode(&payload)?;
        let record = self.store.secret(id)?;
        if frame == SecretFrame::Close {
            // The peer closed it (answered with a `Close` of this device's, which then waits
            // for it), or acknowledges this device's close.
            update.closed = true;
            let Some(record) = record else { return Ok((Vec::new(), update)) };
            self.forget_secret(id, None)?;
            return match record.state {
                SecretState::Closing => Ok((Vec::new(), update)),
                _ => Ok((link.seal(&[SecretFrame::Close], self.now_ms())?, update)),
            };
        }
        let chat = match record {
            // Closed here: what the peer sends before its acknowledgement is of no use.
            Some(c) if c.state == SecretState::Closing => return Ok((Vec::new(), update)),
            Some(c) => c,
            // Gone here: the link has nothing more to do.
            None => {
                update.closed = true;
                return Ok((Vec::new(), update));
            }
        };
        let mut reply = Vec::new();
        match frame {
            SecretFrame::Close => unreachable!("handled above"),
            _ if chat.state != SecretState::Active => {}
            SecretFrame::Sync(message) if message.len() <= MAX_SYNC_MESSAGE_BYTES => {
                let doc = self.secret_doc(id)?;
                let (heads, marks, waiting) = (doc.head_hashes(), doc.read_marks(), doc.pending_changes());
                let applied = doc.receive_sync(&mut link.sync, &message, &chat.peer());
                // What applied (also before a refused change) and what now waits for its
                // dependencies (stored too: the peer's sync state counts it as sent, and the
                // document may leave the cache). Timers first, as in `secret_read`.
                let poisoned = doc.is_poisoned();
                let mut changes = Vec::new();
                if !poisoned {
                    changes = doc.changes_since(&heads);
                    changes.extend(doc.pending_changes().into_iter().filter(|c| !waiting.contains(c)));
                }
                if poisoned {
                    self.secret_docs.forget(id);
                    applied?;
                    return Err(Error::Doc(crate::device::doc::DocError::Panicked));
                }
                let added = applied.as_ref().map(|u| u.added.clone()).unwrap_or_default();
                update.added = self.open_with_stored_keys(id, added);
                self.arm(id, &update.added)?;
                self.arm_newly_read(id, &marks)?;
                self.store_secret_changes(id, &changes)?;
                applied?;
            }
            SecretFrame::Sync(_) => return Err(crate::device::secret::SecretError::TooLarge.into()),
            SecretFrame::Keys(keys) => {
                // Never replace a key: the peer names only its own messages' keys (again when a
                // link broke before this device's acknowledgement reached it).
                let mut new = BTreeMap::new();
                for (m, key) in &keys {
                    if self.store.message_key(id, m)?.is_none() {
                        new.insert(m.clone(), *key);
                    }
                }
                // Keys may come before their messages, but not without bound.
                if !new.is_empty() {
                    let held = self.store.message_keys(id)?.len();
                    if held + new.len() > self.secret_doc(id)?.message_count() + MAX_KEYS_PER_FRAME {
                        return Err(crate::device::secret::SecretError::TooLarge.into());
                    }
                }
                for (m, key) in &new {
                    let record = MessageKey { key: *key, mine: false, delivered: true, expires_ms: None, gone: false };
                    self.store.put_message_key(id, m, &record)?;
                }
                let stored: Vec<String> = keys.into_iter().map(|(m, _)| m).collect();
                // The messages of the new keys that are here already, now readable (in display
                // order).
                let doc = self.secret_doc(id)?;
                let messages: Vec<Message> = match new.len() {
                    0 => Vec::new(),
                    1..=8 => {
                        let mut found: Vec<(usize, Message)> = new.keys().filter_map(|m| doc.message(m)).collect();
                        found.sort_by_key(|(i, _)| *i);
                        found.into_iter().map(|(_, m)| m).collect()
                    }
                    _ => doc.messages().into_iter().filter(|m| new.contains_key(&m.id)).collect(),
                };
                update.added = self.open_with_stored_keys(id, messages);
                self.arm(id, &update.added)?;
                reply.push(SecretFrame::KeysAck(stored));
            }
            SecretFrame::KeysAck(ids) => {
                for m in ids {
                    link.keys_sent.remove(&m);
                    match self.store.message_key(id, &m)? {
                        Some(mut k) if k.mine && !k.delivered => {
                            k.delivered = true;
                            self.store.put_message_key(id, &m, &k)?;
                        }
                        _ => {}
                    }
                }
            }
        }
        self.store.barrier()?;
        let mut out = link.seal(&reply, self.now_ms())?;
        out.extend(self.secret_flush(link)?);
        Ok((out, update))
    }

    /// Deletes a secret chat's document and keys here, durably, and its record unless
    /// `keep` replaces it. Once the record goes too, the chat id is remembered as closed for a while, so that an
    /// opening of it still under way does not bring it back as a new offer.
    pub(super) fn forget_secret(&mut self, id: SecretId, keep: Option<&SecretChat>) -> Result<(), Error> {
        self.secret_docs.forget(id);
        self.store.delete_secret(id, keep)?;
        if keep.is_none() {
            self.store.put_closed_secret(id, self.now_ms())?;
        }
        Ok(self.store.barrier()?)
    }

    /// A secret chat's document, loaded from the store on first use (at most [`DOC_CACHE`] are
    /// kept; everything of a document is in the store, so any can go).
    fn secret_doc(&mut self, id: SecretId) -> Result<&mut ChatDoc, Error> {
        self.secret_docs.get(&self.store, self.identity.id(), &mut self.rng, id)
    }
}
