//! Chats between accounts (issue 5): the directory, direct chats and groups, member changes
//! and the key epochs they start, through the real `stratus` CLI and relay.

use std::path::{Path, PathBuf};

use stratus_engine::doc::ChatDoc;
use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::proto::crypto::{open_delta, seal_delta, DeltaAd};
use stratus_engine::proto::wire::{ClientFrame, RelayFrame, PROTOCOL_VERSION};
use stratus_engine::store::DeviceStore;
use stratus_engine::{ChatId, ClientSeq, Epoch, Seq};
use stratus_relay::store::{RelayStore, SledStore};
use stratus_tests::{link_device, stratus, stratus_ok, Raw, Relay};

fn log_json(home: &Path, chat: &str) -> Vec<serde_json::Value> {
    stratus_ok(home, &["log", chat, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// An account named `name` with two devices, `<name>1` and `<name>2`, and the username `name`.
fn account(relay: &Relay, dir: &Path, name: &str) -> [PathBuf; 2] {
    let homes = [dir.join(format!("{name}1")), dir.join(format!("{name}2"))];
    stratus_ok(&homes[0], &["account", "create", "--relay", &relay.addr, "--name", &format!("{name} laptop")]);
    stratus_ok(&homes[0], &["account", "set-username", name]);
    link_device(relay, &homes[0], &homes[1], &format!("{name} phone"));
    homes
}

fn chat_line(home: &Path, chat: &str) -> String {
    stratus_ok(home, &["chat", "list"]).lines().find(|l| l.starts_with(chat)).unwrap_or_default().to_string()
}

/// The keys this device holds for `chat`, by epoch, read from its stopped store.
fn held_keys(home: &Path, chat: ChatId) -> Vec<(Epoch, stratus_engine::proto::crypto::ChatKey)> {
    let store = DeviceStore::open(&home.join("store")).unwrap();
    store.chat(chat).unwrap().map(|m| m.keys.into_iter().collect()).unwrap_or_default()
}

#[test]
fn a_group_of_three_accounts_with_two_devices_each_converges_and_a_removed_member_reads_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let ann = account(&relay, dir.path(), "ann");
    let bob = account(&relay, dir.path(), "bob");
    let cat = account(&relay, dir.path(), "cat");
    let devices: Vec<&PathBuf> = ann.iter().chain(&bob).chain(&cat).collect();
    stratus_ok(&bob[0], &["contact", "accept", "ann"]);
    stratus_ok(&cat[1], &["contact", "accept", "ann"]);

    let chat =
        stratus_ok(&ann[0], &["chat", "create", "--group", "--title", "trip", "--member", "bob", "--member", "cat"])
            .trim()
            .to_string();
    let mut firsts = Vec::new();
    for home in &devices {
        stratus_ok(home, &["sync"]);
        let line = chat_line(home, &chat);
        assert!(line.contains("trip [group]"), "every device has the group: {line}");
        firsts.push(stratus_ok(home, &["send", &chat, "hello"]).trim().to_string());
    }
    for home in &devices {
        stratus_ok(home, &["sync"]);
    }

    // With the relay down every device writes at once, none seeing the others: a message each,
    // an edit and a delete of its own, a reaction to another account's message.
    relay.kill();
    for (i, home) in devices.iter().enumerate() {
        let queued = |args: &[&str]| {
            let o = stratus(home, args);
            assert_eq!(o.status.code(), Some(3), "{args:?} is queued while the relay is down");
        };
        queued(&["send", &chat, &format!("concurrent {i}")]);
        match i % 3 {
            0 => queued(&["edit", &chat, &firsts[i], &format!("hello, edited by {i}")]),
            1 => queued(&["delete", &chat, &firsts[i]]),
            _ => queued(&["react", &chat, &firsts[(i + 1) % 6], "🎉"]),
        }
    }
    relay.restart();
    for _ in 0..2 {
        for home in &devices {
            stratus_ok(home, &["sync"]);
        }
    }
    let reference = log_json(&ann[0], &chat);
    assert_eq!(reference.len(), 12, "six hellos and six concurrent messages");
    for home in &devices {
        assert_eq!(log_json(home, &chat), reference, "every device shows the same chat");
    }
    let by_id = |id: &str| reference.iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(by_id(&firsts[0])["text"], "hello, edited by 0");
    assert_eq!((by_id(&firsts[1])["deleted"].clone(), by_id(&firsts[1])["text"].clone()), (true.into(), "".into()));
    assert_eq!(by_id(&firsts[3])["reactions"]["🎉"].as_array().map(Vec::len), Some(1));

    // Only the creator removes; a member cannot.
    let refused = stratus(&bob[0], &["chat", "remove", &chat, "cat"]);
    assert!(!refused.status.success(), "bob is not the group's creator");
    // Ann removes cat: a new key epoch for ann and bob; cat's devices see that they left.
    stratus_ok(&ann[0], &["chat", "remove", &chat, "cat"]);
    let after = stratus_ok(&ann[1], &["send", &chat, "after cat left"]).trim().to_string();
    stratus_ok(&bob[1], &["sync"]);
    stratus_ok(&bob[1], &["reply", &chat, &after, "just us"]);
    for home in &cat {
        stratus_ok(home, &["sync"]);
        assert!(chat_line(home, &chat).contains("left"), "{}", chat_line(home, &chat));
        assert!(!stratus(home, &["send", &chat, "still here?"]).status.success());
        let shown = log_json(home, &chat);
        assert_eq!(shown.len(), 12, "cat keeps what it had and gets nothing more");
    }
    for home in ann.iter().chain(&bob) {
        stratus_ok(home, &["sync"]);
        assert_eq!(log_json(home, &chat).len(), 14);
    }

    // What the relay stores after the removal is sealed under keys cat never got: with every key
    // from both of cat's stores, not one later delta opens.
    let chat_id: ChatId = chat.parse().unwrap();
    let cat_keys: Vec<_> = cat.iter().flat_map(|h| held_keys(h, chat_id)).collect();
    assert!(!cat_keys.is_empty());
    relay.kill();
    let store = SledStore::open(&relay.data_dir.join("store")).unwrap();
    let deltas = store.read_chat(chat_id, Seq(0), Seq(u64::MAX), u32::MAX).unwrap();
    let newest_cat = cat_keys.iter().map(|(e, _)| *e).max().unwrap();
    let later: Vec<_> = deltas.iter().filter(|d| d.epoch > newest_cat).collect();
    assert!(later.len() >= 2, "the messages after the removal are under a later epoch");
    for d in later {
        assert!(cat_keys.iter().all(|(_, k)| open_delta(&k.transport(), &d.ad(), &d.sealed).is_err()));
    }
}

#[test]
fn new_members_read_from_their_joining_on_or_the_whole_history_and_leaving_rekeys() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let homes: Vec<PathBuf> = ["ann", "bob", "dan", "eve"].iter().map(|n| dir.path().join(n)).collect();
    let [ann, bob, dan, eve] = &homes[..] else { unreachable!() };
    for (home, name) in homes.iter().zip(["ann", "bob", "dan", "eve"]) {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    let taken = stratus(eve, &["account", "set-username", "ann"]);
    assert!(!taken.status.success(), "a username has one owner");
    for home in [bob, dan, eve] {
        stratus_ok(home, &["contact", "accept", "ann"]);
    }

    let chat = stratus_ok(ann, &["chat", "create", "--group", "--title", "club", "--member", "bob"]).trim().to_string();
    stratus_ok(ann, &["send", &chat, "before anyone joined"]);
    stratus_ok(ann, &["chat", "add", &chat, "dan"]);
    stratus_ok(ann, &["chat", "add", &chat, "eve", "--share-history"]);
    stratus_ok(bob, &["sync"]);
    stratus_ok(bob, &["send", &chat, "welcome"]);
    for home in [dan, eve] {
        stratus_ok(home, &["sync"]);
    }
    let texts = |home: &Path| -> Vec<String> {
        log_json(home, &chat).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts(dan), vec!["welcome"], "dan reads from his joining on");
    assert_eq!(texts(eve), vec!["before anyone joined", "welcome"], "eve was given the history");
    assert!(chat_line(eve, &chat).contains("club"), "the title came with the history");

    // Dan leaves: the others go on under a key dan never gets; a member renames the group.
    stratus_ok(dan, &["chat", "leave", &chat]);
    stratus_ok(eve, &["sync"]);
    stratus_ok(eve, &["send", &chat, "after dan left"]);
    stratus_ok(bob, &["chat", "rename", &chat, "the club"]);
    for home in [ann, bob, eve, dan] {
        stratus_ok(home, &["sync"]);
    }
    assert_eq!(texts(dan), vec!["welcome"]);
    assert!(chat_line(dan, &chat).contains("left"));
    assert_eq!(texts(ann), vec!["before anyone joined", "welcome", "after dan left"]);
    assert!(chat_line(ann, &chat).contains("the club"), "{}", chat_line(ann, &chat));
    let chat_id: ChatId = chat.parse().unwrap();
    let dan_newest = held_keys(dan, chat_id).into_iter().map(|(e, _)| e).max().unwrap();
    let ann_newest = held_keys(ann, chat_id).into_iter().map(|(e, _)| e).max().unwrap();
    assert!(ann_newest > dan_newest, "leaving started a new epoch");
}

#[test]
fn a_direct_chat_and_safety_numbers_and_a_warning_when_a_name_changes_hands() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (ann, bob, mallory) = (dir.path().join("ann"), dir.path().join("bob"), dir.path().join("mallory"));
    for (home, name) in [(&ann, "ann"), (&bob, "bob"), (&mallory, "mallory")] {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    stratus_ok(&bob, &["contact", "accept", "ann"]);
    let chat = stratus_ok(&ann, &["chat", "create", "--direct", "bob"]).trim().to_string();
    stratus_ok(&ann, &["send", &chat, "hi bob"]);
    stratus_ok(&bob, &["sync"]);
    assert_eq!(log_json(&bob, &chat)[0]["text"], "hi bob");
    assert!(chat_line(&bob, &chat).contains("[direct]"));
    assert!(!stratus(&ann, &["chat", "add", &chat, "mallory"]).status.success(), "a direct chat stays two");

    // Both sides see the same safety number.
    let number = |out: String| out.lines().find_map(|l| l.strip_prefix("safety number: ")).unwrap().to_string();
    let on_ann = number(stratus_ok(&ann, &["contact", "verify", "bob"]));
    let on_bob = number(stratus_ok(&bob, &["contact", "verify", "ann"]));
    assert_eq!(on_ann, on_bob);
    assert_eq!(on_ann.len(), 71);

    // The name "bob" passes to another account: ann's device warns instead of trusting it.
    stratus_ok(&bob, &["account", "set-username", "--clear"]);
    stratus_ok(&mallory, &["account", "set-username", "bob"]);
    let warned = stratus(&ann, &["contact", "verify", "bob"]);
    assert!(!warned.status.success());
    assert!(String::from_utf8_lossy(&warned.stderr).contains("WARNING"), "{warned:?}");
    assert!(!stratus(&ann, &["chat", "create", "--direct", "bob"]).status.success(), "nothing is made with it");
    // After comparing numbers the user may trust the new account: only with the number of the
    // account the relay names.
    let stderr = String::from_utf8_lossy(&warned.stderr).to_string();
    let shown = stderr.split("(safety number ").nth(1).and_then(|s| s.split(')').next()).unwrap().to_string();
    assert!(!stratus(&ann, &["contact", "verify", "bob", "--confirm", &on_ann]).status.success());
    let confirmed = stratus_ok(&ann, &["contact", "verify", "bob", "--confirm", &shown]);
    assert!(confirmed.contains("verified: you confirmed") && number(confirmed) == shown);
}

/// A group made with a member's keys as looked up before that member rotated them: the relay
/// refuses the creation as stale, the creator looks the member up again and wraps the key to
/// the new keys, and the group reaches the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_made_with_keys_a_member_rotated_since_is_wrapped_again() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--min-session-age-secs", "0"]);
    let (bob, phone) = (dir.path().join("bob"), dir.path().join("phone"));
    stratus_ok(&bob, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    stratus_ok(&bob, &["account", "set-username", "bob"]);
    link_device(&relay, &bob, &phone, "phone");

    let mut ann = stratus_tests::new_account(&relay, &dir.path().join("ann"), "ann").await;
    stratus_ok(&bob, &["contact", "accept", &ann.account().unwrap().to_string()]);
    let seen = ann.lookup("bob").await.unwrap();
    assert_eq!(seen.generation, 0);
    stratus_ok(&bob, &["device", "revoke", "phone"]);

    let bob_id = seen.account.parse().unwrap();
    let (chat, _) = ann.new_chat_with(stratus_engine::proto::wire::ChatKind::Group, "late", &[bob_id]).unwrap();
    let (_, _) = ann.compose(chat, "made before the lookup again").unwrap();
    let session = stratus_engine::Session::start(ann).unwrap();
    stratus_tests::wait_idle(&session, 60).await;
    let ann = session.stop().await.unwrap();
    assert_eq!(ann.contact(bob_id).unwrap().unwrap().generation, 1, "looked up again");

    stratus_ok(&bob, &["sync"]);
    let texts: Vec<String> =
        log_json(&bob, &chat.to_string()).iter().map(|m| m["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts, vec!["made before the lookup again"]);
}

/// A member holds the chat key like every member, and crafts what its device's API would not
/// make: an edit of the other member's message, and a reaction in the other's name. Sealed
/// under the real key and appended by its real device through the relay, both are stored and
/// pushed; the other member's device refuses them, and nothing of them shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_edit_or_react_as_another() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (ann, bob) = (dir.path().join("ann"), dir.path().join("bob"));
    for (home, name) in [(&ann, "ann"), (&bob, "bob")] {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    stratus_ok(&bob, &["contact", "accept", "ann"]);
    let chat = stratus_ok(&ann, &["chat", "create", "--direct", "bob"]).trim().to_string();
    let hello = stratus_ok(&ann, &["send", &chat, "hello"]).trim().to_string();
    stratus_ok(&bob, &["sync"]);
    let chat_id: ChatId = chat.parse().unwrap();

    // Everything bob's device holds, from its stopped store.
    let store = DeviceStore::open(&bob.join("store")).unwrap();
    let secrets = store.secrets_or_create(|| unreachable!()).unwrap();
    let device = stratus_engine::store::device_id_of(&secrets);
    let account = store.login().unwrap().unwrap().account.id;
    let meta = store.chat(chat_id).unwrap().unwrap();
    let (epoch, key) = meta.current().map(|(e, k)| (e, k.clone())).unwrap();
    let (snap, changes) = store.doc_parts(chat_id).unwrap();
    let authors = store.authors(chat_id).unwrap();
    let first_client_seq = store.next_client_seq().unwrap().0;
    drop(store);
    let ann_account = *meta.members.iter().find(|m| **m != account).unwrap();
    // Each from the document as bob's device has it, so each is judged on its own.
    let doc = || ChatDoc::load(chat_id, &device, snap.as_deref(), &changes, &authors).unwrap();
    let crafted = [
        doc().edit_message(&hello, "bob was here", 1).unwrap(),
        doc().react(&hello, &ann_account, "-1", true, 2).unwrap(),
    ];

    let mut raw = Raw::connect(Keypair::ed25519_from_bytes(secrets.ed25519).unwrap(), &relay.addr).await;
    assert!(matches!(raw.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
    for (i, change) in crafted.iter().enumerate() {
        let client_seq = ClientSeq(first_client_seq + i as u64);
        let ad = DeltaAd { chat: chat_id, epoch, device: &device, account, client_seq };
        let sealed = seal_delta(&key.transport(), &ad, change, &mut rand::thread_rng());
        let req = 10 + i as u64;
        match raw.request(ClientFrame::Append { req, chat: chat_id, epoch, client_seq, sealed }).await {
            RelayFrame::Acked { .. } => {}
            other => panic!("the relay stores what a member seals: {other:?}"),
        }
    }
    drop(raw);

    stratus(&ann, &["sync"]);
    let log = log_json(&ann, &chat);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["text"], "hello", "{log:?}");
    assert!(log[0]["edited"].is_null(), "{log:?}");
    assert_eq!(log[0]["reactions"], serde_json::json!({}), "{log:?}");
}

/// Issue 15, item 3: an account is put into a chat only by an account it accepts. A stranger's
/// direct chat and group addition are refused and the account holds nothing of them; the
/// stranger invites, the account sees the invitation and accepts, and the same chat is made.
/// A stranger sees none of its devices either (item 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_is_put_into_a_chat_without_accepting_its_maker() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (ann, bob, cat) = (dir.path().join("ann"), dir.path().join("bob"), dir.path().join("cat"));
    for (home, name) in [(&ann, "ann"), (&bob, "bob"), (&cat, "cat")] {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    let refused = stratus(&ann, &["chat", "create", "--direct", "bob"]);
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success() && err.contains("has not accepted chats"), "{err}");
    assert!(stratus_ok(&ann, &["chat", "list"]).trim().is_empty(), "nothing was made");
    stratus_ok(&bob, &["sync"]);
    assert!(stratus_ok(&bob, &["chat", "list"]).trim().is_empty(), "bob holds nothing of it");

    // A stranger sees none of bob's devices.
    let mut cat_device = stratus_engine::Device::open(&cat).unwrap();
    let bob_id = cat_device.lookup("bob").await.unwrap().account.parse().unwrap();
    assert!(cat_device.secret_devices(bob_id).await.unwrap().is_empty());
    drop(cat_device);

    stratus_ok(&ann, &["contact", "invite", "bob"]);
    let waiting = stratus_ok(&bob, &["contact", "invitations", "--json"]);
    let lines: Vec<serde_json::Value> = waiting.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{waiting}");
    let from = lines[0]["account"].as_str().unwrap().to_string();
    stratus_ok(&bob, &["contact", "accept", &from]);
    assert!(stratus_ok(&bob, &["contact", "invitations"]).trim().is_empty(), "answered");

    let chat = stratus_ok(&ann, &["chat", "create", "--group", "--title", "t", "--member", "bob"]).trim().to_string();
    stratus_ok(&ann, &["send", &chat, "hi bob"]);
    stratus_ok(&bob, &["sync"]);
    assert_eq!(log_json(&bob, &chat)[0]["text"], "hi bob");
    // cat accepted nobody: ann cannot add it.
    let add = stratus(&ann, &["chat", "add", &chat, "cat"]);
    assert!(!add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    stratus_ok(&cat, &["sync"]);
    assert!(stratus_ok(&cat, &["chat", "list"]).trim().is_empty());
    // Declining ends it for later chats.
    stratus_ok(&bob, &["contact", "decline", "ann"]);
    assert!(!stratus(&ann, &["chat", "create", "--direct", "bob"]).status.success());
}
