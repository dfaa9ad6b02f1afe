//! The relay core driven directly: inputs in, effects out, no sockets, no disk.

use stratus_engine::proto::cert::{AccountKeys, DeviceCertBody};
use stratus_engine::proto::crypto::{wrap_chat_key, ChatKey};

use super::*;

struct World {
    core: RelayCore,
    rng: rand::rngs::StdRng,
}

struct Dev {
    conn: ConnId,
    id: DeviceId,
}

fn world() -> World {
    use rand::SeedableRng;
    World { core: RelayCore::new(Recovered::default()), rng: rand::rngs::StdRng::seed_from_u64(7) }
}

impl World {
    fn input(&mut self, i: Input) -> Vec<Effect> {
        self.core.handle(i)
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame) -> Vec<Effect> {
        self.input(Input::Frame { conn, frame })
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
        let e = self.frame(dev.conn, ClientFrame::CreateAccount { req: 1, account: account.clone(), cert });
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
                keys: vec![WrappedKey {
                    account: account.id,
                    signature: keys.sign_chat_key(chat, ChatKind::Notes, Epoch(0), account.id, &wrapped),
                    key: wrapped,
                }],
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
        self.core
            .devices
            .insert(dev.clone(), Device { account, highest_client_seq: ClientSeq(0), recent: BTreeMap::new() });
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
    let approved = w.frame(a.conn, ClientFrame::LinkApprove { req: 7, link_id, cert, bundle });
    // The new device drops before the approval is durable: it never sees it.
    w.input(Input::Closed { conn: new.conn });
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
    let create = |req| ClientFrame::CreateAccount { req, account: account.clone(), cert: cert.clone() };
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
    let refused = w.frame(a.conn, ClientFrame::CreateAccount { req: 3, account: other.public(), cert: other_cert });
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
    let signature = keys.sign_chat_key(chat, ChatKind::Notes, Epoch(0), account.id, &wrapped);
    let create = |req| ClientFrame::CreateChat {
        req,
        chat,
        kind: ChatKind::Notes,
        epoch: Epoch(0),
        keys: vec![WrappedKey { account: account.id, key: wrapped.clone(), signature: signature.clone() }],
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
