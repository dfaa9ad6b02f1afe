//! The device store's secret chats (trees `secrets`, `secret_docs`, `secret_changes`,
//! `secret_keys`, `secret_undelivered`). They never
//! leave the device but over the secret chat's own session: nothing here reaches the relay.
//! Part of [`DeviceStore`]; split out of `store.rs` for size.

use super::{change_key, compact_in, dec, doc_parts_in, enc, next_change_in, DeviceStore, DocParts, StoreError};
use crate::device::doc::Author;
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{ChatId, SecretId};
use serde::{Deserialize, Serialize};

/// Where a secret chat stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretState {
    /// Started here; the peer device has not accepted yet.
    Inviting,
    /// Started by the peer; waits for this device's user to accept.
    Invited,
    /// Both accepted.
    Active,
    /// Closed here: everything is deleted but this record, which stays until the peer device
    /// has been told (it then deletes its side).
    Closing,
}

/// A secret chat: this device and one device of another account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretChat {
    /// The chat.
    pub id: SecretId,
    /// The other device's certificate (its account, device id and static X25519 key).
    pub peer_cert: DeviceCert,
    /// The certificate was checked against the account's keys as this device knows them.
    pub verified: bool,
    /// True if this device started the chat (it is the one that connects).
    pub started_here: bool,
    /// Where it stands.
    pub state: SecretState,
    /// When it was started or offered, milliseconds since the Unix epoch.
    pub created_ms: i64,
}

/// The key of one message's text. Deleting it is deleting the text: the document keeps only
/// the text sealed under it (Automerge keeps every change's history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageKey {
    /// XChaCha20-Poly1305 key.
    pub key: [u8; 32],
    /// Written on this device.
    pub mine: bool,
    /// For this device's messages: the peer device confirmed it has the key.
    pub delivered: bool,
    /// When the message disappears, once it was read and has a timer.
    pub expires_ms: Option<i64>,
    /// The message disappeared: the key is zeroed and the record stays, so that the same key
    /// sent again (the peer did not see this device's acknowledgement) is not taken anew.
    pub gone: bool,
}

impl SecretChat {
    /// The other device and its account.
    pub fn peer(&self) -> Author {
        Author { account: self.peer_cert.body.account, device: self.peer_cert.body.device.clone() }
    }

    /// The other device's static X25519 key.
    pub fn peer_static(&self) -> [u8; 32] {
        self.peer_cert.body.device_x25519
    }
}

fn key_key(chat: SecretId, message: &str) -> Vec<u8> {
    [&chat.0[..], message.as_bytes()].concat()
}

/// How long a closed chat's id is remembered (an opening of it is then answered `Gone`).
pub const CLOSED_KEPT_MS: i64 = 30 * 24 * 3600 * 1000;
/// Most closed chat ids remembered.
pub const CLOSED_KEPT: usize = 4096;

/// A running timer's entry: its time first, so that the next to run comes first.
fn timer_key(expires_ms: i64, chat: SecretId, message: &str) -> Vec<u8> {
    [&expires_ms.max(0).to_be_bytes()[..], &chat.0[..], message.as_bytes()].concat()
}

/// The timer a key record runs, if any.
fn timer_of(key: &MessageKey) -> Option<i64> {
    key.expires_ms.filter(|_| !key.gone)
}

impl DeviceStore {
    /// Stores a secret chat's record.
    pub fn put_secret(&self, chat: &SecretChat) -> Result<(), StoreError> {
        self.secrets.insert(chat.id.0, enc(chat))?;
        Ok(())
    }

    /// One secret chat's record.
    pub fn secret(&self, id: SecretId) -> Result<Option<SecretChat>, StoreError> {
        self.secrets.get(id.0)?.map(|v| dec(&v, "secret chat")).transpose()
    }

    /// Every secret chat's record.
    pub fn secret_chats(&self) -> Result<Vec<SecretChat>, StoreError> {
        self.secrets.iter().map(|kv| dec(&kv?.1, "secret chat")).collect()
    }

    /// Whether secret chats offered by other devices are taken at once.
    pub fn secret_auto_accept(&self) -> Result<bool, StoreError> {
        self.flag("secret_auto_accept")
    }

    /// Sets [`DeviceStore::secret_auto_accept`].
    pub fn set_secret_auto_accept(&self, on: bool) -> Result<(), StoreError> {
        self.set_flag("secret_auto_accept", on)
    }

    /// Sets a secret chat's document to `snapshot` and nothing after it (a new chat).
    pub fn put_secret_doc(&self, id: SecretId, snapshot: &[u8]) -> Result<(), StoreError> {
        self.compact_secret(id, snapshot, &[])
    }

    /// A secret chat's snapshot and the changes stored after it, in order.
    pub fn secret_doc_parts(&self, id: SecretId) -> Result<DocParts, StoreError> {
        doc_parts_in(&self.secret_docs, &self.secret_changes, ChatId(id.0))
    }

    /// Stores changes of a secret chat's document after those stored before; returns the
    /// number now stored after its snapshot.
    pub fn append_secret_changes(&self, id: SecretId, changes: &[Vec<u8>]) -> Result<u64, StoreError> {
        let chat = ChatId(id.0);
        let mut n = next_change_in(&self.secret_changes, chat)?;
        self.journal.atomic(&[&self.secret_changes], |b| {
            for c in changes {
                b.insert(0, change_key(chat, n), &c[..]);
                n += 1;
            }
        })?;
        Ok(n)
    }

    /// Replaces a secret chat's snapshot, keeping only `pending` after it (see
    /// [`DeviceStore::compact`]).
    pub fn compact_secret(&self, id: SecretId, snapshot: &[u8], pending: &[Vec<u8>]) -> Result<(), StoreError> {
        compact_in(&self.journal, &self.secret_docs, &self.secret_changes, ChatId(id.0), snapshot, pending)
    }

    /// Stores a message's key. Keys of this device's messages that the peer has not confirmed
    /// are listed apart too ([`DeviceStore::undelivered_keys`]): listed before the key is stored,
    /// unlisted after, so a crash in between leaves at most a stale entry, which is skipped.
    ///
    /// Running timers are listed apart as well, by time ([`DeviceStore::timers_due`]), in the
    /// same order.
    pub fn put_message_key(&self, chat: SecretId, message: &str, key: &MessageKey) -> Result<(), StoreError> {
        let k = key_key(chat, message);
        let old_timer = self.message_key(chat, message)?.as_ref().and_then(timer_of);
        let waiting = key.mine && !key.delivered && !key.gone;
        if waiting {
            self.secret_undelivered.insert(&k, &[])?;
        }
        if let Some(t) = timer_of(key) {
            self.secret_timers.insert(timer_key(t, chat, message), &chat.0[..])?;
        }
        self.secret_keys.insert(&k, enc(key))?;
        if !waiting {
            self.secret_undelivered.remove(&k)?;
        }
        if let Some(t) = old_timer.filter(|t| timer_of(key) != Some(*t)) {
            self.secret_timers.remove(timer_key(t, chat, message))?;
        }
        Ok(())
    }

    /// The running timers, the next first, up to those due at `until_ms` (all if `None`; at most
    /// `limit`): `(expires_ms, chat, message)`. Entries a crash left behind are dropped.
    pub fn timers_due(&self, until_ms: Option<i64>, limit: usize) -> Result<Vec<(i64, SecretId, String)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.secret_timers.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            if k.len() < 24 {
                return Err(StoreError::Corrupt("timer key"));
            }
            let t = i64::from_be_bytes(k[..8].try_into().expect("eight bytes"));
            if until_ms.is_some_and(|u| t > u) {
                break;
            }
            let chat = SecretId(k[8..24].try_into().expect("sixteen bytes"));
            let message = String::from_utf8(k[24..].to_vec()).map_err(|_| StoreError::Corrupt("timer key"))?;
            match self.message_key(chat, &message)?.as_ref().and_then(timer_of) {
                Some(running) if running.max(0) == t => out.push((running, chat, message)),
                _ => {
                    self.secret_timers.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// Builds the indexes of undelivered keys and running timers from the keys, once (a store
    /// written before they existed has keys in neither).
    pub(super) fn index_secret_keys(&self) -> Result<(), StoreError> {
        if self.flag("secret_key_index")? {
            return Ok(());
        }
        for kv in self.secret_keys.iter() {
            let (k, v) = kv?;
            let key: MessageKey = dec(&v, "message key")?;
            if k.len() < 16 {
                return Err(StoreError::Corrupt("message key id"));
            }
            let chat = SecretId(k[..16].try_into().expect("sixteen bytes"));
            let message = std::str::from_utf8(&k[16..]).map_err(|_| StoreError::Corrupt("message key id"))?;
            if key.mine && !key.delivered && !key.gone {
                self.secret_undelivered.insert(&k, &[])?;
            }
            if let Some(t) = timer_of(&key) {
                self.secret_timers.insert(timer_key(t, chat, message), &chat.0[..])?;
            }
        }
        self.set_flag("secret_key_index", true)
    }

    /// Remembers that the chat `id` was closed (and deleted) at `now_ms`, for
    /// `CLOSED_KEPT_MS`; at most `CLOSED_KEPT` are remembered, the oldest forgotten first.
    pub fn put_closed_secret(&self, id: SecretId, now_ms: i64) -> Result<(), StoreError> {
        self.secret_closed.insert(id.0, &now_ms.to_be_bytes())?;
        let mut all: Vec<(i64, sled::IVec)> = Vec::new();
        for kv in self.secret_closed.iter() {
            let (k, v) = kv?;
            let at = v.as_ref().try_into().map(i64::from_be_bytes).unwrap_or(0);
            all.push((at, k));
        }
        all.sort();
        let over = all.len().saturating_sub(CLOSED_KEPT);
        for (i, (at, k)) in all.into_iter().enumerate() {
            if i < over || at < now_ms.saturating_sub(CLOSED_KEPT_MS) {
                self.secret_closed.remove(k)?;
            }
        }
        Ok(())
    }

    /// Whether the chat `id` was closed here lately (see [`DeviceStore::put_closed_secret`]).
    pub fn is_closed_secret(&self, id: SecretId) -> Result<bool, StoreError> {
        self.secret_closed.contains_key(id.0)
    }

    /// The keys of this device's messages in `chat` that the peer has not confirmed yet.
    pub fn undelivered_keys(&self, chat: SecretId) -> Result<Vec<(String, MessageKey)>, StoreError> {
        let mut out = Vec::new();
        for k in self.secret_undelivered.scan_prefix(chat.0).keys() {
            let k = k?;
            let id = String::from_utf8(k[16..].to_vec()).map_err(|_| StoreError::Corrupt("message key id"))?;
            if let Some(key) = self.message_key(chat, &id)?.filter(|r| r.mine && !r.delivered && !r.gone) {
                out.push((id, key));
            }
        }
        Ok(out)
    }

    /// One message's key record.
    pub fn message_key(&self, chat: SecretId, message: &str) -> Result<Option<MessageKey>, StoreError> {
        self.secret_keys.get(key_key(chat, message))?.map(|v| dec(&v, "message key")).transpose()
    }

    /// A secret chat's message keys, by message id.
    pub fn message_keys(&self, chat: SecretId) -> Result<Vec<(String, MessageKey)>, StoreError> {
        self.secret_keys
            .scan_prefix(chat.0)
            .map(|kv| {
                let (k, v) = kv?;
                let id = String::from_utf8(k[16..].to_vec()).map_err(|_| StoreError::Corrupt("message key id"))?;
                Ok((id, dec(&v, "message key")?))
            })
            .collect()
    }

    /// Deletes a secret chat's document and keys, and its record unless `keep` replaces it
    /// (closed here, not yet told to the peer), in one transaction.
    pub fn delete_secret(&self, id: SecretId, keep: Option<&SecretChat>) -> Result<(), StoreError> {
        let mut keys = Vec::new();
        let mut timers = Vec::new();
        for kv in self.secret_keys.scan_prefix(id.0) {
            let (k, v) = kv?;
            let record: MessageKey = dec(&v, "message key")?;
            if let (Some(t), Ok(m)) = (timer_of(&record), std::str::from_utf8(&k[16..])) {
                timers.push(timer_key(t, id, m));
            }
            keys.push(k);
        }
        let changes: Vec<sled::IVec> = self.secret_changes.scan_prefix(id.0).keys().collect::<Result<_, _>>()?;
        let trees = [
            &self.secrets,
            &self.secret_docs,
            &self.secret_keys,
            &self.secret_changes,
            &self.secret_undelivered,
            &self.secret_timers,
        ];
        self.journal.atomic(&trees, |b| {
            match keep {
                Some(c) => b.insert(0, id.0, enc(c)),
                None => b.remove(0, id.0),
            };
            b.remove(1, id.0);
            for k in &keys {
                b.remove(2, k);
                b.remove(4, k);
            }
            for k in &changes {
                b.remove(3, k);
            }
            for k in &timers {
                b.remove(5, k);
            }
        })
    }
}
