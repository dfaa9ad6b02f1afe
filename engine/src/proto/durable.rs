//! The fsync barrier for a sled 0.34 directory, shared by the relay's and the device's stores.
//!
//! sled's `flush` ends in `sync_file_range`, which does not flush the disk's cache or the file's
//! metadata, and sled writes items larger than a quarter segment (~128 KiB: a big snapshot, a
//! leaf of large deltas) to separate files under `blobs/` with no fsync at all. Call
//! [`SledDir::sync`] after `Db::flush`: it fdatasyncs the `db` file, every blob file not synced
//! before, and the `blobs` directory (so new names survive too).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A sled directory to make durable.
pub struct SledDir {
    dir: PathBuf,
    /// Blob files already synced. Blobs never change once written; names that vanished (sled
    /// removed the blob) are dropped, so this holds at most the blobs that exist.
    synced: Mutex<BTreeSet<OsString>>,
}

impl SledDir {
    /// The sled database at `dir`.
    pub fn new(dir: &Path) -> Self {
        SledDir { dir: dir.to_path_buf(), synced: Mutex::new(BTreeSet::new()) }
    }

    /// fdatasync of everything sled wrote so far (call after `Db::flush`).
    pub fn sync(&self) -> std::io::Result<()> {
        File::open(self.dir.join("db"))?.sync_data()?;
        let blobs = self.dir.join("blobs");
        let mut present = BTreeSet::new();
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let mut new_names = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Removed by sled between the listing and the open: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_names = true;
            }
            present.insert(name);
        }
        if new_names {
            File::open(&blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_db_and_blobs_and_forgets_removed_blobs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"x").unwrap();
        let d = SledDir::new(dir.path());
        d.sync().unwrap(); // no blobs dir yet
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs/17"), b"blob").unwrap();
        d.sync().unwrap();
        assert_eq!(d.synced.lock().unwrap().len(), 1);
        std::fs::remove_file(dir.path().join("blobs/17")).unwrap();
        d.sync().unwrap();
        assert!(d.synced.lock().unwrap().is_empty());
    }
}
