//! Append → push latency between two devices of one account.

use super::*;

pub(super) struct PushStats {
    pub(super) sent: usize,
    pub(super) pushes: Vec<Duration>, // sorted
    pub(super) acks: Vec<Duration>,   // sorted
    pub(super) achieved_rate: f64,
    pub(super) perf: PerfResult,
    pub(super) verified: usize,
}

/// Device B waits for approval under a link id, as `Device::link` does.
pub(super) struct Waiting {
    pub(super) raw: Conn,
    pub(super) device: DeviceId,
    pub(super) x25519: StaticSecret,
}

pub(super) fn link_id(secret: &[u8; 16]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"stratus-link-id");
    h.update(secret);
    *h.finalize().as_bytes()
}

pub(super) fn link_context(device: &DeviceId) -> Vec<u8> {
    let mut c = b"link-bundle/".to_vec();
    c.extend_from_slice(device.0.as_bytes());
    c
}

pub(super) async fn push_latency(ctx: &Ctx, addr: &str, seed: u64, secs: u64, rate: u64) -> PushStats {
    let mut rng = StdRng::seed_from_u64(seed);
    // A: a fresh account (its chat comes after B is linked, so B learns the key from the log).
    let mut a = {
        let kp = Keypair::generate_ed25519();
        let device = device_id(&kp);
        let (mut raw, known) = connect(kp, addr).await;
        assert_eq!(known, None);
        let keys = AccountKeys::generate(&mut rng);
        let mut x = [0u8; 32];
        rng.fill_bytes(&mut x);
        let cert = keys.certify(DeviceCertBody {
            account: keys.public().id,
            device: device.clone(),
            device_x25519: PublicKey::from(&StaticSecret::from(x)).to_bytes(),
            name: "bench-a".into(),
            created_ms: now_ms(),
        });
        match request(&mut raw, 1, ClientFrame::CreateAccount { req: 1, account: keys.public(), cert, invite: None })
            .await
        {
            RelayFrame::Done { .. } => {}
            other => panic!("create account failed: {other:?}"),
        }
        let mut wrng = StdRng::seed_from_u64(rng.next_u64());
        Writer {
            raw,
            device,
            keys,
            chat: ChatId::random(&mut wrng),
            key: ChatKey::random(&mut wrng),
            wrapped: stratus_engine::proto::crypto::SealedBox { ephemeral: [0; 32], sealed: Vec::new() },
            next_client_seq: 1,
            next_req: 2,
            rng: wrng,
            plaintext: PLAINTEXT_BYTES,
        }
    };

    // B: a fresh device that waits under a link id (one-time secret known to A "out of band").
    let mut secret = [0u8; 16];
    rng.fill_bytes(&mut secret);
    let mut xb = [0u8; 32];
    rng.fill_bytes(&mut xb);
    let b = {
        let kp = Keypair::generate_ed25519();
        let device = device_id(&kp);
        let (raw, known) = connect(kp, addr).await;
        assert_eq!(known, None);
        Waiting { raw, device, x25519: StaticSecret::from(xb) }
    };
    let b_x25519 = PublicKey::from(&b.x25519).to_bytes();
    let b_device = b.device.clone();
    let link = link_id(&secret);
    let b_task = tokio::spawn(async move {
        let mut b = b;
        let wait = ClientFrame::LinkWait {
            req: 1,
            link_id: link,
            device_x25519: PublicKey::from(&b.x25519).to_bytes(),
            name: "bench-b".into(),
        };
        let RelayFrame::LinkApproved { account, cert, bundle, .. } = request(&mut b.raw, 1, wait).await else {
            panic!("link wait was not approved");
        };
        let plain = open_box(&b.x25519, &secret, &link_context(&b.device), &bundle).expect("bundle opens");
        let keys: AccountKeys = postcard::from_bytes(&plain).expect("bundle decodes");
        assert_eq!(keys.public(), account, "the bundle holds the account's keys");
        cert.verify(&account.genesis()).expect("certificate verifies");
        assert_eq!(cert.body.device, b.device);
        (b, keys)
    });

    // A looks the waiting device up (B's LinkWait may not have reached the relay yet) and
    // approves it: certificate plus the account bundle sealed to B's key and the link secret.
    let info = loop {
        let req = a.req();
        match request(&mut a.raw, req, ClientFrame::LinkLookup { req, link_id: link }).await {
            f @ RelayFrame::LinkInfo { .. } => break f,
            RelayFrame::Error { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("unexpected answer to a link lookup: {other:?}"),
        }
    };
    let RelayFrame::LinkInfo { device, device_x25519, name, .. } = info else { unreachable!() };
    assert!(device == b_device && device_x25519 == b_x25519, "the relay names the device that waits");
    let account = a.keys.public();
    let cert = a.keys.certify(DeviceCertBody {
        account: account.id,
        device: device.clone(),
        device_x25519,
        name,
        created_ms: now_ms(),
    });
    let bundle_plain = postcard::to_allocvec(&a.keys).expect("keys serialize");
    let bundle = seal_box(&device_x25519, &secret, &link_context(&device), &bundle_plain, &mut rng);
    let req = a.req();
    match request(&mut a.raw, req, ClientFrame::LinkApprove { req, link_id: link, cert, bundle }).await {
        RelayFrame::Done { .. } => {}
        other => panic!("approve failed: {other:?}"),
    }
    let (mut b, b_keys) = tokio::time::timeout(STALL, b_task).await.expect("link completes").expect("link task");

    // The chat, created now: B receives its wrapped key through the account log.
    a.create_chat().await;
    let (chat, wrapped_a) = (a.chat, a.wrapped.clone());
    let n = (secs * rate) as usize;
    let b_deadline = Duration::from_secs(secs) * 2 + STALL;
    let b_task = tokio::spawn(async move {
        let mut got: Vec<Option<Instant>> = vec![None; n];
        let (mut received, mut verified) = (0usize, 0usize);
        let mut key: Option<ChatKey> = None;
        let deadline = tokio::time::Instant::now() + b_deadline;
        while received < n {
            let f = match tokio::time::timeout_at(deadline, b.raw.stream.recv()).await {
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => panic!("relay closed B's stream"),
                Ok(Err(e)) => panic!("B's stream failed: {e}"),
                Err(_) => break,
            };
            let now = Instant::now();
            match f {
                RelayFrame::Push { delta } if delta.chat == chat => {
                    let i = delta.client_seq.0 as usize - 1;
                    if i < n && got[i].is_none() {
                        got[i] = Some(now);
                        received += 1;
                    }
                    if let Some(k) = &key {
                        if open_delta(k, &delta.ad(), &delta.sealed).is_ok_and(|p| p.len() == PLAINTEXT_BYTES) {
                            verified += 1;
                        }
                    }
                }
                RelayFrame::PushAccount { entry } => {
                    if let AccountEvent::ChatAdded { terms, key: wrapped, .. } = entry.event {
                        if terms.chat == chat {
                            let id = b_keys.public().id;
                            key = Some(
                                unwrap_chat_key(&wrapped.key, chat, terms.epoch, id, &b_keys.kem_secret())
                                    .expect("B unwraps the chat key"),
                            );
                            assert_eq!(wrapped.key, wrapped_a);
                        }
                    }
                }
                _ => {}
            }
        }
        (got, verified)
    });

    // A: paced appends; acks are read between sends.
    let perf = ctx.perf.then(|| Perf::start(ctx.relay_pid, &ctx.perf_dir, "push", ctx.fsync_times));
    let mut sent_at: Vec<Instant> = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    let mut inflight: VecDeque<(ReqId, Instant)> = VecDeque::new();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let on_frame = |f: RelayFrame, inflight: &mut VecDeque<(ReqId, Instant)>, acks: &mut Vec<Duration>| match f {
        RelayFrame::Acked { req, .. } => {
            let now = Instant::now();
            let i = inflight.iter().position(|(r, _)| *r == req).expect("ack for an append in flight");
            let (_, t) = inflight.remove(i).expect("valid position");
            acks.push(now - t);
        }
        RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } => {}
        other => panic!("unexpected frame at A: {other:?}"),
    };
    for i in 0..n {
        let due = start + interval * i as u32;
        loop {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(due) => break,
                f = a.raw.stream.recv() => {
                    let f = f.expect("A's stream").expect("relay closed A's stream");
                    on_frame(f, &mut inflight, &mut acks);
                }
            }
        }
        let (req, client_seq, frame) = a.append();
        assert_eq!(client_seq.0 as usize, i + 1);
        let t = Instant::now();
        sent_at.push(t);
        inflight.push_back((req, t));
        a.raw.stream.send(&frame).await.expect("send append");
    }
    let achieved_rate = n as f64 / start.elapsed().as_secs_f64();
    while !inflight.is_empty() {
        let f = recv(&mut a.raw, "an ack").await;
        on_frame(f, &mut inflight, &mut acks);
    }
    let (got, verified) = b_task.await.expect("B's task");
    let perf = perf.map(Perf::stop).unwrap_or_default();
    let missing = got.iter().filter(|g| g.is_none()).count();
    assert_eq!(missing, 0, "B missed {missing} of {n} pushes");
    let mut pushes: Vec<Duration> = got.iter().zip(&sent_at).map(|(g, s)| g.expect("checked") - *s).collect();
    pushes.sort();
    acks.sort();
    PushStats { sent: n, pushes, acks, achieved_rate, perf, verified }
}

// ---------------------------------------------------------------------------------------------
// Reporting
