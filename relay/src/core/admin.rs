//! The operator's decisions (issue 19, item 4): listing accounts, per-account quotas,
//! suspending, banning and deleting accounts, and who may make one. Asked through
//! `stratus-relay admin` over the admin socket (`crate::admin`), which only parses and
//! forwards; every rule is here. Part of [`RelayCore`].
//!
//! * **Suspend**: the account's devices are refused (`AccountSuspended`): streams open now get
//!   it and are closed, a new one gets it in answer to `Hello`, and recovering a device into it
//!   is refused. Nothing of it is deleted; other accounts' chats with it go on (it gets their
//!   messages once it is back). `unsuspend` lifts it.
//! * **Ban**: the same with `AccountBanned`; besides, the account cannot be made again under
//!   the same keys, and its devices cannot make or join another account here, even after it is
//!   deleted. `unsuspend` lifts a ban too.
//! * **Delete**: its streams are told `AccountDeleted` and closed; its devices (certificates,
//!   session states, dedup index), its account log, settings, usage count, recovery bundle,
//!   username and consent records go, and so does every chat no other live account is in
//!   (its record, deltas and keys). The chats it shares with other accounts stay as they are
//!   for their other members, and it stays listed as a member of them: the members' devices
//!   hold each chat's member list as members signed it, and the relay cannot sign a change
//!   for it. Nothing reaches it any more (it has no devices, and what members hand it out in
//!   its log is not kept), the deltas it wrote there stay as part of the others' history, and
//!   a group's creator can remove it like any member. Its public keys stay too (other
//!   accounts' logs and chats refer to them). Its id is never taken again; its former devices
//!   are refused (`AccountDeleted`). Media does not exist yet (issue 17): there is none to
//!   delete.
//! * **Quota**: the account's own byte quota in place of `--max-account-bytes` (see
//!   `core/quota.rs`), or back to the relay's.
//! * **Registration**: `open` (anyone), `invite` (`CreateAccount` needs an unused invite token
//!   the operator made; it is used up by the account it makes) or `closed`
//!   (`RegistrationClosed`). Linking and recovering devices into existing accounts are not
//!   registration and stay open.
//!
//! Every decision is stored (`StoreOp::PutAccountAdmin`, `PutRegistration`, `PutInvite`, and
//! the deletions) and answered once durable, like every other write.

use std::str::FromStr;

use super::*;

/// The driver's handle on one operator command, echoed in its answer.
pub type AdminId = u64;

/// Most unused invite tokens at once; more are refused until some are used.
pub const MAX_INVITES: usize = 10_000;

/// An account as the operator names it: its id (32 hex digits), or its username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRef {
    /// By id.
    Id(AccountId),
    /// By its username in the directory.
    Username(String),
}

impl FromStr for AccountRef {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<AccountId>() {
            Ok(id) => AccountRef::Id(id),
            Err(_) => AccountRef::Username(s.to_string()),
        })
    }
}

impl std::fmt::Display for AccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountRef::Id(id) => write!(f, "{id}"),
            AccountRef::Username(name) => write!(f, "{name}"),
        }
    }
}

/// What the operator asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// Every account with its devices, storage and last activity.
    Accounts,
    /// Sets the account's byte quota (0: none), or with `None` gives it the relay's again.
    SetQuota { account: AccountRef, bytes: Option<u64> },
    /// Suspends the account.
    Suspend(AccountRef),
    /// Lifts a suspension or a ban.
    Unsuspend(AccountRef),
    /// Bans the account.
    Ban(AccountRef),
    /// Deletes the account (see the module docs).
    Delete(AccountRef),
    /// Sets who may make an account, or with `None` only tells.
    Registration(Option<Registration>),
    /// Makes an invite token (the driver draws `token` at random; the core keeps its digest).
    CreateInvite { token: InviteToken, now_ms: u64 },
    /// Lists the invite tokens not yet used, by id (see [`invite_id`]).
    Invites,
    /// Revokes an unused invite token: no account can be made with it any more.
    RevokeInvite(InviteRef),
}

/// An invite token as the operator names it to revoke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteRef {
    /// By the token itself (its digest: the relay keeps nothing else).
    Digest([u8; 32]),
    /// By the id `admin invite list` shows ([`invite_id`]).
    Id([u8; INVITE_ID_BYTES]),
}

/// Bytes of a token's digest that make its id in listings (16 hex digits).
pub const INVITE_ID_BYTES: usize = 8;

/// How listings name an unused invite token: the first [`INVITE_ID_BYTES`] of its digest (the
/// relay keeps only the digest, so a listing cannot show the token, and the id cannot be used
/// to register).
pub fn invite_id(digest: &[u8; 32]) -> [u8; INVITE_ID_BYTES] {
    let mut id = [0; INVITE_ID_BYTES];
    id.copy_from_slice(&digest[..INVITE_ID_BYTES]);
    id
}

/// An unused invite token, as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InviteView {
    /// Its id ([`invite_id`]).
    pub id: [u8; INVITE_ID_BYTES],
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
}

/// One device of an account, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The device.
    pub device: DeviceId,
    /// The name its certificate gives it.
    pub name: String,
    /// When it was registered, ms since the Unix epoch (0: unknown).
    pub registered_ms: u64,
    /// When it was last heard from, ms since the Unix epoch (0: unknown).
    pub last_active_ms: u64,
    /// It has a sync stream open now.
    pub online: bool,
    /// Its session was ended.
    pub revoked: bool,
}

/// One account, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// The account.
    pub account: AccountId,
    /// Its username, if it has one.
    pub username: Option<String>,
    /// Served, suspended or banned.
    pub status: AccountStatus,
    /// Its data is gone.
    pub deleted: bool,
    /// Its devices (none once deleted).
    pub devices: Vec<DeviceView>,
    /// The chats it is in.
    pub chats: usize,
    /// Bytes it has stored (its quota's count).
    pub stored_bytes: u64,
    /// Its quota in bytes (0: none), its own or the relay's.
    pub quota_bytes: u64,
    /// The quota is its own (set with `SetQuota`), not the relay's.
    pub own_quota: bool,
    /// The latest activity of any of its devices, ms since the Unix epoch (0: unknown).
    pub last_active_ms: u64,
}

/// What a deletion removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteReport {
    /// The account.
    pub account: AccountId,
    /// Its devices, gone.
    pub devices: usize,
    /// Its chats that no other live account was in, gone with their logs.
    pub chats_deleted: usize,
    /// The deltas those chats held.
    pub deltas_deleted: u64,
    /// Its chats with other accounts, kept for them.
    pub chats_kept: usize,
}

/// The answer to an operator's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAnswer {
    /// Every account, by id.
    Accounts(Vec<AccountView>),
    /// The account as the command left it.
    Account(AccountView),
    /// What a deletion removed.
    Deleted(DeleteReport),
    /// Who may make an account, and how many invite tokens wait to be used.
    Registration { mode: Registration, invites: usize },
    /// A new invite token, and who may make an account now.
    Invite { token: InviteToken, mode: Registration },
    /// The unused invite tokens (oldest first), and who may make an account now.
    Invites { invites: Vec<InviteView>, mode: Registration },
    /// An invite token revoked, and how many are left.
    InviteRevoked { id: [u8; INVITE_ID_BYTES], invites: usize },
}

/// Why an operator's command was refused (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusalCode {
    /// No such account (by id or username).
    UnknownAccount,
    /// The account was deleted: there is nothing to change but its ban.
    AccountDeleted,
    /// Too many unused invite tokens.
    TooManyInvites,
    /// No unused invite token is that one (never made, used already, or revoked).
    UnknownInvite,
    /// The relay's disk is full: it writes nothing more until restarted.
    StorageFull,
}

impl AdminRefusalCode {
    /// Its name in the admin protocol.
    pub fn name(self) -> &'static str {
        match self {
            AdminRefusalCode::UnknownAccount => "unknown_account",
            AdminRefusalCode::AccountDeleted => "account_deleted",
            AdminRefusalCode::TooManyInvites => "too_many_invites",
            AdminRefusalCode::UnknownInvite => "unknown_invite",
            AdminRefusalCode::StorageFull => "storage_full",
        }
    }
}

/// A refused command: a code and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminRefusal {
    /// The kind of refusal.
    pub code: AdminRefusalCode,
    /// What happened, for the operator.
    pub message: String,
}

impl AdminRefusal {
    fn new(code: AdminRefusalCode, message: impl Into<String>) -> Self {
        AdminRefusal { code, message: message.into() }
    }

    pub(super) fn storage_full() -> Self {
        Self::new(
            AdminRefusalCode::StorageFull,
            "the relay's disk is full: it stores nothing more until space is freed and it is restarted",
        )
    }
}

/// What a banned account's devices and creations are told.
pub(super) fn banned_message(account: AccountId) -> String {
    format!("account {account} is banned from this relay by its operator")
}

impl RelayCore {
    /// Carries out an operator's command (see the module docs). Answered once everything
    /// written so far is durable, like a device's request; with the disk full, what only
    /// reads is answered at once and the rest refused.
    pub(super) fn admin(&mut self, id: AdminId, command: AdminCommand, out: &mut Vec<Effect>) {
        let answer = match command {
            AdminCommand::Accounts => {
                let online = self.online();
                Ok(AdminAnswer::Accounts(self.accounts.keys().map(|a| self.view(*a, &online)).collect()))
            }
            AdminCommand::Registration(None) => {
                Ok(AdminAnswer::Registration { mode: self.registration, invites: self.invites.len() })
            }
            AdminCommand::Invites => {
                let mut invites: Vec<InviteView> = self
                    .invites
                    .iter()
                    .map(|(digest, at)| InviteView { id: invite_id(digest), created_ms: *at })
                    .collect();
                invites.sort_by_key(|i| (i.created_ms, i.id));
                Ok(AdminAnswer::Invites { invites, mode: self.registration })
            }
            _ if self.storage_failed => Err(AdminRefusal::storage_full()),
            command => {
                let mut ops = Vec::new();
                let answer = self.admin_write(command, &mut ops, out);
                if !ops.is_empty() {
                    let token = self.token();
                    out.push(Effect::Write { token, ops });
                }
                answer
            }
        };
        match answer {
            Ok(answer) if !self.storage_failed => self.after_durable(Deferred::Admin(id, answer), out),
            answer => out.push(Effect::Admin { id, answer }),
        }
    }

    /// A command that changes something: its writes go into `ops` (none when nothing changes).
    fn admin_write(
        &mut self,
        command: AdminCommand,
        ops: &mut Vec<StoreOp>,
        out: &mut Vec<Effect>,
    ) -> Result<AdminAnswer, AdminRefusal> {
        match command {
            AdminCommand::Accounts | AdminCommand::Registration(None) | AdminCommand::Invites => {
                unreachable!("answered by the caller")
            }
            AdminCommand::SetQuota { account, bytes } => {
                let id = self.resolve(&account, false)?;
                let a = self.accounts.get_mut(&id).expect("resolved");
                if a.admin.quota != bytes {
                    a.admin.quota = bytes;
                    ops.push(StoreOp::PutAccountAdmin(id, a.admin.clone()));
                }
                Ok(AdminAnswer::Account(self.view(id, &self.online())))
            }
            AdminCommand::Suspend(account) => self.set_status(account, AccountStatus::Suspended, ops, out),
            AdminCommand::Ban(account) => self.set_status(account, AccountStatus::Banned, ops, out),
            AdminCommand::Unsuspend(account) => self.set_status(account, AccountStatus::Active, ops, out),
            AdminCommand::Delete(account) => {
                let id = self.resolve(&account, false)?;
                Ok(AdminAnswer::Deleted(self.delete_account(id, ops, out)))
            }
            AdminCommand::Registration(Some(mode)) => {
                if self.registration != mode {
                    self.registration = mode;
                    ops.push(StoreOp::PutRegistration(mode));
                }
                Ok(AdminAnswer::Registration { mode, invites: self.invites.len() })
            }
            AdminCommand::CreateInvite { token, now_ms } => {
                if self.invites.len() >= MAX_INVITES {
                    return Err(AdminRefusal::new(
                        AdminRefusalCode::TooManyInvites,
                        format!("{MAX_INVITES} invite tokens wait to be used already"),
                    ));
                }
                let digest = token.digest();
                self.invites.insert(digest, now_ms);
                ops.push(StoreOp::PutInvite(digest, Some(now_ms)));
                Ok(AdminAnswer::Invite { token, mode: self.registration })
            }
            AdminCommand::RevokeInvite(which) => {
                let found: Vec<[u8; 32]> = match which {
                    InviteRef::Digest(d) => self.invites.contains_key(&d).then_some(d).into_iter().collect(),
                    InviteRef::Id(id) => self.invites.keys().filter(|d| invite_id(d) == id).copied().collect(),
                };
                // Two tokens whose digests share their first 8 bytes would take ~2^32 tokens;
                // the full token still names either.
                let [digest] = found[..] else {
                    return Err(AdminRefusal::new(
                        AdminRefusalCode::UnknownInvite,
                        "no unused invite token is that one (never made here, used already, or revoked); \
                         `stratus-relay admin invite list` shows the unused ones",
                    ));
                };
                self.invites.remove(&digest);
                ops.push(StoreOp::PutInvite(digest, None));
                Ok(AdminAnswer::InviteRevoked { id: invite_id(&digest), invites: self.invites.len() })
            }
        }
    }

    /// The account the operator named; a deleted one only when `deleted_too`.
    fn resolve(&self, account: &AccountRef, deleted_too: bool) -> Result<AccountId, AdminRefusal> {
        let id = match account {
            // (A username that looks like an id is taken as one only when no account has it.)
            AccountRef::Id(id) => Some(*id)
                .filter(|id| self.accounts.contains_key(id))
                .or_else(|| self.usernames.get(&id.to_string()).copied()),
            AccountRef::Username(name) => self.usernames.get(name).copied(),
        };
        let Some(id) = id else {
            return Err(AdminRefusal::new(
                AdminRefusalCode::UnknownAccount,
                format!("no account {account} on this relay (name it by its id or username; see `admin accounts`)"),
            ));
        };
        if !deleted_too && self.accounts[&id].admin.deleted {
            return Err(AdminRefusal::new(AdminRefusalCode::AccountDeleted, format!("account {id} was deleted")));
        }
        Ok(id)
    }

    fn set_status(
        &mut self,
        account: AccountRef,
        status: AccountStatus,
        ops: &mut Vec<StoreOp>,
        out: &mut Vec<Effect>,
    ) -> Result<AdminAnswer, AdminRefusal> {
        // A deleted account keeps a status only for its former devices: it can be banned (or
        // the ban lifted) still, not suspended.
        let deleted_too = status != AccountStatus::Suspended;
        let id = self.resolve(&account, deleted_too)?;
        let a = self.accounts.get_mut(&id).expect("resolved");
        if a.admin.status != status {
            a.admin.status = status;
            ops.push(StoreOp::PutAccountAdmin(id, a.admin.clone()));
        }
        if let Some((code, message)) = self.account_refusal(id) {
            let devices = self.accounts[&id].devices.clone();
            self.refuse_devices(&devices, code, &message, out);
        }
        Ok(AdminAnswer::Account(self.view(id, &self.online())))
    }

    /// Deletes `account` (see the module docs) into `ops`.
    fn delete_account(&mut self, account: AccountId, ops: &mut Vec<StoreOp>, out: &mut Vec<Effect>) -> DeleteReport {
        let devices = self.accounts[&account].devices.clone();
        let message = format!("account {account} was deleted from this relay by its operator");
        self.refuse_devices(&devices, ErrorCode::AccountDeleted, &message, out);
        let mut report =
            DeleteReport { account, devices: devices.len(), chats_deleted: 0, deltas_deleted: 0, chats_kept: 0 };

        // Chats: those no other live account is in go with their logs; the others stay.
        for chat in self.accounts[&account].chats.clone() {
            let Some(c) = self.chats.get(&chat) else { continue };
            let alone = c.record.members.iter().all(|m| *m == account || !self.is_live(m));
            if !alone {
                report.chats_kept += 1;
                continue;
            }
            let c = self.chats.remove(&chat).expect("checked above");
            report.chats_deleted += 1;
            report.deltas_deleted += c.head.0;
            for m in &c.record.members {
                if let Some(a) = self.accounts.get_mut(m) {
                    a.chats.remove(&chat);
                }
            }
            ops.push(StoreOp::DeleteChat(chat));
        }

        // Devices, and approvals a new device of it had not fetched yet.
        for d in &devices {
            self.devices.remove(d);
            self.former_devices.insert(d.clone(), account);
            ops.push(StoreOp::DeleteDevice(d.clone()));
        }
        let approvals: Vec<[u8; 32]> =
            self.approved.iter().filter(|(_, l)| l.account.id == account).map(|(id, _)| *id).collect();
        for id in approvals {
            self.approved.remove(&id);
            ops.push(StoreOp::DeleteApprovedLink(id));
        }

        // Consent records both ways.
        for (other, b) in self.accounts.iter_mut().filter(|(id, _)| **id != account) {
            if b.accepts.remove(&account) {
                ops.push(StoreOp::PutAccepted(*other, account, false));
            }
            if b.invitations.remove(&account).is_some() {
                ops.push(StoreOp::PutInvitation(*other, account, None));
            }
        }

        let a = self.accounts.get_mut(&account).expect("the caller resolved it");
        for other in std::mem::take(&mut a.accepts) {
            ops.push(StoreOp::PutAccepted(account, other, false));
        }
        for inviter in std::mem::take(&mut a.invitations).into_keys() {
            ops.push(StoreOp::PutInvitation(account, inviter, None));
        }
        if let Some(id) = a.recovery.take() {
            self.recoveries.remove(&id);
            ops.push(StoreOp::DeleteRecovery(id));
        }
        if let Some(name) = a.username.take() {
            self.usernames.remove(&name);
            ops.push(StoreOp::PutUsername(account, None));
        }
        a.devices.clear();
        a.settings = AccountSettings::default();
        a.stored_bytes = 0;
        a.log_head = Seq(0);
        a.log_durable = Seq(0);
        a.admin.deleted = true;
        a.admin.quota = None;
        a.admin.former_devices = devices.into_iter().collect();
        ops.push(StoreOp::DeleteAccountData(account));
        ops.push(StoreOp::PutAccountAdmin(account, a.admin.clone()));
        report
    }

    /// Deletes again, as the core starts, the accounts a restore found deleted after its backup
    /// (see [`Recovered::redo_deletions`]), so that their devices are refused from the first
    /// frame on. The writes, and forgetting the list with them, go out with the first input's
    /// effects ([`RelayCore::startup_writes`]); until they are durable the store keeps the list,
    /// and a crash meanwhile deletes them again at the next start.
    pub(super) fn redo_deletions(&mut self, accounts: Vec<AccountId>) {
        if accounts.is_empty() {
            return;
        }
        // No stream is open yet: nothing to refuse.
        let (mut ops, mut refusals) = (Vec::new(), Vec::new());
        for account in accounts {
            if self.is_live(&account) {
                self.delete_account(account, &mut ops, &mut refusals);
            }
        }
        ops.push(StoreOp::ForgetRedoDeletions);
        self.startup_ops = ops;
    }

    /// Emits what the core wrote as it started, once.
    pub(super) fn startup_writes(&mut self, out: &mut Vec<Effect>) {
        if !self.startup_ops.is_empty() {
            let token = self.token();
            out.push(Effect::Write { token, ops: std::mem::take(&mut self.startup_ops) });
        }
    }

    /// Tells every stream of `devices` why it is refused, and closes it.
    fn refuse_devices(&mut self, devices: &BTreeSet<DeviceId>, code: ErrorCode, message: &str, out: &mut Vec<Effect>) {
        let conns: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| devices.contains(&c.device)).map(|(id, _)| *id).collect();
        for conn in conns {
            self.refuse_stream(conn, code, message.to_string(), out);
        }
    }

    /// Tells a stream why its device is refused and closes it: nothing more is sent to it,
    /// and what it still sends is dropped (until the driver reports it closed).
    pub(super) fn refuse_stream(&mut self, conn: ConnId, code: ErrorCode, message: String, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.refused) else { return };
        c.refused = true;
        self.detach(conn);
        out.push(error_frame(conn, None, code, message));
        out.push(Effect::Close { conn });
    }

    /// Why the operator refuses `device` (its account suspended, banned or deleted), if it does.
    pub(super) fn refusal_of(&self, device: &DeviceId) -> Option<(ErrorCode, String)> {
        let account = match self.devices.get(device) {
            Some(d) => d.account,
            None => *self.former_devices.get(device)?,
        };
        self.account_refusal(account)
    }

    /// Why the operator refuses `account`'s devices, if it does.
    pub(super) fn account_refusal(&self, account: AccountId) -> Option<(ErrorCode, String)> {
        let a = self.accounts.get(&account)?;
        match (a.admin.status, a.admin.deleted) {
            (AccountStatus::Banned, _) => Some((ErrorCode::AccountBanned, banned_message(account))),
            (_, true) => Some((
                ErrorCode::AccountDeleted,
                format!("account {account} was deleted from this relay by its operator"),
            )),
            (AccountStatus::Suspended, false) => Some((
                ErrorCode::AccountSuspended,
                format!(
                    "account {account} is suspended by this relay's operator; what the relay holds of it is kept, ask \
                     the operator"
                ),
            )),
            (AccountStatus::Active, false) => None,
        }
    }

    /// Whether `account` exists and was not deleted.
    pub(super) fn is_live(&self, account: &AccountId) -> bool {
        self.accounts.get(account).is_some_and(|a| !a.admin.deleted)
    }

    /// Refuses a `CreateAccount` the registration setting does not allow; returns the digest
    /// of the invite token it uses up, if it needs one.
    pub(super) fn check_registration(
        &self,
        invite: Option<InviteToken>,
    ) -> Result<Option<[u8; 32]>, (ErrorCode, String)> {
        match self.registration {
            Registration::Open => Ok(None),
            Registration::Closed => Err((
                ErrorCode::RegistrationClosed,
                "this relay takes no new accounts: its operator closed registration".into(),
            )),
            Registration::Invite => match invite.map(|t| t.digest()) {
                Some(digest) if self.invites.contains_key(&digest) => Ok(Some(digest)),
                Some(_) => Err((
                    ErrorCode::InviteRequired,
                    "this invite token is not one this relay's operator made, or it was used already".into(),
                )),
                None => Err((
                    ErrorCode::InviteRequired,
                    "this relay takes new accounts only with an invite token from its operator".into(),
                )),
            },
        }
    }

    /// The devices the relay serves now: registered, not revoked, and of an account the
    /// operator does not refuse (the driver lets only these use its circuits).
    pub fn served_devices(&self) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|(_, d)| !d.state.revoked && self.account_refusal(d.account).is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The devices with a stream open.
    fn online(&self) -> BTreeSet<&DeviceId> {
        self.conns.values().map(|c| &c.device).collect()
    }

    fn view(&self, account: AccountId, online: &BTreeSet<&DeviceId>) -> AccountView {
        let a = &self.accounts[&account];
        let devices: Vec<DeviceView> = a
            .devices
            .iter()
            .filter_map(|d| self.devices.get(d).map(|s| (d, s)))
            .map(|(d, s)| DeviceView {
                device: d.clone(),
                name: s.cert.body.name.clone(),
                registered_ms: s.state.registered_ms,
                last_active_ms: s.state.last_active_ms,
                online: !s.state.revoked && online.contains(d),
                revoked: s.state.revoked,
            })
            .collect();
        AccountView {
            account,
            username: a.username.clone(),
            status: a.admin.status,
            deleted: a.admin.deleted,
            last_active_ms: devices.iter().map(|d| d.last_active_ms).max().unwrap_or(0),
            devices,
            chats: a.chats.len(),
            stored_bytes: a.stored_bytes,
            quota_bytes: a.admin.quota.unwrap_or(self.limits.max_account_bytes),
            own_quota: a.admin.quota.is_some(),
        }
    }
}
