//! Setting up a run: linking devices, writing the history, waiting for a device to be ready.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::Rng;
use stratus_engine::{ChatId, Device, Session};

use crate::{HISTORY_IN_FLIGHT, POLL, STALL};

/// 20–160 characters, as in the apply benchmark's history.
pub(crate) fn padding(rng: &mut StdRng) -> String {
    let n = rng.gen_range(20..=160);
    (0..n).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
}

/// Links a new device at `home` to `approver`'s account (approver not in a session).
pub(crate) async fn link(
    relay: &str,
    approver: &mut Device,
    home: &Path,
    name: &str,
    seed: u64,
) -> Result<Device, String> {
    let mut new = Device::open_seeded(home, seed).map_err(|e| format!("open {name}: {e}"))?;
    let code = new.link_code().map_err(|e| format!("link code: {e}"))?;
    let (relay, code2, name2) = (relay.to_string(), code.clone(), name.to_string());
    let waiting = tokio::spawn(async move { new.link(&relay, &name2, &code2).await.map(|_| new) });
    // The new device registers its wait; approving before it is there is retried.
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match approver.approve(&code).await {
            Ok(_) => break,
            Err(_) if tries < 20 => tries += 1,
            Err(e) => {
                waiting.abort();
                return Err(format!("approve {name}: {e}"));
            }
        }
    }
    match tokio::time::timeout(STALL, waiting).await {
        Ok(Ok(Ok(device))) => Ok(device),
        Ok(Ok(Err(e))) => Err(format!("link {name}: {e}")),
        Ok(Err(e)) => Err(format!("link {name}: {e}")),
        Err(_) => Err(format!("link {name}: no approval within {STALL:?}")),
    }
}

/// A writes `per_chat` messages into each of `chats` new chats and waits until the relay has
/// acknowledged all of them. Returns A (stopped), the chats and the messages/s achieved.
pub(crate) async fn write_history(
    a: Device,
    chats: usize,
    per_chat: usize,
    pads: &[String],
) -> Result<(Device, Vec<ChatId>, f64), String> {
    let mut sa = Session::start(a).map_err(|e| format!("start a: {e}"))?;
    let _ = sa.events();
    let mut ids = Vec::new();
    for i in 0..chats {
        ids.push(sa.create_chat(&format!("chat {i}")).await.map_err(|e| format!("create chat: {e}"))?);
    }
    let started = Instant::now();
    let sa = Arc::new(sa);
    let jobs: Vec<(ChatId, usize)> = (0..per_chat).flat_map(|i| ids.iter().map(move |c| (*c, i))).collect();
    let failed = futures::stream::iter(jobs)
        .map(|(chat, i)| {
            let (s, text) = (sa.clone(), format!("h {i} {}", pads[i % pads.len()]));
            async move { s.send(chat, &text).await.is_err() }
        })
        .buffer_unordered(HISTORY_IN_FLIGHT)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    if failed > 0 {
        return Err(format!("{failed} history sends failed"));
    }
    let deadline = Instant::now() + STALL;
    loop {
        let status = sa.status().await.map_err(|e| format!("status: {e}"))?;
        if status.outbox == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("history not acknowledged within {STALL:?}: {status:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
    let rate = (chats * per_chat) as f64 / started.elapsed().as_secs_f64();
    let sa = Arc::try_unwrap(sa).ok().expect("one handle");
    let a = sa.stop().await.map_err(|e| format!("stop a: {e}"))?;
    Ok((a, ids, rate))
}

/// Per-chat message counts on `session`, in `chats` order (0 for a chat it does not have yet).
pub(crate) async fn counts(session: &Session, chats: &[ChatId]) -> Vec<usize> {
    let mut n = Vec::new();
    for c in chats {
        n.push(session.messages(*c).await.map_or(0, |m| m.len()));
    }
    n
}

/// Waits until `s` is connected, caught up, has an empty outbox and shows `per_chat` messages
/// in every chat.
pub(crate) async fn ready(s: &Session, chats: &[ChatId], per_chat: usize) -> Result<(), String> {
    let deadline = Instant::now() + STALL;
    loop {
        let status = s.status().await.map_err(|e| e.to_string())?;
        let n = counts(s, chats).await;
        if status.connected && status.caught_up && status.outbox == 0 && n.iter().all(|n| *n == per_chat) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{status:?}, {n:?} of {per_chat} per chat"));
        }
        tokio::time::sleep(POLL).await;
    }
}
