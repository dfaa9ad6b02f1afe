//! The device's local store: sled, with a real fsync barrier for the outbox.
//!
//! Trees (integers big-endian):
//! * `meta`: `identity`, `login`, `next_client_seq`, `account_cursor`, `account_gen` (the
//!   generation of the account's keys the account log has reached at the cursor),
//!   `recovery_public` (the recovery key's public half, if the account has one),
//!   `rotation_due` (present while a session expired and no rotation followed)
//! * `chats`: chat id → [`ChatMeta`] (kind, keys per epoch)
//! * `cursors`: chat id → last applied seq
//! * `snapshots`: chat id → saved Automerge document
//! * `changes`: chat id ‖ n → Automerge change bytes applied since the snapshot (and the
//!   changes still waiting for their dependencies)
//! * `authors`: chat id ‖ device id → [`Author`] of the changes that device sent (the account
//!   the relay stamped on its deltas), for the authorship checks of changes applied on loading
//! * `secrets`, `secret_docs`, `secret_changes`, `secret_keys`, `secret_undelivered`,
//!   `secret_timers`, `secret_closed`: secret chats (see `store_secret.rs`)
//! * `outbox`: client seq → [`OutboxItem`] (sealed, with its plaintext change for resealing
//!   after a rotation, waiting for the relay's ack)
//! * `sent`: client seq → [`OutboxItem`] the relay acknowledged, the newest [`SENT_KEPT`], to be
//!   sent again if the relay is restored from a backup that lacks them (`meta` key
//!   `incarnation`: the relay incarnation this device last synced with)
//! * `devices`: device id → certificate of a device of this account
//! * `contacts`: account id → [`Contact`] (another account's keys, as far as seen)
//! * `pins`: username → the account id first seen under it
//! * `account_chain`: seq → the account log's hash chain up to that entry (see
//!   `store_chain.rs`)
//!
//! `meta` also keeps `rekey_due`: the chats whose members changed, whose next key epoch this
//! device is to start, and `format`: the store's format version (see `store_format.rs`).
//!
//! A remote change and the cursor that passes it are written in one transaction, so a crash
//! never skips a delta; re-applying one is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::device::doc::Author;
use crate::device::kv::{in_order, Journal, MemDisk, Tree};
use serde::{Deserialize, Serialize};

#[path = "store_chain.rs"]
mod chain;
#[path = "store_changes.rs"]
mod changes;
#[path = "store_format.rs"]
mod format;
#[path = "store_outbox.rs"]
mod outbox;
#[path = "store_secret.rs"]
mod secret;
use crate::proto::cert::{AccountGen, AccountKeys, AccountPublic, DeviceCert};
use crate::proto::crypto::ChatKey;
use crate::proto::directory::AccountChain;
use crate::proto::durable::SledDir;
use crate::proto::ids::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};
use crate::proto::wire::{ChatKind, Incarnation, WrappedKey};
pub use format::STORE_FORMAT;
pub use secret::{MessageKey, SecretChat, SecretState};

/// How many changes pile up after a chat's snapshot before the snapshot is rewritten.
pub const COMPACT_AFTER_CHANGES: u64 = 2048;

/// A failing local store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed.
    #[error("local store: {0}")]
    Sled(#[from] sled::Error),
    /// fsync failed: what was written last may not be durable.
    #[error("local store: fsync failed: {0}")]
    Sync(std::io::Error),
    /// A stored record did not decode.
    #[error("local store: record {0} is corrupt")]
    Corrupt(&'static str),
    /// The store was written by a newer version, in a format this one does not know; nothing
    /// was changed (see `store_format.rs`).
    #[error("local store: store format v{found} is newer than this version supports (v{supported}); upgrade")]
    NewerFormat { found: u32, supported: u32 },
    /// An atomic write failed part-way: no other is made until the store is opened again,
    /// which finishes it (see `kv.rs`).
    #[error("local store: an earlier write failed part-way; open the store again to finish it")]
    Unfinished,
}

/// This device's secret keys.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceSecrets {
    /// Ed25519 secret of the libp2p identity (the PeerId is the DeviceId).
    pub ed25519: [u8; 32],
    /// X25519 static secret.
    pub x25519: [u8; 32],
}

/// What a logged-in device keeps about its account.
#[derive(Clone, Serialize, Deserialize)]
pub struct Login {
    /// The account's public keys.
    pub account: AccountPublic,
    /// The account bundle.
    pub keys: AccountKeys,
    /// This device's certificate.
    pub cert: DeviceCert,
    /// The relay's multiaddrs, each `…/p2p/<peer id>`, separated by spaces, in the order a
    /// device tries them (see [`crate::net::parse_relay_addrs`]). One string rather than a
    /// list so that logins stored before devices kept several addresses still decode: the
    /// stored records carry no format version yet.
    pub relay: String,
}

/// What the device knows of a chat besides its document.
#[derive(Clone, Serialize, Deserialize)]
pub struct ChatMeta {
    /// Its kind.
    pub kind: ChatKind,
    /// Chat keys by epoch.
    pub keys: BTreeMap<Epoch, ChatKey>,
    /// Transport keys of epochs from before this account joined, when it joined without the
    /// history: its deltas open (the document needs them) but its messages' texts do not.
    pub transport_only: BTreeMap<Epoch, ChatKey>,
    /// The member accounts, as the newest epoch's key and the member changes since say.
    pub members: BTreeSet<AccountId>,
    /// This account is no longer a member (it left or was removed): the history stays
    /// readable, nothing more is written.
    pub left: bool,
    /// Member changes applied since the newest epoch began.
    pub changes: u32,
}

/// Another account this device has seen: its keys (checked from the account id on) and what
/// the user did about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The longest chain of the account's keys seen; a shorter or different one is refused.
    pub chain: AccountChain,
    /// The username the directory gave it when it was pinned, if looked up by name.
    pub username: Option<String>,
    /// The user compared safety numbers and confirmed it.
    pub verified: bool,
}

/// A chat whose members changed: this device starts the next key epoch once it can.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyDue {
    /// Accounts added since the last epoch: they get the earlier epochs' transport keys.
    pub joining: BTreeSet<AccountId>,
    /// Those of them added with their history: they get the earlier epochs' keys whole.
    pub share_with: BTreeSet<AccountId>,
}

impl ChatMeta {
    /// The newest epoch and its key; new deltas are sealed with it.
    pub fn current(&self) -> Option<(Epoch, &ChatKey)> {
        self.keys.iter().next_back().map(|(e, k)| (*e, k))
    }

    /// The key `epoch`'s deltas are sealed under, if this device has it.
    pub fn transport(&self, epoch: Epoch) -> Option<ChatKey> {
        self.keys.get(&epoch).map(ChatKey::transport).or_else(|| self.transport_only.get(&epoch).cloned())
    }
}

/// Something the relay must get from this device, in client-seq order, kept until it is
/// acknowledged: a sealed delta, or the creation of a chat (which must reach the relay before
/// the chat's first delta, and survive a lost reply just as a delta does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Its client seq.
    pub client_seq: ClientSeq,
    /// The chat.
    pub chat: ChatId,
    /// Key epoch (of the delta's seal, or the chat's first epoch).
    pub epoch: Epoch,
    /// What it is.
    pub body: OutboxBody,
}

/// What an [`OutboxItem`] carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxBody {
    /// A delta, sent as `Append`.
    Delta {
        /// `nonce || ciphertext+tag`, sealed under the item's epoch.
        sealed: Vec<u8>,
        /// The Automerge change it seals: after a rotation the device seals it again under
        /// the chat's new epoch (the relay refuses the old one).
        plain: Vec<u8>,
    },
    /// A new chat, sent as `CreateChat`; the relay answers a retry like the first request.
    CreateChat {
        /// Its kind.
        kind: ChatKind,
        /// The first epoch's key wrapped to each member, signed by this account.
        keys: Vec<WrappedKey>,
    },
}

/// How many acknowledged outbox items a device keeps (tree `sent`) to send again to a relay
/// restored from an older backup; older ones are dropped as new ones are acknowledged. The
/// relay's own dedup window is as long (`DEDUP_WINDOW`), and a restore from a backup older than
/// a device's last 1,024 writes loses those beyond it unless another device still has them in
/// its documents (docs/protocol.md, "Restores").
pub const SENT_KEPT: usize = 1024;

/// A chat's saved snapshot (if any) and the changes stored after it, in order.
pub type DocParts = (Option<Vec<u8>>, Vec<Vec<u8>>);

/// A delta of a chat as the store keeps it: its seq, and its change (`None` for one passed
/// over, which only moves the cursor).
pub type RemoteEntry<'a> = (Seq, Option<&'a [u8]>);

/// The device's sled database.
pub struct DeviceStore {
    backend: Backend,
    meta: Tree,
    chats: Tree,
    cursors: Tree,
    snapshots: Tree,
    changes: Tree,
    outbox: Tree,
    sent: Tree,
    devices: Tree,
    contacts: Tree,
    pins: Tree,
    authors: Tree,
    secrets: Tree,
    secret_docs: Tree,
    secret_keys: Tree,
    secret_changes: Tree,
    secret_undelivered: Tree,
    secret_timers: Tree,
    secret_closed: Tree,
    account_chain: Tree,
    /// Where atomic batches over these trees go first (see `kv.rs`).
    journal: Journal,
    /// The number of each chat's next change in `changes`, once looked up (a backwards scan
    /// per change stored was a few percent of a busy session's time).
    next_change: std::sync::Mutex<BTreeMap<ChatId, u64>>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("serializing a stored record cannot fail")
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|_| StoreError::Corrupt(what))
}

fn u64_of(b: &[u8], what: &'static str) -> Result<u64, StoreError> {
    let a: [u8; 8] = b.try_into().map_err(|_| StoreError::Corrupt(what))?;
    Ok(u64::from_be_bytes(a))
}

/// A document's snapshot (in `snaps`) and the changes stored after it (in `changes`), in order.
pub(super) fn doc_parts_in(snaps: &Tree, changes: &Tree, chat: ChatId) -> Result<DocParts, StoreError> {
    let snap = snaps.get(chat.0)?.map(|v| v.to_vec());
    let changes = changes.scan_prefix(chat.0).map(|kv| Ok(kv?.1.to_vec())).collect::<Result<_, StoreError>>()?;
    Ok((snap, changes))
}

/// The number the next change of `chat` in `changes` gets.
pub(super) fn next_change_in(changes: &Tree, chat: ChatId) -> Result<u64, StoreError> {
    match changes.scan_prefix(chat.0).next_back() {
        Some(kv) => Ok(u64_of(&kv?.0[16..], "change key")? + 1),
        None => Ok(0),
    }
}

/// Replaces a document's snapshot and drops the changes it covers, keeping `pending` (see
/// [`DeviceStore::compact`]).
pub(super) fn compact_in(
    journal: &Journal,
    snaps: &Tree,
    changes: &Tree,
    chat: ChatId,
    snapshot: &[u8],
    pending: &[Vec<u8>],
) -> Result<(), StoreError> {
    let keys: Vec<sled::IVec> = changes.scan_prefix(chat.0).keys().collect::<Result<_, _>>()?;
    journal.atomic(&[snaps, changes], |b| {
        b.insert(0, chat.0, snapshot);
        for k in &keys {
            b.remove(1, k);
        }
        // From 0 again: the count of changes after the snapshot is what triggers the next
        // compaction.
        for (n, c) in (0..).zip(pending) {
            b.insert(1, change_key(chat, n), &c[..]);
        }
    })
}

pub(super) fn change_key(chat: ChatId, n: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&chat.0);
    k[16..].copy_from_slice(&n.to_be_bytes());
    k
}

/// A store's barrier, apart from the store ([`DeviceStore::barrier_handle`]).
pub struct Barrier(BarrierOf);

enum BarrierOf {
    Sled(sled::Db, std::sync::Arc<SledDir>),
    Mem(MemDisk),
}

impl Barrier {
    /// [`DeviceStore::barrier`].
    pub fn barrier(&self) -> Result<(), StoreError> {
        match &self.0 {
            BarrierOf::Sled(db, files) => {
                db.flush()?;
                files.sync().map_err(StoreError::Sync)
            }
            BarrierOf::Mem(disk) => {
                disk.barrier();
                Ok(())
            }
        }
    }
}

/// Where a store's trees live.
enum Backend {
    Sled { db: sled::Db, files: std::sync::Arc<SledDir>, dir: std::path::PathBuf },
    Mem(MemDisk),
}

impl DeviceStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().path(dir).open()?, dir)
    }

    fn from_db(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
        let store = DeviceStore {
            meta: Tree::sled(&db, "meta")?,
            chats: Tree::sled(&db, "chats")?,
            cursors: Tree::sled(&db, "cursors")?,
            snapshots: Tree::sled(&db, "snapshots")?,
            changes: Tree::sled(&db, "changes")?,
            outbox: Tree::sled(&db, "outbox")?,
            sent: Tree::sled(&db, "sent")?,
            devices: Tree::sled(&db, "devices")?,
            contacts: Tree::sled(&db, "contacts")?,
            pins: Tree::sled(&db, "pins")?,
            authors: Tree::sled(&db, "authors")?,
            secrets: Tree::sled(&db, "secrets")?,
            secret_docs: Tree::sled(&db, "secret_docs")?,
            secret_keys: Tree::sled(&db, "secret_keys")?,
            secret_changes: Tree::sled(&db, "secret_changes")?,
            secret_undelivered: Tree::sled(&db, "secret_undelivered")?,
            secret_timers: Tree::sled(&db, "secret_timers")?,
            secret_closed: Tree::sled(&db, "secret_closed")?,
            account_chain: Tree::sled(&db, "account_chain")?,
            journal: Journal::new(Tree::sled(&db, "journal")?),
            next_change: Default::default(),
            backend: Backend::Sled { files: std::sync::Arc::new(SledDir::new(dir)), dir: dir.to_path_buf(), db },
        };
        store.open_format()?;
        store.index_secret_keys()?;
        Ok(store)
    }

    /// Opens (or creates) the store on a memory disk (the simulator's): what it wrote before
    /// the disk's last crash and barrier is there.
    pub fn open_mem(disk: &MemDisk) -> Result<Self, StoreError> {
        let store = DeviceStore {
            meta: Tree::mem(disk, "meta"),
            chats: Tree::mem(disk, "chats"),
            cursors: Tree::mem(disk, "cursors"),
            snapshots: Tree::mem(disk, "snapshots"),
            changes: Tree::mem(disk, "changes"),
            outbox: Tree::mem(disk, "outbox"),
            sent: Tree::mem(disk, "sent"),
            devices: Tree::mem(disk, "devices"),
            contacts: Tree::mem(disk, "contacts"),
            pins: Tree::mem(disk, "pins"),
            authors: Tree::mem(disk, "authors"),
            secrets: Tree::mem(disk, "secrets"),
            secret_docs: Tree::mem(disk, "secret_docs"),
            secret_keys: Tree::mem(disk, "secret_keys"),
            secret_changes: Tree::mem(disk, "secret_changes"),
            secret_undelivered: Tree::mem(disk, "secret_undelivered"),
            secret_timers: Tree::mem(disk, "secret_timers"),
            secret_closed: Tree::mem(disk, "secret_closed"),
            account_chain: Tree::mem(disk, "account_chain"),
            journal: Journal::new(Tree::mem(disk, "journal")),
            next_change: Default::default(),
            backend: Backend::Mem(disk.clone()),
        };
        store.open_format()?;
        store.index_secret_keys()?;
        Ok(store)
    }

    /// Makes everything written so far durable across power loss (sled's own flush is not).
    pub fn barrier(&self) -> Result<(), StoreError> {
        self.barrier_handle().barrier()
    }

    /// What makes this store's writes durable, apart from the store: a driver runs
    /// [`Barrier::barrier`] on a thread where waiting for the disk blocks nothing else.
    pub fn barrier_handle(&self) -> Barrier {
        match &self.backend {
            Backend::Sled { db, files, .. } => Barrier(BarrierOf::Sled(db.clone(), files.clone())),
            Backend::Mem(disk) => Barrier(BarrierOf::Mem(disk.clone())),
        }
    }

    /// The device's secrets, creating them with `make` on first use.
    pub fn secrets_or_create(&self, make: impl FnOnce() -> DeviceSecrets) -> Result<DeviceSecrets, StoreError> {
        if let Some(v) = self.meta.get("identity")? {
            return dec(&v, "identity");
        }
        let s = make();
        self.meta.insert("identity", enc(&s))?;
        self.barrier()?;
        Ok(s)
    }

    /// The login, if this device belongs to an account.
    pub fn login(&self) -> Result<Option<Login>, StoreError> {
        self.meta.get("login")?.map(|v| dec(&v, "login")).transpose()
    }

    /// Stores the login durably.
    pub fn set_login(&self, login: &Login) -> Result<(), StoreError> {
        self.meta.insert("login", enc(login))?;
        self.barrier()
    }

    /// An account made here but not yet confirmed by the relay.
    pub fn pending_login(&self) -> Result<Option<Login>, StoreError> {
        self.meta.get("pending_login")?.map(|v| dec(&v, "pending login")).transpose()
    }

    /// Keeps an account made here until the relay confirms it.
    pub fn set_pending_login(&self, login: &Login) -> Result<(), StoreError> {
        self.meta.insert("pending_login", enc(login))?;
        self.barrier()
    }

    /// The one-time secret of this device's link code, if one was made.
    pub fn link_secret(&self) -> Result<Option<[u8; 16]>, StoreError> {
        self.meta
            .get("link_secret")?
            .map(|v| v.as_ref().try_into().map_err(|_| StoreError::Corrupt("link secret")))
            .transpose()
    }

    /// Keeps the link code's secret durably.
    pub fn set_link_secret(&self, secret: &[u8; 16]) -> Result<(), StoreError> {
        self.meta.insert("link_secret", &secret[..])?;
        self.barrier()
    }

    /// Cursor of the account log.
    pub fn account_cursor(&self) -> Result<Seq, StoreError> {
        Ok(Seq(self.meta.get("account_cursor")?.map(|v| u64_of(&v, "account cursor")).transpose()?.unwrap_or(0)))
    }

    /// The generation of the account's keys the account log has reached, if recorded (the
    /// account's genesis until the first rotation).
    pub fn account_gen(&self) -> Result<Option<AccountGen>, StoreError> {
        self.meta.get("account_gen")?.map(|v| dec(&v, "account generation")).transpose()
    }

    /// Moves the account cursor and, with a rotation, the generation the log has reached, in
    /// one write: a crash between the two would leave the log's generation ahead of the entry
    /// that starts it, which then fails its check when it is applied again.
    /// The chain's hash after the entry (`chain`, when known) goes in the same write.
    pub fn advance_account_log(
        &self,
        seq: Seq,
        gen: Option<&AccountGen>,
        chain: Option<&crate::proto::account_chain::ChainHash>,
    ) -> Result<(), StoreError> {
        self.journal.atomic(&[&self.meta, &self.account_chain], |b| {
            b.insert(0, "account_cursor", &seq.0.to_be_bytes()[..]);
            if let Some(g) = gen {
                b.insert(0, "account_gen", enc(g));
            }
            if let Some(h) = chain {
                b.insert(1, seq.0.to_be_bytes(), &h.0[..]);
            }
        })
    }

    /// The account's recovery key's public half and the device that made it, if any.
    pub fn recovery_public(&self) -> Result<Option<([u8; 32], DeviceId)>, StoreError> {
        self.meta.get("recovery_public")?.map(|v| dec(&v, "recovery public key")).transpose()
    }

    /// Records (or with `None` forgets) the account's recovery key's public half.
    pub fn set_recovery_public(&self, value: Option<&([u8; 32], DeviceId)>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.meta.insert("recovery_public", enc(v))?,
            None => self.meta.remove("recovery_public")?,
        };
        Ok(())
    }

    /// Whether a session of the account expired and no rotation followed yet.
    pub fn rotation_due(&self) -> Result<bool, StoreError> {
        self.flag("rotation_due")
    }

    /// Records whether the account's keys are due a rotation.
    pub fn set_rotation_due(&self, due: bool) -> Result<(), StoreError> {
        self.set_flag("rotation_due", due)
    }

    /// When this device last had a session with the relay, by its own clock (ms since the Unix
    /// epoch; 0: never recorded). An expiry of its session is believed only after long enough
    /// without one (see `Device::session_end_proven`).
    pub fn last_reached_ms(&self) -> Result<i64, StoreError> {
        let v = self.meta.get("last_reached_ms")?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map_or(0, i64::from_be_bytes))
    }

    /// Records when this device last had a session with the relay.
    pub fn set_last_reached_ms(&self, ms: i64) -> Result<(), StoreError> {
        self.meta.insert("last_reached_ms", &ms.to_be_bytes()[..])?;
        Ok(())
    }

    /// A yes/no setting in `meta` (present: yes).
    pub(super) fn flag(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.meta.get(name)?.is_some())
    }

    pub(super) fn set_flag(&self, name: &str, on: bool) -> Result<(), StoreError> {
        match on {
            true => self.meta.insert(name, &[1u8][..])?,
            false => self.meta.remove(name)?,
        };
        Ok(())
    }

    /// Chats whose next key epoch this device is to start (their members changed).
    pub fn rekey_due(&self) -> Result<BTreeMap<ChatId, RekeyDue>, StoreError> {
        Ok(self.meta.get("rekey_due")?.map(|v| dec(&v, "rekeys due")).transpose()?.unwrap_or_default())
    }

    /// Records the chats whose next key epoch is due.
    pub fn set_rekey_due(&self, due: &BTreeMap<ChatId, RekeyDue>) -> Result<(), StoreError> {
        match due.is_empty() {
            true => self.meta.remove("rekey_due")?,
            false => self.meta.insert("rekey_due", enc(due))?,
        };
        Ok(())
    }

    /// Stores a chat's metadata and the chats due a new epoch in one write (a member change:
    /// applied again after a crash, it must find both or neither).
    pub fn put_chat_and_rekey_due(
        &self,
        chat: ChatId,
        meta: &ChatMeta,
        due: &BTreeMap<ChatId, RekeyDue>,
    ) -> Result<(), StoreError> {
        self.journal.atomic(&[&self.chats, &self.meta], |b| {
            b.insert(0, chat.0, enc(meta));
            match due.is_empty() {
                true => b.remove(1, "rekey_due"),
                false => b.insert(1, "rekey_due", enc(due)),
            }
        })
    }

    /// Another account's contact record, if this device has seen the account.
    pub fn contact(&self, account: AccountId) -> Result<Option<Contact>, StoreError> {
        self.contacts.get(account.0)?.map(|v| dec(&v, "contact")).transpose()
    }

    /// Records another account's contact record.
    pub fn put_contact(&self, contact: &Contact) -> Result<(), StoreError> {
        self.contacts.insert(contact.chain.id().0, enc(contact))?;
        Ok(())
    }

    /// The account pinned under a username (the first one the directory gave for it).
    pub fn pin(&self, username: &str) -> Result<Option<AccountId>, StoreError> {
        self.pins.get(username)?.map(|v| dec(&v, "pinned account")).transpose()
    }

    /// Pins `account` under `username`.
    pub fn set_pin(&self, username: &str, account: AccountId) -> Result<(), StoreError> {
        self.pins.insert(username, enc(&account))?;
        Ok(())
    }

    /// Records a device certificate of this account.
    pub fn put_device(&self, cert: &DeviceCert) -> Result<(), StoreError> {
        self.devices.insert(cert.body.device.0.as_bytes(), enc(cert))?;
        Ok(())
    }

    /// Forgets a device of the account (its session was ended).
    pub fn remove_device(&self, device: &DeviceId) -> Result<(), StoreError> {
        self.devices.remove(device.0.as_bytes())?;
        Ok(())
    }

    /// Every tree of the store but the journal.
    fn trees(&self) -> [&Tree; 19] {
        [
            &self.meta,
            &self.chats,
            &self.cursors,
            &self.snapshots,
            &self.changes,
            &self.outbox,
            &self.sent,
            &self.devices,
            &self.contacts,
            &self.pins,
            &self.authors,
            &self.secrets,
            &self.secret_docs,
            &self.secret_keys,
            &self.secret_changes,
            &self.secret_undelivered,
            &self.secret_timers,
            &self.secret_closed,
            &self.account_chain,
        ]
    }

    /// Empties every tree, durably: the account's keys and data and this device's identity.
    /// The files still hold old pages; [`DeviceStore::remove_files`] takes them away once this
    /// store is dropped.
    pub fn clear(&self) -> Result<(), StoreError> {
        for tree in self.trees() {
            tree.clear()?;
        }
        self.next_change_cache().clear();
        self.barrier()
    }

    /// Replaces this store with an empty one that stands in for it until the device is dropped,
    /// and removes the old one's files (see [`DeviceStore::remove_files`]). Call
    /// [`DeviceStore::clear`] first.
    pub fn wipe(&mut self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled { dir, .. } => {
                let dir = dir.clone();
                let tmp = std::env::temp_dir().join(format!("stratus-wiped-{:016x}", rand::random::<u64>()));
                let db = sled::Config::new().path(&tmp).temporary(true).open()?;
                drop(std::mem::replace(self, Self::from_db(db, &tmp)?));
                Self::remove_files(&dir)
            }
            Backend::Mem(disk) => {
                let disk = disk.clone();
                // The stand-in lives on a disk of its own, as sled's does in a temporary place.
                *self = Self::open_mem(&MemDisk::new())?;
                disk.wipe();
                Ok(())
            }
        }
    }

    /// Removes a store's files once sled has let go of them (after every handle was dropped, sled
    /// finishes in a background thread and then releases its lock; removing the files earlier
    /// would let that thread write them again). Blocks the files occupied are not overwritten:
    /// protecting freed blocks at rest is the disk encryption's job.
    pub fn remove_files(dir: &Path) -> Result<(), StoreError> {
        use fs2::FileExt;
        let db = dir.join("db");
        for _ in 0..1000 {
            let file = match std::fs::OpenOptions::new().read(true).write(true).open(&db) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(StoreError::Sync(e)),
            };
            if file.try_lock_exclusive().is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Sync(e)),
        }
        if let Some(parent) = dir.parent() {
            // The removal itself must survive a power cut.
            std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(StoreError::Sync)?;
        }
        Ok(())
    }

    /// The account's devices known here.
    pub fn devices(&self) -> Result<Vec<DeviceCert>, StoreError> {
        self.devices.iter().map(|kv| dec(&kv?.1, "device")).collect()
    }

    /// Stores a new chat's metadata and the outbox item that creates it on the relay,
    /// atomically; not yet durable, see [`DeviceStore::barrier`].
    pub fn create_chat(&self, chat: ChatId, meta: &ChatMeta, item: &OutboxItem) -> Result<(), StoreError> {
        self.journal.atomic(&[&self.chats, &self.outbox, &self.meta], |b| {
            b.insert(0, chat.0, enc(meta));
            b.insert(1, item.client_seq.0.to_be_bytes(), enc(item));
            b.insert(2, "next_client_seq", &(item.client_seq.0 + 1).to_be_bytes()[..]);
        })
    }

    /// Stores a chat's metadata.
    pub fn put_chat(&self, chat: ChatId, meta: &ChatMeta) -> Result<(), StoreError> {
        self.chats.insert(chat.0, enc(meta))?;
        Ok(())
    }

    /// One chat's metadata.
    pub fn chat(&self, chat: ChatId) -> Result<Option<ChatMeta>, StoreError> {
        self.chats.get(chat.0)?.map(|v| dec(&v, "chat")).transpose()
    }

    /// Every chat with its cursor.
    pub fn chats(&self) -> Result<Vec<(ChatId, ChatMeta, Seq)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.chats.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("chat id"))?;
            let chat = ChatId(id);
            out.push((chat, dec(&v, "chat")?, self.cursor(chat)?));
        }
        Ok(out)
    }

    /// A chat's cursor.
    pub fn cursor(&self, chat: ChatId) -> Result<Seq, StoreError> {
        Ok(Seq(self.cursors.get(chat.0)?.map(|v| u64_of(&v, "cursor")).transpose()?.unwrap_or(0)))
    }

    /// Moves a chat's cursor (without a change: for the device's own acknowledged deltas).
    pub fn set_cursor(&self, chat: ChatId, seq: Seq) -> Result<(), StoreError> {
        self.cursors.insert(chat.0, &seq.0.to_be_bytes())?;
        Ok(())
    }

    /// A chat's snapshot and the changes stored after it, in order.
    pub fn doc_parts(&self, chat: ChatId) -> Result<DocParts, StoreError> {
        doc_parts_in(&self.snapshots, &self.changes, chat)
    }

    fn next_change_cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<ChatId, u64>> {
        self.next_change.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_change_n(&self, chat: ChatId) -> Result<u64, StoreError> {
        if let Some(n) = self.next_change_cache().get(&chat) {
            return Ok(*n);
        }
        let n = next_change_in(&self.changes, chat)?;
        self.next_change_cache().insert(chat, n);
        Ok(n)
    }

    /// The client seq the next local delta gets.
    pub fn next_client_seq(&self) -> Result<ClientSeq, StoreError> {
        Ok(ClientSeq(self.meta.get("next_client_seq")?.map(|v| u64_of(&v, "client seq")).transpose()?.unwrap_or(1)))
    }

    /// Replaces a chat's snapshot and drops the changes it covers, keeping `pending` (the
    /// changes that wait for their dependencies, which a snapshot does not hold).
    pub fn compact(&self, chat: ChatId, snapshot: &[u8], pending: &[Vec<u8>]) -> Result<(), StoreError> {
        self.next_change_cache().remove(&chat);
        compact_in(&self.journal, &self.snapshots, &self.changes, chat, snapshot, pending)
    }

    /// Records who sent a chat's changes from `author.device` (see [`Author`]).
    pub fn put_author(&self, chat: ChatId, author: &Author) -> Result<(), StoreError> {
        self.authors.insert([&chat.0[..], author.device.0.as_bytes()].concat(), enc(author))?;
        Ok(())
    }

    /// Every device that sent changes to a chat, with its account.
    pub fn authors(&self, chat: ChatId) -> Result<Vec<Author>, StoreError> {
        self.authors.scan_prefix(chat.0).map(|kv| dec(&kv?.1, "author")).collect()
    }
}

/// The device id a set of secrets gives.
pub fn device_id_of(secrets: &DeviceSecrets) -> DeviceId {
    let kp = libp2p::identity::Keypair::ed25519_from_bytes(secrets.ed25519)
        .expect("32 bytes are always a valid Ed25519 secret");
    DeviceId(kp.public().to_peer_id().to_string())
}
