//! The ordered key-value trees under the device's store: sled on a real device, or
//! [`MemDisk`], an in-memory disk with an explicit durability line, for the deterministic
//! simulator.
//!
//! Only what [`crate::store::DeviceStore`] needs: point reads and writes, ordered scans, and
//! atomic write batches over several trees ([`Journal::atomic`]; every store transaction only
//! writes). `MemDisk` keeps what [`MemDisk::barrier`] made durable apart from what was written
//! since: [`MemDisk::crash`] loses the writes after the line, except a prefix of them the
//! simulator chooses (sled writes its log in order, so a crash keeps some prefix of what was
//! not synced).
//!
//! An atomic batch is made of plain writes, not of a sled transaction: the batch first goes
//! whole into the `journal` tree as one value, then each write is made, then the journal entry
//! is removed. A crash keeps a prefix of those writes: without the journal entry nothing of the
//! batch, with it a batch that [`Journal::replay`] finishes when the store opens (the writes
//! are made again; nothing after the batch survived to be overwritten). A sled transaction (or
//! `apply_batch`) instead seals sled's log buffer before and after the batch, so each one costs
//! a log write handed to sled's I/O threads, all of which wake for it: with a busy device
//! storing hundreds of batches a second, that halved its push-to-event latency
//! (docs/benchmarks.md, "Atomic writes through a journal").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sled::IVec;

use crate::device::store::StoreError;

/// A tree's contents.
type Map = BTreeMap<Vec<u8>, IVec>;
/// One write: which tree (by name), the key, and the value (`None`: remove).
type Write = (String, Vec<u8>, Option<IVec>);

#[derive(Default)]
struct Disk {
    /// What a reader sees now.
    live: BTreeMap<String, Map>,
    /// What survives a crash.
    durable: BTreeMap<String, Map>,
    /// Atomic writes since the last barrier, in order.
    pending: Vec<Vec<Write>>,
    /// Writes left before every write fails (fault injection, [`MemDisk::fail_after`]).
    fail_after: Option<usize>,
}

fn apply(trees: &mut BTreeMap<String, Map>, writes: &[Write]) {
    for (tree, k, v) in writes {
        let t = trees.entry(tree.clone()).or_default();
        match v {
            Some(v) => t.insert(k.clone(), v.clone()),
            None => t.remove(k),
        };
    }
}

/// An in-memory disk for device stores in the simulator. Clones share it (the device and the
/// simulator both hold one, so that the simulator can crash it).
#[derive(Clone, Default)]
pub struct MemDisk(Arc<Mutex<Disk>>);

impl MemDisk {
    /// An empty disk.
    pub fn new() -> Self {
        MemDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything written so far durable.
    pub fn barrier(&self) {
        let mut d = self.lock();
        let pending = std::mem::take(&mut d.pending);
        for w in &pending {
            apply(&mut d.durable, w);
        }
    }

    /// Atomic writes made since the last barrier.
    pub fn unsynced(&self) -> usize {
        self.lock().pending.len()
    }

    /// Power loss: of the writes since the last barrier, the first `keep` survive (whole), the
    /// rest are gone. Close the store first; open it again afterwards.
    pub fn crash(&self, keep: usize) {
        let mut d = self.lock();
        let pending = std::mem::take(&mut d.pending);
        for w in pending.iter().take(keep) {
            apply(&mut d.durable, w);
        }
        d.live = d.durable.clone();
    }

    /// Deletes everything (a store's files removed).
    pub fn wipe(&self) {
        *self.lock() = Disk::default();
    }

    /// Whether the disk holds nothing, durable or not.
    pub fn is_empty(&self) -> bool {
        let d = self.lock();
        d.live.values().all(Map::is_empty) && d.durable.values().all(Map::is_empty)
    }

    /// Whether any stored value, durable or not, contains `needle`.
    pub fn contains_bytes(&self, needle: &[u8]) -> bool {
        let d = self.lock();
        let any = |m: &BTreeMap<String, Map>| {
            m.values().flat_map(|t| t.iter()).any(|(k, v)| {
                k.windows(needle.len()).any(|w| w == needle) || v.windows(needle.len()).any(|w| w == needle)
            })
        };
        any(&d.live) || any(&d.durable)
    }

    /// From the `n`th write on (counting from 0), every write fails (`None`: none).
    pub fn fail_after(&self, n: Option<usize>) {
        self.lock().fail_after = n;
    }

    fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut d = self.lock();
        match &mut d.fail_after {
            Some(0) => return Err(StoreError::Sync(std::io::Error::other("injected write failure"))),
            Some(n) => *n -= 1,
            None => {}
        }
        apply(&mut d.live, &writes);
        d.pending.push(writes);
        Ok(())
    }
}

/// One tree of the device's store.
#[derive(Clone)]
pub(crate) enum Tree {
    Sled(sled::Tree),
    Mem { disk: MemDisk, name: String },
}

/// An ordered scan's results.
pub(crate) struct Iter(Box<dyn DoubleEndedIterator<Item = Result<(IVec, IVec), StoreError>> + Send>);

impl Iterator for Iter {
    type Item = Result<(IVec, IVec), StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

impl Iter {
    fn sled(i: sled::Iter) -> Iter {
        Iter(Box::new(i.map(|r| r.map_err(StoreError::from))))
    }

    fn mem(items: Vec<(IVec, IVec)>) -> Iter {
        Iter(Box::new(items.into_iter().map(Ok)))
    }

    /// The keys only.
    pub(crate) fn keys(self) -> impl DoubleEndedIterator<Item = Result<IVec, StoreError>> {
        self.map(|r| r.map(|(k, _)| k))
    }
}

impl Tree {
    /// Opens tree `name` of a sled database.
    pub(crate) fn sled(db: &sled::Db, name: &str) -> Result<Tree, StoreError> {
        Ok(Tree::Sled(db.open_tree(name)?))
    }

    /// Tree `name` of a memory disk.
    pub(crate) fn mem(disk: &MemDisk, name: &str) -> Tree {
        Tree::Mem { disk: disk.clone(), name: name.to_string() }
    }

    /// The tree's name.
    fn name(&self) -> Vec<u8> {
        match self {
            Tree::Sled(t) => t.name().to_vec(),
            Tree::Mem { name, .. } => name.as_bytes().to_vec(),
        }
    }

    fn with<T>(disk: &MemDisk, name: &str, f: impl FnOnce(Option<&Map>) -> T) -> T {
        let d = disk.lock();
        f(d.live.get(name))
    }

    pub(crate) fn get(&self, k: impl AsRef<[u8]>) -> Result<Option<IVec>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.get(k)?),
            Tree::Mem { disk, name } => Ok(Tree::with(disk, name, |m| m.and_then(|m| m.get(k.as_ref()).cloned()))),
        }
    }

    pub(crate) fn contains_key(&self, k: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        Ok(self.get(k)?.is_some())
    }

    pub(crate) fn insert(&self, k: impl AsRef<[u8]>, v: impl Into<IVec>) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => {
                t.insert(k, v)?;
            }
            Tree::Mem { disk, name } => disk.write(vec![(name.clone(), k.as_ref().to_vec(), Some(v.into()))])?,
        }
        Ok(())
    }

    pub(crate) fn remove(&self, k: impl AsRef<[u8]>) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => {
                t.remove(k)?;
            }
            Tree::Mem { disk, name } => disk.write(vec![(name.clone(), k.as_ref().to_vec(), None)])?,
        }
        Ok(())
    }

    pub(crate) fn clear(&self) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.clear()?),
            Tree::Mem { disk, name } => {
                let keys: Vec<Vec<u8>> =
                    Tree::with(disk, name, |m| m.map(|m| m.keys().cloned().collect()).unwrap_or_default());
                disk.write(keys.into_iter().map(|k| (name.clone(), k, None)).collect())
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Tree::Sled(t) => t.len(),
            Tree::Mem { disk, name } => Tree::with(disk, name, |m| m.map_or(0, Map::len)),
        }
    }

    pub(crate) fn iter(&self) -> Iter {
        match self {
            Tree::Sled(t) => Iter::sled(t.iter()),
            Tree::Mem { disk, name } => Iter::mem(Tree::with(disk, name, |m| {
                m.map(|m| m.iter().map(|(k, v)| (IVec::from(&k[..]), v.clone())).collect()).unwrap_or_default()
            })),
        }
    }

    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        match self {
            Tree::Sled(t) => Iter::sled(t.scan_prefix(prefix)),
            Tree::Mem { disk, name } => {
                let p = prefix.as_ref();
                Iter::mem(Tree::with(disk, name, |m| {
                    m.map(|m| {
                        m.range(p.to_vec()..)
                            .take_while(|(k, _)| k.starts_with(p))
                            .map(|(k, v)| (IVec::from(&k[..]), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default()
                }))
            }
        }
    }

    /// Keys from `start` on, in order, at most `max`.
    pub(crate) fn range_from(&self, start: impl AsRef<[u8]>, max: usize) -> Iter {
        match self {
            Tree::Sled(t) => {
                Iter(Box::new(Iter::sled(t.range(start.as_ref()..)).take(max).collect::<Vec<_>>().into_iter()))
            }
            Tree::Mem { disk, name } => Iter::mem(Tree::with(disk, name, |m| {
                m.map(|m| {
                    m.range(start.as_ref().to_vec()..).take(max).map(|(k, v)| (IVec::from(&k[..]), v.clone())).collect()
                })
                .unwrap_or_default()
            })),
        }
    }
}

/// Writes gathered for [`Journal::atomic`]: each names a tree by its place in the list given
/// there.
#[derive(Default)]
pub(crate) struct Batch(Vec<(usize, Vec<u8>, Option<IVec>)>);

impl Batch {
    pub(crate) fn insert(&mut self, tree: usize, k: impl AsRef<[u8]>, v: impl Into<IVec>) {
        self.0.push((tree, k.as_ref().to_vec(), Some(v.into())));
    }

    pub(crate) fn remove(&mut self, tree: usize, k: impl AsRef<[u8]>) {
        self.0.push((tree, k.as_ref().to_vec(), None));
    }
}

/// Makes the writes `fill` gathers to `trees` one by one, in order, each a plain write: for
/// batches every prefix of which is a state the store may be left in (a crash keeps a prefix),
/// which then need no journal.
pub(crate) fn in_order(trees: &[&Tree], fill: impl FnOnce(&mut Batch)) -> Result<(), StoreError> {
    let mut batch = Batch::default();
    fill(&mut batch);
    for (i, k, v) in batch.0 {
        match v {
            Some(v) => trees[i].insert(k, v)?,
            None => trees[i].remove(k)?,
        }
    }
    Ok(())
}

/// A batch as the journal keeps it: (tree name, key, value or `None` for a removal), in order.
type Record = Vec<(Vec<u8>, Vec<u8>, Option<Vec<u8>>)>;

/// The store's journal of atomic batches (see the module's docs). Clones share it.
#[derive(Clone)]
pub(crate) struct Journal {
    tree: Tree,
    /// A batch failed after its entry was written: until the store opens again and replays
    /// it, no other batch may be made (a later one replayed over would be undone by it).
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// The next entry's key. Entries live only while their batch is written, so numbering
    /// starts again at 0 whenever the store opens (after [`Journal::replay`] emptied it).
    next: Arc<AtomicU64>,
}

impl Journal {
    pub(crate) fn new(tree: Tree) -> Journal {
        Journal { tree, broken: Default::default(), next: Arc::new(AtomicU64::new(0)) }
    }

    /// Applies the writes `fill` gathers to `trees`, all or (after a crash) none.
    pub(crate) fn atomic(&self, trees: &[&Tree], fill: impl FnOnce(&mut Batch)) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        fill(&mut batch);
        self.write(trees, batch, usize::MAX)
    }

    /// [`Journal::atomic`], stopping after the first `made` of the batch's own writes (and
    /// never removing the entry) when fewer than the batch holds: a crash, for the tests.
    fn write(&self, trees: &[&Tree], batch: Batch, made: usize) -> Result<(), StoreError> {
        let one = |(i, k, v): &(usize, Vec<u8>, Option<IVec>)| match v {
            Some(v) => trees[*i].insert(k, v.clone()),
            None => trees[*i].remove(k),
        };
        if batch.0.is_empty() {
            return Ok(());
        }
        if self.broken.load(Ordering::Relaxed) {
            return Err(StoreError::Unfinished);
        }
        if let [w] = &batch.0[..] {
            // One write is atomic by itself.
            return if made == 0 { Ok(()) } else { one(w) };
        }
        let record: Record =
            batch.0.iter().map(|(i, k, v)| (trees[*i].name(), k.clone(), v.as_ref().map(|v| v.to_vec()))).collect();
        let key = self.next.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        self.tree.insert(key, postcard::to_allocvec(&record).expect("serializing bytes cannot fail"))?;
        let rest = batch.0.iter().take(made).try_for_each(one).and_then(|()| match made >= batch.0.len() {
            true => self.tree.remove(key),
            false => Ok(()),
        });
        if rest.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        rest
    }

    /// Finishes the batches a crash cut short, in order, writing them to the trees of `trees`
    /// they name, and empties the journal. Returns how many there were.
    pub(crate) fn replay(&self, trees: &[&Tree]) -> Result<usize, StoreError> {
        let entries: Vec<(IVec, IVec)> = self.tree.iter().collect::<Result<_, _>>()?;
        for (key, value) in &entries {
            let record: Record = postcard::from_bytes(value).map_err(|_| StoreError::Corrupt("journal entry"))?;
            for (name, k, v) in record {
                let tree =
                    trees.iter().find(|t| t.name() == name).ok_or(StoreError::Corrupt("journal entry's tree"))?;
                match v {
                    Some(v) => tree.insert(k, v)?,
                    None => tree.remove(k)?,
                }
            }
            self.tree.remove(key)?;
        }
        self.next.store(0, Ordering::Relaxed);
        Ok(entries.len())
    }
}

#[cfg(test)]
#[path = "kv_tests.rs"]
mod tests;
