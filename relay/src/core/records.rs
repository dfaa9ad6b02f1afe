//! What the relay stores besides deltas, and what it recovers its index from. Part of
//! [`super`]; split out for size.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use stratus_engine::proto::cert::{AccountPublic, DeviceCert};
use stratus_engine::proto::directory::{AccountChain, KeyTerms, MemberChange, SignedGen};
use stratus_engine::proto::wire::{AccountEntry, AccountEvent, ChatKind, Delta, Incarnation, WrappedKey};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, Seq};

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
    /// A new generation of an account's keys (a rotation), signed.
    PutAccountGen(SignedGen),
    /// An account's username taken (or with `None` released).
    PutUsername(AccountId, Option<String>),
    /// A recovery bundle replaced or withdrawn.
    DeleteRecovery([u8; 32]),
    /// An approval kept until the new device has fetched it (see [`ApprovedLink`]).
    PutApprovedLink([u8; 32], ApprovedLink),
    /// The new device has its bundle: the approval is no longer needed.
    DeleteApprovedLink([u8; 32]),
    /// Keys of one of a chat's epochs, each stored as a record of its own under (chat, epoch,
    /// account) and never rewritten with the chat (a later key for the same account and epoch,
    /// such as the whole key after a transport key, replaces it).
    PutChatKeys(ChatId, Epoch, Vec<WrappedKey>),
    /// What an account has stored, in bytes (its quota's count).
    PutUsage(AccountId, u64),
    /// The account log entry that ended a device's session, kept to show the device (see
    /// `RelayFrame::SessionEnded`).
    PutSessionEnd(DeviceId, AccountEntry),
    /// The first account accepts chats from the second (true), or no longer does.
    PutAccepted(AccountId, AccountId, bool),
    /// An invitation to the first account from the second, made at this time (ms), or answered.
    PutInvitation(AccountId, AccountId, Option<u64>),
    /// What the operator decided about an account.
    PutAccountAdmin(AccountId, AccountAdmin),
    /// Who may make an account.
    PutRegistration(Registration),
    /// An invite token's digest, made at this time (ms), or used up (`None`).
    PutInvite([u8; 32], Option<u64>),
    /// A device of a deleted account: its certificate, session state, session end and dedup
    /// index go.
    DeleteDevice(DeviceId),
    /// A chat of a deleted account that no other live account is in: its record, deltas and
    /// keys go.
    DeleteChat(ChatId),
    /// A deleted account's log, settings and usage count go (its public keys stay: see
    /// `core/admin.rs`).
    DeleteAccountData(AccountId),
    /// The deletions a restore left to redo ([`Recovered::redo_deletions`]) are done: the
    /// list goes, in the same transaction as they.
    ForgetRedoDeletions,
}

impl StoreOp {
    /// A deletion, which leaves ranges for the store to empty after its batch.
    pub fn is_deletion(&self) -> bool {
        matches!(self, StoreOp::DeleteDevice(_) | StoreOp::DeleteChat(_) | StoreOp::DeleteAccountData(_))
    }
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

/// What the relay keeps of a chat besides its deltas and its keys. Small and of bounded size
/// (members at most [`stratus_engine::proto::wire::MAX_CHAT_MEMBERS`]): it is rewritten whole on
/// each member change or new epoch, while each epoch's keys are records of their own
/// ([`StoreOp::PutChatKeys`](super::StoreOp::PutChatKeys)), written once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// Its kind.
    pub kind: ChatKind,
    /// The account that created it (of a group, the one that may remove members).
    pub creator: AccountId,
    /// Member accounts.
    pub members: BTreeSet<AccountId>,
    /// Its newest key epoch. Epochs are numbered from 0 without gaps, so the chat has every
    /// epoch up to this one.
    pub newest: Epoch,
    /// `blake3` of the first epoch's keys as the creation carried them (see [`keys_digest`]):
    /// a creation sent again after its reply was lost is recognised by it.
    pub genesis_keys: [u8; 32],
    /// The members changed (or one's keys were rotated) and no new epoch followed yet: nothing
    /// more is stored under the newest one until a member's `Rekey`.
    pub rekey_due: bool,
    /// Members added since the newest epoch: a `Rekey` may hand them earlier epochs' transport
    /// keys (the document needs its whole history).
    pub joining: BTreeSet<AccountId>,
    /// Those of them added with their history: a `Rekey` may hand them earlier epochs' keys
    /// whole.
    pub share_with: BTreeSet<AccountId>,
    /// Member changes since the newest epoch began (a change names how many it follows).
    pub changes: u32,
}

/// What [`ChatRecord::genesis_keys`] holds for a chat created with `keys`.
pub fn keys_digest(keys: &[WrappedKey]) -> [u8; 32] {
    let bytes = postcard::to_allocvec(keys).expect("serializing keys cannot fail");
    *blake3::hash(&bytes).as_bytes()
}

/// An account log entry as the relay stores it: a key chain that `ChatAdded` or
/// `MembersChanged` carries is stored once, in the directory's own records (the account and
/// its rotations), and the entry keeps only how many rotations the chain had then. Chains only
/// grow, so the first that many rotations are the chain the entry was sent with; the store puts
/// it back when it reads the entry. (A handout to a group of 1,024 members would otherwise copy
/// the signer's chain, up to 256 rotations, 1,024 times.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredEvent {
    /// An entry with no chain, stored as it is sent.
    Whole(AccountEvent),
    /// `AccountEvent::ChatAdded`; `signer_rotations` is the length of the chain's rotations.
    ChatAdded { terms: KeyTerms, key: WrappedKey, signer: AccountId, signer_rotations: Option<u32> },
    /// `AccountEvent::MembersChanged`; `by_rotations` likewise.
    MembersChanged { change: MemberChange, by_rotations: Option<u32> },
}

/// A stored chain's rotation count, or `None` when it does not belong to `account` (an entry
/// the core never makes; stored whole so that nothing is lost).
fn rotations_of(chain: &AccountChain, account: AccountId) -> Option<u32> {
    (chain.public.id == account).then(|| u32::try_from(chain.rotations.len()).ok()).flatten()
}

impl StoredEvent {
    /// The stored form of `event`.
    pub fn compact(event: &AccountEvent) -> StoredEvent {
        match event {
            AccountEvent::ChatAdded { terms, key, signer, signer_chain }
                if signer_chain.as_ref().is_none_or(|c| rotations_of(c, *signer).is_some()) =>
            {
                StoredEvent::ChatAdded {
                    terms: terms.clone(),
                    key: key.clone(),
                    signer: *signer,
                    signer_rotations: signer_chain.as_ref().and_then(|c| rotations_of(c, *signer)),
                }
            }
            AccountEvent::MembersChanged { change, by_chain }
                if by_chain.as_ref().is_none_or(|c| rotations_of(c, change.body.by).is_some()) =>
            {
                StoredEvent::MembersChanged {
                    change: change.clone(),
                    by_rotations: by_chain.as_ref().and_then(|c| rotations_of(c, change.body.by)),
                }
            }
            other => StoredEvent::Whole(other.clone()),
        }
    }

    /// The entry as it was sent, given `chain(account, rotations)`: that account's chain with
    /// its first `rotations` rotations (`None` if the store does not have them: damage).
    pub fn expand(self, mut chain: impl FnMut(AccountId, u32) -> Option<AccountChain>) -> Option<AccountEvent> {
        Some(match self {
            StoredEvent::Whole(e) => e,
            StoredEvent::ChatAdded { terms, key, signer, signer_rotations } => {
                let signer_chain = match signer_rotations {
                    Some(n) => Some(chain(signer, n)?),
                    None => None,
                };
                AccountEvent::ChatAdded { terms, key, signer, signer_chain }
            }
            StoredEvent::MembersChanged { change, by_rotations } => {
                let by_chain = match by_rotations {
                    Some(n) => Some(chain(change.body.by, n)?),
                    None => None,
                };
                AccountEvent::MembersChanged { change, by_chain }
            }
        })
    }
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
    /// Per device, its most recent appends (oldest first), up to [`super::DEDUP_WINDOW`].
    pub recent_appends: Vec<(DeviceId, Vec<RecentAppend>)>,
    /// Approvals not yet fetched by their device.
    pub approved_links: Vec<([u8; 32], ApprovedLink)>,
    /// What the relay keeps of each device's session.
    pub device_states: Vec<(DeviceId, DeviceState)>,
    /// Settings the accounts chose.
    pub account_settings: Vec<(AccountId, AccountSettings)>,
    /// Recovery bundles by lookup id.
    pub recoveries: Vec<([u8; 32], RecoveryRecord)>,
    /// The generations of the accounts' keys after the first, signed (in any order).
    pub account_gens: Vec<SignedGen>,
    /// The accounts' usernames.
    pub usernames: Vec<(AccountId, String)>,
    /// What each account has stored, in bytes (see [`crate::limits::Limits::max_account_bytes`]).
    pub usage: Vec<(AccountId, u64)>,
    /// The account log entry that ended each ended session (kept since protocol version 9).
    pub session_ends: Vec<(DeviceId, AccountEntry)>,
    /// `(account, other)`: `account` accepts chats from `other`.
    pub accepted: Vec<(AccountId, AccountId)>,
    /// `(invitee, inviter, at_ms)`: invitations waiting.
    pub invitations: Vec<(AccountId, AccountId, u64)>,
    /// What the operator decided about accounts (see [`AccountAdmin`]).
    pub account_admin: Vec<(AccountId, AccountAdmin)>,
    /// Who may make an account (see [`Registration`]).
    pub registration: Registration,
    /// Invite tokens not yet used: their digests ([`stratus_engine::proto::wire::InviteToken::digest`])
    /// and when they were made (ms).
    pub invites: Vec<([u8; 32], u64)>,
    /// The store's life: its id and how many restores made it (see docs/protocol.md,
    /// "Restores").
    pub incarnation: Incarnation,
    /// After a restore: how far each log is the same in every earlier incarnation.
    pub floors: Floors,
    /// Accounts a restore found deleted in the store it replaced but not in the backup: the
    /// core deletes them again as it starts (see `RelayCore::new`).
    pub redo_deletions: Vec<AccountId>,
}

/// How far each log of a restored store is the same as in every earlier incarnation of it: the
/// lowest head the log had at any restore (written by `stratus-relay restore`, never by the
/// core). Seqs above a floor may have been handed out again since; devices that passed them
/// go back to the floor. Empty for a store never restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Floors {
    /// Per account log.
    pub accounts: BTreeMap<AccountId, Seq>,
    /// Per chat.
    pub chats: BTreeMap<ChatId, Seq>,
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

/// Longest sealed recovery bundle the relay keeps (a bundle with every past generation, sealed).
pub const MAX_RECOVERY_BYTES: usize = stratus_engine::proto::cert::MAX_BUNDLE_BYTES + 1024;
/// Recovery lookups and registrations per peer, per second (and burst): a recovery key has
/// 256 bits, so this guards the relay's work, not the keys. Per peer, not relay-wide, so that
/// no one peer can use up everyone's attempts (a user needs two: the lookup and the
/// registration).
pub const RECOVERY_ATTEMPTS_PER_SECOND: u32 = 1;
pub(super) const RECOVERY_BURST: u32 = 4;

/// What an account chose about its sessions, and whether its keys are due a rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSettings {
    /// Sessions inactive for more than this many days end (0: never).
    pub session_ttl_days: u32,
    /// A session ended without a rotation (it expired): the next `Rotate` is taken. Cleared by
    /// any rotation. (A bound on rotations: an account has at most
    /// [`stratus_engine::proto::cert::MAX_GENERATION`].)
    pub rotation_due: bool,
}

/// Longest session time-to-live an account may set, in days (100 years).
pub const MAX_SESSION_TTL_DAYS: u32 = 36_500;
pub(super) const DAY_MS: u64 = 24 * 3600 * 1000;

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

/// What the relay's operator decided about an account (`stratus-relay admin`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountStatus {
    /// Served.
    #[default]
    Active,
    /// Its devices are refused (`AccountSuspended`) until the operator lifts it; its data is
    /// kept.
    Suspended,
    /// Its devices are refused (`AccountBanned`), and neither the account nor they may register
    /// again; its data is kept until it is deleted.
    Banned,
}

/// The operator's record of an account: its status, its own quota, and whether it was deleted.
/// Accounts the operator never touched have none (the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountAdmin {
    /// Served, suspended or banned.
    pub status: AccountStatus,
    /// Its byte quota in place of the relay's `max_account_bytes` (0: none); `None`: the
    /// relay's.
    pub quota: Option<u64>,
    /// Its data is gone (see `core/admin.rs`); only its public keys are kept, for the members
    /// of the chats it shared, and this record.
    pub deleted: bool,
    /// The devices it had when it was deleted: refused from then on (`AccountDeleted`, or
    /// `AccountBanned` while it is banned).
    pub former_devices: Vec<DeviceId>,
}

/// Who may make an account on the relay (`stratus-relay admin registration`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Registration {
    /// Anyone (the default).
    #[default]
    Open,
    /// Only with an invite token the operator made, each good for one account.
    Invite,
    /// Nobody.
    Closed,
}

impl Registration {
    /// Its name in the admin protocol and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Registration::Open => "open",
            Registration::Invite => "invite",
            Registration::Closed => "closed",
        }
    }
}

impl std::str::FromStr for Registration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Registration::Open),
            "invite" => Ok(Registration::Invite),
            "closed" => Ok(Registration::Closed),
            other => Err(format!("registration is open, invite or closed, not {other:?}")),
        }
    }
}
