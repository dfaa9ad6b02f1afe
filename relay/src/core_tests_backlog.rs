//! The relay core's backlogs driven directly: pushes dropped past the budget and `Behind` once
//! the queue drains, answers never dropped, a stalled reader cut off and a slow one kept.

use super::*;
use crate::limits::MAX_QUEUED_BYTES;

fn big_append(req: ReqId, chat: ChatId, cs: u64, bytes: usize) -> ClientFrame {
    ClientFrame::Append { req, chat, epoch: Epoch(0), client_seq: ClientSeq(cs), sealed: vec![0xcd; bytes] }
}

/// What the frames sent to `conn` in `effects` cost its backlog.
pub(super) fn cost_to(effects: &[Effect], conn: ConnId) -> u64 {
    sends(effects).into_iter().filter(|(c, _)| *c == conn).map(|(_, f)| frame_cost(f)).sum()
}

pub(super) fn pushed_seqs(effects: &[Effect], conn: ConnId) -> Vec<u64> {
    sends(effects)
        .into_iter()
        .filter_map(|(c, f)| match f {
            RelayFrame::Push { delta } if c == conn => Some(delta.seq.0),
            _ => None,
        })
        .collect()
}

pub(super) fn behinds(effects: &[Effect], conn: ConnId) -> Vec<(Seq, Vec<(ChatId, Seq)>)> {
    sends(effects)
        .into_iter()
        .filter_map(|(c, f)| match f {
            RelayFrame::Behind { account_head, chats } if c == conn => Some((*account_head, chats.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn killed(effects: &[Effect]) -> Vec<ConnId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Kill { conn } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// Reports everything waiting for `conns` written (what setting up the world sent them).
pub(super) fn drain(w: &mut World, conns: &[ConnId]) {
    for &conn in conns {
        let bytes = w.core.conns[&conn].backlog.queued_bytes;
        w.input(Input::Sent { conn, bytes, pages: 0 });
    }
}

/// Appends `n` deltas of `bytes` from `dev` (client seqs from `first_cs`) and makes them durable.
fn write(w: &mut World, dev: &Dev, chat: ChatId, first_cs: u64, n: u64, bytes: usize) -> Vec<Effect> {
    let mut all = Vec::new();
    for i in 0..n {
        all.extend(w.frame(dev.conn, big_append(1000 + first_cs + i, chat, first_cs + i, bytes)));
    }
    let released = w.durable(&all);
    all.extend(released);
    all
}

#[test]
fn frame_cost_is_the_encoded_length_plus_the_overhead_and_covers_a_queue_slot() {
    let delta = Delta {
        chat: ChatId([3; 16]),
        seq: Seq(300),
        epoch: Epoch(2),
        device: DeviceId("12D3KooWabcdefabcdefabcdefabcdefabcdefabcdefabcdefab".into()),
        account: AccountId([4; 16]),
        client_seq: ClientSeq(70_000),
        sealed: vec![9; 1000],
    };
    for frame in [
        RelayFrame::Push { delta },
        RelayFrame::Done { req: 1 },
        RelayFrame::Behind { account_head: Seq(5), chats: vec![(ChatId([1; 16]), Seq(9))] },
    ] {
        let encoded = stratus_engine::proto::wire::encode(&frame).unwrap();
        assert_eq!(frame_cost(&frame), encoded.len() as u64 + FRAME_OVERHEAD_BYTES);
    }
    // The overhead pays for a frame's place in the driver's queue, so that the queue's memory
    // is bounded by the bytes the core lets wait.
    assert!(std::mem::size_of::<RelayFrame>() as u64 <= FRAME_OVERHEAD_BYTES, "{}", std::mem::size_of::<RelayFrame>());
}

#[test]
fn pushes_past_the_budget_are_dropped_and_one_behind_with_durable_heads_follows_once_drained() {
    let budget = 8 * 1024;
    let mut w = world_with(Limits { max_push_backlog_bytes: budget, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    drain(&mut w, &[a.conn, b.conn]);

    // 40 deltas of 1 KiB: b reads nothing meanwhile.
    let e = write(&mut w, &a, chat, 1, 40, 1000);
    let acks = sends(&e).into_iter().filter(|(c, f)| *c == a.conn && matches!(f, RelayFrame::Acked { .. })).count();
    assert_eq!(acks, 40, "every answer to the writer");
    let pushed = pushed_seqs(&e, b.conn);
    let cost = cost_to(&e, b.conn);
    assert!(pushed.len() < 40 && !pushed.is_empty(), "{} pushed", pushed.len());
    assert_eq!(pushed, (1..=pushed.len() as u64).collect::<Vec<_>>(), "a prefix is pushed, then nothing");
    assert!(cost > budget && cost < budget + 2048, "the backlog passes the budget by one push at most: {cost}");

    // An account log entry meanwhile (a new chat) is not pushed to b either; a typing
    // indicator neither.
    let (_, other) = {
        let chat2 = ChatId::random(&mut w.rng);
        let account = keys.public();
        let wrapped = stratus_engine::proto::crypto::wrap_chat_key(
            &stratus_engine::proto::crypto::ChatKey::random(&mut w.rng),
            chat2,
            Epoch(0),
            account.id,
            &account.kem_key,
            &mut w.rng,
        );
        let create = ClientFrame::CreateChat {
            req: 5000,
            chat: chat2,
            kind: ChatKind::Notes,
            epoch: Epoch(0),
            client_seq: ClientSeq(100),
            keys: vec![notes_key(&keys, chat2, Epoch(0), wrapped)],
        };
        let e = w.frame(a.conn, create);
        let released = w.durable(&e);
        assert!(sends(&released).iter().any(|(c, f)| *c == a.conn && matches!(f, RelayFrame::Done { req: 5000 })));
        assert!(!sends(&released).iter().any(|(c, _)| *c == b.conn), "{released:?}");
        (e, chat2)
    };
    assert!(sends(&w.frame(a.conn, ClientFrame::Typing { chat })).is_empty());
    let log_head = w.core.accounts[&keys.public().id].log_durable;

    // b's own requests are answered while its pushes are dropped.
    let state = w.frame(b.conn, ClientFrame::SyncState { req: 7 });
    assert!(matches!(sends(&state)[..], [(2, RelayFrame::SyncState { req: 7, .. })]));
    let cost = cost + cost_to(&state, b.conn);

    // The driver writes some of it: under the budget but above half of it, nothing yet, and
    // pushes are still dropped (no flapping at the budget).
    let first = cost - budget / 2 - 1;
    assert!(w.input(Input::Sent { conn: b.conn, bytes: first, pages: 0 }).is_empty());
    let e = write(&mut w, &a, chat, 41, 1, 1000);
    assert!(pushed_seqs(&e, b.conn).is_empty(), "{e:?}");
    // Down to half the budget: one `Behind` with the durable heads of what b missed.
    let drained = w.input(Input::Sent { conn: b.conn, bytes: 1, pages: 0 });
    assert_eq!(behinds(&drained, b.conn), vec![(log_head, vec![(chat, Seq(41))])], "{drained:?}");
    assert!(!behinds(&drained, b.conn)[0].1.iter().any(|(c, _)| *c == other), "only chats with a dropped push");
    assert_eq!(sends(&drained).len(), 1);
    // Written; further reports do not repeat it, and pushes flow again.
    let rest = cost - first - 1 + cost_to(&drained, b.conn);
    assert!(w.input(Input::Sent { conn: b.conn, bytes: rest, pages: 0 }).is_empty());
    let e = write(&mut w, &a, chat, 42, 1, 1000);
    assert_eq!(pushed_seqs(&e, b.conn), vec![42]);
}

#[test]
fn typing_alone_dropped_sends_no_behind() {
    // Room for one typing indicator under half the budget, not two.
    let mut w = world_with(Limits { max_push_backlog_bytes: 800, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    drain(&mut w, &[a.conn, b.conn]);
    let e = w.frame(a.conn, ClientFrame::Typing { chat });
    let cost = cost_to(&e, b.conn);
    assert!(cost > 0 && cost <= 400, "{cost}");
    w.now_ms += TYPING_FORWARD_MS;
    assert!(sends(&w.frame(a.conn, ClientFrame::Typing { chat })).is_empty(), "over half the budget");
    assert!(w.input(Input::Sent { conn: b.conn, bytes: cost, pages: 0 }).is_empty(), "no Behind for typing");
    w.now_ms += TYPING_FORWARD_MS;
    assert_eq!(sends(&w.frame(a.conn, ClientFrame::Typing { chat })).len(), 1, "pushed again once drained");
}

#[test]
fn answers_and_pages_are_never_dropped_and_never_cut_a_reader_off_past_the_push_budget() {
    let limits = Limits {
        requests_per_second: 0,
        max_appends_in_flight_per_device: 100,
        max_fetches_in_flight_per_device: 8,
        max_push_backlog_bytes: 64 * 1024,
        ..Limits::default()
    };
    let mut w = world_with(limits.clone());
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    drain(&mut w, &[a.conn]);
    let mut waiting = 0;
    let mut acks = 0;
    // 2,000 appends answered without a byte written: several times the push budget.
    for round in 0..20 {
        let e = write(&mut w, &a, chat, 1 + round * 100, 100, 64);
        acks += sends(&e).into_iter().filter(|(_, f)| matches!(f, RelayFrame::Acked { .. })).count();
        waiting += cost_to(&e, a.conn);
        assert!(killed(&e).is_empty());
    }
    assert_eq!(acks, 2000);
    assert!(waiting > 2 * limits.max_push_backlog_bytes, "{waiting}");
    // Pages up to the fetch limit, and every other answer, on top.
    for req in 0..8 {
        let e = w.frame(a.conn, ClientFrame::FetchChat { req: 9000 + req, chat, after: Seq(0), max: 512 });
        assert!(matches!(e[..], [Effect::ReadChat { .. }]), "{e:?}");
    }
    let e = w.frame(a.conn, ClientFrame::SyncState { req: 9100 });
    assert_eq!(sends(&e).len(), 1);
    waiting += cost_to(&e, a.conn);
    // The device reads, slowly: a little every 20 s for ten minutes. Never cut off.
    let mut t = 0;
    while t < 600_000 {
        t += 1000;
        if t % 20_000 == 0 {
            let bytes = (waiting / 40).min(waiting);
            waiting -= bytes;
            assert!(w.input(Input::Sent { conn: a.conn, bytes, pages: u32::from(t % 40_000 == 0) }).is_empty());
        }
        assert!(killed(&w.input(Input::Tick { now_ms: t })).is_empty(), "cut off at {t} ms");
    }
}

#[test]
fn a_stalled_reader_is_cut_after_the_timeout_and_not_before() {
    let mut w = world_with(Limits { stalled_reader_ms: 30_000, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let c = w.second_device(&keys, 3, "c");
    drain(&mut w, &[a.conn, b.conn, c.conn]);
    let e = write(&mut w, &a, chat, 1, 3, 100);
    assert_eq!(pushed_seqs(&e, b.conn), vec![1, 2, 3]);
    // a and c read everything; b reads nothing.
    w.input(Input::Sent { conn: a.conn, bytes: cost_to(&e, a.conn), pages: 0 });
    w.input(Input::Sent { conn: c.conn, bytes: cost_to(&e, c.conn), pages: 0 });
    for t in [5_000, 10_000, 34_999] {
        assert!(killed(&w.input(Input::Tick { now_ms: t })).is_empty(), "not before the timeout ({t} ms)");
    }
    let cut = w.input(Input::Tick { now_ms: 35_000 });
    assert_eq!(killed(&cut), vec![b.conn], "{cut:?}");
    assert!(matches!(cut[0], Effect::Write { .. }), "its last activity is kept: {cut:?}");
    // Forgotten at once: nothing more for it, and its own close and late reports change nothing.
    let e = write(&mut w, &a, chat, 4, 1, 100);
    assert!(sends(&e).iter().all(|(conn, _)| *conn != b.conn));
    assert_eq!(pushed_seqs(&e, c.conn), vec![4]);
    drain(&mut w, &[a.conn, c.conn]);
    assert!(w.input(Input::Sent { conn: b.conn, bytes: 1, pages: 1 }).is_empty());
    assert!(w.input(Input::Closed { conn: b.conn }).is_empty());

    // A page asked for and never written counts as waiting too.
    let e = w.frame(c.conn, ClientFrame::FetchChat { req: 1, chat, after: Seq(0), max: 10 });
    assert!(matches!(e[..], [Effect::ReadChat { .. }]));
    assert!(killed(&w.input(Input::Tick { now_ms: 40_000 })).is_empty());
    assert!(killed(&w.input(Input::Tick { now_ms: 69_999 })).is_empty());
    assert_eq!(killed(&w.input(Input::Tick { now_ms: 70_000 })), vec![c.conn]);
    assert!(w.core.conns.contains_key(&a.conn), "the stream with nothing waiting stays");
}

#[test]
fn a_reader_making_progress_or_idle_is_never_cut() {
    let mut w = world_with(Limits { stalled_reader_ms: 5_000, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let mut waiting = 0;
    let mut cs = 1;
    let mut t = 0;
    // Pushes keep coming, b always has some waiting and writes some every 4 s; a (the writer)
    // reads each answer at once, and an idle stream has nothing waiting at all.
    let idle = w.second_device(&keys, 3, "idle");
    drain(&mut w, &[a.conn, b.conn, idle.conn]);
    while t < 120_000 {
        t += 1000;
        let e = write(&mut w, &a, chat, cs, 2, 200);
        cs += 2;
        w.input(Input::Sent { conn: a.conn, bytes: cost_to(&e, a.conn), pages: 0 });
        w.input(Input::Sent { conn: idle.conn, bytes: cost_to(&e, idle.conn), pages: 0 });
        waiting += cost_to(&e, b.conn);
        if t % 4_000 == 0 {
            let bytes = waiting / 2;
            waiting -= bytes;
            w.input(Input::Sent { conn: b.conn, bytes, pages: 0 });
        }
        assert!(killed(&w.input(Input::Tick { now_ms: t })).is_empty(), "cut off at {t} ms");
    }
    assert!(waiting > 0, "b had something waiting throughout");
}

#[test]
fn answers_past_the_hard_cap_cut_the_stream_off() {
    let limits = Limits { requests_per_second: 0, max_appends_in_flight_per_device: 1_000_000, ..Limits::default() };
    let mut w = world_with(limits);
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    drain(&mut w, &[a.conn]);
    let per_ack = frame_cost(&RelayFrame::Acked { req: 1000, chat, client_seq: ClientSeq(1), seq: Seq(1) });
    let n = MAX_QUEUED_BYTES / per_ack + 100;
    let e = write(&mut w, &a, chat, 1, n, 8);
    assert_eq!(killed(&e), vec![a.conn]);
    let waiting = cost_to(&e, a.conn);
    assert!(waiting <= MAX_QUEUED_BYTES && waiting > MAX_QUEUED_BYTES - 2 * per_ack, "{waiting}");
    assert!(!w.core.conns.contains_key(&a.conn));
}
