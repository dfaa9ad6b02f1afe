//! Harness for whole-system tests: a real `stratus-relay` process (started, SIGKILLed,
//! restarted), the real `stratus` CLI, real sled directories, libp2p on 127.0.0.1.

pub mod bench_relay;
pub mod bench_sys;
pub mod sim;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    // target/<profile>/deps/<test binary>
    exe.parent().and_then(Path::parent).expect("test binaries live in target/<profile>/deps").to_path_buf()
}

/// Path of a workspace binary, building it first if `cargo test` did not.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let path = bin_dir().join(name);
    if !path.exists() {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "stratus-relay", "-p", "stratus-node"]);
            if bin_dir().ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo runs");
            assert!(status.success(), "building the binaries failed");
        });
    }
    path
}

/// The seed of a randomized test: `SEED=…` replays one; otherwise a fresh one. Always printed.
pub fn seed() -> u64 {
    let seed = match std::env::var("SEED") {
        Ok(s) => s.parse().expect("SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("seed: {seed} (replay with SEED={seed})");
    seed
}

/// A running relay process.
pub struct Relay {
    child: Option<Child>,
    /// Its full address, `/ip4/127.0.0.1/tcp/PORT/p2p/PEER`.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    port: u16,
    log: PathBuf,
    args: Vec<String>,
}

impl Relay {
    /// Starts a relay on a free port with its data in `data_dir`.
    pub fn start(data_dir: &Path) -> Relay {
        Self::start_on(data_dir, 0, &[])
    }

    /// Starts a relay with extra command-line flags (e.g. `["--max-frame-bytes", "70000"]`);
    /// restarts keep them.
    pub fn start_with(data_dir: &Path, args: &[&str]) -> Relay {
        Self::start_on(data_dir, 0, args)
    }

    /// The relay process's id (for reading its memory use from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn start_on(data_dir: &Path, port: u16, args: &[&str]) -> Relay {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = data_dir.with_extension("log");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("relay log");
            let mut child = Command::new(bin("stratus-relay"))
                .args(["--data-dir", data_dir.to_str().expect("utf-8 path")])
                .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")])
                .args(args)
                .env("STRATUS_LOG", "stratus_relay=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .expect("relay starts");
            let mut line = String::new();
            let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
            let _ = out.read_line(&mut line);
            if let Some(addr) = line.trim().strip_prefix("listening ") {
                let port = addr.split('/').nth(4).and_then(|p| p.parse().ok()).expect("tcp port in the address");
                return Relay {
                    child: Some(child),
                    addr: addr.to_string(),
                    data_dir: data_dir.to_path_buf(),
                    port,
                    log,
                    args: args.iter().map(|a| a.to_string()).collect(),
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "relay did not start; see {}", log.display());
            std::thread::sleep(Duration::from_millis(100)); // the port may still be held
        }
    }

    /// SIGKILLs the relay: no clean shutdown, no final flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the relay again on the same port and data directory.
    pub fn restart(&mut self) {
        let args = self.args.clone();
        self.restart_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Starts the relay again on the same port and data directory with these extra flags.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.kill();
        let r = Self::start_on(&self.data_dir.clone(), self.port, args);
        assert_eq!(r.addr, self.addr, "the relay keeps its identity and port across restarts");
        *self = r;
    }

    /// The relay's stderr log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address its admin HTTP listener serves on (started with `--admin-http`, port 0 or
    /// not), from its log: the listener is up before the relay says it listens, so this is
    /// there once [`Relay::start_with`] returns. The newest one after restarts.
    pub fn admin_http(&self) -> String {
        let log = self.log();
        let line = log.lines().rev().find(|l| l.contains("admin http listening")).expect("an admin http listener");
        // `addr=127.0.0.1:PORT` in text logs, `"addr":"127.0.0.1:PORT"` in JSON ones.
        let at = line.find("addr=").map(|i| i + 5).or_else(|| line.find("\"addr\":\"").map(|i| i + 8));
        let rest = &line[at.expect("the listener's address in its log line")..];
        rest.split(|c: char| c.is_whitespace() || c == '"').next().expect("an address").to_string()
    }

    /// Stops the relay with SIGTERM and returns its exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.send_term();
        self.wait_exit()
    }

    /// Sends the relay SIGTERM (it starts its shutdown) without waiting for it to exit.
    pub fn send_term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
    }

    /// Waits for the relay to exit (after [`Relay::send_term`]) and returns its exit status;
    /// SIGKILLs it after 10 s.
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        wait_or_kill(self.child.take()?)
    }
}

/// Waits for `c` to exit and returns its status; SIGKILLs it after 10 s.
pub fn wait_or_kill(mut c: Child) -> Option<std::process::ExitStatus> {
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

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP/1.1 request (`"GET"`, `"/metrics"`) to `addr` over a plain TCP stream, as a
/// scraper or a load balancer's health check sends it: the status code and the body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the admin listener accepts");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request sent");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers, then a body");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (status, body.to_string())
}

/// The value of the sample `name` (the whole series, labels included:
/// `stratus_relay_refused_total{code="UnknownChat"}`) in a `/metrics` text, if it is there.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Runs `stratus-relay --data-dir DATA_DIR ARGS…` to completion (its subcommands: `backup`,
/// `restore`, `admin …`).
pub fn relay_cmd(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("stratus-relay"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("stratus-relay runs")
}

/// Runs `stratus-relay` and returns its stdout, failing the test with its stderr if it failed.
pub fn relay_ok(data_dir: &Path, args: &[&str]) -> String {
    let o = relay_cmd(data_dir, args);
    assert!(o.status.success(), "stratus-relay {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf-8")
}

/// Runs `stratus --home HOME ARGS…` to completion.
pub fn stratus(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("stratus")).arg("--home").arg(home).args(args).stdin(Stdio::null()).output().expect("stratus runs")
}

/// Runs `stratus` and returns its stdout, failing the test with its stderr if it failed.
pub fn stratus_ok(home: &Path, args: &[&str]) -> String {
    let o = stratus(home, args);
    assert!(
        o.status.success(),
        "stratus {args:?} failed ({:?}): {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// Starts `stratus device link` on `home`, approves it from `approver`, waits for it to finish.
pub fn link_device(relay: &Relay, approver: &Path, home: &Path, name: &str) {
    let mut child = Command::new(bin("stratus"))
        .arg("--home")
        .arg(home)
        .args(["device", "link", "--relay", &relay.addr, "--name", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stratus runs");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("link code line");
    let code = line.trim().strip_prefix("link code: ").expect("`link code: CODE` first").to_string();
    // The new device registers its wait right after printing; give approve a few tries.
    let mut approved = false;
    for _ in 0..50 {
        if stratus(approver, &["device", "approve", &code]).status.success() {
            approved = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(approved, "approve failed");
    let status = child.wait().expect("link finishes");
    assert!(status.success(), "device link failed");
}

/// Starts `stratus watch --json` for the device in `home`, with standard output and error
/// piped (take them from the child).
pub fn watch_json(home: &Path) -> Child {
    Command::new(bin("stratus"))
        .arg("--home")
        .arg(home)
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stratus runs")
}

/// A running `stratus daemon` on a home (`--tcp` on 127.0.0.1), its standard error in
/// `HOME.daemon.log`. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// The socket it serves.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts it and waits until it serves (its `listening PATH` line).
    pub fn start(home: &Path) -> Daemon {
        let log = std::fs::File::create(home.with_extension("daemon.log")).expect("daemon log");
        let mut child = Command::new(bin("stratus"))
            .arg("--home")
            .arg(home)
            .args(["daemon", "--tcp", "/ip4/127.0.0.1/tcp/0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("stratus runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).expect("a line");
        let socket = match line.trim().strip_prefix("listening ") {
            Some(path) => PathBuf::from(path),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(home.with_extension("daemon.log")).unwrap_or_default();
                panic!("the daemon did not start: {line:?}; its log: {log}");
            }
        };
        Daemon { child: Some(child), socket }
    }

    /// Stops it with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        c.wait().ok()
    }

    /// SIGKILLs it: its socket file stays behind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `stratus account recover` for a new device in `home`, the key on standard input.
pub fn recover(relay: &Relay, home: &Path, name: &str, key: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin("stratus"))
        .arg("--home")
        .arg(home)
        .args(["account", "recover", "--relay", &relay.addr, "--name", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stratus runs");
    writeln!(child.stdin.take().expect("piped"), "{key}").expect("key written");
    child.wait_with_output().expect("stratus finishes")
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                // Sockets (the relay's admin socket, a daemon's) hold no bytes to scan.
                out.push(p);
            }
        }
    }
    out
}

/// A two-thread tokio runtime, as the whole-system tests use.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A device with an account and a notes chat, made with the CLI: its keys and the chat.
pub struct Acct {
    /// The device's keys (to speak the protocol as it with [`Raw`]).
    pub keys: stratus_engine::libp2p::identity::Keypair,
    /// Its notes chat.
    pub chat: stratus_engine::ChatId,
}

/// Creates an account with a notes chat on `relay` for the device at `home`.
pub fn account(relay: &Relay, home: &Path, name: &str) -> Acct {
    stratus_ok(home, &["account", "create", "--relay", &relay.addr, "--name", name]);
    let chat = stratus_ok(home, &["chat", "create", "--title", name]).trim().parse().expect("chat id");
    let keys = stratus_engine::Device::open(home).expect("device opens").keypair();
    Acct { keys, chat }
}

/// An append of `bytes` bytes at client seq `cs`. The relay stores sealed bytes without opening
/// them; these need not be a real seal.
pub fn append(
    req: stratus_engine::proto::wire::ReqId,
    chat: stratus_engine::ChatId,
    cs: u64,
    bytes: usize,
) -> stratus_engine::proto::wire::ClientFrame {
    stratus_engine::proto::wire::ClientFrame::Append {
        req,
        chat,
        epoch: stratus_engine::Epoch(0),
        client_seq: stratus_engine::ClientSeq(cs),
        sealed: vec![0x5a; bytes],
    }
}

/// A raw stream of `acct`'s device after `Hello`.
pub async fn raw(relay: &Relay, acct: &Acct) -> Raw {
    raw_as(relay, acct.keys.clone()).await
}

/// A raw stream, after `Hello`, of the registered device whose keys are `keys`.
pub async fn raw_as(relay: &Relay, keys: stratus_engine::libp2p::identity::Keypair) -> Raw {
    use stratus_engine::proto::wire::{RelayFrame, PROTOCOL_VERSION};
    let mut r = Raw::connect(keys, &relay.addr).await;
    assert!(matches!(r.hello(PROTOCOL_VERSION).await, RelayFrame::Hello { account: Some(_), .. }));
    r
}

/// Links a second device at `home` to the account of the device at `approver` (with the CLI)
/// and returns its keys.
pub fn linked_keys(
    relay: &Relay,
    approver: &Path,
    home: &Path,
    name: &str,
) -> stratus_engine::libp2p::identity::Keypair {
    link_device(relay, approver, home, name);
    stratus_engine::Device::open(home).expect("device opens").keypair()
}

/// A raw protocol client: a libp2p connection and one sync stream, for tests that speak the
/// protocol directly (bad input, log inspection).
pub struct Raw {
    net: stratus_engine::net::Net,
    relay: (stratus_engine::libp2p::PeerId, stratus_engine::libp2p::Multiaddr),
    /// The framed stream.
    pub stream: stratus_engine::net::RelayStream,
}

impl Raw {
    /// Connects with `keypair` (a fresh one for an unknown device). Each `Raw` is its own
    /// libp2p connection, so several with one keypair are several connections of one peer.
    pub async fn connect(keypair: stratus_engine::libp2p::identity::Keypair, addr: &str) -> Raw {
        Self::try_connect(keypair, addr).await.expect("relay reachable")
    }

    /// [`Raw::connect`] that reports a refused connection or stream instead of failing.
    pub async fn try_connect(
        keypair: stratus_engine::libp2p::identity::Keypair,
        addr: &str,
    ) -> Result<Raw, stratus_engine::net::NetError> {
        let (peer, ma) = stratus_engine::net::parse_relay_addr(addr).expect("relay address");
        let mut net = stratus_engine::net::Net::start(keypair).expect("swarm starts");
        let stream = net.open(peer, ma.clone()).await?;
        Ok(Raw { net, relay: (peer, ma), stream })
    }

    /// Opens another sync stream on the same connection.
    pub async fn open_stream(&mut self) -> Result<stratus_engine::net::RelayStream, stratus_engine::net::NetError> {
        self.net.open(self.relay.0, self.relay.1.clone()).await
    }

    /// Sends `Hello` with `version` and returns the answer.
    pub async fn hello(&mut self, version: u16) -> RelayFrame {
        self.stream.send(&ClientFrame::Hello { version }).await.expect("send");
        self.next().await.expect("an answer to hello")
    }

    /// The next frame, or `None` when the relay closed the stream.
    pub async fn next(&mut self) -> Option<RelayFrame> {
        tokio::time::timeout(Duration::from_secs(20), self.stream.recv())
            .await
            .expect("relay answers within 20 s")
            .expect("frame decodes")
    }

    /// Sends a request and returns the first frame that is not a push (nor `Typing` or
    /// `Behind`, which answer nothing either).
    pub async fn request(&mut self, frame: ClientFrame) -> RelayFrame {
        self.stream.send(&frame).await.expect("send");
        loop {
            match self.next().await.expect("an answer") {
                RelayFrame::Push { .. }
                | RelayFrame::PushAccount { .. }
                | RelayFrame::Typing { .. }
                | RelayFrame::Behind { .. } => {}
                f => return f,
            }
        }
    }

    /// Every delta of `chat` on the relay, page by page.
    pub async fn fetch_all(&mut self, chat: ChatId) -> Vec<Delta> {
        let mut all: Vec<Delta> = Vec::new();
        let mut req = 1000;
        loop {
            req += 1;
            let after = all.last().map(|d| d.seq).unwrap_or_default();
            match self.request(ClientFrame::FetchChat { req, chat, after, max: 512 }).await {
                RelayFrame::ChatPage { deltas, .. } if deltas.is_empty() => return all,
                RelayFrame::ChatPage { deltas, .. } => all.extend(deltas),
                other => panic!("unexpected answer to a fetch: {other:?}"),
            }
        }
    }
}

use stratus_engine::proto::wire::{ClientFrame, Delta, RelayFrame};
use stratus_engine::ChatId;

/// Creates an account on a fresh device in `home`.
pub async fn new_account(relay: &Relay, home: &Path, name: &str) -> stratus_engine::Device {
    let mut d = stratus_engine::Device::open(home).expect("device opens");
    d.create_account(&relay.addr, name).await.expect("account created");
    d
}

/// Links a fresh device in `home` to `approver`'s account (both in this process).
pub async fn new_linked(
    relay: &Relay,
    approver: &mut stratus_engine::Device,
    home: &Path,
    name: &str,
) -> stratus_engine::Device {
    let mut d = stratus_engine::Device::open(home).expect("device opens");
    let code = d.link_code().expect("link code");
    let addr = relay.addr.clone();
    let name = name.to_string();
    let c2 = code.clone();
    let waiting = tokio::spawn(async move {
        d.link(&addr, &name, &c2).await.expect("link succeeds");
        d
    });
    let mut tries = 0;
    while let Err(e) = approver.approve(&code).await {
        tries += 1;
        assert!(tries < 100, "approve keeps failing: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    waiting.await.expect("link task")
}

/// Waits for an event matching `pred`, at most `secs` seconds.
pub async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<stratus_engine::Event>,
    secs: u64,
    pred: impl Fn(&stratus_engine::Event) -> bool,
) -> stratus_engine::Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching event within {secs} s"))
        {
            Ok(e) if pred(&e) => return e,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("session stopped: {e}"),
        }
    }
}

/// Logs engine tracing to the test's output when `STRATUS_LOG` is set (e.g. `debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("STRATUS_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// Polls until the session is connected, caught up and its outbox is empty.
pub async fn wait_idle(session: &stratus_engine::Session, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let st = session.status().await.expect("session running");
        if st.connected && st.caught_up && st.outbox == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "session not idle within {secs} s: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}
