//! Secret chats (issue 6) between two real devices of two accounts, through a real relay
//! process on 127.0.0.1: the relay reserves a circuit for the device to be reached, the other
//! dials it through the relay, DCUtR tries a direct connection, and the secret chat's Noise
//! session runs over whichever carries it. Nothing of the chat reaches the relay's store.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use stratus_engine::net::{Net, SecretStream};
use stratus_engine::{Device, SecretId};
use stratus_tests::{files_under, init_tracing, new_account, Relay};

const IDLE: Duration = Duration::from_millis(1500);

/// Two accounts with a device each, usernames set, each a contact of the other.
async fn two_accounts(relay: &Relay, dir: &Path) -> (Device, Device) {
    let mut alice = new_account(relay, &dir.join("alice"), "alice phone").await;
    let mut bob = new_account(relay, &dir.join("bob"), "bob laptop").await;
    alice.set_username(Some("alice")).await.unwrap();
    bob.set_username(Some("bob")).await.unwrap();
    alice.lookup("bob").await.unwrap();
    bob.lookup("alice").await.unwrap();
    (alice, bob)
}

fn texts(d: &mut Device, id: SecretId) -> Vec<String> {
    d.secret_messages(id).unwrap().into_iter().map(|m| m.message.text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_chat_runs_between_two_devices_and_never_touches_the_relay() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (mut alice, mut bob) = two_accounts(&relay, dir.path()).await;

    // Alice picks bob's device from the relay's list (certificates checked) and writes while
    // no connection exists yet.
    let bob_account = bob.account().unwrap();
    let devices = alice.secret_devices(bob_account).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].0.body.device, *bob.id());
    let id = alice.secret_start(devices[0].0.clone()).unwrap();
    let markers = ["SECRET-MARKER-ONE-7f3a", "SECRET-MARKER-TWO-91bc", "SECRET-MARKER-BURN-c0de"];
    alice.secret_send(id, markers[0], None).unwrap();
    alice.secret_send(id, markers[1], None).unwrap();
    alice.secret_send(id, markers[2], Some(3600)).unwrap();

    // Bob's device is reachable through the relay; alice's dials it there.
    let mut bob_net = Net::start(bob.keypair()).unwrap();
    bob_net.listen_secret("/ip4/127.0.0.1/tcp/0".parse().unwrap(), &relay.addr).await.unwrap();
    let mut incoming = bob_net.accept_secret().unwrap();
    let mut alice_net = Net::start(alice.keypair()).unwrap();
    alice_net.listen_secret("/ip4/127.0.0.1/tcp/0".parse().unwrap(), &relay.addr).await.unwrap();
    let bob_peer = bob.keypair().public().to_peer_id();
    let direct = alice_net.connect_peer(bob_peer, &relay.addr).await.unwrap();
    eprintln!("direct connection: {direct}");

    let bob_side = tokio::spawn(async move {
        let (peer, stream) = incoming.next().await.unwrap();
        let mut stream = SecretStream::from(stream);
        let peer = stratus_engine::DeviceId(peer.to_string());
        let (mut link, first) = bob.secret_answer(&peer, &mut stream, true).await.unwrap().expect("taken at once");
        let updates = bob.secret_serve(&mut link, &mut stream, first, IDLE, |_| false).await.unwrap();
        (bob, updates, incoming, link, stream)
    });
    let mut stream = alice_net.open_secret(bob_peer).await.unwrap();
    let (mut link, first) = alice.secret_open(id, &mut stream).await.unwrap().expect("bob's device took it");
    alice.secret_serve(&mut link, &mut stream, first, IDLE, |_| false).await.unwrap();
    let (mut bob, updates, _incoming, mut bob_link, mut bob_stream) = bob_side.await.unwrap();

    assert_eq!(texts(&mut bob, id), markers);
    let arrived: usize = updates.iter().map(|u| u.added.len()).sum();
    assert_eq!(arrived, 3, "each message reported once");
    assert_eq!(alice.secret_fingerprint(id).unwrap(), bob.secret_fingerprint(id).unwrap());
    eprintln!("paths to bob (relayed?): {:?}", alice_net.paths(bob_peer).await);

    // Bob reads the one with a timer and answers; both timers run.
    let burn = bob.secret_messages(id).unwrap()[2].message.id.clone();
    bob.secret_read(id, &burn).unwrap();
    bob.secret_send(id, "SECRET-MARKER-REPLY-5eed", None).unwrap();
    let out = bob.secret_flush(&mut bob_link).unwrap();
    let bob_side = tokio::spawn(async move {
        bob.secret_serve(&mut bob_link, &mut bob_stream, out, IDLE, |_| false).await.unwrap();
        bob
    });
    alice.secret_serve(&mut link, &mut stream, Vec::new(), IDLE, |_| false).await.unwrap();
    let bob = bob_side.await.unwrap();
    assert_eq!(texts(&mut alice, id).last().map(String::as_str), Some("SECRET-MARKER-REPLY-5eed"));
    assert!(alice.secret_next_expiry().unwrap().is_some(), "alice's timer started when bob's read mark came");
    assert!(bob.secret_next_expiry().unwrap().is_some());

    // Nothing of the chat in the relay's files: no text, no chat id, no message key.
    drop((alice_net, bob_net, alice, bob));
    let keys = stratus_engine::store::DeviceStore::open(&dir.path().join("alice").join("store"))
        .unwrap()
        .message_keys(id)
        .unwrap();
    assert_eq!(keys.len(), 4);
    let mut relay = relay;
    relay.kill();
    let id_hex = id.to_string();
    let mut needles: Vec<Vec<u8>> = markers.iter().map(|m| m.as_bytes().to_vec()).collect();
    needles.push(b"SECRET-MARKER-REPLY-5eed".to_vec());
    needles.push(id_hex.as_bytes().to_vec());
    needles.push(id.0.to_vec());
    needles.extend(keys.iter().map(|(_, k)| k.key.to_vec()));
    for f in files_under(&relay.data_dir) {
        let bytes = std::fs::read(&f).unwrap();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == &n[..]),
                "{} holds {:?}",
                f.display(),
                String::from_utf8_lossy(n)
            );
        }
    }
}
