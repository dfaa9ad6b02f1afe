//! The directory and chats' members, driven through the core.

use stratus_engine::proto::directory::{
    KeyTerms, MemberChange, MemberChangeBody, Membership, MAX_ADDED_AT_ONCE, MAX_SHARED_EPOCHS,
};
use stratus_engine::proto::wire::{encode, NewEpoch, MAX_FRAME_BYTES};

use super::sessions::error_codes;
use super::*;

pub(super) fn grant(
    signer: &AccountKeys,
    terms: &KeyTerms,
    to: &[&AccountKeys],
    content: bool,
    rng: &mut rand::rngs::StdRng,
) -> Vec<WrappedKey> {
    let key = ChatKey::random(rng);
    to.iter().map(|k| signer.grant_chat_key(&key, terms, &k.current(), content, rng)).collect()
}

pub(super) fn group_terms(chat: ChatId, epoch: u32, members: &[AccountId]) -> KeyTerms {
    KeyTerms { chat, kind: ChatKind::Group, epoch: Epoch(epoch), members: members.iter().copied().collect() }
}

/// The creation of group `chat` at epoch 0 with its first keys.
pub(super) fn create_group(chat: ChatId, keys: Vec<WrappedKey>) -> ClientFrame {
    ClientFrame::CreateChat { req: 4, chat, kind: ChatKind::Group, epoch: Epoch(0), client_seq: ClientSeq(9), keys }
}

pub(super) fn change(keys: &AccountKeys, chat: ChatId, base: u32, change: Membership) -> MemberChange {
    change_after(keys, chat, base, 0, change)
}

pub(super) fn change_after(keys: &AccountKeys, chat: ChatId, base: u32, seq: u32, change: Membership) -> MemberChange {
    let body = MemberChangeBody { chat, base_epoch: Epoch(base), seq, by: keys.public().id, change };
    keys.sign_member_change(body)
}

pub(super) fn pushed_events(effects: &[Effect], conn: ConnId) -> Vec<AccountEvent> {
    sends(effects)
        .into_iter()
        .filter_map(|(c, f)| match f {
            RelayFrame::PushAccount { entry } if c == conn => Some(entry.event.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn done(effects: &[Effect], req: ReqId) -> bool {
    sends(effects).iter().any(|(_, f)| matches!(f, RelayFrame::Done { req: r } if *r == req))
}

#[test]
fn usernames_have_one_owner_and_lookups_serve_the_chain() {
    let mut w = world();
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let (ka, _) = w.account(&a);
    w.account(&b);
    let e = w.frame(a.conn, ClientFrame::SetUsername { req: 3, name: Some("ann".into()) });
    assert!(done(&w.durable(&e), 3));
    let taken = w.frame(b.conn, ClientFrame::SetUsername { req: 3, name: Some("ann".into()) });
    assert_eq!(error_codes(&taken), vec![(2, ErrorCode::AlreadyExists)]);
    let bad = w.frame(b.conn, ClientFrame::SetUsername { req: 4, name: Some("Ann!".into()) });
    assert_eq!(error_codes(&bad), vec![(2, ErrorCode::NotAllowed)]);
    let found = w.frame(b.conn, ClientFrame::Lookup { req: 5, username: "ann".into() });
    let [(_, RelayFrame::Accounts { accounts, .. })] = &sends(&found)[..] else { panic!("{found:?}") };
    assert_eq!(accounts[0].chain.verify().unwrap().last(), Some(&ka.current()));
    assert_eq!(accounts[0].username.as_deref(), Some("ann"));
    let missing = w.frame(b.conn, ClientFrame::Lookup { req: 6, username: "nobody".into() });
    assert_eq!(error_codes(&missing), vec![(2, ErrorCode::NotFound)]);

    // Released, the name is free; a restarted relay keeps the directory.
    let e = w.frame(a.conn, ClientFrame::SetUsername { req: 7, name: Some("annie".into()) });
    w.durable(&e);
    let e = w.frame(b.conn, ClientFrame::SetUsername { req: 8, name: Some("ann".into()) });
    assert!(done(&w.durable(&e), 8));
    let names: Vec<(AccountId, String)> = w.core.usernames.iter().map(|(n, a)| (*a, n.clone())).collect();
    let core = RelayCore::new(
        Recovered {
            accounts: w.core.accounts.values().map(|a| a.public.clone()).collect(),
            usernames: names,
            ..Default::default()
        },
        Limits::default(),
    );
    assert_eq!(core.usernames, w.core.usernames);
}

#[test]
fn members_change_only_as_signed_for_the_newest_epoch_and_nothing_is_stored_until_the_next() {
    let mut w = world();
    let (a, b, c) = (w.connect(1, "a"), w.connect(2, "b"), w.connect(3, "c"));
    let ((ka, _), (kb, _), (kc, _)) = (w.account(&a), w.account(&b), w.account(&c));
    w.accept_all();
    let (ia, ib, ic) = (ka.public().id, kb.public().id, kc.public().id);
    let chat = ChatId([0x61; 16]);
    let terms = |epoch, members: &[AccountId]| group_terms(chat, epoch, members);
    let keys = grant(&ka, &terms(0, &[ia, ib]), &[&ka, &kb], true, &mut w.rng);
    let create = create_group(chat, keys);
    let e = w.frame(a.conn, create);
    let released = w.durable(&e);
    let to_b = pushed_events(&released, b.conn);
    assert!(
        matches!(&to_b[..], [AccountEvent::ChatAdded { signer, signer_chain: Some(chain), .. }]
            if *signer == ia && chain.id() == ia),
        "{to_b:?}"
    );

    // Refused, changing nothing: a member who is not the creator removing, a change signed by
    // another account, one for an old epoch, adding to a direct chat's kind of rules.
    let refusals = [
        (b.conn, change(&kb, chat, 0, Membership::Remove { account: ia }), ErrorCode::NotAllowed),
        (b.conn, change(&kc, chat, 0, Membership::Leave), ErrorCode::BadCertificate),
        (a.conn, change(&ka, chat, 1, Membership::Leave), ErrorCode::StaleEpoch),
        (c.conn, change(&kc, chat, 0, Membership::Leave), ErrorCode::NotMember),
    ];
    for (conn, change, code) in refusals {
        let e = w.frame(conn, ClientFrame::ChangeMembers { req: 5, change });
        assert_eq!(error_codes(&e), vec![(conn, code)]);
        assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })));
    }

    // A adds C without the history: logged to all three; the chat waits for its next epoch.
    let add = change(&ka, chat, 0, Membership::Add { accounts: [ic].into(), share_history: false });
    let e = w.frame(a.conn, ClientFrame::ChangeMembers { req: 6, change: add.clone() });
    let released = w.durable(&e);
    for conn in [a.conn, b.conn, c.conn] {
        assert!(matches!(pushed_events(&released, conn)[..], [AccountEvent::MembersChanged { .. }]));
    }
    // The same change again is stale (it follows no change; one was made since).
    let replayed = w.frame(a.conn, ClientFrame::ChangeMembers { req: 6, change: add });
    assert_eq!(error_codes(&replayed), vec![(a.conn, ErrorCode::StaleEpoch)]);
    let stale = w.frame(
        b.conn,
        ClientFrame::Append { req: 7, chat, epoch: Epoch(0), client_seq: ClientSeq(1), sealed: vec![1; 40] },
    );
    assert_eq!(error_codes(&stale), vec![(b.conn, ErrorCode::StaleEpoch)]);

    // B starts epoch 1. Not to exactly the members: stale. The whole history to C, who was
    // added without it: refused. Transport keys only: taken, the history logged first.
    let members = [ia, ib, ic];
    let short = grant(&kb, &terms(1, &[ia, ib]), &[&ka, &kb], true, &mut w.rng);
    let new = grant(&kb, &terms(1, &members), &[&ka, &kb, &kc], true, &mut w.rng);
    let whole = grant(&kb, &terms(0, &members), &[&kc], true, &mut w.rng);
    let transport = grant(&kb, &terms(0, &members), &[&kc], false, &mut w.rng);
    let rekey = |keys: Vec<WrappedKey>, history: Vec<WrappedKey>| ClientFrame::Rekey {
        req: 8,
        epoch: NewEpoch { chat, epoch: Epoch(1), keys },
        history: vec![NewEpoch { chat, epoch: Epoch(0), keys: history }],
    };
    assert_eq!(error_codes(&w.frame(b.conn, rekey(short, transport.clone()))), vec![(b.conn, ErrorCode::StaleEpoch)]);
    // C has no earlier keys to give: it does not start the epoch.
    let by_c = grant(&kc, &terms(1, &members), &[&ka, &kb, &kc], true, &mut w.rng);
    assert_eq!(error_codes(&w.frame(c.conn, rekey(by_c, Vec::new()))), vec![(c.conn, ErrorCode::NotAllowed)]);
    assert_eq!(error_codes(&w.frame(b.conn, rekey(new.clone(), whole))), vec![(b.conn, ErrorCode::NotAllowed)]);
    let e = w.frame(b.conn, rekey(new.clone(), transport));
    let released = w.durable(&e);
    assert!(done(&released, 8));
    let to_c = pushed_events(&released, c.conn);
    let epochs: Vec<(u32, bool)> = to_c
        .iter()
        .map(|e| match e {
            AccountEvent::ChatAdded { terms, key, .. } => (terms.epoch.0, key.content),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(epochs, vec![(0, false), (1, true)]);
    // A second device's rekey, once none is due, changes nothing.
    let again = w.frame(a.conn, rekey(new, Vec::new()));
    assert!(done(&again, 8) && !again.iter().any(|e| matches!(e, Effect::Write { .. })));

    // A removes C: C is cut off from the chat at once.
    let remove = change(&ka, chat, 1, Membership::Remove { account: ic });
    let e = w.frame(a.conn, ClientFrame::ChangeMembers { req: 9, change: remove });
    w.durable(&e);
    let fetch = w.frame(c.conn, ClientFrame::FetchChat { req: 10, chat, after: Seq(0), max: 10 });
    assert_eq!(error_codes(&fetch), vec![(c.conn, ErrorCode::NotMember)]);
    assert!(!w.core.accounts[&ic].chats.contains(&chat));
}

/// The caps hold: a `Rekey` of a chat at its most members, with the most joiners each given the
/// most earlier epochs, fits one frame.
#[test]
fn a_rekey_at_the_caps_fits_one_frame() {
    let mut w = world();
    let signer = AccountKeys::generate(&mut w.rng);
    let one = AccountKeys::generate(&mut w.rng);
    let chat = ChatId([1; 16]);
    let members: BTreeSet<AccountId> = (0..MAX_CHAT_MEMBERS as u32)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            AccountId(id)
        })
        .collect();
    let terms = KeyTerms { chat, kind: ChatKind::Group, epoch: Epoch(u32::MAX), members: members.clone() };
    let key = ChatKey::random(&mut w.rng);
    let gen = |a: AccountId| AccountGen { account: a, generation: u32::MAX, ..one.current() };
    let keys: Vec<WrappedKey> =
        members.iter().map(|a| signer.grant_chat_key(&key, &terms, &gen(*a), true, &mut w.rng)).collect();
    let history = (0..MAX_SHARED_EPOCHS as u32)
        .map(|e| NewEpoch {
            chat,
            epoch: Epoch(u32::MAX - 1 - e),
            keys: members
                .iter()
                .take(MAX_ADDED_AT_ONCE)
                .map(|a| signer.grant_chat_key(&key, &terms, &gen(*a), true, &mut w.rng))
                .collect(),
        })
        .collect();
    let frame = ClientFrame::Rekey { req: u64::MAX, epoch: NewEpoch { chat, epoch: Epoch(u32::MAX), keys }, history };
    let bytes = encode(&frame).expect("fits one frame").len();
    assert!(bytes < MAX_FRAME_BYTES, "{bytes}");
    eprintln!("a rekey at the caps: {bytes} bytes of {MAX_FRAME_BYTES}");
}

/// A group of 200 accounts: made, one removed, the next epoch wrapped to the 199 left.
#[test]
fn a_group_of_two_hundred_accounts_is_made_and_rekeyed() {
    let mut w = world();
    let devs: Vec<Dev> = (0..200u64).map(|i| w.connect(10 + i, &format!("d{i}"))).collect();
    let keys: Vec<AccountKeys> = devs.iter().map(|d| w.account(d).0).collect();
    w.accept_all();
    let ids: Vec<AccountId> = keys.iter().map(|k| k.public().id).collect();
    let chat = ChatId([0x77; 16]);
    let terms = |epoch, members: &[AccountId]| group_terms(chat, epoch, members);
    let all: Vec<&AccountKeys> = keys.iter().collect();
    let started = std::time::Instant::now();
    let wrapped = grant(&keys[0], &terms(0, &ids), &all, true, &mut w.rng);
    let create = create_group(chat, wrapped);
    let e = w.frame(devs[0].conn, create);
    let released = w.durable(&e);
    assert!(done(&released, 4));
    assert_eq!(w.core.chats[&chat].record.members.len(), 200);

    let remove = change(&keys[0], chat, 0, Membership::Remove { account: ids[199] });
    let e = w.frame(devs[0].conn, ClientFrame::ChangeMembers { req: 5, change: remove });
    w.durable(&e);
    let stay = &ids[..199];
    let wrapped = grant(&keys[1], &terms(1, stay), &all[..199], true, &mut w.rng);
    let rekey =
        ClientFrame::Rekey { req: 6, epoch: NewEpoch { chat, epoch: Epoch(1), keys: wrapped }, history: Vec::new() };
    let e = w.frame(devs[1].conn, rekey);
    let released = w.durable(&e);
    assert!(done(&released, 6));
    let added =
        |conn| pushed_events(&released, conn).iter().filter(|e| matches!(e, AccountEvent::ChatAdded { .. })).count();
    assert_eq!((added(devs[2].conn), added(devs[199].conn)), (1, 0), "the removed account gets no key");
    eprintln!("200 members: made and rekeyed in {:?} (debug build, signing included)", started.elapsed());
}

/// Issue 15, item 3: nobody is put into a chat without having accepted chats from the account
/// doing it. Others invite (bounded per invitee) and wait for the answer; the devices of an
/// account are shown only to itself (with whether they are connected) and to the accounts it
/// accepts or shares a chat with (issue 15, item 10). All of it survives a restart.
#[test]
fn nobody_is_put_into_a_chat_without_accepting_its_maker() {
    let mut w = world();
    let (a, b, c) = (w.connect(1, "a"), w.connect(2, "b"), w.connect(3, "c"));
    let ((ka, _), (kb, _), (kc, _)) = (w.account(&a), w.account(&b), w.account(&c));
    let (ia, ib, ic) = (ka.public().id, kb.public().id, kc.public().id);
    let chat = ChatId([0x62; 16]);
    let keys = grant(&ka, &group_terms(chat, 0, &[ia, ib]), &[&ka, &kb], true, &mut w.rng);

    // Refused, changing nothing: b never accepted a.
    let e = w.frame(a.conn, create_group(chat, keys.clone()));
    assert_eq!(error_codes(&e), vec![(1, ErrorCode::NotAllowed)]);
    assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })) && !w.core.chats.contains_key(&chat));
    assert_eq!(w.core.accounts[&ib].chats.len(), 1, "b is in its notes chat only");
    let devices_of_b = |w: &mut World, conn| {
        let e = w.frame(conn, ClientFrame::AccountDevices { req: 9, account: ib });
        let [(_, RelayFrame::AccountDevices { devices, .. })] = &sends(&e)[..] else { panic!("{e:?}") };
        devices.iter().map(|(c, online)| (c.body.device.clone(), *online)).collect::<Vec<_>>()
    };
    assert!(devices_of_b(&mut w, a.conn).is_empty(), "a stranger sees none of b's devices");
    assert_eq!(devices_of_b(&mut w, b.conn), vec![(b.id.clone(), true)], "b sees its own, online");

    // a invites b (once, however often it asks); b sees it and accepts.
    let e = w.frame(a.conn, ClientFrame::Invite { req: 5, account: ib });
    assert!(done(&w.durable(&e), 5));
    let again = w.frame(a.conn, ClientFrame::Invite { req: 5, account: ib });
    assert!(done(&again, 5) && !again.iter().any(|e| matches!(e, Effect::Write { .. })), "{again:?}");
    let e = w.frame(b.conn, ClientFrame::ListInvitations { req: 6 });
    assert!(
        matches!(&sends(&e)[..], [(2, RelayFrame::Invitations { from, .. })] if from.len() == 1 && from[0].0 == ia)
    );
    let e = w.frame(b.conn, ClientFrame::Accept { req: 7, account: ia, accept: true });
    assert!(done(&w.durable(&e), 7));
    let e = w.frame(b.conn, ClientFrame::ListInvitations { req: 8 });
    assert!(matches!(&sends(&e)[..], [(2, RelayFrame::Invitations { from, .. })] if from.is_empty()));
    assert_eq!(devices_of_b(&mut w, a.conn), vec![(b.id.clone(), false)], "whether it is online stays b's");
    let e = w.frame(a.conn, create_group(chat, keys));
    assert!(done(&w.durable(&e), 4));

    // c accepted by nobody: a cannot add it; c sees b's devices once it shares a chat with b.
    let add = Membership::Add { accounts: [ic].into(), share_history: false };
    let e = w.frame(a.conn, ClientFrame::ChangeMembers { req: 10, change: change(&ka, chat, 0, add) });
    assert_eq!(error_codes(&e), vec![(1, ErrorCode::NotAllowed)]);
    assert!(devices_of_b(&mut w, c.conn).is_empty());

    // Invitations waiting for one account are bounded; its answer frees a place.
    let inviters: Vec<(Dev, AccountKeys)> = (0..MAX_INVITATIONS as u64)
        .map(|i| {
            let d = w.connect(100 + i, &format!("i{i}"));
            let (k, _) = w.account(&d);
            (d, k)
        })
        .collect();
    for (i, (d, _)) in inviters.iter().enumerate() {
        let e = w.frame(d.conn, ClientFrame::Invite { req: 11, account: ic });
        assert!(done(&w.durable(&e), 11), "invitation {i}");
    }
    let e = w.frame(a.conn, ClientFrame::Invite { req: 12, account: ic });
    assert_eq!(error_codes(&e), vec![(1, ErrorCode::TooLarge)]);
    let declined = inviters[0].1.public().id;
    let e = w.frame(c.conn, ClientFrame::Accept { req: 13, account: declined, accept: false });
    assert!(done(&w.durable(&e), 13));
    let e = w.frame(a.conn, ClientFrame::Invite { req: 14, account: ic });
    assert!(done(&w.durable(&e), 14));

    // A restarted relay keeps who accepts whom and what waits.
    let accepted: Vec<(AccountId, AccountId)> =
        w.core.accounts.iter().flat_map(|(id, a)| a.accepts.iter().map(|o| (*id, *o))).collect();
    let invitations: Vec<(AccountId, AccountId, u64)> =
        w.core.accounts.iter().flat_map(|(id, a)| a.invitations.iter().map(|(o, at)| (*id, *o, *at))).collect();
    assert_eq!((accepted.len(), invitations.len()), (1, MAX_INVITATIONS));
    let core = RelayCore::new(
        Recovered {
            accounts: w.core.accounts.values().map(|a| a.public.clone()).collect(),
            accepted: accepted.clone(),
            invitations: invitations.clone(),
            ..Default::default()
        },
        Limits::default(),
    );
    assert!(core.accepts(ib, ia) && !core.accepts(ic, ia) && core.accounts[&ic].invitations.contains_key(&ia));
}
