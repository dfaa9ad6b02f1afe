//! The sync protocol's frames.
//!
//! One long-lived libp2p stream per device connection on [`PROTOCOL`]. Each frame is a 4-byte
//! big-endian length followed by a postcard-encoded [`ClientFrame`] or [`RelayFrame`]; no frame
//! is longer than [`MAX_FRAME_BYTES`]. The first frame each way is `Hello` carrying
//! [`PROTOCOL_VERSION`]. Every request carries a `req` id that the reply echoes; pushes carry
//! none. See docs/protocol.md.

use serde::{Deserialize, Serialize};

use super::cert::{AccountPublic, DeviceCert, Revocation, Rotation};
use super::crypto::{DeltaAd, SealedBox};
use super::directory::{AccountChain, DirectoryEntry, KeyTerms, MemberChange};
use super::ids::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

/// The libp2p protocol name of the sync stream.
pub const PROTOCOL: &str = "/stratus/sync/1";
/// Bumped on any incompatible change to the frames below.
pub const PROTOCOL_VERSION: u16 = 11;
/// The oldest protocol version a relay of this build serves: it accepts a device's `Hello` with
/// a version in `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` and refuses any other with
/// [`ErrorCode::UnsupportedVersion`], its message naming the device's version, the range, and
/// which side to upgrade (see [`version_refusal`]). A relay that keeps an older version in its
/// range speaks it to those devices (today the range is one version: 10 devices cannot decode
/// the account log's `Checkpoint` entries, 9's `CreateAccount` lacks `invite`, 8's `DirectoryEntry` lacks `accepts_you`, and 8 devices take an unproven
/// `SessionRevoked` as proof). `Hello` stays the first variant both ways, and `Error` keeps its
/// place and fields, so that any two versions can refuse each other in words both read
/// (docs/protocol.md, "Versions").
pub const MIN_PROTOCOL_VERSION: u16 = 11;

/// The message of the relay's `Error { code: UnsupportedVersion }` for a device that spoke
/// `version`, when it accepts `min..=max`; `None` when it accepts it.
pub fn version_refusal(version: u16, min: u16, max: u16) -> Option<String> {
    let (side, upgrade) = match version {
        v if v < min => ("older", "upgrade the device's app"),
        v if v > max => ("newer", "upgrade the relay"),
        _ => return None,
    };
    Some(format!("sync protocol {version} is {side} than this relay accepts ({min} to {max}): {upgrade}"))
}

/// Longest frame either side sends or accepts. A longer length prefix is a protocol error and
/// closes the stream (the rest of the stream cannot be trusted to be framed).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Longest sealed delta the relay stores. Larger content (media) goes elsewhere.
pub const MAX_DELTA_BYTES: usize = 64 * 1024;
/// Most deltas in one catch-up page.
pub const MAX_PAGE_DELTAS: u32 = 512;
/// Most sealed bytes in one catch-up page (a page always holds at least one delta).
pub const MAX_PAGE_BYTES: usize = 256 * 1024;
/// Most members a chat may list.
pub const MAX_CHAT_MEMBERS: usize = 1024;

/// A request id, chosen by the device and echoed by the relay.
pub type ReqId = u64;

/// Which life of a relay's store a device talks to, sent in the relay's `Hello`. A device keeps
/// the last one it saw; a different one means the relay's store was restored from a backup (or
/// replaced), so seqs the device has seen may have been given to other deltas since, and the
/// device rewinds to the floors of [`Restored`] (docs/protocol.md, "Restores").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation {
    /// Random, fixed when the store was first made.
    pub store: [u8; 16],
    /// Changed by every restore from a backup (0 until the first); never the same twice for
    /// one store id.
    pub generation: u64,
}

/// What a relay restored from a backup tells a device in `SyncState` (docs/protocol.md,
/// "Restores"): how far its logs are the same as in every earlier incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// Account log entries at or below this seq are the same in every incarnation of the
    /// store; those above it may be new ones at seqs the device already passed.
    pub account_floor: Seq,
    /// The same for each chat of the account that existed when a restore happened; a chat of
    /// the account not listed here was made since (its floor is 0).
    pub chats: Vec<(ChatId, Seq)>,
    /// The highest client seq of this device that the relay holds: the device sends again the
    /// deltas after it that it still has.
    pub client_seq: ClientSeq,
}

/// The kind of a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatKind {
    /// Account-private: only the account's own devices.
    Notes,
    /// Two accounts.
    Direct,
    /// Many accounts.
    Group,
}

/// A delta as the relay stores and sends it: sealed bytes plus what the seal is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The chat.
    pub chat: ChatId,
    /// Position in the chat's log, assigned by the relay.
    pub seq: Seq,
    /// Key epoch it was sealed in.
    pub epoch: Epoch,
    /// Sending device.
    pub device: DeviceId,
    /// The sending device's account, stamped by the relay like `device` (and, like it, bound
    /// by the seal): the receiving devices check that the change touches only what this
    /// account may.
    pub account: AccountId,
    /// Sender's client seq.
    pub client_seq: ClientSeq,
    /// `nonce || ciphertext+tag`.
    pub sealed: Vec<u8>,
}

impl Delta {
    /// What its seal is bound to.
    pub fn ad(&self) -> DeltaAd<'_> {
        DeltaAd {
            chat: self.chat,
            epoch: self.epoch,
            device: &self.device,
            account: self.account,
            client_seq: self.client_seq,
        }
    }
}

/// An entry in an account's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// A device joined the account.
    DeviceAdded {
        /// Its certificate, signed with the account key.
        cert: DeviceCert,
    },
    /// A key of a chat's epoch for this account: at the chat's creation, at each new epoch, and
    /// for earlier epochs shared with a new member.
    ChatAdded {
        /// The chat, kind, epoch and the epoch's members the key was handed out on.
        terms: KeyTerms,
        /// The chat key wrapped to this account, signed by `signer` over `terms`.
        key: WrappedKey,
        /// The member account that handed out the key.
        signer: AccountId,
        /// `signer`'s keys, added by the relay when `signer` is another account (the devices
        /// check them from the account id on, and refuse a chain behind one they saw).
        signer_chain: Option<AccountChain>,
    },
    /// A device's session was ended by another device of the account.
    DeviceRevoked {
        /// The revocation, signed with the account key.
        revocation: Revocation,
    },
    /// A device's session ended because it was inactive longer than the account allows.
    DeviceExpired {
        /// The device.
        device: DeviceId,
        /// Its last activity, ms since the Unix epoch, by the relay's clock.
        last_active_ms: u64,
    },
    /// The account's keys moved to a new generation (after a revocation). The chats' new key
    /// epochs follow as `ChatAdded` entries.
    Rotated {
        /// The rotation, signed by the previous generation, with the bundle for each device.
        rotation: Rotation,
    },
    /// A recovery key was made: its public half, to which devices seal the new bundle at each
    /// rotation.
    RecoverySet {
        /// The recovery key's X25519 public key.
        public: [u8; 32],
        /// The device that made it (if that device's session ends, the recovery is withdrawn).
        by: DeviceId,
        /// The account's signature over account, public key and device.
        signature: Vec<u8>,
    },
    /// A member changed who is in a chat this account is (or was) in: logged to every member
    /// before and after. Until a member's device starts the chat's next key epoch for the new
    /// member list (`Rekey`), the relay stores nothing more under the current one.
    MembersChanged {
        /// The change, signed by the member who made it.
        change: MemberChange,
        /// The keys of the member who made it, when that is another account.
        by_chain: Option<AccountChain>,
    },
    /// A device of the account stated its hash of this log up to a position, signed by the
    /// account (docs/crypto.md, "Account log forks"): every device compares it with its own.
    /// Added in version 11.
    Checkpoint {
        /// The statement.
        checkpoint: super::account_chain::Checkpoint,
    },
}

/// A chat's next key epoch, made at a rotation: the new key wrapped to each member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEpoch {
    /// The chat.
    pub chat: ChatId,
    /// The epoch, one past the chat's newest.
    pub epoch: Epoch,
    /// The key wrapped to each member account, signed by the rotating account's new generation.
    pub keys: Vec<WrappedKey>,
}

/// One session (device) of an account as the relay sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSession {
    /// The device.
    pub device: DeviceId,
    /// When the relay registered it, milliseconds since the Unix epoch (0: before the relay
    /// kept this).
    pub registered_ms: u64,
    /// When the relay last heard from it, milliseconds since the Unix epoch.
    pub last_active_ms: u64,
    /// It has a sync stream open now.
    pub online: bool,
    /// Its session was ended.
    pub revoked: bool,
}

/// An account log entry with its seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountEntry {
    /// Position in the account log.
    pub seq: Seq,
    /// What happened.
    pub event: AccountEvent,
}

/// A chat key wrapped to one member account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The member.
    pub account: AccountId,
    /// The generation of the member's keys whose KEM key it is wrapped to (the relay takes only
    /// the member's current one).
    pub generation: u32,
    /// The epoch's key (true), or only its transport key (false: for a member who joined
    /// without the history; see `ChatKey::transport`).
    pub content: bool,
    /// The key, sealed to that KEM key.
    pub key: SealedBox,
    /// The handing-out account's signature (see `AccountKeys::sign_chat_key`).
    pub signature: Vec<u8>,
}

/// Device → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame on the stream.
    Hello {
        /// [`PROTOCOL_VERSION`] of the device.
        version: u16,
    },
    /// Registers a new account with this device as its first device. `invite`: a token from
    /// the relay's operator, for a relay that takes new accounts only by invitation (it is
    /// used up by the account it makes; see [`InviteToken`]).
    CreateAccount { req: ReqId, account: AccountPublic, cert: DeviceCert, invite: Option<InviteToken> },
    /// A device that is not yet logged in waits for approval under `link_id`
    /// (`blake3` of the link code's one-time secret). Answered by `LinkApproved` when a logged-in
    /// device approves it, or an error.
    LinkWait { req: ReqId, link_id: [u8; 32], device_x25519: [u8; 32], name: String },
    /// A logged-in device asks who waits under `link_id`.
    LinkLookup { req: ReqId, link_id: [u8; 32] },
    /// A logged-in device approves the waiting device.
    LinkApprove { req: ReqId, link_id: [u8; 32], cert: DeviceCert, bundle: SealedBox },
    /// Creates a chat with its first key epoch. It is an outbox item of the device, ordered by
    /// `client_seq` with its appends (a refused creation holds back later appends likewise).
    CreateChat { req: ReqId, chat: ChatId, kind: ChatKind, epoch: Epoch, client_seq: ClientSeq, keys: Vec<WrappedKey> },
    /// Appends a sealed delta to a chat.
    Append { req: ReqId, chat: ChatId, epoch: Epoch, client_seq: ClientSeq, sealed: Vec<u8> },
    /// Asks for the heads of the account log and of every chat of the account.
    SyncState { req: ReqId },
    /// Asks for a chat's deltas after `after`, at most `max` of them.
    FetchChat { req: ReqId, chat: ChatId, after: Seq, max: u32 },
    /// Asks for the account log after `after`, at most `max` entries.
    FetchAccount { req: ReqId, after: Seq, max: u32 },
    /// Asks for the account's sessions; answered with `Devices`.
    ListDevices { req: ReqId },
    /// Ends another device's session and rotates the account's keys: the revocation, the
    /// rotation with the new bundle for every remaining device, a new key epoch for every chat
    /// of the account, and the new bundle sealed to the recovery key if the account has one.
    /// Applied atomically; answered with `Done` once durable, or `StaleEpoch` if it does not
    /// cover the account as it stands (sync and build it again).
    Revoke { req: ReqId, revocation: Revocation, rotation: Rotation, chats: Vec<NewEpoch>, recovery: Option<Vec<u8>> },
    /// Sessions of the account inactive for more than `days` days end (0: never); answered
    /// with `Done` once durable.
    SetSessionTtl { req: ReqId, days: u32 },
    /// Stores the account bundle sealed to a recovery key, filed under the key's lookup id;
    /// replaces the account's earlier one. `public` is the key's X25519 public half, signed by
    /// the account (logged as `RecoverySet`). `Done` once durable.
    PutRecovery { req: ReqId, lookup_id: [u8; 32], public: [u8; 32], signature: Vec<u8>, sealed: Vec<u8> },
    /// A device that is not logged in asks for the sealed bundle filed under `lookup_id`;
    /// answered with `Recovery`. Rate limited relay-wide.
    FetchRecovery { req: ReqId, lookup_id: [u8; 32] },
    /// A device that opened a recovered bundle registers itself with a certificate signed by
    /// the account key; `lookup_id` proves it holds the recovery key too. `Done` once durable.
    Recover { req: ReqId, lookup_id: [u8; 32], cert: DeviceCert },
    /// Rotates the account's keys after a session ended without a rotation (it expired): like
    /// `Revoke` without the revocation, covering every device of the account. Answered `Done`
    /// once durable, also when no rotation is due (another device made it, or no session
    /// ended); `StaleEpoch` if it does not cover the account as it stands.
    Rotate { req: ReqId, rotation: Rotation, chats: Vec<NewEpoch>, recovery: Option<Vec<u8>> },
    /// The user is typing in `chat`. Pushed as `Typing` to the other connected devices of the
    /// chat's members, never stored, never answered (dropped when over the rate limit).
    Typing { chat: ChatId },
    /// Takes `name` as this account's username (releasing its earlier one), or with `None`
    /// releases it. `Done` once durable; `AlreadyExists` if another account has it.
    SetUsername { req: ReqId, name: Option<String> },
    /// Looks an account up by username; answered with `Accounts` (one entry) or `NotFound`.
    Lookup { req: ReqId, username: String },
    /// Looks accounts up by id (at most [`crate::proto::directory::MAX_LOOKUP_ACCOUNTS`]);
    /// answered with `Accounts`, without the ones the relay does not know.
    LookupAccounts { req: ReqId, accounts: Vec<AccountId> },
    /// Changes who is in a direct chat or group (see [`MemberChange`]). `Done` once durable.
    ChangeMembers { req: ReqId, change: MemberChange },
    /// Starts a chat's next key epoch after its members changed: the new key wrapped to every
    /// member, and earlier epochs' keys for the members added with their history. `Done` once
    /// durable, also when no new epoch is due any more (another device made it); `StaleEpoch`
    /// when it does not cover the members as they stand.
    Rekey { req: ReqId, epoch: NewEpoch, history: Vec<NewEpoch> },
    /// The certificates of an account's devices whose sessions have not ended, for a secret
    /// chat with one of them; answered with `AccountDevices`: this account's own devices with
    /// whether each is connected; another account's only if it accepts chats from this one
    /// (see `Accept`) or shares a chat with it, never whether they are connected; empty
    /// otherwise (and for an unknown account).
    AccountDevices { req: ReqId, account: AccountId },
    /// This account accepts chats from `account` (`accept`), or no longer does: a chat creation
    /// or a member addition naming this account is refused (`NotAllowed`) unless this account
    /// accepts the account making it. Answers (and removes) `account`'s invitation, if one
    /// waits. `Done` once durable. Added in protocol version 9.
    Accept { req: ReqId, account: AccountId, accept: bool },
    /// Asks `account` to accept chats from this account: an invitation it sees in
    /// `ListInvitations` until it accepts or declines (`Accept`). `Done` once durable (also
    /// when it accepts already); `TooLarge` when too many wait for it. Added in version 9.
    Invite { req: ReqId, account: AccountId },
    /// The invitations waiting for this account; answered with `Invitations`. Added in
    /// version 9.
    ListInvitations { req: ReqId },
    /// This device's checkpoint of the account log, signed by the account; logged as
    /// `AccountEvent::Checkpoint`, `Done` once durable. Refused with `ProtocolViolation` when it
    /// is not this device's or names a position the log has not reached, `AlreadyExists` when
    /// the log has a checkpoint at or after its position (another device's came first: one
    /// checkpoint per position keeps the log from growing by checkpoints alone), and
    /// `BadCertificate` (or `StaleEpoch`) when the account's keys in force did not sign it.
    /// Added in version 11.
    Checkpoint { req: ReqId, checkpoint: super::account_chain::Checkpoint },
}

/// Relay → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayFrame {
    /// First frame on the stream.
    Hello {
        /// [`PROTOCOL_VERSION`] of the relay.
        version: u16,
        /// The account this device belongs to, if the relay knows the device.
        account: Option<AccountId>,
        /// The life of the relay's store (added in protocol version 8).
        incarnation: Incarnation,
    },
    /// A request succeeded and has nothing else to say.
    Done { req: ReqId },
    /// Who waits under a link id.
    LinkInfo { req: ReqId, device: DeviceId, device_x25519: [u8; 32], name: String },
    /// The waiting device was approved: its certificate and the sealed account bundle.
    LinkApproved { req: ReqId, account: AccountPublic, cert: DeviceCert, bundle: SealedBox },
    /// An append is durable at `seq`.
    Acked { req: ReqId, chat: ChatId, client_seq: ClientSeq, seq: Seq },
    /// An append repeats one stored long ago; it is durable, but its seq is no longer indexed.
    Duplicate { req: ReqId, chat: ChatId, client_seq: ClientSeq },
    /// Durable heads: the account log and each chat of the account; and, from a relay that was
    /// ever restored from a backup, how far its logs match every earlier incarnation's.
    SyncState { req: ReqId, account_head: Seq, chats: Vec<(ChatId, Seq)>, restored: Option<Restored> },
    /// A page of a chat's log. `head` is the chat's durable head when the page was read.
    ChatPage { req: ReqId, chat: ChatId, deltas: Vec<Delta>, head: Seq },
    /// A page of the account log.
    AccountPage { req: ReqId, entries: Vec<AccountEntry>, head: Seq },
    /// A new durable delta in a chat of the account (live push).
    Push { delta: Delta },
    /// A new durable account log entry (live push).
    PushAccount { entry: AccountEntry },
    /// A request failed, or (with `req: None`) the stream is about to close.
    Error { req: Option<ReqId>, code: ErrorCode, message: String },
    /// The request was not carried out because the device is over one of the relay's limits
    /// (its request rate, or its appends or fetches in flight). Nothing changed; send it again
    /// after `retry_after_ms`. An append refused this way makes the relay refuse the device's
    /// later client seqs too, until this one comes again (so that nothing is stored out of
    /// order). Added in protocol version 2; kept last because postcard encodes variant indices.
    RateLimited { req: ReqId, retry_after_ms: u32 },
    /// The account's sessions, and after how many days of inactivity they end (0: never).
    Devices { req: ReqId, devices: Vec<DeviceSession>, session_ttl_days: u32 },
    /// The bundle sealed under a recovery key, and the account it belongs to.
    Recovery { req: ReqId, account: AccountPublic, sealed: Vec<u8> },
    /// Someone is typing in a chat of the account (live push, never stored). Shown for
    /// [`TYPING_SHOWN_MS`] unless another comes.
    Typing { chat: ChatId, account: AccountId, device: DeviceId },
    /// What the directory knows of the accounts asked for.
    Accounts { req: ReqId, accounts: Vec<DirectoryEntry> },
    /// An account's devices: each certificate, and whether it is connected now.
    AccountDevices { req: ReqId, account: AccountId, devices: Vec<(DeviceCert, bool)> },
    /// Pushes to this device were dropped because it fell behind (the relay's queue for it
    /// held too many bytes). These are the durable heads of what it missed: the account log's
    /// and each chat's that had a push dropped. The device fetches past its cursors, as after
    /// `SyncState`. Sent once the queue has drained. Added in protocol version 6.
    Behind { account_head: Seq, chats: Vec<(ChatId, Seq)> },
    /// This device's session ended: the account log entry that ended it (`DeviceRevoked`,
    /// signed by the account, or `DeviceExpired`) and the account's keys through every
    /// generation, so that the device checks it before it deletes anything. Sent before the
    /// `Error { SessionRevoked }` that closes the stream (to a device that connects later, or
    /// once the entry is durable). An `Error { SessionRevoked }` without it proves nothing: the
    /// device stops syncing and keeps its data. Added in protocol version 9.
    SessionEnded { entry: Box<AccountEntry>, chain: Box<AccountChain> },
    /// The accounts waiting for this one to accept chats from them, each with when it asked
    /// (ms since the Unix epoch, the relay's clock), oldest first. Added in protocol version 9.
    Invitations { req: ReqId, from: Vec<(AccountId, u64)> },
}

/// How long a typing indicator is shown after its last `Typing`.
pub const TYPING_SHOWN_MS: u64 = 6_000;

impl ClientFrame {
    /// The request id the frame carries (0 for `Hello`, which has none).
    pub fn req(&self) -> ReqId {
        match self {
            ClientFrame::Hello { .. } | ClientFrame::Typing { .. } => 0,
            ClientFrame::CreateAccount { req, .. }
            | ClientFrame::LinkWait { req, .. }
            | ClientFrame::LinkLookup { req, .. }
            | ClientFrame::LinkApprove { req, .. }
            | ClientFrame::CreateChat { req, .. }
            | ClientFrame::Append { req, .. }
            | ClientFrame::SyncState { req }
            | ClientFrame::FetchChat { req, .. }
            | ClientFrame::FetchAccount { req, .. }
            | ClientFrame::ListDevices { req }
            | ClientFrame::SetSessionTtl { req, .. }
            | ClientFrame::PutRecovery { req, .. }
            | ClientFrame::FetchRecovery { req, .. }
            | ClientFrame::Recover { req, .. }
            | ClientFrame::Rotate { req, .. }
            | ClientFrame::SetUsername { req, .. }
            | ClientFrame::Lookup { req, .. }
            | ClientFrame::LookupAccounts { req, .. }
            | ClientFrame::ChangeMembers { req, .. }
            | ClientFrame::Rekey { req, .. }
            | ClientFrame::AccountDevices { req, .. }
            | ClientFrame::Accept { req, .. }
            | ClientFrame::Invite { req, .. }
            | ClientFrame::ListInvitations { req }
            | ClientFrame::Checkpoint { req, .. }
            | ClientFrame::Revoke { req, .. } => *req,
        }
    }
}

impl RelayFrame {
    /// The request this frame answers, if it answers one.
    pub fn req(&self) -> Option<ReqId> {
        match self {
            RelayFrame::Done { req }
            | RelayFrame::Devices { req, .. }
            | RelayFrame::Recovery { req, .. }
            | RelayFrame::Accounts { req, .. }
            | RelayFrame::AccountDevices { req, .. }
            | RelayFrame::Invitations { req, .. }
            | RelayFrame::LinkInfo { req, .. }
            | RelayFrame::LinkApproved { req, .. }
            | RelayFrame::Acked { req, .. }
            | RelayFrame::Duplicate { req, .. }
            | RelayFrame::SyncState { req, .. }
            | RelayFrame::ChatPage { req, .. }
            | RelayFrame::AccountPage { req, .. }
            | RelayFrame::RateLimited { req, .. } => Some(*req),
            RelayFrame::Error { req, .. } => *req,
            RelayFrame::Hello { .. }
            | RelayFrame::Push { .. }
            | RelayFrame::PushAccount { .. }
            | RelayFrame::Typing { .. }
            | RelayFrame::Behind { .. }
            | RelayFrame::SessionEnded { .. } => None,
        }
    }
}

/// Typed errors the relay returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The first frame's version is not supported; the stream closes.
    UnsupportedVersion,
    /// A frame did not decode; the frame is ignored.
    MalformedFrame,
    /// A frame exceeded [`MAX_FRAME_BYTES`]; the stream closes.
    FrameTooLarge,
    /// The device has no valid certificate on this relay.
    UnknownDevice,
    /// The device's account is not a member of the chat.
    NotMember,
    /// No such chat.
    UnknownChat,
    /// A certificate or account failed verification.
    BadCertificate,
    /// The account, device or chat already exists.
    AlreadyExists,
    /// A delta or field is larger than allowed.
    TooLarge,
    /// Nobody waits under that link id.
    LinkNotFound,
    /// The epoch is not one of the chat's epochs.
    UnknownEpoch,
    /// A request came before `Hello`, or `Hello` came twice.
    ProtocolViolation,
    /// Too many requests; try again later.
    RateLimited,
    /// The relay failed; try again later.
    Internal,
    /// This device's session was ended by another device of its account; the stream closes and
    /// the device is refused from now on.
    SessionRevoked,
    /// The device's own session is too young to end others (see the relay's
    /// `--min-session-age-secs`).
    SessionTooNew,
    /// Nothing is filed under that recovery id.
    RecoveryNotFound,
    /// The account's keys moved on since the request was made (an append sealed under an old
    /// epoch, a chat key or certificate signed by an old generation, a rotation that does not
    /// cover the account as it stands). Nothing changed; the device takes the new keys from the
    /// account log and makes the request again. A refused outbox item holds back the device's
    /// later client seqs, as `RateLimited` does.
    StaleEpoch,
    /// No account has that username, or no such account.
    NotFound,
    /// The account may not do that (remove a member it did not add to a group it did not
    /// create, change the members of a direct chat or notes).
    NotAllowed,
    /// The account has stored as many bytes on the relay as the relay allows one account (its
    /// quota, see the relay's `--max-account-bytes`). Nothing changed; the request is refused
    /// for good (sending it again fails the same way until the operator raises the quota).
    /// Added in protocol version 7; kept last because postcard encodes variant indices.
    QuotaExceeded,
    /// The relay's operator suspended this account: its devices are refused (the stream
    /// closes) until the operator lifts it; what the relay holds of the account is kept.
    /// Added in protocol version 10, like the four codes after it.
    AccountSuspended,
    /// The relay's operator banned this account: its devices are refused, and neither the
    /// account nor its devices may register again on this relay.
    AccountBanned,
    /// The relay's operator deleted this account: what the relay held of it is gone, and its
    /// devices are refused. A new account (from a fresh device) may be made.
    AccountDeleted,
    /// The relay takes no new accounts (its operator closed registration).
    RegistrationClosed,
    /// The relay takes new accounts only with an invite token from its operator, and none
    /// was given, or the one given is unknown or used already.
    InviteRequired,
}

/// A one-time token from a relay's operator that lets one new account register on a relay
/// that takes new accounts only by invitation (`stratus-relay admin invite create`). Written
/// `stratus-invite-` and 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InviteToken(pub [u8; 16]);

impl InviteToken {
    /// How a token's text begins.
    pub const PREFIX: &'static str = "stratus-invite-";

    /// What a relay keeps of a token: its hash, so that a copy of the store does not hold
    /// tokens anyone could still use.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"stratus-invite-token");
        h.update(&self.0);
        *h.finalize().as_bytes()
    }
}

impl std::fmt::Display for InviteToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
    }
}

/// The token's value is a secret: not shown in logs of debug output.
impl std::fmt::Debug for InviteToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InviteToken(..)")
    }
}

/// A text that is not an invite token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an invite token: expected `stratus-invite-` and 32 hex digits, as the relay's operator gave it")]
pub struct BadInviteToken;

impl std::str::FromStr for InviteToken {
    type Err = BadInviteToken;
    fn from_str(s: &str) -> Result<Self, BadInviteToken> {
        let hex_part = s.trim().strip_prefix(Self::PREFIX).ok_or(BadInviteToken)?;
        let bytes = hex::decode(hex_part).map_err(|_| BadInviteToken)?;
        Ok(InviteToken(bytes.try_into().map_err(|_| BadInviteToken)?))
    }
}

/// A frame that failed to encode or decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Longer than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// Not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame body (without the length prefix).
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = postcard::to_allocvec(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a frame body. Never panics; allocation is bounded by the input's length.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    postcard::from_bytes(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let f = ClientFrame::FetchChat { req: 9, chat: ChatId([1; 16]), after: Seq(3), max: 10 };
        assert_eq!(decode::<ClientFrame>(&encode(&f).unwrap()).unwrap(), f);
        assert!(decode::<ClientFrame>(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode::<RelayFrame>(&[]).is_err());
        let r = RelayFrame::RateLimited { req: 3, retry_after_ms: 250 };
        assert_eq!(decode::<RelayFrame>(&encode(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn invite_tokens_print_and_parse_and_their_value_is_not_shown_in_debug_output() {
        let t = InviteToken([0xab; 16]);
        let text = t.to_string();
        assert_eq!(text, format!("stratus-invite-{}", "ab".repeat(16)));
        assert_eq!(text.parse::<InviteToken>(), Ok(t));
        assert_eq!(format!(" {text}\n").parse::<InviteToken>(), Ok(t));
        for bad in ["", "stratus-invite-", "stratus-invite-abab", &"ab".repeat(16), &format!("{text}00")] {
            assert_eq!(bad.parse::<InviteToken>(), Err(BadInviteToken), "{bad:?}");
        }
        assert!(!format!("{t:?}").contains("abab"));
        assert_ne!(t.digest(), InviteToken([0xac; 16]).digest());
    }
}
