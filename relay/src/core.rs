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
//! ([`Input::Sent`]), are counted per device. A request over a limit gets
//! [`RelayFrame::RateLimited`] and changes nothing. An append refused that way holds back the
//! device's later client seqs until it comes again (see `Device::held`): the relay stores a
//! device's appends in client-seq order, and its dedup takes any client seq at or below the
//! highest stored one as stored, so storing a later one first would lose the refused one.
//!
//! Keys: what an account signs is checked against the generation of its keys in force (see
//! `core/rotation.rs` and docs/crypto.md). After a rotation an append under an older epoch of its
//! chat, and a chat key or certificate an older generation signed, get `StaleEpoch`; a refused
//! append or chat creation holds back the device's later client seqs the same way.
//!
//! Backlogs (see `core/backlog.rs`): what waits to be written to each stream is counted in
//! bytes from the driver's [`Input::Sent`] reports. Pushes to a device that falls behind are
//! dropped and it is told what it missed ([`RelayFrame::Behind`]); answers are never dropped;
//! a device that stops reading is cut off ([`Effect::Kill`]) after a timeout on the driver's
//! [`Input::Tick`]. Typing indicators are coalesced per chat and device and dropped first.
//!
//! Peers without a session (see `core/peers.rs`) have a request budget of their own, and
//! recovery attempts and link waits are held per peer, so that no one peer uses up what the
//! relay has for everyone. Accounts have a byte quota (`core/quota.rs`).
//!
//! A full disk (see `core/storage.rs`): when the driver reports [`Input::WriteFailed`], nothing
//! written since the last barrier is ever revealed, every request that would write is refused,
//! and reads and pushes of what is durable go on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stratus_engine::proto::cert::{AccountGen, AccountPublic, CertError, DeviceCert, MAX_DEVICE_NAME_BYTES};
use stratus_engine::proto::directory::{AccountChain, KeyTerms, SignedGen};
use stratus_engine::proto::wire::version_refusal;
use stratus_engine::proto::wire::{
    AccountEntry, AccountEvent, ChatKind, ClientFrame, Delta, DeviceSession, ErrorCode, FrameError, Incarnation,
    InviteToken, RelayFrame, ReqId, Restored, WrappedKey, MAX_CHAT_MEMBERS, MAX_DELTA_BYTES, MAX_PAGE_DELTAS,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

use crate::limits::{IntervalBucket, Limits, TokenBucket, IN_FLIGHT_RETRY_MS};

/// The driver's handle on one device stream.
pub type ConnId = u64;

/// How many recent `(client seq → seq)` pairs the relay indexes per device to re-acknowledge
/// retried appends with their seq. A device keeps at most a few appends in flight, so only
/// recent ones are retried; an older repeat gets [`RelayFrame::Duplicate`].
pub const DEDUP_WINDOW: usize = 1024;

/// What the driver tells the core.
#[derive(Debug)]
pub enum Input {
    /// A device opened a sync stream; `device` is authenticated by the transport's Noise handshake.
    Opened { conn: ConnId, device: DeviceId },
    /// A decoded frame arrived at `now_ms`, milliseconds since the Unix epoch by the driver's
    /// clock (sessions' registration and last activity; the rate limit uses only differences).
    Frame { conn: ConnId, frame: ClientFrame, now_ms: u64 },
    /// Frames for `conn` have been written to its stream (handed to the transport): `bytes` is
    /// the sum of the [`frame_cost`]s of the [`Effect::Send`] frames among them, `pages` the
    /// number of answers to [`Effect::ReadChat`] and [`Effect::ReadAccount`] (which then no
    /// longer count against the device's fetches in flight; a page's bytes are not counted).
    /// The driver may report many frames at once, each frame once; reports for a stream the
    /// core has closed change nothing. (A stream that closes drops its counts with
    /// [`Input::Closed`].)
    Sent { conn: ConnId, bytes: u64, pages: u32 },
    /// The driver's timer, about once a second. `now_ms` is milliseconds on a monotonic clock
    /// with any origin (the core uses only differences, and only between ticks): streams that
    /// have had something waiting and nothing written for [`Limits::stalled_reader_ms`] are
    /// cut off.
    Tick { now_ms: u64 },
    /// A frame failed to decode, at `now_ms` (the same clock as [`Input::Frame`]'s): it costs
    /// the peer a request like any frame, and one over its budget closes the stream.
    BadFrame { conn: ConnId, error: FrameError, now_ms: u64 },
    /// The stream closed.
    Closed { conn: ConnId },
    /// Every write up to and including `token` is behind an fsync barrier.
    Durable { token: u64 },
    /// A write or a barrier failed because the disk is full: no later [`Input::Durable`] will
    /// come, and the driver applies no more writes. The core reveals nothing not yet durable,
    /// refuses every request that would write, and goes on serving reads (see
    /// `core/storage.rs`).
    WriteFailed,
    /// The relay is shutting down (lame duck, see `core/lifecycle.rs`): what was accepted is
    /// answered once durable, nothing new is taken, and every stream is then closed; poll
    /// [`RelayCore::drained`] after each input.
    Drain,
    /// The operator's command (`stratus-relay admin`, see `core/admin.rs`), answered with
    /// [`Effect::Admin`] carrying the same `id` once what it changed is durable.
    Admin { id: AdminId, command: AdminCommand },
    /// The driver emptied as much of the deleted ranges as [`RelayCore::purge_due`] asked;
    /// `more` when some are left (see `core/purge.rs`).
    Purged { more: bool },
}

/// What the core asks the driver to do, in order.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Send a frame on a stream.
    Send { conn: ConnId, frame: RelayFrame },
    /// Close a stream (after sending what was queued).
    Close { conn: ConnId },
    /// Stop a stream at once, dropping whatever waits to be written to it: its device has
    /// stopped reading. The core has already forgotten the stream (an [`Input::Closed`] for it
    /// changes nothing). Logged as "device is not reading; disconnecting it".
    Kill { conn: ConnId },
    /// Apply these operations atomically, then include them in the next fsync barrier and report
    /// [`Input::Durable`] with `token` once it completes.
    Write { token: u64, ops: Vec<StoreOp> },
    /// Read a page of a chat's log (`after < seq <= upto`, at most `max` deltas and
    /// [`stratus_engine::proto::wire::MAX_PAGE_BYTES`]) and send it as a `ChatPage` with `head: upto`.
    /// Report it in [`Input::Sent`]'s `pages` once it (or an error in its place) is written to
    /// the stream.
    ReadChat { conn: ConnId, req: ReqId, chat: ChatId, after: Seq, upto: Seq, max: u32 },
    /// Read a page of an account log likewise, send it as an `AccountPage` and report it in
    /// [`Input::Sent`].
    ReadAccount { conn: ConnId, req: ReqId, account: AccountId, after: Seq, upto: Seq, max: u32 },
    /// The answer to the operator's command [`Input::Admin`] `id`.
    Admin { id: AdminId, answer: Result<AdminAnswer, AdminRefusal> },
}

struct Account {
    public: AccountPublic,
    /// Every generation of its keys, the genesis first; the last one is in force.
    gens: Vec<AccountGen>,
    /// The signed rotations that started each generation after the genesis.
    rotations: Vec<SignedGen>,
    /// Its username in the directory.
    username: Option<String>,
    settings: AccountSettings,
    /// The lookup id of its recovery bundle, if it has one.
    recovery: Option<[u8; 32]>,
    devices: BTreeSet<DeviceId>,
    chats: BTreeSet<ChatId>,
    log_head: Seq,
    log_durable: Seq,
    /// Bytes stored for it (see `core/quota.rs`).
    stored_bytes: u64,
    /// Its devices' appends, in bytes (see [`Limits::append_bytes_per_second`]).
    append_bytes: TokenBucket,
    /// The accounts it accepts chats from (see `core/consent.rs`).
    accepts: BTreeSet<AccountId>,
    /// Invitations waiting for it: who asked, and when (ms).
    invitations: BTreeMap<AccountId, u64>,
    /// What the operator decided about it (see `core/admin.rs`).
    admin: AccountAdmin,
}

struct Device {
    account: AccountId,
    /// Its certificate (for other accounts' devices that look it up, for secret chats).
    cert: DeviceCert,
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
    /// When it last had a typing indicator forwarded, per chat (only recent ones, at most
    /// [`chats::TYPING_CHATS`]).
    typing: BTreeMap<ChatId, u64>,
    /// The account log entry that ended its session, shown to it as proof.
    ended: Option<Box<AccountEntry>>,
}

impl Device {
    fn new(cert: DeviceCert, state: DeviceState) -> Self {
        Device {
            state,
            account: cert.body.account,
            cert,
            highest_client_seq: ClientSeq(0),
            recent: BTreeMap::new(),
            held: None,
            bucket: TokenBucket::default(),
            appends_in_flight: 0,
            fetches_in_flight: 0,
            typing: BTreeMap::new(),
            ended: None,
        }
    }
}

impl Account {
    fn new(public: AccountPublic) -> Self {
        Account {
            gens: vec![public.genesis()],
            rotations: Vec::new(),
            username: None,
            public,
            settings: AccountSettings::default(),
            recovery: None,
            devices: BTreeSet::new(),
            chats: BTreeSet::new(),
            log_head: Seq(0),
            log_durable: Seq(0),
            stored_bytes: 0,
            append_bytes: TokenBucket::default(),
            accepts: BTreeSet::new(),
            invitations: BTreeMap::new(),
            admin: AccountAdmin::default(),
        }
    }
}

struct Chat {
    record: ChatRecord,
    head: Seq,
    durable: Seq,
    /// Its member changes' budget (see [`Limits::member_change_interval_ms`]).
    member_changes: IntervalBucket,
}

impl Chat {
    fn new(record: ChatRecord, head: Seq) -> Self {
        Chat { record, head, durable: head, member_changes: IntervalBucket::default() }
    }
}

struct Conn {
    device: DeviceId,
    hello: bool,
    account: Option<AccountId>,
    /// This stream's share of its device's `fetches_in_flight`, given back when it closes.
    fetches_in_flight: u32,
    /// What waits to be written to it.
    backlog: Backlog,
    /// Its device's session ended and the proof waits for a barrier: frames from it are
    /// dropped meanwhile (the proof, then `SessionRevoked`, then the close follow).
    ending: bool,
    /// The operator refuses its device (see `core/admin.rs`): it was told why and is being
    /// closed; nothing more is sent to it, and what it sends is dropped.
    refused: bool,
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
    /// The stream of a device whose session ended: the proof (`SessionEnded`), then
    /// `SessionRevoked`, then the close.
    EndSession(ConnId),
    /// The answer to an operator's command.
    Admin(AdminId, AdminAnswer),
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
    /// Deletions left ranges to empty once this token is durable (see `core/purge.rs`).
    purge_after: Option<u64>,
    /// What the core wrote as it started, out with the first input's effects (see
    /// `RelayCore::redo_deletions`).
    startup_ops: Vec<StoreOp>,
    deferred: VecDeque<(u64, Deferred)>,
    limits: Limits,
    recoveries: BTreeMap<[u8; 32], RecoveryRecord>,
    /// Every peer with a stream open, and those gone whose budgets are not full again.
    peers: BTreeMap<DeviceId, Peer>,
    /// The position of each account's last `Checkpoint` entry logged since the relay started
    /// (`core/checkpoints.rs`).
    checkpoints: BTreeMap<AccountId, Seq>,
    /// The latest time a frame came with (the clock the peers' budgets run on).
    frame_clock_ms: u64,
    /// A write or barrier failed (the disk is full): nothing more is written or revealed.
    storage_failed: bool,
    /// The directory: username → account.
    usernames: BTreeMap<String, AccountId>,
    /// The store's life, named in every `Hello`.
    incarnation: Incarnation,
    /// After a restore, how far each log matches every earlier incarnation (told in
    /// `SyncState`); `None` for a store never restored.
    floors: Option<Floors>,
    /// Shutting down: the streams told to close so far (see `core/lifecycle.rs`).
    draining: Option<BTreeSet<ConnId>>,
    /// The devices deleted accounts had, and their account (refused; see `core/admin.rs`).
    former_devices: BTreeMap<DeviceId, AccountId>,
    /// Who may make an account.
    registration: Registration,
    /// Invite tokens not yet used, by digest, with when they were made (ms).
    invites: BTreeMap<[u8; 32], u64>,
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
            purge_after: None,
            startup_ops: Vec::new(),
            deferred: VecDeque::new(),
            limits,
            recoveries: BTreeMap::new(),
            peers: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            frame_clock_ms: 0,
            storage_failed: false,
            usernames: BTreeMap::new(),
            incarnation: recovered.incarnation,
            floors: (recovered.incarnation.generation > 0).then_some(recovered.floors),
            draining: None,
            former_devices: BTreeMap::new(),
            registration: recovered.registration,
            invites: recovered.invites.into_iter().collect(),
        };
        for public in recovered.accounts {
            core.accounts.insert(public.id, Account::new(public));
        }
        for (id, record) in recovered.recoveries {
            // A record whose account is gone (a damaged store) is dropped, not served.
            if let Some(a) = core.accounts.get_mut(&record.account) {
                a.recovery = Some(id);
                core.recoveries.insert(id, record);
            }
        }
        let mut gens = recovered.account_gens;
        gens.sort_by_key(|g| (g.body.account, g.body.generation));
        for g in gens {
            // Generations chain: one that does not follow the last one kept is damage, not used.
            if let Some(a) = core.accounts.get_mut(&g.body.account) {
                if a.gens.len() == g.body.generation as usize {
                    a.gens.push(gen_of(&g));
                    a.rotations.push(g);
                }
            }
        }
        for (account, name) in recovered.usernames {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.username = Some(name.clone());
                core.usernames.insert(name, account);
            }
        }
        for (account, settings) in recovered.account_settings {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.settings = settings;
            }
        }
        for (account, admin) in recovered.account_admin {
            if let Some(a) = core.accounts.get_mut(&account) {
                if admin.deleted {
                    core.former_devices.extend(admin.former_devices.iter().map(|d| (d.clone(), account)));
                }
                a.admin = admin;
            }
        }
        for (account, bytes) in recovered.usage {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.stored_bytes = bytes;
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
            core.devices.insert(cert.body.device.clone(), Device::new(cert, state));
        }
        for (account, other) in recovered.accepted {
            if let Some(a) = core.accounts.get_mut(&account) {
                a.accepts.insert(other);
            }
        }
        for (invitee, inviter, at_ms) in recovered.invitations {
            if let Some(a) = core.accounts.get_mut(&invitee) {
                a.invitations.insert(inviter, at_ms);
            }
        }
        for (device, entry) in recovered.session_ends {
            if let Some(d) = core.devices.get_mut(&device) {
                d.ended = Some(Box::new(entry));
            }
        }
        for (chat, record, head) in recovered.chats {
            for m in &record.members {
                if let Some(a) = core.accounts.get_mut(m) {
                    a.chats.insert(chat);
                }
            }
            core.chats.insert(chat, Chat::new(record, head));
        }
        core.redo_deletions(recovered.redo_deletions);
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
        self.startup_writes(&mut out);
        match input {
            Input::Opened { conn, device } => {
                self.peer_opened(&device);
                let backlog = Backlog::default();
                self.conns.insert(
                    conn,
                    Conn {
                        device,
                        hello: false,
                        account: None,
                        fetches_in_flight: 0,
                        backlog,
                        ending: false,
                        refused: false,
                    },
                );
            }
            Input::Sent { conn, bytes, pages } => self.sent(conn, bytes, pages, &mut out),
            Input::Tick { now_ms } => {
                self.tick(now_ms, &mut out);
                self.prune_peers();
            }
            Input::Closed { conn } => self.close(conn, &mut out),
            Input::BadFrame { conn, error, now_ms } => self.bad_frame(conn, error, now_ms, &mut out),
            Input::Frame { conn, frame, now_ms } => self.frame(conn, frame, now_ms, &mut out),
            Input::Durable { token } => self.durable(token, &mut out),
            Input::WriteFailed => self.write_failed(&mut out),
            Input::Drain => self.draining = Some(BTreeSet::new()),
            Input::Admin { id, command } => self.admin(id, command, &mut out),
            Input::Purged { more } => self.purged(more),
        }
        self.note_deletions(&out);
        self.drain_step(&mut out);
        self.admit(out)
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame, now_ms: u64, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.refused) else { return };
        if self.draining.is_some() {
            return Self::refuse_while_draining(conn, &frame, out);
        }
        if let ClientFrame::Hello { version } = frame {
            if c.hello {
                out.push(error_frame(conn, None, ErrorCode::ProtocolViolation, "hello sent twice"));
                return;
            }
            if let Some(why) = version_refusal(version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION) {
                out.push(error_frame(conn, None, ErrorCode::UnsupportedVersion, why));
                out.push(Effect::Close { conn });
                return;
            }
            let device = c.device.clone();
            self.expire_if_idle(&device, now_ms, out);
            if self.devices.get(&device).is_some_and(|d| d.state.revoked) {
                self.end_stream(conn, out);
                return;
            }
            if let Some((code, message)) = self.refusal_of(&device) {
                // The operator suspended, banned or deleted its account.
                self.refuse_stream(conn, code, message, out);
                return;
            }
            let Some(c) = self.conns.get_mut(&conn) else { return };
            c.hello = true;
            let account = self.devices.get(&c.device).map(|d| d.account);
            if let Some(a) = account {
                self.attach(conn, a);
            }
            let incarnation = self.incarnation;
            out.push(Effect::Send {
                conn,
                frame: RelayFrame::Hello { version: PROTOCOL_VERSION, account, incarnation },
            });
            return;
        }
        if !c.hello {
            out.push(error_frame(conn, None, ErrorCode::ProtocolViolation, "the first frame must be hello"));
            out.push(Effect::Close { conn });
            return;
        }
        let (device, account, ending) = (c.device.clone(), c.account, c.ending);
        self.frame_clock_ms = self.frame_clock_ms.max(now_ms);
        if let Some(d) = self.devices.get_mut(&device) {
            if d.state.revoked {
                // Frames already on their way when the session ended: the stream is told why
                // (once, with the proof) and closed.
                if !ending {
                    self.end_stream(conn, out);
                }
                return;
            }
            d.state.last_active_ms = d.state.last_active_ms.max(now_ms);
        }
        if account.is_none() {
            // A peer without a session: its own budget, before anything else is done for it.
            if let Some(retry_after_ms) = self.peer_over_rate(&device, now_ms) {
                if !matches!(frame, ClientFrame::Typing { .. }) {
                    let frame = RelayFrame::RateLimited { req: frame.req(), retry_after_ms };
                    out.push(Effect::Send { conn, frame });
                }
                return;
            }
        }
        if let ClientFrame::Typing { chat } = frame {
            self.typing(conn, &device, account, chat, now_ms, out);
            return;
        }
        if let Some(retry_after_ms) = self.over_rate(&device, &frame, now_ms) {
            out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req: frame.req(), retry_after_ms } });
            return;
        }
        if self.storage_failed && writes(&frame) {
            out.push(storage_full(conn, frame.req()));
            return;
        }
        let result = match (frame, account) {
            (ClientFrame::Hello { .. } | ClientFrame::Typing { .. }, _) => unreachable!("handled above"),
            (ClientFrame::CreateAccount { req, account, cert, invite }, _) => {
                self.create_account(conn, req, &device, account, cert, invite, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::LinkWait { req, link_id, device_x25519, name }, _) => {
                self.link_wait(conn, req, &device, link_id, device_x25519, name, out).map_err(|e| (req, e))
            }
            (ClientFrame::FetchRecovery { req, lookup_id }, _) => {
                self.fetch_recovery(conn, req, &device, lookup_id, now_ms, out);
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
            (ClientFrame::Checkpoint { req, checkpoint }, Some(a)) => {
                self.checkpoint(conn, req, a, &device, checkpoint, out).map_err(|e| (req, e))
            }
            (ClientFrame::PutRecovery { req, lookup_id, public, signature, sealed }, Some(a)) => self
                .put_recovery(conn, req, a, &device, lookup_id, (public, signature, sealed), now_ms, out)
                .map_err(|e| (req, e)),
            (ClientFrame::SetSessionTtl { req, days }, Some(a)) => {
                self.set_session_ttl(conn, req, a, &device, days, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::Revoke { req, revocation, rotation, chats, recovery }, Some(a)) => {
                let rotate = Rotate { rotation, chats, recovery };
                self.revoke(conn, req, a, &device, revocation, rotate, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::Rotate { req, rotation, chats, recovery }, Some(a)) => {
                self.rotate(conn, req, a, Rotate { rotation, chats, recovery }, out).map_err(|e| (req, e))
            }
            (ClientFrame::CreateChat { req, chat, kind, epoch, keys, client_seq }, Some(a)) => {
                self.create_chat(conn, req, a, &device, client_seq, chat, kind, epoch, keys, out).map_err(|e| (req, e))
            }
            (
                frame @ (ClientFrame::SetUsername { .. }
                | ClientFrame::Lookup { .. }
                | ClientFrame::LookupAccounts { .. }
                | ClientFrame::AccountDevices { .. }
                | ClientFrame::Accept { .. }
                | ClientFrame::Invite { .. }
                | ClientFrame::ListInvitations { .. }
                | ClientFrame::ChangeMembers { .. }
                | ClientFrame::Rekey { .. }),
                Some(a),
            ) => {
                let req = frame.req();
                self.members_frame(conn, a, frame, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::Append { req, chat, epoch, client_seq, sealed }, Some(a)) => {
                self.append(conn, req, a, &device, chat, epoch, client_seq, sealed, now_ms, out).map_err(|e| (req, e))
            }
            (ClientFrame::SyncState { req }, Some(a)) => {
                // A device that syncs has its bundle: its stored approval can go.
                let approved = self.approved.iter().find(|(_, l)| l.device == device).map(|(id, _)| *id);
                if let Some(id) = approved.filter(|_| !self.storage_failed) {
                    self.approved.remove(&id);
                    let token = self.token();
                    out.push(Effect::Write { token, ops: vec![StoreOp::DeleteApprovedLink(id)] });
                }
                let acct = &self.accounts[&a];
                let chats = acct.chats.iter().map(|c| (*c, self.chats[c].durable)).collect();
                let restored = self.floors.as_ref().map(|f| Restored {
                    account_floor: f.accounts.get(&a).copied().unwrap_or_default(),
                    chats: acct.chats.iter().filter_map(|c| f.chats.get(c).map(|s| (*c, *s))).collect(),
                    client_seq: self.devices.get(&device).map(|d| d.highest_client_seq).unwrap_or_default(),
                });
                out.push(Effect::Send {
                    conn,
                    frame: RelayFrame::SyncState { req, account_head: acct.log_durable, chats, restored },
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
}

/// The generation a signed rotation starts.
fn gen_of(g: &SignedGen) -> AccountGen {
    let b = &g.body;
    AccountGen { account: b.account, generation: b.generation, signing_key: b.signing_key, kem_key: b.kem_key }
}

fn revoked(conn: ConnId) -> Effect {
    error_frame(conn, None, ErrorCode::SessionRevoked, "this device's session was ended by its account")
}

fn error_frame(conn: ConnId, req: Option<ReqId>, code: ErrorCode, message: impl Into<String>) -> Effect {
    Effect::Send { conn, frame: RelayFrame::Error { req, code, message: message.into() } }
}

mod accounts;
mod admin;
use admin::banned_message;
pub use admin::{
    invite_id, AccountRef, AccountView, AdminAnswer, AdminCommand, AdminId, AdminRefusal, AdminRefusalCode,
    DeleteReport, DeviceView, InviteRef, InviteView, INVITE_ID_BYTES, MAX_INVITES,
};
mod backlog;
mod durable;
mod gate;
use backlog::Backlog;
pub use backlog::{frame_cost, FRAME_OVERHEAD_BYTES};
pub use gate::{ConnectionGate, GateRefusal};
mod chats;
pub use chats::{TYPING_CHATS, TYPING_FORWARD_MS};
mod checkpoints;
mod consent;
pub use consent::{MAX_ACCEPTED, MAX_INVITATIONS};
mod lifecycle;
pub use lifecycle::DRAIN_RETRY_MS;
mod limiting;
mod members;
use limiting::hold;
mod peers;
use peers::Peer;
mod purge;
pub use purge::PURGE_CHUNK;
mod quota;
pub use quota::DELTA_OVERHEAD_BYTES;
mod records;
mod rotation;
mod sessions;
mod stats;
pub use stats::{CoreStats, LOG_LENGTH_BUCKETS};
mod storage;
use rotation::Rotate;
pub use rotation::MAX_ACCOUNT_CHATS;
use storage::{storage_full, writes};

pub use records::*;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
