//! The relay's decision logic, sans-IO.
//!
//! Feed [`Input`]s to [`RelayCore::handle`]; carry out the returned [`Effect`]s in order. The
//! core holds the index of accounts, devices, chats and heads in memory (loaded once from the
//! store at start); the deltas themselves stay in the store, read through
//! [`Effect::ReadChat`].
//!
//! Durability: every state change is emitted as an [`Effect::Write`] with a token. Anything that
//! reveals that change to a device (an ack, a push, a head in a reply) is held back until the
//! driver reports [`Input::Durable`] with that token or a later one, i.e. until an fsync barrier
//! covering the write has completed. Reads are capped at the durable head.
//!
//! Limits (see [`crate::limits::Limits`]): every request of a registered device takes a token
//! from its bucket (the driver gives the time with each frame; the core never reads a clock);
//! appends accepted and not yet acknowledged, and pages asked for and not yet sent in full
//! ([`Input::PageSent`]), are counted per device. A request over a limit gets
//! [`RelayFrame::RateLimited`] and changes nothing. An append refused that way holds back the
//! device's later client seqs until it comes again (see [`Device::held`]): the relay stores a
//! device's appends in client-seq order, and its dedup takes any client seq at or below the
//! highest stored one as stored, so storing a later one first would lose the refused one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use stratus_engine::proto::cert::{AccountPublic, DeviceCert, Revocation, MAX_DEVICE_NAME_BYTES};
use stratus_engine::proto::wire::{
    AccountEntry, AccountEvent, ChatKind, ClientFrame, Delta, DeviceSession, ErrorCode, FrameError, RelayFrame, ReqId,
    WrappedKey, MAX_CHAT_MEMBERS, MAX_DELTA_BYTES, MAX_PAGE_DELTAS, PROTOCOL_VERSION,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

use crate::limits::{Limits, TokenBucket, IN_FLIGHT_RETRY_MS};

/// The driver's handle on one device stream.
pub type ConnId = u64;

/// How many recent `(client seq → seq)` pairs the relay indexes per device to re-acknowledge
/// retried appends with their seq. A device keeps at most a few appends in flight, so only
/// recent ones are retried; an older repeat gets [`RelayFrame::Duplicate`].
pub const DEDUP_WINDOW: usize = 1024;
/// Most devices waiting for link approval at once; more get `RateLimited`.
pub const MAX_PENDING_LINKS: usize = 1024;

/// What the driver tells the core.
#[derive(Debug)]
pub enum Input {
    /// A device opened a sync stream; `device` is authenticated by the transport's Noise handshake.
    Opened { conn: ConnId, device: DeviceId },
    /// A decoded frame arrived at `now_ms`, milliseconds since the Unix epoch by the driver's
    /// clock (sessions' registration and last activity; the rate limit uses only differences).
    Frame { conn: ConnId, frame: ClientFrame, now_ms: u64 },
    /// The answer to a [`Effect::ReadChat`] or [`Effect::ReadAccount`] on `conn` has been
    /// written to the stream: the page no longer counts against the device's fetches in flight.
    /// (A stream that closes drops its count with [`Input::Closed`].)
    PageSent { conn: ConnId },
    /// A frame failed to decode.
    BadFrame { conn: ConnId, error: FrameError },
    /// The stream closed.
    Closed { conn: ConnId },
    /// Every write up to and including `token` is behind an fsync barrier.
    Durable { token: u64 },
}

/// What the core asks the driver to do, in order.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Send a frame on a stream.
    Send { conn: ConnId, frame: RelayFrame },
    /// Close a stream (after sending what was queued).
    Close { conn: ConnId },
    /// Apply these operations atomically, then include them in the next fsync barrier and report
    /// [`Input::Durable`] with `token` once it completes.
    Write { token: u64, ops: Vec<StoreOp> },
    /// Read a page of a chat's log (`after < seq <= upto`, at most `max` deltas and
    /// [`stratus_engine::proto::wire::MAX_PAGE_BYTES`]) and send it as a `ChatPage` with `head: upto`.
    /// Report [`Input::PageSent`] once it (or an error in its place) is written to the stream.
    ReadChat { conn: ConnId, req: ReqId, chat: ChatId, after: Seq, upto: Seq, max: u32 },
    /// Read a page of an account log likewise, send it as an `AccountPage` and report
    /// [`Input::PageSent`].
    ReadAccount { conn: ConnId, req: ReqId, account: AccountId, after: Seq, upto: Seq, max: u32 },
}

/// One store mutation.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// A new account.
    PutAccount(AccountPublic),
    /// A new device certificate.
    PutDevice(DeviceCert),
    /// A chat record (new, or with a new epoch).
    PutChat(ChatId, ChatRecord),
    /// A delta at its seq, indexed by `(device, client seq)`.
    PutDelta(Delta),
    /// An account log entry.
    PutAccountEntry(AccountId, AccountEntry),
    /// A device's session state (registration, last activity, revocation).
    PutDeviceState(DeviceId, DeviceState),
    /// An account's settings.
    PutAccountSettings(AccountId, AccountSettings),
    /// A recovery bundle under its lookup id.
    PutRecovery([u8; 32], RecoveryRecord),
    /// A recovery bundle replaced or withdrawn.
    DeleteRecovery([u8; 32]),
    /// An approval kept until the new device has fetched it (see [`ApprovedLink`]).
    PutApprovedLink([u8; 32], ApprovedLink),
    /// The new device has its bundle: the approval is no longer needed.
    DeleteApprovedLink([u8; 32]),
}

/// An approved link, kept until the new device shows it has its bundle (by syncing), so that a
/// device that lost its connection between approval and delivery can ask again under the same
/// link id. The bundle is sealed to the device and the link secret: the relay cannot open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedLink {
    /// The new device.
    pub device: DeviceId,
    /// Its account.
    pub account: AccountPublic,
    /// Its certificate.
    pub cert: DeviceCert,
    /// The sealed account bundle.
    pub bundle: stratus_engine::proto::crypto::SealedBox,
}

/// What the relay keeps of a chat besides its deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// Its kind.
    pub kind: ChatKind,
    /// Member accounts.
    pub members: BTreeSet<AccountId>,
    /// Key epochs with the chat key wrapped to each member.
    pub epochs: BTreeMap<Epoch, Vec<WrappedKey>>,
}

/// A stored append: `(client seq, chat, seq)`.
pub type RecentAppend = (ClientSeq, ChatId, Seq);

/// The index the core starts from, read from the store.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every account.
    pub accounts: Vec<AccountPublic>,
    /// Every device certificate.
    pub devices: Vec<DeviceCert>,
    /// Every chat with its head seq.
    pub chats: Vec<(ChatId, ChatRecord, Seq)>,
    /// The head of each account log.
    pub account_heads: Vec<(AccountId, Seq)>,
    /// Per device, its most recent appends (oldest first), up to [`DEDUP_WINDOW`].
    pub recent_appends: Vec<(DeviceId, Vec<RecentAppend>)>,
    /// Approvals not yet fetched by their device.
    pub approved_links: Vec<([u8; 32], ApprovedLink)>,
    /// What the relay keeps of each device's session.
    pub device_states: Vec<(DeviceId, DeviceState)>,
    /// Settings the accounts chose.
    pub account_settings: Vec<(AccountId, AccountSettings)>,
    /// Recovery bundles by lookup id.
    pub recoveries: Vec<([u8; 32], RecoveryRecord)>,
}

/// An account bundle sealed under a recovery key the relay never sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// The account.
    pub account: AccountId,
    /// The device that stored it (if that device's session ends, so does the record: a stolen
    /// device must not leave itself a way back in).
    pub by: DeviceId,
    /// The sealed bundle.
    pub sealed: Vec<u8>,
}

/// Longest sealed recovery bundle the relay keeps.
pub const MAX_RECOVERY_BYTES: usize = 8 * 1024;
/// Recovery lookups and registrations, relay-wide, per second (and burst): a recovery key has
/// 256 bits, so this guards the relay's work, not the keys.
pub const RECOVERY_ATTEMPTS_PER_SECOND: u32 = 10;
const RECOVERY_BURST: u32 = 20;

/// What an account chose about its sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSettings {
    /// Sessions inactive for more than this many days end (0: never).
    pub session_ttl_days: u32,
}

/// Longest session time-to-live an account may set, in days (100 years).
pub const MAX_SESSION_TTL_DAYS: u32 = 36_500;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// What the relay keeps of a device's session besides its certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// When it was registered (account created or link approved), ms since the Unix epoch.
    pub registered_ms: u64,
    /// When it last sent a frame, as of its last stream's close.
    pub last_active_ms: u64,
    /// Its session was ended; it is refused from now on.
    pub revoked: bool,
}

struct Account {
    public: AccountPublic,
    settings: AccountSettings,
    /// The lookup id of its recovery bundle, if it has one.
    recovery: Option<[u8; 32]>,
    devices: BTreeSet<DeviceId>,
    chats: BTreeSet<ChatId>,
    log_head: Seq,
    log_durable: Seq,
}

struct Device {
    account: AccountId,
    highest_client_seq: ClientSeq,
    recent: BTreeMap<ClientSeq, (ChatId, Seq)>,
    /// The lowest client seq refused for a limit and not yet come again. Appends with a higher
    /// client seq are refused until it does: were one of them stored first, the refused one
    /// would fall at or below `highest_client_seq` and be answered `Duplicate` unstored.
    held: Option<ClientSeq>,
    bucket: TokenBucket,
    /// Appends accepted (or re-acknowledged) whose answer waits for a barrier.
    appends_in_flight: u32,
    /// Pages asked for and not yet written, over all the device's streams.
    fetches_in_flight: u32,
    state: DeviceState,
}

impl Device {
    fn new(account: AccountId, state: DeviceState) -> Self {
        Device {
            state,
            account,
            highest_client_seq: ClientSeq(0),
            recent: BTreeMap::new(),
            held: None,
            bucket: TokenBucket::default(),
            appends_in_flight: 0,
            fetches_in_flight: 0,
        }
    }
}

impl Account {
    fn new(public: AccountPublic) -> Self {
        Account {
            public,
            settings: AccountSettings::default(),
            recovery: None,
            devices: BTreeSet::new(),
            chats: BTreeSet::new(),
            log_head: Seq(0),
            log_durable: Seq(0),
        }
    }
}

struct Chat {
    record: ChatRecord,
    head: Seq,
    durable: Seq,
}

struct Conn {
    device: DeviceId,
    hello: bool,
    account: Option<AccountId>,
    /// This stream's share of its device's `fetches_in_flight`, given back when it closes.
    fetches_in_flight: u32,
}

struct PendingLink {
    conn: ConnId,
    req: ReqId,
    device: DeviceId,
    device_x25519: [u8; 32],
    name: String,
}

enum Deferred {
    Send(ConnId, RelayFrame),
    /// The answer to an append: sent, and the device's appends in flight go down by one.
    AppendDone(ConnId, DeviceId, RelayFrame),
    ChatDurable {
        delta: Delta,
        from: ConnId,
    },
    AccountDurable {
        account: AccountId,
        entry: AccountEntry,
    },
}

/// The relay's state machine. See the module docs.
pub struct RelayCore {
    accounts: BTreeMap<AccountId, Account>,
    devices: BTreeMap<DeviceId, Device>,
    chats: BTreeMap<ChatId, Chat>,
    conns: BTreeMap<ConnId, Conn>,
    conns_by_account: BTreeMap<AccountId, BTreeSet<ConnId>>,
    links: BTreeMap<[u8; 32], PendingLink>,
    approved: BTreeMap<[u8; 32], ApprovedLink>,
    next_token: u64,
    durable_token: u64,
    deferred: VecDeque<(u64, Deferred)>,
    limits: Limits,
    recoveries: BTreeMap<[u8; 32], RecoveryRecord>,
    recovery_bucket: TokenBucket,
}

impl RelayCore {
    /// A core over what the store recovered, enforcing `limits` (see [`Limits`]).
    pub fn new(recovered: Recovered, limits: Limits) -> Self {
        let mut core = RelayCore {
            accounts: BTreeMap::new(),
            devices: BTreeMap::new(),
            chats: BTreeMap::new(),
            conns: BTreeMap::new(),
            conns_by_account: BTreeMap::new(),
            links: BTreeMap::new(),
            approved: recovered.approved_links.iter().cloned().collect(),
            next_token: 1,
            durable_token: 0,
            deferred: VecDeque::new(),
            limits,
            recoveries: BTreeMap::new(),
            recovery_bucket: TokenBucket::default(),
        };
        for public in recovered.accounts {
            core.accounts.insert(public.id, Account::new(public));
        }
        for (id, record) in recovered.recoveries {
            if let Some(a) = core.accounts.get_mut(&record.account) {
                a.recovery = Some(id);
            }
            core.recoveries.insert(id, record);
        }
        for (account, settings) in recovered.account_settings {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.settings = settings;
            }
        }
        for (account, head) in recovered.account_heads {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.log_head = head;
                a.log_durable = head;
            }
        }
        let states: BTreeMap<DeviceId, DeviceState> = recovered.device_states.into_iter().collect();
        for cert in recovered.devices {
            let state = states.get(&cert.body.device).copied().unwrap_or_default();
            if let Some(a) = core.accounts.get_mut(&cert.body.account) {
                a.devices.insert(cert.body.device.clone());
            }
            core.devices.insert(cert.body.device.clone(), Device::new(cert.body.account, state));
        }
        for (chat, record, head) in recovered.chats {
            for m in &record.members {
                if let Some(a) = core.accounts.get_mut(m) {
                    a.chats.insert(chat);
                }
            }
            core.chats.insert(chat, Chat { record, head, durable: head });
        }
        for (device, recent) in recovered.recent_appends {
            if let Some(d) = core.devices.get_mut(&device) {
                for (cs, chat, seq) in recent {
                    d.highest_client_seq = d.highest_client_seq.max(cs);
                    d.recent.insert(cs, (chat, seq));
                }
                while d.recent.len() > DEDUP_WINDOW {
                    d.recent.pop_first();
                }
            }
        }
        core
    }

    /// Number of open device streams.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Handles one input and returns the effects to carry out, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Opened { conn, device } => {
                self.conns.insert(conn, Conn { device, hello: false, account: None, fetches_in_flight: 0 });
            }
            Input::PageSent { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.fetches_in_flight > 0 {
                        c.fetches_in_flight -= 1;
                        if let Some(d) = self.devices.get_mut(&c.device) {
                            d.fetches_in_flight = d.fetches_in_flight.saturating_sub(1);
                        }
                    }
                }
            }
            Input::Closed { conn } => self.close(conn, &mut out),
            Input::BadFrame { conn, error } => {
                let code = match error {
                    FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::MalformedFrame,
                };
                out.push(error_frame(conn, None, code, error.to_string()));
                if code == ErrorCode::FrameTooLarge {
                    out.push(Effect::Close { conn });
                }
            }
            Input::Frame { conn, frame, now_ms } => self.frame(conn, frame, now_ms, &mut out),
            Input::Durable { token } => self.durable(token, &mut out),
        }
        out
    }

    fn close(&mut self, conn: ConnId, out: &mut Vec<Effect>) {
        self.detach(conn);
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(d) = self.devices.get_mut(&c.device) {
                d.fetches_in_flight = d.fetches_in_flight.saturating_sub(c.fetches_in_flight);
                // Its last activity, kept across restarts for the account's session list.
                let state = d.state;
                let token = self.token();
                out.push(Effect::Write { token, ops: vec![StoreOp::PutDeviceState(c.device.clone(), state)] });
            }
        }
        self.links.retain(|_, l| l.conn != conn);
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let ClientFrame::Hello { version } = frame {
            if c.hello {
                out.push(error_frame(conn, None, ErrorCode::ProtocolViolation, "hello sent twice"));
                return;
            }
            if version != PROTOCOL_VERSION {
                out.push(error_frame(
                    conn,
                    None,
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {version} is not supported; this relay speaks {PROTOCOL_VERSION}"),
                ));
                out.push(Effect::Close { conn });
                return;
            }
            let device = c.device.clone();
            self.expire_if_idle(&device, now_ms, out);
            if self.devices.get(&device).is_some_and(|d| d.state.revoked) {
                out.push(revoked(conn, None));
                out.push(Effect::Close { conn });
                return;
            }
            let Some(c) = self.conns.get_mut(&conn) else { return };
            c.hello = true;
            let account = self.devices.get(&c.device).map(|d| d.account);
            if let Some(a) = account {
                self.attach(conn, a);
            }
            out.push(Effect::Send { conn, frame: RelayFrame::Hello { version: PROTOCOL_VERSION, account } });
            return;
        }
        if !c.hello {
            out.push(error_frame(conn, None, ErrorCode::ProtocolViolation, "the first frame must be hello"));
            out.push(Effect::Close { conn });
            return;
        }
        let device = c.device.clone();
        let account = c.account;
        if let Some(d) = self.devices.get_mut(&device) {
            if d.state.revoked {
                // Frames already on their way when the session ended.
                out.push(revoked(conn, Some(frame.req())));
                out.push(Effect::Close { conn });
                return;
            }
            d.state.last_active_ms = d.state.last_active_ms.max(now_ms);
        }
        if let Some(retry_after_ms) = self.over_rate(&device, &frame, now_ms) {
            out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req: frame.req(), retry_after_ms } });
            return;
        }
        let result = match (frame, account) {
            (ClientFrame::Hello { .. }, _) => unreachable!("handled above"),
            (ClientFrame::CreateAccount { req, account, cert }, _) => {
                self.create_account(conn, req, &device, account, cert, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::LinkWait { req, link_id, device_x25519, name }, _) => {
                self.link_wait(conn, req, &device, link_id, device_x25519, name, out).map_err(|e| (req, e))
            }
            (ClientFrame::FetchRecovery { req, lookup_id }, _) => {
                self.fetch_recovery(conn, req, lookup_id, now_ms, out);
                Ok(())
            }
            (ClientFrame::Recover { req, lookup_id, cert }, _) => {
                self.recover(conn, req, &device, lookup_id, cert, now_ms, out).map_err(|e| (req, e))
            }
            (frame, None) => Err((
                frame.req(),
                (
                    ErrorCode::UnknownDevice,
                    "this device has no certificate on this relay; create an account or link the device".into(),
                ),
            )),
            (ClientFrame::LinkLookup { req, link_id }, Some(_)) => match self.links.get(&link_id) {
                Some(l) => {
                    out.push(Effect::Send {
                        conn,
                        frame: RelayFrame::LinkInfo {
                            req,
                            device: l.device.clone(),
                            device_x25519: l.device_x25519,
                            name: l.name.clone(),
                        },
                    });
                    Ok(())
                }
                None => Err((req, (ErrorCode::LinkNotFound, "no device waits under that link code".into()))),
            },
            (ClientFrame::LinkApprove { req, link_id, cert, bundle }, Some(a)) => {
                self.link_approve(conn, req, a, link_id, cert, bundle, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::ListDevices { req }, Some(a)) => {
                for d in self.accounts[&a].devices.clone() {
                    self.expire_if_idle(&d, now_ms, out);
                }
                let online: BTreeSet<&DeviceId> = self.conns.values().map(|c| &c.device).collect();
                let devices = self.accounts[&a]
                    .devices
                    .iter()
                    .filter_map(|d| self.devices.get(d).map(|s| (d, s.state)))
                    .map(|(d, s)| DeviceSession {
                        device: d.clone(),
                        registered_ms: s.registered_ms,
                        last_active_ms: s.last_active_ms,
                        online: online.contains(d) && !s.revoked,
                        revoked: s.revoked,
                    })
                    .collect();
                let session_ttl_days = self.accounts[&a].settings.session_ttl_days;
                out.push(Effect::Send { conn, frame: RelayFrame::Devices { req, devices, session_ttl_days } });
                Ok(())
            }
            (ClientFrame::PutRecovery { req, lookup_id, sealed }, Some(a)) => {
                self.put_recovery(conn, req, a, &device, lookup_id, sealed, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::SetSessionTtl { req, days }, Some(a)) => {
                self.set_session_ttl(conn, req, a, &device, days, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::Revoke { req, revocation }, Some(a)) => {
                self.revoke(conn, req, a, &device, revocation, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::CreateChat { req, chat, kind, epoch, keys, .. }, Some(a)) => {
                self.create_chat(conn, req, a, chat, kind, epoch, keys, out).map_err(|e| (req, e))
            }
            (ClientFrame::Append { req, chat, epoch, client_seq, sealed }, Some(a)) => {
                self.append(conn, req, a, &device, chat, epoch, client_seq, sealed, out).map_err(|e| (req, e))
            }
            (ClientFrame::SyncState { req }, Some(a)) => {
                // A device that syncs has its bundle: its stored approval can go.
                if let Some(id) = self.approved.iter().find(|(_, l)| l.device == device).map(|(id, _)| *id) {
                    self.approved.remove(&id);
                    let token = self.token();
                    out.push(Effect::Write { token, ops: vec![StoreOp::DeleteApprovedLink(id)] });
                }
                let acct = &self.accounts[&a];
                let chats = acct.chats.iter().map(|c| (*c, self.chats[c].durable)).collect();
                out.push(Effect::Send {
                    conn,
                    frame: RelayFrame::SyncState { req, account_head: acct.log_durable, chats },
                });
                Ok(())
            }
            (ClientFrame::FetchChat { req, chat, after, max }, Some(a)) => match self.chats.get(&chat) {
                None => Err((req, (ErrorCode::UnknownChat, format!("no chat {chat}")))),
                Some(c) if !c.record.members.contains(&a) => {
                    Err((req, (ErrorCode::NotMember, format!("this account is not a member of chat {chat}"))))
                }
                Some(_) if self.fetches_full(&device) => {
                    out.push(Effect::Send {
                        conn,
                        frame: RelayFrame::RateLimited { req, retry_after_ms: IN_FLIGHT_RETRY_MS },
                    });
                    Ok(())
                }
                Some(c) => {
                    let upto = c.durable;
                    self.fetch_started(conn, &device);
                    out.push(Effect::ReadChat { conn, req, chat, after, upto, max: max.clamp(1, MAX_PAGE_DELTAS) });
                    Ok(())
                }
            },
            (ClientFrame::FetchAccount { req, .. }, Some(_)) if self.fetches_full(&device) => {
                out.push(Effect::Send {
                    conn,
                    frame: RelayFrame::RateLimited { req, retry_after_ms: IN_FLIGHT_RETRY_MS },
                });
                Ok(())
            }
            (ClientFrame::FetchAccount { req, after, max }, Some(a)) => {
                self.fetch_started(conn, &device);
                out.push(Effect::ReadAccount {
                    conn,
                    req,
                    account: a,
                    after,
                    upto: self.accounts[&a].log_durable,
                    max: max.clamp(1, MAX_PAGE_DELTAS),
                });
                Ok(())
            }
        };
        if let Err((req, (code, message))) = result {
            out.push(error_frame(conn, Some(req), code, message));
        }
    }

    /// The rate limit and the held-back client seqs, checked before anything else: `Some` with
    /// the retry-after when `frame` is refused. Only registered devices are limited here (an
    /// unknown device can only create an account or wait for a link; those are bounded by the
    /// connection limits and [`MAX_PENDING_LINKS`]).
    fn over_rate(&mut self, device: &DeviceId, frame: &ClientFrame, now_ms: u64) -> Option<u32> {
        let limits = &self.limits;
        let dev = self.devices.get_mut(device)?;
        // Outbox items: appends and chat creations, ordered by client seq.
        let append_seq = match frame {
            ClientFrame::Append { client_seq, .. } | ClientFrame::CreateChat { client_seq, .. } => Some(*client_seq),
            _ => None,
        };
        if let (Some(cs), Some(held)) = (append_seq, dev.held) {
            if cs > held {
                // Nothing is taken from the bucket: the device is told to wait, not charged.
                let wait = match dev.bucket.clone().take(now_ms, limits.requests_per_second, limits.request_burst) {
                    Ok(()) => IN_FLIGHT_RETRY_MS,
                    Err(ms) => ms.max(IN_FLIGHT_RETRY_MS),
                };
                return Some(wait);
            }
            if cs == held {
                dev.held = None;
            }
        }
        match dev.bucket.take(now_ms, limits.requests_per_second, limits.request_burst) {
            Ok(()) => None,
            Err(ms) => {
                if let Some(cs) = append_seq {
                    hold(dev, cs);
                }
                Some(ms)
            }
        }
    }

    fn fetches_full(&self, device: &DeviceId) -> bool {
        self.devices.get(device).is_some_and(|d| d.fetches_in_flight >= self.limits.max_fetches_in_flight_per_device)
    }

    fn fetch_started(&mut self, conn: ConnId, device: &DeviceId) {
        if let Some(d) = self.devices.get_mut(device) {
            d.fetches_in_flight += 1;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.fetches_in_flight += 1;
        }
    }

    fn detach(&mut self, conn: ConnId) {
        if let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.account.take()) {
            if let Some(set) = self.conns_by_account.get_mut(&a) {
                set.remove(&conn);
                if set.is_empty() {
                    self.conns_by_account.remove(&a);
                }
            }
        }
    }

    fn attach(&mut self, conn: ConnId, account: AccountId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.account = Some(account);
            self.conns_by_account.entry(account).or_default().insert(conn);
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Runs `d` once everything written so far is durable.
    fn after_durable(&mut self, d: Deferred, out: &mut Vec<Effect>) {
        let last = self.next_token - 1;
        if last <= self.durable_token {
            self.run_deferred(d, out);
        } else {
            self.deferred.push_back((last, d));
        }
    }

    fn durable(&mut self, token: u64, out: &mut Vec<Effect>) {
        self.durable_token = self.durable_token.max(token);
        while let Some((t, _)) = self.deferred.front() {
            if *t > self.durable_token {
                break;
            }
            let (_, d) = self.deferred.pop_front().expect("front exists");
            self.run_deferred(d, out);
        }
    }

    fn run_deferred(&mut self, d: Deferred, out: &mut Vec<Effect>) {
        match d {
            Deferred::Send(conn, frame) => {
                if self.conns.contains_key(&conn) {
                    out.push(Effect::Send { conn, frame });
                }
            }
            Deferred::AppendDone(conn, device, frame) => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.appends_in_flight = d.appends_in_flight.saturating_sub(1);
                }
                if self.conns.contains_key(&conn) {
                    out.push(Effect::Send { conn, frame });
                }
            }
            Deferred::ChatDurable { delta, from } => {
                let Some(chat) = self.chats.get_mut(&delta.chat) else { return };
                chat.durable = chat.durable.max(delta.seq);
                for member in &chat.record.members {
                    for conn in self.conns_by_account.get(member).into_iter().flatten() {
                        if *conn != from {
                            out.push(Effect::Send { conn: *conn, frame: RelayFrame::Push { delta: delta.clone() } });
                        }
                    }
                }
            }
            Deferred::AccountDurable { account, entry } => {
                let Some(a) = self.accounts.get_mut(&account) else { return };
                a.log_durable = a.log_durable.max(entry.seq);
                for conn in self.conns_by_account.get(&account).into_iter().flatten() {
                    out.push(Effect::Send { conn: *conn, frame: RelayFrame::PushAccount { entry: entry.clone() } });
                }
            }
        }
    }

    fn log_entry(&mut self, account: AccountId, event: AccountEvent, ops: &mut Vec<StoreOp>) -> AccountEntry {
        let a = self.accounts.get_mut(&account).expect("caller checked the account exists");
        a.log_head = a.log_head.next();
        let entry = AccountEntry { seq: a.log_head, event };
        ops.push(StoreOp::PutAccountEntry(account, entry.clone()));
        entry
    }

    #[allow(clippy::too_many_arguments)]
    fn create_account(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        account: AccountPublic,
        cert: DeviceCert,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        account.validate().map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        cert.verify(&account).map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        if &cert.body.device != device {
            return Err((ErrorCode::BadCertificate, "the certificate names another device".into()));
        }
        if self.accounts.get(&account.id).is_some_and(|a| a.public == account)
            && self.devices.get(device).is_some_and(|d| d.account == account.id)
        {
            // A retry whose reply was lost: the same account from the same device.
            self.attach(conn, account.id);
            self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
            return Ok(());
        }
        if self.accounts.contains_key(&account.id) {
            return Err((ErrorCode::AlreadyExists, format!("account {} exists", account.id)));
        }
        if self.devices.contains_key(device) {
            return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into()));
        }
        let id = account.id;
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![
            StoreOp::PutAccount(account.clone()),
            StoreOp::PutDevice(cert.clone()),
            StoreOp::PutDeviceState(device.clone(), state),
        ];
        let mut acct = Account::new(account);
        acct.devices.insert(device.clone());
        self.accounts.insert(id, acct);
        self.devices.insert(device.clone(), Device::new(id, state));
        let entry = self.log_entry(id, AccountEvent::DeviceAdded { cert }, &mut ops);
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.attach(conn, id);
        self.after_durable(Deferred::AccountDurable { account: id, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn link_wait(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        link_id: [u8; 32],
        device_x25519: [u8; 32],
        name: String,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if let Some(a) = self.approved.get(&link_id).filter(|a| &a.device == device) {
            let frame = RelayFrame::LinkApproved {
                req,
                account: a.account.clone(),
                cert: a.cert.clone(),
                bundle: a.bundle.clone(),
            };
            self.after_durable(Deferred::Send(conn, frame), out);
            return Ok(());
        }
        if self.devices.contains_key(device) {
            return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into()));
        }
        if name.len() > MAX_DEVICE_NAME_BYTES {
            return Err((ErrorCode::TooLarge, format!("device names are at most {MAX_DEVICE_NAME_BYTES} bytes")));
        }
        if self.links.len() >= MAX_PENDING_LINKS && !self.links.contains_key(&link_id) {
            return Err((ErrorCode::RateLimited, "too many devices wait for approval; try again later".into()));
        }
        if self.links.get(&link_id).is_some_and(|l| &l.device != device) {
            return Err((ErrorCode::AlreadyExists, "another device waits under that link code".into()));
        }
        // One pending link per stream: a new wait replaces the old one, so one stream cannot
        // fill the relay's table.
        self.links.retain(|_, l| l.conn != conn);
        self.links.insert(link_id, PendingLink { conn, req, device: device.clone(), device_x25519, name });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn link_approve(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        link_id: [u8; 32],
        cert: DeviceCert,
        bundle: stratus_engine::proto::crypto::SealedBox,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        let link =
            self.links.get(&link_id).ok_or((ErrorCode::LinkNotFound, "no device waits under that link code".into()))?;
        if self.devices.contains_key(&link.device) {
            return Err((ErrorCode::AlreadyExists, "the waiting device already belongs to an account".into()));
        }
        let public = self.accounts[&account].public.clone();
        cert.verify(&public).map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        if cert.body.device != link.device || cert.body.device_x25519 != link.device_x25519 {
            return Err((ErrorCode::BadCertificate, "the certificate does not match the waiting device".into()));
        }
        if bundle.sealed.len() > 4096 {
            return Err((ErrorCode::TooLarge, "account bundle too large".into()));
        }
        let link = self.links.remove(&link_id).expect("checked above");
        let approval = ApprovedLink {
            device: link.device.clone(),
            account: public.clone(),
            cert: cert.clone(),
            bundle: bundle.clone(),
        };
        self.approved.insert(link_id, approval.clone());
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![
            StoreOp::PutDevice(cert.clone()),
            StoreOp::PutDeviceState(link.device.clone(), state),
            StoreOp::PutApprovedLink(link_id, approval),
        ];
        self.devices.insert(link.device.clone(), Device::new(account, state));
        self.accounts.get_mut(&account).expect("the approver's account exists").devices.insert(link.device.clone());
        let entry = self.log_entry(account, AccountEvent::DeviceAdded { cert: cert.clone() }, &mut ops);
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.attach(link.conn, account);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(
            Deferred::Send(link.conn, RelayFrame::LinkApproved { req: link.req, account: public, cert, bundle }),
            out,
        );
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn put_recovery(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        lookup_id: [u8; 32],
        sealed: Vec<u8>,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if sealed.len() > MAX_RECOVERY_BYTES {
            return Err((ErrorCode::TooLarge, format!("a recovery bundle is at most {MAX_RECOVERY_BYTES} bytes")));
        }
        if self.recoveries.get(&lookup_id).is_some_and(|r| r.account != account) {
            return Err((ErrorCode::AlreadyExists, "that recovery id is taken".into()));
        }
        // A new account sets its first recovery key at once; replacing one needs a session as
        // old as revoking does, so that a device just linked to a stolen phone cannot take the
        // owner's way back in away. (A key it did set is withdrawn when its session ends.)
        if self.accounts[&account].recovery.is_some() {
            self.check_session_age(by, now_ms)?;
        }
        let mut ops = Vec::new();
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        if let Some(old) = a.recovery.replace(lookup_id).filter(|old| *old != lookup_id) {
            self.recoveries.remove(&old);
            ops.push(StoreOp::DeleteRecovery(old));
        }
        let record = RecoveryRecord { account, by: by.clone(), sealed };
        self.recoveries.insert(lookup_id, record.clone());
        ops.push(StoreOp::PutRecovery(lookup_id, record));
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    /// Takes one recovery attempt from the relay-wide budget, or answers `RateLimited`.
    fn recovery_attempt(&mut self, conn: ConnId, req: ReqId, now_ms: u64, out: &mut Vec<Effect>) -> bool {
        match self.recovery_bucket.take(now_ms, RECOVERY_ATTEMPTS_PER_SECOND, RECOVERY_BURST) {
            Ok(()) => true,
            Err(retry_after_ms) => {
                out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms } });
                false
            }
        }
    }

    fn fetch_recovery(&mut self, conn: ConnId, req: ReqId, lookup_id: [u8; 32], now_ms: u64, out: &mut Vec<Effect>) {
        if !self.recovery_attempt(conn, req, now_ms, out) {
            return;
        }
        let frame = match self.recoveries.get(&lookup_id) {
            Some(r) => RelayFrame::Recovery {
                req,
                account: self.accounts[&r.account].public.clone(),
                sealed: r.sealed.clone(),
            },
            None => RelayFrame::Error {
                req: Some(req),
                code: ErrorCode::RecoveryNotFound,
                message: "nothing is filed under that recovery key".into(),
            },
        };
        out.push(Effect::Send { conn, frame });
    }

    #[allow(clippy::too_many_arguments)]
    fn recover(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        lookup_id: [u8; 32],
        cert: DeviceCert,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.recovery_attempt(conn, req, now_ms, out) {
            return Ok(());
        }
        let record = self
            .recoveries
            .get(&lookup_id)
            .ok_or((ErrorCode::RecoveryNotFound, "nothing is filed under that recovery key".to_string()))?;
        let account = record.account;
        cert.verify(&self.accounts[&account].public).map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        if &cert.body.device != device {
            return Err((ErrorCode::BadCertificate, "the certificate names another device".into()));
        }
        match self.devices.get(device) {
            Some(d) if d.account == account && !d.state.revoked => {
                // A retry whose reply was lost.
                self.attach(conn, account);
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            Some(_) => return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into())),
            None => {}
        }
        if cert.body.name.len() > MAX_DEVICE_NAME_BYTES {
            return Err((ErrorCode::TooLarge, format!("device names are at most {MAX_DEVICE_NAME_BYTES} bytes")));
        }
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![StoreOp::PutDevice(cert.clone()), StoreOp::PutDeviceState(device.clone(), state)];
        self.devices.insert(device.clone(), Device::new(account, state));
        self.accounts.get_mut(&account).expect("the record's account exists").devices.insert(device.clone());
        let entry = self.log_entry(account, AccountEvent::DeviceAdded { cert }, &mut ops);
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.attach(conn, account);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    /// Ends `device`'s session if its account sets a time-to-live and the device has been
    /// inactive longer (a device whose last activity is unknown is left alone).
    fn expire_if_idle(&mut self, device: &DeviceId, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(d) = self.devices.get(device) else { return };
        let ttl_days = self.accounts.get(&d.account).map_or(0, |a| a.settings.session_ttl_days);
        let last = d.state.last_active_ms;
        if d.state.revoked || ttl_days == 0 || last == 0 || now_ms.saturating_sub(last) <= u64::from(ttl_days) * DAY_MS
        {
            return;
        }
        let account = d.account;
        let dev = self.devices.get_mut(device).expect("checked above");
        dev.state.revoked = true;
        dev.held = None;
        let mut ops = vec![StoreOp::PutDeviceState(device.clone(), dev.state)];
        self.withdraw_recovery(account, device, &mut ops);
        let entry = self.log_entry(
            account,
            AccountEvent::DeviceExpired { device: device.clone(), last_active_ms: last },
            &mut ops,
        );
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.cut_off(device, out);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
    }

    /// Withdraws a recovery bundle that `device` stored (its session ended), into `ops`.
    fn withdraw_recovery(&mut self, account: AccountId, device: &DeviceId, ops: &mut Vec<StoreOp>) {
        let Some(a) = self.accounts.get_mut(&account) else { return };
        if let Some(id) = a.recovery.filter(|id| self.recoveries.get(id).is_some_and(|r| &r.by == device)) {
            a.recovery = None;
            self.recoveries.remove(&id);
            ops.push(StoreOp::DeleteRecovery(id));
        }
    }

    /// Closes every stream of a device whose session ended, telling it why.
    fn cut_off(&mut self, device: &DeviceId, out: &mut Vec<Effect>) {
        let cut: Vec<ConnId> = self.conns.iter().filter(|(_, c)| &c.device == device).map(|(id, _)| *id).collect();
        for c in cut {
            // Nothing more is pushed to it, not even the news of its own end.
            self.detach(c);
            out.push(revoked(c, None));
            out.push(Effect::Close { conn: c });
        }
    }

    /// Refuses a policy change from a session younger than the configured minimum age.
    fn check_session_age(&self, by: &DeviceId, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        let age = now_ms.saturating_sub(self.devices[by].state.registered_ms);
        if age < self.limits.min_session_age_ms {
            return Err((
                ErrorCode::SessionTooNew,
                format!(
                    "this device's session is {} min old; changing the account's sessions needs {} min",
                    age / 60_000,
                    self.limits.min_session_age_ms / 60_000
                ),
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn set_session_ttl(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        days: u32,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if days > MAX_SESSION_TTL_DAYS {
            return Err((
                ErrorCode::TooLarge,
                format!("a session time-to-live is at most {MAX_SESSION_TTL_DAYS} days"),
            ));
        }
        // A short time-to-live ends the other sessions: the same rule as revoking them.
        self.check_session_age(by, now_ms)?;
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        a.settings.session_ttl_days = days;
        let settings = a.settings;
        let token = self.token();
        out.push(Effect::Write { token, ops: vec![StoreOp::PutAccountSettings(account, settings)] });
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    /// Ends another device's session: checked, recorded in the account log, and the device cut
    /// off at once (its streams closed, everything queued for them dropped, and every later
    /// frame or connection refused with `SessionRevoked`).
    #[allow(clippy::too_many_arguments)]
    fn revoke(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        revocation: Revocation,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        revocation.verify(&self.accounts[&account].public).map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        let target = revocation.body.device.clone();
        if &revocation.body.by != by {
            return Err((ErrorCode::BadCertificate, "the revocation names another revoking device".into()));
        }
        if &target == by {
            return Err((ErrorCode::BadCertificate, "a device cannot end its own session this way".into()));
        }
        match self.devices.get(&target) {
            Some(d) if d.account == account && d.state.revoked => {
                // A retry whose reply was lost (or another device got there first).
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            Some(d) if d.account == account => {}
            _ => return Err((ErrorCode::UnknownDevice, format!("no device {} in this account", target.0))),
        }
        self.check_session_age(by, now_ms)?;
        let dev = self.devices.get_mut(&target).expect("checked above");
        dev.state.revoked = true;
        dev.held = None;
        let mut ops = vec![StoreOp::PutDeviceState(target.clone(), dev.state)];
        self.withdraw_recovery(account, &target, &mut ops);
        let entry = self.log_entry(account, AccountEvent::DeviceRevoked { revocation }, &mut ops);
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.cut_off(&target, out);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn create_chat(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        chat: ChatId,
        kind: ChatKind,
        epoch: Epoch,
        keys: Vec<WrappedKey>,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if let Some(existing) = self.chats.get(&chat) {
            // A retry whose reply was lost (devices keep the creation in their outbox until it is
            // acknowledged): the same kind and first-epoch keys, from a member.
            if existing.record.kind == kind
                && existing.record.members.contains(&account)
                && existing.record.epochs.get(&epoch) == Some(&keys)
            {
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            return Err((ErrorCode::AlreadyExists, format!("chat {chat} exists")));
        }
        if keys.len() > MAX_CHAT_MEMBERS {
            return Err((ErrorCode::TooLarge, format!("a chat has at most {MAX_CHAT_MEMBERS} members")));
        }
        let members: BTreeSet<AccountId> = keys.iter().map(|k| k.account).collect();
        if members.len() != keys.len() || !members.contains(&account) {
            return Err((ErrorCode::BadCertificate, "one wrapped key per member, the creator included".into()));
        }
        // Only account-private chats exist so far. Chats with other accounts need their consent
        // and verified keys (issue 5); until then nobody can put anyone else in a chat.
        if kind != ChatKind::Notes {
            return Err((ErrorCode::BadCertificate, "only notes chats can be created on this relay version".into()));
        }
        if members.len() != 1 {
            return Err((ErrorCode::BadCertificate, "a notes chat has exactly one member".into()));
        }
        if let Some(m) = members.iter().find(|m| !self.accounts.contains_key(m)) {
            return Err((ErrorCode::UnknownDevice, format!("no account {m}")));
        }
        // Defence in depth: every wrapped key must be signed by the creating account (the
        // devices check the same signature themselves).
        let creator = self.accounts[&account].public.clone();
        if keys.iter().any(|k| creator.verify_chat_key(chat, kind, epoch, k.account, &k.key, &k.signature).is_err()) {
            return Err((ErrorCode::BadCertificate, "a wrapped chat key is not signed by the creating account".into()));
        }
        let record = ChatRecord { kind, members: members.clone(), epochs: BTreeMap::from([(epoch, keys.clone())]) };
        let mut ops = vec![StoreOp::PutChat(chat, record.clone())];
        self.chats.insert(chat, Chat { record, head: Seq(0), durable: Seq(0) });
        let mut entries = Vec::new();
        for k in keys {
            self.accounts.get_mut(&k.account).expect("checked").chats.insert(chat);
            let e = self.log_entry(
                k.account,
                AccountEvent::ChatAdded {
                    chat,
                    kind,
                    epoch,
                    wrapped_key: k.key,
                    signer: account,
                    signature: k.signature,
                },
                &mut ops,
            );
            entries.push((k.account, e));
        }
        let token = self.token();
        out.push(Effect::Write { token, ops });
        for (account, entry) in entries {
            self.after_durable(Deferred::AccountDurable { account, entry }, out);
        }
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        device: &DeviceId,
        chat_id: ChatId,
        epoch: Epoch,
        client_seq: ClientSeq,
        sealed: Vec<u8>,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        let chat = self.chats.get_mut(&chat_id).ok_or((ErrorCode::UnknownChat, format!("no chat {chat_id}")))?;
        if !chat.record.members.contains(&account) {
            return Err((ErrorCode::NotMember, format!("this account is not a member of chat {chat_id}")));
        }
        if sealed.len() > MAX_DELTA_BYTES {
            return Err((ErrorCode::TooLarge, format!("a delta is at most {MAX_DELTA_BYTES} bytes")));
        }
        if !chat.record.epochs.contains_key(&epoch) {
            return Err((ErrorCode::UnknownEpoch, format!("chat {chat_id} has no epoch {}", epoch.0)));
        }
        let dev = self.devices.get_mut(device).expect("an attached connection's device is known");
        if dev.appends_in_flight >= self.limits.max_appends_in_flight_per_device {
            hold(dev, client_seq);
            out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms: IN_FLIGHT_RETRY_MS } });
            return Ok(());
        }
        dev.appends_in_flight += 1;
        if client_seq <= dev.highest_client_seq {
            let frame = match dev.recent.get(&client_seq) {
                Some((c, seq)) => RelayFrame::Acked { req, chat: *c, client_seq, seq: *seq },
                None => RelayFrame::Duplicate { req, chat: chat_id, client_seq },
            };
            self.after_durable(Deferred::AppendDone(conn, device.clone(), frame), out);
            return Ok(());
        }
        chat.head = chat.head.next();
        let seq = chat.head;
        dev.highest_client_seq = client_seq;
        dev.recent.insert(client_seq, (chat_id, seq));
        if dev.recent.len() > DEDUP_WINDOW {
            dev.recent.pop_first();
        }
        let delta = Delta { chat: chat_id, seq, epoch, device: device.clone(), client_seq, sealed };
        let token = self.token();
        out.push(Effect::Write { token, ops: vec![StoreOp::PutDelta(delta.clone())] });
        self.after_durable(
            Deferred::AppendDone(conn, device.clone(), RelayFrame::Acked { req, chat: chat_id, client_seq, seq }),
            out,
        );
        self.after_durable(Deferred::ChatDurable { delta, from: conn }, out);
        Ok(())
    }
}

/// Marks `cs` refused for a limit: later client seqs wait until it comes again.
fn hold(dev: &mut Device, cs: ClientSeq) {
    dev.held = Some(dev.held.map_or(cs, |h| h.min(cs)));
}

fn revoked(conn: ConnId, req: Option<ReqId>) -> Effect {
    error_frame(
        conn,
        req,
        ErrorCode::SessionRevoked,
        "this device's session was ended by another device of its account",
    )
}

fn error_frame(conn: ConnId, req: Option<ReqId>, code: ErrorCode, message: impl Into<String>) -> Effect {
    Effect::Send { conn, frame: RelayFrame::Error { req, code, message: message.into() } }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
