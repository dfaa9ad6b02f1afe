//! The device store's format version, and the migrations from earlier ones (`meta` key
//! `format`, u32 big-endian). A new store gets [`STORE_FORMAT`]; opening one checks it: an
//! older format is migrated in place, one step at a time through [`MIGRATIONS`] (each step
//! safe to run twice: a crash before the new version is durable runs it again); a newer one is
//! refused with [`StoreError::NewerFormat`] and nothing is touched.
//!
//! Versions:
//! * 0: stores made before the version key existed. Read by this version as they are.
//! * 1: the version key. No record changed, so 0 → 1 only writes it.
//! * 2: the account log's hash chain (`store_chain.rs`). A store that applied part of the log
//!   already marks its chain unknown (1 → 2); nothing else changed.
//! * 3: atomic batches go through the `journal` tree (`kv.rs`), which an earlier build would
//!   not finish after a crash. No record changed, so 2 → 3 only writes the version.

use super::{DeviceStore, StoreError};

/// The format this build writes, and the newest it opens.
pub const STORE_FORMAT: u32 = 3;

/// The `meta` key that holds the format.
const FORMAT_KEY: &str = "format";

/// One step of migration: the store from format `from` to `from + 1`, in place.
struct Migration {
    from: u32,
    run: fn(&DeviceStore) -> Result<(), StoreError>,
}

/// Every step, in order, from 0 to [`STORE_FORMAT`].
const MIGRATIONS: &[Migration] = &[
    Migration { from: 0, run: |_| Ok(()) },
    Migration { from: 1, run: DeviceStore::migrate_account_chain },
    Migration { from: 2, run: |_| Ok(()) },
];

impl DeviceStore {
    /// The store's format version: `None` for a store with nothing in it yet, 0 for one made
    /// before the version key existed.
    pub fn format(&self) -> Result<Option<u32>, StoreError> {
        match self.meta.get(FORMAT_KEY)? {
            Some(v) => {
                let b: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("format"))?;
                Ok(Some(u32::from_be_bytes(b)))
            }
            None if self.meta.len() == 0 => Ok(None),
            None => Ok(Some(0)),
        }
    }

    /// Called when the store opens: stamps a new store, refuses a newer one, finishes the
    /// atomic batches a crash cut short (`kv.rs`) and migrates an older one.
    pub(super) fn open_format(&self) -> Result<(), StoreError> {
        let found = match self.format()? {
            Some(found) if found > STORE_FORMAT => {
                return Err(StoreError::NewerFormat { found, supported: STORE_FORMAT })
            }
            Some(found) => {
                self.journal.replay(&self.trees())?;
                found
            }
            None => {
                self.meta.insert(FORMAT_KEY, STORE_FORMAT.to_be_bytes().to_vec())?;
                return Ok(());
            }
        };
        for m in MIGRATIONS.iter().filter(|m| m.from >= found) {
            (m.run)(self)?;
            self.meta.insert(FORMAT_KEY, (m.from + 1).to_be_bytes().to_vec())?;
            self.barrier()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_lead_from_0_to_this_format_one_step_at_a_time() {
        let froms: Vec<u32> = MIGRATIONS.iter().map(|m| m.from).collect();
        assert_eq!(froms, (0..STORE_FORMAT).collect::<Vec<_>>());
    }

    /// A device store as the earlier version left it (its records, no `format`) opens with its
    /// data intact and the version written; one of a newer format is refused, untouched.
    #[test]
    fn a_store_of_the_previous_format_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = {
            let store = DeviceStore::open(dir.path()).unwrap();
            assert_eq!(store.format().unwrap(), Some(STORE_FORMAT), "a new store gets the version");
            let s = store.secrets_or_create(|| super::super::DeviceSecrets { ed25519: [7; 32], x25519: [8; 32] });
            store.meta.remove(FORMAT_KEY).unwrap();
            store.barrier().unwrap();
            s.unwrap()
        };
        let store = DeviceStore::open(dir.path()).unwrap();
        assert_eq!(store.format().unwrap(), Some(STORE_FORMAT), "migrated: the version is written");
        let kept = store.secrets_or_create(|| panic!("the identity is kept")).unwrap();
        assert_eq!((kept.ed25519, kept.x25519), (secrets.ed25519, secrets.x25519));

        store.meta.insert(FORMAT_KEY, (STORE_FORMAT + 1).to_be_bytes().to_vec()).unwrap();
        store.barrier().unwrap();
        drop(store);
        let e = DeviceStore::open(dir.path()).err().expect("refused");
        let text = e.to_string();
        let want = format!("store format v{} is newer than this version supports (v{STORE_FORMAT})", STORE_FORMAT + 1);
        assert!(text.contains(&want), "{text}");
    }

    /// 1 → 2: a store that applied part of the account log marks its chain unknown (it could
    /// not hash what it applied, and must not claim a wrong hash); one that applied none keeps a
    /// chain from the start; both keep their cursor.
    #[test]
    fn format_1_stores_get_the_account_chain_only_from_the_start_of_the_log() {
        use crate::proto::ids::Seq;
        for cursor in [0, 5] {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = DeviceStore::open(dir.path()).unwrap();
                store.advance_account_log(Seq(cursor), None, None).unwrap();
                store.meta.insert(FORMAT_KEY, 1u32.to_be_bytes().to_vec()).unwrap();
                store.barrier().unwrap();
            }
            let store = DeviceStore::open(dir.path()).unwrap();
            assert_eq!(store.format().unwrap(), Some(STORE_FORMAT));
            assert_eq!(store.account_cursor().unwrap(), Seq(cursor));
            assert_eq!(store.account_chain_known().unwrap(), cursor == 0, "cursor {cursor}");
        }
    }
}
