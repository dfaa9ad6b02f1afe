//! Raw-protocol writer devices and the throughput runs.

use super::*;
use stratus_engine::proto::directory::KeyTerms;

pub(super) fn device_id(kp: &Keypair) -> DeviceId {
    DeviceId(kp.public().to_peer_id().to_string())
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(super) async fn recv(raw: &mut Conn, what: &str) -> RelayFrame {
    match tokio::time::timeout(STALL, raw.stream.recv()).await {
        Err(_) => panic!("no frame from the relay within {STALL:?} while waiting for {what}"),
        Ok(Err(e)) => panic!("stream failed while waiting for {what}: {e}"),
        Ok(Ok(None)) => panic!("relay closed the stream while waiting for {what}"),
        Ok(Ok(Some(f))) => f,
    }
}

/// Sends `frame` and returns the reply to `req`, skipping pushes.
pub(super) async fn request(raw: &mut Conn, req: ReqId, frame: ClientFrame) -> RelayFrame {
    raw.stream.send(&frame).await.expect("send");
    reply(raw, req).await
}

pub(super) async fn reply(raw: &mut Conn, req: ReqId) -> RelayFrame {
    loop {
        let f = recv(raw, "a reply").await;
        if let RelayFrame::Error { req: None, code, message } = &f {
            panic!("relay error {code:?}: {message}");
        }
        if f.req() == Some(req) {
            return f;
        }
    }
}

/// One device's libp2p swarm and its sync stream, after `Hello`.
pub(super) struct Conn {
    pub(super) _net: Net,
    pub(super) stream: RelayStream,
}

/// Streams the relay dropped at open (seen as a stream closed before or at `Hello`) and that
/// were opened again.
pub(super) static REOPENED: AtomicU64 = AtomicU64::new(0);

/// Connects `kp`, opens the sync stream and says `Hello`; returns the account the relay knows
/// the device by. A stream that closes before `Hello` is answered is opened again (at most 10
/// times, counted in [`REOPENED`]).
pub(super) async fn connect(kp: Keypair, addr: &str) -> (Conn, Option<AccountId>) {
    let (peer, ma) = parse_relay_addr(addr).expect("relay address");
    let mut net = Net::start(kp).expect("swarm starts");
    let mut attempt = 0;
    loop {
        let r: Result<(RelayStream, Option<AccountId>), String> = async {
            let mut stream = net.open(peer, ma.clone()).await.map_err(|e| format!("open: {e}"))?;
            stream
                .send(&ClientFrame::Hello { version: PROTOCOL_VERSION })
                .await
                .map_err(|e| format!("send hello: {e}"))?;
            match tokio::time::timeout(STALL, stream.recv()).await {
                Ok(Ok(Some(RelayFrame::Hello { account, .. }))) => Ok((stream, account)),
                Ok(Ok(Some(other))) => panic!("unexpected answer to hello: {other:?}"),
                Ok(Ok(None)) => Err("stream closed before hello was answered".into()),
                Ok(Err(e)) => Err(format!("recv hello: {e}")),
                Err(_) => Err("no answer to hello".into()),
            }
        }
        .await;
        match r {
            Ok((stream, account)) => return (Conn { _net: net, stream }, account),
            Err(e) if attempt < 10 => {
                attempt += 1;
                REOPENED.fetch_add(1, Ordering::Relaxed);
                eprintln!("  stream to the relay failed ({e}); opening it again (attempt {attempt})");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot open a sync stream to the relay after {attempt} retries: {e}"),
        }
    }
}

/// A device of its own account with one notes chat.
pub(super) struct Writer {
    pub(super) raw: Conn,
    pub(super) device: DeviceId,
    pub(super) keys: AccountKeys,
    pub(super) chat: ChatId,
    pub(super) wrapped: stratus_engine::proto::crypto::SealedBox,
    pub(super) key: ChatKey,
    pub(super) next_client_seq: u64,
    pub(super) next_req: ReqId,
    pub(super) rng: StdRng,
    /// Plaintext bytes of each delta [`Writer::append`] makes.
    pub(super) plaintext: usize,
}

impl Writer {
    /// Connects a fresh identity, creates its account (with `keys`) and a notes chat.
    pub(super) async fn create(addr: String, seed: u64, name: String) -> Writer {
        let mut w = Writer::register(addr, seed, name).await;
        w.create_chat().await;
        w
    }

    /// Connects a fresh identity and creates its account; its notes chat is chosen but not
    /// created (see [`Writer::create_chat`]).
    pub(super) async fn register(addr: String, seed: u64, name: String) -> Writer {
        let mut rng = StdRng::seed_from_u64(seed);
        let kp = Keypair::generate_ed25519();
        let device = device_id(&kp);
        let (mut raw, known) = connect(kp, &addr).await;
        assert_eq!(known, None, "a fresh device is unknown to the relay");
        let keys = AccountKeys::generate(&mut rng);
        let account = keys.public();
        let mut device_x25519 = [0u8; 32];
        rng.fill_bytes(&mut device_x25519);
        let device_x25519 = PublicKey::from(&StaticSecret::from(device_x25519)).to_bytes();
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: device.clone(),
            device_x25519,
            name,
            created_ms: now_ms(),
        });
        match request(&mut raw, 1, ClientFrame::CreateAccount { req: 1, account, cert, invite: None }).await {
            RelayFrame::Done { .. } => {}
            other => panic!("create account failed: {other:?}"),
        }
        Writer {
            raw,
            device,
            chat: ChatId::random(&mut rng),
            key: ChatKey::random(&mut rng),
            wrapped: stratus_engine::proto::crypto::SealedBox { ephemeral: [0; 32], sealed: Vec::new() },
            keys,
            next_client_seq: 1,
            next_req: 2,
            rng,
            plaintext: PLAINTEXT_BYTES,
        }
    }

    pub(super) async fn create_chat(&mut self) {
        let account = self.keys.public();
        self.wrapped = wrap_chat_key(&self.key, self.chat, Epoch(0), account.id, &account.kem_key, &mut self.rng);
        let req = self.req();
        let frame = ClientFrame::CreateChat {
            req,
            chat: self.chat,
            kind: ChatKind::Notes,
            epoch: Epoch(0),
            client_seq: ClientSeq(0),
            keys: vec![WrappedKey {
                account: account.id,
                generation: 0,
                content: true,
                signature: self.keys.sign_chat_key(
                    &KeyTerms { chat: self.chat, kind: ChatKind::Notes, epoch: Epoch(0), members: [account.id].into() },
                    account.id,
                    0,
                    true,
                    &self.wrapped,
                ),
                key: self.wrapped.clone(),
            }],
        };
        match request(&mut self.raw, req, frame).await {
            RelayFrame::Done { .. } => {}
            other => panic!("create chat failed: {other:?}"),
        }
    }

    pub(super) fn req(&mut self) -> ReqId {
        let r = self.next_req;
        self.next_req += 1;
        r
    }

    /// A fresh append: a real sealed delta of [`Writer::plaintext`] random bytes (sealed: 40
    /// more).
    pub(super) fn append(&mut self) -> (ReqId, ClientSeq, ClientFrame) {
        let len = self.plaintext;
        let req = self.req();
        let client_seq = ClientSeq(self.next_client_seq);
        self.next_client_seq += 1;
        let mut plain = vec![0u8; len];
        self.rng.fill_bytes(&mut plain);
        let ad = DeltaAd {
            chat: self.chat,
            epoch: Epoch(0),
            device: &self.device,
            account: self.keys.public().id,
            client_seq,
        };
        let sealed = seal_delta(&self.key, &ad, &plain, &mut self.rng);
        (req, client_seq, ClientFrame::Append { req, chat: self.chat, epoch: Epoch(0), client_seq, sealed })
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Durable append throughput

/// Shared progress of one run: completions, and when 10% and 90% of them were reached.
pub(super) struct Progress {
    pub(super) done: AtomicU64,
    pub(super) total: u64,
    pub(super) at10: OnceLock<Instant>,
    pub(super) at90: OnceLock<Instant>,
}

impl Progress {
    pub(super) fn one(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if d == self.total / 10 {
            let _ = self.at10.set(Instant::now());
        }
        if d == self.total * 9 / 10 {
            let _ = self.at90.set(Instant::now());
        }
    }
}

/// `n` appends with at most `window` in flight; returns the writer, each append's send → ack
/// latency, and when the last ack arrived.
pub(super) async fn pump(
    mut w: Writer,
    n: usize,
    window: usize,
    progress: Arc<Progress>,
) -> (Writer, Vec<Duration>, Instant) {
    let mut inflight: VecDeque<(ReqId, Instant)> = VecDeque::with_capacity(window);
    let mut lat = Vec::with_capacity(n);
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < n {
        while sent < n && inflight.len() < window {
            let (req, _, frame) = w.append();
            inflight.push_back((req, Instant::now()));
            w.raw.stream.send(&frame).await.expect("send append");
            sent += 1;
        }
        match recv(&mut w.raw, "an ack").await {
            RelayFrame::Acked { req, .. } => {
                let now = Instant::now();
                let i = inflight.iter().position(|(r, _)| *r == req).expect("an ack for an append in flight");
                let (_, t) = inflight.remove(i).expect("position is valid");
                lat.push(now - t);
                acked += 1;
                progress.one();
            }
            RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } => {}
            other => panic!("unexpected frame during appends: {other:?}"),
        }
    }
    (w, lat, Instant::now())
}

pub(super) struct RunStats {
    pub(super) window: usize,
    pub(super) appends: u64,
    pub(super) elapsed: Duration,
    pub(super) steady_per_sec: Option<f64>,
    pub(super) lat: Vec<Duration>, // sorted
    pub(super) perf: PerfResult,
    pub(super) relay_cpu: f64,
    pub(super) bench_cpu: f64,
}

impl RunStats {
    pub(super) fn per_sec(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64()
    }
    pub(super) fn batch(&self) -> Option<f64> {
        self.perf.fdatasync.filter(|b| *b > 0).map(|b| self.appends as f64 / b as f64)
    }
}

#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) relay_pid: u32,
    pub(super) fsync_times: bool,
    pub(super) perf: bool,
    pub(super) perf_dir: PathBuf,
    pub(super) tck: f64,
}

pub(super) async fn throughput_run(
    ctx: &Ctx,
    writers: Vec<Writer>,
    per_device: usize,
    window: usize,
    tag: &str,
) -> (Vec<Writer>, RunStats) {
    let total = (writers.len() * per_device) as u64;
    let progress = Arc::new(Progress { done: AtomicU64::new(0), total, at10: OnceLock::new(), at90: OnceLock::new() });
    let perf = ctx.perf.then(|| Perf::start(ctx.relay_pid, &ctx.perf_dir, tag, ctx.fsync_times));
    let pid = ctx.relay_pid.to_string();
    let (relay0, self0) = (cpu_secs(&pid, ctx.tck), cpu_secs("self", ctx.tck));
    let start = Instant::now();
    let tasks: Vec<_> =
        writers.into_iter().map(|w| tokio::spawn(pump(w, per_device, window, progress.clone()))).collect();
    let mut writers = Vec::with_capacity(tasks.len());
    let mut lat = Vec::with_capacity(total as usize);
    let mut last = start;
    for t in tasks {
        let (w, l, end) = t.await.expect("writer task");
        writers.push(w);
        lat.extend(l);
        last = last.max(end);
    }
    let elapsed = last - start;
    let (relay1, self1) = (cpu_secs(&pid, ctx.tck), cpu_secs("self", ctx.tck));
    let perf = perf.map(Perf::stop).unwrap_or_default();
    lat.sort();
    let steady_per_sec = match (progress.at10.get(), progress.at90.get()) {
        (Some(a), Some(b)) if b > a => Some((total * 9 / 10 - total / 10) as f64 / (*b - *a).as_secs_f64()),
        _ => None,
    };
    let secs = elapsed.as_secs_f64();
    let stats = RunStats {
        window,
        appends: total,
        elapsed,
        steady_per_sec,
        lat,
        perf,
        relay_cpu: (relay1 - relay0) / secs,
        bench_cpu: (self1 - self0) / secs,
    };
    (writers, stats)
}

// ---------------------------------------------------------------------------------------------
// 3. Append → push latency between two devices of one account
