//! Printing the tables.

use super::*;

pub(super) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "n/a".into())
}

pub(super) fn print_barriers(rows: &[&BarrierStats]) {
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

pub(super) fn per_append(count: Option<u64>, appends: u64) -> Option<f64> {
    count.map(|c| c as f64 / appends as f64)
}

pub(super) fn print_runs(runs: &[RunStats], devices: usize) {
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
