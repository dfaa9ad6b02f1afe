//! The relay core's sessions driven directly: revocation, expiry, recovery.

use stratus_engine::proto::cert::{Revocation, Rotation};
use stratus_engine::proto::crypto::SealedBox;
use stratus_engine::proto::wire::NewEpoch;

use super::*;

fn revocation(keys: &AccountKeys, device: &Dev, by: &Dev) -> Revocation {
    keys.revoke(stratus_engine::proto::cert::RevocationBody {
        account: keys.public().id,
        device: device.id.clone(),
        by: by.id.clone(),
        at_ms: 0,
    })
}

/// A `Revoke` of `device` by `by` with `revocation`, carrying a rotation that covers the account
/// as the core stands (bundles and wrapped keys are opaque to the relay).
fn revoke_with(w: &mut World, keys: &AccountKeys, revocation: Revocation, device: &Dev, req: ReqId) -> ClientFrame {
    let account = keys.public().id;
    let next = keys.rotated(&mut w.rng).unwrap();
    let mut rotation = keys.sign_rotation(&next);
    let acct = &w.core.accounts[&account];
    let opaque = |b: u8| SealedBox { ephemeral: [b; 32], sealed: vec![b; 64] };
    for d in &acct.devices {
        if *d != device.id && !w.core.devices[d].state.revoked {
            rotation.bundles.push((d.clone(), opaque(1)));
        }
    }
    let chats = acct
        .chats
        .iter()
        .map(|c| {
            let record = &w.core.chats[c].record;
            let epoch = Epoch(record.newest.0 + 1);
            let key = opaque(2);
            NewEpoch { chat: *c, epoch, keys: vec![notes_key(&next, *c, epoch, key)] }
        })
        .collect();
    let recovery = acct.recovery.filter(|id| w.core.recoveries[id].by != device.id).map(|_| vec![3; 80]);
    ClientFrame::Revoke { req, revocation, rotation, chats, recovery }
}

/// A correct `Revoke` of `device` by `by`.
fn revoke(w: &mut World, keys: &AccountKeys, device: &Dev, by: &Dev, req: ReqId) -> ClientFrame {
    let r = revocation(keys, device, by);
    revoke_with(w, keys, r, device, req)
}

pub(super) fn error_codes(effects: &[Effect]) -> Vec<(ConnId, ErrorCode)> {
    sends(effects)
        .into_iter()
        .filter_map(|(c, f)| match f {
            RelayFrame::Error { code, .. } => Some((c, *code)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_revocation_is_checked_cuts_the_device_off_and_refuses_it_afterwards() {
    let mut w = world_with(Limits { min_session_age_ms: 0, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");

    // Forged, misattributed and unknown revocations change nothing.
    let stranger = AccountKeys::generate(&mut w.rng);
    let r = revocation(&stranger, &b, &a);
    let f = revoke_with(&mut w, &keys, r, &b, 1);
    let forged = w.frame(a.conn, f);
    let claims_b = {
        let f = revoke(&mut w, &keys, &a, &b, 2);
        w.frame(a.conn, f)
    };
    let nobody = Dev { conn: 9, id: DeviceId("nobody".into()) };
    let unknown = {
        let f = revoke(&mut w, &keys, &nobody, &a, 3);
        w.frame(a.conn, f)
    };
    assert_eq!(error_codes(&forged), vec![(1, ErrorCode::BadCertificate)]);
    assert_eq!(error_codes(&claims_b), vec![(1, ErrorCode::BadCertificate)]);
    assert_eq!(error_codes(&unknown), vec![(1, ErrorCode::UnknownDevice)]);
    assert!(!w.core.devices[&b.id].state.revoked);

    // A real one cuts b off at once: nothing more is pushed to it, frames on their way from it
    // are dropped, and once the revocation is durable b is shown it (signed by the account,
    // with the account's keys), told `SessionRevoked`, and closed.
    let e = {
        let f = revoke(&mut w, &keys, &b, &a, 4);
        w.frame(a.conn, f)
    };
    assert!(sends(&e).iter().all(|(c, _)| *c != 2), "nothing before the barrier: {e:?}");
    let late = w.frame(b.conn, append(5, chat, 1));
    assert!(late.is_empty(), "{late:?}");
    let released = w.durable(&e);
    let to =
        |conn| sends(&released).into_iter().filter(|(c, _)| *c == conn).map(|(_, f)| f.clone()).collect::<Vec<_>>();
    assert!(to(1).iter().any(|f| matches!(f, RelayFrame::Done { req: 4 })));
    assert!(to(1).iter().any(|f| matches!(
        f,
        RelayFrame::PushAccount { entry: AccountEntry { event: AccountEvent::DeviceRevoked { .. }, .. } }
    )));
    let ended = |frames: &[RelayFrame]| match frames {
        [RelayFrame::SessionEnded { entry, chain }, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. }] => {
            let AccountEvent::DeviceRevoked { revocation } = &entry.event else { return false };
            revocation.body.device == b.id && chain.id() == keys.public().id && chain.rotations.len() == 1
        }
        _ => false,
    };
    assert!(ended(&to(2)), "the proof, then the end, and nothing else: {released:?}");
    assert!(released.contains(&Effect::Close { conn: 2 }));

    // Any later connection is shown the same and closed.
    w.input(Input::Opened { conn: 3, device: b.id.clone() });
    let hello = w.frame(3, ClientFrame::Hello { version: PROTOCOL_VERSION });
    let frames: Vec<RelayFrame> = sends(&hello).into_iter().map(|(_, f)| f.clone()).collect();
    assert!(ended(&frames), "{hello:?}");
    assert!(hello.contains(&Effect::Close { conn: 3 }));

    // Asking again is answered again; the list shows b ended.
    let again = {
        let f = revoke(&mut w, &keys, &b, &a, 6);
        w.frame(a.conn, f)
    };
    assert!(matches!(sends(&again)[..], [(1, RelayFrame::Done { req: 6 })]), "{again:?}");
    let list = w.frame(a.conn, ClientFrame::ListDevices { req: 7 });
    let [(1, RelayFrame::Devices { devices, .. })] = &sends(&list)[..] else { panic!("{list:?}") };
    let by_id: BTreeMap<_, _> = devices.iter().map(|d| (d.device.clone(), d)).collect();
    assert!(by_id[&a.id].online && !by_id[&a.id].revoked);
    assert!(by_id[&b.id].revoked && !by_id[&b.id].online);
}

#[test]
fn a_young_session_cannot_end_others_and_two_revoking_each_other_leave_one() {
    let mut w = world();
    w.now_ms = 1_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    w.core.devices.get_mut(&b.id).unwrap().state.registered_ms = 1_000;
    w.now_ms += 3_600_000;
    let young = {
        let f = revoke(&mut w, &keys, &b, &a, 1);
        w.frame(a.conn, f)
    };
    assert_eq!(error_codes(&young), vec![(1, ErrorCode::SessionTooNew)]);
    assert!(!w.core.devices[&b.id].state.revoked);

    // A day later both may; the one the relay takes first wins, the other is already cut off.
    w.now_ms += 24 * 3_600_000;
    let first = {
        let f = revoke(&mut w, &keys, &a, &b, 2);
        w.frame(b.conn, f)
    };
    let second = {
        let f = revoke(&mut w, &keys, &b, &a, 3);
        w.frame(a.conn, f)
    };
    // a's stream waits for the barrier to be told; its own revocation meanwhile is dropped.
    assert!(second.is_empty(), "{second:?}");
    let released = w.durable(&first);
    assert_eq!(error_codes(&released), vec![(1, ErrorCode::SessionRevoked)]);
    assert!(w.core.devices[&a.id].state.revoked && !w.core.devices[&b.id].state.revoked);
}

#[test]
fn a_revocation_is_written_and_survives_a_restart() {
    let mut w = world_with(Limits { min_session_age_ms: 0, ..Limits::default() });
    w.now_ms = 5_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let e = {
        let f = revoke(&mut w, &keys, &b, &a, 1);
        w.frame(a.conn, f)
    };
    let writes: Vec<StoreOp> = e
        .iter()
        .filter_map(|e| match e {
            Effect::Write { ops, .. } => Some(ops.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(writes.contains(&StoreOp::PutDeviceState(
        b.id.clone(),
        DeviceState { registered_ms: 0, last_active_ms: 0, revoked: true }
    )));
    // A relay restarted on what was written still refuses b.
    let cert = keys.certify(DeviceCertBody {
        account: keys.public().id,
        device: b.id.clone(),
        device_x25519: [2; 32],
        name: "b".into(),
        created_ms: 0,
    });
    let Some(end) = writes.iter().find_map(|op| match op {
        StoreOp::PutSessionEnd(d, entry) if *d == b.id => Some(entry.clone()),
        _ => None,
    }) else {
        panic!("the revocation is kept for b: {writes:?}")
    };
    let recovered = |ends| Recovered {
        accounts: vec![keys.public()],
        devices: vec![cert.clone()],
        device_states: vec![(b.id.clone(), DeviceState { registered_ms: 0, last_active_ms: 0, revoked: true })],
        session_ends: ends,
        ..Recovered::default()
    };
    let hello = |recovered| {
        let mut core = RelayCore::new(recovered, Limits::default());
        assert!(core.handle(Input::Opened { conn: 1, device: b.id.clone() }).is_empty());
        core.handle(Input::Frame { conn: 1, frame: ClientFrame::Hello { version: PROTOCOL_VERSION }, now_ms: 0 })
    };
    let proven = hello(recovered(vec![(b.id.clone(), end.clone())]));
    assert!(
        matches!(&sends(&proven)[..], [(1, RelayFrame::SessionEnded { entry, .. }), (1, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. })] if **entry == end),
        "{proven:?}"
    );
    // Without the kept entry (a session ended before the relay kept them) b is only told.
    let told = hello(recovered(Vec::new()));
    assert!(matches!(&sends(&told)[..], [(1, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. })]), "{told:?}");
}

#[test]
fn sessions_inactive_longer_than_the_account_allows_end() {
    let day = 24 * 3_600_000;
    let mut w = world();
    w.now_ms = 1_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    w.frame(b.conn, ClientFrame::SyncState { req: 1 });
    w.input(Input::Closed { conn: b.conn });

    // A young session may not set it (it would end the others), a day-old one may.
    let young = w.frame(a.conn, ClientFrame::SetSessionTtl { req: 2, days: 7 });
    assert_eq!(error_codes(&young), vec![(1, ErrorCode::SessionTooNew)]);
    w.now_ms += day + 1;
    let too_long = w.frame(a.conn, ClientFrame::SetSessionTtl { req: 3, days: MAX_SESSION_TTL_DAYS + 1 });
    assert_eq!(error_codes(&too_long), vec![(1, ErrorCode::TooLarge)]);
    let e = w.frame(a.conn, ClientFrame::SetSessionTtl { req: 4, days: 7 });
    assert!(e.iter().any(|e| matches!(e, Effect::Write { ops, .. }
        if ops[0] == StoreOp::PutAccountSettings(keys.public().id, AccountSettings { session_ttl_days: 7, rotation_due: false }))));
    let released = w.durable(&e);
    assert!(matches!(sends(&released)[..], [(1, RelayFrame::Done { req: 4 })]), "{released:?}");

    // Six days later b is still a session; eight days after its last frame it is not, and
    // both the list and its own return say so.
    w.now_ms += 5 * day;
    let list = w.frame(a.conn, ClientFrame::ListDevices { req: 5 });
    let [(1, RelayFrame::Devices { devices, session_ttl_days: 7, .. })] = &sends(&list)[..] else { panic!("{list:?}") };
    assert!(devices.iter().all(|d| !d.revoked));
    w.now_ms += 2 * day;
    let list = w.frame(a.conn, ClientFrame::ListDevices { req: 6 });
    assert!(list.iter().any(|e| matches!(e, Effect::Write { ops, .. } if ops.iter().any(|op|
        matches!(op, StoreOp::PutAccountEntry(_, AccountEntry { event: AccountEvent::DeviceExpired { .. }, .. }))))));
    let Some((_, RelayFrame::Devices { devices, .. })) =
        sends(&list).into_iter().find(|(_, f)| matches!(f, RelayFrame::Devices { .. }))
    else {
        panic!("{list:?}")
    };
    let by_id: BTreeMap<_, _> = devices.iter().map(|d| (d.device.clone(), d.revoked)).collect();
    assert_eq!((by_id[&a.id], by_id[&b.id]), (false, true), "a is active (it asked), b expired");
    w.input(Input::Opened { conn: 3, device: b.id.clone() });
    let hello = w.frame(3, ClientFrame::Hello { version: PROTOCOL_VERSION });
    assert!(hello.is_empty(), "the expiry is not durable yet: {hello:?}");
    let released = w.durable(&list);
    let to3: Vec<&RelayFrame> = sends(&released).into_iter().filter(|(c, _)| *c == 3).map(|(_, f)| f).collect();
    assert!(
        matches!(&to3[..], [RelayFrame::SessionEnded { entry, .. }, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. }]
            if matches!(&entry.event, AccountEvent::DeviceExpired { device, .. } if *device == b.id)),
        "{released:?}"
    );

    // Nobody rotated the keys: a rotation is due, and the first `Rotate` that covers the
    // account as it stands (a alone) makes it; after it, another changes nothing.
    let account = keys.public().id;
    assert!(w.core.accounts[&account].settings.rotation_due);
    let rotate = |w: &mut World, req| match revoke(w, &keys, &b, &a, req) {
        ClientFrame::Revoke { req, rotation, chats, recovery, .. } => {
            ClientFrame::Rotate { req, rotation, chats, recovery }
        }
        _ => unreachable!("a revoke"),
    };
    let mut incomplete = rotate(&mut w, 7);
    if let ClientFrame::Rotate { chats, .. } = &mut incomplete {
        chats.clear();
    }
    assert_eq!(error_codes(&w.frame(a.conn, incomplete)), vec![(1, ErrorCode::StaleEpoch)]);
    let f = rotate(&mut w, 8);
    let e = w.frame(a.conn, f);
    let released = w.durable(&e);
    assert!(sends(&released).iter().any(|(_, f)| matches!(f, RelayFrame::Done { req: 8 })));
    assert!(!w.core.accounts[&account].settings.rotation_due);
    assert_eq!(w.core.accounts[&account].gens.len(), 2);
    let f = rotate(&mut w, 9);
    let again = w.frame(a.conn, f);
    assert!(matches!(sends(&again)[..], [(1, RelayFrame::Done { req: 9 })]), "{again:?}");
    assert!(!again.iter().any(|e| matches!(e, Effect::Write { .. })), "not due: nothing changes");
}

#[test]
fn recovery_bundles_are_filed_fetched_and_withdrawn_with_their_device() {
    let mut w = world();
    w.now_ms = 1_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let put = |req, id: u8, by: &Dev| ClientFrame::PutRecovery {
        req,
        lookup_id: [id; 32],
        public: [id; 32],
        signature: keys.sign_recovery(&[id; 32], &by.id),
        sealed: vec![id; 100],
    };

    // A young session sets the first one, but may not replace it.
    let e = w.frame(b.conn, put(1, 7, &b));
    w.durable(&e);
    let again = w.frame(a.conn, put(2, 8, &a));
    assert_eq!(error_codes(&again), vec![(1, ErrorCode::SessionTooNew)]);
    let big = w.frame(
        a.conn,
        ClientFrame::PutRecovery {
            req: 3,
            lookup_id: [9; 32],
            public: [9; 32],
            signature: keys.sign_recovery(&[9; 32], &a.id),
            sealed: vec![0; MAX_RECOVERY_BYTES + 1],
        },
    );
    assert_eq!(error_codes(&big), vec![(1, ErrorCode::TooLarge)]);

    // A device that is not logged in fetches it; an unknown id finds nothing.
    w.input(Input::Opened { conn: 3, device: DeviceId("new".into()) });
    w.frame(3, ClientFrame::Hello { version: PROTOCOL_VERSION });
    let got = w.frame(3, ClientFrame::FetchRecovery { req: 4, lookup_id: [7; 32] });
    assert!(
        matches!(&sends(&got)[..], [(3, RelayFrame::Recovery { sealed, .. })] if sealed == &vec![7; 100]),
        "{got:?}"
    );
    let none = w.frame(3, ClientFrame::FetchRecovery { req: 5, lookup_id: [6; 32] });
    assert_eq!(error_codes(&none), vec![(3, ErrorCode::RecoveryNotFound)]);

    // A certificate the account did not sign is refused; a signed one registers the device.
    let body = |account| DeviceCertBody {
        account,
        device: DeviceId("new".into()),
        device_x25519: [4; 32],
        name: "tablet".into(),
        created_ms: 0,
    };
    let stranger = AccountKeys::generate(&mut w.rng);
    let forged = stranger.certify(body(keys.public().id));
    let refused = w.frame(3, ClientFrame::Recover { req: 6, lookup_id: [7; 32], cert: forged });
    assert_eq!(error_codes(&refused), vec![(3, ErrorCode::BadCertificate)]);
    let e = w.frame(3, ClientFrame::Recover { req: 7, lookup_id: [7; 32], cert: keys.certify(body(keys.public().id)) });
    let released = w.durable(&e);
    assert!(sends(&released).iter().any(|(c, f)| *c == 3 && matches!(f, RelayFrame::Done { req: 7 })), "{released:?}");
    assert_eq!(w.core.devices[&DeviceId("new".into())].account, keys.public().id);

    // b stored the bundle; when b's session ends, the bundle goes with it.
    w.now_ms += 25 * 3_600_000;
    let e = {
        let f = revoke(&mut w, &keys, &b, &a, 8);
        w.frame(a.conn, f)
    };
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Write { ops, .. } if ops.contains(&StoreOp::DeleteRecovery([7; 32])))));
    let gone = w.frame(3, ClientFrame::FetchRecovery { req: 9, lookup_id: [7; 32] });
    assert_eq!(error_codes(&gone), vec![(3, ErrorCode::RecoveryNotFound)]);
}

fn parts(frame: &mut ClientFrame) -> (&mut Rotation, &mut Vec<NewEpoch>) {
    match frame {
        ClientFrame::Revoke { rotation, chats, .. } => (rotation, chats),
        _ => unreachable!("a revoke"),
    }
}

#[test]
fn a_rotation_must_cover_the_account_and_afterwards_only_the_new_keys_are_taken() {
    let mut w = world_with(Limits { min_session_age_ms: 0, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let account = keys.public().id;
    let b = w.second_device(&keys, 2, "b");
    let c = w.second_device(&keys, 3, "c");

    // A rotation that leaves out a remaining device, or a chat, or hands the keys to the revoked
    // device, is stale: nothing changes, the device syncs and makes it again.
    let mut forgets_c = revoke(&mut w, &keys, &b, &a, 1);
    parts(&mut forgets_c).0.bundles.retain(|(d, _)| *d != c.id);
    let mut forgets_chat = revoke(&mut w, &keys, &b, &a, 2);
    parts(&mut forgets_chat).1.clear();
    let mut includes_b = revoke(&mut w, &keys, &b, &a, 3);
    let extra = (b.id.clone(), parts(&mut includes_b).0.bundles[0].1.clone());
    parts(&mut includes_b).0.bundles.push(extra);
    let mut old_signer = revoke(&mut w, &keys, &b, &a, 4);
    let (_, chats) = parts(&mut old_signer);
    chats[0].keys[0].signature = notes_key(&keys, chat, Epoch(1), chats[0].keys[0].key.clone()).signature;
    for (f, code) in [
        (forgets_c, ErrorCode::StaleEpoch),
        (forgets_chat, ErrorCode::StaleEpoch),
        (includes_b, ErrorCode::StaleEpoch),
        (old_signer, ErrorCode::BadCertificate),
    ] {
        let e = w.frame(a.conn, f);
        assert_eq!(error_codes(&e), vec![(1, code)]);
        assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })), "nothing is written: {e:?}");
    }
    assert!(!w.core.devices[&b.id].state.revoked);

    // A complete one: the next generation, the chat's next epoch, in one write.
    let e = {
        let f = revoke(&mut w, &keys, &b, &a, 5);
        w.frame(a.conn, f)
    };
    let released = w.durable(&e);
    assert_eq!(w.core.accounts[&account].gens.len(), 2);
    assert_eq!(w.core.chats[&chat].record.newest, Epoch(1));
    let events: Vec<&AccountEvent> = sends(&released)
        .into_iter()
        .filter_map(|(conn, f)| match f {
            RelayFrame::PushAccount { entry } if conn == c.conn => Some(&entry.event),
            _ => None,
        })
        .collect();
    assert!(matches!(
        events[..],
        [AccountEvent::DeviceRevoked { .. }, AccountEvent::Rotated { .. }, AccountEvent::ChatAdded { .. }]
    ));
    assert!(matches!(events[2], AccountEvent::ChatAdded { terms, .. } if terms.epoch == Epoch(1)));

    // An append under the old epoch is stale and holds back the device's later ones; sealed
    // again under the new epoch it is stored, then the later one.
    let at = |req, cs, epoch| ClientFrame::Append {
        req,
        chat,
        epoch: Epoch(epoch),
        client_seq: ClientSeq(cs),
        sealed: vec![1; 40],
    };
    assert_eq!(error_codes(&w.frame(c.conn, at(6, 1, 0))), vec![(3, ErrorCode::StaleEpoch)]);
    let held = w.frame(c.conn, at(7, 2, 1));
    assert!(matches!(sends(&held)[..], [(3, RelayFrame::RateLimited { req: 7, .. })]), "{held:?}");
    let again = w.frame(c.conn, at(8, 1, 1));
    let acked = w.durable(&again);
    assert!(sends(&acked).iter().any(|(_, f)| matches!(f, RelayFrame::Acked { req: 8, seq: Seq(1), .. })));

    // A chat key, a certificate or a recovery key the old generation signed is stale.
    let chat2 = ChatId([9; 16]);
    let wrapped = SealedBox { ephemeral: [1; 32], sealed: vec![1; 48] };
    let create = ClientFrame::CreateChat {
        req: 9,
        chat: chat2,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        client_seq: ClientSeq(3),
        keys: vec![notes_key(&keys, chat2, Epoch(0), wrapped)],
    };
    assert_eq!(error_codes(&w.frame(c.conn, create)), vec![(3, ErrorCode::StaleEpoch)]);
    let put = ClientFrame::PutRecovery {
        req: 10,
        lookup_id: [5; 32],
        public: [5; 32],
        signature: keys.sign_recovery(&[5; 32], &a.id),
        sealed: vec![5; 64],
    };
    assert_eq!(error_codes(&w.frame(a.conn, put)), vec![(1, ErrorCode::StaleEpoch)]);

    // A relay restarted on what was written keeps the generation.
    let next_gen = w.core.accounts[&account].gens[1].clone();
    let signed = w.core.accounts[&account].rotations[0].clone();
    let recovered = Recovered { accounts: vec![keys.public()], account_gens: vec![signed], ..Recovered::default() };
    let core = RelayCore::new(recovered, Limits::default());
    assert_eq!(core.accounts[&account].gens, vec![keys.public().genesis(), next_gen]);
}

#[test]
fn an_account_keeps_to_what_one_rotation_can_carry() {
    use stratus_engine::proto::cert::MAX_ROTATION_DEVICES;
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let account = keys.public().id;
    // As many sessions as a rotation hands keys to: no more can be linked.
    for i in 1..MAX_ROTATION_DEVICES {
        let d = DeviceId(format!("d{i}"));
        w.core.devices.insert(d.clone(), Device::new(super::test_cert(&keys, &d), DeviceState::default()));
        w.core.accounts.get_mut(&account).unwrap().devices.insert(d);
    }
    let link_id = [5; 32];
    let new = w.connect(2, "new");
    w.frame(new.conn, ClientFrame::LinkWait { req: 1, link_id, device_x25519: [9; 32], name: "n".into() });
    let cert = keys.certify(DeviceCertBody {
        account,
        device: new.id.clone(),
        device_x25519: [9; 32],
        name: "n".into(),
        created_ms: 0,
    });
    let bundle = SealedBox { ephemeral: [1; 32], sealed: vec![2; 80] };
    let e = w.frame(a.conn, ClientFrame::LinkApprove { req: 2, link_id, cert, bundle });
    assert_eq!(error_codes(&e), vec![(1, ErrorCode::TooLarge)]);
    // As many chats as a rotation gives new epochs to: no more can be made.
    for i in 0..MAX_ACCOUNT_CHATS as u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        w.core.accounts.get_mut(&account).unwrap().chats.insert(ChatId(id));
    }
    let chat = ChatId([0xee; 16]);
    let wrapped = SealedBox { ephemeral: [3; 32], sealed: vec![3; 48] };
    let create = ClientFrame::CreateChat {
        req: 3,
        chat,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        client_seq: ClientSeq(1),
        keys: vec![notes_key(&keys, chat, Epoch(0), wrapped)],
    };
    assert_eq!(error_codes(&w.frame(a.conn, create)), vec![(1, ErrorCode::TooLarge)]);
}

/// The caps hold what they promise: a `Revoke` for an account at them — 48 sessions, 2,048
/// chats, the last generation's bundle (the largest) — fits one frame.
#[test]
fn a_rotation_at_the_caps_fits_one_frame() {
    use stratus_engine::proto::cert::{rotation_bundle_context, MAX_GENERATION, MAX_ROTATION_DEVICES};
    use stratus_engine::proto::crypto::seal_box;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
    let mut keys = AccountKeys::generate(&mut rng);
    while keys.generation + 1 < MAX_GENERATION {
        keys = keys.rotated(&mut rng).unwrap();
    }
    let next = keys.rotated(&mut rng).unwrap();
    let account = next.public().id;
    let bundle = postcard::to_allocvec(&next).unwrap();
    let mut rotation = keys.sign_rotation(&next);
    for i in 0..MAX_ROTATION_DEVICES {
        let device = DeviceId(format!("12D3KooW{i:044}"));
        let context = rotation_bundle_context(account, next.generation, &device);
        rotation.bundles.push((device, seal_box(&[9; 32], &[], &context, &bundle, &mut rng)));
    }
    let kem = next.current().kem_key;
    let chats: Vec<NewEpoch> = (0..MAX_ACCOUNT_CHATS as u32)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let (chat, epoch) = (ChatId(id), Epoch(u32::MAX - 1));
            let key = wrap_chat_key(&ChatKey::random(&mut rng), chat, epoch, account, &kem, &mut rng);
            NewEpoch { chat, epoch, keys: vec![notes_key(&next, chat, epoch, key)] }
        })
        .collect();
    let revocation = revocation(
        &keys,
        &Dev { conn: 0, id: DeviceId("x".repeat(52)) },
        &Dev { conn: 0, id: DeviceId("y".repeat(52)) },
    );
    let frame =
        ClientFrame::Revoke { req: u64::MAX, revocation, rotation, chats, recovery: Some(vec![0; MAX_RECOVERY_BYTES]) };
    let bytes = stratus_engine::proto::wire::encode(&frame).expect("a rotation at the caps fits one frame");
    eprintln!(
        "rotation at the caps: {} bytes of {} (bundle {} bytes sealed)",
        bytes.len(),
        stratus_engine::proto::wire::MAX_FRAME_BYTES,
        bundle.len()
    );
}

/// Found by the `relay_core` fuzz target: an answer that waited for a barrier (here b's own
/// `SetUsername`) must not reach b's stream once b's session ended meanwhile; the stream gets
/// the proof of the end, `SessionRevoked`, and its close, nothing else.
#[test]
fn an_answer_waiting_for_the_barrier_does_not_reach_a_stream_whose_session_ended() {
    let mut w = world_with(Limits { min_session_age_ms: 0, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let named = w.frame(b.conn, ClientFrame::SetUsername { req: 3, name: Some("bee".into()) });
    assert!(named.iter().any(|e| matches!(e, Effect::Write { .. })));
    let e = {
        let f = revoke(&mut w, &keys, &b, &a, 4);
        w.frame(a.conn, f)
    };
    let released = w.durable(&e);
    let to_b: Vec<&RelayFrame> = sends(&released).into_iter().filter(|(c, _)| *c == b.conn).map(|(_, f)| f).collect();
    assert!(
        matches!(
            &to_b[..],
            [RelayFrame::SessionEnded { .. }, RelayFrame::Error { code: ErrorCode::SessionRevoked, .. }]
        ),
        "{to_b:?}"
    );
}
