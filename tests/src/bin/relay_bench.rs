//! `relay_bench`: what a real `stratus-relay` process sustains, against the fsync barrier of
//! the same filesystem, measured in one invocation. See docs/benchmarks.md for results.
//!
//! 1. Durable appends/s: N writer devices (64), each its own libp2p identity, account and notes
//!    chat, each keeping up to W appends (16, then 1) in flight on its one sync stream. An append
//!    counts when its `Acked` arrives, and the relay acks only after an fsync barrier.
//! 2. The fsync barrier alone: a loop of (write 4 KiB, `fdatasync`) on the relay's filesystem,
//!    its latency percentiles and rate; and the fsync-bound ceiling = barriers/s × the mean
//!    group-commit batch the relay achieved (its `fdatasync` calls are counted from outside with
//!    `perf stat -p`; without perf the batch is estimated and reported as an estimate).
//! 3. Append → push latency: device A appends at a paced rate, device B of the same account
//!    (linked through the raw `LinkWait`/`LinkLookup`/`LinkApprove` flow) times each `Push`.
//!
//! Only the raw protocol: no Automerge, no device store, no device-side fsync. Payloads are real
//! sealed deltas (`seal_delta`, 160-byte plaintext → 200 sealed bytes). Only 127.0.0.1.
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay --bins
//! target/release/relay_bench [--quick] [--seed N] [--dir PATH] [--runs N] [--per-device N]
//!                            [--devices N] [--no-perf] [--fsync-times] [--keep]
//! ```
//!
//! `--fsync-times` also records the relay's own fdatasync calls (`perf record` of their entry
//! and exit) to time them. It is off by default: following the relay's short-lived sled IO
//! threads costs `perf record` more than a core here, which halves the relay's throughput.
//!
//! The relay binary is taken from next to this executable (`target/release/stratus-relay`).
//! Its data directory is a fresh temporary directory under `--dir` (default: the system temp
//! directory); the filesystem it lives on is printed, and tmpfs is refused. The relay logs at
//! `stratus_relay=info` (nothing per append) unless `BENCH_RELAY_LOG` gives another filter.
//!
//! A sync stream that the relay closes before answering `Hello` is opened again and counted:
//! libp2p-stream drops inbound streams while its accept channel is full, which a burst of 64
//! devices connecting at once triggers (see docs/benchmarks.md).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::net::{parse_relay_addr, Net, RelayStream};
use stratus_engine::proto::cert::{AccountKeys, DeviceCertBody};
use stratus_engine::proto::crypto::{
    open_box, open_delta, seal_box, seal_delta, unwrap_chat_key, wrap_chat_key, ChatKey, DeltaAd,
};
use stratus_engine::proto::wire::{
    AccountEvent, ChatKind, ClientFrame, RelayFrame, ReqId, WrappedKey, PROTOCOL_VERSION,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch};
use x25519_dalek::{PublicKey, StaticSecret};

/// Plaintext bytes per delta; sealed it is 24 (nonce) + 160 + 16 (tag) = 200 bytes.
const PLAINTEXT_BYTES: usize = 160;
/// Bytes written per iteration of the fsync loop.
const BARRIER_WRITE: usize = 4096;
/// No single wait on the relay may take longer than this; the run fails instead of hanging.
const STALL: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    quick: bool,
    seed: u64,
    dir: PathBuf,
    runs: usize,
    devices: usize,
    window: usize,
    per_device: usize,
    warmup_per_device: usize,
    barrier_samples: usize,
    push_secs: u64,
    push_rate: u64,
    perf: bool,
    fsync_times: bool,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: relay_bench [--quick] [--seed N] [--dir PATH] [--runs N] [--per-device N] [--devices N] \
         [--no-perf] [--fsync-times] [--keep]"
    );
    std::process::exit(2);
}

fn parse_args() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut c = Config {
        quick,
        seed: rand::random(),
        dir: std::env::temp_dir(),
        runs: if quick { 3 } else { 5 },
        devices: 64,
        window: 16,
        per_device: if quick { 100 } else { 500 },
        warmup_per_device: if quick { 20 } else { 100 },
        barrier_samples: if quick { 500 } else { 3000 },
        push_secs: if quick { 2 } else { 10 },
        push_rate: 1000,
        perf: true,
        fsync_times: false,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage()).clone();
        match a.as_str() {
            "--quick" => {}
            "--seed" => c.seed = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => c.dir = PathBuf::from(value()),
            "--runs" => c.runs = value().parse().unwrap_or_else(|_| usage()),
            "--per-device" => c.per_device = value().parse().unwrap_or_else(|_| usage()),
            "--devices" => c.devices = value().parse().unwrap_or_else(|_| usage()),
            "--no-perf" => c.perf = false,
            "--fsync-times" => c.fsync_times = true,
            "--keep" => c.keep = true,
            _ => usage(),
        }
    }
    if c.runs == 0 || c.devices == 0 || c.per_device == 0 {
        usage();
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Small statistics helpers

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Percentile (nearest rank) of a sorted slice.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

fn median(v: &[f64]) -> f64 {
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
// Machine, filesystem, CPU time

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "?".into());
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|r| r.trim().trim_end_matches(" kB").parse().ok()))
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "{cpus} CPUs ({cpu}), {:.0} GiB RAM, Linux {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        read("/proc/sys/kernel/osrelease").trim()
    )
}

fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The mount holding `path`: (mount point, filesystem type, source, options).
fn filesystem_of(path: &Path) -> (String, String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(String, String, String, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        let (left, right) = match line.split_once(" - ") {
            Some(x) => x,
            None => continue,
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        let mount = l[4].replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|b| mount.len() >= b.0.len()) {
            best = Some((mount, r[0].to_string(), r[1].to_string(), l[5].to_string()));
        }
    }
    best.unwrap_or_else(|| ("?".into(), "?".into(), "?".into(), "?".into()))
}

/// Clock ticks per second of /proc/<pid>/stat times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads, living and exited) a process has used.
fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tck
}

// ---------------------------------------------------------------------------------------------
// The relay process

struct RelayProc {
    child: Option<Child>,
    _stdout: Option<BufReader<ChildStdout>>,
    addr: String,
    pid: u32,
    log: PathBuf,
}

impl RelayProc {
    fn start(exe: &Path, data: &Path, log: &Path) -> RelayProc {
        let stderr = File::create(log).expect("relay log file");
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
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

    fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (clean shutdown with a final barrier), SIGKILL after 10 s.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
// Counting the relay's barriers from outside: `perf stat -p` counts its syscalls, and
// `perf record -p` of fdatasync entry and exit gives the time each of its barriers' fdatasync
// took. Both follow threads the relay starts later (tokio's blocking pool). The relay source is
// not touched.

struct Perf {
    stat: Option<(Child, PathBuf)>,
    record: Option<(Child, PathBuf)>,
}

#[derive(Clone, Default)]
struct PerfResult {
    /// `fdatasync` calls the relay made (one per barrier).
    fdatasync: Option<u64>,
    /// `fsync` calls.
    fsync: Option<u64>,
    /// `sync_file_range` calls (sled writing its log buffers).
    sync_file_range: Option<u64>,
    /// `pwrite64` calls (sled writing its log buffers).
    pwrite: Option<u64>,
    /// Duration of each of the relay's fdatasync calls, sorted.
    fdatasync_times: Vec<Duration>,
}

fn perf_works() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "syscalls:sys_enter_fdatasync", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Perf {
    fn start(pid: u32, dir: &Path, tag: &str, record: bool) -> Perf {
        let stat_out = dir.join(format!("perf-stat-{tag}.txt"));
        let record_out = dir.join(format!("perf-fdatasync-{tag}.data"));
        let stat = Command::new("perf")
            .args(["stat", "-x,", "-o"])
            .arg(&stat_out)
            .args([
                "-e",
                "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_sync_file_range,\
                 syscalls:sys_enter_pwrite64",
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|c| (c, stat_out));
        let record = record
            .then(|| {
                Command::new("perf")
                    .args(["record", "-q", "-e", "syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync", "-o"])
                    .arg(&record_out)
                    .args(["-p", &pid.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
                    .map(|c| (c, record_out))
            })
            .flatten();
        // Let both attach before the load starts; the idle relay makes no barriers meanwhile.
        std::thread::sleep(Duration::from_millis(500));
        Perf { stat, record }
    }

    fn stop(mut self) -> PerfResult {
        let mut r = PerfResult::default();
        for (child, _) in [self.stat.as_mut(), self.record.as_mut()].into_iter().flatten() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        }
        for (child, _) in [self.stat.as_mut(), self.record.as_mut()].into_iter().flatten() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some((_, path)) = &self.stat {
            for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
                let f: Vec<&str> = line.split(',').collect();
                if f.len() < 3 {
                    continue;
                }
                let v = f[0].trim().parse::<f64>().ok().map(|v| v as u64);
                match f[2].trim() {
                    "syscalls:sys_enter_fdatasync" => r.fdatasync = v,
                    "syscalls:sys_enter_fsync" => r.fsync = v,
                    "syscalls:sys_enter_sync_file_range" => r.sync_file_range = v,
                    "syscalls:sys_enter_pwrite64" => r.pwrite = v,
                    _ => {}
                }
            }
        }
        if let Some((_, path)) = &self.record {
            let out = Command::new("perf").args(["script", "-F", "tid,time,event", "-i"]).arg(path).output();
            let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            // `  7096  4532.484304: syscalls:sys_enter_fdatasync: `
            let mut entered: std::collections::HashMap<u64, f64> = Default::default();
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 3 {
                    continue;
                }
                let (Ok(tid), Ok(t)) = (f[0].parse::<u64>(), f[1].trim_end_matches(':').parse::<f64>()) else {
                    continue;
                };
                if f[2].contains("sys_enter_fdatasync") {
                    entered.insert(tid, t);
                } else if f[2].contains("sys_exit_fdatasync") {
                    if let Some(t0) = entered.remove(&tid) {
                        r.fdatasync_times.push(Duration::from_secs_f64((t - t0).max(0.0)));
                    }
                }
            }
            r.fdatasync_times.sort();
            let _ = std::fs::remove_file(path);
        }
        r
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        for (child, _) in [self.stat.as_mut(), self.record.as_mut()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fsync barrier alone

struct BarrierStats {
    label: String,
    samples: Vec<Duration>, // sorted
    per_sec: f64,
}

/// `n` timed iterations of (write 4 KiB, fdatasync) in `dir`. `append`: each write extends the
/// file (as sled's log does when it allocates); otherwise the same block is overwritten.
fn fsync_loop(dir: &Path, n: usize, append: bool, label: &str) -> BarrierStats {
    let path = dir.join(if append { "fsync-append.bin" } else { "fsync-overwrite.bin" });
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).expect("fsync file");
    let mut buf = [0u8; BARRIER_WRITE];
    let mut fill = 0u8;
    let mut once = |f: &mut File, buf: &mut [u8; BARRIER_WRITE]| {
        fill = fill.wrapping_add(1);
        buf[0] = fill;
        if append {
            f.write_all(buf).expect("write");
        } else {
            f.write_all_at(buf, 0).expect("write");
        }
        f.sync_data().expect("fdatasync");
    };
    for _ in 0..20 {
        once(&mut f, &mut buf); // the file's first blocks and the journal warm up
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        once(&mut f, &mut buf);
        samples.push(t.elapsed());
    }
    let total = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    samples.sort();
    BarrierStats { label: label.to_string(), samples, per_sec: n as f64 / total.as_secs_f64() }
}

// ---------------------------------------------------------------------------------------------
// Raw protocol helpers

fn device_id(kp: &Keypair) -> DeviceId {
    DeviceId(kp.public().to_peer_id().to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn recv(raw: &mut Conn, what: &str) -> RelayFrame {
    match tokio::time::timeout(STALL, raw.stream.recv()).await {
        Err(_) => panic!("no frame from the relay within {STALL:?} while waiting for {what}"),
        Ok(Err(e)) => panic!("stream failed while waiting for {what}: {e}"),
        Ok(Ok(None)) => panic!("relay closed the stream while waiting for {what}"),
        Ok(Ok(Some(f))) => f,
    }
}

fn frame_req(f: &RelayFrame) -> Option<ReqId> {
    match f {
        RelayFrame::Done { req }
        | RelayFrame::LinkInfo { req, .. }
        | RelayFrame::LinkApproved { req, .. }
        | RelayFrame::Acked { req, .. }
        | RelayFrame::Duplicate { req, .. }
        | RelayFrame::SyncState { req, .. }
        | RelayFrame::ChatPage { req, .. }
        | RelayFrame::AccountPage { req, .. } => Some(*req),
        RelayFrame::Error { req, .. } => *req,
        RelayFrame::Hello { .. } | RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } => None,
    }
}

/// Sends `frame` and returns the reply to `req`, skipping pushes.
async fn request(raw: &mut Conn, req: ReqId, frame: ClientFrame) -> RelayFrame {
    raw.stream.send(&frame).await.expect("send");
    reply(raw, req).await
}

async fn reply(raw: &mut Conn, req: ReqId) -> RelayFrame {
    loop {
        let f = recv(raw, "a reply").await;
        if let RelayFrame::Error { req: None, code, message } = &f {
            panic!("relay error {code:?}: {message}");
        }
        if frame_req(&f) == Some(req) {
            return f;
        }
    }
}

/// One device's libp2p swarm and its sync stream, after `Hello`.
struct Conn {
    _net: Net,
    stream: RelayStream,
}

/// Streams the relay dropped at open (seen as a stream closed before or at `Hello`) and that
/// were opened again.
static REOPENED: AtomicU64 = AtomicU64::new(0);

/// Connects `kp`, opens the sync stream and says `Hello`; returns the account the relay knows
/// the device by. A stream that closes before `Hello` is answered is opened again (at most 10
/// times, counted in [`REOPENED`]).
async fn connect(kp: Keypair, addr: &str) -> (Conn, Option<AccountId>) {
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
struct Writer {
    raw: Conn,
    device: DeviceId,
    keys: AccountKeys,
    chat: ChatId,
    wrapped: stratus_engine::proto::crypto::SealedBox,
    key: ChatKey,
    next_client_seq: u64,
    next_req: ReqId,
    rng: StdRng,
}

impl Writer {
    /// Connects a fresh identity, creates its account (with `keys`) and a notes chat.
    async fn create(addr: String, seed: u64, name: String) -> Writer {
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
        match request(&mut raw, 1, ClientFrame::CreateAccount { req: 1, account, cert }).await {
            RelayFrame::Done { .. } => {}
            other => panic!("create account failed: {other:?}"),
        }
        let mut w = Writer {
            raw,
            device,
            chat: ChatId::random(&mut rng),
            key: ChatKey::random(&mut rng),
            wrapped: stratus_engine::proto::crypto::SealedBox { ephemeral: [0; 32], sealed: Vec::new() },
            keys,
            next_client_seq: 1,
            next_req: 2,
            rng,
        };
        w.create_chat().await;
        w
    }

    async fn create_chat(&mut self) {
        let account = self.keys.public();
        self.wrapped = wrap_chat_key(&self.key, self.chat, Epoch(0), account.id, &account.kem_key, &mut self.rng);
        let req = self.req();
        let frame = ClientFrame::CreateChat {
            req,
            chat: self.chat,
            kind: ChatKind::Notes,
            epoch: Epoch(0),
            keys: vec![WrappedKey {
                account: account.id,
                signature: self.keys.sign_chat_key(self.chat, ChatKind::Notes, Epoch(0), account.id, &self.wrapped),
                key: self.wrapped.clone(),
            }],
        };
        match request(&mut self.raw, req, frame).await {
            RelayFrame::Done { .. } => {}
            other => panic!("create chat failed: {other:?}"),
        }
    }

    fn req(&mut self) -> ReqId {
        let r = self.next_req;
        self.next_req += 1;
        r
    }

    /// A fresh append: a real sealed delta of [`PLAINTEXT_BYTES`] random bytes.
    fn append(&mut self) -> (ReqId, ClientSeq, ClientFrame) {
        let req = self.req();
        let client_seq = ClientSeq(self.next_client_seq);
        self.next_client_seq += 1;
        let mut plain = [0u8; PLAINTEXT_BYTES];
        self.rng.fill_bytes(&mut plain);
        let ad = DeltaAd { chat: self.chat, epoch: Epoch(0), device: &self.device, client_seq };
        let sealed = seal_delta(&self.key, &ad, &plain, &mut self.rng);
        (req, client_seq, ClientFrame::Append { req, chat: self.chat, epoch: Epoch(0), client_seq, sealed })
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Durable append throughput

/// Shared progress of one run: completions, and when 10% and 90% of them were reached.
struct Progress {
    done: AtomicU64,
    total: u64,
    at10: OnceLock<Instant>,
    at90: OnceLock<Instant>,
}

impl Progress {
    fn one(&self) {
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
async fn pump(mut w: Writer, n: usize, window: usize, progress: Arc<Progress>) -> (Writer, Vec<Duration>, Instant) {
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

struct RunStats {
    window: usize,
    appends: u64,
    elapsed: Duration,
    steady_per_sec: Option<f64>,
    lat: Vec<Duration>, // sorted
    perf: PerfResult,
    relay_cpu: f64,
    bench_cpu: f64,
}

impl RunStats {
    fn per_sec(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64()
    }
    fn batch(&self) -> Option<f64> {
        self.perf.fdatasync.filter(|b| *b > 0).map(|b| self.appends as f64 / b as f64)
    }
}

#[derive(Clone)]
struct Ctx {
    relay_pid: u32,
    fsync_times: bool,
    perf: bool,
    perf_dir: PathBuf,
    tck: f64,
}

async fn throughput_run(
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

struct PushStats {
    sent: usize,
    pushes: Vec<Duration>, // sorted
    acks: Vec<Duration>,   // sorted
    achieved_rate: f64,
    perf: PerfResult,
    verified: usize,
}

/// Device B waits for approval under a link id, as `Device::link` does.
struct Waiting {
    raw: Conn,
    device: DeviceId,
    x25519: StaticSecret,
}

fn link_id(secret: &[u8; 16]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"stratus-link-id");
    h.update(secret);
    *h.finalize().as_bytes()
}

fn link_context(device: &DeviceId) -> Vec<u8> {
    let mut c = b"link-bundle/".to_vec();
    c.extend_from_slice(device.0.as_bytes());
    c
}

async fn push_latency(ctx: &Ctx, addr: &str, seed: u64, secs: u64, rate: u64) -> PushStats {
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
        match request(&mut raw, 1, ClientFrame::CreateAccount { req: 1, account: keys.public(), cert }).await {
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
        cert.verify(&account).expect("certificate verifies");
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
                        let ad =
                            DeltaAd { chat, epoch: delta.epoch, device: &delta.device, client_seq: delta.client_seq };
                        if open_delta(k, &ad, &delta.sealed).is_ok_and(|p| p.len() == PLAINTEXT_BYTES) {
                            verified += 1;
                        }
                    }
                }
                RelayFrame::PushAccount { entry } => {
                    if let AccountEvent::ChatAdded { chat: c, epoch, wrapped_key, .. } = entry.event {
                        if c == chat {
                            let id = b_keys.public().id;
                            key = Some(
                                unwrap_chat_key(&wrapped_key, c, epoch, id, &b_keys.kem_secret())
                                    .expect("B unwraps the chat key"),
                            );
                            assert_eq!(wrapped_key, wrapped_a);
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

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "n/a".into())
}

fn print_barriers(rows: &[&BarrierStats]) {
    println!(
        "| {:<38} | {:>6} | {:>7} | {:>7} | {:>7} | {:>7} | {:>7} | {:>10} |",
        "fsync barrier loop", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "barriers/s"
    );
    println!("|{:-<40}|{:->8}|{:->9}|{:->9}|{:->9}|{:->9}|{:->9}|{:->12}|", "", "", "", "", "", "", "", "");
    for b in rows {
        let s = &b.samples;
        println!(
            "| {:<38} | {:>6} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>10.0} |",
            b.label,
            s.len(),
            ms(pct(s, 50.0)),
            ms(pct(s, 90.0)),
            ms(pct(s, 99.0)),
            ms(*s.last().unwrap_or(&Duration::ZERO)),
            ms(mean(s)),
            b.per_sec
        );
    }
}

fn per_append(count: Option<u64>, appends: u64) -> Option<f64> {
    count.map(|c| c as f64 / appends as f64)
}

fn print_runs(runs: &[RunStats], devices: usize) {
    println!(
        "| {:<3} | {:>6} | {:>7} | {:>5} | {:>9} | {:>8} | {:>7} | {:>7} | {:>7} | {:>8} | {:>6} | {:>6} | {:>13} | {:>7} | {:>5} | {:>5} |",
        "run",
        "dev×w",
        "appends",
        "secs",
        "appends/s",
        "steady/s",
        "ack p50",
        "ack p99",
        "ack max",
        "barriers",
        "batch",
        "cycle",
        "fdatasync p50/p99",
        "sfr/app",
        "relay",
        "bench"
    );
    println!(
        "|{:-<5}|{:->8}|{:->9}|{:->7}|{:->11}|{:->10}|{:->9}|{:->9}|{:->9}|{:->10}|{:->8}|{:->8}|{:->15}|{:->9}|{:->7}|{:->7}|",
        "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for (i, r) in runs.iter().enumerate() {
        let cycle = r.perf.fdatasync.filter(|b| *b > 0).map(|b| ms(r.elapsed) / b as f64);
        let f = &r.perf.fdatasync_times;
        let fsync =
            if f.is_empty() { "n/a".to_string() } else { format!("{:.3}/{:.3}", ms(pct(f, 50.0)), ms(pct(f, 99.0))) };
        println!(
            "| {:<3} | {:>6} | {:>7} | {:>5.2} | {:>9.0} | {:>8} | {:>7.2} | {:>7.2} | {:>7.2} | {:>8} | {:>6} | {:>6} | {:>13} | {:>7} | {:>4.0}% | {:>4.0}% |",
            i + 1,
            format!("{devices}×{}", r.window),
            r.appends,
            r.elapsed.as_secs_f64(),
            r.per_sec(),
            fmt_opt(r.steady_per_sec, 0),
            ms(pct(&r.lat, 50.0)),
            ms(pct(&r.lat, 99.0)),
            ms(*r.lat.last().unwrap_or(&Duration::ZERO)),
            r.perf.fdatasync.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            fmt_opt(r.batch(), 1),
            fmt_opt(cycle, 2),
            fsync,
            fmt_opt(per_append(r.perf.sync_file_range, r.appends), 2),
            100.0 * r.relay_cpu,
            100.0 * r.bench_cpu,
        );
    }
}

fn main() {
    let cfg = parse_args();
    let invocation = Instant::now();
    println!("# relay_bench{}", if cfg.quick { " --quick" } else { "" });
    println!("seed: {} (replay with --seed {})", cfg.seed, cfg.seed);
    println!(
        "  (the seed drives account keys, chat ids and keys, payloads and link secrets; libp2p identities \
         come from Keypair::generate_ed25519, i.e. OS entropy)"
    );
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());

    let exe = std::env::current_exe().expect("own path");
    let relay_exe = exe.parent().expect("a directory").join("stratus-relay");
    assert!(
        relay_exe.exists(),
        "{} not found; build it with `cargo build --release -p stratus-relay -p stratus-tests --bins`",
        relay_exe.display()
    );
    std::fs::create_dir_all(&cfg.dir).expect("--dir exists or can be created");
    let tmp = tempfile::Builder::new().prefix("relay-bench-").tempdir_in(&cfg.dir).expect("temporary directory");
    let work = tmp.path().to_path_buf();
    let (mount, fstype, source, opts) = filesystem_of(&work);
    println!("data dir: {} on {fstype} {source} (mounted at {mount}, {opts})", work.display());
    assert!(
        !matches!(fstype.as_str(), "tmpfs" | "ramfs" | "?"),
        "the data dir must be on a real disk, not {fstype}; pass --dir"
    );
    let perf = cfg.perf && perf_works();
    println!(
        "barrier counting: {}",
        if perf {
            if cfg.fsync_times {
                "perf stat -p <relay> (fdatasync, sync_file_range, pwrite64 counts); perf record -p <relay> of fdatasync \
                 entry/exit (durations; costs CPU, throughput figures are perturbed)"
            } else {
                "perf stat -p <relay> (fdatasync, sync_file_range, pwrite64 counts)"
            }
        } else {
            "perf unavailable: mean batch will be ESTIMATED as appends/s ÷ loop barriers/s"
        }
    );

    let mut relay = RelayProc::start(&relay_exe, &work.join("relay"), &work.join("relay.log"));
    println!("relay: {} (pid {}, {}), log {}", relay_exe.display(), relay.pid, relay.addr, relay.log.display());
    let ctx = Ctx { relay_pid: relay.pid, fsync_times: cfg.fsync_times, perf, perf_dir: work.clone(), tck: clk_tck() };

    // 2a. The barrier alone, before any load (the relay is up and idle).
    let b_append_1 = fsync_loop(&work, cfg.barrier_samples, true, "append 4 KiB + fdatasync (before)");
    let b_over_1 = fsync_loop(&work, cfg.barrier_samples / 2, false, "overwrite 4 KiB + fdatasync (before)");

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut seeds = StdRng::seed_from_u64(cfg.seed);
    let (runs16, runs1, push) = rt.block_on(async {
        // Setup: every writer its own identity, account and chat.
        let t = Instant::now();
        let tasks: Vec<_> = (0..cfg.devices)
            .map(|i| tokio::spawn(Writer::create(relay.addr.clone(), seeds.next_u64(), format!("bench-{i}"))))
            .collect();
        let mut writers = Vec::new();
        for task in tasks {
            writers.push(tokio::time::timeout(STALL * 2, task).await.expect("setup in time").expect("setup task"));
        }
        println!(
            "setup: {} devices, accounts and chats in {:.2} s ({} sync streams closed by the relay at open, reopened)",
            writers.len(),
            t.elapsed().as_secs_f64(),
            REOPENED.load(Ordering::Relaxed)
        );

        // Warm-up (not reported).
        let (w, warm) =
            throughput_run(&Ctx { perf: false, ..ctx.clone() }, writers, cfg.warmup_per_device, cfg.window, "warm")
                .await;
        writers = w;
        println!("warm-up: {} appends at {:.0}/s", warm.appends, warm.per_sec());

        let (mut runs16, mut runs1) = (Vec::new(), Vec::new());
        for r in 0..cfg.runs {
            let (w, s) =
                throughput_run(&ctx, writers, cfg.per_device, cfg.window, &format!("w{}-{r}", cfg.window)).await;
            eprintln!("  run {} {}×{}: {:.0} appends/s", r + 1, cfg.devices, cfg.window, s.per_sec());
            runs16.push(s);
            let (w, s) = throughput_run(&ctx, w, cfg.per_device, 1, &format!("w1-{r}")).await;
            eprintln!("  run {} {}×1: {:.0} appends/s", r + 1, cfg.devices, s.per_sec());
            runs1.push(s);
            writers = w;
        }

        let push = push_latency(&ctx, &relay.addr, seeds.next_u64(), cfg.push_secs, cfg.push_rate).await;
        drop(writers);
        (runs16, runs1, push)
    });
    drop(rt);

    // 2b. The barrier alone again, after the load.
    let b_append_2 = fsync_loop(&work, cfg.barrier_samples, true, "append 4 KiB + fdatasync (after)");
    let b_over_2 = fsync_loop(&work, cfg.barrier_samples / 2, false, "overwrite 4 KiB + fdatasync (after)");
    let alive = relay.alive();
    let (relay_cpu_total, bench_cpu_total) = (cpu_secs(&relay.pid.to_string(), ctx.tck), cpu_secs("self", ctx.tck));
    let status = relay.stop();
    println!("load average at end: {}", loadavg());

    let pooled = {
        let mut s: Vec<Duration> = b_append_1.samples.iter().chain(&b_append_2.samples).copied().collect();
        s.sort();
        let total: Duration = s.iter().sum();
        BarrierStats {
            label: "append 4 KiB + fdatasync (pooled)".into(),
            per_sec: s.len() as f64 / total.as_secs_f64(),
            samples: s,
        }
    };

    println!();
    println!("## 2. fsync barrier alone, on {fstype} {source} (the relay's filesystem), same invocation");
    println!();
    print_barriers(&[&b_append_1, &b_append_2, &pooled, &b_over_1, &b_over_2]);
    let (bp50, bp99, brate) = (pct(&pooled.samples, 50.0), pct(&pooled.samples, 99.0), pooled.per_sec);

    println!();
    println!(
        "## 1. durable appends: {} devices × {} appends per run, {}-byte sealed deltas, 127.0.0.1",
        cfg.devices,
        cfg.per_device,
        PLAINTEXT_BYTES + 40
    );
    println!();
    println!(
        "ack = send → Acked of each append (ms); barriers = the relay's fdatasync calls (perf stat); batch = \
         appends ÷ barriers; cycle = run time ÷ barriers (ms); fdatasync p50/p99 = the relay's own fdatasync \
         calls (perf record, ms); sfr/app = sled sync_file_range calls per append; relay/bench = CPU of each \
         process (100% = one core)"
    );
    println!();
    print_runs(&runs16, cfg.devices);
    println!();
    print_runs(&runs1, cfg.devices);

    let med = |runs: &[RunStats], f: &dyn Fn(&RunStats) -> Option<f64>| {
        median(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let m16 = med(&runs16, &|r| Some(r.per_sec()));
    let m1 = med(&runs1, &|r| Some(r.per_sec()));
    let batch16 = med(&runs16, &|r| r.batch());
    let batch1 = med(&runs1, &|r| r.batch());
    let (est16, est1) = (batch16.is_nan(), batch1.is_nan());
    let batch16 = if est16 { m16 / brate } else { batch16 };
    let batch1 = if est1 { m1 / brate } else { batch1 };
    let star = |e: bool| if e { "*" } else { "" };

    println!();
    println!(
        "## summary: medians over {} runs; baseline = the fsync loop (append, pooled) of this invocation",
        cfg.runs
    );
    println!();
    let (h16, h1) = (format!("{}×{}", cfg.devices, cfg.window), format!("{}×1", cfg.devices));
    println!("| {:<60} | {:>15} | {:>15} |", "", h16, h1);
    println!("|{:-<62}|{:->17}|{:->17}|", "", "", "");
    let row = |name: &str, a: String, b: String| println!("| {name:<60} | {a:>15} | {b:>15} |");
    let both = |name: &str, f: &dyn Fn(&RunStats) -> Option<f64>, prec: usize| {
        let fmt = |v: f64| if v.is_nan() { "n/a".to_string() } else { format!("{v:.prec$}") };
        row(name, fmt(med(&runs16, f)), fmt(med(&runs1, f)))
    };
    both("durable appends/s", &|r| Some(r.per_sec()), 0);
    both("steady appends/s (10% → 90% of the acks)", &|r| r.steady_per_sec, 0);
    both("ack latency p50, ms", &|r| Some(ms(pct(&r.lat, 50.0))), 2);
    both("ack latency p99, ms", &|r| Some(ms(pct(&r.lat, 99.0))), 2);
    row(
        "mean batch, appends per relay barrier",
        format!("{batch16:.1}{}", star(est16)),
        format!("{batch1:.1}{}", star(est1)),
    );
    both("relay barriers/s", &|r| r.perf.fdatasync.map(|b| b as f64 / r.elapsed.as_secs_f64()), 0);
    both(
        "relay barrier cycle, ms (run time ÷ barriers)",
        &|r| r.perf.fdatasync.filter(|b| *b > 0).map(|b| ms(r.elapsed) / b as f64),
        2,
    );
    if cfg.fsync_times {
        both(
            "relay's own fdatasync p50, ms",
            &|r| (!r.perf.fdatasync_times.is_empty()).then(|| ms(pct(&r.perf.fdatasync_times, 50.0))),
            3,
        );
        both(
            "relay's own fdatasync p99, ms",
            &|r| (!r.perf.fdatasync_times.is_empty()).then(|| ms(pct(&r.perf.fdatasync_times, 99.0))),
            3,
        );
        both(
            "share of run time inside the relay's fdatasync, %",
            &|r| {
                (!r.perf.fdatasync_times.is_empty()).then(|| {
                    100.0 * r.perf.fdatasync_times.iter().sum::<Duration>().as_secs_f64() / r.elapsed.as_secs_f64()
                })
            },
            0,
        );
    }
    both("sled sync_file_range calls per append", &|r| per_append(r.perf.sync_file_range, r.appends), 2);
    both("sled pwrite calls per append", &|r| per_append(r.perf.pwrite, r.appends), 2);
    both("relay CPU, % of one core", &|r| Some(100.0 * r.relay_cpu), 0);
    both("bench CPU, % of one core", &|r| Some(100.0 * r.bench_cpu), 0);
    both("relay CPU per append, µs", &|r| Some(1e6 * r.relay_cpu * r.elapsed.as_secs_f64() / r.appends as f64), 1);
    row("baseline: fsync loop barriers/s", format!("{brate:.0}"), format!("{brate:.0}"));
    row(
        "fsync-bound ceiling = loop barriers/s × mean batch",
        format!("{:.0}{}", brate * batch16, star(est16)),
        format!("{:.0}{}", brate * batch1, star(est1)),
    );
    row("appends/s ÷ ceiling", format!("{:.3}", m16 / (brate * batch16)), format!("{:.3}", m1 / (brate * batch1)));
    row(
        "relay barriers/s ÷ loop barriers/s",
        format!("{:.3}", m16 / batch16 / brate),
        format!("{:.3}", m1 / batch1 / brate),
    );
    if est16 || est1 {
        println!("* ESTIMATE: perf could not count the relay's fdatasync calls; batch = appends/s ÷ loop barriers/s");
    }

    println!();
    println!(
        "## 3. append → push latency: A appends paced at {}/s for {} s, B (A's second device, linked) times each Push",
        cfg.push_rate, cfg.push_secs
    );
    println!();
    let p = &push;
    println!(
        "| {:<40} | {:>6} | {:>7} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"
    );
    println!("|{:-<42}|{:->8}|{:->9}|{:->9}|{:->9}|{:->9}|{:->9}|", "", "", "", "", "", "", "");
    for (name, s) in [
        ("append → Push at B", &p.pushes),
        ("append → Acked at A", &p.acks),
        ("fsync loop (append, pooled): baseline", &pooled.samples),
        ("the relay's own fdatasync during this run", &p.perf.fdatasync_times),
    ] {
        if s.is_empty() {
            continue;
        }
        println!(
            "| {name:<40} | {:>6} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} |",
            s.len(),
            ms(pct(s, 50.0)),
            ms(pct(s, 90.0)),
            ms(pct(s, 99.0)),
            ms(*s.last().unwrap_or(&Duration::ZERO)),
            ms(mean(s))
        );
    }
    println!();
    println!(
        "sent {} at {:.0}/s achieved; B received every one and opened {} with the chat key it unwrapped from its \
         account log; relay barriers {} (mean batch {})",
        p.sent,
        p.achieved_rate,
        p.verified,
        p.perf.fdatasync.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
        fmt_opt(p.perf.fdatasync.filter(|b| *b > 0).map(|b| p.sent as f64 / b as f64), 2),
    );

    println!();
    println!("## targets");
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "- ≥ 20000 durable appends/s with {}×{}: {:.0}/s → {} ({:+.0}%)",
        cfg.devices,
        cfg.window,
        m16,
        verdict(m16 >= 20000.0),
        100.0 * (m16 / 20000.0 - 1.0)
    );
    let (pp50, pp99) = (pct(&p.pushes, 50.0), pct(&p.pushes, 99.0));
    println!(
        "- push p50 ≤ barrier p50 + 1 ms: {:.3} vs {:.3} + 1 = {:.3} ms → {} ({:+.3} ms)",
        ms(pp50),
        ms(bp50),
        ms(bp50) + 1.0,
        verdict(ms(pp50) <= ms(bp50) + 1.0),
        ms(pp50) - ms(bp50) - 1.0
    );
    println!(
        "- push p99 ≤ barrier p99 + 3 ms: {:.3} vs {:.3} + 3 = {:.3} ms → {} ({:+.3} ms)",
        ms(pp99),
        ms(bp99),
        ms(bp99) + 3.0,
        verdict(ms(pp99) <= ms(bp99) + 3.0),
        ms(pp99) - ms(bp99) - 3.0
    );
    println!();
    println!("sync streams the relay closed at open and that were opened again: {}", REOPENED.load(Ordering::Relaxed));
    println!(
        "CPU over the whole invocation ({:.0} s): relay {relay_cpu_total:.1} s, bench {bench_cpu_total:.1} s",
        invocation.elapsed().as_secs_f64()
    );
    println!(
        "relay alive until the end: {alive}; exit after SIGTERM: {}",
        status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
    );
    let warnings = std::fs::read_to_string(&relay.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .map(str::to_string)
        .collect::<Vec<_>>();
    if !warnings.is_empty() {
        println!("relay log warnings/errors (first 5):");
        for w in warnings {
            println!("  {w}");
        }
    }
    if cfg.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    let _ = std::io::stdout().flush();
}
