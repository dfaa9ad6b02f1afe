//! Sessions (issue 4): listing an account's devices and ending one of them, against the real
//! relay binary and the real `stratus` CLI. The relay runs with `--min-session-age-secs 0` except
//! where the 24-hour rule itself is tested.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use stratus_tests::{bin, link_device, recover, stratus, stratus_ok, Relay};

const ANY_AGE: &[&str] = &["--min-session-age-secs", "0"];

fn sessions(home: &std::path::Path) -> Vec<serde_json::Value> {
    stratus_ok(home, &["devices", "--json"]).lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// A relay that lets any session end others, an account on `a` ("laptop") and a linked device
/// on `b` ("phone"), with `a` synced so that it knows `b`'s certificate.
fn laptop_and_phone(dir: &std::path::Path) -> (Relay, PathBuf, PathBuf) {
    let relay = Relay::start_with(&dir.join("relay"), ANY_AGE);
    let (a, b) = (dir.join("a"), dir.join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    link_device(&relay, &a, &b, "phone");
    stratus_ok(&a, &["sync"]);
    (relay, a, b)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn devices_lists_every_session_and_which_one_is_this() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, a, b) = laptop_and_phone(dir.path());
    let list = sessions(&a);
    assert_eq!(list.len(), 2, "{list:?}");
    let names: Vec<_> =
        list.iter().map(|s| (s["name"].as_str().unwrap(), s["this_device"].as_bool().unwrap())).collect();
    assert!(names.contains(&("laptop", true)) && names.contains(&("phone", false)), "{names:?}");
    for s in &list {
        // RFC 3339 in UTC with milliseconds, which sort as text in time order.
        let (registered, active) = (s["registered"].as_str().unwrap(), s["last_active"].as_str().unwrap());
        assert!(registered > "2020-" && registered.len() == 24 && registered.ends_with('Z'), "a wall-clock time: {s}");
        assert!(active >= registered, "{s}");
        assert!(s["created"].as_str().is_some_and(|c| c.ends_with('Z')), "{s}");
    }
    let text = stratus_ok(&b, &["devices"]);
    assert!(text.lines().any(|l| l.contains("phone") && l.ends_with("(this device)")), "{text}");
}

/// The revoked device is watching (a live session) while the account writes: it is cut off at
/// once, its `watch` exits saying so, its account data is gone, the other device drops it from
/// its list, and nothing written afterwards reaches it.
#[test]
fn revoking_a_device_during_active_sync_cuts_it_off_and_wipes_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), ANY_AGE);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    link_device(&relay, &a, &b, "phone");
    let mut watch = stratus_tests::watch_json(&b);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    stratus_ok(&a, &["send", &chat, "before"]);
    assert!(lines.next().expect("watch prints").unwrap().contains("before"));

    let b_id = sessions(&a).into_iter().find(|s| s["name"] == "phone").unwrap()["device"].as_str().unwrap().to_string();
    stratus_ok(&a, &["device", "revoke", "phone"]);
    let status = watch.wait().expect("watch exits");
    assert!(!status.success(), "watch ends with an error once revoked");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("session was ended"), "{err}");
    stratus_ok(&a, &["send", &chat, "after"]);

    // The revoked device holds nothing of the account any more, not even in old file pages.
    for f in stratus_tests::files_under(&b) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"before"), "{} still holds a message", f.display());
    }
    // Its store is gone: the home holds no device any more (a new one is made only by
    // `account create`, `device link` or `account recover`).
    for args in [&["chat", "list"][..], &["sync"]] {
        let o = stratus(&b, args);
        assert!(!o.status.success() && stderr(&o).contains("no stratus device in"), "{}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    let o = stratus(&b, &["log", &chat]);
    assert!(!o.status.success(), "no chat left on the revoked device");

    // The other device dropped it, after checking the signature itself.
    let local = stratus_ok(&a, &["device", "list"]);
    assert!(!local.contains(&b_id), "{local}");
    assert_eq!(sessions(&a).len(), 1);
}

#[test]
fn a_device_revoked_while_offline_is_wiped_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), ANY_AGE);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    link_device(&relay, &a, &b, "phone");
    assert!(stratus_ok(&b, &["chat", "list"]).contains(&chat), "linking pulled the chat");
    // b writes offline-style: the message waits in its outbox; then a revokes it.
    stratus_ok(&a, &["device", "revoke", "phone"]);
    let o = stratus(&b, &["send", &chat, "from a stolen phone"]);
    assert!(!o.status.success(), "the revoked device cannot write");
    assert!(stderr(&o).contains("session was ended"), "{}", stderr(&o));
    let o = stratus(&b, &["chat", "list"]);
    assert!(String::from_utf8_lossy(&o.stdout).trim().is_empty(), "wiped");
    for f in stratus_tests::files_under(&b) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"stolen"), "{} still holds the message", f.display());
    }
    // Nothing it wrote reached the account.
    stratus_ok(&a, &["sync"]);
    let log = stratus_ok(&a, &["log", &chat]);
    assert!(!log.contains("stolen"), "{log}");
}

#[test]
fn two_devices_revoking_each_other_at_once_leave_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, a, b) = laptop_and_phone(dir.path());
    let spawn = |home: &std::path::Path, target: &str| {
        Command::new(bin("stratus"))
            .arg("--home")
            .arg(home)
            .args(["device", "revoke", target])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ra, rb) = (spawn(&a, "phone"), spawn(&b, "laptop"));
    let (oa, ob) = (ra.wait_with_output().unwrap(), rb.wait_with_output().unwrap());
    assert_ne!(oa.status.success(), ob.status.success(), "exactly one wins: {} / {}", stderr(&oa), stderr(&ob));
    let (winner, loser) = if oa.status.success() { (&a, &b) } else { (&b, &a) };
    assert_eq!(sessions(winner).len(), 1);
    let o = stratus(loser, &["sync"]);
    assert!(!o.status.success());
}

#[test]
fn a_young_session_cannot_end_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    link_device(&relay, &a, &b, "thief");
    let o = stratus(&b, &["device", "revoke", "laptop"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SessionTooNew"), "{}", stderr(&o));
    assert_eq!(sessions(&a).len(), 2, "nothing changed");
    // The relay's window is configurable: with it at zero the same request goes through.
    relay.restart_with(ANY_AGE);
    stratus_ok(&a, &["device", "revoke", "thief"]);
    assert_eq!(sessions(&a).len(), 1);
}

#[test]
fn the_account_sets_how_long_idle_sessions_last_and_it_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(&dir.path().join("relay"), ANY_AGE);
    let a = dir.path().join("a");
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    assert!(stratus_ok(&a, &["devices"]).starts_with("sessions never expire"));
    let said = stratus_ok(&a, &["account", "set-session-ttl", "30"]);
    assert!(said.contains("30 days"), "{said}");
    relay.restart();
    let listed = stratus_ok(&a, &["devices"]);
    assert!(listed.starts_with("sessions inactive for more than 30 days end"), "{listed}");
    // The relay keeps the policy within bounds.
    let o = stratus(&a, &["account", "set-session-ttl", "100000"]);
    assert!(!o.status.success() && stderr(&o).contains("TooLarge"), "{}", stderr(&o));
}

/// Runs `stratus account recover` on `home` with `key` on standard input.
/// Every device lost: a recovery key logs a new one in with the whole history. The relay holds
/// the bundle only sealed; a wrong key finds nothing; and a key made by a device whose session
/// later ends stops working.
#[test]
fn a_recovery_key_logs_a_new_device_in_with_the_whole_history() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, a, b) = laptop_and_phone(dir.path());
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    for i in 0..3 {
        stratus_ok(&a, &["send", &chat, &format!("kept {i}")]);
    }
    let key = stratus_ok(&a, &["account", "recovery-key"]);
    let key = key.trim().strip_prefix("recovery key: ").expect("the key is printed").to_string();
    let secret = key.trim_start_matches("stratus-recovery-").to_string();
    for f in stratus_tests::files_under(&relay.data_dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{} holds the key", f.display());
    }

    // All devices lost; a new one comes back with the key.
    let c = dir.path().join("c");
    let o = recover(&relay, &c, "tablet", &key);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stratus_ok(&c, &["log", &chat]);
    for i in 0..3 {
        assert!(log.contains(&format!("kept {i}")), "{log}");
    }
    stratus_ok(&c, &["send", &chat, "from the tablet"]);
    stratus_ok(&b, &["sync"]);
    assert!(stratus_ok(&b, &["log", &chat]).contains("from the tablet"));

    // A wrong key finds nothing, and changes nothing.
    let wrong = format!("stratus-recovery-{}", "0".repeat(64));
    let o = recover(&relay, &dir.path().join("d"), "guess", &wrong);
    assert!(!o.status.success() && stderr(&o).contains("RecoveryNotFound"), "{}", stderr(&o));

    // The key came from the laptop; ending the laptop's session withdraws it.
    stratus_ok(&b, &["device", "revoke", "laptop"]);
    let o = recover(&relay, &dir.path().join("e"), "thief", &key);
    assert!(!o.status.success() && stderr(&o).contains("RecoveryNotFound"), "{}", stderr(&o));
}
