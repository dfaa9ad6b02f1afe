//! One handle (issue 14): the operations that need the relay — approving a new device,
//! listing and ending sessions, the session TTL, recovery keys, usernames and contacts, chats
//! with other accounts and their members — are `Session` methods that work while the same
//! session syncs a burst, over its own connection (nothing is stopped, no second swarm).

use std::sync::Arc;
use std::time::Duration;

use stratus_engine::proto::directory::Membership;
use stratus_engine::proto::wire::ChatKind;
use stratus_engine::{Device, Event, Session};
use stratus_tests::Relay;

async fn wait_for(events: &mut tokio::sync::broadcast::Receiver<Event>, what: &str, f: impl Fn(&Event) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("no {what} within 60 s"),
            Ok(Ok(e)) if f(&e) => return,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("events: {e}"),
        }
    }
}

async fn settle(s: &Session, chat: stratus_engine::ChatId, n: usize) {
    for _ in 0..240 {
        if s.messages(chat).await.map_or(0, |m| m.len()) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("chat {chat} never reached {n} messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_operation_works_while_the_session_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), &["--min-session-age-secs", "0"]);
    let mut laptop = Device::open(&dir.path().join("laptop")).unwrap();
    laptop.create_account(&relay.addr, "laptop").await.unwrap();
    let mut sa = Session::start(laptop).unwrap();
    let mut ea = sa.events();
    wait_for(&mut ea, "idle", |e| matches!(e, Event::Idle)).await;
    let sa = Arc::new(sa);

    // A burst keeps the session busy for the whole test.
    let notes = sa.create_chat("notes").await.unwrap();
    let burst = {
        let sa = sa.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                sa.send(notes, &format!("busy {i}")).await.unwrap();
            }
        })
    };

    // Approving a new device from the running session.
    let mut phone = Device::open(&dir.path().join("phone")).unwrap();
    let code = phone.link_code().unwrap();
    let (addr, code2) = (relay.addr.clone(), code.clone());
    let linking = tokio::spawn(async move { phone.link(&addr, "phone", &code2).await.map(|_| phone) });
    let mut approved = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match sa.approve(&code).await {
            Ok(a) => {
                approved = Some(a);
                break;
            }
            // The new device has not registered its wait yet.
            Err(e) => eprintln!("approve: {e}; again"),
        }
    }
    let (phone_id, name) = approved.expect("approved");
    assert_eq!(name, "phone");
    let phone = linking.await.unwrap().unwrap();
    let mut sp = Session::start(phone).unwrap();
    let mut ep = sp.events();

    // Sessions, TTL, recovery key, username.
    let (sessions, ttl) = sa.sessions().await.unwrap();
    assert_eq!(ttl, 0);
    assert!(sessions.iter().any(|s| s.device == phone_id), "{sessions:?}");
    sa.set_session_ttl(30).await.unwrap();
    assert_eq!(sa.sessions().await.unwrap().1, 30);
    let key = sa.create_recovery_key().await.unwrap();
    assert!(key.to_string().starts_with("stratus-recovery-"), "{key}");
    sa.set_username(Some("ann")).await.unwrap();

    // Another account; a group with it, made by username; a member change; a rename.
    let mut cat = Device::open(&dir.path().join("cat")).unwrap();
    cat.create_account(&relay.addr, "cat").await.unwrap();
    let mut sc = Session::start(cat).unwrap();
    let mut ec = sc.events();
    sc.set_username(Some("cat")).await.unwrap();
    let ann_id = sc.lookup("ann", None).await.unwrap().account.parse().unwrap();
    sc.accept_chats_from(ann_id, true).await.unwrap();
    let contact = sa.lookup("cat", None).await.unwrap();
    let confirmed = sa.lookup("cat", Some(&contact.safety_number)).await.unwrap();
    assert!(confirmed.verified);
    let group = sa.create_chat_with(ChatKind::Group, "together", &["cat".to_string()]).await.unwrap();
    wait_for(&mut ec, "the group on cat's device", |e| matches!(e, Event::ChatAdded { chat } if *chat == group)).await;
    sa.send(group, "hello cat").await.unwrap();
    settle(&sc, group, 1).await;
    sa.rename(group, "renamed").await.unwrap();
    let account = confirmed.account.parse().unwrap();
    sa.change_members(group, Membership::Remove { account }).await.unwrap();
    wait_for(&mut ec, "cat removed", |e| matches!(e, Event::ChatLeft { chat } if *chat == group)).await;
    assert!(sa.chats().await.unwrap().iter().any(|c| c.title.as_deref() == Some("renamed")));

    // Ending the phone's session from the running laptop session: the phone hears it.
    sa.revoke(phone_id.clone()).await.unwrap();
    wait_for(&mut ep, "the phone's session ended", |e| matches!(e, Event::SessionRevoked)).await;
    assert!(!sa.sessions().await.unwrap().0.iter().any(|s| s.device == phone_id));

    burst.await.unwrap();
    settle(&sa, notes, 300).await;
    let _ = sp.stop().await;
    sc.stop().await.unwrap();
}
