//! What a round cost: each party's CPU time (from /proc), PostgreSQL's WAL,
//! and the worker's own stage timings (from its `/metrics`).

use crate::setup::{self, WorkerProcess};
use serde::Serialize;

/// A worker round's batches, from `profile_worker_batch_*` before and after it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    pub batches: f64,
    pub mean_batch_size: f64,
    /// Mean milliseconds per batch in each stage.
    pub mean_ms: std::collections::BTreeMap<String, f64>,
}

pub const STAGES: [&str; 8] = [
    "decode", "load", "plan", "commit", "database", "publish", "ack", "total",
];

pub async fn batch_samples_of(addrs: &[String]) -> std::collections::HashMap<String, f64> {
    let mut all = std::collections::HashMap::new();
    for a in addrs {
        for (k, v) in setup::batch_samples(a).await {
            *all.entry(k).or_insert(0.0) += v;
        }
    }
    all
}

pub fn stages_between(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
) -> Option<Stages> {
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let batches = delta("profile_worker_batch_size_count");
    if batches <= 0.0 {
        return None;
    }
    let mut mean_ms = std::collections::BTreeMap::new();
    for s in STAGES {
        let n = delta(&format!(
            "profile_worker_batch_seconds_count{{stage=\"{s}\"}}"
        ));
        if n > 0.0 {
            let sum = delta(&format!(
                "profile_worker_batch_seconds_sum{{stage=\"{s}\"}}"
            ));
            mean_ms.insert(s.to_string(), sum / n * 1000.0);
        }
    }
    Some(Stages {
        batches,
        mean_batch_size: delta("profile_worker_batch_size_sum") / batches,
        mean_ms,
    })
}

/// CPU seconds per 1,000 commands of each party, when it runs on this machine.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSplit {
    pub broker: Option<f64>,
    /// Every PostgreSQL process: postmaster, backends, walwriter, checkpointer…
    pub postgres: Option<f64>,
    /// This load generator.
    pub bench: f64,
    /// The echo consumer, in its rounds (a process of its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<f64>,
    /// The events' consumers (the dispatcher's queue, the audit queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<f64>,
    /// Not CPU: KiB of write-ahead log PostgreSQL wrote per 1,000 commands (the
    /// whole server's WAL, so it counts only on an otherwise idle server).
    pub wal_kib: Option<f64>,
    /// Seconds each party's threads waited on a run queue for a CPU, per
    /// 1,000 commands: the waiting for CPU, measured.
    pub run_queue: RunQueue,
}

/// Run-queue delay per 1,000 commands, by party (seconds).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RunQueue {
    pub worker: f64,
    pub broker: f64,
    pub postgres: f64,
    pub bench: f64,
    pub echo: f64,
    pub drain: f64,
}

impl RunQueue {
    pub fn total(&self) -> f64 {
        self.worker + self.broker + self.postgres + self.bench + self.echo + self.drain
    }
}

/// The processes whose CPU time and run-queue delay a round accounts for.
pub struct Meters {
    pub broker: Vec<u32>,
    pub db_url: String,
    pub echo: Vec<u32>,
    pub drain: Vec<u32>,
}

/// One party's CPU and run-queue seconds so far, by process.
#[derive(Clone, Default)]
struct Use(std::collections::HashMap<u32, (f64, f64)>);

impl Use {
    fn of(pids: &[u32]) -> Use {
        Use(pids
            .iter()
            .filter_map(|&p| Some((p, (setup::cpu_secs(p)?, setup::run_delay_secs(p)?))))
            .collect())
    }

    /// (CPU, run-queue) seconds since `before`: a process that exited in
    /// between counts what it had used by then (it can no longer be read),
    /// one that started counts from its start.
    fn since(&self, before: &Use) -> (f64, f64) {
        let mut d = (0.0, 0.0);
        for (pid, &(cpu, waited)) in &self.0 {
            let (c0, w0) = before.0.get(pid).copied().unwrap_or((0.0, 0.0));
            d.0 += (cpu - c0).max(0.0);
            d.1 += (waited - w0).max(0.0);
        }
        d
    }
}

pub struct Reading {
    workers: Use,
    broker: Use,
    postgres: Use,
    postgres_pids: Vec<u32>,
    bench: Use,
    echo: Use,
    drain: Use,
    wal: Option<f64>,
}

impl Meters {
    pub async fn read(
        &self,
        workers: &[WorkerProcess],
        postgres_pids: Option<Vec<u32>>,
    ) -> Reading {
        let postgres_pids = postgres_pids.unwrap_or_else(|| setup::pids_named("postgres"));
        let worker_pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
        Reading {
            workers: Use::of(&worker_pids),
            broker: Use::of(&self.broker),
            postgres: Use::of(&postgres_pids),
            postgres_pids,
            bench: Use::of(&[std::process::id()]),
            echo: Use::of(&self.echo),
            drain: Use::of(&self.drain),
            wal: setup::wal_position(&self.db_url).await,
        }
    }

    /// CPU used between `before` and now, per 1,000 of `n` commands: the
    /// workers', and every party's.
    pub async fn since(
        &self,
        before: Reading,
        workers: &[WorkerProcess],
        n: u64,
    ) -> (f64, CpuSplit) {
        // Server processes started during the round count from their start.
        let mut pids = before.postgres_pids.clone();
        for p in setup::pids_named("postgres") {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        let after = self.read(workers, Some(pids)).await;
        let per_1k = |d: f64| d * 1000.0 / n as f64;
        // Each party's (CPU, run-queue) seconds per 1,000 commands.
        let used = |a: &Use, b: &Use| {
            let (cpu, waited) = a.since(b);
            (per_1k(cpu), per_1k(waited))
        };
        let workers = used(&after.workers, &before.workers);
        let broker = used(&after.broker, &before.broker);
        let postgres = used(&after.postgres, &before.postgres);
        let bench = used(&after.bench, &before.bench);
        let echo = used(&after.echo, &before.echo);
        let drain = used(&after.drain, &before.drain);
        (
            workers.0,
            CpuSplit {
                broker: (!self.broker.is_empty()).then_some(broker.0),
                postgres: (!after.postgres_pids.is_empty()).then_some(postgres.0),
                bench: bench.0,
                echo: (!self.echo.is_empty()).then_some(echo.0),
                drain: (!self.drain.is_empty()).then_some(drain.0),
                wal_kib: after
                    .wal
                    .zip(before.wal)
                    .map(|(a, b)| per_1k(a - b) / 1024.0),
                run_queue: RunQueue {
                    worker: workers.1,
                    broker: broker.1,
                    postgres: postgres.1,
                    bench: bench.1,
                    echo: echo.1,
                    drain: drain.1,
                },
            },
        )
    }
}
