//! Each relay limit against the real relay binary, set low by its command-line flag: the limit
//! holds, the device over it gets a typed answer, and another device is served as usual.

use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::proto::wire::{ClientFrame, ErrorCode, RelayFrame, PROTOCOL_VERSION};
use stratus_engine::{ChatId, Seq, Session};
use stratus_tests::*;

/// `acct`'s device is served: an append is acknowledged.
async fn served(relay: &Relay, acct: &Acct, cs: u64) {
    let mut r = raw(relay, acct).await;
    let reply = r.request(append(1, acct.chat, cs, 64)).await;
    assert!(matches!(reply, RelayFrame::Acked { .. }), "another device is served: {reply:?}");
}

fn code_of(f: &RelayFrame) -> Option<ErrorCode> {
    match f {
        RelayFrame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn connections_in_total_and_per_peer_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let relay =
        Relay::start_with(&dir.path().join("relay"), &["--max-connections", "4", "--max-connections-per-peer", "2"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    rt().block_on(async {
        let mut kept = vec![raw(&relay, &a).await];
        // Two connections of one peer; a third is refused.
        let peer = Keypair::generate_ed25519();
        for _ in 0..2 {
            let mut r = Raw::connect(peer.clone(), &relay.addr).await;
            assert!(matches!(r.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: None, .. }));
            kept.push(r);
        }
        assert!(refused(peer.clone(), &relay.addr).await, "a third connection of one peer is refused");
        // A fourth connection in total (another peer) is fine; a fifth is refused.
        let mut r = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
        assert!(matches!(r.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { .. }));
        kept.push(r);
        assert!(refused(Keypair::generate_ed25519(), &relay.addr).await, "a fifth connection is refused");
        // The connections that were let in are served as before.
        let reply = kept[0].request(append(2, a.chat, 1000, 64)).await;
        assert!(matches!(reply, RelayFrame::Acked { .. }), "{reply:?}");
        assert!(matches!(kept[1].request(ClientFrame::SyncState { req: 3 }).await, RelayFrame::Error { .. }));
    });
    assert!(relay.log().contains("connection refused"), "the relay logs refused connections");
}

/// True when a connection with `keys` is refused: the dial, the stream or the first answer fails.
async fn refused(keys: Keypair, addr: &str) -> bool {
    match Raw::try_connect(keys, addr).await {
        Err(_) => true,
        Ok(mut r) => {
            let _ = r.stream.send(&ClientFrame::Hello { version: PROTOCOL_VERSION }).await;
            !matches!(
                tokio::time::timeout(std::time::Duration::from_secs(10), r.stream.recv()).await,
                Ok(Ok(Some(RelayFrame::Hello { .. })))
            )
        }
    }
}

#[test]
fn streams_per_connection_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--max-streams-per-connection", "1"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let b = account(&relay, &dir.path().join("b"), "b");
    rt().block_on(async {
        let mut first = raw(&relay, &a).await;
        // A second stream on the same connection is reset before it is served.
        let mut second = first.open_stream().await.expect("the stream opens; the relay resets it");
        let _ = second.send(&ClientFrame::Hello { version: PROTOCOL_VERSION }).await;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(20), second.recv()).await.expect("answered");
        assert!(matches!(answer, Ok(None) | Err(_)), "the extra stream is reset: {answer:?}");
        // The first stream and other devices go on.
        assert!(matches!(first.request(append(2, a.chat, 1000, 64)).await, RelayFrame::Acked { .. }));
        served(&relay, &b, 1000).await;
    });
    assert!(relay.log().contains("too many sync streams"));
}

#[test]
fn frames_over_the_configured_size_close_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--max-frame-bytes", "70000"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let b = account(&relay, &dir.path().join("b"), "b");
    rt().block_on(async {
        // The largest delta still fits under the lowest allowed frame limit.
        let mut r = raw(&relay, &a).await;
        let reply = r.request(append(1, a.chat, 1000, stratus_engine::proto::wire::MAX_DELTA_BYTES)).await;
        assert!(matches!(reply, RelayFrame::Acked { .. }), "{reply:?}");
        // A frame over it: a typed error, then the stream closes.
        r.stream.send_raw_frame(&vec![0u8; 80_000]).await.unwrap();
        assert_eq!(code_of(&r.next().await.expect("an error first")), Some(ErrorCode::FrameTooLarge));
        assert!(matches!(
            tokio::time::timeout(std::time::Duration::from_secs(20), r.stream.recv()).await.expect("closed"),
            Ok(None) | Err(_)
        ));
        served(&relay, &b, 1000).await;
        served(&relay, &a, 1001).await;
    });
    // A limit the protocol cannot honour is refused at start with a message.
    let o = std::process::Command::new(bin("stratus-relay"))
        .args(["--data-dir", dir.path().join("other").to_str().unwrap(), "--max-frame-bytes", "1000"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be between"));
}

#[test]
fn requests_over_the_rate_get_rate_limited_with_a_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--requests-per-second", "1", "--request-burst", "5"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let b = account(&relay, &dir.path().join("b"), "b");
    rt().block_on(async {
        let mut r = raw(&relay, &a).await;
        // 30 requests at once: the burst is served, the rest are told to wait up to 1 s.
        for req in 1..=30 {
            r.stream.send(&ClientFrame::SyncState { req }).await.unwrap();
        }
        let mut limited = 0;
        for _ in 1..=30 {
            match r.next().await.expect("an answer") {
                RelayFrame::SyncState { .. } => {}
                RelayFrame::RateLimited { retry_after_ms, .. } => {
                    assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
                    limited += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(limited >= 1, "some requests were over the rate");
        // Another device has its own budget.
        served(&relay, &b, 1000).await;
    });
}

/// The real device under a tight rate and a tight in-flight cap: everything it sends is stored
/// once, in order, and reaches its other device.
#[test]
fn a_limited_device_loses_nothing_and_its_other_device_gets_everything() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut relay = Relay::start(&dir.path().join("relay"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat: ChatId = stratus_ok(&a, &["chat", "create", "--title", "t"]).trim().parse().unwrap();
    link_device(&relay, &a, &b, "b");
    stratus_ok(&b, &["sync"]);
    relay.restart_with(&["--requests-per-second", "100", "--request-burst", "10", "--max-appends-in-flight", "3"]);
    let n = 80;
    rt().block_on(async {
        let mut sa = Session::start(stratus_engine::Device::open(&a).unwrap()).unwrap();
        let mut sb = Session::start(stratus_engine::Device::open(&b).unwrap()).unwrap();
        let mut events_a = sa.events();
        let mut events_b = sb.events();
        for i in 0..n {
            sa.send(chat, &format!("m{i:03}")).await.unwrap();
        }
        let mut acked = std::collections::BTreeSet::new();
        while acked.len() < n {
            if let stratus_engine::Event::Acked { client_seq, seq, .. } =
                wait_event(&mut events_a, 60, |e| matches!(e, stratus_engine::Event::Acked { .. })).await
            {
                assert!(seq.is_some(), "acknowledged as a duplicate: {client_seq:?} was never stored before");
                assert!(acked.insert(client_seq), "acknowledged twice");
            }
        }
        let mut got = 0;
        while got < n {
            wait_event(&mut events_b, 60, |e| matches!(e, stratus_engine::Event::MessageAdded { local: false, .. }))
                .await;
            got += 1;
        }
        let texts: Vec<String> = sb.messages(chat).await.unwrap().into_iter().map(|m| m.text).collect();
        let want: Vec<String> = (0..n).map(|i| format!("m{i:03}")).collect();
        assert_eq!(texts.iter().filter(|t| t.starts_with('m')).cloned().collect::<Vec<_>>(), want);
        sa.stop().await.unwrap();
        sb.stop().await.unwrap();
        // On the relay: one delta per client seq, client seqs increasing with seq.
        let mut r = Raw::connect(stratus_engine::Device::open(&b).unwrap().keypair(), &relay.addr).await;
        r.hello(PROTOCOL_VERSION).await;
        let all = r.fetch_all(chat).await;
        // Every delta is a's: the title, then the messages.
        let client_seqs: Vec<u64> = all.iter().map(|d| d.client_seq.0).collect();
        assert!(client_seqs.windows(2).all(|w| w[0] < w[1]), "stored once each, in order: {client_seqs:?}");
        assert!(all.len() > n, "the title and {n} messages: {}", all.len());
    });
    assert!(relay.log().contains("rate limited"), "the limits were hit");
}

#[test]
fn appends_in_flight_are_capped_and_later_client_seqs_wait_for_a_refused_one() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--max-appends-in-flight", "2"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let b = account(&relay, &dir.path().join("b"), "b");
    rt().block_on(async {
        let mut r = raw(&relay, &a).await;
        let n = 100u64;
        for i in 0..n {
            r.stream.send(&append(i, a.chat, 1000 + i, 64)).await.unwrap();
        }
        let mut acked = Vec::new();
        let mut limited = Vec::new();
        for _ in 0..n {
            match r.next().await.expect("an answer") {
                RelayFrame::Acked { client_seq, .. } => acked.push(client_seq.0),
                RelayFrame::RateLimited { req, .. } => limited.push(1000 + req),
                RelayFrame::Push { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(!limited.is_empty(), "100 appends at once exceed 2 in flight");
        acked.sort();
        limited.sort();
        // Everything after the first refusal was refused too: what was stored is a prefix.
        assert_eq!(acked, (1000..limited[0]).collect::<Vec<_>>());
        // Another device is not held back by a's appends in flight.
        served(&relay, &b, 1000).await;
        // Sent again one at a time, in order, every refused append is stored.
        for (i, cs) in limited.iter().enumerate() {
            let reply = r.request(append(1000 + i as u64, a.chat, *cs, 64)).await;
            assert!(matches!(reply, RelayFrame::Acked { .. }), "{cs}: {reply:?}");
        }
        let stored: Vec<u64> =
            r.fetch_all(a.chat).await.iter().map(|d| d.client_seq.0).filter(|cs| *cs >= 1000).collect();
        assert_eq!(stored, (1000..1000 + n).collect::<Vec<_>>());
    });
}

#[test]
fn fetches_in_flight_are_capped_for_a_device_that_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--max-fetches-in-flight", "2"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let b = account(&relay, &dir.path().join("b"), "b");
    rt().block_on(async {
        // About 1 MiB in a's chat: four pages of up to 256 KiB.
        let mut w = raw(&relay, &a).await;
        for i in 0..16 {
            assert!(matches!(w.request(append(i, a.chat, 1000 + i, 60_000)).await, RelayFrame::Acked { .. }));
        }
        // Ten page requests without reading: beyond the two in flight, only pages the
        // transport has taken can be followed by more; the rest are refused at once.
        let mut r = raw(&relay, &a).await;
        for req in 1..=10 {
            r.stream.send(&ClientFrame::FetchChat { req, chat: a.chat, after: Seq(0), max: 512 }).await.unwrap();
        }
        // Another device's fetch is answered meanwhile.
        let mut rb = raw(&relay, &b).await;
        let page = rb.request(ClientFrame::FetchChat { req: 1, chat: b.chat, after: Seq(0), max: 512 }).await;
        assert!(matches!(page, RelayFrame::ChatPage { .. }), "{page:?}");
        let (mut pages, mut limited) = (0, 0);
        for _ in 1..=10 {
            match r.next().await.expect("an answer") {
                RelayFrame::ChatPage { deltas, .. } => {
                    assert!(!deltas.is_empty());
                    pages += 1;
                }
                RelayFrame::RateLimited { retry_after_ms, .. } => {
                    assert!(retry_after_ms > 0);
                    limited += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // How many pages the transport takes before the cap binds depends on yamux's buffers
        // and on timing (a page stops counting once written to the stream); what holds is that
        // the cap's two are answered and the rest are refused rather than queued.
        assert!(pages >= 2 && limited >= 1, "{pages} pages answered, {limited} refused");
        assert_eq!(pages + limited, 10);
        // Once read, the device may ask again.
        let page = r.request(ClientFrame::FetchChat { req: 11, chat: a.chat, after: Seq(0), max: 512 }).await;
        assert!(matches!(page, RelayFrame::ChatPage { .. }), "{page:?}");
    });
}

/// Waits up to `secs` for the relay's log to contain `text`.
fn log_shows(relay: &Relay, text: &str, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !relay.log().contains(text) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    true
}

/// A device that stops reading while pushes pile up for it: pushes past its backlog are
/// dropped at once (the relay's memory stays flat), it is disconnected once nothing has been
/// written to it for the stall timeout (set low here), and the other streams get everything.
#[test]
fn a_peer_that_stops_reading_is_disconnected_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    // The reading stream ends with every delta, in order: pushes, and after a `Behind` (the
    // machine can slow it past its backlog) pages of what it missed, as a device fetches them.
    let relay = Relay::start_with(&dir.path().join("relay"), &["--stalled-reader-secs", "2"]);
    let (home_a, home_s) = (dir.path().join("a"), dir.path().join("s"));
    let a = account(&relay, &home_a, "a");
    link_device(&relay, &home_a, &home_s, "slow");
    let slow_keys = stratus_engine::Device::open(&home_s).unwrap().keypair();
    let pid = relay.pid().expect("running");
    let n: u64 = 1200;
    let delta_bytes = 16 * 1024;
    rt().block_on(async {
        // The slow device says hello and never reads again.
        let mut slow = Raw::connect(slow_keys, &relay.addr).await;
        assert!(matches!(slow.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
        // Another stream of a's device reads every push.
        let mut reader = raw(&relay, &a).await;
        let chat = a.chat;
        let reading = tokio::spawn(async move {
            // Relay seq → client seq, whichever way each delta came (a page from the start
            // also brings the chat's creation, before the appends at client seqs 1000 on); the
            // highest head a `Behind` named, up to which the stream fetches.
            let mut got = std::collections::BTreeMap::new();
            let (mut target, mut fetching) = (Seq(0), false);
            while (got.values().filter(|c| **c >= 1000).count() as u64) < n {
                match reader.next().await.expect("frames keep coming") {
                    RelayFrame::Push { delta } => {
                        got.insert(delta.seq, delta.client_seq.0);
                    }
                    RelayFrame::Behind { chats, .. } => {
                        target = chats.iter().filter(|(c, _)| *c == chat).map(|(_, h)| *h).fold(target, Seq::max);
                    }
                    RelayFrame::ChatPage { deltas, .. } => {
                        fetching = false;
                        got.extend(deltas.iter().map(|d| (d.seq, d.client_seq.0)));
                    }
                    RelayFrame::Error { .. } | RelayFrame::RateLimited { .. } => fetching = false,
                    _ => {}
                }
                let had = (1..).map(Seq).take_while(|s| got.contains_key(s)).last().unwrap_or(Seq(0));
                if !fetching && had < target {
                    let fetch = ClientFrame::FetchChat { req: had.0 + 1, chat, after: had, max: 256 };
                    reader.stream.send(&fetch).await.unwrap();
                    fetching = true;
                }
            }
            got.into_values().filter(|c| *c >= 1000).collect::<Vec<u64>>()
        });
        let baseline = rss_kib(pid);
        // a writes ~19 MiB, 16 appends in flight.
        let mut w = raw(&relay, &a).await;
        let mut sent = 0u64;
        let mut answered = 0u64;
        while answered < n {
            while sent < n && sent - answered < 16 {
                w.stream.send(&append(sent, a.chat, 1000 + sent, delta_bytes)).await.unwrap();
                sent += 1;
            }
            match w.next().await.expect("answer") {
                RelayFrame::Acked { .. } => answered += 1,
                other => panic!("the writer is served: {other:?}"),
            }
        }
        let seqs = reading.await.unwrap();
        assert_eq!(seqs, (1000..1000 + n).collect::<Vec<_>>(), "the reading stream got every delta, in order");
        let grown_kib = rss_kib(pid).saturating_sub(baseline);
        eprintln!("relay RSS: {baseline} KiB before, grew by {grown_kib} KiB");
        assert!(grown_kib < 64 * 1024, "the relay grew by {grown_kib} KiB");
        assert!(log_shows(&relay, "device is not reading; disconnecting it", 20), "the stalled reader is cut off");
        // The slow device finds its stream ended after what was already on its way.
        let mut got = 0;
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(20), slow.stream.recv()).await {
                Ok(Ok(Some(_))) => got += 1,
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => panic!("the slow stream was not closed"),
            }
        }
        assert!(got < n, "it was cut off, not sent everything ({got})");
    });
}

/// A device that falls behind (it stops reading for a while, less than the stall timeout, while
/// bursts larger than its push backlog arrive) is not cut off: pushes past its backlog are
/// dropped (the writer is served as usual), and it is told with `Behind` the chat's durable head
/// after each run of dropped pushes, so that what it got ends at the chat's head; the same
/// stream serves the rest.
#[test]
fn a_device_that_falls_behind_is_told_what_it_missed_and_stays_connected() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--max-push-backlog-bytes", "65536"]);
    let (home_a, home_s) = (dir.path().join("a"), dir.path().join("s"));
    let a = account(&relay, &home_a, "a");
    link_device(&relay, &home_a, &home_s, "slow");
    let slow_keys = stratus_engine::Device::open(&home_s).unwrap().keypair();
    let n: u64 = 400;
    rt().block_on(async {
        let mut slow = Raw::connect(slow_keys, &relay.addr).await;
        assert!(matches!(slow.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
        // a writes ~3 MiB, 16 appends of 8 KiB in flight, while the slow device reads nothing.
        let mut w = raw(&relay, &a).await;
        let (mut sent, mut answered, mut head) = (0u64, 0u64, Seq(0));
        while answered < n {
            while sent < n && sent - answered < 16 {
                w.stream.send(&append(sent, a.chat, 1000 + sent, 8 * 1024)).await.unwrap();
                sent += 1;
            }
            match w.next().await.expect("answer") {
                RelayFrame::Acked { seq, .. } => {
                    answered += 1;
                    head = head.max(seq);
                }
                other => panic!("the writer is served: {other:?}"),
            }
        }
        // It reads again: pushes and `Behind`s until it knows the chat's head.
        let (mut pushed, mut behind, mut known) = (0u64, 0, Seq(0));
        while known < head {
            match slow.next().await.expect("the stream stays open") {
                RelayFrame::Push { delta } => {
                    pushed += 1;
                    known = known.max(delta.seq);
                }
                RelayFrame::Behind { chats, .. } => {
                    behind += 1;
                    for (chat, h) in chats {
                        assert_eq!(chat, a.chat, "Behind names only the chat that had pushes dropped");
                        assert!(h <= head, "Behind names a durable head");
                        known = known.max(h);
                    }
                }
                RelayFrame::PushAccount { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pushed < n && behind > 0, "pushes were dropped ({pushed} of {n} arrived, {behind} Behind)");
        // The same stream serves the rest of the chat.
        let page = slow.request(ClientFrame::FetchChat { req: 1, chat: a.chat, after: Seq(0), max: 512 }).await;
        assert!(matches!(&page, RelayFrame::ChatPage { deltas, .. } if !deltas.is_empty()), "{page:?}");
    });
    assert!(!relay.log().contains("disconnecting it"), "nobody was cut off");
}

/// The relay keeps reading a device while a write to it waits: a device that sends a lot
/// without reading, while pushes to it have filled its transport window, is still served. (A
/// stream task that only read between writes left both sides waiting on each other.)
#[test]
fn the_relay_reads_a_device_while_it_waits_to_write_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (home_a, home_s) = (dir.path().join("a"), dir.path().join("s"));
    let a = account(&relay, &home_a, "a");
    let s_keys = linked_keys(&relay, &home_a, &home_s, "s");
    rt().block_on(async {
        let mut s = raw_as(&relay, s_keys).await;
        // Pushes to s fill its transport window (it reads nothing): the relay's writes to it wait.
        let mut w = raw(&relay, &a).await;
        for i in 0..40 {
            let reply = w.request(append(i, a.chat, 1000 + i, 16 * 1024)).await;
            assert!(matches!(reply, RelayFrame::Acked { .. }), "{reply:?}");
        }
        // s sends 1 MiB of appends meanwhile, more than its own window towards the relay: this
        // only completes if the relay reads it while its writes to it wait.
        let sending = async {
            for i in 0..64 {
                s.stream.send(&append(i, a.chat, 5000 + i, 16 * 1024)).await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), sending)
            .await
            .expect("the relay reads a device it waits to write to");
        // Then s reads: every append is acknowledged.
        let mut acked = 0;
        while acked < 64 {
            if let RelayFrame::Acked { .. } = s.next().await.expect("the stream stays open") {
                acked += 1;
            }
        }
    });
    assert!(!relay.log().contains("disconnecting it"), "nobody was cut off");
}
