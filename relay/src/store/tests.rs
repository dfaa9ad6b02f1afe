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

/// Deleting empties the big trees' ranges after the transaction, and a purge a crash
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
