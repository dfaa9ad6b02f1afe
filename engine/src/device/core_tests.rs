//! The sync core driven directly: relay frames in, outputs out.

use super::*;
use crate::proto::ids::{AccountId, Epoch};
use crate::proto::wire::AccountEvent;

fn item(cs: u64) -> OutboxItem {
    OutboxItem {
        client_seq: ClientSeq(cs),
        chat: ChatId([1; 16]),
        epoch: Epoch(0),
        body: OutboxBody::Delta { sealed: vec![cs as u8; 8], plain: Vec::new() },
    }
}

/// Sent appends as `(req, client seq)`.
fn appends(out: &[SyncOutput]) -> Vec<(ReqId, u64)> {
    out.iter()
        .filter_map(|o| match o {
            SyncOutput::Send(ClientFrame::Append { req, client_seq, .. }) => Some((*req, client_seq.0)),
            _ => None,
        })
        .collect()
}

/// Sent appends as `(client seq, epoch)`.
fn append_epochs(out: &[SyncOutput]) -> Vec<(u64, u32)> {
    out.iter()
        .filter_map(|o| match o {
            SyncOutput::Send(ClientFrame::Append { client_seq, epoch, .. }) => Some((client_seq.0, epoch.0)),
            _ => None,
        })
        .collect()
}

fn frame(core: &mut SyncCore, f: RelayFrame) -> Vec<SyncOutput> {
    core.handle(SyncInput::Frame(Box::new(f)))
}

/// A core that is connected and has synced its (empty) state.
fn ready() -> SyncCore {
    let mut core = SyncCore::new(Seq(0), false);
    core.handle(SyncInput::Connected);
    let out = frame(
        &mut core,
        RelayFrame::Hello {
            version: PROTOCOL_VERSION,
            account: Some(AccountId([2; 16])),
            incarnation: Default::default(),
        },
    );
    let Some(SyncOutput::Send(ClientFrame::SyncState { req })) = out.first() else { panic!("{out:?}") };
    frame(&mut core, RelayFrame::SyncState { req: *req, account_head: Seq(0), chats: vec![], restored: None });
    assert!(core.is_connected());
    core
}

#[test]
fn a_rate_limited_append_is_sent_again_in_order_after_the_pause_and_never_taken_as_stored() {
    let mut core = ready();
    let mut sent = Vec::new();
    for cs in 1..=5 {
        sent.extend(appends(&core.handle(SyncInput::OutboxAdded(item(cs)))));
    }
    assert_eq!(sent.iter().map(|(_, cs)| *cs).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let req = |cs: u64| sent.iter().find(|(_, c)| *c == cs).expect("sent").0;

    // 1 is stored; 2 is refused for the rate; 3..5 are refused behind it.
    let out = frame(
        &mut core,
        RelayFrame::Acked { req: req(1), chat: ChatId([1; 16]), client_seq: ClientSeq(1), seq: Seq(1) },
    );
    assert!(matches!(out[..], [SyncOutput::Acked { client_seq: ClientSeq(1), .. }, ..]));
    let out = frame(&mut core, RelayFrame::RateLimited { req: req(2), retry_after_ms: 250 });
    assert_eq!(out, vec![SyncOutput::RetryAfter { ms: 250 }], "one pause, nothing sent, nothing dropped");
    for cs in 3..=5 {
        let out = frame(&mut core, RelayFrame::RateLimited { req: req(cs), retry_after_ms: 250 });
        assert!(out.is_empty(), "already paused: {out:?}");
    }
    // While paused nothing goes out, not even a new item.
    assert!(appends(&core.handle(SyncInput::OutboxAdded(item(6)))).is_empty());
    assert!(!core.is_idle());

    // Resume: 2..6 again, in client-seq order, with fresh req ids.
    let again = appends(&core.handle(SyncInput::Resume));
    assert_eq!(again.iter().map(|(_, cs)| *cs).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
    assert!(again.iter().all(|(r, _)| sent.iter().all(|(old, _)| old != r)));
    // A late answer to an old req id is not taken as an answer.
    let stale =
        frame(&mut core, RelayFrame::Duplicate { req: req(2), chat: ChatId([1; 16]), client_seq: ClientSeq(2) });
    assert!(!stale.iter().any(|o| matches!(o, SyncOutput::Acked { .. })), "{stale:?}");
    for (i, (r, cs)) in again.iter().enumerate() {
        let out = frame(
            &mut core,
            RelayFrame::Acked { req: *r, chat: ChatId([1; 16]), client_seq: ClientSeq(*cs), seq: Seq(2 + i as u64) },
        );
        assert!(out.iter().any(|o| matches!(o, SyncOutput::Acked { client_seq, .. } if client_seq.0 == *cs)));
    }
    assert!(core.is_idle());
}

#[test]
fn a_rate_limited_fetch_is_asked_again_after_the_pause() {
    let mut core = SyncCore::new(Seq(0), false);
    core.handle(SyncInput::Connected);
    let chat = ChatId([3; 16]);
    core.handle(SyncInput::ChatReady { chat, cursor: Seq(0) });
    let out = frame(
        &mut core,
        RelayFrame::Hello {
            version: PROTOCOL_VERSION,
            account: Some(AccountId([2; 16])),
            incarnation: Default::default(),
        },
    );
    let Some(SyncOutput::Send(ClientFrame::SyncState { req })) = out.first() else { panic!("{out:?}") };
    // The state request itself is limited: asked again on resume.
    let out = frame(&mut core, RelayFrame::RateLimited { req: *req, retry_after_ms: 70_000_000 });
    assert_eq!(out, vec![SyncOutput::RetryAfter { ms: MAX_RETRY_AFTER_MS }], "a huge retry-after is cut");
    let out = core.handle(SyncInput::Resume);
    let Some(SyncOutput::Send(ClientFrame::SyncState { req })) = out.first() else { panic!("{out:?}") };
    let out = frame(
        &mut core,
        RelayFrame::SyncState { req: *req, account_head: Seq(0), chats: vec![(chat, Seq(9))], restored: None },
    );
    // (The first connection's incarnation is stored first.)
    let Some(SyncOutput::Send(ClientFrame::FetchChat { req, after: Seq(0), .. })) = out.last() else {
        panic!("{out:?}")
    };
    let out = frame(&mut core, RelayFrame::RateLimited { req: *req, retry_after_ms: 100 });
    assert_eq!(out, vec![SyncOutput::RetryAfter { ms: 100 }]);
    assert!(!core.is_caught_up(), "not abandoned: the chat is still behind");
    let out = core.handle(SyncInput::Resume);
    assert!(matches!(out[..], [SyncOutput::Send(ClientFrame::FetchChat { after: Seq(0), .. })]), "{out:?}");
}

#[test]
fn a_rate_limited_request_of_the_driver_becomes_a_typed_error_reply() {
    let mut core = ready();
    let req = core.next_req();
    let out = frame(&mut core, RelayFrame::RateLimited { req, retry_after_ms: 5 });
    assert!(
        matches!(&out[..], [SyncOutput::Reply(RelayFrame::Error { req: Some(r), code: ErrorCode::RateLimited, .. })] if *r == req),
        "{out:?}"
    );
}

fn stale(req: ReqId) -> RelayFrame {
    RelayFrame::Error { req: Some(req), code: ErrorCode::StaleEpoch, message: "rotated".into() }
}

fn resealed(cs: u64) -> OutboxItem {
    OutboxItem { epoch: Epoch(1), ..item(cs) }
}

#[test]
fn a_stale_append_waits_with_everything_after_it_until_it_is_sealed_again() {
    let mut core = ready();
    let mut sent = Vec::new();
    for cs in 1..=3 {
        sent.extend(appends(&core.handle(SyncInput::OutboxAdded(item(cs)))));
    }
    let req = |cs: u64| sent.iter().find(|(_, c)| *c == cs).expect("sent").0;
    // 1 is stale: the driver is asked to make it again; 2 and 3 were held back behind it.
    let out = frame(&mut core, stale(req(1)));
    assert_eq!(out, vec![SyncOutput::Stale { client_seq: ClientSeq(1), chat: ChatId([1; 16]) }]);
    assert_eq!(frame(&mut core, RelayFrame::RateLimited { req: req(2), retry_after_ms: 50 }).len(), 1);
    frame(&mut core, RelayFrame::RateLimited { req: req(3), retry_after_ms: 50 });
    // The pause ends, but nothing goes before the stale item does, not even a new one.
    assert!(appends(&core.handle(SyncInput::Resume)).is_empty());
    assert!(appends(&core.handle(SyncInput::OutboxAdded(item(4)))).is_empty());
    assert!(!core.is_idle());
    // Sealed again (here only 1 and 2, as if 3 and 4 were of a chat that did not rotate): all
    // go out, in client-seq order.
    let out = core.handle(SyncInput::Resealed(vec![resealed(1), resealed(2)]));
    let epochs = append_epochs(&out);
    assert_eq!(epochs, vec![(1, 1), (2, 1), (3, 0), (4, 0)]);
}

#[test]
fn an_item_sealed_again_while_in_flight_is_just_sent_again() {
    let mut core = ready();
    let sent = appends(&core.handle(SyncInput::OutboxAdded(item(1))));
    // The new keys arrive before the relay's answer to the old seal.
    assert!(appends(&core.handle(SyncInput::Resealed(vec![resealed(1)]))).is_empty(), "still in flight");
    let out = frame(&mut core, stale(sent[0].0));
    assert!(!out.iter().any(|o| matches!(o, SyncOutput::Stale { .. })), "nothing to remake: {out:?}");
    let again: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            SyncOutput::Send(ClientFrame::Append { client_seq, epoch, .. }) => Some((client_seq.0, epoch.0)),
            _ => None,
        })
        .collect();
    assert_eq!(again, vec![(1, 1)]);
}

#[test]
fn a_due_rotation_is_asked_for_once_caught_up_and_holds_idle_until_answered() {
    let mut core = ready();
    assert!(core.is_idle());
    let out = core.handle(SyncInput::RotationDue(true));
    let [SyncOutput::Rotate { req }] = out[..] else { panic!("{out:?}") };
    assert!(!core.is_idle(), "not idle while the rotation is in flight");
    // Stale (the account moved on): asked again, a few times per connection at most.
    let mut req = req;
    for _ in 1..MAX_ROTATE_ATTEMPTS {
        let out =
            frame(&mut core, RelayFrame::Error { req: Some(req), code: ErrorCode::StaleEpoch, message: String::new() });
        let [SyncOutput::KeyWorkStale, SyncOutput::Rotate { req: again }] = out[..] else { panic!("{out:?}") };
        req = again;
    }
    let out =
        frame(&mut core, RelayFrame::Error { req: Some(req), code: ErrorCode::StaleEpoch, message: String::new() });
    assert!(matches!(out[..], [SyncOutput::KeyWorkStale]), "given up on this connection: {out:?}");
    assert!(core.is_idle(), "and not waited for");
    // A new connection tries again; `Done` ends it.
    core.handle(SyncInput::Disconnected);
    core.handle(SyncInput::Connected);
    let out = frame(
        &mut core,
        RelayFrame::Hello {
            version: PROTOCOL_VERSION,
            account: Some(AccountId([2; 16])),
            incarnation: Default::default(),
        },
    );
    let [SyncOutput::Send(ClientFrame::SyncState { req })] = out[..] else { panic!("{out:?}") };
    let out = frame(&mut core, RelayFrame::SyncState { req, account_head: Seq(0), chats: vec![], restored: None });
    let [SyncOutput::Rotate { req }] = out[..] else { panic!("{out:?}") };
    let out = frame(&mut core, RelayFrame::Done { req });
    // The driver checks for more; the heads are asked for again (the rotation's entries).
    let [SyncOutput::KeyWorkDone, SyncOutput::Send(ClientFrame::SyncState { req })] = out[..] else {
        panic!("{out:?}")
    };
    frame(&mut core, RelayFrame::SyncState { req, account_head: Seq(0), chats: vec![], restored: None });
    assert!(core.is_idle());

    // Key work that needs a lookup first: the answer goes to the driver, the request stays.
    let [SyncOutput::Rotate { req }] = core.handle(SyncInput::RotationDue(true))[..] else { panic!() };
    let out = frame(&mut core, RelayFrame::Accounts { req, accounts: vec![] });
    assert!(matches!(&out[..], [SyncOutput::Looked { req: r, .. }] if *r == req), "{out:?}");
    assert!(!core.is_idle());
    // The driver finds nothing (more) to send: the core stops waiting for it.
    assert!(core.handle(SyncInput::RotationDue(false)).is_empty());
    assert!(core.is_idle(), "no request is left waiting");
}

#[test]
fn a_delta_whose_key_has_not_arrived_waits_and_is_fetched_again_once_it_has() {
    let mut core = ready();
    let chat = ChatId([6; 16]);
    core.handle(SyncInput::ChatReady { chat, cursor: Seq(0) });
    let delta = |seq| Delta {
        chat,
        seq: Seq(seq),
        epoch: Epoch(1),
        device: crate::proto::ids::DeviceId("d".into()),
        account: AccountId([1; 16]),
        client_seq: ClientSeq(seq),
        sealed: vec![],
    };
    let out = frame(&mut core, RelayFrame::Push { delta: delta(1) });
    assert!(matches!(out[..], [SyncOutput::ApplyDelta(_)]));
    // The driver could not open it: the chat waits, later pushes too.
    core.handle(SyncInput::KeyMissing { chat, seq: Seq(1) });
    assert!(frame(&mut core, RelayFrame::Push { delta: delta(2) }).is_empty());
    // The key came: the chat is fetched again from before the delta.
    let out = core.handle(SyncInput::ChatReady { chat, cursor: Seq(0) });
    assert!(matches!(out[..], [SyncOutput::Send(ClientFrame::FetchChat { after: Seq(0), .. })]), "{out:?}");
}

/// A relay restored from a backup (docs/protocol.md, "Restores"): a new incarnation in its
/// `Hello` makes the core go back to the floors it reports, put back what the relay lost from
/// this device's outbox, and fetch from there: new deltas at seqs it had passed are not skipped.
/// Under the same incarnation only heads below the cursors rewind.
#[test]
fn a_new_incarnation_rewinds_to_the_floors_and_sends_again_what_the_relay_lost() {
    let old = Incarnation { store: [1; 16], generation: 0 };
    let new = Incarnation { store: [1; 16], generation: 7 };
    let (chat, made_since) = (ChatId([6; 16]), ChatId([8; 16]));
    let connect = |core: &mut SyncCore, incarnation, heads: Vec<(ChatId, Seq)>, restored| {
        core.handle(SyncInput::Disconnected);
        core.handle(SyncInput::Connected);
        let hello = RelayFrame::Hello { version: PROTOCOL_VERSION, account: Some(AccountId([2; 16])), incarnation };
        let [SyncOutput::Send(ClientFrame::SyncState { req })] = frame(core, hello)[..] else { panic!() };
        frame(core, RelayFrame::SyncState { req, account_head: Seq(4), chats: heads, restored })
    };
    let mut core = SyncCore::new(Seq(4), false).with_incarnation(Some(old));
    core.handle(SyncInput::ChatReady { chat, cursor: Seq(20) });

    // Same incarnation, heads at or past the cursors: nothing to rewind.
    let out = connect(&mut core, old, vec![(chat, Seq(20))], None);
    assert!(!out.iter().any(|o| matches!(o, SyncOutput::Rewind { .. })), "{out:?}");

    // Restored: the chat's log is the old one up to 12, the account log up to 3; the relay
    // holds this device's deltas up to client seq 5; `made_since` is new.
    let restored = Restored { account_floor: Seq(3), chats: vec![(chat, Seq(12))], client_seq: ClientSeq(5) };
    let out = connect(&mut core, new, vec![(chat, Seq(25)), (made_since, Seq(2))], Some(restored));
    assert_eq!(
        out[0],
        SyncOutput::Rewind {
            incarnation: new,
            account: Seq(3),
            chats: vec![(chat, Seq(12)), (made_since, Seq(0))],
            resend_after: Some(ClientSeq(5)),
        }
    );
    let sent: Vec<_> = out[1..].iter().collect();
    assert!(sent.iter().any(|o| matches!(o, SyncOutput::Send(ClientFrame::FetchAccount { after: Seq(3), .. }))));
    assert!(sent
        .iter()
        .any(|o| matches!(o, SyncOutput::Send(ClientFrame::FetchChat { chat: c, after: Seq(12), .. }) if *c == chat)));
    assert!(sent.iter().any(|o| matches!(o, SyncOutput::LoadOutbox { after: ClientSeq(0), .. })), "{out:?}");

    // The next connection to the same incarnation rewinds nothing more.
    let out = connect(
        &mut core,
        new,
        vec![(chat, Seq(25))],
        Some(Restored { account_floor: Seq(3), chats: vec![(chat, Seq(12))], client_seq: ClientSeq(5) }),
    );
    assert!(!out.iter().any(|o| matches!(o, SyncOutput::Rewind { .. })), "{out:?}");

    // Same incarnation, a head below the cursor (a store copied back by hand): back to it.
    core.handle(SyncInput::ChatReady { chat, cursor: Seq(25) });
    let out = connect(&mut core, new, vec![(chat, Seq(21))], None);
    assert!(
        matches!(&out[0], SyncOutput::Rewind { chats, resend_after: None, .. } if chats == &vec![(chat, Seq(21))]),
        "{out:?}"
    );
}

/// Issue 15, item 6: a device back from offline sends nothing of its outbox until it has read
/// and applied the account log as far as the relay has it (an entry there may end the epoch the
/// items are sealed under; applying it seals them again), nor while a rotation is due.
#[test]
fn the_outbox_waits_until_the_account_log_is_applied_and_no_rotation_is_due() {
    let mut core = SyncCore::new(Seq(0), false).with_incarnation(Some(Default::default()));
    for cs in 1..=2 {
        assert!(core.handle(SyncInput::OutboxAdded(item(cs))).is_empty(), "offline");
    }
    core.handle(SyncInput::Connected);
    let hello = RelayFrame::Hello {
        version: PROTOCOL_VERSION,
        account: Some(AccountId([2; 16])),
        incarnation: Default::default(),
    };
    let [SyncOutput::Send(ClientFrame::SyncState { req })] = frame(&mut core, hello)[..] else { panic!() };
    // The relay's account log is two entries ahead: fetched first, nothing sent.
    let out = frame(&mut core, RelayFrame::SyncState { req, account_head: Seq(2), chats: vec![], restored: None });
    let [SyncOutput::Send(ClientFrame::FetchAccount { req, .. })] = out[..] else { panic!("{out:?}") };
    let expired = |seq: u64| AccountEntry {
        seq: Seq(seq),
        event: AccountEvent::DeviceExpired { device: DeviceId("old".into()), last_active_ms: 0 },
    };
    let out = frame(&mut core, RelayFrame::AccountPage { req, entries: vec![expired(1), expired(2)], head: Seq(2) });
    assert_eq!(out.iter().filter(|o| matches!(o, SyncOutput::ApplyAccountEntry(_))).count(), 2, "{out:?}");
    assert!(appends(&out).is_empty(), "not with the entries, before the driver applied them: {out:?}");
    // The first is applied: still nothing.
    assert!(appends(&core.handle(SyncInput::AccountApplied(Seq(1)))).is_empty());
    // The second made a rotation due (an expired session): still nothing; the rotation is asked.
    let out = core.handle(SyncInput::RotationDue(true));
    assert!(matches!(out[..], [SyncOutput::Rotate { .. }]) && appends(&out).is_empty(), "{out:?}");
    let [SyncOutput::Rotate { req }] = out[..] else { panic!() };
    assert!(appends(&core.handle(SyncInput::AccountApplied(Seq(2)))).is_empty(), "the rotation is under way");
    // It is done: the heads are asked for again (its entries are in the log now), still nothing.
    let out = frame(&mut core, RelayFrame::Done { req });
    let [SyncOutput::KeyWorkDone, SyncOutput::Send(ClientFrame::SyncState { req })] = out[..] else {
        panic!("{out:?}")
    };
    let out = frame(&mut core, RelayFrame::SyncState { req, account_head: Seq(3), chats: vec![], restored: None });
    let [SyncOutput::Send(ClientFrame::FetchAccount { req, .. })] = out[..] else { panic!("{out:?}") };
    assert!(
        appends(&frame(&mut core, RelayFrame::AccountPage { req, entries: vec![expired(3)], head: Seq(3) })).is_empty()
    );
    // The driver applies the rotation's entries, sealing the items again: now they go, sealed anew.
    core.handle(SyncInput::RotationDue(false));
    core.handle(SyncInput::Resealed(vec![resealed(1), resealed(2)]));
    let out = core.handle(SyncInput::AccountApplied(Seq(3)));
    let sent = append_epochs(&out);
    assert_eq!(sent, vec![(1, 1), (2, 1)]);
}

/// A request refused as stale (made for keys or members that moved on) is made again only
/// after the session caught up again; `Refresh` makes "caught up" mean the relay's heads as
/// they are now, not as they were last asked for (else it is made again at once, as stale).
#[test]
fn a_refresh_asks_for_the_heads_again_and_is_not_caught_up_until_they_are_applied() {
    let mut core = ready();
    assert!(core.is_caught_up());
    let out = core.handle(SyncInput::Refresh);
    let [SyncOutput::Send(ClientFrame::SyncState { req })] = out[..] else { panic!("{out:?}") };
    assert!(!core.is_caught_up(), "not while the heads are asked for");
    assert!(core.handle(SyncInput::Refresh).is_empty(), "asked once");
    // Rate limited: asked again on resume.
    let out = frame(&mut core, RelayFrame::RateLimited { req, retry_after_ms: 10 });
    assert!(matches!(out[..], [SyncOutput::RetryAfter { .. }]), "{out:?}");
    assert!(!core.is_caught_up());
    let out = core.handle(SyncInput::Resume);
    let [SyncOutput::Send(ClientFrame::SyncState { req })] = out[..] else { panic!("{out:?}") };
    // The relay's account log moved on (another device's new epoch): fetched and applied first.
    let out = frame(&mut core, RelayFrame::SyncState { req, account_head: Seq(1), chats: vec![], restored: None });
    let [SyncOutput::Send(ClientFrame::FetchAccount { req, .. })] = out[..] else { panic!("{out:?}") };
    let entry = AccountEntry {
        seq: Seq(1),
        event: AccountEvent::DeviceExpired { device: DeviceId("old".into()), last_active_ms: 0 },
    };
    frame(&mut core, RelayFrame::AccountPage { req, entries: vec![entry], head: Seq(1) });
    assert!(core.is_caught_up());
}
