//! [`Device`]: one device's identity, store and documents. Everything works offline; the
//! `async` methods make one request to the relay and return (a [`crate::Session`] runs the same
//! work while it syncs).
//!
//! A `Device` is made of parts, one per concern, each in its own module that owns its state
//! (other parts reach it only through its methods) and names in its imports what else it uses:
//!
//! * [`identity`]: the device's secrets and login, the account's keys and their rotation,
//!   linking, approval and recovery, sessions, and the directory of other accounts;
//! * [`chats`]: the chat documents, applying deltas and account-log entries, messages, members
//!   and key work;
//! * [`outbox`]: local changes sealed into outbox items, and sealed again under new keys;
//! * [`secret`]: secret chats and their links to the peer device;
//! * [`one_shot`]: one request over a fresh stream, for the `async` methods that run without a
//!   session.
//!
//! The store, the RNG and the clock are shared by all of them.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::device::error::Error;
use crate::device::store::{device_id_of, DeviceSecrets, DeviceStore};

mod chats;
#[cfg(test)]
mod group_commit_tests;
mod identity;
mod one_shot;
mod outbox;
pub(crate) use outbox::LocalWrites;
mod secret;

pub use chats::{ChatSummary, MessageOp};
pub(crate) use chats::{KeyWork, StagedDeltas};
pub use identity::{ContactInfo, LinkCode, SessionInfo};
pub(crate) use secret::OPENING_TIMEOUT;
pub use secret::{Answer, Ended, Opening, SecretConn, SecretMessage, SecretUpdate, Step};

use chats::{ChatDocs, KeyWorkState};
use identity::Identity;
use secret::SecretDocs;

/// One device: identity, local store, chat documents. Everything here works offline; the
/// `async` methods talk to the relay once and return.
pub struct Device {
    pub(crate) store: DeviceStore,
    /// Who this device is, and the account it is logged in to.
    identity: Identity,
    /// The chat documents in memory.
    docs: ChatDocs,
    /// The key work under way.
    key_state: KeyWorkState,
    /// Secret chats' documents in memory.
    secret_docs: SecretDocs,
    pub(crate) rng: StdRng,
    clock: fn() -> i64,
    /// When this device last recorded that it had a session with the relay (see
    /// [`DeviceStore::last_reached_ms`]); written at most every [`REACHED_EVERY_MS`].
    reached_ms: i64,
    /// The app's writes stored and not yet durable (`group_commit.rs`).
    pub(crate) unsettled: crate::device::group_commit::Unsettled,
}

/// How often a device with a session records that it has one: an expiry is believed only
/// after a day without (the shortest session time-to-live), so ten minutes is close enough.
const REACHED_EVERY_MS: i64 = 10 * 60 * 1000;

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
    ///
    /// ```
    /// use stratus_engine::{Device, MemDisk};
    ///
    /// let disk = MemDisk::new();
    /// let device = Device::open_mem(&disk, 7)?;
    /// assert!(device.account().is_none(), "not logged in yet: create an account or link");
    /// // The same seed makes the same device (its identity comes from the seeded RNG).
    /// assert_eq!(Device::open_mem(&MemDisk::new(), 7)?.id(), device.id());
    /// # Ok::<(), stratus_engine::Error>(())
    /// ```
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
            docs: ChatDocs::default(),
            rng,
            clock: system_now_ms,
            key_state: KeyWorkState::default(),
            secret_docs: SecretDocs::default(),
            reached_ms: 0,
            unsettled: Default::default(),
        })
    }

    /// Replaces the clock (milliseconds since the Unix epoch), for deterministic tests.
    pub fn set_clock(&mut self, clock: fn() -> i64) {
        self.clock = clock;
    }

    pub(crate) fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Records, at most every [`REACHED_EVERY_MS`], that this device has a session with the
    /// relay now.
    pub(crate) fn note_reached(&mut self) -> Result<(), Error> {
        let now = self.now_ms();
        if now.saturating_sub(self.reached_ms) >= REACHED_EVERY_MS {
            self.store.set_last_reached_ms(now)?;
            self.reached_ms = now;
        }
        Ok(())
    }

    /// Deletes the account's keys and data and this device's identity from the store, durably,
    /// and logs out (after the account ended this device's session).
    pub fn wipe_account(&mut self) -> Result<(), Error> {
        self.docs.clear();
        self.secret_docs.clear();
        self.identity.log_out();
        self.store.clear()?;
        self.store.wipe()?;
        Ok(())
    }
}
