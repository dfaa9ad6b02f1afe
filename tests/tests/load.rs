//! Live sync under load, the way an app embeds the engine (issue 14): one process, a real relay
//! process, real sessions. Two devices of one account each send a burst into every chat with
//! many `Session::send` calls in flight; both must end with every message. Then a third device,
//! linked afterwards and only started, must catch up on all of it.
//!
//! Scaled to run in about 20 s in a debug build; `STRATUS_LOAD_MSGS=500` runs the full
//! scenario (10 chats × 500 messages from each of two writers, 128 sends in flight).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stratus_engine::{ChatId, Device, Event, Session};
use stratus_tests::Relay;

const CHATS: usize = 10;
const IN_FLIGHT: usize = 128;
/// How long every device may take to show every message once the writers are done (generous:
/// this is a liveness check, not a speed check; the speed is measured by `load_bench`).
const SETTLE: Duration = Duration::from_secs(120);

fn msgs_per_writer() -> usize {
    std::env::var("STRATUS_LOAD_MSGS").ok().and_then(|s| s.parse().ok()).unwrap_or(100)
}

async fn link(relay: &str, approver: &mut Device, home: &std::path::Path, name: &str) -> Device {
    let mut new = Device::open(home).expect("open");
    let code = new.link_code().expect("link code");
    let (relay, code2, name) = (relay.to_string(), code.clone(), name.to_string());
    let waiting = tokio::spawn(async move { new.link(&relay, &name, &code2).await.map(|_| new) });
    // The new device registers its wait; approving before it is there is retried.
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match approver.approve(&code).await {
            Ok(_) => break,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("approve: {e}; again");
            }
            Err(e) => panic!("approve: {e}"),
        }
    }
    waiting.await.expect("link task").expect("linked")
}

/// Sends `n` messages into every chat with up to [`IN_FLIGHT`] sends in flight.
async fn burst(session: Arc<Session>, chats: Vec<ChatId>, n: usize, who: &'static str) -> usize {
    // Owned, not borrowed from `chats`: a spawned future must be `Send` for every lifetime, and
    // rustc cannot prove that of an iterator borrowing a local across the await.
    let jobs: Vec<(ChatId, usize)> = (0..n).flat_map(|i| chats.iter().map(move |c| (*c, i))).collect();
    futures::stream::iter(jobs)
        .map(move |(chat, i)| {
            let s = session.clone();
            async move { s.send(chat, &format!("{who} {i}")).await.expect("send returns Ok") }
        })
        .buffer_unordered(IN_FLIGHT)
        .count()
        .await
}

/// Waits until every chat shows `want` messages on `session`; panics with the counts if not
/// within [`SETTLE`].
async fn settle(session: &Session, chats: &[ChatId], want: usize, who: &str) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut counts = Vec::new();
        for c in chats {
            // A device still reading its account log does not know every chat yet.
            let n = match session.messages(*c).await {
                Ok(m) => m.len(),
                Err(stratus_engine::Error::UnknownChat(_)) => 0,
                Err(e) => panic!("{who}: messages: {e}"),
            };
            counts.push(n);
        }
        if counts.iter().all(|n| *n == want) {
            return;
        }
        if Instant::now() >= deadline {
            let status = session.status().await;
            panic!("{who} stalled: {counts:?} of {want} per chat; {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_and_a_late_device_end_with_every_message() {
    let n = msgs_per_writer();
    let dir = tempfile::tempdir().unwrap();
    let extra = std::env::var("STRATUS_LOAD_RELAY_ARGS").unwrap_or_default();
    let args: Vec<&str> = extra.split_whitespace().collect();
    let relay = Relay::start_with(&dir.path().join("relay"), &args);
    let mut a = Device::open(&dir.path().join("a")).unwrap();
    a.create_account(&relay.addr, "a").await.unwrap();
    let b = link(&relay.addr, &mut a, &dir.path().join("b"), "b").await;

    let mut sa = Session::start(a).unwrap();
    let mut sb = Session::start(b).unwrap();
    let mut eb = sb.events();
    let mut chats = Vec::new();
    for i in 0..CHATS {
        chats.push(sa.create_chat(&format!("chat {i}")).await.unwrap());
    }
    // b learns of every chat from the account log before it writes into them.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < CHATS {
        match tokio::time::timeout_at(deadline, eb.recv()).await.expect("b sees the chats") {
            Ok(Event::ChatAdded { chat }) => {
                seen.insert(chat);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("events: {e}"),
        }
    }
    drop(eb);
    let _ = sa.events();

    let started = Instant::now();
    let (sa, sb) = (Arc::new(sa), Arc::new(sb));
    let (na, nb) = tokio::join!(
        tokio::spawn(burst(sa.clone(), chats.clone(), n, "a")),
        tokio::spawn(burst(sb.clone(), chats.clone(), n, "b"))
    );
    let sent = na.unwrap() + nb.unwrap();
    let sending = started.elapsed();
    eprintln!("sent {sent} messages in {sending:?} ({:.0}/s)", sent as f64 / sending.as_secs_f64());
    settle(&sa, &chats, 2 * n, "a").await;
    settle(&sb, &chats, 2 * n, "b").await;
    eprintln!("both devices have every message after {:?}", started.elapsed());

    // A third device, linked afterwards, only started.
    let sa = Arc::try_unwrap(sa).ok().expect("one handle");
    let mut a = sa.stop().await.unwrap();
    let c = link(&relay.addr, &mut a, &dir.path().join("c"), "c").await;
    let caught = Instant::now();
    let sc = Session::start(c).unwrap();
    settle(&sc, &chats, 2 * n, "c").await;
    let took = caught.elapsed();
    eprintln!(
        "a new device caught up on {} messages in {took:?} ({:.0}/s)",
        CHATS * 2 * n,
        (CHATS * 2 * n) as f64 / took.as_secs_f64()
    );
    let log = relay.log();
    let cut = log.matches("disconnecting it").count();
    eprintln!("relay cut devices off {cut} times");
    if let Ok(to) = std::env::var("STRATUS_LOAD_KEEP_LOG") {
        std::fs::write(to, &log).unwrap();
    }
}
