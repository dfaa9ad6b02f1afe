//! Lame-duck shutdown (issue 19, item 7), against the real relay binary: SIGTERM while a device
//! appends; the relay stops listening, answers what it accepted, closes the streams, makes
//! everything durable and exits 0; every append the device saw acknowledged is there after
//! the restart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stratus_engine::proto::wire::RelayFrame;
use stratus_engine::{ClientSeq, Seq};
use stratus_tests::*;

#[test]
fn sigterm_while_a_device_appends_keeps_every_acknowledged_append_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start_with(&data, &["--requests-per-second", "0", "--shutdown-grace-secs", "20"]);
    let acct = account(&relay, &dir.path().join("a"), "a");
    let rt = rt();
    // Appends in windows of 8, each window's answers read before the next; SIGTERM once 100
    // are acknowledged, then on until the relay closes the stream.
    let (acked, refused) = rt.block_on(async {
        let mut r = raw(&relay, &acct).await;
        let (mut acked, mut refused) = (BTreeMap::<ClientSeq, Seq>::new(), 0);
        let (mut req, mut cs) = (0u64, 1_000u64);
        let mut termed = false;
        'appending: loop {
            let mut waiting = BTreeMap::new();
            for _ in 0..8 {
                (req, cs) = (req + 1, cs + 1);
                if r.stream.send(&append(req, acct.chat, cs, 200)).await.is_err() {
                    break 'appending;
                }
                waiting.insert(req, ClientSeq(cs));
            }
            while !waiting.is_empty() {
                let frame = tokio::time::timeout(Duration::from_secs(20), r.stream.recv()).await;
                match frame.expect("the relay answers or closes within 20 s") {
                    Ok(Some(RelayFrame::Acked { req, client_seq, seq, .. })) => {
                        assert_eq!(waiting.remove(&req), Some(client_seq));
                        acked.insert(client_seq, seq);
                    }
                    // Only while draining: not stored, the device would send it again.
                    Ok(Some(RelayFrame::RateLimited { req, .. })) => {
                        assert!(termed, "refused before the shutdown");
                        waiting.remove(&req);
                        refused += 1;
                    }
                    Ok(Some(RelayFrame::Push { .. } | RelayFrame::PushAccount { .. })) => {}
                    Ok(Some(other)) => panic!("unexpected {other:?}"),
                    Ok(None) | Err(_) => break 'appending,
                }
            }
            if !termed && acked.len() >= 100 {
                relay.send_term();
                termed = true;
            }
        }
        assert!(termed, "the relay closed the stream before it was told to stop");
        (acked, refused)
    });
    eprintln!("acknowledged {}, refused while draining {refused}", acked.len());

    // New connections are refused once it has stopped listening (while it drains, or after).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !relay.log().contains("listeners closed") {
        assert!(Instant::now() < deadline, "the relay never stopped listening: {}", relay.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let fresh = stratus_engine::libp2p::identity::Keypair::generate_ed25519();
    assert!(rt.block_on(Raw::try_connect(fresh, &relay.addr)).is_err(), "a new connection during the drain");

    let status = relay.wait_exit().expect("the relay ran");
    assert!(status.success(), "exit status {status:?}; log: {}", relay.log());
    let log = relay.log();
    assert!(log.contains("draining") && log.contains("stopped: everything written is durable"), "{log}");

    relay.restart();
    let stored = rt.block_on(async { raw(&relay, &acct).await.fetch_all(acct.chat).await });
    let stored: BTreeMap<ClientSeq, Seq> =
        stored.iter().filter(|d| d.client_seq.0 > 1_000).map(|d| (d.client_seq, d.seq)).collect();
    for (cs, seq) in &acked {
        assert_eq!(stored.get(cs), Some(seq), "acknowledged append {cs:?} lost or moved");
    }
}
