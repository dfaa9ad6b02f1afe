//! Backups and restores of the relay's sled store: a consistent copy made while the relay
//! runs, the store's incarnation and the logs' floors, and putting a backup in place as a new
//! incarnation (docs/protocol.md, "Restores"). Part of the store; split out of `store.rs` for
//! size.

use super::*;

/// What a backup directory holds besides the store: written last, so a backup without it is
/// incomplete (and [`restore`] refuses it).
pub const MANIFEST: &str = "backup.manifest";

/// The `meta` key of the accounts a restore found deleted in the store it replaced but not in
/// the backup: the relay's core deletes them again when it starts ([`Recovered::redo_deletions`]).
pub(super) const REDO_DELETIONS: &str = "restore_deletions";

fn backup_err(what: impl std::fmt::Display) -> StoreError {
    StoreError::Backup(what.to_string())
}

/// Syncs a directory's entries (a rename or a new file in it) to the disk.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| backup_err(format!("syncing {}: {e}", dir.display())))
}

impl SledStore {
    /// The store's incarnation.
    pub fn incarnation(&self) -> Result<Incarnation, StoreError> {
        match self.meta.get("incarnation")? {
            Some(v) => dec(&v, "incarnation"),
            None => Ok(Incarnation::default()),
        }
    }

    /// The floors the restores left (empty if never restored).
    pub fn floors(&self) -> Result<Floors, StoreError> {
        let mut f = Floors::default();
        for kv in self.floor_accounts.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            f.accounts.insert(AccountId(id), Seq(u64_of(&v)?));
        }
        for kv in self.floor_chats.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("chat id"))?;
            f.chats.insert(ChatId(id), Seq(u64_of(&v)?));
        }
        Ok(f)
    }

    /// Begins a backup into `to` (new, or holding only what the caller put there, never an
    /// earlier backup): the copy is made by the returned [`SledBackup`], beside the running
    /// relay (see [`BackupCopy`]).
    pub fn backup_begin(&self, to: &Path) -> Result<SledBackup, StoreError> {
        if to.join("store").exists() || to.join(MANIFEST).exists() {
            return Err(backup_err(format!("{} already holds a backup; use a new or empty directory", to.display())));
        }
        let partial = to.join(PARTIAL);
        if partial.exists() {
            // A failed backup removes its copy (see `SledBackup`'s `Drop`); one is left only by a
            // relay that stopped mid-way (killed, or crashed).
            return Err(backup_err(format!(
                "{} holds an unfinished backup (a relay stopped while making it); remove {} or use another \
                 directory",
                to.display(),
                partial.display()
            )));
        }
        std::fs::create_dir_all(to).map_err(|e| backup_err(format!("cannot create {}: {e}", to.display())))?;
        let db = sled::Config::new().path(&partial).cache_capacity(STORE_CACHE_BYTES).open();
        let copy = db.map_err(StoreError::from).and_then(|db| SledStore::open_trees(db, &partial));
        let copy = copy.inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&partial);
        })?;
        Ok(SledBackup { source: Some(self.db.clone()), copy: Some(copy), to: to.to_path_buf() })
    }

    /// Copies the store into `to` while nothing else writes to it: [`SledStore::backup_begin`],
    /// [`BackupCopy::copy`] and [`BackupCopy::seal`] in one go, after a barrier.
    pub fn backup(&self, to: &Path) -> Result<Incarnation, StoreError> {
        let mut b = self.backup_begin(to)?;
        self.barrier()?;
        b.copy()?;
        Box::new(b).seal()
    }
}

/// A backup under way, made beside the running relay so that the relay's writes go on: a
/// fuzzy copy of every tree ([`BackupCopy::copy`], on a thread of its own, while the relay
/// keeps applying batches), then every batch the relay applied since the copy began, applied
/// to the copy in the same order ([`BackupCopy::apply`]), then [`BackupCopy::seal`].
///
/// Why the result is the store at one batch boundary: a key the relay did not write while the
/// copy ran is copied as it was; one it wrote is copied as some value it held meanwhile and then
/// set again by the replayed batches, each of which puts or removes whole keys (the last
/// `PutUsage` of a batch is the one stored, in the copy as in the store), so the copy ends with
/// the last value of each. Deletions empty a chat's, a device's or an account's ranges, and
/// nothing is written into such a range again, so replaying one empties the copy's range too,
/// whatever part of it the fuzzy copy took.
pub trait BackupCopy: Send {
    /// Copies every tree as it is while it is read (blocking, long).
    fn copy(&mut self) -> Result<(), StoreError>;
    /// Applies to the copy a batch the relay applied to the store after the copy began.
    fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Makes what the copy holds so far durable, so that [`BackupCopy::seal`], which the relay
    /// waits for, has only the last few batches left to write.
    fn barrier(&mut self) -> Result<(), StoreError>;
    /// Makes the copy durable and writes the manifest that marks it complete. The caller
    /// applies no batch to the store between the last [`BackupCopy::apply`] and this, and has
    /// made every batch durable in the store (a barrier) first: a backup holds nothing a crash
    /// of the relay could have lost, or a restore could bring back a seq the relay gave to
    /// another delta after the crash.
    fn seal(self: Box<Self>) -> Result<Incarnation, StoreError>;
}

/// Where a backup's copy is made, in its directory, until sealed.
pub const PARTIAL: &str = "store.partial";

/// [`BackupCopy`] of a [`SledStore`]: `to/store.partial` while under way, renamed `to/store`
/// and followed by `to/`[`MANIFEST`] when sealed. Dropped unsealed (the backup failed, or the
/// relay stops), it removes `to/store.partial`, so that the directory can take the next backup.
pub struct SledBackup {
    /// Both `Some` until sealed.
    source: Option<sled::Db>,
    copy: Option<SledStore>,
    to: std::path::PathBuf,
}

impl SledBackup {
    fn copy_store(&self) -> &SledStore {
        self.copy.as_ref().expect("only a sealed backup has no copy, and sealing consumes it")
    }
}

impl Drop for SledBackup {
    fn drop(&mut self) {
        if self.copy.take().is_some() {
            // The copy's files are closed first (its trees and database dropped above).
            let partial = self.to.join(PARTIAL);
            // (The admin socket may have removed it already: see `admin.rs`.)
            if let Err(e) = std::fs::remove_dir_all(&partial).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }) {
                tracing::warn!(path = %partial.display(), error = %e, "could not remove an unfinished backup");
            }
        }
    }
}

impl BackupCopy for SledBackup {
    fn copy(&mut self) -> Result<(), StoreError> {
        // sled's `import` panics on an I/O error and `export` on a read error: copied by hand.
        // `purges` first: a range the relay finishes emptying after its entry was copied is
        // emptied in the copy below, and one whose entry was gone already was empty before.
        let source = self.source.as_ref().expect("unsealed");
        let mut names = source.tree_names();
        names.sort_by_key(|n| n.as_ref() != b"purges");
        for name in names {
            let from = source.open_tree(&name)?;
            let to = self.copy_store().db.open_tree(&name)?;
            // One insert at a time, as sled's own `import` does (no batch: nothing needs to be
            // atomic here, and a batch of large deltas would be held whole in memory).
            for kv in from.iter() {
                let (k, v) = kv?;
                to.insert(k, v)?;
            }
        }
        // What deletions left to empty, in the store as copied: the copy holds none of it.
        self.copy_store().purge()?;
        self.copy_store().barrier()
    }

    fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        RelayStore::apply(self.copy_store(), ops)?;
        if ops.iter().any(StoreOp::is_deletion) {
            self.copy_store().purge()?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), StoreError> {
        self.copy_store().barrier()
    }

    fn seal(mut self: Box<Self>) -> Result<Incarnation, StoreError> {
        // Until the rename, a failure drops `self` with its copy, which removes it.
        self.source = None;
        self.copy_store().barrier()?;
        let incarnation = self.copy_store().incarnation()?;
        let to = self.to.clone();
        drop(self.copy.take());
        std::fs::rename(to.join(PARTIAL), to.join("store"))
            .map_err(|e| backup_err(format!("renaming the copy: {e}")))?;
        let manifest = format!(
            "# stratus-relay backup\nformat = 1\nstore = \"{}\"\ngeneration = {}\n",
            incarnation.store.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            incarnation.generation
        );
        let tmp = to.join(format!("{MANIFEST}.tmp"));
        std::fs::write(&tmp, manifest)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, to.join(MANIFEST)))
            .map_err(|e| backup_err(format!("writing the manifest: {e}")))?;
        sync_dir(&to)?;
        Ok(incarnation)
    }
}

impl SledStore {
    /// The accounts the operator deleted (their data gone, a tombstone kept).
    fn deleted_accounts(&self) -> Result<BTreeSet<AccountId>, StoreError> {
        let mut out = BTreeSet::new();
        for kv in self.account_admin.iter() {
            let (k, v) = kv?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("account id"))?;
            if dec::<crate::core::AccountAdmin>(&v, "account admin record")?.deleted {
                out.insert(AccountId(id));
            }
        }
        Ok(out)
    }

    /// The accounts a restore left to delete again (see [`restore`]); empty when none.
    pub(super) fn redo_deletions_list(&self) -> Result<Vec<AccountId>, StoreError> {
        match self.meta.get(REDO_DELETIONS)? {
            Some(v) => dec(&v, "deletions to redo"),
            None => Ok(Vec::new()),
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The new incarnation.
    pub incarnation: Incarnation,
    /// Accounts deleted in the replaced store after the backup was made: deleted again when the
    /// relay starts (or, restored with `undelete`, back as the backup has them).
    pub deleted_since: Vec<AccountId>,
}

fn u64_of(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt("floor"))?;
    Ok(u64::from_be_bytes(b))
}

/// Puts the backup in `from` (made by [`SledStore::backup`]) in place of the store at
/// `store_dir`, as a new incarnation: the generation moves past both the backup's and the
/// replaced store's, and each log's floor becomes the lowest of its head in the backup and
/// the floors both already had (so a device that synced with any of them rewinds far
/// enough). The replaced store is kept, renamed `<store_dir>.replaced-<generation>`. Fails,
/// changing nothing, if the backup is incomplete or the store is in use (a running relay).
///
/// An account the operator deleted in the replaced store after the backup was made would come
/// back with the backup's data; unless `undelete`, the restored store lists it to be deleted
/// again, which the relay does as it starts (the same deletion as `stratus-relay admin
/// delete`), and [`Restored::deleted_since`] names it.
pub fn restore(from: &Path, store_dir: &Path, now_ms: u64, undelete: bool) -> Result<Restored, StoreError> {
    if !from.join(MANIFEST).is_file() || !from.join("store").is_dir() {
        return Err(backup_err(format!(
            "{} is not a complete backup (no {MANIFEST} or no store/ in it)",
            from.display()
        )));
    }
    let old = if store_dir.exists() {
        // sled locks its files: this fails while a relay runs on them.
        let s = SledStore::open_only(store_dir).map_err(|e| match e {
            StoreError::Sled(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
                backup_err(format!("{} is in use: stop the relay before restoring", store_dir.display()))
            }
            StoreError::Sled(sled::Error::Io(io)) if io.to_string().contains("lock") => {
                backup_err(format!("{} is in use: stop the relay before restoring", store_dir.display()))
            }
            e => e,
        })?;
        Some((s.incarnation()?, s.floors()?, s.deleted_accounts()?))
    } else {
        None
    };
    let parent = store_dir.parent().ok_or_else(|| backup_err("the store directory has no parent"))?;
    let staging = parent.join("store.restoring");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| backup_err(format!("removing {}: {e}", staging.display())))?;
    }
    let incarnation;
    let mut deleted_since = Vec::new();
    {
        let copy = sled::Config::new().path(&staging).cache_capacity(STORE_CACHE_BYTES).open()?;
        let backup = SledStore::open_only(&from.join("store"))?;
        backup.refuse_newer()?;
        copy.import(backup.db.export());
        drop(backup);
        let staged = SledStore::open_trees(copy, &staging)?;
        let was = staged.incarnation()?;
        let mut generation = was.generation + 1;
        let mut floors = staged.floors()?;
        // Only a store of the same lineage (the same store id) says what was deleted since.
        if let Some((_, _, deleted)) = old.as_ref().filter(|(inc, _, _)| inc.store == was.store) {
            let in_backup = staged.deleted_accounts()?;
            for a in deleted.difference(&in_backup) {
                if staged.accounts.contains_key(a.0)? {
                    deleted_since.push(*a);
                }
            }
            if !undelete && !deleted_since.is_empty() {
                staged.meta.insert(REDO_DELETIONS, enc(&deleted_since))?;
            }
        }
        if let Some((inc, f, _)) = &old {
            if inc.store == was.store {
                generation = generation.max(inc.generation + 1);
            }
            for (a, s) in &f.accounts {
                let e = floors.accounts.entry(*a).or_insert(*s);
                *e = (*e).min(*s);
            }
            for (c, s) in &f.chats {
                let e = floors.chats.entry(*c).or_insert(*s);
                *e = (*e).min(*s);
            }
        }
        // Never the same generation twice, even restoring one backup twice into an empty
        // directory: the clock is part of it.
        incarnation = Incarnation { store: was.store, generation: generation.max(now_ms) };
        let heads = staged.recover()?;
        for (a, head) in heads.account_heads {
            let e = floors.accounts.entry(a).or_insert(head);
            *e = (*e).min(head);
        }
        for (c, _, head) in heads.chats {
            let e = floors.chats.entry(c).or_insert(head);
            *e = (*e).min(head);
        }
        for (a, s) in &floors.accounts {
            staged.floor_accounts.insert(a.0, &s.0.to_be_bytes())?;
        }
        for (c, s) in &floors.chats {
            staged.floor_chats.insert(c.0, &s.0.to_be_bytes())?;
        }
        staged.meta.insert("incarnation", enc(&incarnation))?;
        staged.barrier()?;
    }
    if let Some((inc, _, _)) = &old {
        let aside = parent.join(format!("store.replaced-{}", inc.generation));
        std::fs::rename(store_dir, &aside).map_err(|e| backup_err(format!("moving the old store aside: {e}")))?;
    }
    std::fs::rename(&staging, store_dir)
        .map_err(|e| backup_err(format!("putting the restored store in place: {e}")))?;
    sync_dir(parent)?;
    Ok(Restored { incarnation, deleted_since })
}
