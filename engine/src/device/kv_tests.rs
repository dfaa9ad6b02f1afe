//! The memory disk against sled: the same writes give the same reads, and a crash keeps what a
//! barrier made durable plus a prefix of what came after.

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, Vec<u8>, Vec<u8>),
    Remove(u8, Vec<u8>),
    Atomic(Vec<(u8, Vec<u8>, Option<Vec<u8>>)>),
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

fn run(trees: &[Tree; 2], op: &Op) {
    match op {
        Op::Insert(t, k, v) => trees[*t as usize].insert(k, v.clone()).unwrap(),
        Op::Remove(t, k) => trees[*t as usize].remove(k).unwrap(),
        Op::Atomic(ws) => atomic(&[&trees[0], &trees[1]], |b| {
            for (t, k, v) in ws {
                match v {
                    Some(v) => b.insert(*t as usize, k, v.clone()),
                    None => b.remove(*t as usize, k),
                }
            }
        })
        .unwrap(),
        Op::Clear(t) => trees[*t as usize].clear().unwrap(),
    }
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
        let sled_trees = [Tree::sled(&db, "a").unwrap(), Tree::sled(&db, "b").unwrap()];
        let disk = MemDisk::new();
        let mem_trees = [Tree::mem(&disk, "a"), Tree::mem(&disk, "b")];
        for op in &ops {
            run(&sled_trees, op);
            run(&mem_trees, op);
            prop_assert_eq!(view(&sled_trees), view(&mem_trees));
        }
    }

    #[test]
    fn a_crash_keeps_the_barrier_and_a_prefix_of_what_followed(
        before in proptest::collection::vec(op(), 0..20),
        after in proptest::collection::vec(op(), 0..20),
        keep in 0usize..25,
    ) {
        let disk = MemDisk::new();
        let trees = [Tree::mem(&disk, "a"), Tree::mem(&disk, "b")];
        for op in &before {
            run(&trees, op);
        }
        disk.barrier();
        for op in &after {
            run(&trees, op);
        }
        // Every op is one atomic write on a memory disk.
        prop_assert_eq!(disk.unsynced(), after.len());
        disk.crash(keep);
        prop_assert_eq!(disk.unsynced(), 0);
        let expect_disk = MemDisk::new();
        let expect = [Tree::mem(&expect_disk, "a"), Tree::mem(&expect_disk, "b")];
        for op in before.iter().chain(after.iter().take(keep)) {
            run(&expect, op);
        }
        prop_assert_eq!(view(&trees), view(&expect));
    }
}
