//! The lanes benchmark (`--import N`, issue 32): an interactive caller sends
//! create-ticket one at a time and waits for each reply, first alone, then
//! while an importer publishes N fire-and-forget commands as fast as the
//! broker takes them, into the interactive lane (one queue for everything, as
//! before the bulk lane) or the bulk lane, alternated in one run. Reported per
//! import: the caller's latency idle and during the import, the import's
//! drain rate, the deepest backlog seen, and every party's CPU and run-queue
//! delay per 1,000 imported commands. With `--steady-rate`, an open-loop
//! interactive load runs through the import as well, and the report says what
//! share of the work the bulk lane got.

use crate::args::ImportLane;
use crate::error::{BenchError, Result};
use crate::meter::{CpuSplit, Meters};
use crate::prepared::Setup;
use crate::setup::{self, WorkerProcess};
use crate::stats::{median, Latency, Recorder};
use crate::BENCH_TOKEN;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use profile_worker::broker::{self, properties};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One import and what the interactive caller saw around it.
#[derive(Debug, Clone, Serialize)]
pub struct MixRow {
    pub round: u64,
    pub lane: ImportLane,
    pub import: u64,
    /// The caller alone, before the import.
    pub idle: Latency,
    pub idle_calls: u64,
    /// The caller while the import was published and processed.
    pub during: Latency,
    pub during_calls: u64,
    /// Of those, the calls while the importer was still publishing (the
    /// broker taking in the import as fast as it can), and after (the worker
    /// draining the backlog: what the lanes decide).
    pub publishing: Latency,
    pub draining: Latency,
    pub draining_calls: u64,
    /// Imported commands processed per second, from the first publish until
    /// the last was answered.
    pub drain_rate: f64,
    pub drain_secs: f64,
    /// How fast the importer's publishes were confirmed.
    pub publish_rate: f64,
    /// The deepest each queue got, as the broker reported it.
    pub max_depth_interactive: u32,
    pub max_depth_bulk: u32,
    /// `--steady-rate`: the open-loop interactive commands sent during the
    /// import, and the bulk lane's share of what the worker processed then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_share: Option<f64>,
    /// Per 1,000 imported commands: every party's CPU and run-queue delay.
    pub cpu_secs_per_1k: f64,
    pub cpu_per_1k: CpuSplit,
}

impl MixRow {
    /// CPU seconds of every party on this machine per 1,000 imported commands.
    pub fn all_parties(&self) -> f64 {
        let c = &self.cpu_per_1k;
        self.cpu_secs_per_1k
            + c.postgres.unwrap_or(0.0)
            + c.broker.unwrap_or(0.0)
            + c.bench
            + c.drain.unwrap_or(0.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MixReport {
    pub import: u64,
    pub idle_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady_rate: Option<f64>,
    pub prefetch: u16,
    pub bulk_prefetch: u16,
    pub consumers: u16,
    pub batch_size: u16,
    pub rows: Vec<MixRow>,
    pub problems: Vec<String>,
}

/// The interactive caller's answers: when each call was sent, how long it
/// took, and whether it got its 200.
struct Calls {
    sent: Vec<(Instant, Duration)>,
    wrong: Vec<String>,
}

/// Calls create-ticket one at a time until `stop`, on a connection of its own,
/// counting each call in `made` as it is sent.
async fn serial_caller(
    amqp_url: String,
    exchange: String,
    profiles: Vec<String>,
    (stop, made): (Arc<AtomicBool>, Arc<AtomicU64>),
) -> Result<Calls> {
    let conn = connect(&amqp_url).await?;
    let (channel, mut replies) = profile_worker::client::reply_channel(&conn)
        .await
        .map_err(|e| BenchError::broker("the caller's channel", e))?;
    let mut calls = Calls {
        sent: Vec::new(),
        wrong: Vec::new(),
    };
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "accessTokenId": BENCH_TOKEN,
            "profileId": profiles[n % profiles.len()],
        })
        .to_string();
        n += 1;
        let props = profile_worker::client::command_properties("create-ticket", &id, &id);
        let sent = Instant::now();
        made.fetch_add(1, Ordering::Relaxed);
        channel
            .basic_publish(
                exchange.as_str().into(),
                "create-ticket".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .map_err(|e| BenchError::broker("the caller's publish", e))?;
        let reply = loop {
            let next = tokio::time::timeout(Duration::from_secs(60), replies.next())
                .await
                .map_err(|_| BenchError::Process("the caller got no reply for 60 s".into()))?;
            let Some(Ok(d)) = next else {
                return Err(BenchError::Process("the caller's replies ended".into()));
            };
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                break d;
            }
        };
        calls.sent.push((sent, sent.elapsed()));
        let status = properties::reply_status(&reply.properties);
        if status != 200 && calls.wrong.len() < 5 {
            calls.wrong.push(format!(
                "interactive call answered {status}: {}",
                String::from_utf8_lossy(&reply.data)
            ));
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(calls)
}

/// Publishes `n` fire-and-forget create-tickets to `exchange` at `rate` per
/// second (as fast as confirmed when `None`), confirms pipelined, counting
/// each in `made` as it is sent; returns how many it sent and when the last
/// confirm came. Stops early at `stop`.
async fn publisher(
    amqp_url: String,
    exchange: String,
    profiles: Vec<String>,
    (n, rate): (u64, Option<f64>),
    (stop, made): (Arc<AtomicBool>, Arc<AtomicU64>),
) -> Result<(u64, Instant)> {
    const WINDOW: usize = 2_000;
    let conn = connect(&amqp_url).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BenchError::broker("the importer's channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| BenchError::broker("the importer's channel", e))?;
    let start = Instant::now();
    let mut confirms = std::collections::VecDeque::new();
    let mut sent = 0u64;
    while sent < n && !stop.load(Ordering::Relaxed) {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(sent as f64 / r);
            tokio::time::sleep_until(due.into()).await;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "accessTokenId": BENCH_TOKEN,
            "profileId": profiles[sent as usize % profiles.len()],
        })
        .to_string();
        let props = profile_worker::client::command_properties("create-ticket", &id, &id)
            .with_reply_to("".into());
        confirms.push_back(
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "create-ticket".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .map_err(|e| BenchError::broker("the importer's publish", e))?,
        );
        sent += 1;
        made.fetch_add(1, Ordering::Relaxed);
        while confirms.len() >= WINDOW {
            confirmed(confirms.pop_front())?.await?;
        }
    }
    while let Some(c) = confirms.pop_front() {
        confirmed(Some(c))?.await?;
    }
    let done = Instant::now();
    let _ = conn.close(200, "bye".into()).await;
    Ok((sent, done))
}

/// Awaits one publisher confirm: a nack (a bounded queue full) is an error.
fn confirmed(
    c: Option<lapin::PublisherConfirm>,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    let c = c.ok_or_else(|| BenchError::Process("no confirm to await".into()))?;
    Ok(async move {
        let conf = c
            .await
            .map_err(|e| BenchError::broker("the importer's confirm", e))?;
        if conf.is_nack() {
            return Err(BenchError::Process(
                "the broker refused an imported command (its queue is full)".into(),
            ));
        }
        Ok(())
    })
}

async fn connect(url: &str) -> Result<broker::Connection> {
    lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| BenchError::broker("AMQP_URL", e))
}

/// Commands answered so far by every worker, by lane: (interactive, bulk).
async fn answered(addrs: &[String]) -> (f64, f64) {
    let (mut interactive, mut bulk) = (0.0, 0.0);
    for a in addrs {
        for (key, v) in setup::metric_samples(a, "profile_worker_commands_total{").await {
            if key.contains("lane=\"bulk\"") {
                bulk += v;
            } else {
                interactive += v;
            }
        }
    }
    (interactive, bulk)
}

/// Both queues' depths, now.
async fn depths(channel: &lapin::Channel, s: &Setup) -> (u32, u32) {
    let mut out = [0u32; 2];
    for (i, q) in [&s.names.command_queue, &s.names.bulk_queue]
        .into_iter()
        .enumerate()
    {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if let Ok(q) = channel
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
        {
            out[i] = q.message_count();
        }
    }
    (out[0], out[1])
}

fn latency_of(calls: &[(Instant, Duration)], from: Instant, until: Instant) -> (Latency, u64) {
    let mut r = Recorder::default();
    let mut n = 0;
    for &(sent, took) in calls {
        if sent >= from && sent < until {
            r.record(took);
            n += 1;
        }
    }
    (r.latency(), n)
}

/// The lanes benchmark, in the run's own database and vhost, the workers started.
pub(crate) async fn measure(
    args: &crate::BenchArgs,
    s: &Setup,
    workers: &[WorkerProcess],
    meters: &Meters,
) -> Result<MixReport> {
    let addrs: Vec<String> = workers
        .iter()
        .filter_map(|w| setup::http_addr_in_log(&w.log))
        .collect();
    if addrs.is_empty() {
        return Err(BenchError::Process(
            "the workers serve no /metrics: the lanes benchmark counts their answers there".into(),
        ));
    }
    let conn = connect(&s.amqp_url).await?;
    let poll = conn
        .create_channel()
        .await
        .map_err(|e| BenchError::broker("the depth poll's channel", e))?;
    // The caller and the importer name different profiles (tenants' callers).
    let half = s.plan.profile_ids.len().div_ceil(2);
    let caller_profiles = s.plan.profile_ids[..half].to_vec();
    let import_profiles = s.plan.profile_ids[half..].to_vec();
    let import_profiles = if import_profiles.is_empty() {
        caller_profiles.clone()
    } else {
        import_profiles
    };
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for round in 1..=args.rounds {
        for &lane in &args.import_lanes {
            let exchange = match lane {
                ImportLane::Interactive => s.names.command_exchange.clone(),
                ImportLane::Bulk => s.names.bulk_exchange.clone(),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let calls_made = Arc::new(AtomicU64::new(0));
            let caller = tokio::spawn(serial_caller(
                s.amqp_url.clone(),
                s.names.command_exchange.clone(),
                caller_profiles.clone(),
                (stop.clone(), calls_made.clone()),
            ));
            let idle_from = Instant::now();
            tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
            let before = answered(&addrs).await;
            let calls_before = calls_made.load(Ordering::Relaxed);
            let reading = meters.read(workers, None).await;
            let import_from = Instant::now();
            let import = tokio::spawn(publisher(
                s.amqp_url.clone(),
                exchange,
                import_profiles.clone(),
                (args.import, None),
                Default::default(),
            ));
            let steady_stop = Arc::new(AtomicBool::new(false));
            let steady_made = Arc::new(AtomicU64::new(0));
            let steady = args.steady_rate.map(|rate| {
                tokio::spawn(publisher(
                    s.amqp_url.clone(),
                    s.names.command_exchange.clone(),
                    caller_profiles.clone(),
                    (u64::MAX, Some(rate)),
                    (steady_stop.clone(), steady_made.clone()),
                ))
            });
            // In one lane, the caller's and the steady load's commands answered
            // are told from the import's by how many of them were sent; those
            // still in flight (the caller's one, the steady load's last 100 ms)
            // are allowed for.
            let in_flight = 1.0 + args.steady_rate.unwrap_or(0.0) * 0.1;
            // Until every imported command is answered (the caller's and the
            // steady load's are counted apart by lane, or by what was sent).
            let (mut max_i, mut max_b) = (0u32, 0u32);
            let mut last_progress = (Instant::now(), 0.0);
            let (drained_at, share) = loop {
                let (d_i, d_b) = depths(&poll, s).await;
                max_i = max_i.max(d_i);
                max_b = max_b.max(d_b);
                let now = answered(&addrs).await;
                let (di, db) = (now.0 - before.0, now.1 - before.1);
                let imported = match lane {
                    ImportLane::Bulk => db,
                    ImportLane::Interactive => {
                        let others = (calls_made.load(Ordering::Relaxed) - calls_before
                            + steady_made.load(Ordering::Relaxed))
                            as f64;
                        if import.is_finished()
                            && d_i == 0
                            && di + in_flight >= args.import as f64 + others
                        {
                            args.import as f64
                        } else {
                            (di - others).min(args.import as f64 - 1.0)
                        }
                    }
                };
                if imported >= args.import as f64 {
                    let share = (lane == ImportLane::Bulk && args.steady_rate.is_some())
                        .then(|| db / (di + db).max(1.0));
                    break (Instant::now(), share);
                }
                if imported > last_progress.1 {
                    last_progress = (Instant::now(), imported);
                } else if last_progress.0.elapsed() > Duration::from_secs(args.stall_secs) {
                    return Err(BenchError::Process(format!(
                        "the import stalled: {imported} of {} answered",
                        args.import
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            steady_stop.store(true, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
            let (sent, published_at) = import
                .await
                .map_err(|e| BenchError::Process(e.to_string()))??;
            let steady_sent = match steady {
                Some(h) => Some(h.await.map_err(|e| BenchError::Process(e.to_string()))??.0),
                None => None,
            };
            let (cpu_secs_per_1k, cpu_per_1k) = meters.since(reading, workers, sent).await;
            let calls = caller
                .await
                .map_err(|e| BenchError::Process(e.to_string()))??;
            problems.extend(calls.wrong.iter().cloned());
            let (idle, idle_calls) = latency_of(&calls.sent, idle_from, import_from);
            let (during, during_calls) = latency_of(&calls.sent, import_from, drained_at);
            let (publishing, _) = latency_of(&calls.sent, import_from, published_at);
            let (draining, draining_calls) = latency_of(&calls.sent, published_at, drained_at);
            let drain_secs = drained_at.duration_since(import_from).as_secs_f64();
            let row = MixRow {
                round,
                lane,
                import: sent,
                idle,
                idle_calls,
                during,
                during_calls,
                publishing,
                draining,
                draining_calls,
                drain_rate: sent as f64 / drain_secs,
                drain_secs,
                publish_rate: sent as f64 / published_at.duration_since(import_from).as_secs_f64(),
                max_depth_interactive: max_i,
                max_depth_bulk: max_b,
                steady_sent,
                bulk_share: share,
                cpu_secs_per_1k,
                cpu_per_1k,
            };
            print_row(&row);
            rows.push(row);
            // The rows the import and the steady load left are not read
            // again; the next import names other profiles' tickets anew.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(MixReport {
        import: args.import,
        idle_secs: args.idle_secs,
        steady_rate: args.steady_rate,
        prefetch: args.prefetch,
        bulk_prefetch: args.bulk_prefetch,
        consumers: args.consumers,
        batch_size: args.batch_size,
        rows,
        problems,
    })
}

fn print_row(r: &MixRow) {
    eprintln!(
        "round {} import {:>7} into {:<11}: interactive idle p50 {:.2} p99 {:.2} max {:.1} ms ({} calls); during p50 {:.2} p99 {:.2} max {:.1} ms ({} calls; publishing p50 {:.2} p99 {:.2}, draining p50 {:.2} p99 {:.2} in {} calls); drained {:.0}/s in {:.1} s, published {:.0}/s; depth max {}/{}{}; CPU s per 1,000: all {:.3} (worker {:.3}, postgres {:.3}, broker {:.3}, bench {:.3}); run queue {:.3}",
        r.round,
        r.import,
        format!("{:?}", r.lane).to_lowercase(),
        r.idle.p50_ms,
        r.idle.p99_ms,
        r.idle.max_ms,
        r.idle_calls,
        r.during.p50_ms,
        r.during.p99_ms,
        r.during.max_ms,
        r.during_calls,
        r.publishing.p50_ms,
        r.publishing.p99_ms,
        r.draining.p50_ms,
        r.draining.p99_ms,
        r.draining_calls,
        r.drain_rate,
        r.drain_secs,
        r.publish_rate,
        r.max_depth_interactive,
        r.max_depth_bulk,
        r.bulk_share
            .map(|s| format!("; bulk share {:.1} %", s * 100.0))
            .unwrap_or_default(),
        r.all_parties(),
        r.cpu_secs_per_1k,
        r.cpu_per_1k.postgres.unwrap_or(f64::NAN),
        r.cpu_per_1k.broker.unwrap_or(f64::NAN),
        r.cpu_per_1k.bench,
        r.cpu_per_1k.run_queue.total(),
    );
}

/// The report's table: medians per lane.
pub fn print(r: &MixReport) {
    println!(
        "\nlanes: import of {} create-ticket, {} s of an interactive caller alone before each{}",
        r.import,
        r.idle_secs,
        r.steady_rate
            .map(|s| format!(", a steady interactive load of {s}/s through each import"))
            .unwrap_or_default()
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "import into",
        "idle p50",
        "idle p99",
        "p50",
        "p99",
        "max",
        "drain/s",
        "depth",
        "CPU/1k",
        "bulk %"
    );
    for lane in [ImportLane::Interactive, ImportLane::Bulk] {
        let rows: Vec<&MixRow> = r.rows.iter().filter(|x| x.lane == lane).collect();
        if rows.is_empty() {
            continue;
        }
        let m = |f: &dyn Fn(&MixRow) -> f64| median(&rows.iter().map(|x| f(x)).collect::<Vec<_>>());
        println!(
            "{:<12} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>9.0} {:>9.0} {:>9.3} {:>9}",
            format!("{lane:?}").to_lowercase(),
            m(&|x| x.idle.p50_ms),
            m(&|x| x.idle.p99_ms),
            m(&|x| x.during.p50_ms),
            m(&|x| x.during.p99_ms),
            rows.iter().map(|x| x.during.max_ms).fold(0.0, f64::max),
            m(&|x| x.drain_rate),
            m(&|x| f64::from(x.max_depth_interactive.max(x.max_depth_bulk))),
            m(&|x| x.all_parties()),
            rows[0]
                .bulk_share
                .map(|_| format!("{:.1}", m(&|x| x.bulk_share.unwrap_or(f64::NAN)) * 100.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_counts_the_calls_sent_in_the_window_only() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let calls = vec![
            (at(0), Duration::from_millis(2)),
            (at(10), Duration::from_millis(4)),
            (at(20), Duration::from_millis(100)),
            (at(30), Duration::from_millis(8)),
        ];
        let (l, n) = latency_of(&calls, at(10), at(30));
        assert_eq!(n, 2);
        assert!((l.p50_ms - 4.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.5, "{l:?}");
    }
}
