//! The relay's store: sled, behind [`RelayStore`], with a real durability barrier.
//!
//! sled 0.34's `flush` ends in `sync_file_range`, which neither flushes the disk's cache nor
//! the file's metadata, and writes large items to `blobs/` without any fsync.
//! [`SledStore::barrier`] therefore calls `flush` and then fdatasyncs sled's data file and new
//! blob files ([`SledDir`]). Writes before a barrier that returned `Ok` survive power loss.
//!
//! Layout (trees; integers big-endian so that keys sort by number):
//! * `accounts`: account id → `AccountPublic`
//! * `devices`: device id → `DeviceCert`
//! * `chats`: chat id → [`TAG`] ‖ `ChatRecord` (a record without the tag is the earlier form,
//!   which held every epoch's keys; it is read as the new one, and rewritten as it on the next
//!   change)
//! * `chat_keys`: chat id ‖ epoch ‖ account id → `WrappedKey` (one record per key, written once)
//! * `deltas`: chat id ‖ seq → `StoredDelta`
//! * `dedup`: blake3(device id) ‖ client seq → chat id ‖ seq
//! * `account_log`: account id ‖ seq → [`TAG`] ‖ `StoredEvent` (key chains stored once, in
//!   `accounts` and `account_gens`, and put back when read), or, without the tag, an
//!   `AccountEvent` as the earlier form stored it
//! * `approved_links`: link id → `ApprovedLink` (until the new device syncs)
//! * `device_state`: device id → `DeviceState` (registration, last activity, revocation)
//! * `account_settings`: account id → `AccountSettings` (session time-to-live)
//! * `recovery`: recovery lookup id → `RecoveryRecord` (the bundle sealed under a recovery key)
//! * `account_gens`: account id ‖ generation → `SignedGen` (the public keys of each rotation,
//!   signed by the generation before)
//! * `usernames`: account id → its username in the directory
//! * `usage`: account id → bytes it has stored (its quota's count), big-endian u64
//! * `session_ends`: device id → the `AccountEntry` that ended its session (its proof)
//! * `accepted`: account id ‖ account id → nothing (the first accepts chats from the second)
//! * `invitations`: invitee id ‖ inviter id → when it was made, big-endian u64 ms
//! * `meta`: `incarnation` → [`Incarnation`] (made when the store is first opened; a restore
//!   gives it a new generation); `format` → the store's format version (see [`STORE_FORMAT`]
//!   and `store/format.rs`: checked at open, older formats migrated in place, newer refused)
//!   gives it a new generation); `registration` → [`Registration`] (who may make an account;
//!   open when absent)
//! * `account_admin`: account id → [`AccountAdmin`](crate::core::AccountAdmin) (the operator's decisions about it)
//! * `invites`: invite token digest → when it was made, big-endian u64 ms (unused tokens)
//! * `purges`: what a deletion still has to remove from the big trees (below)
//! * `floor_accounts`, `floor_chats`: account or chat id → the lowest head its log had at any
//!   restore ([`Floors`]; written only by [`restore`])
//!
//! Deleting (`StoreOp::DeleteDevice`, `DeleteChat`, `DeleteAccountData`): the small records go
//! in the batch's transaction, and so does a `purges` entry for each range of the big trees to
//! empty (a chat's deltas and keys, a device's dedup index, an account's log), which a sled
//! transaction cannot scan. The relay then empties those ranges a chunk at a time between its
//! batches ([`RelayStore::purge_some`], `store/purge.rs`) and removes each entry once its range
//! is empty; a crash in between leaves the entries, and opening the store finishes them.
//! Nothing is written into such a range again, nor read: the core never reuses a deleted chat's
//! or account's id, nor lets a deleted account's devices back.
//!
//! Backups ([`BackupCopy`]) are copied beside the running relay, which goes on applying
//! batches and hands each to the copy as well; the copy is sealed at a batch boundary, after a
//! barrier, so it holds exactly what was durable then; [`restore`] puts one in place of a
//! stopped relay's store as a new incarnation.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::collections::{BTreeMap, BTreeSet};

use stratus_engine::proto::cert::{AccountPublic, DeviceCert};
use stratus_engine::proto::directory::{AccountChain, SignedGen};
use stratus_engine::proto::durable::SledDir;
use stratus_engine::proto::wire::{
    AccountEntry, AccountEvent, ChatKind, Delta, Incarnation, WrappedKey, MAX_PAGE_BYTES,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

use crate::core::{
    keys_digest, ApprovedLink, ChatRecord, Floors, Recovered, Registration, StoreOp, StoredEvent, DEDUP_WINDOW,
};

/// First byte of a chat record or account log entry in the form this version writes. The
/// earlier forms are plain postcard, which starts with a small enum index or varint, never
/// this.
pub const TAG: u8 = 0xFE;

/// The page cache sled may hold, in its own accounting. With sled's default (1 GiB) it kept
/// every page written since the relay started: one account appending 64 KiB deltas up to its
/// quota grew the relay's RSS with each byte stored (sled alone: 1.5 GiB of RSS for 1.5 GiB
/// written). With any capacity from 8 to 256 MiB sled alone levels off near 300 MiB, and the
/// relay grew by 267 MiB for 512 MiB stored instead of 582 MiB (`relay_abuse`, see
/// docs/benchmarks.md). Reads past the cache come from the OS page cache.
pub const STORE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A failing store. The relay stops acknowledging when it sees one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// The fsync barrier failed: nothing written since the last good barrier may be durable.
    #[error("fsync barrier failed: {0}")]
    Barrier(std::io::Error),
    /// Stored bytes did not decode: the data directory is damaged or from another version.
    #[error("stored record {0} is corrupt")]
    Corrupt(&'static str),
    /// A backup could not be made, or a restore could not be carried out (the message says
    /// why and what to do).
    #[error("{0}")]
    Backup(String),
    /// The store was written by a newer relay, in a format this binary does not know; nothing
    /// was changed (see `store/format.rs`).
    #[error("store format v{found} is newer than this binary supports (v{supported}); run the newer stratus-relay")]
    NewerFormat { found: u32, supported: u32 },
}

impl StoreError {
    /// Whether the store failed for lack of space (the disk or the user's disk quota is full):
    /// the relay then stops writing and goes on serving reads instead of stopping.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Sled(sled::Error::Io(e)) | StoreError::Barrier(e) => e,
            _ => return false,
        };
        matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    }
}

/// What the relay needs from a store. Implementations must make [`RelayStore::apply`] atomic and
/// [`RelayStore::barrier`] a real power-loss barrier for everything applied before it began.
pub trait RelayStore: Send + Sync + 'static {
    /// Applies one batch of operations atomically.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Makes everything applied so far durable. Blocking; called off the core task.
    fn barrier(&self) -> Result<(), StoreError>;
    /// Deltas of `chat` with `after < seq <= upto`, at most `max` of them and about
    /// [`MAX_PAGE_BYTES`] of sealed bytes (always at least one if any exist).
    fn read_chat(&self, chat: ChatId, after: Seq, upto: Seq, max: u32) -> Result<Vec<Delta>, StoreError>;
    /// Account log entries with `after < seq <= upto`, at most `max`.
    fn read_account(
        &self,
        account: AccountId,
        after: Seq,
        upto: Seq,
        max: u32,
    ) -> Result<Vec<AccountEntry>, StoreError>;
    /// Everything the core's index needs at start.
    fn recover(&self) -> Result<Recovered, StoreError>;
    /// Begins a backup into the empty directory `to` (see [`BackupCopy`]): the relay's core
    /// task calls it between two batches, then hands the copy to a thread of its own.
    fn backup_begin(&self, to: &Path) -> Result<Box<dyn BackupCopy>, StoreError> {
        let _ = to;
        Err(StoreError::Backup("this store cannot be backed up".into()))
    }
    /// Removes at most `max_keys` keys of the ranges deletions left to empty (see the module
    /// docs); true while some are left. The relay's core task calls it between batches and
    /// while idle, so that a large deletion never holds it for long.
    fn purge_some(&self, max_keys: usize) -> Result<bool, StoreError> {
        let _ = max_keys;
        Ok(false)
    }
    /// Bytes the store takes on disk (for the operator's metrics), `None` when unknown.
    /// Blocking (it may list files); called off the core task.
    fn size_on_disk(&self) -> Option<u64> {
        None
    }
}

#[derive(Serialize, Deserialize)]
struct StoredDelta {
    epoch: Epoch,
    device: DeviceId,
    account: AccountId,
    client_seq: ClientSeq,
    sealed: Vec<u8>,
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    files: SledDir,
    accounts: sled::Tree,
    devices: sled::Tree,
    chats: sled::Tree,
    chat_keys: sled::Tree,
    deltas: sled::Tree,
    dedup: sled::Tree,
    account_log: sled::Tree,
    approved_links: sled::Tree,
    device_state: sled::Tree,
    account_settings: sled::Tree,
    recovery: sled::Tree,
    account_gens: sled::Tree,
    usernames: sled::Tree,
    usage: sled::Tree,
    session_ends: sled::Tree,
    accepted: sled::Tree,
    invitations: sled::Tree,
    account_admin: sled::Tree,
    invites: sled::Tree,
    purges: sled::Tree,
    meta: sled::Tree,
    floor_accounts: sled::Tree,
    floor_chats: sled::Tree,
}

/// A chat record as the earlier form stored it, with every epoch's keys in it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct LegacyChatRecord {
    kind: ChatKind,
    creator: AccountId,
    members: BTreeSet<AccountId>,
    epochs: BTreeMap<Epoch, Vec<WrappedKey>>,
    rekey_due: bool,
    joining: BTreeSet<AccountId>,
    share_with: BTreeSet<AccountId>,
    changes: u32,
}

fn tagged<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![TAG];
    out.extend(enc(v));
    out
}

fn dec_chat(b: &[u8]) -> Result<ChatRecord, StoreError> {
    if let Some(rest) = b.strip_prefix(&[TAG]) {
        return dec(rest, "chat");
    }
    let old: LegacyChatRecord = dec(b, "chat")?;
    Ok(ChatRecord {
        kind: old.kind,
        creator: old.creator,
        members: old.members,
        newest: old.epochs.keys().next_back().copied().unwrap_or_default(),
        genesis_keys: old.epochs.get(&Epoch(0)).map_or([0; 32], |k| keys_digest(k)),
        rekey_due: old.rekey_due,
        joining: old.joining,
        share_with: old.share_with,
        changes: old.changes,
    })
}

fn dec_event(b: &[u8]) -> Result<StoredEvent, StoreError> {
    match b.strip_prefix(&[TAG]) {
        Some(rest) => dec(rest, "account log entry"),
        None => Ok(StoredEvent::Whole(dec(b, "account log entry")?)),
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. A new store gets an incarnation of its own (a
    /// random id, generation 0).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let store = Self::open_only(dir)?;
        store.open_format()?;
        if store.meta.get("incarnation")?.is_none() {
            let incarnation = Incarnation { store: rand::random(), generation: 0 };
            store.meta.insert("incarnation", enc(&incarnation))?;
            store.barrier()?;
        }
        // Deletions a crash interrupted.
        if !store.purges.is_empty() {
            store.purge()?;
            store.barrier()?;
        }
        Ok(store)
    }

    fn open_only(dir: &Path) -> Result<Self, StoreError> {
        Self::open_trees(sled::Config::new().path(dir).cache_capacity(STORE_CACHE_BYTES).open()?, dir)
    }

    fn open_trees(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
        Ok(SledStore {
            meta: db.open_tree("meta")?,
            floor_accounts: db.open_tree("floor_accounts")?,
            floor_chats: db.open_tree("floor_chats")?,
            files: SledDir::new(dir),
            accounts: db.open_tree("accounts")?,
            devices: db.open_tree("devices")?,
            chats: db.open_tree("chats")?,
            chat_keys: db.open_tree("chat_keys")?,
            deltas: db.open_tree("deltas")?,
            dedup: db.open_tree("dedup")?,
            account_log: db.open_tree("account_log")?,
            approved_links: db.open_tree("approved_links")?,
            device_state: db.open_tree("device_state")?,
            account_settings: db.open_tree("account_settings")?,
            recovery: db.open_tree("recovery")?,
            account_gens: db.open_tree("account_gens")?,
            usernames: db.open_tree("usernames")?,
            usage: db.open_tree("usage")?,
            session_ends: db.open_tree("session_ends")?,
            accepted: db.open_tree("accepted")?,
            invitations: db.open_tree("invitations")?,
            account_admin: db.open_tree("account_admin")?,
            invites: db.open_tree("invites")?,
            purges: db.open_tree("purges")?,
            db,
        })
    }
}

fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn dedup_prefix(device: &DeviceId) -> [u8; 32] {
    *blake3::hash(device.0.as_bytes()).as_bytes()
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("serializing a stored record cannot fail")
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|_| StoreError::Corrupt(what))
}

fn chat_key_key(chat: ChatId, epoch: Epoch, account: AccountId) -> Vec<u8> {
    let mut k = Vec::with_capacity(36);
    k.extend_from_slice(&chat.0);
    k.extend_from_slice(&epoch.0.to_be_bytes());
    k.extend_from_slice(&account.0);
    k
}

impl SledStore {
    /// `account`'s chain with its first `rotations` rotations, from the directory's records.
    fn chain(&self, account: AccountId, rotations: u32) -> Result<Option<AccountChain>, StoreError> {
        let Some(public) = self.accounts.get(account.0)? else { return Ok(None) };
        let public: AccountPublic = dec(&public, "account")?;
        let mut gens = Vec::new();
        for kv in self.account_gens.range(seq_key(&account.0, 1)..=seq_key(&account.0, u64::from(rotations))) {
            gens.push(dec::<SignedGen>(&kv?.1, "account generation")?);
        }
        Ok((gens.len() == rotations as usize).then_some(AccountChain { public, rotations: gens }))
    }

    /// The entry as it was sent: its chain put back (chains cached per page in `cache`).
    fn expand(
        &self,
        stored: StoredEvent,
        cache: &mut BTreeMap<(AccountId, u32), Option<AccountChain>>,
    ) -> Result<AccountEvent, StoreError> {
        let mut failed = None;
        let event = stored.expand(|account, n| match cache.entry((account, n)) {
            std::collections::btree_map::Entry::Occupied(c) => c.get().clone(),
            std::collections::btree_map::Entry::Vacant(slot) => match self.chain(account, n) {
                Ok(c) => slot.insert(c).clone(),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            },
        });
        match (event, failed) {
            (_, Some(e)) => Err(e),
            (Some(event), None) => Ok(event),
            (None, None) => Err(StoreError::Corrupt("account log entry's key chain")),
        }
    }
}

/// The key of a record about two accounts.
fn pair_key(a: &AccountId, b: &AccountId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&a.0);
    k[16..].copy_from_slice(&b.0);
    k
}

fn pair_of(key: &[u8]) -> Result<(AccountId, AccountId), StoreError> {
    let k: [u8; 32] = key.try_into().map_err(|_| StoreError::Corrupt("account pair"))?;
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    a.copy_from_slice(&k[..16]);
    b.copy_from_slice(&k[16..]);
    Ok((AccountId(a), AccountId(b)))
}

fn tail_u64(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[key.len() - 8..]);
    u64::from_be_bytes(b)
}

impl RelayStore for SledStore {
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let trees = [
            &self.accounts,
            &self.devices,
            &self.chats,
            &self.deltas,
            &self.dedup,
            &self.account_log,
            &self.approved_links,
            &self.device_state,
            &self.account_settings,
            &self.recovery,
            &self.account_gens,
            &self.usernames,
            &self.chat_keys,
            &self.usage,
            &self.session_ends,
            &self.accepted,
            &self.invitations,
            &self.account_admin,
            &self.invites,
            &self.purges,
            &self.meta,
        ];
        // A batch carries an account's usage once per write that changed it; only the last
        // one of each account is stored (the batch is atomic, so the result is the same).
        let mut last_usage: BTreeMap<AccountId, usize> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            if let StoreOp::PutUsage(a, _) = op {
                last_usage.insert(*a, i);
            }
        }
        let r: Result<(), TransactionError<()>> = trees.transaction(|t: &Vec<TransactionalTree>| {
            let (accounts, devices, chats, deltas, dedup, log, links, states, settings, recovery, gens, names) =
                (&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &t[9], &t[10], &t[11]);
            let (chat_keys, usage, ends, accepted, invitations) = (&t[12], &t[13], &t[14], &t[15], &t[16]);
            let (admin, invites, purges, meta) = (&t[17], &t[18], &t[19], &t[20]);
            for (i, op) in ops.iter().enumerate() {
                match op {
                    StoreOp::PutAccount(a) => {
                        accounts.insert(&a.id.0[..], enc(a))?;
                    }
                    StoreOp::PutDevice(c) => {
                        devices.insert(c.body.device.0.as_bytes(), enc(c))?;
                    }
                    StoreOp::PutChat(id, r) => {
                        chats.insert(&id.0[..], tagged(r))?;
                    }
                    StoreOp::PutChatKeys(chat, epoch, keys) => {
                        for k in keys {
                            chat_keys.insert(chat_key_key(*chat, *epoch, k.account), enc(k))?;
                        }
                    }
                    StoreOp::PutUsage(a, bytes) => {
                        if last_usage.get(a) == Some(&i) {
                            usage.insert(&a.0[..], &bytes.to_be_bytes()[..])?;
                        }
                    }
                    StoreOp::PutDelta(d) => {
                        let stored = StoredDelta {
                            epoch: d.epoch,
                            device: d.device.clone(),
                            account: d.account,
                            client_seq: d.client_seq,
                            sealed: d.sealed.clone(),
                        };
                        deltas.insert(seq_key(&d.chat.0, d.seq.0), enc(&stored))?;
                        dedup.insert(seq_key(&dedup_prefix(&d.device), d.client_seq.0), seq_key(&d.chat.0, d.seq.0))?;
                    }
                    StoreOp::PutAccountEntry(a, e) => {
                        log.insert(seq_key(&a.0, e.seq.0), tagged(&StoredEvent::compact(&e.event)))?;
                    }
                    StoreOp::PutApprovedLink(id, l) => {
                        links.insert(&id[..], enc(l))?;
                    }
                    StoreOp::PutDeviceState(d, s) => {
                        states.insert(d.0.as_bytes(), enc(s))?;
                    }
                    StoreOp::PutAccountSettings(a, s) => {
                        settings.insert(&a.0[..], enc(s))?;
                    }
                    StoreOp::PutRecovery(id, r) => {
                        recovery.insert(&id[..], enc(r))?;
                    }
                    StoreOp::PutAccountGen(g) => {
                        gens.insert(seq_key(&g.body.account.0, u64::from(g.body.generation)), enc(g))?;
                    }
                    StoreOp::PutUsername(a, Some(name)) => {
                        names.insert(&a.0[..], name.as_bytes())?;
                    }
                    StoreOp::PutUsername(a, None) => {
                        names.remove(&a.0[..])?;
                    }
                    StoreOp::DeleteRecovery(id) => {
                        recovery.remove(&id[..])?;
                    }
                    StoreOp::DeleteApprovedLink(id) => {
                        links.remove(&id[..])?;
                    }
                    StoreOp::PutSessionEnd(d, e) => {
                        ends.insert(d.0.as_bytes(), enc(e))?;
                    }
                    StoreOp::PutAccepted(a, b, true) => {
                        accepted.insert(&pair_key(a, b)[..], &[][..])?;
                    }
                    StoreOp::PutAccepted(a, b, false) => {
                        accepted.remove(&pair_key(a, b)[..])?;
                    }
                    StoreOp::PutInvitation(a, b, Some(at)) => {
                        invitations.insert(&pair_key(a, b)[..], &at.to_be_bytes()[..])?;
                    }
                    StoreOp::PutInvitation(a, b, None) => {
                        invitations.remove(&pair_key(a, b)[..])?;
                    }
                    StoreOp::PutAccountAdmin(a, r) => {
                        admin.insert(&a.0[..], enc(r))?;
                    }
                    StoreOp::PutRegistration(r) => {
                        meta.insert("registration", enc(r))?;
                    }
                    StoreOp::PutInvite(digest, Some(at)) => {
                        invites.insert(&digest[..], &at.to_be_bytes()[..])?;
                    }
                    StoreOp::PutInvite(digest, None) => {
                        invites.remove(&digest[..])?;
                    }
                    StoreOp::DeleteDevice(d) => {
                        devices.remove(d.0.as_bytes())?;
                        states.remove(d.0.as_bytes())?;
                        ends.remove(d.0.as_bytes())?;
                        purges.insert(purge_key(PURGE_DEDUP, &dedup_prefix(d)), &[][..])?;
                    }
                    StoreOp::DeleteChat(c) => {
                        chats.remove(&c.0[..])?;
                        purges.insert(purge_key(PURGE_DELTAS, &c.0), &[][..])?;
                        purges.insert(purge_key(PURGE_CHAT_KEYS, &c.0), &[][..])?;
                    }
                    StoreOp::DeleteAccountData(a) => {
                        settings.remove(&a.0[..])?;
                        usage.remove(&a.0[..])?;
                        purges.insert(purge_key(PURGE_ACCOUNT_LOG, &a.0), &[][..])?;
                    }
                    StoreOp::ForgetRedoDeletions => {
                        meta.remove(backup::REDO_DELETIONS)?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match r {
            Ok(()) => {}
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => unreachable!("the transaction never aborts"),
        }
        Ok(())
    }

    fn purge_some(&self, max_keys: usize) -> Result<bool, StoreError> {
        SledStore::purge_some(self, max_keys)
    }

    fn barrier(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.files.sync().map_err(StoreError::Barrier)
    }

    fn read_chat(&self, chat: ChatId, after: Seq, upto: Seq, max: u32) -> Result<Vec<Delta>, StoreError> {
        let mut out = Vec::new();
        if after >= upto {
            return Ok(out);
        }
        let mut bytes = 0usize;
        for kv in self.deltas.range(seq_key(&chat.0, after.0 + 1)..=seq_key(&chat.0, upto.0)) {
            let (k, v) = kv?;
            let s: StoredDelta = dec(&v, "delta")?;
            bytes += s.sealed.len();
            if !out.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            out.push(Delta {
                chat,
                seq: Seq(tail_u64(&k)),
                epoch: s.epoch,
                device: s.device,
                account: s.account,
                client_seq: s.client_seq,
                sealed: s.sealed,
            });
            if out.len() >= max as usize {
                break;
            }
        }
        Ok(out)
    }

    fn read_account(
        &self,
        account: AccountId,
        after: Seq,
        upto: Seq,
        max: u32,
    ) -> Result<Vec<AccountEntry>, StoreError> {
        let mut out = Vec::new();
        if after >= upto {
            return Ok(out);
        }
        let mut bytes = 0;
        let mut chains = BTreeMap::new();
        for kv in self.account_log.range(seq_key(&account.0, after.0 + 1)..=seq_key(&account.0, upto.0)) {
            let (k, v) = kv?;
            // Entries carry member lists and key chains: a page is capped in bytes too, as they
            // are sent (always at least one entry).
            let event = self.expand(dec_event(&v)?, &mut chains)?;
            bytes += postcard::experimental::serialized_size(&event).unwrap_or(MAX_PAGE_BYTES);
            if !out.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            out.push(AccountEntry { seq: Seq(tail_u64(&k)), event });
            if out.len() >= max as usize {
                break;
            }
        }
        Ok(out)
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        let mut r = Recovered::default();
        for kv in self.accounts.iter() {
            let (_, v) = kv?;
            let a: AccountPublic = dec(&v, "account")?;
            let head = match self.account_log.scan_prefix(a.id.0).next_back() {
                Some(kv) => Seq(tail_u64(&kv?.0)),
                None => Seq(0),
            };
            r.account_heads.push((a.id, head));
            r.accounts.push(a);
        }
        for kv in self.devices.iter() {
            let (_, v) = kv?;
            let cert: DeviceCert = dec(&v, "device")?;
            let mut recent = Vec::new();
            for kv in self.dedup.scan_prefix(dedup_prefix(&cert.body.device)).rev().take(DEDUP_WINDOW) {
                let (k, v) = kv?;
                if v.len() != 24 {
                    return Err(StoreError::Corrupt("dedup entry"));
                }
                let mut chat = [0u8; 16];
                chat.copy_from_slice(&v[..16]);
                recent.push((ClientSeq(tail_u64(&k)), ChatId(chat), Seq(tail_u64(&v))));
            }
            recent.reverse();
            r.recent_appends.push((cert.body.device.clone(), recent));
            r.devices.push(cert);
        }
        for kv in self.recovery.iter() {
            let (k, v) = kv?;
            let id: [u8; 32] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("recovery id"))?;
            r.recoveries.push((id, dec(&v, "recovery record")?));
        }
        for kv in self.account_gens.iter() {
            r.account_gens.push(dec(&kv?.1, "account generation")?);
        }
        for kv in self.usernames.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            let name = String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt("username"))?;
            r.usernames.push((AccountId(id), name));
        }
        for kv in self.account_settings.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            r.account_settings.push((AccountId(id), dec(&v, "account settings")?));
        }
        for kv in self.device_state.iter() {
            let (k, v) = kv?;
            let id = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("device id"))?;
            r.device_states.push((DeviceId(id), dec(&v, "device state")?));
        }
        for kv in self.approved_links.iter() {
            let (k, v) = kv?;
            let id: [u8; 32] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("link id"))?;
            let l: ApprovedLink = dec(&v, "approved link")?;
            r.approved_links.push((id, l));
        }
        for kv in self.chats.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("chat id"))?;
            let record = dec_chat(&v)?;
            let head = match self.deltas.scan_prefix(id).next_back() {
                Some(kv) => Seq(tail_u64(&kv?.0)),
                None => Seq(0),
            };
            r.chats.push((ChatId(id), record, head));
        }
        for kv in self.usage.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("usage"))?;
            r.usage.push((AccountId(id), u64::from_be_bytes(bytes)));
        }
        for kv in self.session_ends.iter() {
            let (k, v) = kv?;
            let device = DeviceId(String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("device id"))?);
            r.session_ends.push((device, dec(&v, "session end")?));
        }
        for kv in self.accepted.iter() {
            let (k, _) = kv?;
            r.accepted.push(pair_of(&k)?);
        }
        for kv in self.invitations.iter() {
            let (k, v) = kv?;
            let (a, b) = pair_of(&k)?;
            let at: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("invitation"))?;
            r.invitations.push((a, b, u64::from_be_bytes(at)));
        }
        for kv in self.account_admin.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            r.account_admin.push((AccountId(id), dec(&v, "account admin record")?));
        }
        for kv in self.invites.iter() {
            let (k, v) = kv?;
            let digest: [u8; 32] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("invite"))?;
            let at: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("invite"))?;
            r.invites.push((digest, u64::from_be_bytes(at)));
        }
        if let Some(v) = self.meta.get("registration")? {
            r.registration = dec::<Registration>(&v, "registration")?;
        }
        r.incarnation = self.incarnation()?;
        r.floors = self.floors()?;
        r.redo_deletions = self.redo_deletions_list()?;
        Ok(r)
    }

    fn backup_begin(&self, to: &Path) -> Result<Box<dyn BackupCopy>, StoreError> {
        Ok(Box::new(SledStore::backup_begin(self, to)?))
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }
}

mod backup;
pub use backup::{restore, BackupCopy, Restored, SledBackup, MANIFEST, PARTIAL};
mod format;
pub use format::STORE_FORMAT;
mod purge;
use purge::{purge_key, PURGE_ACCOUNT_LOG, PURGE_CHAT_KEYS, PURGE_DEDUP, PURGE_DELTAS};

#[cfg(test)]
mod tests;
