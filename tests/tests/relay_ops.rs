//! Relay operations for self-hosters (issue 19), against the real relay binary and the real
//! `stratus` CLI: a backup taken while the relay serves, restored after more was written, loses
//! no message on any device (the restore defect); backups and restores refuse bad input and
//! change nothing.

use std::path::Path;

use stratus_tests::*;

fn texts(home: &Path, chat: &str) -> Vec<String> {
    let log = stratus_ok(home, &["log", chat, "--json"]);
    log.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["text"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

/// Back up, write more, restore the older backup, write again: every device ends with every
/// message, and so does a device linked afterwards, which only has what the relay holds.
/// Without incarnations the devices skip the new messages the restored relay hands out at
/// seqs they had already passed, and nobody gives the relay back what it lost.
#[test]
fn a_restored_backup_loses_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data);
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "restores"]).trim().to_string();
    link_device(&relay, &a, &b, "b");
    stratus_ok(&a, &["send", &chat, "a before the backup"]);
    stratus_ok(&b, &["sync"]);
    stratus_ok(&b, &["send", &chat, "b before the backup"]);
    stratus_ok(&a, &["sync"]);

    // Taken while the relay serves.
    let backup = dir.path().join("backup");
    relay_ok(&data, &["backup", "--to", backup.to_str().unwrap()]);
    assert!(backup.join("backup.manifest").is_file() && backup.join("identity.key").is_file());

    // Written after the backup: the restore takes it away from the relay, not from the devices.
    for n in 0..3 {
        stratus_ok(&a, &["send", &chat, &format!("a after the backup {n}")]);
        stratus_ok(&b, &["send", &chat, &format!("b after the backup {n}")]);
    }
    stratus_ok(&a, &["sync"]);
    stratus_ok(&b, &["sync"]);
    assert_eq!(texts(&a, &chat).len(), 8);

    assert!(relay.terminate().is_some_and(|s| s.success()));
    let restored = relay_ok(&data, &["restore", "--from", backup.to_str().unwrap()]);
    assert!(restored.contains("generation"), "{restored}");
    relay.restart();

    // Written after the restore, at seqs both devices had passed before it.
    stratus_ok(&a, &["send", &chat, "a after the restore"]);
    stratus_ok(&b, &["send", &chat, "b after the restore"]);
    for home in [&a, &b, &a, &b] {
        stratus_ok(home, &["sync"]);
    }
    link_device(&relay, &a, &c, "c");
    stratus_ok(&c, &["sync"]);

    let all = texts(&a, &chat);
    assert_eq!(all.len(), 10, "a has every message: {all:?}");
    for t in ["a after the restore", "b after the restore", "a after the backup 2", "b after the backup 0"] {
        assert!(all.iter().any(|m| m == t), "a lacks {t:?}: {all:?}");
    }
    assert_eq!(texts(&b, &chat), all, "b shows what a shows");
    assert_eq!(texts(&c, &chat), all, "a device linked after the restore gets every message from the relay");
    assert_eq!(stratus_ok(&a, &["log", &chat]), stratus_ok(&c, &["log", &chat]));
}

/// Bad input to backup and restore: a clear one-line error, nothing changed.
#[test]
fn backup_and_restore_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data);
    let a = dir.path().join("a");
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);

    // A directory that is not empty.
    let full = dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    let o = relay_cmd(&data, &["backup", "--to", full.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not empty") && err.lines().count() == 1, "{err}");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1, "nothing written into it");

    // A restore over a running relay.
    let backup = dir.path().join("backup");
    relay_ok(&data, &["backup", "--to", backup.to_str().unwrap()]);
    let o = relay_cmd(&data, &["restore", "--from", backup.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("running") && err.lines().count() == 1, "{err}");

    // No relay to ask for a backup.
    assert!(relay.terminate().is_some_and(|s| s.success()));
    let o = relay_cmd(&data, &["backup", "--to", dir.path().join("b2").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no relay answers") && err.lines().count() == 1, "{err}");

    // A directory that is not a backup.
    let o = relay_cmd(&data, &["restore", "--from", full.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not a complete backup") && err.lines().count() == 1, "{err}");
    let entries: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!entries.iter().any(|e| e.to_string_lossy().contains("replaced")), "nothing replaced: {entries:?}");

    // The relay still starts on its own store, and the device is still known.
    relay.restart();
    stratus_ok(&a, &["sync"]);
}
