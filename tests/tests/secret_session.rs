//! Secret chats run by sessions (issue 6): three real devices of three accounts, each a
//! `Session` with secret chats on, through a real relay process on 127.0.0.1. Nobody drives a
//! link by hand: offers, accepting, messages, timers, a device coming back after being away,
//! declining and closing all pass because the sessions reach each other by themselves, several
//! links at once. A burst of messages crosses re-keys of the Noise session on the wire.

use std::time::Duration;

use stratus_engine::{AccountId, Device, Event, SecretId, Session, SessionConfig};
use stratus_tests::{init_tracing, new_account, wait_event, wait_idle, Relay};

fn start(device: Device) -> Session {
    let config = SessionConfig { secret_chats: true, secret_tcp: Some("/ip4/127.0.0.1/tcp/0".parse().unwrap()) };
    Session::start_with(device, config).unwrap()
}

/// The one device of `account`, as `session` gets it from the relay.
async fn only_device(session: &Session, account: AccountId) -> stratus_engine::proto::cert::DeviceCert {
    let devices = session.secret_devices(account).await.unwrap();
    assert_eq!(devices.len(), 1, "one device");
    devices[0].0.clone()
}

/// Bob and the two others accept each other (each shows the other its devices).
async fn accepting(mut alice: Device, mut bob: Device, mut carol: Device) -> (Device, Device, Device) {
    let (ia, ib, ic) = (alice.account().unwrap(), bob.account().unwrap(), carol.account().unwrap());
    bob.accept_chats_from(ia, true).await.unwrap();
    bob.accept_chats_from(ic, true).await.unwrap();
    alice.accept_chats_from(ib, true).await.unwrap();
    carol.accept_chats_from(ib, true).await.unwrap();
    (alice, bob, carol)
}

async fn texts(session: &Session, chat: SecretId) -> Vec<String> {
    session.secret_messages(chat).await.unwrap().into_iter().map(|m| m.message.text).collect()
}

fn message_in(chat: SecretId, text: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::SecretMessage { chat: c, message } if *c == chat && message.message.text == text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_offer_accept_deliver_queue_decline_and_close_by_themselves() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    // No device looks another up first: the sessions fetch the keys they need.
    let alice = new_account(&relay, &dir.path().join("alice"), "alice phone").await;
    let bob = new_account(&relay, &dir.path().join("bob"), "bob laptop").await;
    let carol = new_account(&relay, &dir.path().join("carol"), "carol tablet").await;
    let bob_account = bob.account().unwrap();
    let (alice, bob, carol) = accepting(alice, bob, carol).await;
    let (mut alice, mut bob, mut carol) = (start(alice), start(bob), start(carol));
    let (mut alice_ev, mut bob_ev, mut carol_ev) = (alice.events(), bob.events(), carol.events());
    for s in [&alice, &bob, &carol] {
        wait_idle(s, 20).await;
    }

    // Alice and carol both offer bob's device a chat at once; bob's session answers both.
    let a = alice.secret_start(only_device(&alice, bob_account).await).await.unwrap();
    let c = carol.secret_start(only_device(&carol, bob_account).await).await.unwrap();
    let mut offered = Vec::new();
    while offered.len() < 2 {
        if let Event::SecretOffered { chat, .. } =
            wait_event(&mut bob_ev, 20, |e| matches!(e, Event::SecretOffered { .. })).await
        {
            offered.push(chat);
        }
    }
    offered.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(offered, want, "both offers reached bob's device");

    // Bob accepts alice's (her account's keys are fetched to check her device) and declines
    // carol's: carol's session hears of it and deletes the chat.
    bob.secret_accept(a).await.unwrap();
    bob.secret_close(c).await.unwrap();
    wait_event(&mut carol_ev, 20, |e| matches!(e, Event::SecretClosed { chat } if *chat == c)).await;
    assert!(carol.secret_chats().await.unwrap().is_empty(), "the declined offer is gone on carol's device");
    wait_event(&mut alice_ev, 20, |e| matches!(e, Event::SecretLinked { chat } if *chat == a)).await;

    // Messages pass both ways; one disappears a second after bob reads it, on both devices.
    alice.secret_send(a, "hello bob", None).await.unwrap();
    let burn = alice.secret_send(a, "this burns", Some(1)).await.unwrap();
    wait_event(&mut bob_ev, 20, message_in(a, "hello bob")).await;
    wait_event(&mut bob_ev, 20, message_in(a, "this burns")).await;
    bob.secret_send(a, "hello alice", None).await.unwrap();
    wait_event(&mut alice_ev, 20, message_in(a, "hello alice")).await;
    bob.secret_read(a, &burn.message.id).await.unwrap();
    let gone =
        |e: &Event| matches!(e, Event::SecretExpired { chat, message } if *chat == a && *message == burn.message.id);
    wait_event(&mut bob_ev, 20, gone).await;
    wait_event(&mut alice_ev, 20, gone).await;
    assert_eq!(texts(&bob, a).await, ["hello bob", "hello alice"]);
    assert_eq!(texts(&alice, a).await, ["hello bob", "hello alice"]);
    assert_eq!(alice.secret_fingerprint(a).await.unwrap(), bob.secret_fingerprint(a).await.unwrap());

    // A burst well past a re-key (each direction re-keys after 100 transport messages), written
    // while earlier ones are still in flight: every message arrives, in order.
    let burst: Vec<String> = (0..150).map(|i| format!("burst {i}")).collect();
    for text in &burst {
        alice.secret_send(a, text, None).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < burst.len() {
        if let Event::SecretMessage { message, .. } =
            wait_event(&mut bob_ev, 30, |e| matches!(e, Event::SecretMessage { chat, .. } if *chat == a)).await
        {
            got.push(message.message.text);
        }
    }
    assert_eq!(got, burst);

    // Bob's device goes away; what alice writes meanwhile waits on her device and arrives when
    // bob's device is back (its session reaches alice's at start).
    let bob_device = bob.stop().await.unwrap();
    alice.secret_send(a, "while you were away", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob = start(bob_device);
    bob_ev = bob.events();
    wait_event(&mut bob_ev, 30, message_in(a, "while you were away")).await;

    // Alice closes the chat: it goes from both devices.
    alice.secret_close(a).await.unwrap();
    wait_event(&mut bob_ev, 20, |e| matches!(e, Event::SecretClosed { chat } if *chat == a)).await;
    assert!(bob.secret_chats().await.unwrap().is_empty());
    assert!(alice.secret_chats().await.unwrap().is_empty());
    for s in [alice, bob, carol] {
        s.stop().await.unwrap();
    }
}

/// The relay is SIGKILLed and restarted: the circuit reservation of a device that stayed up
/// went with the old connection, and its session makes a new one, so a device that comes back
/// later still reaches it through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_reachable_across_a_relay_restart() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"));
    let mut alice = new_account(&relay, &dir.path().join("alice"), "alice phone").await;
    let mut bob = new_account(&relay, &dir.path().join("bob"), "bob laptop").await;
    bob.accept_chats_from(alice.account().unwrap(), true).await.unwrap();
    alice.accept_chats_from(bob.account().unwrap(), true).await.unwrap();
    bob.set_secret_auto_accept(true).unwrap();
    let bob_account = bob.account().unwrap();
    let (alice, mut bob) = (start(alice), start(bob));
    let mut bob_ev = bob.events();
    wait_idle(&alice, 20).await;
    wait_idle(&bob, 20).await;
    let a = alice.secret_start(only_device(&alice, bob_account).await).await.unwrap();
    wait_event(&mut bob_ev, 20, |e| matches!(e, Event::SecretLinked { chat } if *chat == a)).await;

    // Alice's device goes away; the relay restarts; bob's session reconnects.
    let mut alice_device = alice.stop().await.unwrap();
    relay.kill();
    relay.restart();
    wait_event(&mut bob_ev, 30, |e| matches!(e, Event::Connected)).await;

    // Alice writes while away, then comes back: only her session has something to deliver, so
    // it must reach bob's device, whose new reservation is the only way in.
    alice_device.secret_send(a, "after the restart", None).unwrap();
    let alice = start(alice_device);
    wait_event(&mut bob_ev, 40, message_in(a, "after the restart")).await;
    for s in [alice, bob] {
        s.stop().await.unwrap();
    }
}
