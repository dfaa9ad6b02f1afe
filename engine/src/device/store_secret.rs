//! The device store's secret chats (trees `secrets`, `secret_docs`, `secret_keys`). They never
//! leave the device but over the secret chat's own session: nothing here reaches the relay.
//! Part of [`DeviceStore`]; split out of `store.rs` for size.

use serde::{Deserialize, Serialize};
use sled::transaction::TransactionalTree;
use sled::Transactional;

use super::{dec, enc, tx_result, DeviceStore, StoreError, TxResult};
use crate::device::doc::Author;
use crate::proto::cert::DeviceCert;
use crate::proto::ids::SecretId;

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
        Ok(self.meta.get("secret_auto_accept")?.is_some())
    }

    /// Sets [`DeviceStore::secret_auto_accept`].
    pub fn set_secret_auto_accept(&self, on: bool) -> Result<(), StoreError> {
        match on {
            true => self.meta.insert("secret_auto_accept", &[1u8][..])?,
            false => self.meta.remove("secret_auto_accept")?,
        };
        Ok(())
    }

    /// Replaces a secret chat's saved document.
    pub fn put_secret_doc(&self, id: SecretId, doc: &[u8]) -> Result<(), StoreError> {
        self.secret_docs.insert(id.0, doc)?;
        Ok(())
    }

    /// A secret chat's saved document.
    pub fn secret_doc(&self, id: SecretId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.secret_docs.get(id.0)?.map(|v| v.to_vec()))
    }

    /// Stores a message's key.
    pub fn put_message_key(&self, chat: SecretId, message: &str, key: &MessageKey) -> Result<(), StoreError> {
        self.secret_keys.insert(key_key(chat, message), enc(key))?;
        Ok(())
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
        let keys: Vec<sled::IVec> = self.secret_keys.scan_prefix(id.0).keys().collect::<Result<_, _>>()?;
        tx_result((&self.secrets, &self.secret_docs, &self.secret_keys).transaction(
            |(chats, docs, ks): &(TransactionalTree, TransactionalTree, TransactionalTree)| -> TxResult<()> {
                match keep {
                    Some(c) => chats.insert(&id.0[..], enc(c))?,
                    None => chats.remove(&id.0[..])?,
                };
                docs.remove(&id.0[..])?;
                for k in &keys {
                    ks.remove(k)?;
                }
                Ok(())
            },
        ))
    }
}
