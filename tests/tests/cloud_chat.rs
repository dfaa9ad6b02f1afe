//! Cloud chats across one account's devices, against a real relay process.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use stratus_engine::proto::wire::{RelayFrame, PROTOCOL_VERSION};
use stratus_engine::{ChatId, Event, Session};
use stratus_tests::*;

async fn wait_converged(sessions: &[&Session], chat: ChatId, count: usize, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let mut done = true;
        for s in sessions {
            let st = s.status().await.expect("status");
            let n = s.messages(chat).await.expect("messages").len();
            done &= n == count && st.outbox == 0 && st.caught_up;
        }
        if done {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "devices did not converge within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn three_devices_send_concurrently_and_end_identical() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    rt().block_on(async {
        let mut a = new_account(&relay, &dir.path().join("a"), "a").await;
        let b = new_linked(&relay, &mut a, &dir.path().join("b"), "b").await;
        let c = new_linked(&relay, &mut a, &dir.path().join("c"), "c").await;
        let mut sa = Session::start(a).unwrap();
        let mut ea = sa.events();
        wait_event(&mut ea, 20, |e| matches!(e, Event::Connected)).await;
        let chat = sa.create_chat("three devices").await.unwrap();
        let mut sb = Session::start(b).unwrap();
        let mut sc = Session::start(c).unwrap();
        let mut eb = sb.events();
        let mut ec = sc.events();
        wait_event(&mut eb, 20, |e| matches!(e, Event::ChatAdded { chat: c } if *c == chat)).await;
        wait_event(&mut ec, 20, |e| matches!(e, Event::ChatAdded { chat: c } if *c == chat)).await;
        drop((ea, eb, ec));

        let sessions = [sa, sb, sc];
        let sends = sessions.iter().enumerate().map(|(i, s)| async move {
            for n in 0..300 {
                s.send(chat, &format!("device {i} message {n}")).await.expect("send");
            }
        });
        futures::future::join_all(sends).await;
        let refs: Vec<&Session> = sessions.iter().collect();
        wait_converged(&refs, chat, 900, 180).await;

        let logs = futures::future::join_all(sessions.iter().map(|s| s.messages(chat))).await;
        let ids: Vec<Vec<String>> = logs.into_iter().map(|l| l.unwrap().into_iter().map(|m| m.id).collect()).collect();
        assert_eq!(ids[0].len(), 900);
        assert_eq!(ids[0].iter().collect::<BTreeSet<_>>().len(), 900, "no duplicates");
        assert_eq!(ids[0], ids[1], "same ids in the same order on a and b");
        assert_eq!(ids[0], ids[2], "same ids in the same order on a and c");
        let heads = futures::future::join_all(sessions.iter().map(|s| s.heads(chat))).await;
        assert!(heads.windows(2).all(|w| w[0].as_ref().unwrap() == w[1].as_ref().unwrap()), "same heads");
    });
}

#[test]
fn offline_device_catches_up_with_one_sync_and_sends_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let (a, c) = (dir.path().join("a"), dir.path().join("c"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "catch-up"]).trim().to_string();
    link_device(&relay, &a, &c, "c");
    let chat_id: ChatId = chat.parse().unwrap();

    init_tracing();
    // c is offline (no process runs) while a writes 1,000 messages.
    rt().block_on(async {
        let session = Session::start(stratus_engine::Device::open(&a).unwrap()).unwrap();
        for n in 0..1000 {
            session.send(chat_id, &format!("bulk {n}")).await.unwrap();
        }
        wait_idle(&session, 120).await;
        session.stop().await.unwrap();
    });

    stratus_ok(&c, &["sync"]);
    let log = stratus_ok(&c, &["log", &chat, "--json"]);
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1000);
    for key in ["id", "author", "device", "text", "ts"] {
        assert!(lines.iter().all(|l| l.get(key).is_some()), "every line has {key}");
    }
    assert_eq!(lines[999]["text"], "bulk 999");

    // The relay goes away: c's message is durable locally and the exit code says so.
    relay.kill();
    let o = stratus(&c, &["send", &chat, "written offline"]);
    assert_eq!(o.status.code(), Some(3), "unreachable relay exits 3: {}", String::from_utf8_lossy(&o.stderr));
    assert!(stratus_ok(&c, &["log", &chat]).contains("written offline"), "shown locally at once");

    // c restarts (a new process) after the relay is back: the queued message goes out.
    relay.restart();
    stratus_ok(&c, &["sync"]);
    stratus_ok(&a, &["sync"]);
    let log_a = stratus_ok(&a, &["log", &chat]);
    assert_eq!(log_a.matches("written offline").count(), 1);
    assert_eq!(log_a, stratus_ok(&c, &["log", &chat]), "both devices show the same chat");
}

#[test]
/// The crash loop: a writer appends continuously while the relay is SIGKILLed at a random
/// moment 0–2,000 ms after each start and restarted. `STRATUS_CRASH_KILLS` sets the number of
/// kills (default 100; the long run uses 10,000).
fn relay_sigkilled_repeatedly_loses_and_duplicates_nothing_acknowledged() {
    let kills: usize = std::env::var("STRATUS_CRASH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(100);
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    rt().block_on(async {
        let mut a = new_account(&relay, &dir.path().join("a"), "writer").await;
        let reader = new_linked(&relay, &mut a, &dir.path().join("r"), "reader").await;
        let reader_keys = reader.keypair();
        drop(reader);
        let mut session = Session::start(a).unwrap();
        let mut events = session.events();
        wait_event(&mut events, 20, |e| matches!(e, Event::Connected)).await;
        let chat = session.create_chat("crash loop").await.unwrap();

        let session = std::sync::Arc::new(session);
        let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let acked2 = acked.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::Acked { client_seq, seq, .. }) => {
                        acked2.lock().unwrap().insert(client_seq, seq);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("event stream: {e}"),
                }
            }
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, stop2) = (session.clone(), stop.clone());
        let writer = tokio::spawn(async move {
            let mut sent = BTreeMap::new();
            let mut n = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let (m, cs) = s2.send(chat, &format!("crash {n}")).await.unwrap();
                sent.insert(cs, m.id);
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        });

        for _ in 0..kills {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=2000))).await;
            relay.kill();
            relay.restart();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = writer.await.unwrap();
        // Everything written is eventually acknowledged once the relay stays up.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while session.status().await.unwrap().outbox > 0 {
            assert!(tokio::time::Instant::now() < deadline, "outbox did not drain");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let acked = acked.lock().unwrap().clone();
        assert!(sent.len() > 20, "the writer made progress: {}", sent.len());
        assert_eq!(acked.len(), sent.len() + 2, "every message acknowledged, and the chat's creation and title");
        // The first item is the chat's creation: acknowledged, but not a delta in its log.
        let mut acked = acked;
        let creation = acked.pop_first().expect("the creation was acknowledged");
        assert_eq!(creation.1, None, "a creation has no seq");

        // Read the relay's log directly: contiguous seqs, each (device, client seq) once.
        let mut raw = Raw::connect(reader_keys, &relay.addr).await;
        assert!(matches!(raw.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
        let deltas = raw.fetch_all(chat).await;
        for (i, d) in deltas.iter().enumerate() {
            assert_eq!(d.seq.0, i as u64 + 1, "seqs are contiguous from 1");
        }
        let stored: BTreeMap<_, _> = deltas.iter().map(|d| (d.client_seq, d.seq)).collect();
        assert_eq!(stored.len(), deltas.len(), "no client seq stored twice");
        assert!(deltas.windows(2).all(|w| w[0].client_seq < w[1].client_seq), "stored in the order sent");
        for (cs, seq) in &acked {
            let at = stored.get(cs).unwrap_or_else(|| panic!("acknowledged client seq {cs:?} missing"));
            if let Some(seq) = seq {
                assert_eq!(at, seq, "stored where it was acknowledged");
            }
        }
        let messages = session.messages(chat).await.unwrap();
        let ids: BTreeSet<_> = messages.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), messages.len());
        assert!(sent.values().all(|id| ids.contains(id)));
    });
}

#[test]
fn watch_prints_each_message_from_another_device_as_it_arrives() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "live"]).trim().to_string();
    link_device(&relay, &a, &b, "b");
    let mut watch = std::process::Command::new(bin("stratus"))
        .arg("--home")
        .arg(&b)
        .args(["watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    for i in 0..3 {
        let text = format!("live {i}");
        stratus_ok(&a, &["send", &chat, &text]);
        let line = lines.next().expect("watch prints a line").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], text);
        assert_eq!(v["chat"], chat);
    }
    // The relay restarts; watch reconnects by itself and goes on.
    relay.restart();
    stratus_ok(&a, &["send", &chat, "after restart"]);
    let line = lines.next().expect("watch prints a line").unwrap();
    assert!(line.contains("after restart"), "{line}");
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(relay.terminate().and_then(|s| s.code()), Some(0), "SIGTERM is a clean exit");
}
