//! What one account or member can cost the relay, driven through the core (issue 15, items 1
//! and 2): key epochs and member changes, the per-account byte quota, and a full disk.

use stratus_engine::proto::directory::Membership;
use stratus_engine::proto::wire::NewEpoch;

use super::members::{change_after, create_group, done, grant, group_terms};
use super::sessions::error_codes;
use super::*;

/// What the writes in `effects` store, in bytes (the quota's own count left out).
fn written(effects: &[Effect]) -> u64 {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Write { ops, .. } => Some(ops),
            _ => None,
        })
        .flatten()
        .map(StoreOp::stored_bytes)
        .sum()
}

fn writes_anything(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Write { .. }))
}

fn rate_limited(effects: &[Effect]) -> Vec<u32> {
    sends(effects)
        .into_iter()
        .filter_map(|(_, f)| match f {
            RelayFrame::RateLimited { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        })
        .collect()
}

/// A group of `creator` alone, and the two accounts' keys and devices.
struct Group {
    chat: ChatId,
    a: Dev,
    b: Dev,
    ka: AccountKeys,
    kb: AccountKeys,
}

fn group(w: &mut World) -> Group {
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, _), (kb, _)) = (w.account(&a), w.account(&b));
    w.accept_all();
    let chat = ChatId([0x42; 16]);
    let ia = ka.public().id;
    let keys = grant(&ka, &group_terms(chat, 0, &[ia]), &[&ka], true, &mut w.rng);
    let e = w.frame(a.conn, create_group(chat, keys));
    assert!(done(&w.durable(&e), 4));
    Group { chat, a, b, ka, kb }
}

impl World {
    /// `by` changes the members of `chat` as signed for its newest epoch; the effects.
    fn change_members(&mut self, dev: &Dev, by: &AccountKeys, chat: ChatId, m: Membership) -> Vec<Effect> {
        let r = &self.core.chats[&chat].record;
        let change = change_after(by, chat, r.newest.0, r.changes, m);
        self.frame(dev.conn, ClientFrame::ChangeMembers { req: 20, change })
    }

    /// `by` starts the next epoch of `chat` for its members as they stand; the effects released.
    fn rekey(&mut self, dev: &Dev, by: &AccountKeys, chat: ChatId, members: &[&AccountKeys]) -> Vec<Effect> {
        let epoch = self.core.chats[&chat].record.newest.0 + 1;
        let ids: Vec<AccountId> = members.iter().map(|k| k.public().id).collect();
        let keys = grant(by, &group_terms(chat, epoch, &ids), members, true, &mut self.rng);
        let e = self.frame(
            dev.conn,
            ClientFrame::Rekey { req: 21, epoch: NewEpoch { chat, epoch: Epoch(epoch), keys }, history: Vec::new() },
        );
        let released = self.durable(&e);
        assert!(done(&released, 21), "{released:?}");
        e.into_iter().chain(released).collect()
    }
}

/// Item 1: two accounts looping add → new epoch → leave → new epoch. Each member change and each
/// new epoch writes the same whatever the number of epochs before (the earlier epochs' keys
/// are records of their own, not copied into the chat's record); it grew with every epoch.
#[test]
fn a_member_change_writes_the_same_however_many_epochs_the_chat_had() {
    let mut w = world_with(Limits { member_change_interval_ms: 0, ..Limits::default() });
    let Group { chat, a, b, ka, kb } = group(&mut w);
    let ib = kb.public().id;
    let mut per_cycle = Vec::new();
    for _ in 0..30 {
        let mut cycle = Vec::new();
        let e = w.change_members(&a, &ka, chat, Membership::Add { accounts: [ib].into(), share_history: false });
        cycle.extend(w.durable(&e));
        cycle.extend(e);
        cycle.extend(w.rekey(&a, &ka, chat, &[&ka, &kb]));
        let e = w.change_members(&b, &kb, chat, Membership::Leave);
        cycle.extend(w.durable(&e));
        cycle.extend(e);
        cycle.extend(w.rekey(&a, &ka, chat, &[&ka]));
        per_cycle.push(written(&cycle));
    }
    assert_eq!(w.core.chats[&chat].record.newest, Epoch(60));
    let (first, last) = (per_cycle[0], per_cycle[29]);
    // A few bytes for larger epoch numbers and seqs, nothing per epoch.
    assert!(last <= first + 64, "a cycle wrote {first} bytes at first and {last} after 60 epochs: {per_cycle:?}");
}

/// Item 1: adding and removing members is rate limited per chat; leaving is not, nor is another
/// chat's budget touched.
#[test]
fn member_changes_are_rate_limited_per_chat_and_leaving_never_is() {
    let limits = Limits { member_change_interval_ms: 10_000, member_change_burst: 2, ..Limits::default() };
    let mut w = world_with(limits);
    let Group { chat, a, b, ka, kb } = group(&mut w);
    let c = w.connect(3, "c");
    let (kc, _) = w.account(&c);
    let d = w.connect(4, "d");
    let (kd, _) = w.account(&d);
    w.accept_all();
    let add = |k: &AccountKeys| Membership::Add { accounts: [k.public().id].into(), share_history: false };

    for (k, members) in [(&kb, vec![&ka, &kb]), (&kc, vec![&ka, &kb, &kc])] {
        let e = w.change_members(&a, &ka, chat, add(k));
        assert!(done(&w.durable(&e), 20));
        w.rekey(&a, &ka, chat, &members);
    }
    // The third change within the interval: told to wait, nothing written.
    let e = w.change_members(&a, &ka, chat, add(&kd));
    let waits = rate_limited(&e);
    assert!(matches!(waits[..], [ms] if ms > 0 && ms <= 10_000), "{e:?}");
    assert!(!writes_anything(&e));
    // Leaving is never held up.
    let e = w.change_members(&b, &kb, chat, Membership::Leave);
    assert!(done(&w.durable(&e), 20), "{e:?}");
    w.rekey(&a, &ka, chat, &[&ka, &kc]);
    // Another chat has its budget.
    let other = ChatId([0x43; 16]);
    let ia = ka.public().id;
    let keys = grant(&ka, &group_terms(other, 0, &[ia]), &[&ka], true, &mut w.rng);
    let e = w.frame(a.conn, create_group(other, keys));
    w.durable(&e);
    let e = w.change_members(&a, &ka, other, add(&kd));
    assert!(done(&w.durable(&e), 20), "{e:?}");
    // Once the interval has passed, the first chat may change again.
    w.now_ms += 10_000;
    let e = w.change_members(&a, &ka, chat, add(&kd));
    assert!(done(&w.durable(&e), 20), "{e:?}");
}

/// Item 1: adding members stops at the epoch cap; leaving and writing go on.
#[test]
fn adding_members_stops_at_the_epoch_cap() {
    let mut w = world_with(Limits { max_chat_epochs: 2, member_change_interval_ms: 0, ..Limits::default() });
    let Group { chat, a, b, ka, kb } = group(&mut w);
    let add = Membership::Add { accounts: [kb.public().id].into(), share_history: false };
    let e = w.change_members(&a, &ka, chat, add.clone());
    w.durable(&e);
    w.rekey(&a, &ka, chat, &[&ka, &kb]);
    let e = w.change_members(&b, &kb, chat, Membership::Leave);
    w.durable(&e);
    w.rekey(&a, &ka, chat, &[&ka]);
    let refused = w.change_members(&a, &ka, chat, add);
    assert_eq!(error_codes(&refused), vec![(a.conn, ErrorCode::TooLarge)]);
    assert!(!writes_anything(&refused));
    let e = w.frame(
        a.conn,
        ClientFrame::Append { req: 30, chat, epoch: Epoch(2), client_seq: ClientSeq(100), sealed: vec![1; 40] },
    );
    assert!(sends(&w.durable(&e)).iter().any(|(_, f)| matches!(f, RelayFrame::Acked { .. })));
}

/// Item 2: an account over its quota gets `QuotaExceeded` for appends and new chats, nothing is
/// written for them, retries of what was stored are still answered, and other accounts are
/// served. The count is written with each write, so a restarted relay keeps it.
#[test]
fn an_account_over_its_quota_is_refused_and_others_are_served() {
    let quota = 20_000;
    let mut w = world_with(Limits { max_account_bytes: quota, ..Limits::default() });
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, chat_a), (_, chat_b)) = (w.account(&a), w.account(&b));
    let ia = ka.public().id;
    let big = big_append;
    let mut stored = 0;
    let refused = loop {
        let e = w.frame(a.conn, big(100 + stored, chat_a, 1 + stored));
        if !writes_anything(&e) {
            break e;
        }
        let last_usage = e.iter().find_map(|e| match e {
            Effect::Write { ops, .. } => ops.iter().find_map(|op| match op {
                StoreOp::PutUsage(acct, bytes) if *acct == ia => Some(*bytes),
                _ => None,
            }),
            _ => None,
        });
        assert_eq!(last_usage, Some(w.core.accounts[&ia].stored_bytes), "the count is written with the append");
        w.durable(&e);
        stored += 1;
    };
    assert_eq!(error_codes(&refused), vec![(a.conn, ErrorCode::QuotaExceeded)]);
    assert_eq!(stored, 4, "four deltas of 4,000 bytes fit in 20,000 with what the account had");
    assert!(w.core.accounts[&ia].stored_bytes <= quota, "appends never pass the quota");
    // A new chat is taken while the account is under its quota (passing it by its own size at
    // most), then refused; a retry of a stored append is answered as before.
    let mut made = 0;
    let refused = loop {
        let chat = ChatId([0x51 + made; 16]);
        let key = ChatKey::random(&mut w.rng);
        let wrapped = wrap_chat_key(&key, chat, Epoch(0), ia, &ka.public().kem_key, &mut w.rng);
        let keys = vec![notes_key(&ka, chat, Epoch(0), wrapped)];
        let cs = ClientSeq(50 + u64::from(made));
        let create =
            ClientFrame::CreateChat { req: 50, chat, kind: ChatKind::Notes, epoch: Epoch(0), client_seq: cs, keys };
        let e = w.frame(a.conn, create);
        if !writes_anything(&e) {
            break e;
        }
        w.durable(&e);
        made += 1;
    };
    assert!(made < 10 && w.core.accounts[&ia].stored_bytes >= quota, "{made}");
    assert_eq!(error_codes(&refused), vec![(a.conn, ErrorCode::QuotaExceeded)]);
    let e = w.frame(a.conn, big(60, chat_a, 1));
    assert!(matches!(sends(&e)[..], [(_, RelayFrame::Acked { seq: Seq(1), .. })]), "{e:?}");
    // Another account is served.
    let e = w.frame(b.conn, big(70, chat_b, 1));
    assert!(matches!(sends(&w.durable(&e))[..], [(_, RelayFrame::Acked { .. })]));
    // Restarted with the stored count, the relay still refuses.
    let used = w.core.accounts[&ia].stored_bytes;
    let recovered = Recovered {
        accounts: vec![ka.public()],
        devices: vec![test_cert(&ka, &a.id)],
        chats: vec![(chat_a, w.core.chats[&chat_a].record.clone(), Seq(4))],
        usage: vec![(ia, used)],
        ..Recovered::default()
    };
    let mut w2 = World { core: RelayCore::new(recovered, w.core.limits.clone()), ..world() };
    let a2 = w2.connect(1, "a");
    let e = w2.frame(a2.conn, big(80, chat_a, 10));
    assert_eq!(error_codes(&e), vec![(a2.conn, ErrorCode::QuotaExceeded)], "{e:?}");
}

/// Item 2: a failed write (the disk is full) reveals nothing written since the last barrier:
/// the waiting answer becomes a refusal and the push is dropped; every request that would
/// write is refused without a write; reads and sync states of what is durable go on.
#[test]
fn a_full_disk_refuses_writes_reveals_nothing_unwritten_and_serves_reads() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, chat) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let e = w.frame(a.conn, append(10, chat, 1));
    w.durable(&e);
    let pending = w.frame(a.conn, append(11, chat, 2));
    assert!(writes_anything(&pending));

    let failed = w.input(Input::WriteFailed);
    assert_eq!(error_codes(&failed), vec![(a.conn, ErrorCode::Internal)], "{failed:?}");
    assert!(!sends(&failed).iter().any(|(c, _)| *c == b.conn), "nothing pushed: {failed:?}");
    assert!(w.core.storage_failed());
    // A barrier that completes afterwards releases nothing.
    assert!(w.durable(&pending).is_empty());

    for (req, frame) in [
        (12, append(12, chat, 3)),
        (13, ClientFrame::SetUsername { req: 13, name: Some("ann".into()) }),
        (14, ClientFrame::SetSessionTtl { req: 14, days: 1 }),
    ] {
        let e = w.frame(a.conn, frame);
        assert!(!writes_anything(&e), "{e:?}");
        assert!(
            matches!(&sends(&e)[..], [(1, RelayFrame::Error { req: Some(r), code: ErrorCode::Internal, message })]
                if *r == req && message.contains("disk is full")),
            "{e:?}"
        );
    }
    // Reads go on, capped at what is durable.
    let read = w.frame(b.conn, ClientFrame::FetchChat { req: 15, chat, after: Seq(0), max: 10 });
    assert!(matches!(read[..], [Effect::ReadChat { upto: Seq(1), .. }]), "{read:?}");
    let state = w.frame(b.conn, ClientFrame::SyncState { req: 16 });
    assert!(
        matches!(&sends(&state)[..], [(2, RelayFrame::SyncState { chats, .. })] if chats == &vec![(chat, Seq(1))]),
        "{state:?}"
    );
    let read = w.frame(b.conn, ClientFrame::FetchAccount { req: 17, after: Seq(0), max: 10 });
    assert!(matches!(read[..], [Effect::ReadAccount { .. }]), "{read:?}");
    // Closing a stream writes nothing either (its last activity waits).
    assert!(!writes_anything(&w.input(Input::Closed { conn: b.conn })));
}

fn acked_on(effects: &[Effect], conn: ConnId) -> Option<Seq> {
    sends(effects).into_iter().find_map(|(c, f)| match f {
        RelayFrame::Acked { seq, .. } if c == conn => Some(*seq),
        _ => None,
    })
}

/// The storage flood (`relay_abuse`): an account's devices together append at most
/// `append_bytes_per_second` after a burst; an append over it gets `RateLimited` with the time
/// until it fits, writes nothing, and holds the device's later appends back until it comes
/// again. Retries of stored appends cost nothing, and other accounts are served.
#[test]
fn an_accounts_appends_are_held_to_its_byte_rate() {
    // 10,000 bytes/s after 20,000 at once; each delta counts 4,000 + 192 bytes.
    let limits = Limits { append_bytes_per_second: 10_000, append_bytes_burst: 20_000, ..Limits::default() };
    let mut w = world_with(limits);
    let (a, b) = (w.connect(1, "a"), w.connect(2, "b"));
    let ((ka, chat_a), (_, chat_b)) = (w.account(&a), w.account(&b));
    let a2 = w.second_device(&ka, 3, "a2");
    let big = big_append;
    w.now_ms = 10_000;
    for cs in 1..=4 {
        let e = w.frame(a.conn, big(cs, chat_a, cs));
        assert!(writes_anything(&e), "within the burst: {e:?}");
        w.durable(&e);
    }
    // 16,768 taken, 3,232 left: the fifth needs 960 more, 96 ms at 10,000/s.
    let e = w.frame(a.conn, big(5, chat_a, 5));
    assert!(!writes_anything(&e), "{e:?}");
    assert_eq!(rate_limited(&e), vec![96]);
    // Its later appends wait for it; the account's other device has the same budget.
    let e = w.frame(a.conn, big(6, chat_a, 6));
    assert!(!writes_anything(&e) && rate_limited(&e).len() == 1, "{e:?}");
    let e = w.frame(a2.conn, big(7, chat_a, 1));
    assert!(!writes_anything(&e) && rate_limited(&e) == vec![96], "{e:?}");
    // A retry of a stored append is answered as before, and costs nothing.
    let e = w.frame(a.conn, big(8, chat_a, 2));
    assert!(matches!(sends(&e)[..], [(1, RelayFrame::Acked { seq: Seq(2), .. })]), "{e:?}");
    // Another account is served meanwhile.
    let e = w.frame(b.conn, big(9, chat_b, 1));
    assert!(matches!(sends(&w.durable(&e))[..], [(2, RelayFrame::Acked { .. })]), "{e:?}");
    // Once the wait is over the held append is stored, then the next one waits again.
    w.now_ms += 96;
    let e = w.frame(a.conn, big(10, chat_a, 5));
    assert_eq!(acked_on(&w.durable(&e), 1), Some(Seq(5)));
    let e = w.frame(a.conn, big(11, chat_a, 6));
    assert_eq!(rate_limited(&e), vec![420], "4,192 bytes at 10,000/s: {e:?}");
    w.now_ms += 420;
    let e = w.frame(a.conn, big(12, chat_a, 6));
    assert_eq!(acked_on(&w.durable(&e), 1), Some(Seq(6)));
    let stored = w.core.accounts[&ka.public().id].stored_bytes;
    // Off: nothing is paced.
    let mut w = world_with(Limits { append_bytes_per_second: 0, ..Limits::default() });
    let a = w.connect(1, "a");
    let (_, chat) = w.account(&a);
    for cs in 1..=64 {
        let e = w.frame(a.conn, big(cs, chat, cs));
        assert!(writes_anything(&e), "{e:?}");
        w.durable(&e);
    }
    assert!(stored > 0);
}

/// An append of 4,000 sealed bytes at epoch 0 (the quota and byte-rate tests' unit).
fn big_append(req: u64, chat: ChatId, cs: u64) -> ClientFrame {
    ClientFrame::Append { req, chat, epoch: Epoch(0), client_seq: ClientSeq(cs), sealed: vec![7; 4000] }
}
