//! The session core driven directly: time, connection events and relay frames in, work out.

use super::*;
use crate::proto::ids::{AccountId, Seq};
use crate::proto::wire::PROTOCOL_VERSION;

/// What [`crate::Device::carry_out`] would hand back for the outputs these tests meet.
fn carry(outputs: Vec<SyncOutput>) -> Vec<Action> {
    outputs
        .into_iter()
        .filter_map(|o| match o {
            SyncOutput::Send(f) => Some(Action::Send(f)),
            SyncOutput::Reply(f) => Some(Action::Reply(f)),
            SyncOutput::RetryAfter { ms } => Some(Action::RetryAfter(ms)),
            SyncOutput::Revoked { proof: Some(_) } => Some(Action::Emit(Event::SessionRevoked)),
            SyncOutput::Revoked { proof: None } => Some(Action::Emit(Event::SessionRefused)),
            SyncOutput::Error { code: crate::proto::wire::ErrorCode::UnsupportedVersion, message } => {
                Some(Action::Emit(Event::VersionRefused { message }))
            }
            _ => None,
        })
        .collect()
}

fn step(s: &mut SessionCore, now: u64, input: SessionInput) -> Vec<Work> {
    let (mut work, outputs) = s.handle(now, input);
    work.extend(s.actions(now, carry(outputs)));
    work
}

fn frame(s: &mut SessionCore, now: u64, f: RelayFrame) -> Vec<Work> {
    step(s, now, SessionInput::Frame(Box::new(f)))
}

fn sent(work: &[Work]) -> Vec<&ClientFrame> {
    work.iter()
        .filter_map(|w| match w {
            Work::Send(f) => Some(f),
            _ => None,
        })
        .collect()
}

/// A session connected at `now` and synced with an empty relay.
fn up(now: u64) -> SessionCore {
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 7);
    assert_eq!(s.next_wake(), Some(0), "it connects at once");
    assert_eq!(step(&mut s, now, SessionInput::Timeout), vec![Work::Connect { addr: 0 }]);
    let work = step(&mut s, now, SessionInput::Connected);
    assert!(matches!(sent(&work)[..], [ClientFrame::Hello { .. }]), "{work:?}");
    let work = frame(
        &mut s,
        now,
        RelayFrame::Hello {
            version: PROTOCOL_VERSION,
            account: Some(AccountId([2; 16])),
            incarnation: Default::default(),
        },
    );
    let [ClientFrame::SyncState { req }] = sent(&work)[..] else { panic!("{work:?}") };
    assert!(work.contains(&Work::Emit(Event::Connected)), "accepted by the relay: {work:?}");
    let work =
        frame(&mut s, now, RelayFrame::SyncState { req: *req, account_head: Seq(0), chats: vec![], restored: None });
    assert_eq!(work, vec![Work::Emit(Event::CaughtUp), Work::Emit(Event::Idle)]);
    s
}

/// Three addresses: a round tries each in order, the next at once after a failure; only a
/// round where all failed backs off; the address that worked is where the next round starts.
#[test]
fn a_relay_with_several_addresses_is_tried_in_order_and_backs_off_per_round() {
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 3).with_addresses(3);
    let mut now = 10;
    let fail = |s: &mut SessionCore, now: u64, addr: usize| {
        assert_eq!(step(s, now, SessionInput::Timeout), vec![Work::Connect { addr }]);
        step(s, now, SessionInput::ConnectFailed(format!("address {addr} refused")));
    };
    fail(&mut s, now, 0);
    assert_eq!(s.next_wake(), Some(now), "the second address at once");
    fail(&mut s, now, 1);
    assert_eq!(s.next_wake(), Some(now), "the third address at once");
    fail(&mut s, now, 2);
    let at = s.next_wake().expect("a retry is due");
    assert!((BACKOFF_MIN_MS..=BACKOFF_MIN_MS + BACKOFF_MIN_MS / 4).contains(&(at - now)), "all failed: backoff");
    now = at;
    fail(&mut s, now, 0);
    assert_eq!(step(&mut s, now, SessionInput::Timeout), vec![Work::Connect { addr: 1 }]);
    step(&mut s, now, SessionInput::Connected);
    step(&mut s, now, SessionInput::Lost("reset".into()));
    let at = s.next_wake().expect("reconnects");
    assert!(at - now <= BACKOFF_MIN_MS + BACKOFF_MIN_MS / 4, "a connection resets the backoff");
    assert_eq!(step(&mut s, at, SessionInput::Timeout), vec![Work::Connect { addr: 1 }], "where it last worked");
    step(&mut s, at, SessionInput::ConnectFailed("gone".into()));
    assert_eq!(s.next_wake(), Some(at), "then the others, at once");
    assert_eq!(step(&mut s, at, SessionInput::Timeout), vec![Work::Connect { addr: 2 }]);
}

#[test]
fn failed_connections_back_off_doubling_with_bounded_jitter_and_a_success_resets_it() {
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 1);
    let mut now = 0;
    let mut waits = Vec::new();
    for _ in 0..10 {
        assert_eq!(step(&mut s, now, SessionInput::Timeout), vec![Work::Connect { addr: 0 }]);
        assert_eq!(s.next_wake(), None, "nothing to do while the connect is under way");
        let work = step(&mut s, now, SessionInput::ConnectFailed("refused".into()));
        assert!(matches!(&work[..], [Work::Emit(Event::Disconnected { .. })]), "{work:?}");
        let at = s.next_wake().expect("a retry is due");
        waits.push(at - now);
        assert!(step(&mut s, at - 1, SessionInput::Timeout).is_empty(), "not before its time");
        now = at;
    }
    let mut backoff = BACKOFF_MIN_MS;
    for w in &waits {
        assert!((backoff..=backoff + backoff / 4).contains(w), "{waits:?}");
        backoff = (backoff * 2).min(BACKOFF_MAX_MS);
    }
    assert_eq!(step(&mut s, now, SessionInput::Timeout), vec![Work::Connect { addr: 0 }]);
    step(&mut s, now, SessionInput::Connected);
    step(&mut s, now, SessionInput::Lost("reset".into()));
    let again = s.next_wake().expect("reconnects") - now;
    assert!(again <= BACKOFF_MIN_MS + BACKOFF_MIN_MS / 4, "a connection that came up resets the backoff: {again}");
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    let schedule = |seed| {
        let mut s = SessionCore::new(SyncCore::new(Seq(0), false), seed);
        let mut now = 0;
        let mut at = Vec::new();
        for _ in 0..6 {
            step(&mut s, now, SessionInput::Timeout);
            step(&mut s, now, SessionInput::ConnectFailed("no".into()));
            now = s.next_wake().expect("due");
            at.push(now);
        }
        at
    };
    assert_eq!(schedule(3), schedule(3));
}

#[test]
fn a_connection_that_goes_silent_with_requests_waiting_is_dropped_and_made_again() {
    let mut s = up(1_000);
    // The app asks something; the relay never answers, and nothing else comes.
    let work = s.request(9, |req| ClientFrame::AccountDevices { req, account: AccountId([3; 16]) });
    assert!(matches!(work, Work::Send(ClientFrame::AccountDevices { .. })));
    assert_eq!(s.next_wake(), Some(1_000 + SILENCE_MS));
    assert!(step(&mut s, 1_000 + SILENCE_MS - 1, SessionInput::Timeout).is_empty());
    let work = step(&mut s, 1_000 + SILENCE_MS, SessionInput::Timeout);
    assert_eq!(work[0], Work::Close, "{work:?}");
    assert!(work.contains(&Work::Unanswered { token: 9 }), "{work:?}");
    assert!(work.iter().any(|w| matches!(w, Work::Emit(Event::Disconnected { .. }))), "{work:?}");
    let at = s.next_wake().expect("reconnects");
    assert_eq!(step(&mut s, at, SessionInput::Timeout), vec![Work::Connect { addr: 0 }]);
    // A stream that was being read when it was dropped may still report its end: ignored.
    assert!(step(&mut s, at, SessionInput::Lost("late".into())).is_empty());
}

#[test]
fn frames_keep_a_connection_alive_and_a_quiet_one_is_probed() {
    let mut s = up(0);
    assert_eq!(s.next_wake(), Some(PROBE_AFTER_MS), "nothing waits: probe after the quiet spell");
    frame(
        &mut s,
        10_000,
        RelayFrame::Typing {
            chat: crate::ChatId([1; 16]),
            account: AccountId([2; 16]),
            device: crate::DeviceId("d".into()),
        },
    );
    assert_eq!(s.next_wake(), Some(10_000 + PROBE_AFTER_MS), "what arrives moves it on");
    let work = step(&mut s, 10_000 + PROBE_AFTER_MS, SessionInput::Timeout);
    let [ClientFrame::SyncState { req }] = sent(&work)[..] else { panic!("a probe asks for the heads: {work:?}") };
    let req = *req;
    assert_eq!(s.next_wake(), Some(10_000 + PROBE_AFTER_MS + SILENCE_MS), "its answer is waited for");
    let work = frame(
        &mut s,
        10_100 + PROBE_AFTER_MS,
        RelayFrame::SyncState {
            req,
            account_head: Seq(0),
            chats: vec![(crate::ChatId([5; 16]), Seq(3))],
            restored: None,
        },
    );
    assert!(!work.contains(&Work::Close), "{work:?}");
}

#[test]
fn app_requests_are_answered_by_req_and_refused_when_offline_or_too_many() {
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 0);
    let make = |req| ClientFrame::AccountDevices { req, account: AccountId([3; 16]) };
    assert_eq!(s.request(1, make), Work::Unanswered { token: 1 }, "not connected");
    let mut s = up(0);
    let Work::Send(f) = s.request(2, make) else { panic!() };
    let answer = RelayFrame::AccountDevices { req: f.req(), account: AccountId([3; 16]), devices: vec![] };
    let work = frame(&mut s, 5, answer.clone());
    assert_eq!(work, vec![Work::Answer { token: 2, frame: answer }]);
    for t in 0..MAX_APP_REQUESTS as u64 {
        assert!(matches!(s.request(100 + t, make), Work::Send(_)));
    }
    assert_eq!(s.request(999, make), Work::Unanswered { token: 999 }, "bounded");
    let work = step(&mut s, 6, SessionInput::Lost("reset".into()));
    let unanswered = work.iter().filter(|w| matches!(w, Work::Unanswered { .. })).count();
    assert_eq!(unanswered, MAX_APP_REQUESTS, "every waiting request hears it will not be answered");
}

#[test]
fn a_pause_the_relay_asks_for_ends_at_its_time() {
    let mut s = up(0);
    let work = step(&mut s, PROBE_AFTER_MS, SessionInput::Timeout);
    let [ClientFrame::SyncState { req }] = sent(&work)[..] else { panic!("{work:?}") };
    let req = *req;
    // The relay limits this device: the sync core stops and asks to be resumed.
    frame(&mut s, PROBE_AFTER_MS + 10, RelayFrame::RateLimited { req, retry_after_ms: 700 });
    assert_eq!(s.next_wake(), Some(PROBE_AFTER_MS + 710));
}

#[test]
fn a_relay_that_refuses_this_protocol_version_ends_the_session() {
    let mut s = up(0);
    let message = crate::proto::wire::version_refusal(PROTOCOL_VERSION, PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1)
        .expect("outside the range");
    let refusal = RelayFrame::Error {
        req: None,
        code: crate::proto::wire::ErrorCode::UnsupportedVersion,
        message: message.clone(),
    };
    let work = frame(&mut s, 5, refusal);
    assert!(work.contains(&Work::Close) && work.contains(&Work::Emit(Event::VersionRefused { message })), "{work:?}");
    assert!(s.is_ended() && s.next_wake().is_none(), "no reconnecting to a relay that will refuse again");
}

#[test]
fn an_ended_session_never_connects_again() {
    let mut s = up(0);
    let work = frame(
        &mut s,
        5,
        RelayFrame::Error { req: None, code: crate::proto::wire::ErrorCode::SessionRevoked, message: "ended".into() },
    );
    assert!(work.contains(&Work::Close) && work.contains(&Work::Emit(Event::SessionRefused)), "{work:?}");
    assert!(s.is_ended());
    assert_eq!(s.next_wake(), None);
    assert!(step(&mut s, 1_000_000, SessionInput::Timeout).is_empty());
}

#[test]
fn a_hello_never_answered_is_a_dead_connection() {
    // Found by the simulator: a stream that died right after it opened left the session waiting
    // for the relay's hello for good, with no request to time out.
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 7);
    step(&mut s, 0, SessionInput::Timeout);
    step(&mut s, 0, SessionInput::Connected);
    assert_eq!(s.next_wake(), Some(SILENCE_MS));
    let work = step(&mut s, SILENCE_MS, SessionInput::Timeout);
    assert_eq!(work[0], Work::Close, "{work:?}");
}

#[test]
fn a_parked_request_waits_until_caught_up_or_gives_up() {
    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 7);
    assert!(s.park(0, 5, true).is_empty(), "not connected: it waits");
    assert!(s.park(0, 4, false).is_empty(), "not connected: it waits");
    assert_eq!(s.next_wake(), Some(0), "the connection comes first");
    step(&mut s, 0, SessionInput::Timeout);
    step(&mut s, 0, SessionInput::Connected);
    let work = frame(
        &mut s,
        1,
        RelayFrame::Hello {
            version: PROTOCOL_VERSION,
            account: Some(AccountId([2; 16])),
            incarnation: Default::default(),
        },
    );
    let [ClientFrame::SyncState { req }] = sent(&work)[..] else { panic!("{work:?}") };
    let req = *req;
    assert!(work.contains(&Work::Ready { token: 4 }), "connected: {work:?}");
    assert!(!work.contains(&Work::Ready { token: 5 }), "not caught up yet: {work:?}");
    let work = frame(&mut s, 2, RelayFrame::SyncState { req, account_head: Seq(0), chats: vec![], restored: None });
    assert!(work.contains(&Work::Ready { token: 5 }), "caught up: {work:?}");
    assert!(s.park(3, 6, true) == vec![Work::Ready { token: 6 }], "caught up already: at once");

    let mut s = SessionCore::new(SyncCore::new(Seq(0), false), 7);
    s.park(0, 8, true);
    step(&mut s, 0, SessionInput::Timeout);
    step(&mut s, 0, SessionInput::ConnectFailed("down".into()));
    let mut now = 0;
    let mut gave_up = false;
    while now <= PARK_MS {
        now = s.next_wake().expect("a retry or the park's end");
        let work = step(&mut s, now, SessionInput::Timeout);
        gave_up |= work.contains(&Work::Unanswered { token: 8 });
        if work.contains(&Work::Connect { addr: 0 }) {
            step(&mut s, now, SessionInput::ConnectFailed("down".into()));
        }
    }
    assert!(gave_up, "the relay never came: the request is answered unanswered");
}
