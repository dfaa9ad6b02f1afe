//! The relay's admin HTTP listener (issue 19, item 2), against the real binary with real HTTP
//! requests: `/metrics` counts what devices did, `/healthz` and `/readyz` answer, the listener
//! is off unless asked for, and `--log-format json` writes JSON lines.

use stratus_engine::proto::wire::{ErrorCode, RelayFrame};
use stratus_engine::ChatId;
use stratus_tests::*;

fn scrape(relay: &Relay) -> String {
    let (status, body) = http(&relay.admin_http(), "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn metrics_count_appends_and_refusals_by_code() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--admin-http", "127.0.0.1:0"]);
    let a = account(&relay, &dir.path().join("a"), "a");
    let before = scrape(&relay);
    let appends_before = metric(&before, "stratus_relay_appends_total").expect("an appends counter");
    assert_eq!(metric(&before, "stratus_relay_refused_total{code=\"UnknownChat\"}"), None);

    rt().block_on(async {
        let mut r = raw(&relay, &a).await;
        for (req, cs) in (1..=5).zip(1000..) {
            let reply = r.request(append(req, a.chat, cs, 100)).await;
            assert!(matches!(reply, RelayFrame::Acked { .. }), "{reply:?}");
        }
        let reply = r.request(append(6, ChatId([7; 16]), 1005, 100)).await;
        assert!(matches!(reply, RelayFrame::Error { code: ErrorCode::UnknownChat, .. }), "{reply:?}");
        // The gauges read from the relay's index follow on its once-a-second tick: wait for
        // them (no bound on how soon), with this device still connected.
        let summary = |t: &str| {
            let m = |name| metric(t, name).unwrap_or(0.0);
            (m("stratus_relay_connected_devices"), m("stratus_relay_chats"), m("stratus_relay_chat_log_max"))
        };
        let mut text = scrape(&relay);
        for _ in 0..200 {
            if summary(&text).0 >= 1.0 && summary(&text).2 >= 5.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            text = scrape(&relay);
        }
        let (devices, chats, longest) = summary(&text);
        assert!(devices >= 1.0 && chats >= 1.0 && longest >= 5.0, "{text}");
        assert_eq!(metric(&text, "stratus_relay_chats_by_log_length{le=\"+Inf\"}"), Some(chats), "{text}");
    });

    // Each append was counted when it was written, before its acknowledgement; each refusal
    // before it was sent.
    let after = scrape(&relay);
    assert_eq!(metric(&after, "stratus_relay_appends_total"), Some(appends_before + 5.0), "{after}");
    assert_eq!(metric(&after, "stratus_relay_refused_total{code=\"UnknownChat\"}"), Some(1.0), "{after}");
    assert!(metric(&after, "stratus_relay_barrier_seconds_count").is_some_and(|n| n >= 1.0), "{after}");
    assert!(metric(&after, "stratus_relay_write_batch_ops_count").is_some_and(|n| n >= 1.0), "{after}");
    for series in [
        "stratus_relay_connected_devices",
        "stratus_relay_rate_limited_total",
        "stratus_relay_barrier_appends_count",
        "stratus_relay_store_bytes",
        "stratus_relay_chat_log_max",
        "stratus_relay_chats_by_log_length{le=\"+Inf\"}",
    ] {
        assert!(metric(&after, series).is_some(), "no {series} in\n{after}");
    }
    // Chats are summarised, never one series each.
    assert!(!after.contains(&a.chat.to_string()), "a chat id in the metrics:\n{after}");
}

#[test]
fn health_readiness_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--admin-http", "127.0.0.1:0"]);
    let addr = relay.admin_http();
    assert_eq!(http(&addr, "GET", "/healthz"), (200, "ok\n".into()));
    // The relay said it listens: its store is open and its first barrier done.
    assert_eq!(http(&addr, "GET", "/readyz"), (200, "ready\n".into()));
    assert_eq!(http(&addr, "GET", "/").0, 404);
    assert_eq!(http(&addr, "POST", "/metrics").0, 405);
    assert_eq!(http(&addr, "GET", "/metrics?x=1").0, 200);
}

#[test]
fn the_admin_listener_is_off_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    assert!(!relay.log().contains("admin http"), "{}", relay.log());
}

#[test]
fn json_logs_are_one_json_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--log-format", "json"]);
    // Some traffic, so that request lines are logged too (the harness logs at debug).
    account(&relay, &dir.path().join("a"), "a");
    let log = relay.log();
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
    assert!(log.contains("\"message\":\"store opened\""), "{log}");
}
