//! Relay operations for self-hosters (issue 19), against the real relay binary and the real
//! `stratus` CLI: a backup taken while the relay serves, restored after more was written, loses
//! no message on any device (the restore defect); backups and restores refuse bad input and
//! change nothing; a failed backup leaves its directory ready for the next; a running relay
//! empties a deleted account's data while it serves the others.

use std::path::Path;

use stratus_relay::store::RelayStore;
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

/// Deltas of 60,000 bytes that fill the store before the backup (~64 MiB): its copy then takes
/// long enough for appends to go on beside it.
const FILL: u64 = 1_100;
const FILL_BYTES: usize = 60_000;
/// Appends in flight at once.
const WINDOW: u64 = 16;
/// The raw appends' client seqs start here, past the CLI's own (same device).
const CS0: u64 = 1_000_000;

/// What [`keep_appending`] did: every ack, in order, as `(n, seq)` for the append at client
/// seq [`CS0`] + n, and the newest n sent.
#[derive(Clone, Default)]
struct Appended {
    acks: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A device appending the `ns` with [`WINDOW`] in flight until `stop`, noting it in `log`.
async fn keep_appending(
    mut raw: Raw,
    chat: stratus_engine::ChatId,
    ns: std::ops::RangeInclusive<u64>,
    bytes: usize,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    log: Appended,
) -> Raw {
    use std::sync::atomic::Ordering;
    use stratus_engine::proto::wire::RelayFrame;
    let (Appended { acks, sent }, (first, last)) = (log, ns.into_inner());
    let mut next = first;
    let mut inflight = 0;
    loop {
        let stopping = stop.as_ref().is_some_and(|s| *s.borrow()) || next > last;
        if stopping && inflight == 0 {
            return raw;
        }
        while !stopping && inflight < WINDOW && next <= last {
            raw.stream.send(&append(next, chat, CS0 + next, bytes)).await.expect("send append");
            sent.store(next, Ordering::SeqCst);
            next += 1;
            inflight += 1;
        }
        match raw.next().await.expect("the relay keeps the stream open") {
            RelayFrame::Acked { client_seq, seq, .. } => {
                inflight -= 1;
                acks.lock().unwrap().push((client_seq.0 - CS0, seq.0));
            }
            RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } => {}
            other => panic!("unexpected answer to an append: {other:?}"),
        }
    }
}

/// A backup taken while a device appends does not stop the appends: appends sent after the
/// backup was asked for are acknowledged before it is done, and the backup, restored, holds
/// every delta acknowledged before the backup returned, at seqs 1, 2, 3… with nothing missing
/// (a store at one batch boundary).
#[test]
fn a_backup_does_not_stop_the_appends() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start_with(&data, &["--requests-per-second", "0"]);
    let acct = account(&relay, &dir.path().join("a"), "a");
    let chat = acct.chat;
    let backup = dir.path().join("backup");
    let rt = rt();
    let log = Appended::default();
    let (acks, sent) = (log.acks.clone(), log.sent.clone());
    let (before_return, sent_at_start) = rt.block_on(async {
        let raw = raw(&relay, &acct).await;
        let raw = keep_appending(raw, chat, 1..=FILL, FILL_BYTES, None, log.clone()).await;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let appender = tokio::spawn(keep_appending(raw, chat, FILL + 1..=u64::MAX, 200, Some(stop), log.clone()));
        while acks.lock().unwrap().len() < FILL as usize + 100 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let sent_at_start = sent.load(Ordering::SeqCst);
        let socket = data.join(stratus_relay::admin::SOCKET_NAME);
        stratus_relay::admin::client::backup(&socket, &backup).await.expect("the backup is made");
        let before_return = acks.lock().unwrap().clone();
        stop_tx.send_replace(true);
        appender.await.expect("the appends go on");
        (before_return, sent_at_start)
    });
    // Sent after the backup was asked for, acknowledged before it was done.
    let during = before_return.iter().filter(|(cs, _)| *cs > sent_at_start).count();
    eprintln!("acknowledged while the backup ran: {during} (of {} in all)", acks.lock().unwrap().len());
    assert!(during > 0, "no append sent after the backup began was acknowledged before it was done");

    for l in relay.log().lines().filter(|l| l.contains("backup")) {
        eprintln!("{l}");
    }
    assert!(relay.terminate().is_some_and(|s| s.success()));
    relay_ok(&data, &["restore", "--from", backup.to_str().unwrap()]);
    relay.restart();
    let held = rt.block_on(async { raw(&relay, &acct).await.fetch_all(chat).await });
    let seqs: Vec<u64> = held.iter().map(|d| d.seq.0).collect();
    assert_eq!(seqs, (1..=held.len() as u64).collect::<Vec<_>>(), "the backup's log has no gap");
    for (cs, seq) in &before_return {
        let d = held.get(*seq as usize - 1).unwrap_or_else(|| panic!("acked seq {seq} is not in the backup"));
        assert_eq!(d.client_seq.0, CS0 + cs, "the backup holds at seq {seq} the delta acknowledged there");
    }
    let raw_held = held.iter().filter(|d| d.client_seq.0 >= CS0).count();
    assert!(raw_held <= sent.load(Ordering::SeqCst) as usize, "nothing the device did not send");
}

/// An account with many deltas deleted while the relay runs: the running relay empties its
/// data a chunk at a time by itself (its `/metrics` count the chunks, and say when nothing is
/// left), not only when the store next opens, and another account's appends are acknowledged
/// meanwhile.
#[test]
fn a_running_relay_empties_a_deleted_accounts_data_while_serving_others() {
    use std::time::{Duration, Instant};
    const DELTAS: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start_with(&data, &["--requests-per-second", "0", "--admin-http", "127.0.0.1:0"]);
    let gone_home = dir.path().join("gone");
    let (gone, stays) = (account(&relay, &gone_home, "gone"), account(&relay, &dir.path().join("stays"), "stays"));
    let gone_id = stratus_engine::Device::open(&gone_home).unwrap().account().unwrap().to_string();
    let admin = relay.admin_http();
    let purge = || {
        let text = http(&admin, "GET", "/metrics").1;
        let value = |name| metric(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
        (value("stratus_relay_purge_chunks_total"), value("stratus_relay_purge_pending"))
    };
    let rt = rt();
    let log = Appended::default();
    rt.block_on(async {
        let raw_gone = raw(&relay, &gone).await;
        keep_appending(raw_gone, gone.chat, 1..=DELTAS, 200, None, Appended::default()).await;
        assert_eq!(purge(), (0.0, 0.0), "nothing deleted yet");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let raw_stays = raw(&relay, &stays).await;
        let appender = tokio::spawn(keep_appending(raw_stays, stays.chat, 1..=u64::MAX, 200, Some(stop), log.clone()));
        while log.acks.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let acked_before = log.acks.lock().unwrap().len();
        let (d, id) = (data.clone(), gone_id.clone());
        let out = tokio::task::spawn_blocking(move || relay_ok(&d, &["admin", "delete", &id])).await.unwrap();
        assert!(out.contains(&gone_id), "{out}");
        // A generous deadline: this waits for the purge, it does not time it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (chunks, pending) = purge();
            // Its chat's deltas alone take DELTAS / 128 chunks.
            if pending == 0.0 && chunks >= (DELTAS / stratus_relay::core::PURGE_CHUNK as u64) as f64 {
                break;
            }
            assert!(Instant::now() < deadline, "the purge did not finish: {chunks} chunks, pending {pending}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let acked_after = log.acks.lock().unwrap().len();
        eprintln!("acknowledged to the other account while deleting: {}", acked_after - acked_before);
        assert!(acked_after > acked_before, "the other account's appends were acknowledged meanwhile");
        stop_tx.send_replace(true);
        appender.await.expect("the other account's appends go on");
    });
    assert!(relay.terminate().is_some_and(|s| s.success()));
    let store = stratus_relay::store::SledStore::open(&data.join("store")).unwrap();
    assert!(store.read_chat(gone.chat, stratus_engine::Seq(0), stratus_engine::Seq(DELTAS), 100).unwrap().is_empty());
    let kept = store.read_chat(stays.chat, stratus_engine::Seq(0), stratus_engine::Seq(10), 10).unwrap();
    assert_eq!(kept.len(), 10, "the other account's deltas stay");
}

/// A backup that fails leaves its directory as it found it, ready for the next backup: here a
/// second backup asked for while one runs. (Before, the relay's identity, copied in first,
/// stayed, and every later backup into that directory was refused as "not empty".)
#[test]
fn a_failed_backup_leaves_its_directory_ready_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = Relay::start_with(&data, &["--requests-per-second", "0"]);
    let acct = account(&relay, &dir.path().join("a"), "a");
    let socket = data.join(stratus_relay::admin::SOCKET_NAME);
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    rt().block_on(async {
        let raw = raw(&relay, &acct).await;
        // A store whose copy takes a while (as in `a_backup_does_not_stop_the_appends`).
        keep_appending(raw, acct.chat, 1..=FILL, FILL_BYTES, None, Appended::default()).await;
        let (s, f) = (socket.clone(), first.clone());
        let running = tokio::spawn(async move { stratus_relay::admin::client::backup(&s, &f).await });
        while !relay.log().contains("backup started") {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let err = stratus_relay::admin::client::backup(&socket, &second).await.expect_err("one backup at a time");
        assert!(err.contains("already running"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&second).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "the failed backup left {left:?}");
        running.await.unwrap().expect("the first backup is made");
        stratus_relay::admin::client::backup(&socket, &second).await.expect("the directory takes the next backup");
    });
    assert!(second.join(stratus_relay::store::MANIFEST).is_file());
}
