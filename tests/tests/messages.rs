//! Replies, edits, deletes for everyone and reactions (issue 5.3), through the real `stratus`
//! CLI and relay, across the devices of an account.

use std::io::{BufRead, BufReader};

use stratus_tests::{link_device, stratus, stratus_ok, watch_json, Relay};

fn log_json(home: &std::path::Path, chat: &str) -> Vec<serde_json::Value> {
    stratus_ok(home, &["log", chat, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn replies_edits_reactions_and_deletes_reach_every_device_also_one_that_was_offline() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    link_device(&relay, &a, &b, "phone");
    link_device(&relay, &a, &c, "tablet");
    let first = stratus_ok(&a, &["send", &chat, "first"]).trim().to_string();
    stratus_ok(&b, &["sync"]);
    stratus_ok(&c, &["sync"]);

    // b watches while the others write: changes to a message it shows arrive as they happen.
    let mut watch = watch_json(&b);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let reply = stratus_ok(&c, &["reply", &chat, &first, "an answer"]).trim().to_string();
    let seen: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!((seen["id"].as_str(), seen["reply_to"].as_str()), (Some(reply.as_str()), Some(first.as_str())));
    stratus_ok(&a, &["edit", &chat, &first, "first, edited"]);
    let seen: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(seen["text"], "first, edited");
    assert!(seen["edited"].as_str().is_some_and(|t| t.ends_with('Z')), "an RFC 3339 time: {seen}");
    stratus_ok(&c, &["react", &chat, &first, "👍"]);
    let seen: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(seen["reactions"]["👍"].as_array().map(Vec::len), Some(1), "{seen}");
    // Reading on one device moves the account's read mark on the others.
    stratus_ok(&c, &["read", &chat]);
    let seen: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(seen["up_to"].as_str(), Some(reply.as_str()), "{seen}");
    watch.kill().unwrap();
    watch.wait().unwrap();

    // c is offline while its reply is deleted for everyone (by another device of the account).
    stratus_ok(&a, &["sync"]);
    stratus_ok(&a, &["delete", &chat, &reply]);
    let refused = stratus(&a, &["edit", &chat, &reply, "too late"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("deleted"));
    stratus_ok(&c, &["sync"]);
    stratus_ok(&b, &["sync"]);
    let shown = log_json(&c, &chat);
    assert_eq!(shown.len(), 2);
    assert_eq!(shown[1]["deleted"], true);
    assert_eq!(shown[1]["text"], "", "the text is gone on the device that was offline");
    assert!(stratus_ok(&c, &["log", &chat]).contains("(deleted)"));
    let text = stratus_ok(&a, &["log", &chat]);
    assert!(text.contains("first, edited (edited)") && text.contains("👍×1"), "{text}");
    assert_eq!(text, stratus_ok(&b, &["log", &chat]));
    assert_eq!(text, stratus_ok(&c, &["log", &chat]));
    let list = stratus_ok(&a, &["chat", "list"]);
    assert!(list.contains("2 messages, 0 unread"), "own messages are never unread: {list}");

    // Taking a reaction back; a reaction that is not one word is refused.
    stratus_ok(&c, &["react", &chat, &first, "👍", "--remove"]);
    stratus_ok(&a, &["sync"]);
    assert!(log_json(&a, &chat)[0]["reactions"].as_object().unwrap().is_empty());
    assert!(!stratus(&a, &["react", &chat, &first, "two words"]).status.success());
    assert!(!stratus(&a, &["reply", &chat, "0000", "to nothing"]).status.success());
}

/// A typing indicator reaches the other connected devices and nothing of it is stored.
#[test]
fn typing_reaches_the_connected_devices_and_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    link_device(&relay, &a, &b, "phone");
    stratus_ok(&b, &["sync"]);
    let mut watch = watch_json(&b);
    let mut errors = BufReader::new(watch.stderr.take().unwrap()).lines();
    // Wait until the watch is connected and caught up, so that it is there to be told.
    while !errors.next().unwrap().unwrap().contains("caught up") {}
    let files_before = stratus_tests::files_under(&relay.data_dir).len();
    stratus_ok(&a, &["typing", &chat]);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let seen: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(seen["chat"].as_str(), Some(chat.as_str()), "{seen}");
    assert!(seen["typing"].is_string() && seen["device"].is_string(), "{seen}");
    watch.kill().unwrap();
    watch.wait().unwrap();
    // Nothing was written for it: no new file (the relay core's test checks that it makes no
    // write at all).
    assert_eq!(stratus_tests::files_under(&relay.data_dir).len(), files_before);
}
