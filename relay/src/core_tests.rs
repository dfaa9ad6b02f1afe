//! The relay core driven directly: inputs in, effects out, no sockets, no disk.

use stratus_engine::proto::cert::{AccountKeys, DeviceCertBody};
use stratus_engine::proto::crypto::{wrap_chat_key, ChatKey};

use super::*;

/// A certificate of `device` signed by `keys`.
pub(super) fn test_cert(keys: &AccountKeys, device: &DeviceId) -> DeviceCert {
    keys.certify(DeviceCertBody {
        account: keys.public().id,
        device: device.clone(),
        device_x25519: [1; 32],
        name: "d".into(),
        created_ms: 0,
    })
}

struct World {
    core: RelayCore,
    rng: rand::rngs::StdRng,
    /// The time given with each frame; tests move it by hand.
    now_ms: u64,
}

struct Dev {
    conn: ConnId,
    id: DeviceId,
}

fn world() -> World {
    world_with(Limits::default())
}

fn world_with(limits: Limits) -> World {
    use rand::SeedableRng;
    World { core: RelayCore::new(Recovered::default(), limits), rng: rand::rngs::StdRng::seed_from_u64(7), now_ms: 0 }
}

impl World {
    fn input(&mut self, i: Input) -> Vec<Effect> {
        self.core.handle(i)
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame) -> Vec<Effect> {
        self.input(Input::Frame { conn, frame, now_ms: self.now_ms })
    }

    /// Completes every barrier asked for so far; returns what that released.
    fn durable(&mut self, effects: &[Effect]) -> Vec<Effect> {
        let token = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Write { token, .. } => Some(*token),
                _ => None,
            })
            .max()
            .expect("a write to make durable");
        self.input(Input::Durable { token })
    }

    fn connect(&mut self, conn: ConnId, name: &str) -> Dev {
        let id = DeviceId(name.into());
        self.input(Input::Opened { conn, device: id.clone() });
        self.frame(conn, ClientFrame::Hello { version: PROTOCOL_VERSION });
        Dev { conn, id }
    }

    /// Every account accepts chats from every other (as if each had accepted the others), for
    /// tests about what comes after.
    fn accept_all(&mut self) {
        let ids: Vec<AccountId> = self.core.accounts.keys().copied().collect();
        for a in self.core.accounts.values_mut() {
            a.accepts.extend(ids.iter().copied().filter(|id| *id != a.public.id));
        }
    }

    fn account(&mut self, dev: &Dev) -> (AccountKeys, ChatId) {
        let keys = AccountKeys::generate(&mut self.rng);
        let account = keys.public();
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: dev.id.clone(),
            device_x25519: [1; 32],
            name: "d".into(),
            created_ms: 0,
        });
        let e =
            self.frame(dev.conn, ClientFrame::CreateAccount { req: 1, account: account.clone(), cert, invite: None });
        self.durable(&e);
        let chat = ChatId::random(&mut self.rng);
        let key = ChatKey::random(&mut self.rng);
        let wrapped = wrap_chat_key(&key, chat, Epoch(0), account.id, &account.kem_key, &mut self.rng);
        let e = self.frame(
            dev.conn,
            ClientFrame::CreateChat {
                req: 2,
                chat,
                kind: ChatKind::Notes,
                epoch: Epoch(0),
                client_seq: ClientSeq(0),
                keys: vec![notes_key(&keys, chat, Epoch(0), wrapped)],
            },
        );
        self.durable(&e);
        (keys, chat)
    }

    /// Registers a second device of the same account directly in the core's state, the way a
    /// restart would recover it.
    fn second_device(&mut self, keys: &AccountKeys, conn: ConnId, name: &str) -> Dev {
        let dev = DeviceId(name.into());
        let account = keys.public().id;
        self.core.devices.insert(dev.clone(), Device::new(test_cert(keys, &dev), DeviceState::default()));
        self.core.accounts.get_mut(&account).expect("the account exists").devices.insert(dev.clone());
        self.connect(conn, name)
    }
}

fn append(req: ReqId, chat: ChatId, cs: u64) -> ClientFrame {
    ClientFrame::Append { req, chat, epoch: Epoch(0), client_seq: ClientSeq(cs), sealed: vec![0xab; 40] }
}

fn sends(effects: &[Effect]) -> Vec<(ConnId, &RelayFrame)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { conn, frame } => Some((*conn, frame)),
            _ => None,
        })
        .collect()
}

#[test]
fn nothing_is_acknowledged_or_pushed_before_the_barrier() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");

    let written = w.frame(a.conn, append(10, chat, 1));
    assert!(matches!(written.as_slice(), [Effect::Write { .. }]), "only the write: {written:?}");
    // A fetch before the barrier sees nothing of it.
    let read = w.frame(b.conn, ClientFrame::FetchChat { req: 3, chat, after: Seq(0), max: 10 });
    assert!(matches!(read.as_slice(), [Effect::ReadChat { upto: Seq(0), .. }]), "{read:?}");

    let released = w.durable(&written);
    let s = sends(&released);
    assert_eq!(s.len(), 2);
    assert!(matches!(s[0], (1, RelayFrame::Acked { req: 10, seq: Seq(1), .. })));
    assert!(matches!(s[1], (2, RelayFrame::Push { delta }) if delta.seq == Seq(1)), "pushed to the other device only");
    let read = w.frame(b.conn, ClientFrame::FetchChat { req: 4, chat, after: Seq(0), max: 10 });
    assert!(matches!(read.as_slice(), [Effect::ReadChat { upto: Seq(1), .. }]));
}

#[test]
fn retried_appends_are_stored_once_and_acknowledged_again() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    let e1 = w.frame(a.conn, append(10, chat, 1));
    let e2 = w.frame(a.conn, append(11, chat, 2));
    // The retry of client seq 1 arrives before the barrier: its ack waits for it too.
    let retry = w.frame(a.conn, append(12, chat, 1));
    assert!(retry.is_empty(), "no write, no early ack: {retry:?}");
    let released = w.durable(&e1.into_iter().chain(e2).collect::<Vec<_>>());
    let acks: Vec<_> = sends(&released)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::Acked { req, seq, .. } => Some((*req, *seq)),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![(10, Seq(1)), (11, Seq(2)), (12, Seq(1))]);
    // After the barrier a retry is answered at once.
    let again = w.frame(a.conn, append(13, chat, 2));
    assert!(matches!(sends(&again)[..], [(1, RelayFrame::Acked { req: 13, seq: Seq(2), .. })]));
}

#[test]
fn seqs_are_contiguous_per_chat_across_devices() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let mut all = Vec::new();
    for i in 0..10 {
        let dev = if i % 2 == 0 { &a } else { &b };
        all.extend(w.frame(dev.conn, append(100 + i, chat, 1 + i / 2)));
    }
    let released = w.durable(&all);
    let mut seqs: Vec<u64> = sends(&released)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::Acked { seq, .. } => Some(seq.0),
            _ => None,
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
}

#[test]
fn refusals_are_typed_and_change_nothing() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    let stranger = w.connect(2, "stranger");
    let (_, other_chat) = {
        let s = w.connect(3, "s");
        w.account(&s)
    };
    let code = |effects: Vec<Effect>| match sends(&effects)[..] {
        [(_, RelayFrame::Error { code, .. })] => *code,
        _ => panic!("expected one error: {effects:?}"),
    };
    assert_eq!(code(w.frame(stranger.conn, append(1, chat, 1))), ErrorCode::UnknownDevice);
    assert_eq!(code(w.frame(a.conn, append(2, other_chat, 1))), ErrorCode::NotMember);
    assert_eq!(code(w.frame(a.conn, append(3, ChatId([0; 16]), 1))), ErrorCode::UnknownChat);
    let big = ClientFrame::Append {
        req: 4,
        chat,
        epoch: Epoch(0),
        client_seq: ClientSeq(1),
        sealed: vec![0; MAX_DELTA_BYTES + 1],
    };
    assert_eq!(code(w.frame(a.conn, big)), ErrorCode::TooLarge);
    let wrong_epoch = ClientFrame::Append { req: 5, chat, epoch: Epoch(9), client_seq: ClientSeq(1), sealed: vec![1] };
    assert_eq!(code(w.frame(a.conn, wrong_epoch)), ErrorCode::UnknownEpoch);
    // None of that took a seq: the next good append is seq 1.
    let e = w.frame(a.conn, append(6, chat, 1));
    let released = w.durable(&e);
    assert!(matches!(sends(&released)[..], [(1, RelayFrame::Acked { seq: Seq(1), .. })]));
}

#[test]
fn a_closed_connection_gets_nothing_more() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let e = w.frame(a.conn, append(1, chat, 1));
    w.input(Input::Closed { conn: b.conn });
    w.input(Input::Closed { conn: a.conn });
    assert!(sends(&w.durable(&e)).is_empty());
}

#[test]
fn a_device_that_lost_its_approval_in_flight_can_ask_again() {
    use stratus_engine::proto::crypto::SealedBox;
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let link_id = [5; 32];
    let wait = |req| ClientFrame::LinkWait { req, link_id, device_x25519: [9; 32], name: "phone".into() };
    let new = w.connect(2, "new");
    assert!(w.frame(new.conn, wait(1)).is_empty(), "waits");
    let account = keys.public();
    let cert = keys.certify(DeviceCertBody {
        account: account.id,
        device: new.id.clone(),
        device_x25519: [9; 32],
        name: "phone".into(),
        created_ms: 0,
    });
    let bundle = SealedBox { ephemeral: [1; 32], sealed: vec![2; 80] };
    let mut approved = w.frame(a.conn, ClientFrame::LinkApprove { req: 7, link_id, cert, bundle });
    // The new device drops before the approval is durable: it never sees it.
    approved.extend(w.input(Input::Closed { conn: new.conn }));
    let released = w.durable(&approved);
    assert!(sends(&released).iter().all(|(c, _)| *c != new.conn));

    // It reconnects (now a known device) and asks under the same link id.
    let again = w.connect(3, "new");
    let reply = w.frame(again.conn, wait(2));
    assert!(matches!(sends(&reply)[..], [(3, RelayFrame::LinkApproved { req: 2, .. })]), "{reply:?}");
    // Once it syncs, the stored approval is dropped.
    let state = w.frame(again.conn, ClientFrame::SyncState { req: 3 });
    assert!(state
        .iter()
        .any(|e| matches!(e, Effect::Write { ops, .. } if ops == &[StoreOp::DeleteApprovedLink(link_id)])));
    assert!(w.core.approved.is_empty());
}

#[test]
fn a_repeated_create_account_is_acknowledged_again_and_another_refused() {
    let mut w = world();
    let a = w.connect(1, "a");
    let keys = AccountKeys::generate(&mut w.rng);
    let account = keys.public();
    let cert = keys.certify(DeviceCertBody {
        account: account.id,
        device: a.id.clone(),
        device_x25519: [1; 32],
        name: "d".into(),
        created_ms: 0,
    });
    let create = |req| ClientFrame::CreateAccount { req, account: account.clone(), cert: cert.clone(), invite: None };
    let e = w.frame(a.conn, create(1));
    w.durable(&e);
    // The reply was lost; the device sends the same account again.
    let again = w.frame(a.conn, create(2));
    assert!(matches!(sends(&again)[..], [(1, RelayFrame::Done { req: 2 })]), "{again:?}");
    // A different account for the same device is refused.
    let other = AccountKeys::generate(&mut w.rng);
    let other_cert = other.certify(DeviceCertBody {
        account: other.public().id,
        device: a.id.clone(),
        device_x25519: [1; 32],
        name: "d".into(),
        created_ms: 0,
    });
    let refused =
        w.frame(a.conn, ClientFrame::CreateAccount { req: 3, account: other.public(), cert: other_cert, invite: None });
    assert!(matches!(sends(&refused)[..], [(1, RelayFrame::Error { code: ErrorCode::AlreadyExists, .. })]));
}

#[test]
fn a_repeated_create_chat_is_acknowledged_again_and_a_stranger_refused() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let account = keys.public();
    let chat = ChatId::random(&mut w.rng);
    let wrapped = wrap_chat_key(&ChatKey::random(&mut w.rng), chat, Epoch(0), account.id, &account.kem_key, &mut w.rng);
    let key = notes_key(&keys, chat, Epoch(0), wrapped);
    let create = |req| ClientFrame::CreateChat {
        req,
        chat,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        client_seq: ClientSeq(0),
        keys: vec![key.clone()],
    };
    let e = w.frame(a.conn, create(5));
    assert!(sends(&e).is_empty(), "done waits for the barrier: {e:?}");
    // The device lost the reply and sends the creation again before the barrier completed: the
    // answer still waits for it, and no second chat or log entry is written.
    let again = w.frame(a.conn, create(6));
    assert!(!again.iter().any(|e| matches!(e, Effect::Write { .. })), "{again:?}");
    let released = w.durable(&e);
    let done: Vec<_> = sends(&released).into_iter().filter(|(_, f)| matches!(f, RelayFrame::Done { .. })).collect();
    assert!(matches!(done[..], [(1, RelayFrame::Done { req: 5 }), (1, RelayFrame::Done { req: 6 })]), "{released:?}");

    // Another account cannot take the chat id, not even with the same frame.
    let b = w.connect(2, "b");
    let _ = w.account(&b);
    let refused = w.frame(b.conn, create(7));
    assert!(matches!(sends(&refused)[..], [(2, RelayFrame::Error { code: ErrorCode::AlreadyExists, .. })]));
}

// ---------------------------------------------------------------------------------------------
// Limits

fn rate_limited(effects: &[Effect]) -> Vec<(ReqId, u32)> {
    sends(effects)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::RateLimited { req, retry_after_ms } => Some((*req, *retry_after_ms)),
            _ => None,
        })
        .collect()
}

fn acked_client_seqs(effects: &[Effect]) -> Vec<(u64, Seq)> {
    sends(effects)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::Acked { client_seq, seq, .. } => Some((client_seq.0, *seq)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_over_its_request_rate_is_told_when_to_retry_and_others_are_served() {
    let mut w = world_with(Limits { requests_per_second: 10, request_burst: 3, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    w.now_ms = 10_000;
    // Account set-up took two requests; the bucket refilled since. A burst of 3, then refused.
    for req in 10..13 {
        assert!(matches!(
            sends(&w.frame(a.conn, ClientFrame::SyncState { req }))[..],
            [(1, RelayFrame::SyncState { .. })]
        ));
    }
    let refused = w.frame(a.conn, ClientFrame::SyncState { req: 13 });
    assert_eq!(rate_limited(&refused), vec![(13, 100)], "10/s: the next token in 100 ms");
    assert_eq!(refused.len(), 1, "nothing else happens: {refused:?}");
    // Another device of the same account has its own bucket.
    assert!(matches!(
        sends(&w.frame(b.conn, ClientFrame::SyncState { req: 1 }))[..],
        [(2, RelayFrame::SyncState { .. })]
    ));
    // 60 ms later: 40 ms still to wait; at 100 ms: served.
    w.now_ms += 60;
    assert_eq!(rate_limited(&w.frame(a.conn, ClientFrame::SyncState { req: 14 })), vec![(14, 40)]);
    w.now_ms += 40;
    assert!(matches!(
        sends(&w.frame(a.conn, ClientFrame::SyncState { req: 15 }))[..],
        [(1, RelayFrame::SyncState { .. })]
    ));
}

#[test]
fn a_refused_append_holds_back_later_client_seqs_until_it_comes_again() {
    let mut w = world_with(Limits { requests_per_second: 10, request_burst: 3, ..Limits::default() });
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    w.now_ms = 10_000;
    let mut effects = Vec::new();
    for cs in 1..=5 {
        effects.extend(w.frame(a.conn, append(cs, chat, cs)));
    }
    // 1..3 fit the burst; 4 is over the rate, 5 is held back behind it.
    assert_eq!(rate_limited(&effects), vec![(4, 100), (5, 100)]);
    // Much later the bucket is full again, yet 5 (and 6) still wait for 4: stored first, they
    // would put 4 at or below the highest client seq, and its retry would be taken as a
    // duplicate without ever being stored.
    w.now_ms += 5_000;
    for cs in [5, 6] {
        let e = w.frame(a.conn, append(cs, chat, cs));
        assert_eq!(rate_limited(&e).len(), 1, "{e:?}");
        assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })), "nothing written: {e:?}");
    }
    // A lower client seq (a retry of a stored one) is answered as usual.
    effects.extend(w.frame(a.conn, append(20, chat, 2)));
    // 4 comes again (with tokens for three): stored, and from then on 5 and 6 are too.
    w.now_ms += 5_000;
    for cs in [4, 5, 6] {
        effects.extend(w.frame(a.conn, append(30 + cs, chat, cs)));
    }
    let released = w.durable(&effects);
    let acks = acked_client_seqs(&released);
    assert_eq!(
        acks,
        vec![(1, Seq(1)), (2, Seq(2)), (3, Seq(3)), (2, Seq(2)), (4, Seq(4)), (5, Seq(5)), (6, Seq(6))],
        "every client seq stored once, in client-seq order"
    );
    assert!(!sends(&released).iter().any(|(_, f)| matches!(f, RelayFrame::Duplicate { .. })));
}

#[test]
fn appends_in_flight_are_capped_per_device_and_the_cap_holds_later_ones_back() {
    let mut w = world_with(Limits { max_appends_in_flight_per_device: 2, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let mut effects = Vec::new();
    for cs in 1..=4 {
        effects.extend(w.frame(a.conn, append(cs, chat, cs)));
    }
    assert_eq!(rate_limited(&effects), vec![(3, IN_FLIGHT_RETRY_MS), (4, IN_FLIGHT_RETRY_MS)]);
    // The other device is not affected by a's appends in flight.
    effects.extend(w.frame(b.conn, append(50, chat, 1)));
    assert_eq!(rate_limited(&effects).len(), 2);
    let released = w.durable(&effects);
    assert_eq!(acked_client_seqs(&released), vec![(1, Seq(1)), (2, Seq(2)), (1, Seq(3))]);
    // Acknowledged: room again, and 3 and 4 go in order.
    let mut effects = w.frame(a.conn, append(13, chat, 3));
    effects.extend(w.frame(a.conn, append(14, chat, 4)));
    assert!(rate_limited(&effects).is_empty(), "{effects:?}");
    assert_eq!(acked_client_seqs(&w.durable(&effects)), vec![(3, Seq(4)), (4, Seq(5))]);
}

#[test]
fn fetches_in_flight_are_capped_per_device_until_their_pages_are_sent() {
    let mut w = world_with(Limits { max_fetches_in_flight_per_device: 2, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let fetch = |req| ClientFrame::FetchChat { req, chat, after: Seq(0), max: 10 };
    let reads = |e: &[Effect]| e.iter().filter(|e| matches!(e, Effect::ReadChat { .. })).count();
    assert_eq!(reads(&w.frame(a.conn, fetch(1))), 1);
    assert_eq!(reads(&w.frame(a.conn, ClientFrame::FetchAccount { req: 2, after: Seq(0), max: 10 })), 0);
    assert_eq!(rate_limited(&w.frame(a.conn, fetch(3))), vec![(3, IN_FLIGHT_RETRY_MS)]);
    // A second stream of the same device shares the cap; another device does not.
    let a2 = w.connect(3, "a");
    assert_eq!(rate_limited(&w.frame(a2.conn, fetch(4))), vec![(4, IN_FLIGHT_RETRY_MS)]);
    assert_eq!(reads(&w.frame(b.conn, fetch(5))), 1);
    // One page written: room for one more.
    w.input(Input::Sent { conn: a.conn, bytes: 0, pages: 1 });
    assert_eq!(reads(&w.frame(a2.conn, fetch(6))), 1);
    assert_eq!(rate_limited(&w.frame(a.conn, fetch(7))).len(), 1);
    // A stream that closes gives back what it had in flight; a stray report changes nothing.
    w.input(Input::Closed { conn: a.conn });
    w.input(Input::Sent { conn: a.conn, bytes: 0, pages: 1 });
    assert_eq!(reads(&w.frame(a2.conn, fetch(8))), 1);
    assert_eq!(rate_limited(&w.frame(a2.conn, fetch(9))).len(), 1);
}

/// The device's sync core against the relay's core under tight, random limits, with frames,
/// barriers and time interleaved at random: every append is stored exactly once, in client-seq
/// order, and acknowledged with its seq (never as a `Duplicate` of something never stored).
#[test]
fn device_and_relay_cores_store_every_append_once_in_order_under_limits() {
    let seed = match std::env::var("SEED") {
        Ok(s) => s.parse().expect("SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("seed: {seed} (replay with SEED={seed})");
    cores_under_limits(seed);
}

/// Seeds that found a bug. This one: refusals for later appends still on their way when the
/// device resumed, so it sent new items that were stored before the refused ones came again.
#[test]
fn cores_under_limits_regressions() {
    cores_under_limits(1903382019294474810);
}

fn cores_under_limits(seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::collections::VecDeque;
    use stratus_engine::core::{SyncCore, SyncInput, SyncOutput};
    use stratus_engine::store::{OutboxBody, OutboxItem};

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..20 {
        let limits = Limits {
            requests_per_second: rng.gen_range(1..200),
            request_burst: rng.gen_range(1..20),
            max_appends_in_flight_per_device: rng.gen_range(1..20),
            // Each delta below counts 16 + 192 bytes.
            append_bytes_per_second: rng.gen_range(0..20_000),
            append_bytes_burst: rng.gen_range(208..4_000),
            ..Limits::default()
        };
        let mut w = world_with(limits.clone());
        let first = w.connect(1, "a");
        let (_, chat) = w.account(&first);
        let conn: ConnId = 2;
        w.input(Input::Opened { conn, device: first.id.clone() });

        // The account log cursor is past its head: this run is about the outbox only.
        let mut dev = SyncCore::new(Seq(100), false);
        let n: u64 = rng.gen_range(1..150);
        let mut next_item = 1u64;
        let mut to_relay: VecDeque<ClientFrame> = VecDeque::new();
        let mut to_dev: VecDeque<RelayFrame> = VecDeque::new();
        let mut written: Vec<u64> = Vec::new();
        let mut stored: Vec<(u64, Seq)> = Vec::new();
        let mut acked: Vec<(u64, Option<Seq>)> = Vec::new();
        let mut resume_at: Option<u64> = None;
        let mut last_token = 0;
        let mut device_out = dev.handle(SyncInput::Connected);
        let mut steps = 0;
        while acked.len() < n as usize {
            steps += 1;
            assert!(steps < 200_000, "no progress with {limits:?}: acked {} of {n}", acked.len());
            for o in device_out.drain(..) {
                match o {
                    SyncOutput::Send(f) => to_relay.push_back(f),
                    SyncOutput::RetryAfter { ms } => {
                        assert!(resume_at.is_none(), "one pause at a time");
                        resume_at = Some(w.now_ms + u64::from(ms));
                    }
                    SyncOutput::Acked { client_seq, seq, .. } => acked.push((client_seq.0, seq)),
                    SyncOutput::Rejected { client_seq, code, .. } => panic!("{client_seq:?} rejected: {code:?}"),
                    _ => {}
                }
            }
            match rng.gen_range(0..6) {
                0 | 1 => {
                    if let Some(frame) = to_relay.pop_front() {
                        for e in w.frame(conn, frame) {
                            match e {
                                Effect::Send { conn: c, frame } if c == conn => to_dev.push_back(frame),
                                Effect::Write { token, ops } => {
                                    last_token = token;
                                    for op in ops {
                                        if let StoreOp::PutDelta(d) = op {
                                            stored.push((d.client_seq.0, d.seq));
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                2 => {
                    if last_token > 0 {
                        written.push(last_token);
                        for e in w.input(Input::Durable { token: last_token }) {
                            if let Effect::Send { conn: c, frame } = e {
                                if c == conn {
                                    to_dev.push_back(frame);
                                }
                            }
                        }
                    }
                }
                3 | 4 => {
                    if let Some(f) = to_dev.pop_front() {
                        device_out = dev.handle(SyncInput::Frame(Box::new(f)));
                    }
                }
                _ => {
                    w.now_ms += rng.gen_range(0..50);
                    if resume_at.is_some_and(|t| t <= w.now_ms) {
                        resume_at = None;
                        device_out = dev.handle(SyncInput::Resume);
                    } else if next_item <= n {
                        let item = OutboxItem {
                            client_seq: ClientSeq(next_item),
                            chat,
                            epoch: Epoch(0),
                            body: OutboxBody::Delta { sealed: vec![1; 16], plain: Vec::new() },
                        };
                        next_item += 1;
                        device_out = dev.handle(SyncInput::OutboxAdded(item));
                    }
                }
            }
        }
        let order: Vec<u64> = stored.iter().map(|(cs, _)| *cs).collect();
        assert_eq!(order, (1..=n).collect::<Vec<_>>(), "stored once each, in order ({limits:?})");
        acked.sort();
        let expected: Vec<(u64, Option<Seq>)> = stored.iter().map(|(cs, seq)| (*cs, Some(*seq))).collect();
        assert_eq!(acked, expected, "acknowledged with the seq it was stored at ({limits:?})");
    }
}

/// Found by the simulator (a seed with tight limits): a chat creation refused by the rate limit
/// let the chat's first append, already in flight behind it, through to `UnknownChat`, and the
/// device dropped that delta for good. A creation is an outbox item: its refusal holds back later
/// client seqs exactly as a refused append does.
#[test]
fn a_refused_chat_creation_holds_back_the_chats_first_append() {
    let mut w = world_with(Limits { requests_per_second: 10, request_burst: 2, ..Limits::default() });
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let account = keys.public();
    let chat = ChatId::random(&mut w.rng);
    let wrapped = wrap_chat_key(&ChatKey::random(&mut w.rng), chat, Epoch(0), account.id, &account.kem_key, &mut w.rng);
    let create = |req| ClientFrame::CreateChat {
        req,
        chat,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        client_seq: ClientSeq(7),
        keys: vec![notes_key(&keys, chat, Epoch(0), wrapped.clone())],
    };
    w.now_ms = 10_000;
    // Two requests use up the burst; the creation is refused and the append behind it held.
    let mut effects = w.frame(a.conn, ClientFrame::SyncState { req: 1 });
    effects.extend(w.frame(a.conn, ClientFrame::SyncState { req: 2 }));
    effects.extend(w.frame(a.conn, create(3)));
    // A token is back by the time the append arrives; it must still wait for the creation.
    w.now_ms += 150;
    effects.extend(w.frame(a.conn, append(4, chat, 8)));
    assert_eq!(rate_limited(&effects).into_iter().map(|(req, _)| req).collect::<Vec<_>>(), vec![3, 4]);
    assert!(!sends(&effects).iter().any(|(_, f)| matches!(f, RelayFrame::Error { .. })), "{effects:?}");
    // Both come again in order once the bucket refills: created, then stored.
    w.now_ms += 5_000;
    let mut effects = w.frame(a.conn, create(5));
    effects.extend(w.frame(a.conn, append(6, chat, 8)));
    let released = w.durable(&effects);
    assert!(sends(&released).iter().any(|(_, f)| matches!(f, RelayFrame::Done { req: 5 })), "{released:?}");
    assert_eq!(acked_client_seqs(&released), vec![(8, Seq(1))]);
}

#[path = "core_tests_sessions.rs"]
mod sessions;

#[path = "core_tests_members.rs"]
mod members;

#[path = "core_tests_backlog.rs"]
mod backlog;

#[path = "core_tests_abuse.rs"]
mod abuse;

#[path = "core_tests_peers.rs"]
mod peers;

#[path = "core_tests_checkpoints.rs"]
mod checkpoints;

#[path = "core_tests_admin.rs"]
mod admin;

#[test]
fn typing_is_pushed_to_the_members_other_devices_and_never_written() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let stranger = w.connect(3, "stranger");
    let _ = w.account(&stranger);
    let e = w.frame(a.conn, ClientFrame::Typing { chat });
    assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })), "never stored: {e:?}");
    let to: Vec<ConnId> = sends(&e).into_iter().map(|(c, _)| c).collect();
    assert_eq!(to, vec![b.conn], "only the other devices of members, not the sender: {e:?}");
    assert!(matches!(
        sends(&e)[0].1,
        RelayFrame::Typing { chat: c, device, .. } if *c == chat && *device == a.id
    ));
    // Not a member, or an unknown chat: dropped, not answered.
    assert!(w.frame(stranger.conn, ClientFrame::Typing { chat }).is_empty());
    assert!(w.frame(a.conn, ClientFrame::Typing { chat: ChatId([0; 16]) }).is_empty());
}

/// A notes chat's key `wrapped` for the account of `keys`, signed by its current generation.
pub(crate) fn notes_key(
    keys: &AccountKeys,
    chat: ChatId,
    epoch: Epoch,
    wrapped: stratus_engine::proto::crypto::SealedBox,
) -> WrappedKey {
    let account = keys.public().id;
    let terms = KeyTerms { chat, kind: ChatKind::Notes, epoch, members: [account].into() };
    WrappedKey {
        account,
        generation: keys.generation,
        content: true,
        signature: keys.sign_chat_key(&terms, account, keys.generation, true, &wrapped),
        key: wrapped,
    }
}

#[test]
fn a_drain_answers_what_was_accepted_then_closes_every_stream_and_takes_nothing_new() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    // Accepted before the drain: written, waiting for its barrier.
    let written = w.frame(a.conn, append(10, chat, 1));
    assert!(!w.core.draining() && !w.core.drained());
    let e = w.input(Input::Drain);
    assert!(w.core.draining());
    assert!(!e.iter().any(|e| matches!(e, Effect::Close { .. })), "nothing closes while an answer waits: {e:?}");
    // New requests are refused with a wait (an append stays in the device's outbox); hello
    // and typing get nothing; nothing is written.
    let e = w.frame(b.conn, append(11, chat, 1));
    assert_eq!(sends(&e), [(b.conn, &RelayFrame::RateLimited { req: 11, retry_after_ms: DRAIN_RETRY_MS })], "{e:?}");
    assert!(!e.iter().any(|e| matches!(e, Effect::Write { .. })));
    assert!(w.frame(b.conn, ClientFrame::Typing { chat }).is_empty());
    // The barrier: the ack and the push go out, then every stream is closed.
    let e = w.durable(&written);
    let acked = e.iter().position(|e| matches!(e, Effect::Send { frame: RelayFrame::Acked { req: 10, .. }, .. }));
    let pushed = e.iter().position(|e| matches!(e, Effect::Send { conn: 2, frame: RelayFrame::Push { .. } }));
    let closes: Vec<usize> =
        e.iter().enumerate().filter(|(_, e)| matches!(e, Effect::Close { .. })).map(|(i, _)| i).collect();
    assert!(acked.is_some() && pushed.is_some() && closes.len() == 2, "{e:?}");
    assert!(closes.iter().all(|c| *c > acked.unwrap() && *c > pushed.unwrap()), "closed after the answers: {e:?}");
    // A stream opened meanwhile is closed at once; the drain is done when all have closed.
    let e = w.input(Input::Opened { conn: 3, device: DeviceId("c".into()) });
    assert_eq!(e, [Effect::Close { conn: 3 }]);
    assert!(w.frame(3, ClientFrame::Hello { version: PROTOCOL_VERSION }).is_empty(), "no hello while draining");
    for conn in [1, 2] {
        w.input(Input::Closed { conn });
        assert!(!w.core.drained());
    }
    w.input(Input::Closed { conn: 3 });
    assert!(w.core.drained());
}
