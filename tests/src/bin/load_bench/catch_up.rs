//! Figure 1: a new device's catch-up.

use std::collections::BTreeMap;
use std::time::Instant;

use stratus_engine::{ChatId, Device, Event, Session};
use tokio::sync::broadcast::error::RecvError;

use crate::setup::counts;
use crate::{CatchUp, RunResult, POLL, STALL};

/// Starts C's session and times it until it has reported every message of the history. Returns
/// the session for the live part, or None when the catch-up did not complete.
pub(crate) async fn catch_up(c: Device, chats: &[ChatId], per_chat: usize, result: &mut RunResult) -> Option<Session> {
    let index: BTreeMap<ChatId, usize> = chats.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let want = chats.len() * per_chat;
    let started = Instant::now();
    let mut sc = match Session::start(c) {
        Ok(s) => s,
        Err(e) => {
            result.catch_up_failures.push(format!("start c: {e}"));
            return None;
        }
    };
    let mut events = sc.events();
    let deadline = tokio::time::Instant::from_std(started + STALL);
    let (mut seen, mut total, mut lagged) = (vec![0usize; chats.len()], 0, 0u64);
    while total < want && lagged == 0 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::MessageAdded { chat, .. })) => {
                if let Some(i) = index.get(&chat) {
                    if seen[*i] < per_chat {
                        total += 1;
                    }
                    seen[*i] += 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(n))) => lagged = n,
            Ok(Err(RecvError::Closed)) => {
                result.catch_up_failures.push("c's session ended".into());
                return None;
            }
            Err(_) => {
                result.catch_up_failures.push(format!("catch-up stalled: {seen:?} of {per_chat} per chat"));
                return None;
            }
        }
    }
    if lagged > 0 {
        // The events no longer tell; finish the timing by polling the store (coarser).
        result.catch_up_failures.push(format!("c's event receiver lagged ({lagged} events missed)"));
        while counts(&sc, chats).await.iter().any(|n| *n < per_chat) {
            if Instant::now() >= started + STALL {
                result.catch_up_failures.push("catch-up stalled".into());
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let took = started.elapsed();
    drop(events);
    let stored = counts(&sc, chats).await;
    if stored.iter().any(|n| *n != per_chat) {
        result.catch_up_failures.push(format!("c's store shows {stored:?} of {per_chat} per chat"));
    }
    if seen.iter().any(|n| *n > per_chat) {
        result.catch_up_failures.push(format!("c reported {seen:?} messages of {per_chat} per chat"));
    }
    result.catch_up = Some(CatchUp { messages: want, took });
    Some(sc)
}
