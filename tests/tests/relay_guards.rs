//! What the relay must refuse, and what it must never keep: bad input gets a typed error while
//! other devices are served; no plaintext reaches its data directory or its log.

use std::time::Duration;

use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::proto::wire::{ClientFrame, ErrorCode, RelayFrame, PROTOCOL_VERSION};
use stratus_engine::{ChatId, ClientSeq, Epoch, Session};
use stratus_tests::*;

fn code_of(f: &RelayFrame) -> Option<ErrorCode> {
    match f {
        RelayFrame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn bad_input_gets_typed_errors_and_the_relay_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let chat = stratus_ok(&a, &["chat", "create", "--title", "a's notes"]).trim().to_string();
    let chat_id: ChatId = chat.parse().unwrap();
    stratus_ok(&b, &["account", "create", "--relay", &relay.addr, "--name", "b"]);
    let b_keys = stratus_engine::Device::open(&b).unwrap().keypair();

    rt().block_on(async {
        let append = |req| ClientFrame::Append {
            req,
            chat: chat_id,
            epoch: Epoch(0),
            client_seq: ClientSeq(1000 + req),
            sealed: vec![7; 64],
        };

        // Unknown device: hello works (it may want to log in), anything else is refused.
        let mut raw = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
        assert!(matches!(raw.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: None, .. }));
        assert_eq!(code_of(&raw.request(append(1)).await), Some(ErrorCode::UnknownDevice));
        assert_eq!(
            code_of(
                &raw.request(ClientFrame::FetchChat { req: 2, chat: chat_id, after: Default::default(), max: 10 })
                    .await
            ),
            Some(ErrorCode::UnknownDevice)
        );

        // Wrong protocol version: a typed error, then the stream closes.
        let mut raw = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
        assert_eq!(code_of(&raw.hello(PROTOCOL_VERSION + 1).await), Some(ErrorCode::UnsupportedVersion));
        assert_eq!(raw.next().await, None, "closed after a version mismatch");

        // A frame before hello.
        let mut raw = Raw::connect(Keypair::generate_ed25519(), &relay.addr).await;
        assert_eq!(code_of(&raw.request(append(3)).await), Some(ErrorCode::ProtocolViolation));

        // Account b's device: garbage frames are errors and the stream goes on.
        let mut rb = Raw::connect(b_keys.clone(), &relay.addr).await;
        assert!(matches!(rb.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
        rb.stream.send_raw_frame(&[0xff; 40]).await.unwrap();
        assert_eq!(code_of(&rb.next().await.unwrap()), Some(ErrorCode::MalformedFrame));
        rb.stream.send_raw_frame(&[]).await.unwrap();
        assert_eq!(code_of(&rb.next().await.unwrap()), Some(ErrorCode::MalformedFrame));
        // Not a member of a's chat.
        assert_eq!(code_of(&rb.request(append(4)).await), Some(ErrorCode::NotMember));
        assert_eq!(
            code_of(
                &rb.request(ClientFrame::FetchChat { req: 5, chat: chat_id, after: Default::default(), max: 10 }).await
            ),
            Some(ErrorCode::NotMember)
        );
        assert_eq!(
            code_of(
                &rb.request(ClientFrame::FetchChat {
                    req: 6,
                    chat: ChatId([9; 16]),
                    after: Default::default(),
                    max: 10
                })
                .await
            ),
            Some(ErrorCode::UnknownChat)
        );
        // The stream still serves b.
        assert!(matches!(rb.request(ClientFrame::SyncState { req: 7 }).await, RelayFrame::SyncState { req: 7, .. }));

        // An oversized length prefix: a typed error, then the stream closes.
        let mut big = Raw::connect(b_keys, &relay.addr).await;
        assert!(matches!(big.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { .. }));
        big.stream.send_unframed(&(64u32 << 20).to_be_bytes()).await.unwrap();
        big.stream.send_unframed(&[0u8; 1024]).await.unwrap();
        assert_eq!(code_of(&big.next().await.unwrap()), Some(ErrorCode::FrameTooLarge));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), big.stream.recv()).await.unwrap().ok().flatten(),
            None
        );

        // Meanwhile a's device is served as usual.
        let session = Session::start(stratus_engine::Device::open(&a).unwrap()).unwrap();
        session.send(chat_id, "still served").await.unwrap();
        wait_idle(&session, 30).await;
        session.stop().await.unwrap();
    });
    assert!(stratus_ok(&a, &["log", &chat]).contains("still served"));
    assert!(!relay.log().contains("panicked"));
}

#[test]
fn no_plaintext_in_the_relay_data_directory_or_log() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stratus_ok(&a, &["account", "create", "--relay", &relay.addr, "--name", "a"]);
    let title = "TITLE-MARKER-7f3a9c";
    let chat = stratus_ok(&a, &["chat", "create", "--title", title]).trim().to_string();
    link_device(&relay, &a, &b, "b");
    let markers: Vec<String> = (0..20).map(|i| format!("PLAINTEXT-MARKER-{i:02}-c0ffee")).collect();
    for m in &markers {
        stratus_ok(&a, &["send", &chat, m]);
    }
    stratus_ok(&b, &["sync"]);
    let log_b = stratus_ok(&b, &["log", &chat]);
    assert!(markers.iter().all(|m| log_b.contains(m)), "the markers did arrive");

    let mut needles: Vec<Vec<u8>> = markers.iter().map(|m| m.as_bytes().to_vec()).collect();
    needles.push(title.as_bytes().to_vec());
    // Shorter fragments catch a marker that was split or partly encoded.
    needles.push(b"PLAINTEXT-MARKER".to_vec());
    needles.push(b"c0ffee".to_vec());
    for file in files_under(&relay.data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                "{} holds plaintext {:?}",
                file.display(),
                String::from_utf8_lossy(n)
            );
        }
    }
    let log = relay.log();
    assert!(!log.is_empty(), "the relay logged at debug level");
    for n in &needles {
        assert!(!log.contains(&*String::from_utf8_lossy(n)), "the relay log holds plaintext");
    }
}
