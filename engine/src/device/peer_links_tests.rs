use super::*;

fn limits() -> LinkLimits {
    LinkLimits {
        max_links: 4,
        max_opening: 2,
        max_dialing: 2,
        opening_timeout_ms: 10_000,
        retry_min_ms: 1_000,
        retry_max_ms: 8_000,
        listen_retry_ms: 5_000,
    }
}

/// Links that are listening already, with `due` to dial.
fn listening(due: &[u8]) -> PeerLinks<u8> {
    let mut l = PeerLinks::new(limits(), 0, due.iter().copied());
    assert_eq!(l.tick(0), vec![LinkOut::Listen], "reachability first, no dial while it is sought");
    l.listened(0, true);
    l
}

#[test]
fn due_targets_are_dialed_a_few_at_a_time_once_listening() {
    let mut l = listening(&[1, 2, 3]);
    assert_eq!(l.tick(0), vec![LinkOut::Dial(1), LinkOut::Dial(2)]);
    assert_eq!(l.next_wake(), None, "the third waits for a dial to end");
    assert_eq!(l.dialed(5, 1, false), Dialed::Failed);
    assert_eq!(l.next_wake(), Some(0));
    assert_eq!(l.tick(5), vec![LinkOut::Dial(3)]);
}

#[test]
fn retries_back_off_doubling_up_to_the_limit_and_a_touch_starts_again() {
    let mut l = listening(&[]);
    let mut at = 0;
    for wait in [1_000, 2_000, 4_000, 8_000, 8_000] {
        l.retry(at, 7);
        assert_eq!(l.next_wake(), Some(at + wait));
        at += wait;
        assert_eq!(l.tick(at), vec![LinkOut::Dial(7)]);
        assert_eq!(l.dialed(at, 7, false), Dialed::Failed);
    }
    assert!(l.touched(at, 7).is_empty());
    assert_eq!(l.tick(at), vec![LinkOut::Dial(7)]);
    l.dialed(at, 7, false);
    l.retry(at, 7);
    assert_eq!(l.next_wake(), Some(at + 1_000), "backoff reset by the touch");
}

#[test]
fn a_stream_that_does_not_come_up_in_time_is_closed_and_its_target_reported() {
    let mut l = listening(&[1]);
    l.tick(0);
    let Dialed::Attach(no) = l.dialed(100, 1, true) else { panic!("admitted") };
    assert_eq!(l.next_wake(), Some(10_100));
    let out = l.tick(10_100);
    assert!(matches!(out.as_slice(), [LinkOut::Close(n, _)] if *n == no));
    assert_eq!(l.closed(no), Some(1));
    assert!(l.is_empty());
}

#[test]
fn incoming_streams_are_bounded_in_total_and_while_opening() {
    let mut l = listening(&[]);
    let a = l.incoming(0).unwrap();
    let _b = l.incoming(0).unwrap();
    assert_eq!(l.incoming(0), None, "two opening at most");
    l.up(1, a, 9, true);
    let _c = l.incoming(1).unwrap();
    assert_eq!(l.incoming(1), None);
    assert_eq!(l.len(), 3);
}

#[test]
fn of_two_links_up_at_once_both_devices_keep_the_same_one() {
    // Device x (which wins) and device y dialed each other for target 5 at once: on x, link
    // 0 was opened here; on y, link 0 is the incoming one from x.
    let (mut x, mut y) = (listening(&[5]), listening(&[5]));
    x.tick(0);
    y.tick(0);
    let Dialed::Attach(x_out) = x.dialed(10, 5, true) else { panic!() };
    let Dialed::Attach(y_out) = y.dialed(10, 5, true) else { panic!() };
    let x_in = x.incoming(11).unwrap();
    let y_in = y.incoming(11).unwrap();
    assert!(x.up(20, x_out, 5, true).is_empty());
    assert!(y.up(20, y_out, 5, false).is_empty());
    // Each closes the link that y opened: on x the incoming one, on y its own.
    assert_eq!(x.up(21, x_in, 5, true), vec![LinkOut::Close(x_in, "another link carries the same chat".into())]);
    assert_eq!(y.up(21, y_in, 5, false), vec![LinkOut::Close(y_out, "another link carries the same chat".into())]);
}

#[test]
fn a_link_up_long_after_another_replaces_it() {
    let mut l = listening(&[]);
    let old = l.incoming(0).unwrap();
    l.up(0, old, 3, true);
    let new = l.incoming(60_000).unwrap();
    assert_eq!(l.up(60_000, new, 3, false), vec![LinkOut::Close(old, "another link carries the same chat".into())]);
    assert_eq!(l.closed(old), None, "the new link still carries it");
}

#[test]
fn failing_to_listen_is_retried_and_a_reconnect_listens_again() {
    let mut l = PeerLinks::new(limits(), 0, [1u8]);
    assert_eq!(l.tick(0), vec![LinkOut::Listen]);
    l.listened(0, false);
    assert_eq!(l.tick(0), vec![LinkOut::Dial(1)], "dials go on without it");
    assert_eq!(l.next_wake(), Some(5_000));
    assert_eq!(l.tick(5_000), vec![LinkOut::Listen]);
    l.listened(5_000, true);
    assert!(l.is_listening());
    l.reconnected(6_000);
    assert_eq!(l.tick(6_000), vec![LinkOut::Listen]);
}
