//! The machine, the disk's own barrier, CPU time, and the relay process.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crate::report::{ms, pct};
use crate::BARRIER_SAMPLES;
pub(crate) use stratus_tests::bench_relay::RelayProc;

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

/// A `stratus-relay` process (the benches' own, SIGKILLed when dropped), started with the
/// flags in `BENCH_RELAY_ARGS` if set.
pub(crate) fn start_relay(exe: &Path, data: &Path, log: &Path) -> RelayProc {
    let extra = std::env::var("BENCH_RELAY_ARGS").unwrap_or_default();
    RelayProc::start(exe, data, log, &extra.split_whitespace().collect::<Vec<_>>())
}
