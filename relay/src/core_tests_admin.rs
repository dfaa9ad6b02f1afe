//! The operator's commands (`core/admin.rs`), driven through the core.

use stratus_engine::proto::wire::NewEpoch;

use super::members::{create_group, done, grant, group_terms};
use super::sessions::error_codes;
use super::*;

impl World {
    /// Runs an operator's command, makes what it wrote durable, and returns every effect and
    /// the answer.
    fn admin(&mut self, command: AdminCommand) -> (Vec<Effect>, Result<AdminAnswer, AdminRefusal>) {
        let mut effects = self.input(Input::Admin { id: 77, command });
        // Everything written so far made durable (the answer waits for it).
        let token = self.core.next_token - 1;
        if token > self.core.durable_token {
            let released = self.input(Input::Durable { token });
            effects.extend(released);
        }
        let answers: Vec<_> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Admin { id: 77, answer } => Some(answer.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 1, "one answer: {effects:?}");
        let answer = answers.into_iter().next().expect("checked");
        (effects, answer)
    }

    fn admin_ok(&mut self, command: AdminCommand) -> AdminAnswer {
        self.admin(command).1.expect("the command is carried out")
    }

    fn ops(effects: &[Effect]) -> Vec<&StoreOp> {
        effects
            .iter()
            .flat_map(|e| match e {
                Effect::Write { ops, .. } => ops.iter().collect(),
                _ => Vec::new(),
            })
            .collect()
    }
}

fn id_of(keys: &AccountKeys) -> AccountRef {
    AccountRef::Id(keys.public().id)
}

fn closed(effects: &[Effect]) -> Vec<ConnId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Close { conn } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// A fresh device that says `Hello`: what it is told.
fn hello(w: &mut World, conn: ConnId, name: &str) -> Vec<Effect> {
    w.input(Input::Opened { conn, device: DeviceId(name.into()) });
    w.frame(conn, ClientFrame::Hello { version: PROTOCOL_VERSION })
}

#[test]
fn accounts_are_listed_with_devices_storage_and_last_activity() {
    let mut w = world();
    let a = w.connect(1, "a");
    w.now_ms = 5_000;
    let (ka, _) = w.account(&a);
    let b2 = w.second_device(&ka, 2, "a2");
    let b = w.connect(3, "b");
    w.now_ms = 9_000;
    let (kb, chat_b) = w.account(&b);
    let e = w.frame(b.conn, append(5, chat_b, 1));
    w.durable(&e);
    w.input(Input::Closed { conn: b2.conn });

    let AdminAnswer::Accounts(all) = w.admin_ok(AdminCommand::Accounts) else { panic!() };
    assert_eq!(all.len(), 2);
    let of = |k: &AccountKeys| all.iter().find(|v| v.account == k.public().id).expect("listed").clone();
    let (va, vb) = (of(&ka), of(&kb));
    assert_eq!(va.devices.len(), 2);
    assert_eq!(va.devices.iter().filter(|d| d.online).count(), 1, "a2's stream closed: {va:?}");
    assert_eq!((va.status, va.deleted, va.chats), (AccountStatus::Active, false, 1));
    assert_eq!(va.last_active_ms, 5_000);
    assert_eq!(vb.last_active_ms, 9_000);
    assert!(vb.stored_bytes > va.stored_bytes && vb.stored_bytes > DELTA_OVERHEAD_BYTES, "{vb:?}");
    assert_eq!((vb.quota_bytes, vb.own_quota), (Limits::default().max_account_bytes, false));
}

#[test]
fn an_accounts_own_quota_replaces_the_relays_and_goes_back_to_it() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (ka, chat) = w.account(&a);
    let (effects, answer) = w.admin(AdminCommand::SetQuota { account: id_of(&ka), bytes: Some(1) });
    let AdminAnswer::Account(v) = answer.unwrap() else { panic!() };
    assert_eq!((v.quota_bytes, v.own_quota), (1, true));
    let ops = World::ops(&effects);
    assert!(matches!(ops[..], [StoreOp::PutAccountAdmin(_, AccountAdmin { quota: Some(1), .. })]), "{ops:?}");
    let refused = w.frame(a.conn, append(5, chat, 1));
    assert_eq!(error_codes(&refused), vec![(a.conn, ErrorCode::QuotaExceeded)]);
    // 0 is no quota; `None` the relay's again.
    w.admin_ok(AdminCommand::SetQuota { account: id_of(&ka), bytes: Some(0) });
    let e = w.frame(a.conn, append(6, chat, 1));
    assert!(sends(&w.durable(&e)).iter().any(|(_, f)| matches!(f, RelayFrame::Acked { .. })));
    let AdminAnswer::Account(v) = w.admin_ok(AdminCommand::SetQuota { account: id_of(&ka), bytes: None }) else {
        panic!()
    };
    assert_eq!((v.quota_bytes, v.own_quota), (Limits::default().max_account_bytes, false));
}

#[test]
fn a_suspended_accounts_devices_are_refused_until_it_is_lifted_and_nothing_is_deleted() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (ka, chat) = w.account(&a);
    let b = w.connect(2, "b");
    let (kb, chat_b) = w.account(&b);
    w.core.usernames.insert("ann".into(), ka.public().id);
    w.core.accounts.get_mut(&ka.public().id).unwrap().username = Some("ann".into());
    let e = w.frame(a.conn, append(5, chat, 1));
    w.durable(&e);

    // By username: its open stream is told why and closed; frames it still sends are dropped.
    let (effects, answer) = w.admin(AdminCommand::Suspend(AccountRef::Username("ann".into())));
    assert!(matches!(answer, Ok(AdminAnswer::Account(AccountView { status: AccountStatus::Suspended, .. }))));
    assert_eq!(error_codes(&effects), vec![(a.conn, ErrorCode::AccountSuspended)]);
    assert_eq!(closed(&effects), vec![a.conn]);
    assert!(w.frame(a.conn, append(6, chat, 2)).is_empty());
    assert!(!w.core.served_devices().contains(&a.id), "no circuits for it either");
    // A new stream of it is refused at `Hello`; another account is served.
    let e = hello(&mut w, 3, "a");
    assert_eq!(error_codes(&e), vec![(3, ErrorCode::AccountSuspended)]);
    assert_eq!(closed(&e), vec![3]);
    let e = w.frame(b.conn, append(7, chat_b, 1));
    assert!(sends(&w.durable(&e)).iter().any(|(_, f)| matches!(f, RelayFrame::Acked { .. })));
    assert_eq!(kb.public().id, w.core.devices[&b.id].account);

    // Lifted: served again, with everything it had.
    w.admin_ok(AdminCommand::Unsuspend(id_of(&ka)));
    let e = hello(&mut w, 4, "a");
    assert!(matches!(sends(&e)[..], [(4, RelayFrame::Hello { account: Some(_), .. })]), "{e:?}");
    let e = w.frame(4, ClientFrame::FetchChat { req: 8, chat, after: Seq(0), max: 10 });
    assert!(matches!(e[..], [Effect::ReadChat { upto: Seq(1), .. }]), "{e:?}");
}

#[test]
fn a_banned_account_cannot_come_back_nor_can_its_devices() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (ka, _) = w.account(&a);
    let (effects, _) = w.admin(AdminCommand::Ban(id_of(&ka)));
    assert_eq!(error_codes(&effects), vec![(a.conn, ErrorCode::AccountBanned)]);
    // The same keys from another device.
    let other = w.connect(2, "other");
    let cert = test_cert(&ka, &other.id);
    let e = w.frame(other.conn, ClientFrame::CreateAccount { req: 1, account: ka.public(), cert, invite: None });
    assert_eq!(error_codes(&e), vec![(other.conn, ErrorCode::AccountBanned)]);
    // Deleted after the ban, its former device stays refused as banned; the ban lifted, as
    // deleted.
    w.admin_ok(AdminCommand::Delete(id_of(&ka)));
    assert_eq!(error_codes(&hello(&mut w, 3, "a")), vec![(3, ErrorCode::AccountBanned)]);
    w.admin_ok(AdminCommand::Unsuspend(id_of(&ka)));
    assert_eq!(error_codes(&hello(&mut w, 4, "a")), vec![(4, ErrorCode::AccountDeleted)]);
    // A deleted account is not suspended: there is nothing to suspend.
    let refused = w.admin(AdminCommand::Suspend(id_of(&ka))).1.unwrap_err();
    assert_eq!(refused.code, AdminRefusalCode::AccountDeleted);
}

#[test]
fn a_deleted_accounts_data_goes_and_the_chats_it_shared_go_on_for_the_others() {
    let mut w = world();
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, notes), (kb, _)) = (w.account(&a), w.account(&b));
    let (ia, ib) = (ka.public().id, kb.public().id);
    w.accept_all();
    let group = ChatId([0x61; 16]);
    let keys = grant(&ka, &group_terms(group, 0, &[ia, ib]), &[&ka, &kb], true, &mut w.rng);
    let e = w.frame(a.conn, create_group(group, keys));
    assert!(done(&w.durable(&e), 4));
    let e = w.frame(a.conn, append(5, notes, 1));
    w.durable(&e);
    let e = w.frame(a.conn, append(6, group, 2));
    w.durable(&e);
    let e = w.frame(a.conn, ClientFrame::SetUsername { req: 7, name: Some("ann".into()) });
    w.durable(&e);

    let (effects, answer) = w.admin(AdminCommand::Delete(AccountRef::Username("ann".into())));
    let Ok(AdminAnswer::Deleted(report)) = answer else { panic!("{answer:?}") };
    assert_eq!(report, DeleteReport { account: ia, devices: 1, chats_deleted: 1, deltas_deleted: 1, chats_kept: 1 });
    assert_eq!(error_codes(&effects), vec![(a.conn, ErrorCode::AccountDeleted)]);
    let ops = World::ops(&effects);
    for wanted in [
        StoreOp::DeleteChat(notes),
        StoreOp::DeleteDevice(a.id.clone()),
        StoreOp::DeleteAccountData(ia),
        StoreOp::PutUsername(ia, None),
        StoreOp::PutAccepted(ib, ia, false),
        StoreOp::PutAccepted(ia, ib, false),
    ] {
        assert!(ops.contains(&&wanted), "{wanted:?} in {ops:?}");
    }
    assert!(!ops.iter().any(|op| matches!(op, StoreOp::DeleteChat(c) if *c == group)));
    assert!(!w.core.chats.contains_key(&notes) && !w.core.devices.contains_key(&a.id));
    assert!(w.core.usernames.is_empty());

    // B goes on in the group: its history (A's delta too), and new messages.
    let e = w.frame(b.conn, append(8, group, 1));
    let released = w.durable(&e);
    assert!(sends(&released).iter().any(|(c, f)| *c == b.conn && matches!(f, RelayFrame::Acked { .. })));
    let e = w.frame(b.conn, ClientFrame::FetchChat { req: 9, chat: group, after: Seq(0), max: 10 });
    assert!(matches!(e[..], [Effect::ReadChat { upto: Seq(2), .. }]), "{e:?}");
    // Its key rotations and member changes still work with A listed: keys handed to A are not
    // kept in A's (gone) log.
    let new = grant(&kb, &group_terms(group, 1, &[ia, ib]), &[&ka, &kb], true, &mut w.rng);
    w.core.chats.get_mut(&group).unwrap().record.rekey_due = true;
    let e = w.frame(
        b.conn,
        ClientFrame::Rekey { req: 10, epoch: NewEpoch { chat: group, epoch: Epoch(1), keys: new }, history: vec![] },
    );
    assert!(!World::ops(&e).iter().any(|op| matches!(op, StoreOp::PutAccountEntry(acct, _) if *acct == ia)));
    assert!(done(&w.durable(&e), 10));
    // Nobody invites or adds it again, and its keys and devices do not come back.
    let e = w.frame(b.conn, ClientFrame::Invite { req: 11, account: ia });
    assert_eq!(error_codes(&e), vec![(b.conn, ErrorCode::NotFound)]);
    let cert = test_cert(&ka, &DeviceId("fresh".into()));
    let fresh = w.connect(3, "fresh");
    let e = w.frame(fresh.conn, ClientFrame::CreateAccount { req: 1, account: ka.public(), cert, invite: None });
    assert_eq!(error_codes(&e), vec![(fresh.conn, ErrorCode::AccountDeleted)]);
    assert_eq!(error_codes(&hello(&mut w, 4, "a")), vec![(4, ErrorCode::AccountDeleted)]);
    let stats = w.core.stats();
    assert_eq!((stats.accounts, stats.chats), (1, 2));
    // Deleting it again is refused, and so is an unknown account.
    assert_eq!(w.admin(AdminCommand::Delete(AccountRef::Id(ia))).1.unwrap_err().code, AdminRefusalCode::AccountDeleted);
    let unknown = w.admin(AdminCommand::Ban(AccountRef::Username("nobody".into()))).1.unwrap_err();
    assert_eq!(unknown.code, AdminRefusalCode::UnknownAccount);
}

/// A restarted relay keeps the operator's decisions: statuses, quotas, deleted accounts'
/// devices, registration and invite tokens.
#[test]
fn the_operators_decisions_survive_a_restart() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (ka, _) = w.account(&a);
    let ia = ka.public().id;
    let mut written = Vec::new();
    for command in [
        AdminCommand::SetQuota { account: AccountRef::Id(ia), bytes: Some(10) },
        AdminCommand::Delete(AccountRef::Id(ia)),
        AdminCommand::Registration(Some(Registration::Invite)),
        AdminCommand::CreateInvite { token: InviteToken([5; 16]), now_ms: 1 },
    ] {
        let (effects, _) = w.admin(command);
        written.extend(World::ops(&effects).into_iter().cloned());
    }
    let admin = written
        .iter()
        .rev()
        .find_map(|op| match op {
            StoreOp::PutAccountAdmin(_, r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert!(admin.deleted && admin.former_devices == vec![a.id.clone()]);
    let recovered = Recovered {
        accounts: vec![ka.public()],
        account_admin: vec![(ia, admin)],
        registration: Registration::Invite,
        invites: vec![(InviteToken([5; 16]).digest(), 1)],
        ..Recovered::default()
    };
    let mut w = World { core: RelayCore::new(recovered, Limits::default()), ..world() };
    assert_eq!(error_codes(&hello(&mut w, 1, "a")), vec![(1, ErrorCode::AccountDeleted)]);
    assert!(matches!(
        w.admin_ok(AdminCommand::Registration(None)),
        AdminAnswer::Registration { mode: Registration::Invite, invites: 1 }
    ));
}

#[test]
fn registration_open_by_invitation_or_closed() {
    let mut w = world();
    let create = |w: &mut World, conn: ConnId, name: &str, invite: Option<InviteToken>| {
        let dev = w.connect(conn, name);
        let keys = AccountKeys::generate(&mut w.rng);
        let cert = test_cert(&keys, &dev.id);
        let frame = ClientFrame::CreateAccount { req: 1, account: keys.public(), cert, invite };
        let e = w.frame(conn, frame.clone());
        (e, frame)
    };
    w.admin_ok(AdminCommand::Registration(Some(Registration::Closed)));
    let (e, _) = create(&mut w, 1, "a", None);
    assert_eq!(error_codes(&e), vec![(1, ErrorCode::RegistrationClosed)]);
    assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })));

    w.admin_ok(AdminCommand::Registration(Some(Registration::Invite)));
    let (e, _) = create(&mut w, 2, "b", None);
    assert_eq!(error_codes(&e), vec![(2, ErrorCode::InviteRequired)]);
    let (e, _) = create(&mut w, 3, "c", Some(InviteToken([9; 16])));
    assert_eq!(error_codes(&e), vec![(3, ErrorCode::InviteRequired)], "a token the operator never made");
    let token = InviteToken([1; 16]);
    let AdminAnswer::Invite { token: made, mode } = w.admin_ok(AdminCommand::CreateInvite { token, now_ms: 1 }) else {
        panic!()
    };
    assert_eq!((made, mode), (token, Registration::Invite));
    let (e, frame) = create(&mut w, 4, "d", Some(token));
    assert!(World::ops(&e).contains(&&StoreOp::PutInvite(token.digest(), None)), "used up: {e:?}");
    assert!(done(&w.durable(&e), 1));
    // Used: another account cannot take it; the same creation sent again is answered.
    let (e, _) = create(&mut w, 5, "e", Some(token));
    assert_eq!(error_codes(&e), vec![(5, ErrorCode::InviteRequired)]);
    assert!(done(&w.frame(4, frame), 1));

    // Open again: anyone.
    w.admin_ok(AdminCommand::Registration(Some(Registration::Open)));
    let (e, _) = create(&mut w, 6, "f", None);
    assert!(done(&w.durable(&e), 1));
}

#[test]
fn with_the_disk_full_the_operator_can_list_but_not_change() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (ka, _) = w.account(&a);
    w.input(Input::WriteFailed);
    assert!(matches!(w.admin_ok(AdminCommand::Accounts), AdminAnswer::Accounts(v) if v.len() == 1));
    let refused = w.admin(AdminCommand::Suspend(id_of(&ka))).1.unwrap_err();
    assert_eq!(refused.code, AdminRefusalCode::StorageFull);
    assert!(w.core.account_refusal(ka.public().id).is_none(), "nothing changed");
}

#[test]
fn unused_invites_are_listed_by_id_and_revoked_by_token_or_id() {
    let mut w = world();
    let (t1, t2) = (InviteToken([1; 16]), InviteToken([2; 16]));
    w.admin_ok(AdminCommand::CreateInvite { token: t2, now_ms: 20 });
    w.admin_ok(AdminCommand::CreateInvite { token: t1, now_ms: 10 });
    let AdminAnswer::Invites { invites, .. } = w.admin_ok(AdminCommand::Invites) else { panic!("a listing") };
    let ids: Vec<_> = invites.iter().map(|i| (i.id, i.created_ms)).collect();
    assert_eq!(ids, vec![(invite_id(&t1.digest()), 10), (invite_id(&t2.digest()), 20)], "oldest first");

    let (effects, answer) = w.admin(AdminCommand::RevokeInvite(InviteRef::Digest(t1.digest())));
    assert_eq!(answer, Ok(AdminAnswer::InviteRevoked { id: invite_id(&t1.digest()), invites: 1 }));
    assert!(World::ops(&effects).contains(&&StoreOp::PutInvite(t1.digest(), None)), "stored");
    let answer = w.admin_ok(AdminCommand::RevokeInvite(InviteRef::Id(invite_id(&t2.digest()))));
    assert_eq!(answer, AdminAnswer::InviteRevoked { id: invite_id(&t2.digest()), invites: 0 });
    for again in [InviteRef::Digest(t1.digest()), InviteRef::Id(invite_id(&t2.digest()))] {
        let (effects, answer) = w.admin(AdminCommand::RevokeInvite(again));
        assert_eq!(answer.unwrap_err().code, AdminRefusalCode::UnknownInvite);
        assert!(World::ops(&effects).is_empty(), "a refusal writes nothing");
    }
}

/// The store empties a deletion's ranges only once the deletion is durable, a chunk each time
/// the driver asks, until it reports nothing left; a later deletion asks again.
#[test]
fn deleted_data_is_emptied_in_chunks_once_the_deletion_is_durable() {
    let mut w = world();
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, notes), (kb, _)) = (w.account(&a), w.account(&b));
    let e = w.frame(a.conn, append(5, notes, 1));
    w.durable(&e);
    assert_eq!(w.core.purge_due(), None, "nothing deleted yet");

    let e = w.input(Input::Admin { id: 1, command: AdminCommand::Delete(id_of(&ka)) });
    assert!(World::ops(&e).iter().any(|op| op.is_deletion()));
    assert_eq!(w.core.purge_due(), None, "not before the deletion is durable");
    w.durable(&e);
    assert_eq!(w.core.purge_due(), Some(PURGE_CHUNK));
    w.input(Input::Purged { more: true });
    assert_eq!(w.core.purge_due(), Some(PURGE_CHUNK), "more is left: another chunk");
    w.input(Input::Purged { more: false });
    assert_eq!(w.core.purge_due(), None, "all emptied");

    // Another deletion: its own turn, again once durable.
    let e = w.input(Input::Admin { id: 2, command: AdminCommand::Delete(id_of(&kb)) });
    assert_eq!(w.core.purge_due(), None);
    w.durable(&e);
    assert_eq!(w.core.purge_due(), Some(PURGE_CHUNK));
    w.input(Input::Purged { more: false });
    assert_eq!(w.core.purge_due(), None);
}

/// After a restore, the accounts deleted since its backup are deleted again as the core
/// starts: their devices are refused from the very first frame, the deletion's writes (and
/// forgetting the list) go out once with the first input's effects, and nothing is asked of
/// the store before they are durable. (Before, a task deleted them once the relay ran, and
/// their devices could be served meanwhile.)
#[test]
fn accounts_deleted_after_a_restored_backup_are_refused_from_the_start() {
    let mut w = world();
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, notes), (kb, _)) = (w.account(&a), w.account(&b));
    let (ia, ib) = (ka.public().id, kb.public().id);
    let e = w.frame(a.conn, append(5, notes, 1));
    w.durable(&e);
    let chat = w.core.chats[&notes].record.clone();
    let recovered = Recovered {
        accounts: vec![ka.public(), kb.public()],
        devices: vec![w.core.devices[&a.id].cert.clone(), w.core.devices[&b.id].cert.clone()],
        chats: vec![(notes, chat, Seq(1))],
        redo_deletions: vec![ia],
        ..Recovered::default()
    };
    let mut w = World { core: RelayCore::new(recovered, Limits::default()), ..world() };

    let first = w.input(Input::Opened { conn: 1, device: a.id.clone() });
    let ops = World::ops(&first);
    for wanted in [StoreOp::DeleteAccountData(ia), StoreOp::DeleteChat(notes), StoreOp::ForgetRedoDeletions] {
        assert!(ops.contains(&&wanted), "{wanted:?} in {ops:?}");
    }
    assert_eq!(w.core.purge_due(), None, "the deletion is not durable yet");
    let hello = w.frame(1, ClientFrame::Hello { version: PROTOCOL_VERSION });
    assert_eq!(error_codes(&hello), vec![(1, ErrorCode::AccountDeleted)]);
    assert!(World::ops(&hello).is_empty(), "written once");
    // The other account is served.
    w.input(Input::Opened { conn: 2, device: b.id.clone() });
    let e = w.frame(2, ClientFrame::Hello { version: PROTOCOL_VERSION });
    assert!(matches!(&sends(&e)[..], [(2, RelayFrame::Hello { account: Some(id), .. })] if *id == ib), "{e:?}");
    w.durable(&first);
    assert_eq!(w.core.purge_due(), Some(PURGE_CHUNK));
}
