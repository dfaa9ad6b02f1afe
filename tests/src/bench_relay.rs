//! What the relay bench binaries (`relay_bench`, `relay_abuse`) share: the relay process they
//! start, raw-protocol devices with an account and a notes chat, and small statistics.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::net::{parse_relay_addr, Net, RelayStream};
use stratus_engine::proto::cert::{AccountKeys, DeviceCertBody};
use stratus_engine::proto::crypto::{seal_delta, wrap_chat_key, ChatKey, DeltaAd, SealedBox};
use stratus_engine::proto::directory::KeyTerms;
use stratus_engine::proto::wire::{ChatKind, ClientFrame, RelayFrame, ReqId, WrappedKey, PROTOCOL_VERSION};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch};
use x25519_dalek::{PublicKey, StaticSecret};

/// Plaintext bytes per delta of [`Writer::append`]; sealed it is 24 (nonce) + 160 + 16 (tag) =
/// 200 bytes.
pub const PLAINTEXT_BYTES: usize = 160;
/// No single wait on the relay may take longer than this; the run fails instead of hanging.
pub const STALL: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Small statistics

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Percentile (nearest rank) of a sorted slice.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The mean of durations (zero for none).
pub fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

/// The median (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// The relay process

/// A `stratus-relay` process the bench started; killed when dropped.
pub struct RelayProc {
    child: Option<Child>,
    _stdout: Option<BufReader<ChildStdout>>,
    /// Its address, `/ip4/127.0.0.1/tcp/PORT/p2p/PEER`.
    pub addr: String,
    /// Its process id.
    pub pid: u32,
    /// Its stderr log.
    pub log: PathBuf,
}

impl RelayProc {
    /// Starts `exe` on 127.0.0.1 with its data in `data`, its log in `log`, and `extra` flags.
    pub fn start(exe: &Path, data: &Path, log: &Path, extra: &[&str]) -> RelayProc {
        let stderr = File::create(log).expect("relay log file");
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            // Info level: the relay logs one line per stream, nothing per append. BENCH_RELAY_LOG
            // overrides it (e.g. `stratus_relay=info,libp2p_stream=debug`).
            .env("STRATUS_LOG", std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "stratus_relay=info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not start; see {}", log.display());
        };
        assert!(addr.starts_with("/ip4/127.0.0.1/"), "relay listens on {addr}, not on 127.0.0.1");
        let pid = child.id();
        RelayProc { addr: addr.to_string(), child: Some(child), _stdout: Some(out), pid, log: log.to_path_buf() }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (clean shutdown with a final barrier), SIGKILL after 10 s.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        crate::wait_or_kill(c)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw-protocol devices

/// The id the relay knows a device by.
pub fn device_id(kp: &Keypair) -> DeviceId {
    DeviceId(kp.public().to_peer_id().to_string())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The next frame; panics if none comes within [`STALL`] or the stream ends.
pub async fn recv(raw: &mut Conn, what: &str) -> RelayFrame {
    match tokio::time::timeout(STALL, raw.stream.recv()).await {
        Err(_) => panic!("no frame from the relay within {STALL:?} while waiting for {what}"),
        Ok(Err(e)) => panic!("stream failed while waiting for {what}: {e}"),
        Ok(Ok(None)) => panic!("relay closed the stream while waiting for {what}"),
        Ok(Ok(Some(f))) => f,
    }
}

/// Sends `frame` and returns the reply to `req`, skipping pushes.
pub async fn request(raw: &mut Conn, req: ReqId, frame: ClientFrame) -> RelayFrame {
    raw.stream.send(&frame).await.expect("send");
    reply(raw, req).await
}

/// The reply to `req`, skipping pushes; panics on an error not tied to a request.
pub async fn reply(raw: &mut Conn, req: ReqId) -> RelayFrame {
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
pub struct Conn {
    /// The swarm (kept alive with the stream).
    pub _net: Net,
    /// The sync stream.
    pub stream: RelayStream,
}

/// Streams the relay dropped at open (seen as a stream closed before or at `Hello`) and that
/// were opened again.
pub static REOPENED: AtomicU64 = AtomicU64::new(0);

/// Connects `kp`, opens the sync stream and says `Hello`; returns the account the relay knows
/// the device by. A stream that closes before `Hello` is answered is opened again (at most 10
/// times, counted in [`REOPENED`]).
pub async fn connect(kp: Keypair, addr: &str) -> (Conn, Option<AccountId>) {
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
pub struct Writer {
    /// Its connection.
    pub raw: Conn,
    /// Its device id.
    pub device: DeviceId,
    /// Its account's keys.
    pub keys: AccountKeys,
    /// Its notes chat.
    pub chat: ChatId,
    /// The chat key wrapped to its account.
    pub wrapped: SealedBox,
    /// The chat key.
    pub key: ChatKey,
    /// The client seq of its next append.
    pub next_client_seq: u64,
    /// Its next request id.
    pub next_req: ReqId,
    /// Its randomness (from the bench's seed).
    pub rng: StdRng,
    /// Plaintext bytes of each delta [`Writer::append`] makes.
    pub plaintext: usize,
}

impl Writer {
    /// Connects a fresh identity, creates its account (with `keys`) and a notes chat.
    pub async fn create(addr: String, seed: u64, name: String) -> Writer {
        let mut w = Writer::register(addr, seed, name).await;
        w.create_chat().await;
        w
    }

    /// Connects a fresh identity and creates its account; its notes chat is chosen but not
    /// created (see [`Writer::create_chat`]).
    pub async fn register(addr: String, seed: u64, name: String) -> Writer {
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
            wrapped: SealedBox { ephemeral: [0; 32], sealed: Vec::new() },
            keys,
            next_client_seq: 1,
            next_req: 2,
            rng,
            plaintext: PLAINTEXT_BYTES,
        }
    }

    /// Creates [`Writer::chat`] as a notes chat at epoch 0 with [`Writer::key`].
    pub async fn create_chat(&mut self) {
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

    /// The next request id.
    pub fn req(&mut self) -> ReqId {
        let r = self.next_req;
        self.next_req += 1;
        r
    }

    /// A fresh append: a real sealed delta of [`Writer::plaintext`] random bytes (sealed: 40
    /// more).
    pub fn append(&mut self) -> (ReqId, ClientSeq, ClientFrame) {
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

    /// An append of `bytes` random sealed bytes, not a real seal (the relay stores them unopened).
    pub fn append_sized(&mut self, bytes: usize) -> (ReqId, ClientSeq, ClientFrame) {
        let req = self.req();
        let client_seq = ClientSeq(self.next_client_seq);
        self.next_client_seq += 1;
        let mut sealed = vec![0u8; bytes];
        self.rng.fill_bytes(&mut sealed);
        (req, client_seq, ClientFrame::Append { req, chat: self.chat, epoch: Epoch(0), client_seq, sealed })
    }

    /// The account's id.
    pub fn account(&self) -> AccountId {
        self.keys.public().id
    }
}
