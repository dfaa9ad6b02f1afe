//! The relay core's sessions driven directly: revocation, expiry, recovery.

use super::*;

fn revocation(keys: &AccountKeys, device: &Dev, by: &Dev) -> stratus_engine::proto::cert::Revocation {
    keys.revoke(stratus_engine::proto::cert::RevocationBody {
        account: keys.public().id,
        device: device.id.clone(),
        by: by.id.clone(),
        at_ms: 0,
    })
}

fn error_codes(effects: &[Effect]) -> Vec<(ConnId, ErrorCode)> {
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
    let forged = w.frame(a.conn, ClientFrame::Revoke { req: 1, revocation: revocation(&stranger, &b, &a) });
    let claims_b = w.frame(a.conn, ClientFrame::Revoke { req: 2, revocation: revocation(&keys, &a, &b) });
    let nobody = Dev { conn: 9, id: DeviceId("nobody".into()) };
    let unknown = w.frame(a.conn, ClientFrame::Revoke { req: 3, revocation: revocation(&keys, &nobody, &a) });
    assert_eq!(error_codes(&forged), vec![(1, ErrorCode::BadCertificate)]);
    assert_eq!(error_codes(&claims_b), vec![(1, ErrorCode::BadCertificate)]);
    assert_eq!(error_codes(&unknown), vec![(1, ErrorCode::UnknownDevice)]);
    assert!(!w.core.devices[&b.id].state.revoked);

    // A real one cuts b off at once, before the barrier.
    let e = w.frame(a.conn, ClientFrame::Revoke { req: 4, revocation: revocation(&keys, &b, &a) });
    assert_eq!(error_codes(&e), vec![(2, ErrorCode::SessionRevoked)]);
    assert!(e.contains(&Effect::Close { conn: 2 }));
    let released = w.durable(&e);
    let to =
        |conn| sends(&released).into_iter().filter(|(c, _)| *c == conn).map(|(_, f)| f.clone()).collect::<Vec<_>>();
    assert!(to(1).iter().any(|f| matches!(f, RelayFrame::Done { req: 4 })));
    assert!(to(1).iter().any(|f| matches!(
        f,
        RelayFrame::PushAccount { entry: AccountEntry { event: AccountEvent::DeviceRevoked { .. }, .. } }
    )));
    assert!(to(2).is_empty(), "nothing more reaches the revoked device: {released:?}");

    // Frames already on their way, and any later connection, are refused.
    let late = w.frame(b.conn, append(5, chat, 1));
    assert_eq!(error_codes(&late), vec![(2, ErrorCode::SessionRevoked)]);
    w.input(Input::Opened { conn: 3, device: b.id.clone() });
    let hello = w.frame(3, ClientFrame::Hello { version: PROTOCOL_VERSION });
    assert_eq!(error_codes(&hello), vec![(3, ErrorCode::SessionRevoked)]);
    assert!(hello.contains(&Effect::Close { conn: 3 }));

    // Asking again is answered again; the list shows b ended.
    let again = w.frame(a.conn, ClientFrame::Revoke { req: 6, revocation: revocation(&keys, &b, &a) });
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
    let young = w.frame(a.conn, ClientFrame::Revoke { req: 1, revocation: revocation(&keys, &b, &a) });
    assert_eq!(error_codes(&young), vec![(1, ErrorCode::SessionTooNew)]);
    assert!(!w.core.devices[&b.id].state.revoked);

    // A day later both may; the one the relay takes first wins, the other is already cut off.
    w.now_ms += 24 * 3_600_000;
    let first = w.frame(b.conn, ClientFrame::Revoke { req: 2, revocation: revocation(&keys, &a, &b) });
    let second = w.frame(a.conn, ClientFrame::Revoke { req: 3, revocation: revocation(&keys, &b, &a) });
    assert_eq!(error_codes(&first), vec![(1, ErrorCode::SessionRevoked)]);
    assert_eq!(error_codes(&second), vec![(1, ErrorCode::SessionRevoked)]);
    assert!(w.core.devices[&a.id].state.revoked && !w.core.devices[&b.id].state.revoked);
}

#[test]
fn a_revocation_is_written_and_survives_a_restart() {
    let mut w = world_with(Limits { min_session_age_ms: 0, ..Limits::default() });
    w.now_ms = 5_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let e = w.frame(a.conn, ClientFrame::Revoke { req: 1, revocation: revocation(&keys, &b, &a) });
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
    let recovered = Recovered {
        accounts: vec![keys.public()],
        devices: vec![cert],
        device_states: vec![(b.id.clone(), DeviceState { registered_ms: 0, last_active_ms: 0, revoked: true })],
        ..Recovered::default()
    };
    let mut core = RelayCore::new(recovered, Limits::default());
    assert!(core.handle(Input::Opened { conn: 1, device: b.id.clone() }).is_empty());
    let hello =
        core.handle(Input::Frame { conn: 1, frame: ClientFrame::Hello { version: PROTOCOL_VERSION }, now_ms: 0 });
    assert_eq!(error_codes(&hello), vec![(1, ErrorCode::SessionRevoked)]);
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
        if ops == &[StoreOp::PutAccountSettings(keys.public().id, AccountSettings { session_ttl_days: 7 })])));
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
    assert_eq!(error_codes(&hello), vec![(3, ErrorCode::SessionRevoked)]);
}

#[test]
fn recovery_bundles_are_filed_fetched_and_withdrawn_with_their_device() {
    let mut w = world();
    w.now_ms = 1_000;
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let put = |req, id: u8| ClientFrame::PutRecovery { req, lookup_id: [id; 32], sealed: vec![id; 100] };

    // A young session sets the first one, but may not replace it.
    let e = w.frame(b.conn, put(1, 7));
    w.durable(&e);
    let again = w.frame(a.conn, put(2, 8));
    assert_eq!(error_codes(&again), vec![(1, ErrorCode::SessionTooNew)]);
    let big = w.frame(
        a.conn,
        ClientFrame::PutRecovery { req: 3, lookup_id: [9; 32], sealed: vec![0; MAX_RECOVERY_BYTES + 1] },
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
    let e = w.frame(a.conn, ClientFrame::Revoke { req: 8, revocation: revocation(&keys, &b, &a) });
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Write { ops, .. } if ops.contains(&StoreOp::DeleteRecovery([7; 32])))));
    let gone = w.frame(3, ClientFrame::FetchRecovery { req: 9, lookup_id: [7; 32] });
    assert_eq!(error_codes(&gone), vec![(3, ErrorCode::RecoveryNotFound)]);
}
