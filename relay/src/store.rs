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
//! * `chats`: chat id → `ChatRecord`
//! * `deltas`: chat id ‖ seq → `StoredDelta`
//! * `dedup`: blake3(device id) ‖ client seq → chat id ‖ seq
//! * `account_log`: account id ‖ seq → `AccountEvent`
//! * `approved_links`: link id → `ApprovedLink` (until the new device syncs)
//! * `device_state`: device id → `DeviceState` (registration, last activity, revocation)
//! * `account_settings`: account id → `AccountSettings` (session time-to-live)
//! * `recovery`: recovery lookup id → `RecoveryRecord` (the bundle sealed under a recovery key)
//! * `account_gens`: account id ‖ generation → `SignedGen` (the public keys of each rotation,
//!   signed by the generation before)
//! * `usernames`: account id → its username in the directory

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use stratus_engine::proto::cert::{AccountPublic, DeviceCert};
use stratus_engine::proto::durable::SledDir;
use stratus_engine::proto::wire::{AccountEntry, AccountEvent, Delta, MAX_PAGE_BYTES};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

use crate::core::{ApprovedLink, ChatRecord, Recovered, StoreOp, DEDUP_WINDOW};

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
    deltas: sled::Tree,
    dedup: sled::Tree,
    account_log: sled::Tree,
    approved_links: sled::Tree,
    device_state: sled::Tree,
    account_settings: sled::Tree,
    recovery: sled::Tree,
    account_gens: sled::Tree,
    usernames: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(SledStore {
            files: SledDir::new(dir),
            accounts: db.open_tree("accounts")?,
            devices: db.open_tree("devices")?,
            chats: db.open_tree("chats")?,
            deltas: db.open_tree("deltas")?,
            dedup: db.open_tree("dedup")?,
            account_log: db.open_tree("account_log")?,
            approved_links: db.open_tree("approved_links")?,
            device_state: db.open_tree("device_state")?,
            account_settings: db.open_tree("account_settings")?,
            recovery: db.open_tree("recovery")?,
            account_gens: db.open_tree("account_gens")?,
            usernames: db.open_tree("usernames")?,
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
        ];
        let r: Result<(), TransactionError<()>> = trees.transaction(|t: &Vec<TransactionalTree>| {
            let (accounts, devices, chats, deltas, dedup, log, links, states, settings, recovery, gens, names) =
                (&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &t[9], &t[10], &t[11]);
            for op in ops {
                match op {
                    StoreOp::PutAccount(a) => {
                        accounts.insert(&a.id.0[..], enc(a))?;
                    }
                    StoreOp::PutDevice(c) => {
                        devices.insert(c.body.device.0.as_bytes(), enc(c))?;
                    }
                    StoreOp::PutChat(id, r) => {
                        chats.insert(&id.0[..], enc(r))?;
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
                        log.insert(seq_key(&a.0, e.seq.0), enc(&e.event))?;
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
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match r {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => unreachable!("the transaction never aborts"),
        }
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
        for kv in self.account_log.range(seq_key(&account.0, after.0 + 1)..=seq_key(&account.0, upto.0)) {
            let (k, v) = kv?;
            // Entries carry member lists and key chains: a page is capped in bytes too (always
            // at least one entry).
            bytes += v.len();
            if !out.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            let event: AccountEvent = dec(&v, "account log entry")?;
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
            let record: ChatRecord = dec(&v, "chat")?;
            let head = match self.deltas.scan_prefix(id).next_back() {
                Some(kv) => Seq(tail_u64(&kv?.0)),
                None => Seq(0),
            };
            r.chats.push((ChatId(id), record, head));
        }
        Ok(r)
    }
}
