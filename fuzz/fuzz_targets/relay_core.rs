//! The relay's sans-IO core fed arbitrary input sequences the way its driver would: streams
//! open (fresh connection ids, a small pool of devices) and close, frames arrive (valid ones
//! built from two real accounts with signed certificates and chat keys, and arbitrary bytes),
//! fsync barriers complete in any amount, and the relay crashes and restarts from what was
//! durable (optionally with the unsynced writes surviving too).
//!
//! Checks: the core never panics, and
//! * tokens are handed out in order; each chat's and account log's seqs are contiguous;
//! * nothing is revealed before it is durable: an `Acked` or `Push` names a durable delta (and
//!   an `Acked` the requesting device's delta with that client seq), a `PushAccount` a durable
//!   entry, and heads in `SyncState`, `ReadChat` and `ReadAccount` are durable heads;
//! * frames go to open streams only; pushes go to devices of member accounts only; a device
//!   whose session was ended gets nothing but errors;
//! * every request is answered at most once, and once everything is durable every request on
//!   a stream that is still open has been answered (a `LinkWait` only when approved);
//! * the operator's commands (suspend, ban, delete, quotas, registration, invite tokens for
//!   `CreateAccount`) are answered once each, and a command's answer only once what it wrote
//!   (and everything before) is durable;
//! * backlogs (the driver reports frames written, `Sent`, and ticks, `Tick`): a push goes only
//!   to a stream whose unwritten frames are within the push budget; a `Behind` names durable
//!   heads; a stream is cut off (`Kill`) exactly when it has had something unwritten for the
//!   stall timeout with no progress, or when its answers would pass the hard cap, and then it
//!   gets nothing more.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use stratus_engine::proto::cert::{
    AccountGen, AccountKeys, AccountPublic, DeviceCert, DeviceCertBody, Revocation, RevocationBody, Rotation,
};
use stratus_engine::proto::crypto::{ChatKey, SealedBox};
use stratus_engine::proto::directory::{KeyTerms, MemberChangeBody, Membership, SignedGen};
use stratus_engine::proto::wire::{
    decode, AccountEntry, ChatKind, ClientFrame, Delta, FrameError, InviteToken, NewEpoch, RelayFrame, ReqId,
    WrappedKey, MAX_DELTA_BYTES, PROTOCOL_VERSION,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};
use stratus_relay::core::{
    frame_cost, AccountAdmin, AccountRef, AccountSettings, AdminCommand, AdminId, ApprovedLink, ChatRecord, ConnId,
    DeviceState, Effect, Input as CoreInput, Recovered, RecoveryRecord, Registration, RelayCore, StoreOp, DEDUP_WINDOW,
    FRAME_OVERHEAD_BYTES,
};
use stratus_relay::limits::{Limits, MAX_QUEUED_BYTES, MIN_APPEND_BYTES_BURST};

/// Most operations per run.
const MAX_OPS: usize = 96;
/// Request ids the harness tracks start here; arbitrary frames with ids this high are dropped,
/// so that their replies cannot be mistaken for replies to tracked requests.
const TRACKED_REQ: ReqId = 1 << 40;

#[derive(Debug, Arbitrary)]
struct Script {
    /// Start from two logged-in devices of two accounts, each with a chat, and a third device
    /// waiting to be linked (most interesting paths are several steps deep).
    prologue: bool,
    ops: Vec<Op>,
}

/// One input for the core. `conn` picks an open stream, `device` one of four devices, `which`
/// one of the fixture's valid frames of that kind. `Connect` is `Open` and a hello;
/// `Durable` completes barriers up to some write, `DurableAll` up to the last.
#[derive(Debug, Clone, Arbitrary)]
enum Op {
    Open {
        device: u8,
    },
    Connect {
        device: u8,
    },
    Close {
        conn: u8,
    },
    Hello {
        conn: u8,
        bad_version: bool,
    },
    CreateAccount {
        conn: u8,
        which: u8,
    },
    CreateChat {
        conn: u8,
        which: u8,
    },
    LinkWait {
        conn: u8,
        which: u8,
    },
    LinkLookup {
        conn: u8,
        which: u8,
    },
    LinkApprove {
        conn: u8,
        which: u8,
    },
    Append {
        conn: u8,
        chat: u8,
        epoch: u8,
        client_seq: u8,
        len: u8,
        too_large: bool,
    },
    SyncState {
        conn: u8,
    },
    FetchChat {
        conn: u8,
        chat: u8,
        after: u8,
        max: u8,
    },
    FetchAccount {
        conn: u8,
        after: u8,
        max: u8,
    },
    Raw {
        conn: u8,
        bytes: Vec<u8>,
    },
    BadFrame {
        conn: u8,
        too_large: bool,
    },
    Durable {
        advance: u8,
    },
    DurableAll,
    Restart {
        keep_unsynced: bool,
    },
    ListDevices {
        conn: u8,
    },
    SetSessionTtl {
        conn: u8,
        days: u8,
    },
    PutRecovery {
        conn: u8,
        id: u8,
    },
    FetchRecovery {
        conn: u8,
        id: u8,
    },
    Recover {
        conn: u8,
        id: u8,
        which: u8,
    },
    Revoke {
        conn: u8,
        which: u8,
    },
    /// A typing indicator.
    Typing {
        conn: u8,
        chat: u8,
    },
    /// A rotation without a revocation (after an expiry), from the revocations' fixtures.
    Rotate {
        conn: u8,
        which: u8,
    },
    /// A directory or member request: set a username, look one up, look accounts up, leave
    /// the direct chat, start its next epoch, from the fixtures.
    Members {
        conn: u8,
        which: u8,
    },
    /// Time passes (the rate limit refills).
    Wait {
        ms: u16,
    },
    /// The driver reports a share (`part` / 256) of what waits for a stream written, and a
    /// page if `part` is odd.
    Sent {
        conn: u8,
        part: u8,
    },
    /// The driver's timer, `secs` seconds after the last.
    Tick {
        secs: u8,
    },
    /// An operator's command (`which` picks one) about one of the fixture's accounts.
    Admin {
        which: u8,
        account: u8,
    },
}

#[path = "relay_core/fixture.rs"]
mod fixture;
use fixture::{fixture, pick, with_req};
#[path = "relay_core/store.rs"]
mod store;
use store::Store;

/// What waits to be written to one stream, as the driver sees it.
#[derive(Default)]
struct Waiting {
    /// Cost of the frames sent and not yet reported written.
    bytes: u64,
    /// Pages read and not yet reported written.
    pages: u32,
    /// The tick since which something has waited with no progress (the stall timer's model).
    since_ms: Option<u64>,
}

struct Harness {
    core: RelayCore,
    /// Open streams and their devices.
    open: BTreeMap<ConnId, DeviceId>,
    /// What waits for each open stream.
    waiting: BTreeMap<ConnId, Waiting>,
    /// The driver's monotonic clock for ticks, in ms.
    tick_ms: u64,
    /// Streams the current input may cut off for a stall (a tick's), and those it did.
    may_stall: Vec<ConnId>,
    stalled: Vec<ConnId>,
    next_conn: ConnId,
    durable: Store,
    latest: Store,
    /// Writes not yet behind a barrier.
    unsynced: Vec<(u64, Vec<StoreOp>)>,
    last_token: u64,
    durable_token: u64,
    next_req: ReqId,
    /// Tracked requests: (conn, req) → (is a link wait, replies so far).
    requests: BTreeMap<(ConnId, ReqId), (bool, u32)>,
    /// The driver's clock, in ms.
    now_ms: u64,
    /// Operators' commands not answered yet: the newest write token when each was given (or
    /// of its own write), which must be durable before it is answered.
    admin_pending: BTreeMap<AdminId, u64>,
    /// The command being given, while its input runs.
    admin_now: Option<AdminId>,
    next_admin: AdminId,
}

fn limits() -> Limits {
    // Small enough that the rate limit and the in-flight caps are reached.
    Limits {
        requests_per_second: 50,
        request_burst: 8,
        max_appends_in_flight_per_device: 4,
        max_fetches_in_flight_per_device: 2,
        min_session_age_ms: 0,
        max_push_backlog_bytes: 2048,
        stalled_reader_ms: 5_000,
        // The smallest burst the relay takes, then 8 KiB/s: a few large deltas reach it.
        append_bytes_per_second: 8_192,
        append_bytes_burst: MIN_APPEND_BYTES_BURST,
        ..Limits::default()
    }
}

impl Harness {
    fn new() -> Self {
        Harness {
            core: RelayCore::new(Recovered::default(), limits()),
            open: BTreeMap::new(),
            waiting: BTreeMap::new(),
            tick_ms: 0,
            may_stall: Vec::new(),
            stalled: Vec::new(),
            next_conn: 1,
            durable: Store::default(),
            latest: Store::default(),
            unsynced: Vec::new(),
            last_token: 0,
            durable_token: 0,
            next_req: TRACKED_REQ,
            requests: BTreeMap::new(),
            now_ms: 1,
            admin_pending: BTreeMap::new(),
            admin_now: None,
            next_admin: 1,
        }
    }

    fn admin(&mut self, command: AdminCommand) {
        let id = self.next_admin;
        self.next_admin += 1;
        self.admin_pending.insert(id, self.last_token);
        self.admin_now = Some(id);
        self.input(CoreInput::Admin { id, command });
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame) {
        self.now_ms += 1;
        let now_ms = self.now_ms;
        self.input(CoreInput::Frame { conn, frame, now_ms });
    }

    fn open(&mut self, device: DeviceId) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.open.insert(conn, device.clone());
        self.waiting.insert(conn, Waiting::default());
        self.input(CoreInput::Opened { conn, device });
        conn
    }

    fn conn(&self, i: u8) -> Option<ConnId> {
        let conns: Vec<ConnId> = self.open.keys().copied().collect();
        (!conns.is_empty()).then(|| *pick(&conns, i))
    }

    /// Sends a tracked request on the `i`th open stream.
    fn request(&mut self, i: u8, frame: impl FnOnce(ReqId) -> ClientFrame) {
        let Some(conn) = self.conn(i) else { return };
        let req = self.next_req;
        self.next_req += 1;
        let frame = frame(req);
        self.requests.insert((conn, req), (matches!(frame, ClientFrame::LinkWait { .. }), 0));
        self.frame(conn, frame);
    }

    fn input(&mut self, input: CoreInput) {
        let effects = self.core.handle(input);
        let mut closing = Vec::new();
        for e in effects {
            self.check(e, &mut closing);
        }
        // What the closes below write is not an operator's command's.
        self.admin_now = None;
        for conn in closing {
            self.close(conn);
        }
    }

    fn close(&mut self, conn: ConnId) {
        if self.open.remove(&conn).is_some() {
            self.waiting.remove(&conn);
            self.requests.retain(|(c, _), _| *c != conn);
            self.input(CoreInput::Closed { conn });
        }
    }

    /// The driver wrote `part` / 256 of what waits for the `i`th stream, and a page if `part`
    /// is odd.
    fn sent(&mut self, i: u8, part: u8) {
        let Some(conn) = self.conn(i) else { return };
        let w = self.waiting.get_mut(&conn).expect("an open stream has a count");
        let bytes = w.bytes * (u64::from(part) + 1) / 256;
        let pages = u32::from(part % 2 == 1).min(w.pages);
        w.bytes -= bytes;
        w.pages -= pages;
        if bytes > 0 || pages > 0 {
            w.since_ms = None;
        }
        self.input(CoreInput::Sent { conn, bytes, pages });
    }

    /// The driver's timer: the streams the model says stalled, and only they, are cut off.
    fn tick(&mut self, secs: u8) {
        self.tick_ms += u64::from(secs) * 1000;
        let now_ms = self.tick_ms;
        let stall_ms = limits().stalled_reader_ms;
        self.may_stall.clear();
        for (conn, w) in &mut self.waiting {
            if w.bytes == 0 && w.pages == 0 {
                w.since_ms = None;
                continue;
            }
            if now_ms - *w.since_ms.get_or_insert(now_ms) >= stall_ms {
                self.may_stall.push(*conn);
            }
        }
        self.input(CoreInput::Tick { now_ms });
        assert_eq!(self.stalled, self.may_stall, "the streams cut off are those stalled for the timeout");
        self.may_stall.clear();
        self.stalled.clear();
    }

    fn replied(&mut self, conn: ConnId, req: ReqId) {
        if let Some((_, n)) = self.requests.get_mut(&(conn, req)) {
            *n += 1;
            assert_eq!(*n, 1, "request {req} on stream {conn} answered twice");
        }
    }

    fn check(&mut self, effect: Effect, closing: &mut Vec<ConnId>) {
        match effect {
            Effect::Write { token, ops } => {
                assert_eq!(token, self.last_token + 1, "write tokens are handed out in order");
                self.last_token = token;
                if let Some(id) = self.admin_now {
                    self.admin_pending.insert(id, token);
                }
                for op in &ops {
                    match op {
                        StoreOp::PutDelta(d) => {
                            assert_eq!(d.seq, self.latest.chat_head(d.chat).next(), "chat seqs are contiguous");
                            assert!(
                                !self
                                    .latest
                                    .deltas
                                    .values()
                                    .any(|o| o.device == d.device && o.client_seq == d.client_seq),
                                "a (device, client seq) is stored once"
                            );
                        }
                        StoreOp::PutAccountEntry(a, e) => {
                            assert_eq!(e.seq, self.latest.account_head(*a).next(), "account log seqs are contiguous");
                        }
                        _ => {}
                    }
                    // One write may log several entries of one account (a revocation with its
                    // rotation): each continues the one before.
                    self.latest.apply(std::slice::from_ref(op));
                }
                self.unsynced.push((token, ops));
            }
            Effect::Close { conn } => {
                assert!(self.open.contains_key(&conn), "close of a stream that is not open");
                closing.push(conn);
            }
            Effect::Kill { conn } => {
                assert!(self.open.contains_key(&conn), "kill of a stream that is not open");
                let w = self.waiting.remove(&conn).expect("an open stream has a count");
                if self.may_stall.contains(&conn) {
                    self.stalled.push(conn);
                } else {
                    // Only answers that would pass the hard cap cut a stream off otherwise.
                    let largest = stratus_engine::proto::wire::MAX_FRAME_BYTES as u64 + FRAME_OVERHEAD_BYTES;
                    assert!(w.bytes + largest > MAX_QUEUED_BYTES, "a stream cut off with {} bytes waiting", w.bytes);
                }
                // The core has forgotten it; the driver's `Closed` comes later and changes nothing.
                self.open.remove(&conn);
                self.requests.retain(|(c, _), _| *c != conn);
                let after = self.core.handle(CoreInput::Closed { conn });
                assert!(after.is_empty(), "a closed stream's `Closed` did something: {after:?}");
            }
            Effect::Admin { id, answer } => {
                let written = self.admin_pending.remove(&id).expect("an operator's command answered once");
                if answer.is_ok() && !self.core.storage_failed() {
                    assert!(written <= self.durable_token, "an operator's command answered before it is durable");
                }
            }
            Effect::ReadChat { conn, req, chat, upto, .. } => {
                assert!(self.open.contains_key(&conn), "read for a stream that is not open");
                self.waiting.get_mut(&conn).expect("open").pages += 1;
                assert!(upto <= self.durable.chat_head(chat), "a read of chat {chat} past its durable head");
                self.replied(conn, req);
            }
            Effect::ReadAccount { conn, req, account, upto, .. } => {
                assert!(self.open.contains_key(&conn), "read for a stream that is not open");
                self.waiting.get_mut(&conn).expect("open").pages += 1;
                assert!(upto <= self.durable.account_head(account), "a read of an account log past its durable head");
                self.replied(conn, req);
            }
            Effect::Send { conn, frame } => {
                let device = self.open.get(&conn).unwrap_or_else(|| panic!("send to stream {conn}, not open")).clone();
                let w = self.waiting.get_mut(&conn).expect("open");
                if matches!(frame, RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } | RelayFrame::Typing { .. })
                {
                    assert!(w.bytes <= limits().max_push_backlog_bytes, "a push to a stream past its budget");
                }
                w.bytes += frame_cost(&frame);
                assert!(w.bytes <= MAX_QUEUED_BYTES, "more than the hard cap waits for a stream");
                self.check_send(conn, &device, frame);
            }
        }
    }

    fn check_send(&mut self, conn: ConnId, device: &DeviceId, frame: RelayFrame) {
        let account = self.latest.devices.get(device).map(|c| c.body.account);
        if self.latest.states.get(device).is_some_and(|s| s.revoked) {
            assert!(
                matches!(frame, RelayFrame::Error { .. } | RelayFrame::SessionEnded { .. }),
                "a revoked device was sent {frame:?}"
            );
        }
        match frame {
            RelayFrame::Acked { req, chat, client_seq, seq } => {
                let d = self.durable.deltas.get(&(chat, seq)).expect("an ack names a durable delta");
                assert_eq!((&d.device, d.client_seq), (device, client_seq), "an ack names the device's own delta");
                self.replied(conn, req);
            }
            RelayFrame::Push { delta } => {
                let stored = self.durable.deltas.get(&(delta.chat, delta.seq)).expect("a push names a durable delta");
                assert_eq!(stored, &delta, "a push carries the stored delta");
                let members = &self.latest.chats[&delta.chat].members;
                assert!(account.is_some_and(|a| members.contains(&a)), "a push to a device of a non-member");
            }
            RelayFrame::PushAccount { entry } => {
                let a = account.expect("an account push goes to a device of an account");
                assert_eq!(self.durable.entries.get(&(a, entry.seq)), Some(&entry), "a push of a durable entry");
            }
            RelayFrame::SyncState { req, account_head, chats, restored } => {
                assert!(restored.is_none(), "a store never restored reports no floors");
                let a = account.expect("sync state goes to a device of an account");
                assert!(account_head <= self.durable.account_head(a), "sync state reports a non-durable log head");
                for (chat, head) in chats {
                    assert!(head <= self.durable.chat_head(chat), "sync state reports a non-durable chat head");
                }
                self.replied(conn, req);
            }
            RelayFrame::ChatPage { .. } | RelayFrame::AccountPage { .. } => {
                panic!("the core reads pages through effects, never sends them")
            }
            RelayFrame::Done { req }
            | RelayFrame::RateLimited { req, .. }
            | RelayFrame::Devices { req, .. }
            | RelayFrame::Recovery { req, .. }
            | RelayFrame::LinkInfo { req, .. }
            | RelayFrame::LinkApproved { req, .. }
            | RelayFrame::Duplicate { req, .. }
            | RelayFrame::Error { req: Some(req), .. } => self.replied(conn, req),
            RelayFrame::Typing { chat, account: typist, .. } => {
                let members = &self.latest.chats[&chat].members;
                assert!(account.is_some_and(|a| members.contains(&a)), "typing to a device of a non-member");
                assert!(members.contains(&typist), "typing from a non-member");
            }
            RelayFrame::Accounts { req, accounts } => {
                for entry in &accounts {
                    assert!(entry.chain.verify().is_ok(), "the directory serves only chains that verify");
                }
                self.replied(conn, req);
            }
            RelayFrame::AccountDevices { req, account: of, devices } => {
                assert!(devices.iter().all(|(c, _)| c.body.account == of), "another account's device listed");
                assert!(account == Some(of) || devices.iter().all(|(_, online)| !online), "another's presence shown");
                self.replied(conn, req);
            }
            RelayFrame::Invitations { req, .. } => self.replied(conn, req),
            RelayFrame::Behind { account_head, chats } => {
                let a = account.expect("behind goes to a device of an account");
                assert!(account_head <= self.durable.account_head(a), "behind reports a non-durable log head");
                for (chat, head) in chats {
                    assert!(head <= self.durable.chat_head(chat), "behind reports a non-durable chat head");
                }
            }
            RelayFrame::SessionEnded { entry, chain } => {
                // The proof is the durable entry that ended this device's session, and the
                // account's keys as the relay holds them.
                let ended = match &entry.event {
                    stratus_engine::proto::wire::AccountEvent::DeviceRevoked { revocation } => &revocation.body.device,
                    stratus_engine::proto::wire::AccountEvent::DeviceExpired { device, .. } => device,
                    e => panic!("a session end shown with {e:?}"),
                };
                assert_eq!(ended, device, "another device's end shown");
                let a = self.latest.devices[device].body.account;
                assert_eq!(self.durable.entries.get(&(a, entry.seq)), Some(&*entry), "a proof that is not durable");
                assert!(chain.id() == a && chain.verify().is_ok(), "a proof with keys that do not verify");
            }
            RelayFrame::Hello { .. } | RelayFrame::Error { req: None, .. } => {}
        }
    }

    fn durable(&mut self, token: u64) {
        self.durable_token = self.durable_token.max(token);
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.unsynced).into_iter().partition(|(t, _)| *t <= self.durable_token);
        self.unsynced = later;
        for (_, ops) in now {
            self.durable.apply(&ops);
        }
        self.input(CoreInput::Durable { token });
    }

    fn restart(&mut self, keep_unsynced: bool) {
        if keep_unsynced {
            for (_, ops) in std::mem::take(&mut self.unsynced) {
                self.durable.apply(&ops);
            }
        }
        self.unsynced.clear();
        self.latest = self.durable.clone();
        self.core = RelayCore::new(self.durable.recover(), limits());
        self.open.clear();
        self.waiting.clear();
        self.requests.clear();
        self.admin_pending.clear();
        self.last_token = 0;
        self.durable_token = 0;
    }
}

fuzz_target!(|script: Script| {
    let f = fixture();
    let mut h = Harness::new();
    let prologue = [
        Op::Connect { device: 0 },
        Op::CreateAccount { conn: 0, which: 0 },
        Op::CreateChat { conn: 0, which: 0 },
        Op::Connect { device: 2 },
        Op::CreateAccount { conn: 1, which: 1 },
        Op::CreateChat { conn: 1, which: 1 },
        Op::Connect { device: 1 },
        Op::LinkWait { conn: 2, which: 0 },
        Op::DurableAll,
    ];
    let prologue = if script.prologue { &prologue[..] } else { &[] };
    for op in prologue.iter().cloned().chain(script.ops.into_iter().take(MAX_OPS)) {
        match op {
            Op::Open { device } => {
                h.open(pick(&f.devices, device).clone());
            }
            Op::Connect { device } => {
                let conn = h.open(pick(&f.devices, device).clone());
                h.frame(conn, ClientFrame::Hello { version: PROTOCOL_VERSION });
            }
            Op::Close { conn } => {
                if let Some(conn) = h.conn(conn) {
                    h.close(conn);
                }
            }
            Op::Hello { conn, bad_version } => {
                if let Some(conn) = h.conn(conn) {
                    let version = if bad_version { PROTOCOL_VERSION + 1 } else { PROTOCOL_VERSION };
                    h.frame(conn, ClientFrame::Hello { version });
                }
            }
            Op::CreateAccount { conn, which } => {
                let (account, cert) = pick(&f.create_account, which).clone();
                // With one of the invite tokens the operator may have made, every other time.
                let invite = (which % 4 >= 2).then_some(InviteToken([which % 2; 16]));
                h.request(conn, |req| ClientFrame::CreateAccount { req, account, cert, invite });
            }
            Op::CreateChat { conn, which } => {
                let (chat, epoch, keys) = pick(&f.create_chat, which).clone();
                let kind = if keys.len() == 1 { ChatKind::Notes } else { ChatKind::Direct };
                h.request(conn, |req| ClientFrame::CreateChat {
                    req,
                    chat,
                    kind,
                    epoch,
                    client_seq: ClientSeq(which.into()),
                    keys,
                });
            }
            Op::LinkWait { conn, which } => {
                let (link_id, device_x25519) = *pick(&f.link_wait, which);
                h.request(conn, |req| ClientFrame::LinkWait { req, link_id, device_x25519, name: "new".into() });
            }
            Op::LinkLookup { conn, which } => {
                let (link_id, _) = *pick(&f.link_wait, which);
                h.request(conn, |req| ClientFrame::LinkLookup { req, link_id });
            }
            Op::LinkApprove { conn, which } => {
                let (link_id, cert) = pick(&f.link_approve, which).clone();
                let bundle = SealedBox { ephemeral: [4; 32], sealed: vec![5; 80] };
                h.request(conn, |req| ClientFrame::LinkApprove { req, link_id, cert, bundle });
            }
            Op::Append { conn, chat, epoch, client_seq, len, too_large } => {
                let chat = *pick(&f.chats, chat);
                let sealed = vec![client_seq; if too_large { MAX_DELTA_BYTES + 1 } else { len as usize }];
                h.request(conn, |req| ClientFrame::Append {
                    req,
                    chat,
                    epoch: Epoch((epoch % 3).into()),
                    client_seq: ClientSeq((client_seq % 32).into()),
                    sealed,
                });
            }
            Op::SyncState { conn } => h.request(conn, |req| ClientFrame::SyncState { req }),
            Op::FetchChat { conn, chat, after, max } => {
                let chat = *pick(&f.chats, chat);
                h.request(conn, |req| ClientFrame::FetchChat { req, chat, after: Seq(after.into()), max: max.into() });
            }
            Op::FetchAccount { conn, after, max } => {
                h.request(conn, |req| ClientFrame::FetchAccount { req, after: Seq(after.into()), max: max.into() });
            }
            Op::Raw { conn, bytes } => {
                let Some(conn) = h.conn(conn) else { continue };
                match decode::<ClientFrame>(&bytes) {
                    Ok(frame) if frame.req() >= TRACKED_REQ => {}
                    Ok(frame) => h.frame(conn, frame),
                    Err(error) => {
                        let now_ms = h.now_ms;
                        h.input(CoreInput::BadFrame { conn, error, now_ms })
                    }
                }
            }
            Op::BadFrame { conn, too_large } => {
                let Some(conn) = h.conn(conn) else { continue };
                let error = if too_large { FrameError::TooLarge(0) } else { FrameError::Malformed("fuzz".into()) };
                let now_ms = h.now_ms;
                h.input(CoreInput::BadFrame { conn, error, now_ms });
            }
            Op::Durable { advance } => {
                let behind = h.last_token - h.durable_token;
                let token = h.durable_token + if behind == 0 { 0 } else { 1 + advance as u64 % behind };
                h.durable(token);
            }
            Op::DurableAll => h.durable(h.last_token),
            Op::Restart { keep_unsynced } => h.restart(keep_unsynced),
            Op::ListDevices { conn } => h.request(conn, |req| ClientFrame::ListDevices { req }),
            Op::PutRecovery { conn, id } => {
                let (public, signature) = pick(&f.put_recovery, id).clone();
                h.request(conn, |req| ClientFrame::PutRecovery {
                    req,
                    lookup_id: [id % 3; 32],
                    public,
                    signature,
                    sealed: vec![id; 64],
                })
            }
            Op::FetchRecovery { conn, id } => {
                h.request(conn, |req| ClientFrame::FetchRecovery { req, lookup_id: [id % 3; 32] })
            }
            Op::Recover { conn, id, which } => {
                let cert = pick(&f.link_approve, which).1.clone();
                h.request(conn, |req| ClientFrame::Recover { req, lookup_id: [id % 3; 32], cert })
            }
            Op::SetSessionTtl { conn, days } => {
                h.request(conn, |req| ClientFrame::SetSessionTtl { req, days: (days % 4).into() })
            }
            Op::Revoke { conn, which } => {
                let (revocation, rotation, chats, recovery) = pick(&f.revoke, which).clone();
                h.request(conn, |req| ClientFrame::Revoke { req, revocation, rotation, chats, recovery });
            }
            Op::Members { conn, which } => {
                let frame = pick(&f.members, which).clone();
                h.request(conn, |req| with_req(frame, req));
            }
            Op::Typing { conn, chat } => {
                let chat = *pick(&f.chats, chat);
                if let Some(conn) = h.conn(conn) {
                    h.frame(conn, ClientFrame::Typing { chat });
                }
            }
            Op::Rotate { conn, which } => {
                let (_, rotation, chats, recovery) = pick(&f.revoke, which).clone();
                h.request(conn, |req| ClientFrame::Rotate { req, rotation, chats, recovery });
            }
            // Up to a few days, so that sessions expire.
            Op::Wait { ms } => h.now_ms += u64::from(ms) * u64::from(ms) * 10_000,
            Op::Sent { conn, part } => h.sent(conn, part),
            Op::Tick { secs } => h.tick(secs % 8),
            Op::Admin { which, account } => {
                let account = AccountRef::Id(pick(&f.create_account, account).0.id);
                let registration = [Registration::Open, Registration::Invite, Registration::Closed];
                h.admin(match which % 10 {
                    0 => AdminCommand::Suspend(account),
                    1 => AdminCommand::Unsuspend(account),
                    2 => AdminCommand::Ban(account),
                    3 => AdminCommand::Delete(account),
                    4 => AdminCommand::SetQuota { account, bytes: Some(u64::from(which) * 64) },
                    5 => AdminCommand::SetQuota { account, bytes: None },
                    6 => AdminCommand::Registration(Some(*pick(&registration, which / 10))),
                    7 => AdminCommand::CreateInvite { token: InviteToken([which / 10 % 2; 16]), now_ms: h.now_ms },
                    8 => AdminCommand::Accounts,
                    _ => AdminCommand::Registration(None),
                });
            }
        }
    }
    // Everything durable: every request on an open stream has its answer.
    h.durable(h.last_token);
    for ((conn, req), (link_wait, replies)) in &h.requests {
        assert!(*link_wait || *replies == 1, "request {req} on open stream {conn} never answered");
    }
    assert!(h.admin_pending.is_empty(), "operators' commands never answered: {:?}", h.admin_pending);
});
