//! Secret chats (issue 6) between two real devices of two accounts, through a real relay
//! process on 127.0.0.1: the relay reserves a circuit for the device to be reached, the other
//! dials it through the relay, DCUtR tries a direct connection, and the secret chat's Noise
//! session runs over whichever carries it. Nothing of the chat reaches the relay's store, and
//! when the relay carries the session, nothing readable passes through it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use stratus_engine::net::{Net, SecretStream};
use stratus_engine::{Device, SecretId};
use stratus_tests::{files_under, init_tracing, new_account, Relay};

const IDLE: Duration = Duration::from_millis(1500);
const MARKERS: [&str; 3] = ["SECRET-MARKER-ONE-7f3a", "SECRET-MARKER-TWO-91bc", "SECRET-MARKER-BURN-c0de"];
const REPLY: &str = "SECRET-MARKER-REPLY-5eed";

/// Two accounts with a device each, usernames set, each a contact of the other.
async fn two_accounts(relay: &Relay, dir: &Path) -> (Device, Device) {
    let mut alice = new_account(relay, &dir.join("alice"), "alice phone").await;
    let mut bob = new_account(relay, &dir.join("bob"), "bob laptop").await;
    alice.set_username(Some("alice")).await.unwrap();
    bob.set_username(Some("bob")).await.unwrap();
    alice.lookup("bob").await.unwrap();
    bob.lookup("alice").await.unwrap();
    // Each shows the other its devices (issue 15, item 10).
    let (ia, ib) = (alice.account().unwrap(), bob.account().unwrap());
    alice.accept_chats_from(ib, true).await.unwrap();
    bob.accept_chats_from(ia, true).await.unwrap();
    (alice, bob)
}

fn texts(d: &mut Device, id: SecretId) -> Vec<String> {
    d.secret_messages(id).unwrap().into_iter().map(|m| m.message.text).collect()
}

/// What a conversation left behind.
struct Conversation {
    alice: Device,
    bob: Device,
    id: SecretId,
    /// The connection between the devices was direct.
    direct: bool,
}

/// Alice starts a secret chat with bob's device and writes three messages while no connection
/// exists; both devices then reach each other through the relay at `relay_addr` (listening on
/// TCP too if `tcp`), the messages arrive, bob reads the one with a timer and replies.
async fn conversation(relay: &Relay, relay_addr: &str, dir: &Path, tcp: bool) -> Conversation {
    let (mut alice, mut bob) = two_accounts(relay, dir).await;
    let bob_account = bob.account().unwrap();
    let devices = alice.secret_devices(bob_account).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].0.body.device, *bob.id());
    let id = alice.secret_start(devices[0].0.clone()).unwrap();
    bob.set_secret_auto_accept(true).unwrap();
    alice.secret_send(id, MARKERS[0], None).unwrap();
    alice.secret_send(id, MARKERS[1], None).unwrap();
    alice.secret_send(id, MARKERS[2], Some(3600)).unwrap();

    let listen = || tcp.then(|| "/ip4/127.0.0.1/tcp/0".parse().unwrap());
    let mut bob_net = Net::start(bob.keypair()).unwrap();
    bob_net.listen_secret(listen(), relay_addr).await.unwrap();
    let mut incoming = bob_net.accept_secret().unwrap();
    let mut alice_net = Net::start(alice.keypair()).unwrap();
    alice_net.listen_secret(listen(), relay_addr).await.unwrap();
    let bob_peer = bob.keypair().public().to_peer_id();
    let direct = alice_net.connect_peer(bob_peer, relay_addr).await.unwrap();
    assert_eq!(alice_net.paths(bob_peer).await, [!direct], "one connection: direct, or relayed");

    let bob_side = tokio::spawn(async move {
        let (peer, stream) = incoming.next().await.unwrap();
        let mut stream = SecretStream::from(stream);
        let peer = stratus_engine::DeviceId(peer.to_string());
        let (mut link, first) = bob.secret_answer(&peer, &mut stream).await.unwrap().expect("taken at once");
        let updates = bob.secret_serve(&mut link, &mut stream, first, IDLE, |_| false).await.unwrap();
        (bob, updates, incoming, link, stream)
    });
    let mut stream = alice_net.open_secret(bob_peer).await.unwrap();
    let (mut link, first) = alice.secret_open(id, &mut stream).await.unwrap().expect("bob's device took it");
    alice.secret_serve(&mut link, &mut stream, first, IDLE, |_| false).await.unwrap();
    let (mut bob, updates, _incoming, mut bob_link, mut bob_stream) = bob_side.await.unwrap();
    assert_eq!(texts(&mut bob, id), MARKERS);
    let arrived: usize = updates.iter().map(|u| u.added.len()).sum();
    assert_eq!(arrived, 3, "each message reported once");
    assert_eq!(alice.secret_fingerprint(id).unwrap(), bob.secret_fingerprint(id).unwrap());

    // Bob reads the one with a timer and answers; both timers run.
    let burn = bob.secret_messages(id).unwrap()[2].message.id.clone();
    bob.secret_read(id, &burn).unwrap();
    bob.secret_send(id, REPLY, None).unwrap();
    let out = bob.secret_flush(&mut bob_link).unwrap();
    let bob_side = tokio::spawn(async move {
        bob.secret_serve(&mut bob_link, &mut bob_stream, out, IDLE, |_| false).await.unwrap();
        bob
    });
    alice.secret_serve(&mut link, &mut stream, Vec::new(), IDLE, |_| false).await.unwrap();
    let bob = bob_side.await.unwrap();
    assert_eq!(texts(&mut alice, id).last().map(String::as_str), Some(REPLY));
    assert!(alice.secret_next_expiry().unwrap().is_some(), "alice's timer started when bob's read mark came");
    assert!(bob.secret_next_expiry().unwrap().is_some());
    Conversation { alice, bob, id, direct }
}

/// What must never be seen outside the two devices: the texts, the chat id, the message keys
/// (read from alice's store once her device is closed).
fn secrets_of(c: Conversation, dir: &Path) -> Vec<Vec<u8>> {
    let id = c.id;
    drop((c.alice, c.bob));
    let store = stratus_engine::store::DeviceStore::open(&dir.join("alice").join("store")).unwrap();
    let keys = store.message_keys(id).unwrap();
    assert_eq!(keys.len(), 4);
    let mut needles: Vec<Vec<u8>> = MARKERS.iter().chain([&REPLY]).map(|m| m.as_bytes().to_vec()).collect();
    needles.push(id.to_string().into_bytes());
    needles.push(id.0.to_vec());
    needles.extend(keys.iter().map(|(_, k)| k.key.to_vec()));
    needles
}

fn assert_absent(what: &str, bytes: &[u8], needles: &[Vec<u8>]) {
    for n in needles {
        assert!(!bytes.windows(n.len()).any(|w| w == &n[..]), "{what} holds {:?}", String::from_utf8_lossy(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_chat_runs_over_a_direct_connection_and_never_touches_the_relay_store() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let addr = relay.addr.clone();
    let c = conversation(&relay, &addr, dir.path(), true).await;
    assert!(c.direct, "on 127.0.0.1 DCUtR makes a direct connection");
    let needles = secrets_of(c, dir.path());
    relay.kill();
    for f in files_under(&relay.data_dir) {
        assert_absent(&f.display().to_string(), &std::fs::read(&f).unwrap(), &needles);
    }
}

/// Neither device listens on TCP, so no direct connection can be made: the relay's circuit
/// carries the whole session. Every byte between the devices and the relay passes a recording
/// proxy: none of it is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_relays_circuit_the_relay_carries_only_ciphertext() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let (proxy_addr, seen) = recording_proxy(&relay.addr).await;
    let c = conversation(&relay, &proxy_addr, dir.path(), false).await;
    assert!(!c.direct, "nothing to hole-punch to: the circuit carries it");
    let needles = secrets_of(c, dir.path());
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 10_000, "the session passed the proxy: {} bytes", seen.len());
    assert_absent("the relay's traffic", &seen, &needles);
    relay.kill();
    for f in files_under(&relay.data_dir) {
        assert_absent(&f.display().to_string(), &std::fs::read(&f).unwrap(), &needles);
    }
}

/// Copies one direction of a proxied connection, recording the bytes.
async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        log.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// A TCP proxy in front of the relay that records every byte both ways; returns the relay's
/// address through it.
async fn recording_proxy(relay_addr: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    let (ip_port, peer) = relay_addr.split_once("/p2p/").unwrap();
    let port: u16 = ip_port.rsplit('/').next().unwrap().parse().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(copy_recording(ri, wo, log.clone()));
            tokio::spawn(copy_recording(ro, wi, log.clone()));
        }
    });
    (format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer}", local.port()), seen)
}

/// `stratus secret listen --for SECS` on `home`, started and listening.
fn listening(home: &Path, secs: u32) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(stratus_tests::bin("stratus"))
        .arg("--home")
        .arg(home)
        .args(["secret", "listen", "--for", &secs.to_string(), "--tcp", "/ip4/127.0.0.1/tcp/0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("stratus runs");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    (child, out)
}

/// What a `listening` device printed until it stopped.
fn finished(mut l: (std::process::Child, std::io::BufReader<std::process::ChildStdout>)) -> String {
    use std::io::Read;
    assert!(l.0.wait().unwrap().success());
    let mut rest = String::new();
    l.1.read_to_string(&mut rest).unwrap();
    rest
}

/// The CLI, as two users would run it: bob's device listens; alice starts a secret chat, bob
/// accepts it, messages pass, one with a timer disappears from both devices after bob read
/// it, both see the same fingerprint, alice's other device never sees the chat, and closing
/// deletes it on both devices.
#[test]
fn the_cli_starts_accepts_sends_and_closes_a_secret_chat() {
    use stratus_tests::{stratus, stratus_ok};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
        stratus_ok(home, &["account", "set-username", name]);
    }
    stratus_ok(&bob, &["contact", "accept", "alice"]);
    stratus_ok(&alice, &["contact", "accept", "bob"]);

    let l = listening(&bob, 6);
    let started = stratus(&alice, &["secret", "start", "bob"]);
    assert!(started.status.success());
    let id = String::from_utf8_lossy(&started.stdout).trim().to_string();
    assert_eq!(id.len(), 32, "the id alone: {id}");
    let said = String::from_utf8_lossy(&started.stderr);
    assert!(said.contains("waiting for the other device to accept"), "{said}");
    assert!(finished(l).contains("secret accept"));
    assert!(stratus_ok(&bob, &["secret", "list"]).contains("[invited]"));
    stratus_ok(&bob, &["secret", "accept", &id]);

    let l = listening(&bob, 8);
    stratus_ok(&alice, &["secret", "send", &id, "hello secret"]);
    stratus_ok(&alice, &["secret", "send", &id, "burn after reading", "--ttl", "2"]);
    let printed = finished(l);
    assert!(printed.contains("hello secret") && printed.contains("burn after reading"), "{printed}");
    let log = stratus_ok(&bob, &["secret", "log", &id]);
    assert!(log.contains("burn after reading") && log.contains("⏱2s"), "{log}");

    // Bob read it: his read mark reaches alice's device, and both timers run out.
    let l = listening(&alice, 6);
    assert!(stratus_ok(&bob, &["secret", "sync"]).contains("delivered"));
    finished(l);
    std::thread::sleep(Duration::from_millis(2500));
    for home in [&alice, &bob] {
        let log = stratus_ok(home, &["secret", "log", &id]);
        assert!(log.contains("hello secret") && !log.contains("burn after reading"), "{log}");
    }
    let fp = |home: &Path| stratus_ok(home, &["secret", "verify", &id]);
    assert_eq!(fp(&alice), fp(&bob));
    // Alice's other devices never see it: nothing of it is on the relay to sync.
    let tablet = dir.path().join("alice2");
    stratus_tests::link_device(&relay, &alice, &tablet, "alice tablet");
    stratus_ok(&tablet, &["sync"]);
    assert_eq!(stratus_ok(&tablet, &["secret", "list"]), "");
    assert!(stratus(&tablet, &["secret", "log", &id]).status.code() == Some(1));

    // Bob closes it: gone here at once, and on alice's device once reached.
    let l = listening(&alice, 6);
    let closed = stratus_ok(&bob, &["secret", "close", &id]);
    assert!(closed.contains("closed on the other device"), "{closed}");
    let printed = finished(l);
    assert_eq!(stratus_ok(&alice, &["secret", "list"]), "", "alice's device printed: {printed}; bob's: {closed}");
    assert_eq!(stratus_ok(&bob, &["secret", "list"]), "");
}

/// The relay's circuits are for devices with a session: a peer it does not know gets no
/// reservation (and so cannot be reached through it, nor use it to reach others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_circuits_only_to_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let mut stranger = Net::start(stratus_engine::libp2p::identity::Keypair::generate_ed25519()).unwrap();
    assert!(stranger.listen_secret(None, &relay.addr).await.is_err(), "a stranger got a reservation");
    let device = new_account(&relay, &dir.path().join("alice"), "alice phone").await;
    let mut net = Net::start(device.keypair()).unwrap();
    net.listen_secret(None, &relay.addr).await.expect("a device with a session gets one");
}
