//! The memory disk against sled: the same writes give the same reads, and a crash keeps what a
//! barrier made durable plus a prefix of what came after, in which an atomic batch is there
//! whole or not at all once the journal is replayed.

use proptest::prelude::*;

use super::*;

/// One write of a batch: tree, key, value (`None`: remove).
type BatchWrite = (u8, Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, Vec<u8>, Vec<u8>),
    Remove(u8, Vec<u8>),
    Atomic(Vec<BatchWrite>),
    Clear(u8),
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(0u8..4, 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..2, key(), key()).prop_map(|(t, k, v)| Op::Insert(t, k, v)),
        (0u8..2, key()).prop_map(|(t, k)| Op::Remove(t, k)),
        proptest::collection::vec((0u8..2, key(), proptest::option::of(key())), 0..4).prop_map(Op::Atomic),
        (0u8..2).prop_map(Op::Clear),
    ]
}

fn batch(ws: &[BatchWrite]) -> Batch {
    let mut b = Batch::default();
    for (t, k, v) in ws {
        match v {
            Some(v) => b.insert(*t as usize, k, v.clone()),
            None => b.remove(*t as usize, k),
        }
    }
    b
}

fn run(journal: &Journal, trees: &[Tree; 2], op: &Op) {
    match op {
        Op::Insert(t, k, v) => trees[*t as usize].insert(k, v.clone()).unwrap(),
        Op::Remove(t, k) => trees[*t as usize].remove(k).unwrap(),
        Op::Atomic(ws) => journal.write(&[&trees[0], &trees[1]], batch(ws), usize::MAX).unwrap(),
        Op::Clear(t) => trees[*t as usize].clear().unwrap(),
    }
}

/// Two trees and their journal on a memory disk.
fn mem(disk: &MemDisk) -> (Journal, [Tree; 2]) {
    (Journal::new(Tree::mem(disk, "journal")), [Tree::mem(disk, "a"), Tree::mem(disk, "b")])
}

/// Everything a reader can see of the two trees, through every read the store uses.
fn view(trees: &[Tree; 2]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let all = |i: Iter| i.map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<Vec<_>, _>>().unwrap();
    let mut out = Vec::new();
    for t in trees {
        out.push(all(t.iter()));
        out.push(all(t.scan_prefix([1u8])));
        out.push(all(t.range_from([2u8], 2)));
        out.push(vec![(t.len().to_be_bytes().to_vec(), Vec::new())]);
        let last = t.scan_prefix([0u8]).next_back().map(|kv| kv.unwrap().0.to_vec()).unwrap_or_default();
        out.push(vec![(last, t.get([1u8, 1]).unwrap().map(|v| v.to_vec()).unwrap_or_default())]);
    }
    out
}

/// Like the property tests' shared configuration (engine/tests/common): the seed is random
/// unless `PROPTEST_RNG_SEED` is set, and always printed.
fn config() -> ProptestConfig {
    use proptest::test_runner::RngSeed;
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 128;
    }
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => rand::random(),
    };
    config.rng_seed = RngSeed::Fixed(seed);
    eprintln!("seed: {seed} (replay with PROPTEST_RNG_SEED={seed}), {} cases", config.cases);
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_memory_disk_reads_like_sled(ops in proptest::collection::vec(op(), 0..40)) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        let sled_journal = Journal::new(Tree::sled(&db, "journal").unwrap());
        let sled_trees = [Tree::sled(&db, "a").unwrap(), Tree::sled(&db, "b").unwrap()];
        let disk = MemDisk::new();
        let (mem_journal, mem_trees) = mem(&disk);
        for op in &ops {
            run(&sled_journal, &sled_trees, op);
            run(&mem_journal, &mem_trees, op);
            prop_assert_eq!(view(&sled_trees), view(&mem_trees));
        }
    }

    #[test]
    fn a_crash_keeps_the_barrier_and_a_prefix_of_what_followed_with_whole_batches(
        before in proptest::collection::vec(op(), 0..20),
        after in proptest::collection::vec(op(), 0..20),
        keep in 0usize..60,
    ) {
        let disk = MemDisk::new();
        let (journal, trees) = mem(&disk);
        for op in &before {
            run(&journal, &trees, op);
        }
        disk.barrier();
        // Which op each write after the barrier belongs to: an op survives the crash once its
        // first write does (a batch's first write is its journal entry).
        let mut firsts = Vec::new();
        for op in &after {
            firsts.push(disk.unsynced());
            run(&journal, &trees, op);
        }
        let kept_ops = firsts.iter().filter(|&&first| first < keep).count();
        disk.crash(keep);
        prop_assert_eq!(disk.unsynced(), 0);
        let (journal, trees) = mem(&disk);
        journal.replay(&[&trees[0], &trees[1]]).unwrap();
        let expect_disk = MemDisk::new();
        let (expect_journal, expect) = mem(&expect_disk);
        for op in before.iter().chain(after.iter().take(kept_ops)) {
            run(&expect_journal, &expect, op);
        }
        prop_assert_eq!(view(&trees), view(&expect));
        prop_assert_eq!(journal.tree.len(), 0, "the journal is empty after its replay");
    }

    /// On sled: a batch cut short after any number of its writes (its journal entry written)
    /// is finished when the journal is replayed, as on opening the store again.
    #[test]
    fn a_batch_cut_short_on_sled_is_finished_on_replay(
        before in proptest::collection::vec(op(), 0..10),
        ws in proptest::collection::vec((0u8..2, key(), proptest::option::of(key())), 2..6),
        made in 0usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        let open = || (Journal::new(Tree::sled(&db, "journal").unwrap()), [Tree::sled(&db, "a").unwrap(), Tree::sled(&db, "b").unwrap()]);
        let (journal, trees) = open();
        for op in &before {
            run(&journal, &trees, op);
        }
        journal.write(&[&trees[0], &trees[1]], batch(&ws), made.min(ws.len() - 1)).unwrap();
        let (journal, trees) = open();
        prop_assert_eq!(journal.replay(&[&trees[0], &trees[1]]).unwrap(), 1);
        let expect_disk = MemDisk::new();
        let (expect_journal, expect) = mem(&expect_disk);
        for op in before.iter().chain([Op::Atomic(ws.clone())].iter()) {
            run(&expect_journal, &expect, op);
        }
        prop_assert_eq!(view(&trees), view(&expect));
        prop_assert_eq!(journal.tree.len(), 0);
    }
}

/// A batch that fails after its journal entry is written leaves the journal broken: no other
/// batch is made (one replayed over would be undone by the failed one's replay) until the
/// store opens again, which finishes the failed batch.
#[test]
fn a_batch_that_fails_part_way_stops_the_next_until_it_is_replayed() {
    let disk = MemDisk::new();
    let (journal, trees) = mem(&disk);
    let two = |v: u8| Op::Atomic(vec![(0, vec![1], Some(vec![v])), (1, vec![2], Some(vec![v]))]);
    let Op::Atomic(first) = two(1) else { unreachable!() };
    // The entry and the first write go, the second fails.
    disk.fail_after(Some(2));
    assert!(journal.write(&[&trees[0], &trees[1]], batch(&first), usize::MAX).is_err());
    disk.fail_after(None);
    let Op::Atomic(second) = two(2) else { unreachable!() };
    let refused = journal.write(&[&trees[0], &trees[1]], batch(&second), usize::MAX);
    assert!(matches!(refused, Err(StoreError::Unfinished)), "{refused:?}");
    assert_eq!(trees[1].get([2]).unwrap(), None, "the failed batch is half made until replayed");

    let (journal, trees) = mem(&disk);
    assert_eq!(journal.replay(&[&trees[0], &trees[1]]).unwrap(), 1);
    assert_eq!(
        (trees[0].get([1]).unwrap(), trees[1].get([2]).unwrap()),
        (Some(IVec::from(&[1u8][..])), Some(IVec::from(&[1u8][..])))
    );
    run(&journal, &trees, &two(2));
    assert_eq!(trees[1].get([2]).unwrap(), Some(IVec::from(&[2u8][..])), "batches go again once replayed");
}
