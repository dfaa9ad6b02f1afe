//! The relay's local admin socket, `<data dir>/admin.sock` (or the `admin_socket` setting):
//! owner-only operations on the running relay, asked by `stratus-relay admin …` and
//! `stratus-relay backup` from the same machine (the client side is `admin/client.rs`).
//!
//! Owner-only: the socket is bound inside a directory only this user can enter, made 0600 there
//! and moved into place, and every connection's peer user (`SO_PEERCRED`) must be the relay's
//! own ([`admit`]); another user's connection (root's included, which file modes do not stop)
//! gets the error `not_owner` and is closed, nothing done. At most [`MAX_CLIENTS`] connections
//! are served at once; more get `busy`.
//!
//! Protocol (docs/self-hosting.md, "Administration"): one request per connection, one line of
//! JSON of at most [`MAX_REQUEST_BYTES`] bytes, sent within [`REQUEST_TIMEOUT`]:
//! `{"command": "accounts"}`, `{"command": "suspend", "account": "<id or username>"}`, … (see
//! [`Request`]). The answer is one line: `{"ok": true, "result": {…}}` or `{"ok": false,
//! "error": {"code": "…", "message": "…"}}`. This module only parses and forwards: every
//! decision about accounts and registration is the core's (`core/admin.rs`), carried out by the
//! core task and answered once durable; a backup is copied beside the running core task, which
//! pauses between two batches of writes only to seal it (`server/backup.rs`).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use stratus_engine::proto::owner_socket::bind_owner_only;
use stratus_engine::proto::wire::{Incarnation, InviteToken};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::core::{
    AccountRef, AccountStatus, AccountView, AdminAnswer, AdminCommand, AdminRefusal, DeleteReport, InviteRef,
    InviteView, Registration, INVITE_ID_BYTES,
};

pub mod client;

/// Longest request line, in bytes (its newline not counted).
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Most admin connections served at once.
pub const MAX_CLIENTS: usize = 4;
/// How long a connection has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The socket's file name in the data directory, unless `admin_socket` says otherwise.
pub const SOCKET_NAME: &str = "admin.sock";

/// Every command the socket knows.
pub const COMMANDS: [&str; 11] = [
    "accounts",
    "quota",
    "suspend",
    "unsuspend",
    "ban",
    "delete",
    "registration",
    "invite_create",
    "invite_list",
    "invite_revoke",
    "backup",
];

/// A request the admin socket hands to the core task.
pub enum AdminRequest {
    /// Copy the store into this new or empty directory, as durable when the copy is sealed.
    Backup { to: PathBuf, reply: oneshot::Sender<Result<Incarnation, String>> },
    /// An operator's command for the core.
    Command { command: AdminCommand, reply: oneshot::Sender<Result<AdminAnswer, AdminRefusal>> },
}

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Another relay answers on the socket.
    #[error("another relay already runs with this admin socket ({0} answers)")]
    InUse(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// A request refused before or instead of being carried out: a code (see the module docs and
/// docs/self-hosting.md) and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `malformed_request`, `unknown_command`, `request_too_large`, `invalid_argument`,
    /// `not_owner`, `busy`, `stopping`, `backup_failed`, or the core's codes
    /// (`unknown_account`, `account_deleted`, `too_many_invites`, `storage_full`).
    pub code: &'static str,
    /// For the operator.
    pub message: String,
}

impl Refused {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refused { code, message: message.into() }
    }

    /// The answer line (without its newline).
    pub fn line(&self) -> String {
        json!({ "ok": false, "error": { "code": self.code, "message": self.message } }).to_string()
    }
}

impl From<AdminRefusal> for Refused {
    fn from(r: AdminRefusal) -> Self {
        Refused::new(r.code.name(), r.message)
    }
}

/// Lets a connection in only from the relay's own user: `peer` is the connecting process's
/// uid as the kernel reports it (`SO_PEERCRED`; `None` when it could not be read), `own` the
/// relay's.
pub fn admit(peer: Option<u32>, own: u32) -> Result<(), Refused> {
    match peer {
        Some(uid) if uid == own => Ok(()),
        Some(uid) => Err(Refused::new(
            "not_owner",
            format!("only the relay's own user (uid {own}) may use its admin socket; this is uid {uid}"),
        )),
        None => Err(Refused::new("not_owner", "cannot tell which user connected; refused")),
    }
}

/// A request, as the socket takes it (`{"command": "…", …}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every account with its devices, storage and last activity.
    Accounts,
    /// Sets an account's byte quota: a number (0: none), or `null` for the relay's
    /// `max_account_bytes` again.
    Quota {
        account: String,
        #[serde(deserialize_with = "Option::deserialize")]
        bytes: Option<u64>,
    },
    /// Suspends an account (by id or username).
    Suspend { account: String },
    /// Lifts an account's suspension or ban.
    Unsuspend { account: String },
    /// Bans an account.
    Ban { account: String },
    /// Deletes an account.
    Delete { account: String },
    /// Sets who may make an account (`open`, `invite`, `closed`), or without `mode` tells.
    Registration {
        #[serde(default)]
        mode: Option<String>,
    },
    /// Makes an invite token.
    InviteCreate,
    /// Lists the unused invite tokens by id.
    InviteList,
    /// Revokes an unused invite token, named by itself (`stratus-invite-…`) or by its id.
    InviteRevoke { invite: String },
    /// Copies the store into `to`, an absolute path to a new or empty directory.
    Backup { to: PathBuf },
}

/// Parses a request line: not JSON or not an object is `malformed_request`, a command the
/// socket does not know `unknown_command`, wrong or missing arguments `malformed_request`.
pub fn parse(line: &str) -> Result<Request, Refused> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| Refused::new("malformed_request", format!("not JSON: {e}")))?;
    let Some(command) = value.as_object().map(|o| o.get("command")) else {
        return Err(Refused::new("malformed_request", "a request is a JSON object with a \"command\""));
    };
    let Some(command) = command.and_then(Value::as_str).map(str::to_string) else {
        return Err(Refused::new("malformed_request", "a request names its \"command\" as a string"));
    };
    if !COMMANDS.contains(&command.as_str()) {
        return Err(Refused::new(
            "unknown_command",
            format!("unknown command {command:?}; this relay knows: {}", COMMANDS.join(", ")),
        ));
    }
    serde_json::from_value(value).map_err(|e| Refused::new("malformed_request", format!("{command}: {e}")))
}

/// The bound admin socket; removes its file when dropped.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
    uid: u32,
}

impl AdminSocket {
    /// Binds the socket at `path`. A file already there is removed only when nothing answers
    /// on it (left by a relay that was killed).
    pub async fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        let fail = |e: std::io::Error| AdminError::Bind(path.to_path_buf(), e);
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if UnixStream::connect(path).await.is_ok() {
                return Err(AdminError::InUse(path.to_path_buf()));
            }
            if !meta.file_type().is_socket() {
                return Err(fail(std::io::Error::other("a file that is not a socket is in the way; remove it")));
            }
            std::fs::remove_file(path).map_err(fail)?;
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let staging = dir.join(format!(".admin-sock.{}", std::process::id()));
        let listener = bind_owner_only(path, &staging).and_then(UnixListener::from_std).map_err(fail)?;
        let inode = std::fs::metadata(path).map_err(fail)?.ino();
        let (a, _b) = UnixStream::pair().map_err(fail)?;
        let uid = a.peer_cred().map_err(fail)?.uid();
        Ok(AdminSocket { listener, path: path.to_path_buf(), inode, uid })
    }

    /// Serves requests until the task is dropped, handing each to the core task on `core`;
    /// backups copy the identity key from `data_dir`.
    pub async fn serve(self, core: mpsc::Sender<AdminRequest>, data_dir: PathBuf) {
        let busy = Arc::new(AtomicUsize::new(0));
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else { continue };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            if let Err(refused) = admit(uid, self.uid) {
                tracing::warn!(?uid, "admin socket: refused a connection from another user");
                let _ = stream.write_all(format!("{}\n", refused.line()).as_bytes()).await;
                continue;
            }
            if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
                let refused = Refused::new("busy", "too many admin connections; try again");
                let _ = stream.write_all(format!("{}\n", refused.line()).as_bytes()).await;
                continue;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            let (core, busy, data_dir) = (core.clone(), busy.clone(), data_dir.clone());
            tokio::spawn(async move {
                let answer = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut stream)).await {
                    Ok(Ok(line)) => match parse(&line) {
                        Ok(request) => handle(request, &data_dir, &core).await,
                        Err(e) => Err(e),
                    },
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Refused::new("malformed_request", "no request line within 10 s")),
                };
                let line = match answer {
                    Ok(result) => json!({ "ok": true, "result": result }).to_string(),
                    Err(e) => {
                        tracing::info!(code = e.code, message = %e.message, "admin request refused");
                        e.line()
                    }
                };
                let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
                busy.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The request line: up to a newline, or the end of the stream.
async fn read_line(stream: &mut UnixStream) -> Result<String, Refused> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_BYTES as u64 + 1);
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Refused::new("malformed_request", format!("reading the request: {e}")))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.len() > MAX_REQUEST_BYTES {
        return Err(Refused::new(
            "request_too_large",
            format!("a request is one line of at most {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    String::from_utf8(line).map_err(|_| Refused::new("malformed_request", "the request is not UTF-8"))
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

fn stopping<T>(_: T) -> Refused {
    Refused::new("stopping", "the relay is stopping")
}

/// Carries out a parsed request: the core decides, this only forwards.
async fn handle(request: Request, data_dir: &Path, core: &mpsc::Sender<AdminRequest>) -> Result<Value, Refused> {
    let account = |a: &str| a.parse::<AccountRef>().unwrap_or_else(|never| match never {});
    let command = match request {
        Request::Backup { to } => return backup(to, data_dir, core).await,
        Request::Accounts => AdminCommand::Accounts,
        Request::Quota { account: a, bytes } => AdminCommand::SetQuota { account: account(&a), bytes },
        Request::Suspend { account: a } => AdminCommand::Suspend(account(&a)),
        Request::Unsuspend { account: a } => AdminCommand::Unsuspend(account(&a)),
        Request::Ban { account: a } => AdminCommand::Ban(account(&a)),
        Request::Delete { account: a } => AdminCommand::Delete(account(&a)),
        Request::Registration { mode } => AdminCommand::Registration(match mode {
            Some(m) => Some(m.parse::<Registration>().map_err(|e| Refused::new("invalid_argument", e))?),
            None => None,
        }),
        Request::InviteCreate => AdminCommand::CreateInvite { token: InviteToken(rand::random()), now_ms: now_ms() },
        Request::InviteList => AdminCommand::Invites,
        Request::InviteRevoke { invite } => AdminCommand::RevokeInvite(invite_ref(&invite)?),
    };
    let (reply, answer) = oneshot::channel();
    core.send(AdminRequest::Command { command, reply }).await.map_err(stopping)?;
    Ok(answer_json(answer.await.map_err(stopping)??))
}

async fn backup(to: PathBuf, data_dir: &Path, core: &mpsc::Sender<AdminRequest>) -> Result<Value, Refused> {
    let failed = |m: String| Refused::new("backup_failed", m);
    if !to.is_absolute() {
        return Err(Refused::new("invalid_argument", "backup needs an absolute directory"));
    }
    // The relay's identity goes first (it never changes); the store's manifest, written last,
    // marks the backup complete.
    std::fs::create_dir_all(&to).map_err(|e| failed(format!("cannot create {}: {e}", to.display())))?;
    if std::fs::read_dir(&to).map_err(|e| failed(e.to_string()))?.next().is_some() {
        return Err(failed(format!("{} is not empty; back up into a new or empty directory", to.display())));
    }
    let key = data_dir.join("identity.key");
    copy_synced(&key, &to.join("identity.key")).map_err(|e| failed(format!("copying {}: {e}", key.display())))?;
    let (reply, answer) = oneshot::channel();
    core.send(AdminRequest::Backup { to: to.clone(), reply }).await.map_err(stopping)?;
    match answer.await.map_err(stopping)? {
        Ok(inc) => Ok(json!({ "store": hex(&inc.store), "generation": inc.generation })),
        Err(e) => {
            // The directory goes back to empty, ready for the next backup: the identity copied
            // above, and the store's copy (its thread may still hold it; removing it under the
            // thread only makes the thread fail, and it removes nothing else).
            let _ = std::fs::remove_file(to.join("identity.key"));
            let _ = std::fs::remove_dir_all(to.join(crate::store::PARTIAL));
            Err(failed(e))
        }
    }
}

/// An invite token named by itself or by its id (16 hex digits, as `invite list` shows it).
fn invite_ref(s: &str) -> Result<InviteRef, Refused> {
    let s = s.trim();
    if s.starts_with(InviteToken::PREFIX) {
        let token = s.parse::<InviteToken>().map_err(|e| Refused::new("invalid_argument", e.to_string()))?;
        return Ok(InviteRef::Digest(token.digest()));
    }
    let mut id = [0u8; INVITE_ID_BYTES];
    let ok = s.len() == 2 * INVITE_ID_BYTES
        && s.is_ascii()
        && id.iter_mut().enumerate().all(|(i, b)| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map(|v| *b = v).is_ok());
    match ok {
        true => Ok(InviteRef::Id(id)),
        false => Err(Refused::new(
            "invalid_argument",
            format!(
                "{s:?} names no invite token: give the token (`stratus-invite-…`) or its id ({} hex digits, as \
                 `invite list` shows it)",
                2 * INVITE_ID_BYTES
            ),
        )),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn status_name(s: AccountStatus) -> &'static str {
    match s {
        AccountStatus::Active => "active",
        AccountStatus::Suspended => "suspended",
        AccountStatus::Banned => "banned",
    }
}

/// An account as the socket shows it.
fn account_json(a: &AccountView) -> Value {
    json!({
        "account": a.account.to_string(),
        "username": a.username,
        "status": status_name(a.status),
        "deleted": a.deleted,
        "devices": a.devices.iter().map(|d| json!({
            "device": d.device.0,
            "name": d.name,
            "registered_ms": d.registered_ms,
            "last_active_ms": d.last_active_ms,
            "online": d.online,
            "revoked": d.revoked,
        })).collect::<Vec<_>>(),
        "chats": a.chats,
        "stored_bytes": a.stored_bytes,
        "quota_bytes": a.quota_bytes,
        "own_quota": a.own_quota,
        "last_active_ms": a.last_active_ms,
    })
}

fn answer_json(answer: AdminAnswer) -> Value {
    match answer {
        AdminAnswer::Accounts(all) => json!({ "accounts": all.iter().map(account_json).collect::<Vec<_>>() }),
        AdminAnswer::Account(a) => json!({ "account": account_json(&a) }),
        AdminAnswer::Deleted(DeleteReport { account, devices, chats_deleted, deltas_deleted, chats_kept }) => json!({
            "deleted": {
                "account": account.to_string(),
                "devices": devices,
                "chats_deleted": chats_deleted,
                "deltas_deleted": deltas_deleted,
                "chats_kept": chats_kept,
            }
        }),
        AdminAnswer::Registration { mode, invites } => json!({ "registration": mode.name(), "invites": invites }),
        AdminAnswer::Invite { token, mode } => json!({ "invite": token.to_string(), "registration": mode.name() }),
        AdminAnswer::Invites { invites, mode } => json!({
            "invites": invites.iter().map(|InviteView { id, created_ms }| json!({
                "id": hex(id),
                "created_ms": created_ms,
            })).collect::<Vec<_>>(),
            "registration": mode.name(),
        }),
        AdminAnswer::InviteRevoked { id, invites } => json!({ "revoked": hex(&id), "invites": invites }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another user's connection is refused with its own code, whoever it is (root too).
    #[test]
    fn only_the_relays_own_user_is_admitted() {
        assert_eq!(admit(Some(1000), 1000), Ok(()));
        assert_eq!(admit(Some(0), 0), Ok(()));
        for (peer, own) in [(Some(1001), 1000), (Some(0), 1000), (Some(1000), 0), (None, 1000)] {
            let refused = admit(peer, own).unwrap_err();
            assert_eq!(refused.code, "not_owner", "{peer:?} on {own}");
            assert!(!refused.line().contains('\n'));
        }
    }

    #[test]
    fn requests_parse_and_bad_ones_get_their_code() {
        assert_eq!(parse(r#"{"command":"accounts"}"#), Ok(Request::Accounts));
        assert_eq!(
            parse(r#"{"command":"quota","account":"alice","bytes":1000}"#),
            Ok(Request::Quota { account: "alice".into(), bytes: Some(1000) })
        );
        assert_eq!(
            parse(r#"{"command":"quota","account":"alice","bytes":null}"#),
            Ok(Request::Quota { account: "alice".into(), bytes: None })
        );
        assert_eq!(parse(r#"{"command":"registration"}"#), Ok(Request::Registration { mode: None }));
        assert_eq!(parse(r#"{"command":"invite_create"}"#), Ok(Request::InviteCreate));
        assert_eq!(parse(r#"{"command":"invite_list"}"#), Ok(Request::InviteList));
        assert_eq!(
            parse(r#"{"command":"invite_revoke","invite":"0011223344556677"}"#),
            Ok(Request::InviteRevoke { invite: "0011223344556677".into() })
        );
        assert_eq!(invite_ref("0011223344556677"), Ok(InviteRef::Id([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77])));
        let token = InviteToken([7; 16]);
        assert_eq!(invite_ref(&token.to_string()), Ok(InviteRef::Digest(token.digest())));
        for bad in ["", "00112233445566", "00112233445566zz", "stratus-invite-00", "ééééééééé"] {
            assert_eq!(invite_ref(bad).unwrap_err().code, "invalid_argument", "{bad:?}");
        }
        let code = |line: &str| parse(line).unwrap_err().code;
        assert_eq!(code("suspend alice"), "malformed_request");
        assert_eq!(code("[1,2]"), "malformed_request");
        assert_eq!(code(r#"{"account":"alice"}"#), "malformed_request");
        assert_eq!(code(r#"{"command":7}"#), "malformed_request");
        assert_eq!(code(r#"{"command":"drop_tables"}"#), "unknown_command");
        assert_eq!(code(r#"{"command":"suspend"}"#), "malformed_request");
        assert_eq!(code(r#"{"command":"suspend","account":"a","extra":1}"#), "malformed_request");
        // The quota's bytes must be said, even to take the relay's default again.
        assert_eq!(code(r#"{"command":"quota","account":"alice"}"#), "malformed_request");
        assert_eq!(code(r#"{"command":"quota","account":"alice","bytes":-1}"#), "malformed_request");
    }
}
