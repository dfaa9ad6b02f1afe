//! `secret_bench`: a secret chat's handshake time and message latency between two real devices
//! (two accounts, each its own store with fsync) over a direct libp2p connection on 127.0.0.1,
//! made through a real `stratus-relay` process and DCUtR. See docs/benchmarks.md for results.
//!
//! 1. Noise KK handshake alone (CPU, in memory), and the secret chat opening over the direct
//!    connection: a new stream, the opening and answer, the KK handshake, both links up
//!    (`Device::secret_open` on one side, `Device::secret_answer` on the other).
//! 2. Message latency: alice writes a message (durable in her store), seals and sends it; the
//!    time until bob's device has applied it and stored it durably. One message at a time.
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay --bins
//! target/release/secret_bench [--handshakes N] [--messages N]
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::SeedableRng;
use stratus_engine::net::{Net, SecretStream};
use stratus_engine::secret::{Ends, Handshake, Pattern};
use stratus_engine::{Device, DeviceId};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!("n={} p50={:?} p99={:?} max={:?}", v.len(), at(0.50), at(0.99), v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (handshakes, messages) = (arg("--handshakes", 200), arg("--messages", 500));
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_bin = std::env::current_exe().expect("exe").with_file_name("stratus-relay");
    let mut relay = Command::new(relay_bin)
        .args(["--data-dir", dir.path().join("relay").to_str().expect("utf-8"), "--listen", "/ip4/127.0.0.1/tcp/0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("stratus-relay next to this binary");
    let mut line = String::new();
    BufReader::new(relay.stdout.take().expect("piped")).read_line(&mut line).expect("relay address");
    let addr = line.trim().strip_prefix("listening ").expect("the relay's address").to_string();

    // Pure CPU: the KK handshake in memory.
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let public = |s: [u8; 32]| x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(s)).to_bytes();
    let (da, db) = (DeviceId("a".into()), DeviceId("b".into()));
    let ends = Ends { chat: stratus_engine::SecretId([1; 16]), initiator: &da, responder: &db };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut cpu = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let mut i = Handshake::new(Pattern::KK, true, &ends, &a, &public(b), &mut rng).expect("kk");
        let mut r = Handshake::new(Pattern::KK, false, &ends, &b, &public(a), &mut rng).expect("kk");
        r.read(&i.write(b"").expect("write")).expect("read");
        i.read(&r.write(b"").expect("write")).expect("read");
        i.finish(0).expect("finish");
        r.finish(0).expect("finish");
        cpu.push(t.elapsed());
    }
    println!("noise KK handshake, both sides, in memory: {}", percentiles(cpu));

    let mut alice = Device::open(&dir.path().join("alice")).expect("device");
    let mut bob = Device::open(&dir.path().join("bob")).expect("device");
    alice.create_account(&addr, "alice").await.expect("account");
    bob.create_account(&addr, "bob").await.expect("account");
    alice.set_username(Some("alice")).await.expect("username");
    bob.set_username(Some("bob")).await.expect("username");
    alice.lookup("bob").await.expect("lookup");
    bob.lookup("alice").await.expect("lookup");
    bob.accept_chats_from(alice.account().expect("account"), true).await.expect("accept");
    alice.accept_chats_from(bob.account().expect("account"), true).await.expect("accept");
    let bob_cert = alice.secret_devices(bob.account().expect("account")).await.expect("devices")[0].0.clone();
    let id = alice.secret_start(bob_cert).expect("start");
    bob.set_secret_auto_accept(true).expect("auto-accept");

    let mut bob_net = Net::start(bob.keypair()).expect("net");
    bob_net.listen_secret(Some("/ip4/127.0.0.1/tcp/0".parse().expect("addr")), &addr).await.expect("listen");
    let mut incoming = bob_net.accept_secret().expect("accept");
    let mut alice_net = Net::start(alice.keypair()).expect("net");
    alice_net.listen_secret(Some("/ip4/127.0.0.1/tcp/0".parse().expect("addr")), &addr).await.expect("listen");
    let bob_peer = bob.keypair().public().to_peer_id();
    let direct = alice_net.connect_peer(bob_peer, &addr).await.expect("connect");
    println!("connection: {}", if direct { "direct (DCUtR)" } else { "relayed" });

    // Bob answers every stream; the last one carries the messages, reporting each arrival.
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let bob_task = tokio::spawn(async move {
        for n in 0..=handshakes {
            let (peer, stream) = incoming.next().await.expect("a stream");
            let mut stream = SecretStream::from(stream);
            let peer = DeviceId(peer.to_string());
            let (mut link, first) = bob.secret_answer(&peer, &mut stream).await.expect("answer").expect("taken");
            for f in &first {
                stream.send(f).await.expect("send");
            }
            if n < handshakes {
                continue;
            }
            let tx = arrived_tx.clone();
            let report = |u: &stratus_engine::SecretUpdate| {
                for m in &u.added {
                    let _ = tx.send((m.message.text.clone(), Instant::now()));
                }
                false
            };
            if let Err(e) = bob.secret_serve(&mut link, &mut stream, Vec::new(), Duration::from_secs(30), report).await
            {
                eprintln!("bob's link failed: {e}");
            }
        }
    });

    let mut opening = Vec::new();
    for n in 0..=handshakes {
        let t = Instant::now();
        let mut stream = alice_net.open_secret(bob_peer).await.expect("stream");
        let (mut link, first) = alice.secret_open(id, &mut stream).await.expect("open").expect("go");
        let took = t.elapsed();
        if n < handshakes {
            opening.push(took);
            continue;
        }
        println!("secret chat opening over the connection (stream, opening, KK, links up): {}", percentiles(opening));
        for f in &first {
            stream.send(f).await.expect("send");
        }
        let mut latency = Vec::new();
        for k in 0..messages {
            let text = format!("m{k}");

            let t = Instant::now();
            alice.secret_send(id, &text, None).expect("send");
            for f in alice.secret_flush(&mut link).expect("flush") {
                stream.send(&f).await.expect("send");
            }
            // Alice answers bob's sync replies until bob reports this message applied.
            loop {
                tokio::select! {
                    Some((got, at)) = arrived_rx.recv() => if got == text {
                        latency.push(at - t);
                        break;
                    },
                    frame = stream.recv() => {
                        let frame = frame.expect("recv").expect("open stream");
                        let (out, _) = alice.secret_receive(&mut link, &frame).expect("receive");
                        for f in &out {
                            stream.send(f).await.expect("send");
                        }
                    }
                }
            }
        }
        println!(
            "message latency, written on alice's device to applied and stored on bob's: {}",
            percentiles(latency.clone())
        );
        let tenth = (latency.len() / 10).max(1);
        println!("  the first {tenth} messages (a near-empty chat): {}", percentiles(latency[..tenth].to_vec()));
        println!("  the last {tenth}: {}", percentiles(latency[latency.len() - tenth..].to_vec()));
        break;
    }
    drop(alice_net);
    bob_task.abort();
    let _ = relay.kill();
    let _ = relay.wait();
}
