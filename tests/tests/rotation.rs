//! Key rotation when a session ends (issue 4.3, 4.6), against the real relay binary and the real
//! `stratus` CLI: the account's devices move to new keys, and a reader holding everything the
//! revoked device had plus the relay's whole data directory opens nothing written afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stratus_engine::proto::cert::rotation_bundle_context;
use stratus_engine::proto::crypto::{open_box, open_delta, unwrap_chat_key, ChatKey};
use stratus_engine::proto::wire::{AccountEvent, Delta};
use stratus_engine::store::DeviceStore;
use stratus_engine::{Epoch, Seq};
use stratus_relay::store::{RelayStore, SledStore};
use stratus_tests::{link_device, recover, stratus_ok, Relay};
use x25519_dalek::StaticSecret;

const ANY_AGE: &[&str] = &["--min-session-age-secs", "0"];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn messages(home: &Path, chat: &str) -> Vec<String> {
    stratus_ok(home, &["log", chat, "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect()
}

/// A relay that lets any session end others, in `dir/relay`, and an account on `a`
/// ("laptop") with a chat "notes". Returns the relay, its data dir, `a`'s home and the chat.
fn laptop_with_notes(dir: &Path) -> (Relay, PathBuf, PathBuf, String) {
    let relay_dir = dir.join("relay");
    let relay = Relay::start_with(&relay_dir, ANY_AGE);
    let a = dir.join("a");
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "laptop"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "notes"]).trim().to_string();
    (relay, relay_dir, a, chat)
}

/// Every delta of `chat` in a stopped relay's store, and the store.
fn stored_deltas(relay_dir: &Path, chat: &str) -> (SledStore, Vec<Delta>) {
    let store = SledStore::open(&relay_dir.join("store")).unwrap();
    let chat: stratus_engine::ChatId = chat.parse().unwrap();
    let head = store.recover().unwrap().chats.into_iter().find(|(id, _, _)| *id == chat).unwrap().2;
    let deltas = store.read_chat(chat, Seq(0), head, u32::MAX).unwrap();
    (store, deltas)
}

#[test]
fn the_revoked_devices_keys_and_the_relays_data_open_nothing_written_after_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, relay_dir, a, chat) = laptop_with_notes(dir.path());
    let (b, c) = (dir.path().join("b"), dir.path().join("c"));
    stratus_ok(&a, &["send", &chat, "before"]);
    link_device(&relay, &a, &b, "phone");
    stratus_ok(&b, &["sync"]);
    assert_eq!(messages(&b, &chat), ["before"]);
    let key = stratus_ok(&a, &["account", "recovery-key"]);
    let key = key.trim().strip_prefix("recovery key: ").expect("the key is printed").to_string();

    // The thief's copy of the phone: its whole store as it stood.
    let stolen = dir.path().join("stolen");
    copy_dir(&b, &stolen);

    let out = stratus_ok(&a, &["device", "revoke", "phone"]);
    assert!(out.contains("rotated"), "{out}");
    stratus_ok(&a, &["send", &chat, "after one"]);
    stratus_ok(&a, &["send", &chat, "after two"]);
    let second = stratus_ok(&a, &["chat", "create", "--title", "new after"]).trim().to_string();
    stratus_ok(&a, &["send", &second, "after three"]);

    // A device linked after the rotation reads the whole history, old keys and new.
    link_device(&relay, &a, &c, "tablet");
    stratus_ok(&c, &["sync"]);
    assert_eq!(messages(&c, &chat), ["before", "after one", "after two"]);
    assert_eq!(messages(&c, &second), ["after three"]);
    // So does one recovered with the key made before the rotation: the rotation sealed the new
    // bundle to it.
    let d = dir.path().join("d");
    let o = recover(&relay, &d, "new phone", &key);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(messages(&d, &chat), ["before", "after one", "after two"]);
    stratus_ok(&d, &["send", &second, "from the new phone"]);
    stratus_ok(&c, &["sync"]);
    assert_eq!(messages(&c, &second), ["after three", "from the new phone"]);

    // The reader gets the stolen store and the relay's data directory (the relay is killed so
    // that its store can be opened; its files are what a disk thief would get).
    relay.kill();
    let stolen_store = DeviceStore::open(&stolen.join("store")).unwrap();
    let login = stolen_store.login().unwrap().expect("the stolen device was logged in");
    let secrets = stolen_store.secrets_or_create(|| panic!("the stolen store has its identity")).unwrap();
    let mut chat_keys: Vec<ChatKey> = Vec::new();
    for (_, meta, _) in stolen_store.chats().unwrap() {
        chat_keys.extend(meta.keys.into_values());
    }
    let mut kem_secrets: Vec<StaticSecret> =
        (0..=login.keys.generation).filter_map(|g| login.keys.kem_secret_of(g)).collect();
    kem_secrets.push(StaticSecret::from(secrets.x25519));
    let stolen_id = stratus_engine::store::device_id_of(&secrets);

    let relay_store = SledStore::open(&relay_dir.join("store")).unwrap();
    let recovered = relay_store.recover().unwrap();
    let account = login.account.id;
    let log = relay_store.read_account(account, Seq(0), Seq(u64::MAX), u32::MAX).unwrap();

    // Every chat key wrapped in the account log: the reader tries each of its secrets on it.
    let mut unwrapped: BTreeMap<(stratus_engine::ChatId, Epoch), ChatKey> = BTreeMap::new();
    let mut rotations = 0;
    for entry in &log {
        match &entry.event {
            AccountEvent::ChatAdded { terms, key, .. } => {
                for kem in &kem_secrets {
                    if let Ok(k) = unwrap_chat_key(&key.key, terms.chat, terms.epoch, account, kem) {
                        unwrapped.insert((terms.chat, terms.epoch), k);
                    }
                }
            }
            AccountEvent::Rotated { rotation } => {
                rotations += 1;
                assert!(
                    rotation.bundles.iter().all(|(d, _)| *d != stolen_id),
                    "no bundle is sealed to the revoked device"
                );
                for (d, sealed) in &rotation.bundles {
                    for context in [
                        rotation_bundle_context(account, rotation.body.generation, d),
                        rotation_bundle_context(account, rotation.body.generation, &stolen_id),
                    ] {
                        assert!(open_box(&StaticSecret::from(secrets.x25519), &[], &context, sealed).is_err());
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(rotations, 1);
    assert!(unwrapped.keys().all(|(_, e)| *e == Epoch(0)), "only first-epoch keys unwrap: {:?}", unwrapped.keys());
    chat_keys.extend(unwrapped.into_values());

    // Every delta the relay stores: what the reader opens.
    let mut opened = Vec::new();
    let mut closed = Vec::new();
    for (chat_id, _, head) in &recovered.chats {
        for d in relay_store.read_chat(*chat_id, Seq(0), *head, u32::MAX).unwrap() {
            if chat_keys.iter().any(|k| open_delta(&k.transport(), &d.ad(), &d.sealed).is_ok()) {
                opened.push((d.chat, d.seq, d.epoch));
            } else {
                closed.push((d.chat, d.seq, d.epoch));
            }
        }
    }
    // Sanity: the reader works on what the phone could read (the title and "before").
    assert_eq!(opened.len(), 2, "the reader opens what was written before: {opened:?}");
    assert!(opened.iter().all(|(_, _, e)| *e == Epoch(0)));
    // Nothing written after the rotation opens: two messages in the old chat, a title and two
    // messages in the new one, all under new keys.
    assert_eq!(closed.len(), 5, "{closed:?}");
    assert!(closed.iter().all(|(c, _, e)| (c.to_string() == chat && *e == Epoch(1)) || c.to_string() == second));

    // The recovery bundle on the relay, sealed again at the rotation, is sealed to the recovery
    // key only.
    assert_eq!(recovered.recoveries.len(), 1);
    for (_, record) in &recovered.recoveries {
        let sealed: stratus_engine::proto::crypto::SealedBox = postcard::from_bytes(&record.sealed).unwrap();
        for kem in &kem_secrets {
            assert!(open_box(kem, &[], b"recovery-bundle-v1", &sealed).is_err());
        }
    }
}

/// A device that stays wrote while the relay was down; the rotation happens before it comes
/// back. Its queued message, sealed under the old epoch, is sealed again under the new one
/// before it is sent (the device reads the account log first, issue 15 item 6): the relay never
/// sees it under the old keys, nothing is refused as stale, nothing is lost.
#[test]
fn a_message_queued_under_the_old_keys_goes_out_under_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, relay_dir, a, chat) = laptop_with_notes(dir.path());
    let (b, c) = (dir.path().join("b"), dir.path().join("c"));
    link_device(&relay, &a, &b, "phone");
    link_device(&relay, &a, &c, "tablet");
    stratus_ok(&c, &["sync"]);
    stratus_ok(&a, &["sync"]);

    relay.kill();
    let o = stratus_tests::stratus(&c, &["send", &chat, "written offline"]);
    assert_eq!(o.status.code(), Some(3), "queued while the relay is down: {}", String::from_utf8_lossy(&o.stderr));
    relay.restart_with(&[ANY_AGE, &["--admin-http", "127.0.0.1:0"]].concat());
    stratus_ok(&a, &["device", "revoke", "phone"]);

    stratus_ok(&c, &["sync"]);
    let (_, metrics) = stratus_tests::http(&relay.admin_http(), "GET", "/metrics");
    let stale = metrics.lines().find(|l| l.starts_with("stratus_relay_refused_total{code=\"StaleEpoch\"}"));
    assert_eq!(stale, None, "nothing was sent under the old epoch");
    stratus_ok(&a, &["sync"]);
    assert_eq!(messages(&a, &chat), ["written offline"]);
    relay.kill();
    let (_, deltas) = stored_deltas(&relay_dir, &chat);
    let epochs: Vec<u32> = deltas.iter().map(|d| d.epoch.0).collect();
    assert_eq!(epochs, [0, 1], "the title before the rotation, the queued message after it");
}

/// A session that expires is ended by the relay, which cannot rotate the keys itself: the
/// device that stays does, once it sees the expiry in the account log.
#[test]
fn an_expired_session_makes_the_remaining_device_rotate_the_keys() {
    use stratus_relay::core::{DeviceState, StoreOp};

    let dir = tempfile::tempdir().unwrap();
    let (mut relay, relay_dir, a, chat) = laptop_with_notes(dir.path());
    let b = dir.path().join("b");
    link_device(&relay, &a, &b, "phone");
    stratus_ok(&b, &["sync"]);
    let stolen = dir.path().join("stolen");
    copy_dir(&b, &stolen);
    stratus_ok(&a, &["account", "set-session-ttl", "30"]);
    let b_id = stratus_engine::store::device_id_of(
        &DeviceStore::open(&stolen.join("store")).unwrap().secrets_or_create(|| unreachable!()).unwrap(),
    );

    // Forty days pass for the phone: its last activity, as the relay keeps it, moves back.
    relay.kill();
    {
        let store = SledStore::open(&relay_dir.join("store")).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let day = 24 * 3600 * 1000;
        let state = DeviceState { registered_ms: now - 50 * day, last_active_ms: now - 40 * day, revoked: false };
        store.apply(&[StoreOp::PutDeviceState(b_id.clone(), state)]).unwrap();
        store.barrier().unwrap();
    }
    relay.restart();

    // Listing the sessions ends it; the laptop's next sync rotates the keys.
    let listed = stratus_ok(&a, &["devices"]);
    assert!(!listed.contains("phone"), "{listed}");
    stratus_ok(&a, &["sync"]);
    stratus_ok(&a, &["send", &chat, "after the expiry"]);
    relay.kill();

    let (store, deltas) = stored_deltas(&relay_dir, &chat);
    assert_eq!(store.recover().unwrap().account_gens.len(), 1, "one rotation");
    assert_eq!(deltas.iter().map(|d| d.epoch.0).collect::<Vec<_>>(), [0, 1], "the title, then the new message");
    let phone = DeviceStore::open(&stolen.join("store")).unwrap();
    let keys: Vec<ChatKey> = phone.chats().unwrap().into_iter().flat_map(|(_, m, _)| m.keys.into_values()).collect();
    let last = deltas.last().unwrap();
    assert!(
        keys.iter().all(|k| open_delta(&k.transport(), &last.ad(), &last.sealed).is_err()),
        "the expired phone cannot read it"
    );
}
