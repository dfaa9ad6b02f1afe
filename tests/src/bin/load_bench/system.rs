//! The machine, the disk's own barrier, CPU time, and the relay process.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use crate::report::{ms, pct};
use crate::BARRIER_SAMPLES;

pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub(crate) fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cpus} CPUs ({cpu}), Linux {}", read("/proc/sys/kernel/osrelease").trim())
}

pub(crate) fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The mount holding `path`: (mount point, filesystem type, source).
pub(crate) fn filesystem_of(path: &Path) -> (String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(String, String, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (l, r): (Vec<&str>, Vec<&str>) = (left.split(' ').collect(), right.split(' ').collect());
        if l.len() < 5 || r.len() < 2 {
            continue;
        }
        let mount = l[4].replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|b| mount.len() >= b.0.len()) {
            best = Some((mount, r[0].to_string(), r[1].to_string()));
        }
    }
    best.unwrap_or_else(|| ("?".into(), "?".into(), "?".into()))
}

/// The disk's own barrier on `dir`'s filesystem, which bounds every durable write here (each
/// device's store and the relay's): [`BARRIER_SAMPLES`] × (append 4 KiB, `fdatasync`).
pub(crate) fn fsync_loop(dir: &Path) -> String {
    let path = dir.join(format!("load-bench-fsync-{}", std::process::id()));
    let mut f = File::create(&path).expect("a file in --dir");
    let block = [0x5au8; 4096];
    let mut took = Vec::with_capacity(BARRIER_SAMPLES);
    let started = Instant::now();
    for _ in 0..BARRIER_SAMPLES {
        let t = Instant::now();
        f.write_all(&block).and_then(|()| f.sync_data()).expect("write and fdatasync");
        took.push(t.elapsed());
    }
    let per_sec = BARRIER_SAMPLES as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    took.sort();
    format!(
        "append 4 KiB + fdatasync × {BARRIER_SAMPLES}: p50 {:.3} ms, p99 {:.3} ms, {per_sec:.0}/s",
        ms(pct(&took, 50.0)),
        ms(pct(&took, 99.0))
    )
}

/// The relay log's warnings and errors: how many devices it cut off for not reading, and the
/// other lines counted by their message.
pub(crate) fn relay_warnings(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counted: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
        let line = strip_ansi(line);
        let line = line.as_str();
        // The message follows the level and the target ("… WARN stratus_relay::server: message conn=…").
        let message = line.split_once(": ").map_or(line, |(_, m)| m);
        let message = message.split(" conn=").next().unwrap_or(message).trim();
        *counted.entry(message.to_string()).or_default() += 1;
    }
    if counted.is_empty() {
        return "no warnings".into();
    }
    counted.iter().map(|(m, n)| format!("{n} × {m}")).collect::<Vec<_>>().join("; ")
}

/// `line` without its terminal colour codes (ESC [ … m).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Clock ticks per second of /proc/<pid>/stat times.
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads) a process has used.
pub(crate) fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tck
}

/// A `stratus-relay` process, SIGKILLed when dropped.
pub(crate) struct RelayProc {
    child: Child,
    /// Kept open: the relay's stdout must not close under it.
    _stdout: BufReader<ChildStdout>,
    pub(crate) addr: String,
    pub(crate) pid: u32,
}

impl RelayProc {
    pub(crate) fn start(exe: &Path, data: &Path, log: &Path) -> RelayProc {
        let stderr = File::create(log).expect("relay log file");
        let extra = std::env::var("BENCH_RELAY_ARGS").unwrap_or_default();
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra.split_whitespace())
            .env("STRATUS_LOG", "stratus_relay=info")
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
        let pid = child.id();
        RelayProc { addr: addr.to_string(), child, _stdout: out, pid }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
