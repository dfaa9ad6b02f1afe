//! Figures about the machine, the relay process, perf counters and the fsync loop baseline.

use super::*;

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Percentile (nearest rank) of a sorted slice.
pub(super) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

pub(super) fn median(v: &[f64]) -> f64 {
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

// ---------------------------------------------------------------------------------------------
// The relay process

pub(super) struct RelayProc {
    pub(super) child: Option<Child>,
    pub(super) _stdout: Option<BufReader<ChildStdout>>,
    pub(super) addr: String,
    pub(super) pid: u32,
    pub(super) log: PathBuf,
}

impl RelayProc {
    pub(super) fn start(exe: &Path, data: &Path, log: &Path) -> RelayProc {
        Self::start_with(exe, data, log, &[])
    }

    /// [`RelayProc::start`] with more flags (not `--data-dir`, `--listen` or
    /// `--requests-per-second` again: the bench sets those).
    pub(super) fn start_with(exe: &Path, data: &Path, log: &Path, extra: &[String]) -> RelayProc {
        let stderr = File::create(log).expect("relay log file");
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            // The bench measures capacity, not policy: its latency run paces one device at
            // 1,000 appends/s, which is the default per-device rate, and its clients do not
            // handle `RateLimited`. The in-flight caps (64 appends, 8 pages) stay above what
            // its clients keep (16 appends).
            .args(["--requests-per-second", "0"])
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

    pub(super) fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (clean shutdown with a final barrier), SIGKILL after 10 s.
    pub(super) fn stop(&mut self) -> Option<std::process::ExitStatus> {
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

pub(super) struct Perf {
    pub(super) stat: Option<(Child, PathBuf)>,
    pub(super) record: Option<(Child, PathBuf)>,
}

#[derive(Clone, Default)]
pub(super) struct PerfResult {
    /// `fdatasync` calls the relay made (one per barrier).
    pub(super) fdatasync: Option<u64>,
    /// `fsync` calls.
    pub(super) fsync: Option<u64>,
    /// `sync_file_range` calls (sled writing its log buffers).
    pub(super) sync_file_range: Option<u64>,
    /// `pwrite64` calls (sled writing its log buffers).
    pub(super) pwrite: Option<u64>,
    /// Duration of each of the relay's fdatasync calls, sorted.
    pub(super) fdatasync_times: Vec<Duration>,
}

pub(super) fn perf_works() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "syscalls:sys_enter_fdatasync", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Perf {
    pub(super) fn start(pid: u32, dir: &Path, tag: &str, record: bool) -> Perf {
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

    pub(super) fn stop(mut self) -> PerfResult {
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

pub(super) struct BarrierStats {
    pub(super) label: String,
    pub(super) samples: Vec<Duration>, // sorted
    pub(super) per_sec: f64,
}

/// `n` timed iterations of (write 4 KiB, fdatasync) in `dir`. `append`: each write extends the
/// file (as sled's log does when it allocates); otherwise the same block is overwritten.
pub(super) fn fsync_loop(dir: &Path, n: usize, append: bool, label: &str) -> BarrierStats {
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
