//! What a run reports: per round and per target, printed and as one JSON line.

use crate::checks::Checks;
use crate::load::RoundResult;
use crate::meter::{CpuSplit, Stages, STAGES};
use crate::plan::Mix;
use crate::stats::{median, Latency};
use crate::EVENTS_CEILING;
use serde::Serialize;

/// Figures of one target over the measured rounds (medians across rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rate: f64,
    /// Medians of the rounds' percentiles, and the largest max.
    #[serde(flatten)]
    pub latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_secs_per_1k: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub target: &'static str,
    /// The share of the worker's closed-loop rate offered (`--load-percent`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_percent: Option<f64>,
    /// The absolute rate offered (`--rates`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_rate: Option<f64>,
    #[serde(flatten)]
    pub result: RoundResult,
    /// The worker processes' CPU seconds per 1,000 commands (worker rounds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_secs_per_1k: Option<f64>,
    /// Where the machine's CPU went, per 1,000 commands.
    pub cpu_per_1k: CpuSplit,
    /// Worker rounds: where a batch's time went (from the workers' `/metrics`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Stages>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub commands: u64,
    pub in_flight: u64,
    pub mix: Mix,
    pub invalid_share: f64,
    pub workers: u64,
    pub prefetch: u16,
    pub consumers: u16,
    pub batch_size: u16,
    pub isolation: String,
    /// Whether the events ceiling ran as a third target.
    pub ceiling_events: bool,
    pub rounds: Vec<RoundRow>,
    pub worker: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Summary>,
    /// Worker ÷ the plain echo ceiling: the headline number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The echo that also publishes the contract's events (`--ceiling-events`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_ceiling: Option<Summary>,
    /// Worker ÷ the events ceiling: the distance due to the database and the
    /// worker's own work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_events_ceiling: Option<f64>,
    /// Events ceiling ÷ plain ceiling: what the contract's events alone leave of
    /// the plain ceiling, an upper bound for `ratio` on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_bound: Option<f64>,
    pub worker_peak_rss_kib: Vec<u64>,
    /// At each `--rates` rate, each target's medians over its rounds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fixed_rates: Vec<AtRate>,
    /// Per target: the highest `--rates` rate whose median p99 is ≤ 50 ms,
    /// over the target's own closed-loop rate (`None`: no rate was).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub knee: std::collections::BTreeMap<&'static str, Option<f64>>,
    pub checks: Checks,
    pub unix_time: u64,
}

/// The p99 the knee allows.
pub const KNEE_P99_MS: f64 = 50.0;

/// One target at one fixed rate: medians over its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct AtRate {
    pub rate: f64,
    pub target: &'static str,
    /// Medians of the rounds' percentiles, and the largest max.
    #[serde(flatten)]
    pub latency: Latency,
    /// CPU seconds per 1,000 commands by party, and their sum.
    pub cpu_per_1k: PartyCpu,
    /// Run-queue seconds per 1,000 commands, all parties.
    pub run_queue_per_1k: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PartyCpu {
    pub worker: f64,
    pub postgres: f64,
    pub broker: f64,
    pub bench: f64,
    pub echo: f64,
    pub drain: f64,
    pub total: f64,
}

fn at_rates(rows: &[RoundRow]) -> Vec<AtRate> {
    let mut rates: Vec<f64> = rows.iter().filter_map(|r| r.fixed_rate).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let mut out = Vec::new();
    for rate in rates {
        for target in ["worker", "ceiling", EVENTS_CEILING] {
            let rs: Vec<&RoundRow> = rows
                .iter()
                .filter(|r| r.fixed_rate == Some(rate) && r.target == target)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let m =
                |f: &dyn Fn(&RoundRow) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let party = |f: &dyn Fn(&RoundRow) -> Option<f64>| m(&|r| f(r).unwrap_or(0.0));
            let mut cpu = PartyCpu {
                worker: party(&|r| r.cpu_secs_per_1k),
                postgres: party(&|r| r.cpu_per_1k.postgres),
                broker: party(&|r| r.cpu_per_1k.broker),
                bench: m(&|r| r.cpu_per_1k.bench),
                echo: party(&|r| r.cpu_per_1k.echo),
                drain: party(&|r| r.cpu_per_1k.drain),
                total: 0.0,
            };
            cpu.total = m(&|r| {
                r.cpu_secs_per_1k.unwrap_or(0.0)
                    + r.cpu_per_1k.postgres.unwrap_or(0.0)
                    + r.cpu_per_1k.broker.unwrap_or(0.0)
                    + r.cpu_per_1k.bench
                    + r.cpu_per_1k.echo.unwrap_or(0.0)
                    + r.cpu_per_1k.drain.unwrap_or(0.0)
            });
            out.push(AtRate {
                rate,
                target,
                latency: latency_over(&rs),
                cpu_per_1k: cpu,
                run_queue_per_1k: m(&|r| r.cpu_per_1k.run_queue.total()),
            });
        }
    }
    out
}

impl Report {
    pub fn is_correct(&self) -> bool {
        self.checks.problems.is_empty()
    }
}

/// The worker's batches at one load (`None`: the closed-loop rounds): mean
/// commands per batch and milliseconds per stage, medians over the rounds.
fn print_stages(r: &Report, load: Option<f64>) {
    let rows: Vec<&Stages> = r
        .rounds
        .iter()
        .filter(|x| x.target == "worker" && x.load_percent == load)
        .filter_map(|x| x.stages.as_ref())
        .collect();
    if rows.is_empty() {
        return;
    }
    let size = median(&rows.iter().map(|s| s.mean_batch_size).collect::<Vec<_>>());
    let mut line = format!("  worker batches: {size:.1} commands each; mean ms per batch:");
    for stage in STAGES {
        let v: Vec<f64> = rows
            .iter()
            .filter_map(|s| s.mean_ms.get(stage).copied())
            .collect();
        if !v.is_empty() {
            line.push_str(&format!(" {stage} {:.2}", median(&v)));
        }
    }
    println!("{line}");
}

pub fn print(r: &Report) {
    println!(
        "profile-worker bench: {} commands/round, {} in flight, mix {:?}, invalid share {}, {} worker(s) × {} consumers, prefetch {}, batch {}, {}",
        r.commands, r.in_flight, r.mix, r.invalid_share, r.workers, r.consumers, r.prefetch, r.batch_size, r.isolation
    );
    println!(
        "{:>5} {:>5} {:<14} {:>8} {:>8} {:>8} {:>8} {:>8}   CPU s per 1k: {:>6} {:>6} {:>6} {:>6} {:>7}",
        "load",
        "round",
        "target",
        "rate/s",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "worker",
        "broker",
        "pg",
        "bench",
        "WAL KiB"
    );
    print_rounds(&r.rounds);
    print_summaries(r);
    print_load_curve(r);
    print_fixed_rates(r);
    print_stages(r, None);
    print_checks(&r.checks);
}

/// One line per round.
fn print_rounds(rounds: &[RoundRow]) {
    let opt = |c: Option<f64>| c.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into());
    for row in rounds {
        let l = row.result.latency;
        let load = match (row.load_percent, row.result.offered_rate) {
            (Some(p), _) => format!("{p:.0}%"),
            (None, Some(_)) => "open".into(),
            (None, None) => "max".into(),
        };
        println!(
            "{:>5} {:>5} {:<14} {:>8.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1}                 {:>6} {:>6} {:>6} {:>6.3} {:>7}",
            load,
            row.round,
            row.target,
            row.result.rate,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            opt(row.cpu_secs_per_1k),
            opt(row.cpu_per_1k.broker),
            opt(row.cpu_per_1k.postgres),
            row.cpu_per_1k.bench,
            row.cpu_per_1k
                .wal_kib
                .map(|k| format!("{k:.0}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
}

/// Each target's medians, and the worker's share of each ceiling.
fn print_summaries(r: &Report) {
    let w = &r.worker;
    println!(
        "worker  (median of rounds): {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} CPU s per 1k, peak RSS {} MiB",
        w.rate,
        w.latency.p50_ms,
        w.latency.p99_ms,
        w.latency.max_ms,
        w.cpu_secs_per_1k.map(|c| format!("{c:.3}")).unwrap_or_else(|| "?".into()),
        r.worker_peak_rss_kib
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let ceilings = [
        ("ceiling", &r.ceiling, r.ratio),
        (
            "ceiling with events",
            &r.events_ceiling,
            r.ratio_to_events_ceiling,
        ),
    ];
    for (name, summary, ratio) in ceilings {
        let (Some(c), Some(ratio)) = (summary, ratio) else {
            continue;
        };
        println!(
            "{name} (median of rounds): {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            c.rate, c.latency.p50_ms, c.latency.p99_ms, c.latency.max_ms
        );
        println!("worker ÷ {name} (median of paired rounds): {ratio:.3}");
        println!(
            "worker p50 − {name} p50: {:+.2} ms",
            r.worker.latency.p50_ms - c.latency.p50_ms
        );
    }
    if let Some(bound) = r.events_bound {
        println!(
            "ceiling with events ÷ ceiling (median of paired rounds): {bound:.3}, the most a worker answering with the contract's events could reach here"
        );
    }
}

/// The latency-against-load curve: medians of each target's rounds at each load.
fn print_load_curve(r: &Report) {
    let mut loads: Vec<f64> = r.rounds.iter().filter_map(|x| x.load_percent).collect();
    loads.dedup();
    for pct in loads {
        let at = |target: &str, f: &dyn Fn(&RoundRow) -> f64| {
            let v: Vec<f64> = r
                .rounds
                .iter()
                .filter(|x| x.load_percent == Some(pct) && x.target == target)
                .map(f)
                .collect();
            median(&v)
        };
        let offered = at("worker", &|x| x.result.offered_rate.unwrap_or(f64::NAN));
        let mut line = format!("load {pct:.0}% ({offered:.0}/s offered):");
        for target in ["worker", "ceiling", EVENTS_CEILING] {
            let p50 = at(target, &|x| x.result.latency.p50_ms);
            if p50.is_nan() {
                continue;
            }
            let p99 = at(target, &|x| x.result.latency.p99_ms);
            let p999 = at(target, &|x| x.result.latency.p999_ms);
            line.push_str(&format!(
                " {target} p50 {p50:.2} / p99 {p99:.2} / p99.9 {p999:.2} ms;"
            ));
        }
        println!("{}", line.trim_end_matches(';'));
        print_stages(r, Some(pct));
    }
}

fn print_checks(c: &Checks) {
    println!(
        "checks: tickets {}/{}, verification tokens {}/{}, email.requested {} (≥ {}), dead letters {}/{}: {}",
        c.tickets,
        c.expected.tickets,
        c.verification_tokens,
        c.expected.verification_tokens,
        c.email_requested,
        c.expected.verification_tokens,
        c.dead_letters,
        c.expected.dead_letters,
        if c.problems.is_empty() { "all correct" } else { "WRONG" }
    );
}

/// The report of a run's rounds: medians per target, and the paired ratios
/// between targets.
pub fn summarize(
    args: &crate::args::BenchArgs,
    iso: &crate::isolation::Isolation,
    rows: Vec<RoundRow>,
    worker_peak_rss_kib: Vec<u64>,
    checks: Checks,
) -> Report {
    use crate::stats::paired_ratio;
    // Rates and their ratios mean something only for closed-loop rounds; with
    // --rate every round is open, and the summary is of those.
    let closed = |r: &&RoundRow| r.load_percent.is_none() && r.fixed_rate.is_none();
    let summary = |target: &str| -> Option<Summary> {
        let rs: Vec<&RoundRow> = rows
            .iter()
            .filter(closed)
            .filter(|r| r.target == target)
            .collect();
        if rs.is_empty() {
            return None;
        }
        let m = |f: &dyn Fn(&RoundRow) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let cpu = m(&|r| r.cpu_secs_per_1k.unwrap_or(f64::NAN));
        Some(Summary {
            rate: m(&|r| r.result.rate),
            latency: latency_over(&rs),
            cpu_secs_per_1k: (!cpu.is_nan()).then_some(cpu),
        })
    };
    let rates = |target: &str| -> Vec<f64> {
        rows.iter()
            .filter(closed)
            .filter(|r| r.target == target)
            .map(|r| r.result.rate)
            .collect()
    };
    let open = args.rate.is_some();
    let at = at_rates(&rows);
    let ratio = (args.ceiling && !open).then(|| paired_ratio(&rates("worker"), &rates("ceiling")));
    let ratio_to_events_ceiling = (args.ceiling_events && !open)
        .then(|| paired_ratio(&rates("worker"), &rates(EVENTS_CEILING)));
    let events_bound = (args.ceiling_events && !open)
        .then(|| paired_ratio(&rates(EVENTS_CEILING), &rates("ceiling")));
    Report {
        commands: args.commands,
        in_flight: args.in_flight,
        mix: args.mix,
        invalid_share: args.invalid_share,
        workers: args.workers,
        prefetch: args.prefetch,
        consumers: args.consumers,
        batch_size: args.batch_size,
        isolation: iso.describe(),
        ceiling_events: args.ceiling_events,
        worker: summary("worker").expect("at least one worker round"),
        ceiling: summary("ceiling"),
        ratio,
        events_ceiling: summary(EVENTS_CEILING),
        ratio_to_events_ceiling,
        events_bound,
        worker_peak_rss_kib,
        knee: ["worker", "ceiling", EVENTS_CEILING]
            .into_iter()
            .filter(|t| !at.iter().all(|a| a.target != *t))
            .map(|t| {
                let max = median(&rates(t));
                let best = at
                    .iter()
                    .filter(|a| a.target == t && a.latency.p99_ms <= KNEE_P99_MS)
                    .map(|a| a.rate)
                    .fold(None, |b: Option<f64>, r| Some(b.map_or(r, |b| b.max(r))));
                (t, best.map(|r| r / max))
            })
            .collect(),
        fixed_rates: at,
        checks,
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        rounds: rows,
    }
}

/// Latency and every party's CPU at each fixed rate, and the knee.
fn print_fixed_rates(r: &Report) {
    if r.fixed_rates.is_empty() {
        return;
    }
    println!(
        "{:>7} {:<14} {:>8} {:>8} {:>8} {:>8}   CPU s per 1k: {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}   run queue s/1k",
        "rate/s", "target", "p50 ms", "p99 ms", "p99.9", "max ms", "worker", "pg", "broker", "bench", "echo", "drain", "total"
    );
    for a in &r.fixed_rates {
        let c = a.cpu_per_1k;
        println!(
            "{:>7.0} {:<14} {:>8.2} {:>8.2} {:>8.2} {:>8.1}                 {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3}   {:>6.3}",
            a.rate, a.target, a.latency.p50_ms, a.latency.p99_ms, a.latency.p999_ms, a.latency.max_ms,
            c.worker, c.postgres, c.broker, c.bench, c.echo, c.drain, c.total, a.run_queue_per_1k
        );
    }
    for (target, knee) in &r.knee {
        match knee {
            Some(k) => {
                println!("knee {target}: {k:.2} of its closed-loop rate (p99 ≤ {KNEE_P99_MS} ms)")
            }
            None => println!("knee {target}: no rate offered had p99 ≤ {KNEE_P99_MS} ms"),
        }
    }
}

/// Rounds' latencies together: the median of each percentile, the largest max.
fn latency_over(rounds: &[&RoundRow]) -> Latency {
    let m = |f: fn(&Latency) -> f64| {
        median(
            &rounds
                .iter()
                .map(|r| f(&r.result.latency))
                .collect::<Vec<_>>(),
        )
    };
    Latency {
        p50_ms: m(|l| l.p50_ms),
        p99_ms: m(|l| l.p99_ms),
        p999_ms: m(|l| l.p999_ms),
        max_ms: rounds
            .iter()
            .map(|r| r.result.latency.max_ms)
            .fold(0.0, f64::max),
    }
}
