//! What the bench binaries (`relay_bench`, `load_bench`) report about the machine they ran on:
//! the CPU and memory, the load average, the filesystem under a path, and a process's CPU time.

use std::path::Path;
use std::process::Command;

/// A `/proc` (or other) file's text, empty if it cannot be read.
pub fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// CPUs, CPU model, memory and kernel.
pub fn machine() -> String {
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

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The mount holding `path`: (mount point, filesystem type, source, options).
pub fn filesystem_of(path: &Path) -> (String, String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(String, String, String, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (l, r): (Vec<&str>, Vec<&str>) = (left.split(' ').collect(), right.split(' ').collect());
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
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads) a process has used.
pub fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tck
}
