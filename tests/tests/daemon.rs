//! The CLI on a running device (issue 14, part 5): `stratus daemon` (and `watch`) runs the
//! device's session and serves `HOME/stratus.sock`; every other `stratus` command on that home
//! goes through it and prints what it prints without it; bad input on the socket gets a typed
//! error and the device goes on serving and syncing. Against the real relay binary and the real
//! CLI (docs/daemon.md has the protocol).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stratus_tests::{bin, link_device, stratus, stratus_ok, Daemon, Relay};

/// A JSON-RPC client on the daemon's socket, one line at a time.
struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    id: u64,
}

impl Rpc {
    fn connect(socket: &Path) -> Rpc {
        let s = UnixStream::connect(socket).expect("the daemon answers");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Rpc { reader: BufReader::new(s.try_clone().unwrap()), writer: s, id: 0 }
    }

    /// Writes `line` and a newline (a daemon that closed first is the caller's to notice).
    fn send_line(&mut self, line: &str) {
        let _ = self.writer.write_all(format!("{line}\n").as_bytes());
    }

    /// The next line, or `None` once the daemon closed the connection.
    fn line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let v: Value = serde_json::from_str(&line).expect("the daemon writes JSON lines");
                assert_eq!(v["jsonrpc"], "2.0", "{v}");
                Some(v)
            }
        }
    }

    /// The next line that is not a notification.
    fn answer(&mut self) -> Option<Value> {
        loop {
            let v = self.line()?;
            if v.get("method").is_none() {
                return Some(v);
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        self.send_line(&json!({ "jsonrpc": "2.0", "id": self.id, "method": method, "params": params }).to_string());
        let v = self.answer().expect("an answer");
        assert_eq!(v["id"], self.id, "{v}");
        v
    }

    /// The next event of this type.
    fn event(&mut self, kind: &str) -> Value {
        loop {
            let v = self.line().expect("events until the one waited for");
            if v["method"] == "event" && v["params"]["type"] == kind {
                return v["params"].clone();
            }
        }
    }
}

/// The typed error's kind in an answer ("" for a result).
fn kind(answer: &Value) -> &str {
    answer["error"]["data"]["kind"].as_str().unwrap_or("")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn log_json(home: &Path, chat: &str) -> Vec<Value> {
    stratus_ok(home, &["log", chat, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A relay, an account on `a` ("laptop") with a notes chat holding one message, and a linked
/// device `b` ("phone"). Returns the relay, the homes and the chat.
fn laptop_and_phone(dir: &Path) -> (Relay, PathBuf, PathBuf, String) {
    let relay = Relay::start(&dir.join("relay"));
    let (a, b) = (dir.join("a"), dir.join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    stratus_ok(&a, &["send", &chat, "before the daemon"]);
    link_device(&relay, &a, &b, "phone");
    (relay, a, b, chat)
}

#[test]
fn commands_on_a_home_whose_daemon_runs_go_through_it_and_reach_the_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, a, b, notes) = laptop_and_phone(dir.path());
    let mut daemon = Daemon::start(&a);
    assert_eq!(daemon.socket, a.join("stratus.sock"));
    let mode = std::fs::metadata(&daemon.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "owner-only");

    // The store is the daemon's: each of these would find it locked without the socket.
    let chat = stratus_ok(&a, &["chat", "create", "--title", "through the daemon"]).trim().to_string();
    assert_eq!(chat.len(), 32, "the id alone: {chat}");
    let first = stratus_ok(&a, &["send", &chat, "hello via the daemon"]).trim().to_string();
    let reply = stratus_ok(&a, &["reply", &chat, &first, "an answer"]).trim().to_string();
    assert_eq!((first.len(), reply.len()), (32, 32));
    assert_eq!(stratus_ok(&a, &["edit", &chat, &first, "hello, edited"]), "");
    stratus_ok(&a, &["react", &chat, &first, "👍"]);
    stratus_ok(&a, &["read", &chat]);
    let reacted: Value = serde_json::from_str(&stratus_ok(&a, &["react", &chat, &reply, "🎉", "--json"])).unwrap();
    assert_eq!(reacted["reactions"]["🎉"].as_array().map(Vec::len), Some(1), "{reacted}");
    assert_eq!(stratus_ok(&a, &["typing", &chat]), "");
    assert_eq!(stratus_ok(&a, &["sync"]).trim(), "synced: 2 chats, outbox empty");
    let list = stratus_ok(&a, &["chat", "list"]);
    assert!(list.contains("through the daemon") && list.contains(&notes), "{list}");
    // A refusal from the device comes through as it would without the daemon.
    let o = stratus(&a, &["react", &chat, &first, "two words"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    // The other device has it all, times in RFC 3339.
    stratus_ok(&b, &["sync"]);
    let shown = log_json(&b, &chat);
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(shown[0]["text"], "hello, edited");
    assert_eq!(shown[0]["reactions"]["👍"].as_array().map(Vec::len), Some(1));
    assert_eq!(shown[1]["reply_to"], first.as_str());
    let ts = shown[0]["ts"].as_str().expect("a string");
    assert!(ts.len() == 24 && ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".", "{ts}");
    assert!(shown[0]["edited"].as_str().is_some_and(|e| e.ends_with('Z')), "{}", shown[0]);

    // The daemon syncs by itself: what the phone writes shows through it.
    stratus_ok(&b, &["send", &chat, "from the phone"]);
    wait_until(20, "the phone's message reaches the daemon", || {
        stratus_ok(&a, &["log", &chat]).contains("from the phone")
    });

    // `watch` on a home whose daemon runs prints the daemon's events.
    let mut watch = Command::new(bin("stratus"))
        .arg("--home")
        .arg(&a)
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut errors = BufReader::new(watch.stderr.take().unwrap()).lines();
    while !errors.next().expect("watch says it is caught up").unwrap().contains("caught up") {}
    stratus_ok(&b, &["send", &chat, "watched"]);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let seen: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!((seen["chat"].as_str(), seen["text"].as_str()), (Some(chat.as_str()), Some("watched")), "{seen}");
    watch.kill().unwrap();
    watch.wait().unwrap();

    // What a running session cannot do (it already has an account) is a typed error saying
    // what to do, not a hang.
    let not_yet: [&[&str]; 2] =
        [&["account", "create", "--relay", "/ip4/127.0.0.1/tcp/1/p2p/x", "--name", "n"], &["secret", "auto-accept"]];
    for args in not_yet {
        let o = stratus(&a, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains("not available through the daemon yet: stop the daemon"), "{}", stderr(&o));
    }

    // The same output through the daemon as from the store.
    let outputs = |home: &Path| {
        [
            stratus_ok(home, &["log", &chat]),
            stratus_ok(home, &["log", &chat, "--json"]),
            stratus_ok(home, &["chat", "list", "--json"]),
            stratus_ok(home, &["secret", "list"]),
        ]
    };
    let through = outputs(&a);
    assert!(daemon.running());
    assert_eq!(daemon.stop().and_then(|s| s.code()), Some(0), "SIGTERM is a clean stop");
    assert!(!daemon.socket.exists(), "the socket goes with the daemon");
    assert_eq!(through, outputs(&a));
}

/// The README's secret chat flow, with `watch` running on bob's device: it prints the offer and
/// the messages, and bob's commands go through it.
#[test]
fn the_readme_secret_chat_flow_works_while_watch_runs() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    stratus_ok(&bob, &["contact", "accept", "alice"]);
    stratus_ok(&alice, &["contact", "accept", "bob"]);
    let mut watch = Command::new(bin("stratus"))
        .arg("--home")
        .arg(&bob)
        .args(["watch", "--tcp", "/ip4/127.0.0.1/tcp/0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut errors = BufReader::new(watch.stderr.take().unwrap()).lines();
    while !errors.next().expect("watch says it is caught up").unwrap().contains("caught up") {}
    // Its standard error is drained from here on, so that it never blocks on it.
    std::thread::spawn(move || errors.for_each(drop));
    let mut printed = BufReader::new(watch.stdout.take().unwrap()).lines();

    let started = stratus(&alice, &["secret", "start", "bob"]);
    assert!(started.status.success(), "{}", stderr(&started));
    let id = String::from_utf8_lossy(&started.stdout).trim().to_string();
    assert_eq!(id.len(), 32, "the id alone on stdout: {id}");
    assert!(stderr(&started).contains("waiting for the other device to accept"), "{}", stderr(&started));
    let offer = printed.next().unwrap().unwrap();
    assert!(offer.contains(&id) && offer.contains("secret accept"), "{offer}");

    assert!(stratus_ok(&bob, &["secret", "list"]).contains("[invited]"));
    assert_eq!(stratus_ok(&bob, &["secret", "accept", &id]).trim(), format!("{id}: accepted"));
    let sent = stratus(&alice, &["secret", "send", &id, "hello secret"]);
    assert!(sent.status.success() && stderr(&sent).contains("delivered"), "{}", stderr(&sent));
    let line = printed.next().unwrap().unwrap();
    assert!(line.starts_with(&id) && line.contains("hello secret"), "{line}");
    assert!(stratus_ok(&bob, &["secret", "log", &id]).contains("hello secret"));

    // Bob answers through his watch; it waits there until alice's device reaches his.
    let answer = stratus(&bob, &["secret", "send", &id, "hello back"]);
    assert!(answer.status.success(), "{}", stderr(&answer));
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim().len(), 32, "the message id alone");
    let synced = stratus_ok(&alice, &["secret", "sync"]);
    assert!(synced.contains("delivered") && synced.contains("1 new"), "{synced}");
    assert!(stratus_ok(&alice, &["secret", "log", &id]).contains("hello back"));
    let fp = |home: &Path| stratus_ok(home, &["secret", "verify", &id]);
    assert_eq!(fp(&alice), fp(&bob));
    assert!(stratus_ok(&bob, &["secret", "list", "--json"]).contains("\"state\":\"active\""));

    // Closing through the daemon: gone on bob's device at once, on alice's once reached.
    assert_eq!(stratus_ok(&bob, &["secret", "close", &id]).trim(), format!("{id}: closed here"));
    assert_eq!(stratus_ok(&bob, &["secret", "list"]), "");
    let reached = stratus_ok(&alice, &["secret", "sync"]);
    assert!(reached.contains("closed"), "{reached}");
    assert_eq!(stratus_ok(&alice, &["secret", "list"]), "");
    watch.kill().unwrap();
    watch.wait().unwrap();
}

/// Malformed JSON, unknown methods, wrong params, an oversized line, too many connections, a
/// connection from another user: each gets its typed error, nothing changes, and the daemon goes
/// on serving and syncing.
#[test]
fn bad_input_on_the_socket_gets_typed_errors_and_the_device_keeps_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, a, b, chat) = laptop_and_phone(dir.path());
    let daemon = Daemon::start(&a);
    let mut rpc = Rpc::connect(&daemon.socket);

    // Each on the same connection, which stays open.
    rpc.send_line("{not json");
    let e = rpc.answer().unwrap();
    assert_eq!((e["id"].clone(), e["error"]["code"].as_i64(), kind(&e)), (Value::Null, Some(-32700), "parse_error"));
    rpc.send_line(r#"{"jsonrpc":"2.0","id":"x","method":"send","params":["a"]}"#);
    assert_eq!(kind(&rpc.answer().unwrap()), "bad_params");
    rpc.send_line(r#"[{"jsonrpc":"2.0","id":1,"method":"status"}]"#);
    assert_eq!(kind(&rpc.answer().unwrap()), "invalid_request");
    rpc.send_line(r#"{"id":2,"method":"status"}"#);
    assert_eq!(kind(&rpc.answer().unwrap()), "invalid_request");
    let e = rpc.call("sned", json!({}));
    assert_eq!((e["error"]["code"].as_i64(), kind(&e)), (Some(-32601), "unknown_method"));
    assert_eq!(kind(&rpc.call("send", json!({ "chat": "zz", "text": "x" }))), "bad_params");
    assert_eq!(kind(&rpc.call("send", json!({ "chat": chat, "text": "x", "extra": 1 }))), "bad_params");
    assert_eq!(kind(&rpc.call("write", json!({ "chat": chat, "op": "edit", "id": "abc" }))), "bad_params");
    assert_eq!(kind(&rpc.call("messages", json!({ "chat": "00".repeat(16) }))), "unknown_chat");
    let e = rpc.call("create_account", json!({}));
    assert_eq!((e["error"]["code"].as_i64(), kind(&e)), (Some(-32004), "not_available_in_daemon"));
    let status = rpc.call("status", json!({}));
    assert_eq!(status["result"]["outbox"], 0, "{status}");

    // Subscribed, a client sees its write acknowledged.
    assert_eq!(rpc.call("subscribe", json!({}))["result"]["subscribed"], true);
    let sent = rpc.call("send", json!({ "chat": chat, "text": "over the socket" }));
    let seq = sent["result"]["client_seq"].clone();
    assert_eq!(sent["result"]["message"]["text"], "over the socket");
    loop {
        let acked = rpc.event("acked");
        if acked["client_seq"] == seq {
            break;
        }
    }

    // A line over 64 KiB: a typed error, the connection closed, nothing sent.
    let mut big = Rpc::connect(&daemon.socket);
    let huge =
        json!({ "jsonrpc": "2.0", "id": 1, "method": "send", "params": { "chat": chat, "text": "H".repeat(100_000) } });
    big.send_line(&huge.to_string());
    let e = big.answer().expect("the error before the close");
    assert_eq!((e["error"]["code"].as_i64(), kind(&e)), (Some(-32001), "request_too_large"), "{e}");
    assert!(big.line().is_none(), "closed");
    assert!(!stratus_ok(&a, &["log", &chat]).contains("HHHH"));

    // At most 16 connections: the 17th is told and closed; a place frees when one goes.
    let held: Vec<Rpc> = (0..15)
        .map(|_| {
            let mut c = Rpc::connect(&daemon.socket);
            assert_eq!(kind(&c.call("status", json!({}))), "");
            c
        })
        .collect();
    let mut one_more = Rpc::connect(&daemon.socket);
    let e = one_more.line().expect("told why");
    assert_eq!(kind(&e), "too_many_clients", "{e}");
    assert!(one_more.line().is_none());
    drop(held);
    wait_until(10, "a place frees", || {
        let mut c = Rpc::connect(&daemon.socket);
        c.send_line(r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#);
        c.answer().is_some_and(|v| kind(&v).is_empty())
    });

    another_user_is_refused(&a, &chat);

    // Through all of it the device synced: both ways, through the daemon.
    stratus_ok(&b, &["send", &chat, "still syncing"]);
    wait_until(20, "the phone's message reaches the daemon", || {
        stratus_ok(&a, &["log", &chat]).contains("still syncing")
    });
    stratus_ok(&a, &["send", &chat, "and back"]);
    stratus_ok(&b, &["sync"]);
    // (The phone wrote before it had synced "over the socket": the two are concurrent, and the
    // document orders them, not the clock.)
    let mut texts: Vec<String> = log_json(&b, &chat).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect();
    texts.sort();
    assert_eq!(texts, ["and back", "before the daemon", "over the socket", "still syncing"]);
}

/// A process of another user (`nobody`) cannot reach the socket (owner-only, in a private
/// home); with the rights loosened on purpose, the daemon still refuses it (`wrong_user`).
/// Needs `setpriv` and root; elsewhere says why it skips.
fn another_user_is_refused(home: &Path, chat: &str) {
    let as_nobody = || {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(bin("stratus")).arg("--home").arg(home);
        c.args(["log", chat]).stdin(Stdio::null());
        c
    };
    match as_nobody().output() {
        Ok(o) if stderr(&o).contains("setpriv:") => {
            eprintln!("skipped the other-user check: setpriv cannot switch users here ({})", stderr(&o).trim());
            return;
        }
        Ok(o) => {
            assert!(!o.status.success(), "another user read the chat: {}", String::from_utf8_lossy(&o.stdout));
            assert!(o.stdout.is_empty());
        }
        Err(e) => {
            eprintln!("skipped the other-user check: no setpriv ({e})");
            return;
        }
    }
    let socket = home.join("stratus.sock");
    let set = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let parent = home.parent().unwrap();
    let before = [parent, home].map(|p| std::fs::metadata(p).unwrap().permissions().mode());
    set(parent, 0o711);
    set(home, 0o711);
    set(&socket, 0o666);
    let o = as_nobody().output().unwrap();
    set(&socket, 0o600);
    set(parent, before[0]);
    set(home, before[1]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains("serves only its own user; uid 65534"), "{}", stderr(&o));
}

/// A socket left by a killed daemon is replaced by the next; a second daemon on a home is
/// refused; commands on the home work with the daemon gone.
#[test]
fn a_stale_socket_is_replaced_and_a_second_daemon_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, a, _b, chat) = laptop_and_phone(dir.path());
    let mut first = Daemon::start(&a);
    let second = stratus(&a, &["daemon"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(stderr(&second).contains("a daemon already serves this home"), "{}", stderr(&second));
    assert!(first.running());

    first.kill();
    assert!(first.socket.exists(), "SIGKILL leaves the socket file");
    // Nobody answers on it: commands use the store.
    assert!(stratus_ok(&a, &["log", &chat]).contains("before the daemon"));
    let mut again = Daemon::start(&a);
    assert!(stratus_ok(&a, &["send", &chat, "after the restart"]).trim().len() == 32);
    assert_eq!(again.stop().and_then(|s| s.code()), Some(0));
    assert!(stratus_ok(&a, &["log", &chat]).contains("after the restart"));
}

/// The account's operations go through the daemon too (issue 14's one handle): sessions,
/// approving a new device, the session TTL, recovery key, username, a direct chat by username,
/// renaming, and revoking the new device, all while the daemon syncs.
#[test]
fn account_device_and_member_commands_go_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // Any session may end others here (the relay's 24-hour rule is tested in sessions.rs).
    let relay = Relay::start_with(&dir.path().join("relay"), &["--min-session-age-secs", "0"]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    link_device(&relay, &a, &b, "phone");
    let mut daemon = Daemon::start(&a);
    let sessions = stratus_ok(&a, &["devices"]);
    assert!(sessions.contains("(this device)") && sessions.lines().count() >= 3, "{sessions}");
    assert_eq!(
        stratus_ok(&a, &["account", "set-session-ttl", "30"]).trim(),
        "sessions inactive for more than 30 days end"
    );
    assert!(stratus_ok(&a, &["devices"]).contains("more than 30 days"));
    assert!(stratus_ok(&a, &["account", "recovery-key"]).trim().starts_with("recovery key: stratus-recovery-"));
    assert_eq!(stratus_ok(&a, &["account", "set-username", "ann"]).trim(), "username: ann");
    let listed = stratus_ok(&a, &["device", "list"]);
    assert!(listed.lines().any(|l| l.ends_with("(this device)")), "{listed}");

    // Another account, looked up and chatted with by username through the daemon.
    let c = dir.path().join("c");
    stratus_ok(&c, &["account", "create", "--relay", &relay.addr, "--name", "cat"]);
    stratus_ok(&c, &["account", "set-username", "cat"]);
    stratus_ok(&c, &["contact", "accept", "ann"]);
    let verify = stratus_ok(&a, &["contact", "verify", "cat"]);
    assert!(verify.contains("safety number"), "{verify}");
    let direct = stratus_ok(&a, &["chat", "create", "--direct", "cat"]).trim().to_string();
    assert_eq!(direct.len(), 32, "{direct}");
    stratus_ok(&a, &["chat", "rename", &direct, "with cat"]);
    wait_until(30, "the direct chat on cat's device", || {
        stratus_ok(&c, &["sync"]);
        stratus_ok(&c, &["chat", "list"]).contains("with cat")
    });

    // Revoking the phone through the daemon: it is cut off.
    stratus_ok(&a, &["device", "revoke", "phone"]);
    let o = stratus_tests::stratus(&b, &["sync"]);
    assert!(!o.status.success(), "the revoked phone cannot sync: {}", stderr(&o));
    assert!(!stratus_ok(&a, &["devices"]).contains("phone"));
    daemon.stop();
}
