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
    pub postgres: Option<f64>,
    /// This load generator (and the echo consumer when it runs).
    pub bench: f64,
    /// Not CPU: KiB of write-ahead log PostgreSQL wrote per 1,000 commands (the
    /// whole server's WAL, so it counts only on an otherwise idle server).
    pub wal_kib: Option<f64>,
}

/// Processes whose CPU time a round accounts for.
pub struct Meters {
    pub broker: Vec<u32>,
    pub db_url: String,
}

pub struct Reading {
    workers: f64,
    broker: f64,
    postgres: f64,
    postgres_pids: Vec<u32>,
    bench: f64,
    wal: Option<f64>,
}

impl Meters {
    pub async fn read(
        &self,
        workers: &[WorkerProcess],
        postgres_pids: Option<Vec<u32>>,
    ) -> Reading {
        let postgres_pids = match postgres_pids {
            Some(p) => p,
            None => setup::database_backends(&self.db_url).await,
        };
        Reading {
            workers: cpu_of(workers),
            broker: setup::cpu_secs_of(&self.broker),
            postgres: setup::cpu_secs_of(&postgres_pids),
            postgres_pids,
            bench: setup::cpu_secs(std::process::id()).unwrap_or(f64::NAN),
            wal: setup::wal_position(&self.db_url).await,
        }
    }

    /// CPU used between `before` and now, per 1,000 of `n` commands.
    pub async fn since(
        &self,
        before: Reading,
        workers: &[WorkerProcess],
        n: u64,
    ) -> (f64, CpuSplit) {
        // Connections the pool opened during the round count from their start.
        let mut pids = before.postgres_pids.clone();
        for p in setup::database_backends(&self.db_url).await {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        let after = self.read(workers, Some(pids)).await;
        let per_1k = |d: f64| d * 1000.0 / n as f64;
        (
            per_1k(after.workers - before.workers),
            CpuSplit {
                broker: (!self.broker.is_empty()).then(|| per_1k(after.broker - before.broker)),
                postgres: (!after.postgres_pids.is_empty())
                    .then(|| per_1k(after.postgres - before.postgres)),
                bench: per_1k(after.bench - before.bench),
                wal_kib: after
                    .wal
                    .zip(before.wal)
                    .map(|(a, b)| per_1k(a - b) / 1024.0),
            },
        )
    }
}

fn cpu_of(workers: &[WorkerProcess]) -> f64 {
    workers
        .iter()
        .map(|w| setup::cpu_secs(w.pid).unwrap_or(f64::NAN))
        .sum()
}
