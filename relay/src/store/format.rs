//! The store's format version, and the migrations from earlier ones. Part of the store; split
//! out of `store.rs` for size.
//!
//! `meta` key `format` holds the version the store's records are in (u32, big-endian). A new
//! store gets [`STORE_FORMAT`]; opening one checks it:
//! * the same version: opened as it is;
//! * an older one: migrated in place, one step at a time through [`MIGRATIONS`], each step
//!   followed by the new version and a barrier (so a crash mid-way redoes at most one step:
//!   every step must be safe to run twice);
//! * a newer one: refused with [`StoreError::NewerFormat`], nothing touched (a binary must
//!   never rewrite records it does not know).
//!
//! Versions:
//! * 0: stores made before the version key existed (every relay before it). Records untagged
//!   or tagged with [`super::TAG`], read by this version as they are.
//! * 1: the version key. No record changed, so 0 → 1 only writes it.
//! * 2: the operator's records (`account_admin`, `invites`, `purges`, `registration`; see
//!   `core/admin.rs`). A format-1 store has none of them, so 1 → 2 only writes the version; a
//!   format-1 binary refuses a format-2 store rather than serve banned or suspended accounts.

use super::*;

/// The format this binary writes, and the newest it opens.
pub const STORE_FORMAT: u32 = 2;

/// The `meta` key that holds the format.
const FORMAT_KEY: &str = "format";

/// One step of migration: the store from format `from` to `from + 1`, in place.
struct Migration {
    from: u32,
    /// What it changes, for the log.
    what: &'static str,
    run: fn(&SledStore) -> Result<(), StoreError>,
}

/// Every step, in order, from 0 to [`STORE_FORMAT`].
const MIGRATIONS: &[Migration] = &[
    Migration { from: 0, what: "adds the format version; records are read as they are", run: |_| Ok(()) },
    Migration { from: 1, what: "the operator's records are new trees; nothing to rewrite", run: |_| Ok(()) },
];

impl SledStore {
    /// The store's format version: `None` for a store with nothing in it yet, 0 for one made
    /// before the version key existed.
    pub fn format(&self) -> Result<Option<u32>, StoreError> {
        match self.meta.get(FORMAT_KEY)? {
            Some(v) => {
                let b: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("format"))?;
                Ok(Some(u32::from_be_bytes(b)))
            }
            None if self.meta.is_empty() && self.accounts.is_empty() => Ok(None),
            None => Ok(Some(0)),
        }
    }

    /// Refuses a store of a newer format than this binary's, touching nothing.
    pub(super) fn refuse_newer(&self) -> Result<Option<u32>, StoreError> {
        match self.format()? {
            Some(found) if found > STORE_FORMAT => Err(StoreError::NewerFormat { found, supported: STORE_FORMAT }),
            f => Ok(f),
        }
    }

    /// Called when the store opens: stamps a new store with [`STORE_FORMAT`], migrates an older
    /// one, refuses a newer one.
    pub(super) fn open_format(&self) -> Result<(), StoreError> {
        let Some(found) = self.refuse_newer()? else {
            self.meta.insert(FORMAT_KEY, &STORE_FORMAT.to_be_bytes())?;
            return Ok(());
        };
        for m in MIGRATIONS.iter().filter(|m| m.from >= found) {
            tracing::info!(from = m.from, to = m.from + 1, what = m.what, "migrating the store");
            (m.run)(self)?;
            self.meta.insert(FORMAT_KEY, &(m.from + 1).to_be_bytes())?;
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

    /// A store as the relay made it before the version key (format 0: the records with no
    /// `format` in `meta`) opens with its data intact and the version written.
    #[test]
    fn a_store_of_the_previous_format_is_migrated_in_place() {
        use stratus_engine::proto::cert::AccountKeys;
        let dir = tempfile::tempdir().unwrap();
        let account = AccountKeys::generate(&mut rand::thread_rng()).public();
        let chat = ChatId([7; 16]);
        let legacy = LegacyChatRecord {
            kind: ChatKind::Notes,
            creator: account.id,
            members: [account.id].into(),
            epochs: [(Epoch(0), Vec::new())].into(),
            rekey_due: false,
            joining: BTreeSet::new(),
            share_with: BTreeSet::new(),
            changes: 0,
        };
        let delta = StoredDelta {
            epoch: Epoch(0),
            device: DeviceId("d".into()),
            account: account.id,
            client_seq: ClientSeq(1),
            sealed: vec![0x5a; 40],
        };
        let incarnation = Incarnation { store: [4; 16], generation: 0 };
        {
            // Written with sled alone, as the earlier relay wrote them.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.open_tree("accounts").unwrap().insert(account.id.0, enc(&account)).unwrap();
            db.open_tree("chats").unwrap().insert(chat.0, enc(&legacy)).unwrap();
            db.open_tree("deltas").unwrap().insert(seq_key(&chat.0, 1), enc(&delta)).unwrap();
            db.open_tree("meta").unwrap().insert("incarnation", enc(&incarnation)).unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.format().unwrap(), Some(STORE_FORMAT), "the version is written");
        let r = store.recover().unwrap();
        assert_eq!(r.accounts, std::slice::from_ref(&account));
        assert_eq!(r.incarnation, incarnation, "the store keeps its incarnation");
        assert_eq!(
            r.chats.iter().map(|(c, rec, head)| (*c, rec.members.clone(), *head)).collect::<Vec<_>>(),
            [(chat, [account.id].into(), Seq(1))]
        );
        let read = store.read_chat(chat, Seq(0), Seq(1), 10).unwrap();
        assert_eq!((read.len(), read[0].client_seq, &read[0].sealed), (1, ClientSeq(1), &delta.sealed));
        drop(store);
        // Opened again: nothing more to do.
        assert_eq!(SledStore::open(dir.path()).unwrap().format().unwrap(), Some(STORE_FORMAT));
    }

    #[test]
    fn a_new_store_gets_this_format_and_a_newer_one_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.format().unwrap(), Some(STORE_FORMAT));
        store.meta.insert(FORMAT_KEY, &(STORE_FORMAT + 1).to_be_bytes()).unwrap();
        store.barrier().unwrap();
        drop(store);
        let e = SledStore::open(dir.path()).err().expect("refused");
        assert!(
            matches!(e, StoreError::NewerFormat { found, supported } if found == STORE_FORMAT + 1 && supported == STORE_FORMAT)
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "store format v{} is newer than this binary supports (v{STORE_FORMAT})",
                STORE_FORMAT + 1
            )),
            "{text}"
        );
        let store = SledStore::open_only(dir.path()).unwrap();
        assert_eq!(store.format().unwrap(), Some(STORE_FORMAT + 1), "left as it was");
    }
}
