//! Printing a run's table and the medians and ranges over runs.

use super::*;

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn p99(v: &[Duration]) -> f64 {
    ms(pct(v, 99.0))
}

pub(super) fn print_run(r: &RunResult) {
    println!();
    let b = &r.baseline;
    println!(
        "baseline (quiet): {} appends, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; relay wrote {:.2} MiB/s, RSS {:.1} MiB",
        b.good.len(),
        ms(pct(&b.good, 50.0)),
        p99(&b.good),
        ms(b.good.last().copied().unwrap_or_default()),
        b.write_rate / 1048576.0,
        mib(b.rss * 1024)
    );
    println!();
    println!(
        "| case | s | RSS before | peak | mid | end of flood | 2 s after (MiB) | written MiB/s | store MiB before → after \
         | good appends | good p50 ms | good p99 ms | typing received |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for c in &r.cases {
        let [before, peak, mid, end, after] = c.rss.map(|k| mib(k * 1024));
        println!(
            "| {} | {:.0} | {before:.1} | {peak:.1} | {mid:.1} | {end:.1} | {after:.1} | {:.1} | {:.1} → {:.1} | {} | \
             {:.2} | {:.2} | {} |",
            c.name,
            c.secs,
            mib(c.written) / c.written_secs,
            mib(c.store_before),
            mib(c.store_after),
            c.good.len(),
            ms(pct(&c.good, 50.0)),
            p99(&c.good),
            c.typing
        );
    }
    println!();
    for c in &r.cases {
        println!("- {}: {}", c.name, c.what);
    }
    println!(
        "well-behaved devices: {} appends refused, {} cut off; relay alive at the end: {}",
        r.refused, r.cut_off, r.alive
    );
}

/// Median and range of `v` as `median [min – max]`.
fn spread(v: &[f64], prec: usize) -> String {
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(*x), h.max(*x)));
    format!("{:.prec$} [{lo:.prec$} – {hi:.prec$}]", median(v))
}

pub(super) fn print_summary(runs: &[RunResult]) {
    println!();
    println!("## summary over {} runs: median [min – max]", runs.len());
    println!();
    let seeds: Vec<String> = runs.iter().map(|r| r.seed.to_string()).collect();
    println!("run seeds: {}", seeds.join(", "));
    let base: Vec<f64> = runs.iter().map(|r| p99(&r.baseline.good)).collect();
    let base_written: Vec<f64> = runs.iter().map(|r| r.baseline.write_rate / 1048576.0).collect();
    let base_rss: Vec<f64> = runs.iter().map(|r| mib(r.baseline.rss * 1024)).collect();
    println!(
        "quiet baseline: good append p99 {} ms; relay wrote {} MiB/s; RSS {} MiB",
        spread(&base, 2),
        spread(&base_written, 2),
        spread(&base_rss, 1)
    );
    println!();
    println!(
        "| case | peak RSS MiB | RSS growth, flood's 2nd half, MiB | RSS 2 s after MiB | written MiB/s | store growth MiB \
         | good p99 ms | good p99 ÷ baseline p99 |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for i in 0..runs.first().map_or(0, |r| r.cases.len()) {
        let name = runs[0].cases[i].name;
        let col = |f: &dyn Fn(&CaseResult) -> f64| -> Vec<f64> { runs.iter().map(|r| f(&r.cases[i])).collect() };
        let ratio: Vec<f64> = runs.iter().map(|r| p99(&r.cases[i].good) / p99(&r.baseline.good).max(1e-3)).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            spread(&col(&|c| mib(c.rss[1] * 1024)), 1),
            spread(&col(&|c| mib(c.rss[3] * 1024) - mib(c.rss[2] * 1024)), 1),
            spread(&col(&|c| mib(c.rss[4] * 1024)), 1),
            spread(&col(&|c| mib(c.written) / c.written_secs), 1),
            spread(&col(&|c| mib(c.store_after) - mib(c.store_before)), 1),
            spread(&col(&|c| p99(&c.good)), 2),
            spread(&ratio, 1),
        );
    }
    let alive = runs.iter().all(|r| r.alive);
    let cut: u64 = runs.iter().map(|r| r.cut_off).sum();
    let refused: u64 = runs.iter().map(|r| r.refused).sum();
    println!();
    println!("relay alive through every run: {alive}; well-behaved devices cut off: {cut}, appends refused: {refused}");
}
