//! `relay_bench ops`: the operator's targets of issue 19, on a real `stratus-relay` process.
//!
//! 1. Memory per idle connected device: N devices (10,000), each its own libp2p identity,
//!    connection (127.0.0.1) and account, connected and then idle (libp2p's pings only). The
//!    relay's `VmRSS` (/proc/PID/status) before the first connects and after all are connected
//!    and idle, divided by N. Target ≤ 32 KiB.
//! 2. `/metrics` scrape time with those N devices connected: sequential `GET /metrics` on the
//!    admin HTTP listener, each on a new TCP connection as a scraper without keep-alive does,
//!    timed from connect to the last byte. Target p99 ≤ 5 ms.
//! 3. `stratus-relay backup --to DIR` of a large store while devices append at a paced rate
//!    (`ops_backup.rs`).
//! 4. `stratus-relay admin delete` of an account of `--delete-messages` messages while other
//!    devices append at a paced rate: how long until its data is emptied, and the others'
//!    append latency meanwhile (`ops_delete.rs`; only with `--only delete`).
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay --bins
//! target/release/relay_bench ops [--only memory|backup|delete] [--runs N] [--devices N] [--scrapes N]
//!                                [--store-mib N] [--rate N] [--delete-messages N] [--seed N] [--dir PATH]
//! ```
//!
//! The bench raises its own soft `RLIMIT_NOFILE` to the hard limit (the relay it starts inherits
//! it): N devices are N sockets in each process.

use super::*;
use futures::StreamExt;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

pub(super) struct OpsConfig {
    pub(super) only: Option<String>,
    pub(super) runs: usize,
    pub(super) devices: usize,
    pub(super) scrapes: usize,
    pub(super) store_mib: u64,
    pub(super) rate: u64,
    pub(super) delete_messages: usize,
    pub(super) seed: u64,
    pub(super) dir: PathBuf,
}

fn ops_usage() -> ! {
    eprintln!(
        "usage: relay_bench ops [--only memory|backup|delete] [--runs N] [--devices N] [--scrapes N] \
         [--store-mib N] [--rate N] [--delete-messages N] [--seed N] [--dir PATH]"
    );
    std::process::exit(2);
}

fn parse_ops_args() -> OpsConfig {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let mut c = OpsConfig {
        only: None,
        runs: 5,
        devices: 10_000,
        scrapes: 200,
        store_mib: 2048,
        rate: 5000,
        delete_messages: 50_000,
        seed: rand::random(),
        dir: std::env::temp_dir(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| ops_usage()).clone();
        let num = |v: String| v.parse::<u64>().unwrap_or_else(|_| ops_usage());
        match a.as_str() {
            "--only" => c.only = Some(value()),
            "--runs" => c.runs = num(value()) as usize,
            "--devices" => c.devices = num(value()) as usize,
            "--scrapes" => c.scrapes = num(value()) as usize,
            "--store-mib" => c.store_mib = num(value()),
            "--rate" => c.rate = num(value()),
            "--delete-messages" => c.delete_messages = num(value()) as usize,
            "--seed" => c.seed = num(value()),
            "--dir" => c.dir = PathBuf::from(value()),
            _ => ops_usage(),
        }
    }
    if c.runs == 0 || c.devices == 0 || c.scrapes == 0 || c.rate == 0 || c.delete_messages == 0 {
        ops_usage();
    }
    if !matches!(c.only.as_deref(), None | Some("memory") | Some("backup") | Some("delete")) {
        ops_usage();
    }
    c
}

/// Raises the soft limit on open files to the hard limit; returns (soft, hard) after.
pub(super) fn raise_nofile() -> (u64, u64) {
    let (_, hard) = rlimit::Resource::NOFILE.get().expect("getrlimit");
    let _ = rlimit::Resource::NOFILE.set(hard, hard);
    rlimit::Resource::NOFILE.get().expect("getrlimit")
}

/// A free TCP port on 127.0.0.1 (for the relay's admin HTTP listener).
pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The relay's metric `name`, scraped now.
pub(super) fn scrape_metric(admin: &str, name: &str) -> Option<f64> {
    stratus_tests::metric(&stratus_tests::http(admin, "GET", "/metrics").1, name)
}

pub(super) fn main() {
    let cfg = parse_ops_args();
    println!("# relay_bench ops");
    println!("seed: {} (replay with --seed {})", cfg.seed, cfg.seed);
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    let (soft, hard) = raise_nofile();
    println!("RLIMIT_NOFILE: soft {soft}, hard {hard} (raised for the bench and the relay it starts)");
    let exe = std::env::current_exe().expect("own path");
    let relay_exe = exe.parent().expect("a directory").join("stratus-relay");
    assert!(relay_exe.exists(), "{} not found; build it next to relay_bench", relay_exe.display());
    std::fs::create_dir_all(&cfg.dir).expect("--dir exists or can be created");
    let tmp = tempfile::Builder::new().prefix("relay-ops-").tempdir_in(&cfg.dir).expect("temporary directory");
    let (mount, fstype, source, opts) = filesystem_of(tmp.path());
    println!("data dir: {} on {fstype} {source} (mounted at {mount}, {opts})", tmp.path().display());
    let mut seeds = StdRng::seed_from_u64(cfg.seed);

    if cfg.only.as_deref() == Some("delete") {
        super::ops_delete::delete_bench(&relay_exe, tmp.path(), &cfg, seeds.next_u64());
    } else if cfg.only.as_deref() != Some("backup") {
        assert!(
            soft as usize > cfg.devices + 1000,
            "RLIMIT_NOFILE {soft} is too low for {} devices; raise the hard limit",
            cfg.devices
        );
        let mut runs = Vec::new();
        for r in 0..cfg.runs {
            let m = memory_run(&relay_exe, &tmp.path().join(format!("mem-{r}")), &cfg, seeds.next_u64());
            eprintln!(
                "  run {}: {:.1} KiB per device, scrape p50 {:.2} ms p99 {:.2} ms",
                r + 1,
                m.per_device_kib(),
                ms(pct(&m.scrapes, 50.0)),
                ms(pct(&m.scrapes, 99.0))
            );
            runs.push(m);
        }
        print_memory(&runs, &cfg);
    }
    if cfg.only.is_none() || cfg.only.as_deref() == Some("backup") {
        super::ops_backup::backup_bench(&relay_exe, tmp.path(), &cfg, seeds.next_u64());
    }
    println!("load average at end: {}", loadavg());
    let _ = std::io::stdout().flush();
}

pub(super) struct MemoryRun {
    pub(super) devices: usize,
    pub(super) rss_before_kib: u64,
    pub(super) rss_after_kib: u64,
    pub(super) rss_after_close_kib: u64,
    pub(super) connect_secs: f64,
    pub(super) connected_metric: Option<f64>,
    pub(super) scrapes: Vec<Duration>, // sorted
    pub(super) scrape_bytes: usize,
    pub(super) bench_rss_kib: u64,
    /// Registrations that failed and were made again (see `memory_run`).
    pub(super) failed: u64,
}

impl MemoryRun {
    pub(super) fn per_device_kib(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.devices as f64
    }
}

/// How many devices connect and register at once.
const CONNECT_CONCURRENCY: usize = 32;
/// How long the devices stay idle before the relay's memory is read.
const IDLE: Duration = Duration::from_secs(10);

fn memory_run(relay_exe: &Path, work: &Path, cfg: &OpsConfig, seed: u64) -> MemoryRun {
    std::fs::create_dir_all(work).expect("run dir");
    let admin = format!("127.0.0.1:{}", free_port());
    let max_connections = (cfg.devices + 100).to_string();
    let extra = [
        "--requests-per-second",
        "0",
        "--admin-http",
        &admin,
        "--max-connections",
        &max_connections,
        "--unregistered-requests-per-second",
        "0",
    ];
    let mut relay = RelayProc::start(relay_exe, &work.join("relay"), &work.join("relay.log"), &extra);
    std::thread::sleep(Duration::from_secs(2));
    let rss_before_kib = stratus_tests::rss_kib(relay.pid);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut seeds = StdRng::seed_from_u64(seed);
    let t = Instant::now();
    let addr = relay.addr.clone();
    // A registration that fails (its task panics: no answer within the stall limit, as when
    // the machine's other users pause or starve the relay) is made again with a new identity,
    // at most 3 times, and counted.
    let failed = Arc::new(AtomicU64::new(0));
    let devices: Vec<Writer> = rt.block_on(async {
        futures::stream::iter((0..cfg.devices).map(|i| {
            let (addr, s, failed) = (addr.clone(), seeds.next_u64(), failed.clone());
            async move {
                for attempt in 0..3u64 {
                    let task = tokio::spawn(Writer::register(addr.clone(), s ^ attempt, format!("idle-{i}")));
                    match task.await {
                        Ok(w) => return w,
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
                panic!("device {i} could not register in 3 attempts")
            }
        }))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await
    });
    let failed = failed.load(Ordering::Relaxed);
    let connect_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(IDLE);
    let connected_metric = scrape_metric(&admin, "stratus_relay_connected_devices");
    let rss_after_kib = stratus_tests::rss_kib(relay.pid);
    let bench_rss_kib = stratus_tests::rss_kib(std::process::id());
    let mut scrapes = Vec::with_capacity(cfg.scrapes);
    let mut scrape_bytes = 0;
    for _ in 0..cfg.scrapes {
        let t = Instant::now();
        let (status, body) = stratus_tests::http(&admin, "GET", "/metrics");
        scrapes.push(t.elapsed());
        assert_eq!(status, 200, "/metrics answers");
        scrape_bytes = body.len();
    }
    scrapes.sort();
    drop(devices);
    drop(rt);
    std::thread::sleep(Duration::from_secs(3));
    let rss_after_close_kib = stratus_tests::rss_kib(relay.pid);
    assert!(relay.alive(), "the relay ran to the end; see {}", relay.log.display());
    relay.stop();
    let _ = std::fs::remove_dir_all(work);
    MemoryRun {
        devices: cfg.devices,
        rss_before_kib,
        rss_after_kib,
        rss_after_close_kib,
        connect_secs,
        connected_metric,
        scrapes,
        scrape_bytes,
        bench_rss_kib,
        failed,
    }
}

fn print_memory(runs: &[MemoryRun], cfg: &OpsConfig) {
    println!();
    println!(
        "## 1-2. {} idle devices (own identity, connection and account each), {} scrapes of /metrics per run",
        cfg.devices, cfg.scrapes
    );
    println!();
    println!(
        "| run | connect s | connected (metric) | RSS before MiB | RSS after MiB | KiB/device | RSS after close MiB \
         | scrape p50 ms | p99 ms | max ms | body bytes | bench RSS MiB | registrations redone |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mib = |k: u64| k as f64 / 1024.0;
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {} |",
            i + 1,
            r.connect_secs,
            fmt_opt(r.connected_metric, 0),
            mib(r.rss_before_kib),
            mib(r.rss_after_kib),
            r.per_device_kib(),
            mib(r.rss_after_close_kib),
            ms(pct(&r.scrapes, 50.0)),
            ms(pct(&r.scrapes, 99.0)),
            ms(*r.scrapes.last().unwrap_or(&Duration::ZERO)),
            r.scrape_bytes,
            mib(r.bench_rss_kib),
            r.failed
        );
    }
    let range = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (median(&v), lo, hi)
    };
    let (kib, kib_lo, kib_hi) = range(runs.iter().map(MemoryRun::per_device_kib).collect());
    let (p50, p50_lo, p50_hi) = range(runs.iter().map(|r| ms(pct(&r.scrapes, 50.0))).collect());
    let (p99, p99_lo, p99_hi) = range(runs.iter().map(|r| ms(pct(&r.scrapes, 99.0))).collect());
    println!();
    println!("## targets (median over {} runs, range in brackets)", runs.len());
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "- relay memory per idle connected device ≤ 32 KiB: {kib:.1} KiB [{kib_lo:.1} – {kib_hi:.1}] → {}",
        verdict(kib <= 32.0)
    );
    println!(
        "- /metrics scrape ≤ 5 ms with {} devices: p50 {p50:.2} ms [{p50_lo:.2} – {p50_hi:.2}], p99 {p99:.2} ms \
         [{p99_lo:.2} – {p99_hi:.2}] → {}",
        cfg.devices,
        verdict(p99 <= 5.0)
    );
}

/// Appends the load writers of [`paced`] keep in flight, each.
pub(super) const LOAD_WINDOW: usize = 32;
/// How long [`paced`] waits for a frame before it fails the run.
pub(super) const LONG_STALL: Duration = Duration::from_secs(900);

/// Appends paced at `per_sec` (at most [`LOAD_WINDOW`] in flight) until `stop`, for the
/// benches that measure an operation under load (backup, delete); each ack's time and send →
/// ack latency go to `lat`. A relay silent for [`LONG_STALL`] fails the run.
pub(super) async fn paced(
    mut w: Writer,
    per_sec: f64,
    stop: Arc<AtomicBool>,
    lat: Arc<Mutex<Vec<(Instant, Duration)>>>,
) -> Writer {
    let interval = Duration::from_secs_f64(1.0 / per_sec);
    let mut next = tokio::time::Instant::now();
    let mut inflight: VecDeque<(ReqId, Instant)> = VecDeque::with_capacity(LOAD_WINDOW);
    let mut mine = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && inflight.is_empty() {
            break;
        }
        let now = tokio::time::Instant::now();
        while !stopping && inflight.len() < LOAD_WINDOW && next <= now {
            let (req, _, frame) = w.append();
            inflight.push_back((req, Instant::now()));
            w.raw.stream.send(&frame).await.expect("send append");
            next += interval;
        }
        let wait_send = !stopping && inflight.len() < LOAD_WINDOW;
        tokio::select! {
            f = tokio::time::timeout(LONG_STALL, w.raw.stream.recv()) => match f {
                Err(_) => panic!("no frame from the relay for {LONG_STALL:?}"),
                Ok(f) => match f {
                Ok(Some(RelayFrame::Acked { req, .. })) => {
                    let t = Instant::now();
                    let i = inflight.iter().position(|(r, _)| *r == req).expect("an ack for an append in flight");
                    let (_, sent) = inflight.remove(i).expect("position is valid");
                    mine.push((t, t - sent));
                }
                Ok(Some(RelayFrame::Push { .. } | RelayFrame::PushAccount { .. })) => {}
                Ok(Some(other)) => panic!("unexpected frame during paced appends: {other:?}"),
                Ok(None) => panic!("the relay closed the stream during paced appends"),
                Err(e) => panic!("stream failed during paced appends: {e}"),
                },
            },
            _ = tokio::time::sleep_until(next), if wait_send => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if !wait_send => {}
        }
    }
    lat.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
    w
}

/// A relay for the benches of one operation under load (backup, delete): no request rate or
/// byte quota, its admin HTTP listener on a free port; named `name` under `work`. Returns the
/// admin address, the relay and a runtime.
pub(super) fn ops_relay(relay_exe: &Path, work: &Path, name: &str) -> (String, RelayProc, tokio::runtime::Runtime) {
    let admin = format!("127.0.0.1:{}", free_port());
    let extra = ["--requests-per-second", "0", "--admin-http", &admin, "--max-account-bytes", "0"];
    let relay = RelayProc::start(relay_exe, &work.join(name), &work.join(format!("{name}.log")), &extra);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    (admin, relay, rt)
}

/// `n` writers of accounts of their own, `{prefix}-{i}`, created at once.
pub(super) async fn writers(addr: &str, seeds: &mut StdRng, n: usize, prefix: &str) -> Vec<Writer> {
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(Writer::create(addr.to_string(), seeds.next_u64(), format!("{prefix}-{i}"))))
        .collect();
    let mut v = Vec::new();
    for t in tasks {
        v.push(t.await.expect("setup task"));
    }
    v
}
