//! What one peer can cost the relay and the other devices, driven through the core (issue 15,
//! items 4 and 5): typing indicators coalesced and dropped first, budgets for peers without a
//! session, recovery attempts and link waits per peer.

use super::backlog::{behinds, drain, killed, pushed_seqs};
use super::sessions::error_codes;
use super::*;

fn typings_to(effects: &[Effect], conn: ConnId) -> usize {
    sends(effects).iter().filter(|(c, f)| *c == conn && matches!(f, RelayFrame::Typing { .. })).count()
}

fn rate_limited(effects: &[Effect]) -> usize {
    sends(effects).iter().filter(|(_, f)| matches!(f, RelayFrame::RateLimited { .. })).count()
}

fn closed(effects: &[Effect], conn: ConnId) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Close { conn: c } if *c == conn))
}

/// Another notes chat of `keys`' account, made by `dev`.
fn notes_chat(w: &mut World, keys: &AccountKeys, dev: &Dev, n: u8) -> ChatId {
    let chat = ChatId([n; 16]);
    let account = keys.public();
    let key = ChatKey::random(&mut w.rng);
    let wrapped = wrap_chat_key(&key, chat, Epoch(0), account.id, &account.kem_key, &mut w.rng);
    let keys = vec![notes_key(keys, chat, Epoch(0), wrapped)];
    let create = ClientFrame::CreateChat {
        req: 40 + u64::from(n),
        chat,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        client_seq: ClientSeq(u64::from(n)),
        keys,
    };
    let e = w.frame(dev.conn, create);
    w.durable(&e);
    chat
}

/// Item 4: a burst of typing frames reaches the other devices once per chat and interval, in
/// at most a few chats at once.
#[test]
fn typing_is_coalesced_per_chat_and_device() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let mut got = 0;
    for _ in 0..100 {
        got += typings_to(&w.frame(a.conn, ClientFrame::Typing { chat }), b.conn);
    }
    assert_eq!(got, 1, "a burst is pushed once");
    w.now_ms += TYPING_FORWARD_MS - 1;
    assert_eq!(typings_to(&w.frame(a.conn, ClientFrame::Typing { chat }), b.conn), 0);
    w.now_ms += 1;
    assert_eq!(typings_to(&w.frame(a.conn, ClientFrame::Typing { chat }), b.conn), 1, "and again after the interval");
    // In more chats at once than a person types in: the extra ones are dropped.
    let chats: Vec<ChatId> = (0..TYPING_CHATS as u8 + 2).map(|n| notes_chat(&mut w, &keys, &a, 0x70 + n)).collect();
    w.now_ms += TYPING_FORWARD_MS;
    let shown: usize =
        chats.iter().map(|c| typings_to(&w.frame(a.conn, ClientFrame::Typing { chat: *c }), b.conn)).sum();
    assert_eq!(shown, TYPING_CHATS);
}

/// Item 4: typing indicators never make anything else drop, nor a device be cut off: a member
/// that reads nothing while a flood of them arrives still gets the next message pushed, with
/// no `Behind`. (They counted as pushes, so a flood filled the push budget, and the message
/// after it was dropped.)
#[test]
fn typing_never_makes_other_pushes_drop_or_a_reader_be_cut() {
    let limits = Limits { max_push_backlog_bytes: 64 * 1024, requests_per_second: 0, ..Limits::default() };
    let mut w = world_with(limits.clone());
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    drain(&mut w, &[a.conn, b.conn]);
    let mut typed = 0;
    for _ in 0..2_000 {
        w.now_ms += TYPING_FORWARD_MS;
        let e = w.frame(a.conn, ClientFrame::Typing { chat });
        typed += typings_to(&e, b.conn);
        assert!(killed(&e).is_empty());
    }
    assert!(typed > 0, "typing indicators went out while there was room");
    assert!(w.core.conns[&b.conn].backlog.queued_bytes <= limits.max_push_backlog_bytes / 2);
    let e = w.frame(a.conn, append(10, chat, 1));
    let released = w.durable(&e);
    assert_eq!(pushed_seqs(&released, b.conn), vec![1], "the message is pushed: {released:?}");
    let waiting = w.core.conns[&b.conn].backlog.queued_bytes;
    let drained = w.input(Input::Sent { conn: b.conn, bytes: waiting, pages: 0 });
    assert!(behinds(&drained, b.conn).is_empty(), "nothing was missed");
}

/// Item 5: a peer without a session has a request budget of its own; a device with a session
/// is not touched by it.
#[test]
fn a_peer_without_a_session_has_a_request_budget() {
    let mut w = world();
    let a = w.connect(1, "a");
    w.account(&a);
    let stranger = w.connect(2, "stranger");
    let mut answered = 0;
    let mut limited = 0;
    for req in 0..30 {
        let e = w.frame(stranger.conn, ClientFrame::LinkLookup { req, link_id: [1; 32] });
        answered += error_codes(&e).len();
        limited += rate_limited(&e);
    }
    assert_eq!((answered, limited), (20, 10), "the burst, then told to wait");
    let e = w.frame(a.conn, ClientFrame::SyncState { req: 1 });
    assert!(matches!(sends(&e)[..], [(1, RelayFrame::SyncState { .. })]));
    // Reconnecting does not refill it; time does.
    w.input(Input::Closed { conn: stranger.conn });
    w.input(Input::Tick { now_ms: 1 });
    let again = w.connect(3, "stranger");
    assert_eq!(rate_limited(&w.frame(again.conn, ClientFrame::LinkLookup { req: 40, link_id: [1; 32] })), 1);
    w.now_ms += 1_000;
    let e = w.frame(again.conn, ClientFrame::LinkLookup { req: 41, link_id: [1; 32] });
    assert_eq!(error_codes(&e), vec![(again.conn, ErrorCode::UnknownDevice)]);
    // Gone and with a full budget, its entry is dropped.
    w.input(Input::Closed { conn: again.conn });
    w.now_ms += 10_000;
    w.frame(a.conn, ClientFrame::SyncState { req: 2 });
    w.input(Input::Tick { now_ms: 2 });
    assert!(!w.core.peers.contains_key(&DeviceId("stranger".into())));
}

/// Item 5: malformed frames cost a request each; past the budget the stream is closed instead
/// of answered.
#[test]
fn malformed_frames_past_the_budget_close_the_stream() {
    let mut w = world();
    let stranger = w.connect(2, "stranger");
    let bad = |w: &mut World| {
        let now_ms = w.now_ms;
        w.input(Input::BadFrame { conn: 2, error: FrameError::Malformed("garbage".into()), now_ms })
    };
    for _ in 0..20 {
        let e = bad(&mut w);
        assert_eq!(error_codes(&e), vec![(stranger.conn, ErrorCode::MalformedFrame)]);
        assert!(!closed(&e, stranger.conn));
    }
    let e = bad(&mut w);
    assert!(closed(&e, stranger.conn), "{e:?}");
}

/// Item 5: recovery attempts are budgeted per peer: one peer using up its own leaves another's
/// alone (they were relay-wide: one peer took everyone's).
#[test]
fn recovery_attempts_are_budgeted_per_peer() {
    let mut w = world();
    let x = w.connect(1, "x");
    let y = w.connect(2, "y");
    let mut limited = 0;
    for req in 0..25 {
        limited += rate_limited(&w.frame(x.conn, ClientFrame::FetchRecovery { req, lookup_id: [req as u8; 32] }));
    }
    assert!(limited >= 20, "{limited}");
    let e = w.frame(y.conn, ClientFrame::FetchRecovery { req: 1, lookup_id: [9; 32] });
    assert_eq!(error_codes(&e), vec![(y.conn, ErrorCode::RecoveryNotFound)], "{e:?}");
}

/// Item 5: a peer waits for one link at a time, whatever its streams; the table holds no more
/// waits than the relay allows connections.
#[test]
fn each_peer_waits_for_one_link_and_the_table_is_sized_by_connections() {
    let mut w = world_with(Limits { max_connections: 2, ..Limits::default() });
    let wait =
        |req, link: u8| ClientFrame::LinkWait { req, link_id: [link; 32], device_x25519: [2; 32], name: "n".into() };
    let p: Vec<Dev> = (0..3).map(|i| w.connect(10 + i, "p")).collect();
    for (i, d) in p.iter().enumerate() {
        assert!(sends(&w.frame(d.conn, wait(i as u64, i as u8))).is_empty());
    }
    assert_eq!(w.core.links.keys().copied().collect::<Vec<_>>(), vec![[2; 32]], "the peer's last wait");
    let q = w.connect(20, "q");
    assert!(sends(&w.frame(q.conn, wait(1, 7))).is_empty());
    let r = w.connect(21, "r");
    let e = w.frame(r.conn, wait(1, 8));
    assert_eq!(error_codes(&e), vec![(r.conn, ErrorCode::RateLimited)]);
}
