//! Printing a run's line and the medians over runs.

use std::time::Duration;

use crate::{CatchUp, Config, Live, RunResult};

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Percentile (nearest rank) of a sorted slice.
pub(crate) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn summary_line(r: usize, runs: usize, x: &RunResult) -> String {
    let history = x.history_rate.map_or("history n/a".into(), |h| format!("history written at {h:.0}/s"));
    let catch_up = match &x.catch_up {
        Some(c) => {
            format!("catch-up {} msgs in {:.3} s = {:.0} deltas/s", c.messages, c.took.as_secs_f64(), c.per_sec())
        }
        None => "catch-up n/a".into(),
    };
    let live = match &x.live {
        Some(l) => format!(
            "live: sent {}/{} at {:.0}/s, c got {} events ({} lagged, {} missing from c's store), latency p50 {:.2} \
             p99 {:.2} max {:.2} ms (p50 first second {:.2}, last second {:.2}) | send p50 {:.2} p99 {:.2} ms | \
             send → acked p50 {:.2} p99 {:.2} ms ({} acks missed) | CPU relay {:.0}% bench {:.0}%",
            l.sent,
            l.planned,
            l.achieved_rate,
            l.latency.len(),
            l.lagged,
            l.not_stored,
            ms(pct(&l.latency, 50.0)),
            ms(pct(&l.latency, 99.0)),
            ms(l.latency.last().copied().unwrap_or_default()),
            ms(l.first_second_p50),
            ms(l.last_second_p50),
            ms(pct(&l.send, 50.0)),
            ms(pct(&l.send, 99.0)),
            ms(pct(&l.acked, 50.0)),
            ms(pct(&l.acked, 99.0)),
            l.acked_lagged,
            100.0 * l.relay_cpu,
            100.0 * l.bench_cpu,
        ),
        None => "live n/a".into(),
    };
    let verdict = |f: &[String]| if f.is_empty() { "ok".to_string() } else { format!("FAILED: {}", f.join("; ")) };
    let mut line = format!(
        "run {r}/{runs}: {history} | {catch_up} [{}] | {live} [{}] | load {} | relay log: {}",
        verdict(&x.catch_up_failures),
        verdict(&x.live_failures),
        x.load,
        x.relay_log
    );
    if let Some(l) = &x.live {
        let events = if l.events.is_empty() { "none".to_string() } else { l.events.join("; ") };
        line += &format!(" | events: {events} | at the end: {}", l.status_at_end);
    }
    line
}

/// (median, min, max); NaN when empty.
pub(crate) fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    match n {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        _ if n % 2 == 1 => (s[n / 2], s[0], s[n - 1]),
        _ => ((s[n / 2 - 1] + s[n / 2]) / 2.0, s[0], s[n - 1]),
    }
}

pub(crate) fn print_medians(cfg: &Config, results: &[RunResult]) {
    let ok_catch_up: Vec<&CatchUp> =
        results.iter().filter(|r| r.catch_up_failures.is_empty()).filter_map(|r| r.catch_up.as_ref()).collect();
    let ok_live: Vec<&Live> =
        results.iter().filter(|r| r.live_failures.is_empty()).filter_map(|r| r.live.as_ref()).collect();
    println!();
    println!(
        "## load_bench: median and range over the runs that did not fail ({} chats × {} messages; live {}/s for {} s)",
        cfg.chats, cfg.messages, cfg.rate, cfg.seconds
    );
    println!();
    println!("| figure | median | range | runs | target |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: Vec<f64>, of: usize, prec: usize, target: &str| {
        let (m, lo, hi) = median_range(&v);
        println!("| {name} | {m:.prec$} | {lo:.prec$}–{hi:.prec$} | {}/{of} | {target} |", v.len());
    };
    let n = results.len();
    row("new device catch-up, deltas/s", ok_catch_up.iter().map(|c| c.per_sec()).collect(), n, 0, "≥ 15,000");
    row("new device catch-up, s", ok_catch_up.iter().map(|c| c.took.as_secs_f64()).collect(), n, 3, "");
    let live = |f: &dyn Fn(&Live) -> f64| ok_live.iter().map(|l| f(l)).collect::<Vec<_>>();
    row("live send → event latency p50, ms", live(&|l| ms(pct(&l.latency, 50.0))), n, 2, "");
    row("live send → event latency p99, ms", live(&|l| ms(pct(&l.latency, 99.0))), n, 2, "≤ 50");
    row("live send → event latency max, ms", live(&|l| ms(l.latency.last().copied().unwrap_or_default())), n, 2, "");
    row("writers' achieved send rate, msgs/s", live(&|l| l.achieved_rate), n, 0, &format!("{}", cfg.rate));
    row("Session::send p50, ms", live(&|l| ms(pct(&l.send, 50.0))), n, 2, "");
    row("Session::send p99, ms", live(&|l| ms(pct(&l.send, 99.0))), n, 2, "");
    row("send → writer's Acked p50, ms", live(&|l| ms(pct(&l.acked, 50.0))), n, 2, "");
    row("send → writer's Acked p99, ms", live(&|l| ms(pct(&l.acked, 99.0))), n, 2, "");
    row("latency p50 of the first second's messages, ms", live(&|l| ms(l.first_second_p50)), n, 2, "");
    row("latency p50 of the last second's messages, ms", live(&|l| ms(l.last_second_p50)), n, 2, "");
    row("relay CPU during the live part, % of a core", live(&|l| 100.0 * l.relay_cpu), n, 0, "");
    row("bench CPU during the live part, % of a core", live(&|l| 100.0 * l.bench_cpu), n, 0, "");
    let history: Vec<f64> = results.iter().filter_map(|r| r.history_rate).collect();
    row("history written and acknowledged (setup), msgs/s", history, n, 0, "");
    let lost: usize = results.iter().filter_map(|r| r.live.as_ref()).map(|l| l.not_stored).sum();
    let lagged =
        results.iter().filter(|r| r.catch_up_failures.iter().chain(&r.live_failures).any(|f| f.contains("lagged")));
    println!();
    println!(
        "failed: catch-up {} of {n} runs, live {} of {n} runs; live messages not in c's store at the end, all runs: {lost}; \
         runs with a lagged event receiver: {}",
        n - ok_catch_up.len(),
        n - ok_live.len(),
        lagged.count()
    );
}
