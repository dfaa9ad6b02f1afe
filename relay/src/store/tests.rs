//! The sled store driven directly: key chains stored once, the earlier record forms, deletions
//! purged across a crash, and telling a full disk apart.

use rand::SeedableRng;
use stratus_engine::proto::cert::{AccountKeys, RotationBody};
use stratus_engine::proto::crypto::SealedBox;
use stratus_engine::proto::directory::{KeyTerms, MemberChange, MemberChangeBody, Membership};

use super::*;

fn key(account: AccountId) -> WrappedKey {
    let key = SealedBox { ephemeral: [3; 32], sealed: vec![4; 72] };
    WrappedKey { account, generation: 0, content: true, key, signature: vec![5; 64] }
}

/// A handout's key chain is stored once (in the directory's records), not in each log
/// entry, and the entries read back exactly as they were written; entries and chat records
/// in the earlier form still read.
#[test]
fn key_chains_in_log_entries_are_stored_once_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let signer = AccountKeys::generate(&mut rng).public();
    let gens: Vec<SignedGen> = (1..=40u8)
        .map(|g| SignedGen {
            body: RotationBody { account: signer.id, generation: u32::from(g), signing_key: [g; 32], kem_key: [g; 32] },
            signature: vec![g; 64],
        })
        .collect();
    let chain = |n: usize| AccountChain { public: signer.clone(), rotations: gens[..n].to_vec() };
    let chat = ChatId([7; 16]);
    let me = AccountId([9; 16]);
    let terms = KeyTerms { chat, kind: ChatKind::Group, epoch: Epoch(3), members: [me, signer.id].into() };
    let change = MemberChange {
        body: MemberChangeBody { chat, base_epoch: Epoch(3), seq: 0, by: signer.id, change: Membership::Leave },
        signature: vec![6; 64],
    };
    let events = vec![
        AccountEvent::ChatAdded {
            terms: terms.clone(),
            key: key(me),
            signer: signer.id,
            signer_chain: Some(chain(30)),
        },
        AccountEvent::MembersChanged { change: change.clone(), by_chain: Some(chain(40)) },
        AccountEvent::ChatAdded { terms, key: key(me), signer: me, signer_chain: None },
        AccountEvent::DeviceExpired { device: DeviceId("d".into()), last_active_ms: 5 },
    ];
    let mut ops = vec![StoreOp::PutAccount(signer.clone())];
    ops.extend(gens.iter().cloned().map(StoreOp::PutAccountGen));
    for (i, event) in events.iter().enumerate() {
        ops.push(StoreOp::PutAccountEntry(me, AccountEntry { seq: Seq(i as u64 + 1), event: event.clone() }));
    }
    store.apply(&ops).unwrap();
    let read: Vec<AccountEvent> =
        store.read_account(me, Seq(0), Seq(10), 10).unwrap().into_iter().map(|e| e.event).collect();
    assert_eq!(read, events);
    let chain_bytes = enc(&chain(30)).len();
    for kv in store.account_log.iter() {
        let (_, v) = kv.unwrap();
        assert!(v.len() < chain_bytes / 4, "an entry of {} bytes; the chain alone is {chain_bytes}", v.len());
    }

    // The earlier forms: an entry with its chain inside, a chat record with its keys.
    let old = AccountEvent::MembersChanged { change, by_chain: Some(chain(12)) };
    store.account_log.insert(seq_key(&me.0, 5), enc(&old)).unwrap();
    let read = store.read_account(me, Seq(4), Seq(5), 10).unwrap();
    assert_eq!(read[0].event, old);
    let epochs: BTreeMap<Epoch, Vec<WrappedKey>> = (0..3).map(|e| (Epoch(e), vec![key(me)])).collect();
    let legacy = LegacyChatRecord {
        kind: ChatKind::Group,
        creator: me,
        members: [me].into(),
        epochs: epochs.clone(),
        rekey_due: true,
        joining: BTreeSet::new(),
        share_with: BTreeSet::new(),
        changes: 1,
    };
    store.chats.insert(&chat.0[..], enc(&legacy)).unwrap();
    let recovered = store.recover().unwrap();
    let (_, record, _) = recovered.chats.iter().find(|(c, _, _)| *c == chat).unwrap();
    assert_eq!((record.newest, record.rekey_due, record.changes), (Epoch(2), true, 1));
    assert_eq!(record.genesis_keys, keys_digest(&epochs[&Epoch(0)]));
}

/// Deleting empties the big trees' ranges after the transaction, in bounded chunks, and a purge a crash
/// interrupted is finished when the store opens; the operator's records read back.
#[test]
fn deletions_purge_their_ranges_even_across_a_crash_and_admin_records_read_back() {
    use crate::core::{AccountAdmin, AccountStatus};
    let dir = tempfile::tempdir().unwrap();
    let (chat, other_chat, me) = (ChatId([7; 16]), ChatId([8; 16]), AccountId([9; 16]));
    let device = DeviceId("dev".into());
    let delta = |chat: ChatId, seq: u64| Delta {
        chat,
        seq: Seq(seq),
        epoch: Epoch(0),
        device: device.clone(),
        account: me,
        client_seq: ClientSeq(seq + u64::from(chat.0[0]) * 100),
        sealed: vec![1; 10],
    };
    let entry = |seq| AccountEntry {
        seq: Seq(seq),
        event: AccountEvent::DeviceExpired { device: device.clone(), last_active_ms: 1 },
    };
    {
        let store = SledStore::open(dir.path()).unwrap();
        let mut ops: Vec<StoreOp> = (1..=5).map(|s| StoreOp::PutDelta(delta(chat, s))).collect();
        ops.extend((1..=3).map(|s| StoreOp::PutDelta(delta(other_chat, s))));
        ops.extend((1..=4).map(|s| StoreOp::PutAccountEntry(me, entry(s))));
        ops.push(StoreOp::PutChatKeys(chat, Epoch(0), vec![key(me)]));
        store.apply(&ops).unwrap();
        let admin = AccountAdmin {
            status: AccountStatus::Banned,
            quota: Some(5),
            deleted: true,
            former_devices: vec![device.clone()],
        };
        store
            .apply(&[
                StoreOp::DeleteChat(chat),
                StoreOp::DeleteDevice(device.clone()),
                StoreOp::DeleteAccountData(me),
                StoreOp::PutAccountAdmin(me, admin.clone()),
                StoreOp::PutRegistration(Registration::Closed),
                StoreOp::PutInvite([3; 32], Some(42)),
            ])
            .unwrap();
        // Emptied a bounded chunk at a time, not in the batch: 5 deltas, 1 key, 8 dedup
        // entries and 4 log entries left.
        assert_eq!(store.deltas.scan_prefix(chat.0).count(), 5, "the batch itself leaves the ranges");
        let mut chunks = 1;
        while store.purge_some(3).unwrap() {
            chunks += 1;
        }
        assert_eq!(chunks, 18 / 3, "chunks of 3 keys");
        assert_eq!(store.deltas.scan_prefix(chat.0).count(), 0);
        assert_eq!(store.deltas.scan_prefix(other_chat.0).count(), 3, "another chat's log stays");
        assert_eq!(store.chat_keys.scan_prefix(chat.0).count(), 0);
        assert_eq!(store.dedup.len(), 0, "both chats' appends were the deleted device's");
        assert_eq!(store.account_log.len(), 0);
        assert!(store.purges.is_empty());
        let r = store.recover().unwrap();
        assert_eq!(r.account_admin, vec![(me, admin)]);
        assert_eq!((r.registration, r.invites), (Registration::Closed, vec![([3; 32], 42)]));

        // A crash between the transaction and the purge: the entry is left, the range full.
        store.apply(&(4..=6).map(|s| StoreOp::PutDelta(delta(other_chat, s))).collect::<Vec<_>>()).unwrap();
        store.purges.insert(purge_key(PURGE_DELTAS, &other_chat.0), &[][..]).unwrap();
        store.barrier().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.deltas.len(), 0);
    assert!(store.purges.is_empty());
}

/// Only a lack of space makes the relay stay up without writing; other failures stop it.
#[test]
fn a_full_disk_is_told_apart_from_other_failures() {
    let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
    assert!(StoreError::Barrier(full).is_disk_full());
    assert!(StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(28))).is_disk_full());
    assert!(!StoreError::Barrier(std::io::Error::other("gone")).is_disk_full());
    assert!(!StoreError::Corrupt("x").is_disk_full());
}

/// A backup copied while batches are applied to the store beside it, with those batches then
/// applied to the copy, ends equal to the store, tree by tree: every kind of write (deltas,
/// usage written twice in a batch, records put and removed, chats and devices deleted with
/// their ranges, some of which the fuzzy copy took while the store emptied them chunk by
/// chunk) replays onto whatever the copy read, batch after batch or runs of them as one. The
/// batches come from the seed; how they interleave with the copy is up to the threads.
#[test]
fn a_backup_copied_beside_writes_ends_equal_to_the_store() {
    use rand::Rng;
    let seed: u64 = std::env::var("SEED").map(|s| s.parse().expect("SEED is a u64")).unwrap_or_else(|_| rand::random());
    eprintln!("seed: {seed} (replay with SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    let me = AccountId([9; 16]);
    let devices: Vec<DeviceId> = (0..3).map(|i| DeviceId(format!("dev{i}"))).collect();
    let mut live_chats: Vec<(ChatId, u64)> = (0..4u8).map(|i| (ChatId([i + 1; 16]), 0)).collect();
    let mut live_devices = devices.clone();
    let mut client_seq = 0u64;
    let mut batch = |rng: &mut rand::rngs::StdRng| -> Vec<StoreOp> {
        let mut ops = Vec::new();
        for _ in 0..rng.gen_range(1..40) {
            let op = match rng.gen_range(0..100) {
                0..=59 if !live_chats.is_empty() && !live_devices.is_empty() => {
                    let c = rng.gen_range(0..live_chats.len());
                    live_chats[c].1 += 1;
                    client_seq += 1;
                    let (chat, seq) = live_chats[c];
                    let device = live_devices[rng.gen_range(0..live_devices.len())].clone();
                    let sealed = vec![rng.gen(); rng.gen_range(1..3000)];
                    let epoch = Epoch(0);
                    let client_seq = ClientSeq(client_seq);
                    StoreOp::PutDelta(Delta { chat, seq: Seq(seq), epoch, device, account: me, client_seq, sealed })
                }
                60..=69 => StoreOp::PutUsage(me, rng.gen()),
                70..=74 => StoreOp::PutAccepted(me, AccountId([rng.gen_range(0..4); 16]), rng.gen()),
                75..=79 => StoreOp::PutInvite([rng.gen_range(0..4); 32], rng.gen::<bool>().then(|| rng.gen())),
                80..=84 => StoreOp::PutUsername(me, rng.gen::<bool>().then(|| format!("n{}", rng.gen::<u8>()))),
                85..=89 if !live_chats.is_empty() => {
                    let (chat, _) = live_chats[rng.gen_range(0..live_chats.len())];
                    StoreOp::PutChatKeys(chat, Epoch(rng.gen_range(0..3)), vec![key(AccountId([rng.gen(); 16]))])
                }
                90..=91 if live_chats.len() > 1 => {
                    let (chat, _) = live_chats.remove(rng.gen_range(0..live_chats.len()));
                    StoreOp::DeleteChat(chat)
                }
                92..=93 if live_devices.len() > 1 => {
                    StoreOp::DeleteDevice(live_devices.remove(rng.gen_range(0..live_devices.len())))
                }
                _ => StoreOp::PutRegistration(if rng.gen() { Registration::Closed } else { Registration::Open }),
            };
            ops.push(op);
        }
        ops
    };
    for _ in 0..200 {
        store.apply(&batch(&mut rng)).unwrap();
        store.purge_some(rng.gen_range(1..20)).unwrap();
    }
    let to = dir.path().join("backup");
    let mut copy = store.backup_begin(&to).unwrap();
    let mut during = Vec::new();
    std::thread::scope(|s| {
        let copying = s.spawn(|| copy.copy());
        for _ in 0..200 {
            let ops = batch(&mut rng);
            store.apply(&ops).unwrap();
            // The relay empties deleted ranges a chunk at a time between its batches.
            store.purge_some(rng.gen_range(1..20)).unwrap();
            during.push(ops);
        }
        copying.join().unwrap().unwrap();
    });
    // Applied to the copy as the backup's thread does: runs of consecutive batches as one.
    let mut rest = &during[..];
    while !rest.is_empty() {
        let (run, more) = rest.split_at(rng.gen_range(1..=rest.len().min(30)));
        BackupCopy::apply(&mut copy, &run.concat()).unwrap();
        rest = more;
    }
    store.barrier().unwrap();
    Box::new(copy).seal().unwrap();
    // The copy empties deleted ranges as it applies; the store's last chunks, now.
    store.purge().unwrap();
    assert!(to.join(MANIFEST).is_file());
    let restored = SledStore::open_only(&to.join("store")).unwrap();
    let mut names = store.db.tree_names();
    names.sort();
    let mut copied = restored.db.tree_names();
    copied.sort();
    assert_eq!(names, copied);
    for name in names {
        let kvs = |db: &sled::Db| -> Vec<(sled::IVec, sled::IVec)> {
            db.open_tree(&name).unwrap().iter().map(Result::unwrap).collect()
        };
        assert!(kvs(&store.db) == kvs(&restored.db), "tree {:?} differs", String::from_utf8_lossy(&name));
    }
    assert!(store.deltas.len() > 100, "the test wrote deltas");
}

/// A backup that fails (its copy dropped unsealed) leaves nothing in its directory, which
/// then takes the next backup; a copy a stopped relay left is named, with what to do. (Before,
/// a failed backup left `store.partial`, and every later backup into that directory was
/// refused as if it held a backup.)
#[test]
fn a_failed_backup_leaves_its_directory_ready_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    store.apply(&[StoreOp::PutRegistration(Registration::Closed)]).unwrap();
    let to = dir.path().join("backup");
    let mut copy = store.backup_begin(&to).unwrap();
    copy.copy().unwrap();
    assert!(to.join(PARTIAL).is_dir());
    drop(copy);
    assert!(!to.join(PARTIAL).exists(), "the failed copy is removed");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
    let mut copy = store.backup_begin(&to).expect("the directory takes the next backup");
    copy.copy().unwrap();
    store.barrier().unwrap();
    Box::new(copy).seal().unwrap();
    assert!(to.join(MANIFEST).is_file() && to.join("store").is_dir() && !to.join(PARTIAL).exists());

    // What a relay stopped mid-copy leaves (its copy never dropped).
    let left = dir.path().join("left");
    std::fs::create_dir_all(left.join(PARTIAL)).unwrap();
    let Err(StoreError::Backup(m)) = store.backup_begin(&left) else { panic!("refused") };
    assert!(m.contains("unfinished backup") && m.contains("remove"), "{m}");
}
