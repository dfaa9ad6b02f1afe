//! Perf counters of the relay process and the fsync loop baseline.

use super::*;

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
