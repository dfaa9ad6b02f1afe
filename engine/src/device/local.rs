//! [`Device`]: one device's identity, store and documents, and the requests that need a relay
//! before the device can sync (account creation, linking, approval).

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;

use crate::device::doc::{new_message, Author, ChatDoc, DocUpdate, Message};
use crate::device::error::Error;
use crate::device::store::{
    device_id_of, ChatMeta, DeviceSecrets, DeviceStore, OutboxBody, OutboxItem, COMPACT_AFTER_CHANGES,
};
use crate::proto::cert::AccountGen;
use crate::proto::crypto::{seal_delta, unwrap_chat_key, ChatKey, DeltaAd};
use crate::proto::ids::{AccountId, ChatId, DeviceId, Epoch, Seq};
use crate::proto::wire::{AccountEntry, AccountEvent, ChatKind, ClientFrame, Delta, ReqId, WrappedKey};

mod identity;
mod members;
mod messages;
mod one_shot;
mod rotation;
mod secret;
use secret::SecretDocs;
pub use secret::{Answer, Ended, Opening, SecretConn, SecretMessage, SecretUpdate, Step, OPENING_TIMEOUT};

pub use identity::{ContactInfo, LinkCode, SessionInfo};
pub(crate) use members::KeyWork;
pub use messages::MessageOp;

pub(crate) use rotation::Applied;

use identity::Identity;

/// Longest message text, in bytes (a sealed delta must fit the relay's 64 KiB limit).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Most chat documents kept in memory; beyond it the least recently opened is dropped (it
/// reloads from the store when needed).
pub const DOC_CACHE: usize = 64;

/// A chat as listed to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// One device: identity, local store, chat documents. Everything here works offline; the
/// `async` methods talk to the relay once and return.
pub struct Device {
    pub(crate) store: DeviceStore,
    identity: Identity,
    docs: BTreeMap<ChatId, ChatDoc>,
    doc_order: Vec<ChatId>,
    pub(crate) rng: StdRng,
    clock: fn() -> i64,
    /// Chats whose creation the relay refused as made with keys a rotation ended, before this
    /// device had the new keys: made again when the rotation arrives.
    stale_creations: std::collections::BTreeSet<ChatId>,
    /// Other accounts' current keys, looked up for the key work under way.
    pub(crate) fresh: BTreeMap<AccountId, AccountGen>,
    /// The chat and epoch of the last `Rekey` sent (see [`Device::key_work_done`]).
    rekey_sent: Option<(ChatId, Epoch)>,
    /// Chats whose creation the relay refused as stale while this device's keys were current:
    /// another member's keys moved on, and the creation is wrapped again after a lookup.
    pub(crate) relook: std::collections::BTreeSet<ChatId>,
    /// Secret chats' documents in memory.
    secret_docs: SecretDocs,
}

fn system_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Device {
    /// Opens the device whose home directory is `home`, creating its identity on first use.
    pub fn open(home: &Path) -> Result<Device, Error> {
        Self::open_with_rng(home, StdRng::from_entropy())
    }

    /// Opens the device like [`Device::open`], drawing every random choice (its identity on
    /// first use, ids, keys, nonces) from `seed`: for deterministic simulation only, never for
    /// real use.
    pub fn open_seeded(home: &Path, seed: u64) -> Result<Device, Error> {
        Self::open_with_rng(home, StdRng::seed_from_u64(seed))
    }

    /// Opens the device whose store is on `disk`, an in-memory disk with an explicit
    /// durability line, drawing every random choice from `seed`: for the deterministic
    /// simulator, which crashes the disk to lose what was not made durable.
    pub fn open_mem(disk: &crate::device::kv::MemDisk, seed: u64) -> Result<Device, Error> {
        Self::with_store(DeviceStore::open_mem(disk)?, StdRng::seed_from_u64(seed))
    }

    fn open_with_rng(home: &Path, rng: StdRng) -> Result<Device, Error> {
        std::fs::create_dir_all(home).map_err(|e| Error::Store(crate::device::store::StoreError::Sync(e)))?;
        Self::with_store(DeviceStore::open(&home.join("store"))?, rng)
    }

    fn with_store(store: DeviceStore, mut rng: StdRng) -> Result<Device, Error> {
        let secrets = store.secrets_or_create(|| {
            let mut s = DeviceSecrets { ed25519: [0; 32], x25519: [0; 32] };
            rng.fill_bytes(&mut s.ed25519);
            rng.fill_bytes(&mut s.x25519);
            s
        })?;
        let id = device_id_of(&secrets);
        let login = store.login()?;
        Ok(Device {
            store,
            identity: Identity::new(secrets, id, login),
            docs: BTreeMap::new(),
            doc_order: Vec::new(),
            rng,
            clock: system_now_ms,
            stale_creations: Default::default(),
            fresh: BTreeMap::new(),
            rekey_sent: None,
            relook: Default::default(),
            secret_docs: SecretDocs::default(),
        })
    }

    /// Replaces the clock (milliseconds since the Unix epoch), for deterministic tests.
    pub fn set_clock(&mut self, clock: fn() -> i64) {
        self.clock = clock;
    }

    pub(crate) fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Number of sealed deltas waiting for the relay.
    pub fn outbox_len(&self) -> usize {
        self.store.outbox_len()
    }

    pub(crate) fn doc(&mut self, chat: ChatId) -> Result<&mut ChatDoc, Error> {
        if !self.docs.contains_key(&chat) {
            if self.store.chat(chat)?.is_none() {
                return Err(Error::UnknownChat(chat));
            }
            let (snap, changes) = self.store.doc_parts(chat)?;
            let doc = ChatDoc::load(chat, self.identity.id(), snap.as_deref(), &changes, &self.store.authors(chat)?)?;
            if self.docs.len() >= DOC_CACHE {
                let evict = self.doc_order.remove(0);
                self.docs.remove(&evict);
            }
            self.docs.insert(chat, doc);
            self.doc_order.push(chat);
        }
        Ok(self.docs.get_mut(&chat).expect("inserted above"))
    }

    pub(crate) fn drop_doc(&mut self, chat: ChatId) {
        self.docs.remove(&chat);
        self.doc_order.retain(|c| *c != chat);
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

    /// Creates a notes chat (this account alone) locally: key, genesis document, and two outbox
    /// items, durable before it returns: the chat's creation on the relay and its title delta.
    /// Give both to the sync core in order, with [`crate::core::SyncInput::ChatReady`] at seq 0
    /// ([`Device::create_chat`] does all of it); the creation is retried like any outbox item
    /// until the relay has it. (See [`Device::new_chat_with`] for direct chats and groups.)
    pub fn new_chat(&mut self, title: &str) -> Result<(ChatId, Vec<OutboxItem>), Error> {
        self.new_chat_with(ChatKind::Notes, title, &[])
    }

    /// Writes a message: edits the document, seals the change, and stores both and the outbox
    /// item durably. Sending is the session's job. (See [`Device::write_local`] for replies,
    /// edits, deletes and reactions.)
    pub fn compose(&mut self, chat: ChatId, text: &str) -> Result<(Message, OutboxItem), Error> {
        self.write_local(chat, &MessageOp::Send { text: text.to_string(), reply_to: None })
    }

    fn seal_and_store(&mut self, chat: ChatId, change: &[u8]) -> Result<OutboxItem, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let (epoch, key) = meta.current().ok_or(Error::UnknownChat(chat))?;
        let client_seq = self.store.next_client_seq()?;
        let ad = DeltaAd { chat, epoch, device: self.identity.id(), account: self.login()?.account.id, client_seq };
        let sealed = seal_delta(&key.transport(), &ad, change, &mut self.rng);
        let item = OutboxItem { client_seq, chat, epoch, body: OutboxBody::Delta { sealed, plain: change.to_vec() } };
        let stored = self.store.store_local(chat, change, &item)?;
        self.store.barrier()?;
        self.maybe_compact(chat, stored)?;
        Ok(item)
    }

    /// Rewrites the chat's snapshot once `stored` changes pile up after it.
    fn maybe_compact(&mut self, chat: ChatId, stored: u64) -> Result<(), Error> {
        if stored >= COMPACT_AFTER_CHANGES {
            let doc = self.doc(chat)?;
            let (snap, pending) = (doc.save(), doc.pending_changes());
            self.store.compact(chat, &snap, &pending)?;
        }
        Ok(())
    }

    /// Opens and applies a delta from the relay and moves the chat's cursor past it. A delta
    /// that fails to open or apply is skipped (the cursor still moves) and reported as an error;
    /// it never stalls the chat.
    pub(crate) fn apply_delta(&mut self, delta: &Delta) -> Result<DocUpdate, Error> {
        let meta = self.store.chat(delta.chat)?.ok_or(Error::UnknownChat(delta.chat))?;
        let opened = match meta.transport(delta.epoch) {
            // From before this account joined (or while it was away), and not shared with it:
            // passed over.
            None if meta.current().is_some_and(|(e, _)| delta.epoch < e) => {
                self.store.apply_remote(delta.chat, delta.seq, None)?;
                return Ok(DocUpdate::default());
            }
            // A new epoch whose key is still on its way in the account log (the relay only
            // stores deltas under epochs it has): the cursor stays, the delta comes again.
            None => return Err(Error::NoKeyYet(delta.chat, delta.epoch)),
            Some(key) => crate::proto::crypto::open_delta(&key, &delta.ad(), &delta.sealed).map_err(Error::from),
        };
        let plain = match opened {
            Ok(p) => p,
            Err(e) => {
                self.store.apply_remote(delta.chat, delta.seq, None)?;
                return Err(e);
            }
        };
        let from = Author { account: delta.account, device: delta.device.clone() };
        if !self.doc(delta.chat)?.knows_author(&from) {
            self.store.put_author(delta.chat, &from)?;
        }
        let doc = self.doc(delta.chat)?;
        match doc.apply_untrusted_update(&plain, &from) {
            Ok(update) => {
                let stored = self.store.apply_remote(delta.chat, delta.seq, Some(&plain))?;
                self.maybe_compact(delta.chat, stored)?;
                Ok(DocUpdate {
                    added: self.reveal(delta.chat, update.added)?,
                    changed: self.reveal(delta.chat, update.changed)?,
                    read: update.read,
                })
            }
            Err(e) => {
                if doc.is_poisoned() {
                    self.drop_doc(delta.chat);
                }
                self.store.apply_remote(delta.chat, delta.seq, None)?;
                Err(e.into())
            }
        }
    }

    /// Deletes the account's keys and data and this device's identity from the store, durably,
    /// and logs out (after the account ended this device's session).
    pub fn wipe_account(&mut self) -> Result<(), Error> {
        self.docs.clear();
        self.doc_order.clear();
        self.secret_docs.clear();
        self.identity.log_out();
        self.store.clear()?;
        self.store.wipe()?;
        Ok(())
    }

    /// Applies an account log entry and moves the account cursor past it (also when the entry
    /// is refused: a bad entry must not stall the log). Every signature is checked against the
    /// generation of the account's keys that the log has reached at the entry.
    pub(crate) fn apply_account_entry(&mut self, entry: &AccountEntry) -> Result<Applied, Error> {
        let mut next_gen = None;
        let result = self.apply_account_event(&entry.event, &mut next_gen);
        self.store.advance_account_log(entry.seq, next_gen.as_ref())?;
        result
    }

    /// Applies one account log event; a rotation sets `next_gen`, which the caller stores with
    /// the cursor.
    fn apply_account_event(
        &mut self,
        event: &AccountEvent,
        next_gen: &mut Option<AccountGen>,
    ) -> Result<Applied, Error> {
        let gen = self.log_gen()?;
        match event {
            AccountEvent::DeviceAdded { cert } => {
                cert.verify(&gen)?;
                self.store.put_device(cert)?;
            }
            AccountEvent::DeviceRevoked { revocation } => {
                // Checked here too: the relay's word is not enough to drop a device.
                revocation.verify(&gen)?;
                self.session_ended(&revocation.body.device)?;
            }
            AccountEvent::DeviceExpired { device, .. } => {
                // The relay's decision (the account set the time-to-live); it can refuse any
                // device anyway, so there is nothing to check it against. Nobody rotated the
                // keys: the devices that stay do (`Rotate`), the first one the relay takes.
                self.session_ended(device)?;
                if device != self.identity.id() {
                    self.store.set_rotation_due(true)?;
                    return Ok(Applied { rotation_due: Some(true), ..Applied::default() });
                }
            }
            AccountEvent::ChatAdded { terms, key, signer, signer_chain } => {
                return self.apply_chat_key(terms, key, *signer, signer_chain.as_ref(), &gen);
            }
            AccountEvent::MembersChanged { change, by_chain } => {
                return self.apply_member_change(change, by_chain.as_ref(), &gen);
            }
            AccountEvent::Rotated { rotation } => return self.apply_rotation(rotation, &gen, next_gen),
            AccountEvent::RecoverySet { public, by, signature } => {
                gen.verify_recovery(public, by, signature)?;
                self.store.set_recovery_public(Some(&(*public, by.clone())))?;
            }
        }
        Ok(Applied::default())
    }

    /// Forgets a device whose session ended (and the recovery key it made: the relay withdrew it).
    fn session_ended(&mut self, device: &DeviceId) -> Result<(), Error> {
        if device != self.identity.id() {
            self.store.remove_device(device)?;
        }
        if self.store.recovery_public()?.is_some_and(|(_, by)| by == *device) {
            self.store.set_recovery_public(None)?;
        }
        Ok(())
    }

    /// The last seq of `chat` this device applied (or passed).
    pub fn cursor(&self, chat: ChatId) -> Result<Seq, Error> {
        Ok(self.store.cursor(chat)?)
    }
}

fn check_text(text: &str) -> Result<(), Error> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::TooLong(text.len(), MAX_TEXT_BYTES));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::store::Login;
    use crate::proto::cert::AccountKeys;
    use crate::proto::cert::DeviceCertBody;
    use crate::proto::crypto::wrap_chat_key;
    use crate::proto::wire::AccountEntry;

    #[test]
    fn a_chat_key_the_account_did_not_sign_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Device::open(dir.path()).unwrap();
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let account = keys.public();
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: d.id().clone(),
            device_x25519: d.identity.x25519_public(),
            name: "d".into(),
            created_ms: 0,
        });
        d.identity.log_in(Login { account: account.clone(), keys: keys.clone(), cert, relay: "x".into() });

        // The relay knows the account's KEM public key: it can wrap a key of its own.
        let chat = ChatId([1; 16]);
        let relay_key = ChatKey::random(&mut rng);
        let terms = crate::proto::directory::KeyTerms {
            chat,
            kind: ChatKind::Notes,
            epoch: Epoch(0),
            members: [account.id].into(),
        };
        let wrapped = wrap_chat_key(&relay_key, chat, Epoch(0), account.id, &account.kem_key, &mut rng);
        let entry = |seq, signer, signature| AccountEntry {
            seq: Seq(seq),
            event: AccountEvent::ChatAdded {
                terms: terms.clone(),
                key: WrappedKey { account: account.id, generation: 0, content: true, key: wrapped.clone(), signature },
                signer,
                signer_chain: None,
            },
        };
        let stranger = AccountKeys::generate(&mut rng);
        let forged = stranger.sign_chat_key(&terms, account.id, 0, true, &wrapped);
        assert!(d.apply_account_entry(&entry(1, account.id, forged.clone())).is_err());
        assert!(d.apply_account_entry(&entry(2, stranger.public().id, forged)).is_err());
        assert!(d.apply_account_entry(&entry(3, account.id, vec![0; 64])).is_err());
        assert!(d.store.chat(chat).unwrap().is_none(), "no key was taken");

        let signed = keys.sign_chat_key(&terms, account.id, 0, true, &wrapped);
        assert_eq!(d.apply_account_entry(&entry(4, account.id, signed)).unwrap().chat, Some(chat));
        assert!(d.store.chat(chat).unwrap().is_some());
    }
}
