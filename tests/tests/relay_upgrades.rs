//! Upgrades (issue 19, item 6), against the real relay binary: a device speaking a protocol
//! version outside the relay's range is refused at its `Hello` in words naming both versions;
//! a store from before format versions opens with its data and is stamped; a store of a newer
//! format stops the relay with one line, untouched.

use std::process::{Command, Stdio};

use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::proto::wire::{ErrorCode, RelayFrame, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use stratus_relay::store::STORE_FORMAT;
use stratus_tests::*;

#[test]
fn a_device_outside_the_protocol_range_is_told_both_versions_and_which_side_to_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let rt = rt();
    rt.block_on(async {
        for (version, words) in [
            (MIN_PROTOCOL_VERSION - 1, "older than this relay accepts"),
            (PROTOCOL_VERSION + 1, "newer than this relay accepts"),
            (0, "older than this relay accepts"),
        ] {
            // A hand-made Hello, as a device of that version sends it.
            let mut r = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
            match r.hello(version).await {
                RelayFrame::Error { req: None, code: ErrorCode::UnsupportedVersion, message } => {
                    let range = format!("({MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})");
                    assert!(message.contains(&format!("sync protocol {version} is {words} {range}")), "{message}");
                    let upgrade = if version < MIN_PROTOCOL_VERSION { "the device's app" } else { "the relay" };
                    assert!(message.ends_with(&format!("upgrade {upgrade}")), "{message}");
                }
                other => panic!("version {version}: {other:?}"),
            }
            assert!(r.next().await.is_none(), "the stream closes after the refusal");
        }
        // Every version in the range is served.
        for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            let mut r = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
            assert!(matches!(r.hello(version).await, RelayFrame::Hello { version: PROTOCOL_VERSION, .. }));
        }
    });
}

/// The `meta` tree's `format` key of the relay's store at `store`, set or removed with sled
/// itself (the relay stopped).
fn set_format(store: &std::path::Path, format: Option<u32>) {
    let db = sled::open(store).unwrap();
    let meta = db.open_tree("meta").unwrap();
    match format {
        Some(f) => meta.insert("format", &f.to_be_bytes()).unwrap(),
        None => meta.remove("format").unwrap(),
    };
    db.flush().unwrap();
}

#[test]
fn a_store_of_the_previous_format_is_migrated_and_a_newer_one_stops_the_relay_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data);
    let a = dir.path().join("a");
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "kept"]).trim().to_string();
    stratus_ok(&a, &["send", &chat, "written before the upgrade"]);
    assert!(relay.terminate().is_some_and(|s| s.success()));

    // The store as the relay before format versions left it: no `format`.
    set_format(&data.join("store"), None);
    relay.restart();
    assert!(relay.log().contains("migrating the store"), "{}", relay.log());
    stratus_ok(&a, &["send", &chat, "written after it"]);
    let b = dir.path().join("b");
    link_device(&relay, &a, &b, "b");
    let log = stratus_ok(&b, &["log", &chat]);
    assert!(log.contains("written before the upgrade") && log.contains("written after it"), "{log}");
    assert!(relay.terminate().is_some_and(|s| s.success()));
    let store = stratus_relay::store::SledStore::open(&data.join("store")).unwrap();
    assert_eq!(store.format().unwrap(), Some(STORE_FORMAT), "the version is written");
    drop(store);

    // A newer format: the relay refuses to start, in one line, and changes nothing.
    set_format(&data.join("store"), Some(STORE_FORMAT + 1));
    let o = Command::new(bin("stratus-relay"))
        .args(["--data-dir", data.to_str().unwrap(), "--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("STRATUS_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!("store format v{} is newer than this binary supports (v{STORE_FORMAT})", STORE_FORMAT + 1);
    assert!(err.contains(&want), "{err}");
    let db = sled::open(data.join("store")).unwrap();
    let format = db.open_tree("meta").unwrap().get("format").unwrap().unwrap();
    assert_eq!(format.as_ref(), (STORE_FORMAT + 1).to_be_bytes(), "left as it was");
}
