//! `stratus-relay admin` (issue 19, item 4), against the real relay binary, the real `stratus`
//! CLI and the admin socket itself: accounts listed with their devices, storage and activity; a
//! per-account quota refused with its typed code; a suspended account's devices refused until
//! it is lifted; a deleted account's data gone while the other member of its direct chat syncs
//! on; registration closed or by single-use invite tokens; bad requests, and requests from
//! another user, answered with one typed line, changing nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use stratus_engine::proto::wire::{ErrorCode, RelayFrame, PROTOCOL_VERSION};
use stratus_engine::ChatId;
use stratus_relay::store::{RelayStore, SledStore};
use stratus_tests::*;

fn admin_json(data: &Path, args: &[&str]) -> Value {
    let mut all = vec!["admin", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(relay_ok(data, &all).trim()).expect("one line of JSON")
}

/// A failed command: its one line on standard error.
fn failure(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

fn accounts(data: &Path) -> Vec<Value> {
    admin_json(data, &["accounts"])["accounts"].as_array().expect("a list").clone()
}

fn account_of<'a>(all: &'a [Value], id: &str) -> &'a Value {
    all.iter().find(|a| a["account"] == id).unwrap_or_else(|| panic!("{id} listed in {all:?}"))
}

fn id_of(home: &Path) -> String {
    stratus_engine::Device::open(home).expect("device opens").account().expect("logged in").to_string()
}

/// A relay in `dir` with two accounts, `ann` (a note in her notes chat) and `bob`: the relay's
/// data directory, the relay, their homes, and ann's notes chat.
fn ann_and_bob(dir: &Path) -> (PathBuf, Relay, PathBuf, PathBuf, ChatId) {
    let data = dir.join("relay");
    let relay = Relay::start(&data);
    let (ann, bob) = (dir.join("ann"), dir.join("bob"));
    let notes = account(&relay, &ann, "ann").chat;
    account(&relay, &bob, "bob");
    stratus_ok(&ann, &["send", &notes.to_string(), "ann's own note"]);
    (data, relay, ann, bob, notes)
}

fn code_of(f: &RelayFrame) -> Option<ErrorCode> {
    match f {
        RelayFrame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// One raw request line on the admin socket, and the answer.
fn raw_request(socket: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).expect("the admin socket answers");
    s.write_all(line).expect("request written");
    s.shutdown(std::net::Shutdown::Write).expect("half close");
    let mut answer = String::new();
    BufReader::new(&mut s).read_line(&mut answer).expect("an answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// Two accounts (one with two devices) are listed with their devices, storage and last
/// activity; a quota set for one refuses its next append with `QuotaExceeded`, and `default`
/// gives it the relay's again; suspended, its device is refused with `AccountSuspended` (the CLI
/// says so in one line) while the other account is served, and lifted, it syncs again.
#[test]
fn accounts_are_listed_given_quotas_and_suspended() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = Relay::start(&data);
    let (a_home, a2_home, b_home) = (dir.path().join("a"), dir.path().join("a2"), dir.path().join("b"));
    let a = account(&relay, &a_home, "a");
    link_device(&relay, &a_home, &a2_home, "a2");
    stratus_ok(&a2_home, &["sync"]);
    let b = account(&relay, &b_home, "b");
    stratus_ok(&a_home, &["account", "set-username", "ann"]);
    stratus_ok(&a_home, &["send", &a.chat.to_string(), "a note"]);
    let (ia, ib) = (id_of(&a_home), id_of(&b_home));

    let all = accounts(&data);
    assert_eq!(all.len(), 2, "{all:?}");
    let (va, vb) = (account_of(&all, &ia), account_of(&all, &ib));
    assert_eq!(va["username"], "ann");
    assert_eq!(va["status"], "active");
    assert_eq!(va["devices"].as_array().unwrap().len(), 2, "{va}");
    assert_eq!(vb["devices"].as_array().unwrap().len(), 1, "{vb}");
    assert!(va["stored_bytes"].as_u64().unwrap() > vb["stored_bytes"].as_u64().unwrap(), "a wrote more: {all:?}");
    assert!(va["last_active_ms"].as_u64().unwrap() > 1_700_000_000_000, "a wall-clock time: {va}");
    assert_eq!(va["quota_bytes"], 1u64 << 30);
    let text = relay_ok(&data, &["admin", "accounts"]);
    assert!(text.contains(&ia) && text.contains("(ann)") && text.contains("2 devices"), "{text}");

    // Its own quota, by username: the next append is refused with the typed code.
    let set = admin_json(&data, &["quota", "ann", "1"]);
    assert_eq!((&set["account"]["quota_bytes"], &set["account"]["own_quota"]), (&1.into(), &true.into()));
    rt().block_on(async {
        let mut r = raw(&relay, &a).await;
        let reply = r.request(append(1, a.chat, 1000, 100)).await;
        assert_eq!(code_of(&reply), Some(ErrorCode::QuotaExceeded), "{reply:?}");
        relay_ok(&data, &["admin", "quota", &ia, "default"]);
        let reply = r.request(append(2, a.chat, 1000, 100)).await;
        assert!(matches!(reply, RelayFrame::Acked { .. }), "the relay's quota again: {reply:?}");
    });

    // Suspended: refused at hello with the typed code, the CLI says so; b is served.
    let out = relay_ok(&data, &["admin", "suspend", &ia]);
    assert!(out.contains("suspended"), "{out}");
    rt().block_on(async {
        let mut r = Raw::connect(a.keys.clone(), &relay.addr).await;
        let hello = r.hello(PROTOCOL_VERSION).await;
        assert_eq!(code_of(&hello), Some(ErrorCode::AccountSuspended), "{hello:?}");
        assert!(r.next().await.is_none(), "then the stream closes");
    });
    let err = failure(&stratus(&a_home, &["sync"]));
    assert!(err.contains("suspended") && err.contains("AccountSuspended"), "{err}");
    let err = failure(&stratus(&a2_home, &["send", &a.chat.to_string(), "from a2"]));
    assert!(err.contains("AccountSuspended"), "{err}");
    stratus_ok(&b_home, &["send", &b.chat.to_string(), "b is served"]);
    assert_eq!(account_of(&accounts(&data), &ia)["status"], "suspended");

    // Lifted: both devices sync, and what waited in a2's outbox goes out.
    relay_ok(&data, &["admin", "unsuspend", "ann"]);
    stratus_ok(&a2_home, &["sync"]);
    stratus_ok(&a_home, &["sync"]);
    let log = stratus_ok(&a_home, &["log", &a.chat.to_string()]);
    assert!(log.contains("a note") && log.contains("from a2"), "{log}");
}

/// A deleted account's devices, records and the chats only it was in are gone from the
/// store; the other member of its direct chat keeps the chat, its history included, and syncs
/// on; the deleted account's device is refused with `AccountDeleted`.
#[test]
fn a_deleted_account_is_gone_and_the_other_member_of_its_chat_syncs_on() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mut relay, ann, bob, notes) = ann_and_bob(dir.path());
    for (home, name) in [(&ann, "ann"), (&bob, "bob")] {
        stratus_ok(home, &["account", "set-username", name]);
    }
    stratus_ok(&bob, &["contact", "accept", "ann"]);
    let direct = stratus_ok(&ann, &["chat", "create", "--direct", "bob"]).trim().to_string();
    stratus_ok(&ann, &["send", &direct, "hi bob"]);
    stratus_ok(&bob, &["sync"]);
    let (ia, ann_device) = (id_of(&ann), stratus_engine::Device::open(&ann).unwrap().keypair());

    let out = relay_ok(&data, &["admin", "delete", "ann"]);
    assert!(out.contains("deleted") && out.contains("1 chat(s) shared"), "{out}");
    let listed = account_of(&accounts(&data), &ia).clone();
    assert_eq!((&listed["deleted"], &listed["username"]), (&true.into(), &Value::Null), "{listed}");
    assert_eq!(listed["devices"].as_array().unwrap().len(), 0);

    // Bob goes on: his history (ann's message too) and new messages.
    stratus_ok(&bob, &["send", &direct, "still here"]);
    stratus_ok(&bob, &["sync"]);
    let log = stratus_ok(&bob, &["log", &direct]);
    assert!(log.contains("hi bob") && log.contains("still here"), "{log}");
    // Ann's device is refused, with the typed code.
    let err = failure(&stratus(&ann, &["sync"]));
    assert!(err.contains("AccountDeleted"), "{err}");
    rt().block_on(async {
        let mut r = Raw::connect(ann_device, &relay.addr).await;
        assert_eq!(code_of(&r.hello(PROTOCOL_VERSION).await), Some(ErrorCode::AccountDeleted));
    });
    // Deleting it again says so.
    let err = failure(&relay_cmd(&data, &["admin", "delete", &ia]));
    assert!(err.contains("was deleted") && err.contains("account_deleted"), "{err}");

    // In the store: her notes chat and its log, her device and her log are gone; the direct
    // chat and its history stay.
    assert!(relay.terminate().is_some_and(|s| s.success()));
    let store = SledStore::open(&data.join("store")).unwrap();
    let r = store.recover().unwrap();
    let chats: Vec<String> = r.chats.iter().map(|(c, _, _)| c.to_string()).collect();
    assert!(!chats.contains(&notes.to_string()) && chats.contains(&direct), "{chats:?}");
    assert!(store.read_chat(notes, stratus_engine::Seq(0), stratus_engine::Seq(100), 100).unwrap().is_empty());
    let kept = store.read_chat(direct.parse().unwrap(), stratus_engine::Seq(0), stratus_engine::Seq(100), 100);
    assert!(kept.unwrap().len() >= 2, "both messages stay in the direct chat");
    assert!(!r.devices.iter().any(|d| d.body.account.to_string() == ia), "her device is gone");
    assert!(r.account_heads.iter().any(|(a, head)| a.to_string() == ia && head.0 == 0), "her log is gone");
}

/// Back up, delete an account, restore the backup: the account does not come back. The
/// restore says which accounts were deleted after the backup; the relay deletes them again as
/// it starts (its device is refused with `AccountDeleted` from the first frame, its notes
/// gone, the other account served) and forgets the list. Restored again with `--undelete`, it is back as the backup
/// had it. (Before, a restore silently brought deleted accounts and their data back.)
#[test]
fn a_restore_does_not_bring_back_an_account_deleted_after_its_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mut relay, ann, bob, notes) = ann_and_bob(dir.path());
    let (ia, ann_device) = (id_of(&ann), stratus_engine::Device::open(&ann).unwrap().keypair());
    let backup = dir.path().join("backup");
    relay_ok(&data, &["backup", "--to", backup.to_str().unwrap()]);
    relay_ok(&data, &["admin", "delete", &ia]);
    assert!(relay.terminate().is_some_and(|s| s.success()));

    let out = relay_ok(&data, &["restore", "--from", backup.to_str().unwrap()]);
    assert!(out.contains("1 account(s) deleted after the backup will be deleted again") && out.contains(&ia), "{out}");
    relay.restart();
    // The relay deletes it as it starts: her device is refused from the first frame (the
    // first thing asked of the restarted relay), and the listing shows it deleted.
    rt().block_on(async {
        let mut r = Raw::connect(ann_device.clone(), &relay.addr).await;
        assert_eq!(code_of(&r.hello(PROTOCOL_VERSION).await), Some(ErrorCode::AccountDeleted));
    });
    let listed = account_of(&accounts(&data), &ia).clone();
    assert_eq!((&listed["deleted"], listed["devices"].as_array().unwrap().len()), (&true.into(), 0), "{listed}");
    stratus_ok(&bob, &["sync"]);
    assert!(relay.terminate().is_some_and(|s| s.success()));
    {
        let store = SledStore::open(&data.join("store")).unwrap();
        assert!(store.read_chat(notes, stratus_engine::Seq(0), stratus_engine::Seq(100), 100).unwrap().is_empty());
        assert_eq!(store.recover().unwrap().redo_deletions, vec![], "the list is forgotten once done");
    }

    // Asked for, the backup's account comes back.
    let out = relay_ok(&data, &["restore", "--from", backup.to_str().unwrap(), "--undelete"]);
    assert!(out.contains("brought back 1 account(s) deleted after the backup") && out.contains(&ia), "{out}");
    relay.restart();
    let listed = account_of(&accounts(&data), &ia).clone();
    assert_eq!((&listed["deleted"], listed["devices"].as_array().unwrap().len()), (&false.into(), 1), "{listed}");
    rt().block_on(async {
        let mut r = Raw::connect(ann_device, &relay.addr).await;
        assert!(matches!(r.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
    });
}

/// Registration closed refuses a new account with a clear error; by invitation, only with a
/// token the operator made, each good for one account. (The admin socket elsewhere than the
/// data directory, as the `admin_socket` setting puts it.)
#[test]
fn registration_closed_or_by_single_use_invitation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let socket = dir.path().join("ops.sock");
    let socket = socket.to_str().unwrap();
    let relay = Relay::start_with(&data, &["--admin-socket", socket]);
    assert!(!data.join("admin.sock").exists() && Path::new(socket).exists());
    let relay_ok = |data: &Path, args: &[&str]| relay_ok(data, &[&["--admin-socket", socket], args].concat());
    let accounts = |data: &Path| {
        let all = relay_ok(data, &["admin", "--json", "accounts"]);
        serde_json::from_str::<Value>(all.trim()).unwrap()["accounts"].as_array().unwrap().clone()
    };
    let create = |home: &str, invite: Option<&str>| {
        let mut args = vec!["account", "create", "--relay", relay.addr.as_str(), "--name", home];
        args.extend(invite.map(|t| ["--invite", t]).into_iter().flatten());
        stratus(&dir.path().join(home), &args)
    };
    assert!(relay_ok(&data, &["admin", "registration"]).contains("registration: open"));

    relay_ok(&data, &["admin", "registration", "closed"]);
    let err = failure(&create("a", None));
    assert!(err.contains("closed registration") && err.contains("RegistrationClosed"), "{err}");

    relay_ok(&data, &["admin", "registration", "invite"]);
    let err = failure(&create("b", None));
    assert!(err.contains("InviteRequired") && err.contains("--invite"), "{err}");
    let made = stratus_engine::proto::wire::InviteToken([7; 16]).to_string();
    let err = failure(&create("c", Some(&made)));
    assert!(err.contains("InviteRequired"), "a token the operator never made: {err}");
    let o = create("c", Some("not-a-token"));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not an invite token"), "{o:?}");

    let token = relay_ok(&data, &["admin", "invite", "create"]).trim().to_string();
    assert!(token.starts_with("stratus-invite-"), "{token}");
    create("d", Some(&token)).status.success().then_some(()).expect("the token lets one account in");
    let err = failure(&create("e", Some(&token)));
    assert!(err.contains("used already"), "single use: {err}");
    assert!(relay_ok(&data, &["admin", "registration"]).contains("invite (a new account needs an invite token; 0"));
    assert_eq!(accounts(&data).len(), 1);

    relay_ok(&data, &["admin", "registration", "open"]);
    assert!(create("f", None).status.success());
}

/// Unused invite tokens are listed by id (never the token: the relay keeps only digests) and
/// revoked by the token or by that id; a revoked token lets no account in, revoking it again
/// is `unknown_invite`, a malformed name `invalid_argument`, and the revocations survive a
/// restart.
#[test]
fn invite_tokens_are_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data);
    relay_ok(&data, &["admin", "registration", "invite"]);
    let a = relay_ok(&data, &["admin", "invite", "create"]).trim().to_string();
    let b = relay_ok(&data, &["admin", "invite", "create"]).trim().to_string();
    let c = relay_ok(&data, &["admin", "invite", "create"]).trim().to_string();
    let list = admin_json(&data, &["invite", "list"]);
    let ids: Vec<String> =
        list["invites"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3, "{list}");
    assert!(list["invites"].as_array().unwrap().iter().all(|i| i["created_ms"].as_u64() > Some(0)), "{list}");
    let text = relay_ok(&data, &["admin", "invite", "list"]);
    assert!(text.starts_with("3 unused invite token(s); registration is invite"), "{text}");
    for token in [&a, &b, &c] {
        assert!(!text.contains(token.trim_start_matches("stratus-invite-")), "a listing shows no token: {text}");
    }
    // By the token itself, then by an id from the listing (the one that is not c's).
    let revoked = admin_json(&data, &["invite", "revoke", &a]);
    assert_eq!(revoked["invites"], 2, "{revoked}");
    let a_id = revoked["revoked"].as_str().unwrap().to_string();
    assert!(ids.contains(&a_id), "{a_id} in {ids:?}");
    let left = admin_json(&data, &["invite", "list"]);
    let other = left["invites"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect::<Vec<_>>();
    let c_id = admin_json(&data, &["invite", "revoke", &c])["revoked"].as_str().unwrap().to_string();
    let b_id = other.iter().find(|i| **i != c_id).unwrap().to_string();
    let text = relay_ok(&data, &["admin", "invite", "revoke", &b_id]);
    assert_eq!(text.trim(), format!("revoked invite {b_id}; 0 unused left"));

    let err = failure(&relay_cmd(&data, &["admin", "invite", "revoke", &a]));
    assert!(err.contains("unknown_invite"), "{err}");
    let err = failure(&relay_cmd(&data, &["admin", "invite", "revoke", "not-an-id"]));
    assert!(err.contains("invalid_argument"), "{err}");
    relay.restart();
    assert_eq!(admin_json(&data, &["invite", "list"])["invites"], serde_json::json!([]));
    let o = stratus(
        &dir.path().join("d"),
        &["account", "create", "--relay", relay.addr.as_str(), "--name", "d", "--invite", &b],
    );
    assert!(failure(&o).contains("InviteRequired"), "a revoked token lets no account in");
    assert!(accounts(&data).is_empty());
}

/// Bad requests on the socket get one typed line and change nothing; so do an unknown
/// account, no relay at all, and (when the test can act as another user, i.e. runs as root) a
/// request from another user, by the file's mode or by the relay's check of the peer's uid.
#[test]
fn bad_admin_requests_are_refused_with_a_typed_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data);
    account(&relay, &dir.path().join("a"), "a");
    let socket = data.join("admin.sock");
    let before = accounts(&data);

    let code = |answer: Value| {
        assert_eq!(answer["ok"], false, "{answer}");
        answer["error"]["code"].as_str().unwrap().to_string()
    };
    assert_eq!(code(raw_request(&socket, b"suspend everyone\n")), "malformed_request");
    assert_eq!(code(raw_request(&socket, b"{\"command\": \"drop_all\"}\n")), "unknown_command");
    assert_eq!(code(raw_request(&socket, b"{\"command\": \"suspend\"}\n")), "malformed_request");
    assert_eq!(code(raw_request(&socket, &[b'{'; 5000])), "request_too_large");
    assert_eq!(
        code(raw_request(&socket, b"{\"command\": \"registration\", \"mode\": \"shut\"}\n")),
        "invalid_argument"
    );
    assert_eq!(code(raw_request(&socket, b"{\"command\": \"ban\", \"account\": \"nobody\"}\n")), "unknown_account");
    let ok = raw_request(&socket, b"{\"command\": \"registration\"}");
    assert_eq!((&ok["ok"], &ok["result"]["registration"]), (&true.into(), &"open".into()), "no newline needed");
    let err = failure(&relay_cmd(&data, &["admin", "suspend", "nobody"]));
    assert!(err.contains("no account nobody") && err.contains("unknown_account"), "{err}");
    let err = failure(&relay_cmd(&data, &["admin", "quota", "a", "lots"]));
    assert!(err.contains("not a number"), "{err}");
    assert_eq!(accounts(&data), before, "nothing changed");

    another_user(dir.path(), &data);

    // No relay: one line saying so.
    assert!(relay.terminate().is_some_and(|s| s.success()));
    let err = failure(&relay_cmd(&data, &["admin", "accounts"]));
    assert!(err.contains("no relay answers"), "{err}");
}

/// The uid of `nobody`, to act as another user.
const NOBODY: u32 = 65534;

/// Another user's requests: refused by the socket file's mode (the relay runs as this user, the
/// command as `nobody`), and by the relay's own check of the peer (the relay runs as `nobody`,
/// the command as root, whom file modes do not stop). Needs root to act as another user.
fn another_user(tmp: &Path, data: &Path) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if rustix_euid() != 0 {
        eprintln!("skipped: acting as another user needs root (the uid check is unit-tested in relay/src/admin.rs)");
        return;
    }
    // The command as nobody, the relay as root: the socket's mode refuses it.
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(bin("stratus-relay"))
        .arg("--data-dir")
        .arg(data)
        .args(["admin", "accounts"])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .expect("stratus-relay runs as nobody");
    let err = failure(&o);
    assert!(err.contains("permission denied") && err.contains("only the user the relay runs as"), "{err}");

    // The relay as nobody, the command as root: the relay refuses the peer's uid.
    let theirs = tmp.join("nobody-relay");
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let log = std::fs::File::create(tmp.join("nobody-relay.log")).unwrap();
    let mut child = Command::new(bin("stratus-relay"))
        .arg("--data-dir")
        .arg(&theirs)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("the relay starts as nobody");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening "), "the relay as nobody: {line:?}");
    let err = failure(&relay_cmd(&theirs, &["admin", "registration", "closed"]));
    assert!(err.contains("not_owner") && err.contains("uid 0"), "{err}");
    let err = failure(&relay_cmd(&theirs, &["admin", "accounts"]));
    assert!(err.contains("not_owner"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
    // Nothing changed: registration is still open on that relay's store.
    let r = SledStore::open(&theirs.join("store")).unwrap().recover().unwrap();
    assert_eq!(r.registration, stratus_relay::core::Registration::Open);
    let mut log = String::new();
    std::fs::File::open(tmp.join("nobody-relay.log")).unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("refused a connection from another user"), "{log}");
}

/// This process's effective uid, from /proc (no unsafe code here).
fn rustix_euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}
