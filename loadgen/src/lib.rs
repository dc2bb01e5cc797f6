//! `profile-worker-bench`: an honest load generator for profile-worker. It seeds its own database
//! and vhost, starts real worker processes, publishes real commands through the
//! broker with confirms, checks every reply and the rows and events left behind,
//! and reports rate, latency, CPU per 1,000 commands and peak RSS. With
//! `--ceiling` it alternates rounds with an echo consumer that does no database
//! work, and reports the worker's rate as a share of that. `--ceiling-events`
//! adds a third target, an echo that also publishes the contract's events, so one
//! run tells how much of the distance is the broker's work for those events and
//! how much the database's and the worker's.

mod ceiling;
mod load;
mod plan;
mod setup;
pub mod stats;

pub use plan::Mix;

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use load::{RoundResult, Target};
use plan::{Expected, Plan};
use profile_worker::broker::{self, command_queue_arguments};
use profile_worker::config::{
    BrokerAddress, BrokerSettings, DatabaseSettings, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL,
};
use profile_worker::store::{SeedFile, Store};
use serde::Serialize;
use setup::WorkerProcess;
use stats::{median, paired_ratio};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Publishes real commands to real `profile-worker run` processes through the
/// broker, checks every reply, row and event, and reports speed (BENCHMARKS.md).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "profile-worker-bench", version, about)]
pub struct BenchArgs {
    /// Commands per measured round.
    #[arg(long, short = 'n', default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub commands: u64,
    /// Most commands in flight (published and not yet answered). With --rate or
    /// --load-percent it only caps what is outstanding.
    #[arg(long, short = 'w', default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub in_flight: u64,
    /// Open loop: send the measured rounds on a fixed schedule of this many
    /// commands per second, latency counted from when each command was due.
    #[arg(long, conflicts_with = "load_percent")]
    pub rate: Option<f64>,
    /// After the closed-loop rounds, which measure the worker's maximum rate,
    /// open-loop rounds at these percentages of it (e.g. 10,25,50,75,90), every
    /// target alternated at each load: a latency-against-load curve.
    #[arg(long, value_delimiter = ',')]
    pub load_percent: Vec<f64>,
    /// How long each open-loop round of --load-percent lasts, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub open_loop_secs: f64,
    /// Which commands to send.
    #[arg(long, value_enum, default_value_t = Mix::Both)]
    pub mix: Mix,
    /// Share of commands that must be refused (400, 403 and 404 in turn), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_share: f64,
    /// Also measure the no-database echo consumer, alternating rounds with the worker.
    #[arg(long)]
    pub ceiling: bool,
    /// Also measure a second echo consumer that publishes, with each reply, the
    /// events the contract requires for the command's type (as if every command
    /// were valid), so it asks of the broker what the worker's answers ask of it.
    /// Its rounds alternate with the other two; the report gives the worker's rate
    /// against both ceilings, and this ceiling's against the plain one: the most a
    /// worker whose database and own work cost nothing could reach. Implies --ceiling.
    #[arg(long)]
    pub ceiling_events: bool,
    /// Measured rounds per target.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Commands sent to each target before measuring (checked, not reported).
    #[arg(long, default_value_t = 1_000)]
    pub warmup: u64,
    /// Worker processes consuming the same queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub workers: u64,
    /// The workers' EMAIL_COOLDOWN_SECS. Commands cycle through the profiles, so
    /// with a cooldown most verification commands would be answered 429, which
    /// costs less than making a token: 0 (the default) measures full work.
    #[arg(long, default_value_t = 0)]
    pub email_cooldown_secs: u64,
    /// Profiles seeded; commands cycle through them.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub profiles: u64,
    /// Prefetch of the worker and of the echo consumer.
    #[arg(long, env = "PREFETCH", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Consumers per worker process, and of the echo consumer.
    #[arg(long, env = "CONSUMERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub consumers: u16,
    /// Most commands per batch, for the worker and the echo consumer.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 250, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Append the results as one JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up when no reply arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub stall_secs: u64,
    /// Keep the database, vhost and worker logs afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Worker executable (default: `profile-worker` beside this program).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Declare the command and dead-letter queues without length bounds, as
    /// workers before them did, to compare against such a build (`--worker-bin`).
    #[arg(long)]
    pub unbounded_queues: bool,
    /// PostgreSQL URL the run's own database is created through (and dropped afterwards).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true, hide_default_value = true)]
    pub database_url: String,
    /// AMQP URL of the broker; the run creates its own vhost there.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
}

const BENCH_TENANT: &str = "bench";
/// The events ceiling's rounds, in the report.
const EVENTS_CEILING: &str = "ceiling-events";
const BENCH_TOKEN: &str = "bench-admin-token";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Figures of one target over the measured rounds (medians across rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
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

/// A worker round's batches, from `profile_worker_batch_*` before and after it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    pub batches: f64,
    pub mean_batch_size: f64,
    /// Mean milliseconds per batch in each stage.
    pub mean_ms: std::collections::BTreeMap<String, f64>,
}

const STAGES: [&str; 8] = [
    "decode", "load", "plan", "commit", "database", "publish", "ack", "total",
];

async fn batch_samples_of(addrs: &[String]) -> std::collections::HashMap<String, f64> {
    let mut all = std::collections::HashMap::new();
    for a in addrs {
        for (k, v) in setup::batch_samples(a).await {
            *all.entry(k).or_insert(0.0) += v;
        }
    }
    all
}

fn stages_between(
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
struct Meters {
    broker: Vec<u32>,
    db_url: String,
}

struct Reading {
    workers: f64,
    broker: f64,
    postgres: f64,
    postgres_pids: Vec<u32>,
    bench: f64,
    wal: Option<f64>,
}

impl Meters {
    async fn read(&self, workers: &[WorkerProcess], postgres_pids: Option<Vec<u32>>) -> Reading {
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
    async fn since(&self, before: Reading, workers: &[WorkerProcess], n: u64) -> (f64, CpuSplit) {
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

/// What the run left behind, against what it must have.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    pub expected: Expected,
    pub tickets: u64,
    pub verification_tokens: u64,
    pub email_requested: u64,
    /// `email.requested` events the echo consumer published (`--ceiling-events`).
    pub ceiling_email_requested: u64,
    pub dead_letters: u64,
    pub problems: Vec<String>,
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
    pub checks: Checks,
    pub unix_time: u64,
}

impl Report {
    pub fn is_correct(&self) -> bool {
        self.checks.problems.is_empty()
    }
}

/// Runs the benchmark, prints the report, appends it to `--json`; fails when any
/// reply, row, event or dead letter is not what the commands must produce.
pub async fn run(mut args: BenchArgs) -> Result<Report, String> {
    args.ceiling |= args.ceiling_events;
    if !(0.0..=1.0).contains(&args.invalid_share) {
        return Err("--invalid-share must be between 0 and 1".into());
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let db = format!("pw_bench_{id}");
    let vhost = format!("pw-bench-{id}");
    setup::create_database(&args.database_url, &db).await?;
    let isolation = match setup::create_vhost(&args.amqp_url, &vhost).await {
        Ok(()) => Isolation::Vhost(vhost),
        Err(e) => {
            eprintln!("bench: no vhost of its own ({e}); using the name prefix {vhost}. instead");
            Isolation::Prefix(format!("{vhost}."))
        }
    };
    // Interrupted, the run still removes what it made (the worker processes are
    // killed when their handles drop).
    let result = tokio::select! {
        r = run_isolated(&args, &db, &isolation) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
    };
    if args.keep {
        eprintln!("bench: kept database {db} and {}", isolation.describe());
    } else {
        let db_dropped = setup::drop_database(&args.database_url, &db).await;
        let broker_cleaned = isolation.remove(&args.amqp_url).await;
        for r in [db_dropped, broker_cleaned] {
            if let Err(e) = r {
                eprintln!("bench: cleanup: {e}");
            }
        }
    }
    let report = result?;
    print(&report);
    if let Some(path) = &args.json {
        use std::io::Write;
        let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if report.is_correct() {
        Ok(report)
    } else {
        Err(format!(
            "the worker answered or stored something wrong:\n  {}",
            report.checks.problems.join("\n  ")
        ))
    }
}

enum Isolation {
    Vhost(String),
    Prefix(String),
}

impl Isolation {
    fn describe(&self) -> String {
        match self {
            Isolation::Vhost(v) => format!("vhost {v}"),
            Isolation::Prefix(p) => format!("broker objects named {p}*"),
        }
    }

    fn amqp_url(&self, base: &str) -> Result<String, String> {
        match self {
            Isolation::Vhost(v) => setup::with_vhost(base, v),
            Isolation::Prefix(_) => Ok(base.to_string()),
        }
    }

    fn prefix(&self) -> &str {
        match self {
            Isolation::Vhost(_) => "",
            Isolation::Prefix(p) => p,
        }
    }

    async fn remove(&self, amqp_url: &str) -> Result<(), String> {
        match self {
            Isolation::Vhost(v) => setup::delete_vhost(v).await,
            Isolation::Prefix(p) => remove_prefixed(amqp_url, p).await,
        }
    }
}

fn names(prefix: &str, amqp_url: &str, prefetch: u16) -> BrokerSettings {
    BrokerSettings {
        address: BrokerAddress {
            amqp_url: amqp_url.into(),
            amqp_ca_file: None,
        },
        command_exchange: format!("{prefix}profile.commands"),
        command_queue: format!("{prefix}profile.commands"),
        dead_letter_exchange: format!("{prefix}profile.commands.dlx"),
        dead_letter_queue: format!("{prefix}profile.commands.dead"),
        events_exchange: format!("{prefix}profile.events"),
        email_exchange: format!("{prefix}profile.email"),
        email_queue: format!("{prefix}profile.email.dispatch"),
        email_queue_max_length: 1_000_000,
        email_queue_max_bytes: 1 << 30,
        email_delivery_limit: 20,
        delivery_limit: 5,
        prefetch,
        heartbeat_secs: 10,
        reply_to_prefixes: vec!["amq.gen-".into()],
        command_queue_max_length: 1_000_000,
        command_queue_max_bytes: 1 << 30,
        dead_letter_queue_max_length: 100_000,
        dead_letter_queue_max_bytes: 256 << 20,
        dead_letter_delivery_limit: 1_000,
    }
}

fn ceiling_queue(prefix: &str) -> String {
    format!("{prefix}bench.ceiling")
}

fn events_ceiling_queue(prefix: &str) -> String {
    format!("{prefix}bench.events-ceiling")
}

fn ceiling_events_exchange(prefix: &str) -> String {
    format!("{prefix}bench.ceiling-events")
}

fn ceiling_email_queue(prefix: &str) -> String {
    format!("{prefix}bench.ceiling-email-dispatch")
}

async fn remove_prefixed(amqp_url: &str, prefix: &str) -> Result<(), String> {
    let n = names(prefix, amqp_url, 1);
    let uri = n.validate().map_err(|e| e.to_string())?;
    let conn = broker::connect(uri.first(), &Default::default())
        .await
        .map_err(|e| broker::describe(&e))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    for q in [
        n.command_queue.clone(),
        n.dead_letter_queue.clone(),
        n.email_queue.clone(),
        n.email_dead_letter_queue(),
        ceiling_queue(prefix),
        events_ceiling_queue(prefix),
        ceiling_email_queue(prefix),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for x in [
        n.command_exchange.clone(),
        broker::unrouted_exchange(&n),
        n.dead_letter_exchange.clone(),
        n.events_exchange.clone(),
        n.email_exchange.clone(),
        n.email_dead_letter_exchange(),
        ceiling_events_exchange(prefix),
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

fn seed_file(profiles: u64) -> SeedFile {
    let profiles: Vec<serde_json::Value> = (0..profiles)
        .map(|i| {
            serde_json::json!({
                "id": profile_id(i), "tenant": BENCH_TENANT, "username": format!("bench{i}"),
                "email": format!("bench{i}@example.com"), "enabled": true, "verified": true
            })
        })
        .collect();
    let doc = serde_json::json!({
        "tenants": [{ "name": BENCH_TENANT }],
        "accessTokens": [{ "id": BENCH_TOKEN, "application": "bench", "master": true,
            "tenantPermissions": [{ "tenant": BENCH_TENANT, "allowedActions": ["*"] }] }],
        "profiles": profiles,
    });
    SeedFile::parse(&doc.to_string()).expect("the generated seed file is valid")
}

/// 24 hex characters, like Crafter Profile's ObjectIds.
fn profile_id(i: u64) -> String {
    format!("be0c{i:020x}")
}

async fn run_isolated(args: &BenchArgs, db: &str, iso: &Isolation) -> Result<Report, String> {
    let db_url = setup::with_database(&args.database_url, db)?;
    let amqp_url = iso.amqp_url(&args.amqp_url)?;
    let prefix = iso.prefix().to_string();
    let mut broker_names = names(&prefix, &amqp_url, args.prefetch);
    if args.unbounded_queues {
        broker_names.command_queue_max_length = 0;
        broker_names.command_queue_max_bytes = 0;
        broker_names.dead_letter_queue_max_length = 0;
        broker_names.dead_letter_queue_max_bytes = 0;
    }
    let uri = broker_names.validate().map_err(|e| e.to_string())?;

    let store = Store::connect(&DatabaseSettings {
        database_url: db_url.as_str().into(),
        db_pool_size: 2,
        db_timeout_secs: 10,
        runtime_role: String::new(),
    })
    .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    store
        .seed(&seed_file(args.profiles))
        .await
        .map_err(|e| format!("seeding the bench database failed: {e}"))?;
    let plan = Plan {
        mix: args.mix,
        invalid_share: args.invalid_share,
        access_token_id: BENCH_TOKEN.into(),
        profile_ids: (0..args.profiles).map(profile_id).collect(),
    };

    // Workers: real processes, so their CPU time and memory are their own.
    let bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => {
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            me.with_file_name(format!("profile-worker{}", std::env::consts::EXE_SUFFIX))
        }
    };
    let env = vec![
        ("DATABASE_URL".to_string(), db_url.clone()),
        ("AMQP_URL".into(), amqp_url.clone()),
        (
            "COMMAND_EXCHANGE".into(),
            broker_names.command_exchange.clone(),
        ),
        ("COMMAND_QUEUE".into(), broker_names.command_queue.clone()),
        (
            "DEAD_LETTER_EXCHANGE".into(),
            broker_names.dead_letter_exchange.clone(),
        ),
        (
            "DEAD_LETTER_QUEUE".into(),
            broker_names.dead_letter_queue.clone(),
        ),
        (
            "EVENTS_EXCHANGE".into(),
            broker_names.events_exchange.clone(),
        ),
        ("EMAIL_EXCHANGE".into(), broker_names.email_exchange.clone()),
        ("EMAIL_QUEUE".into(), broker_names.email_queue.clone()),
        ("PREFETCH".into(), args.prefetch.to_string()),
        ("BATCH_SIZE".into(), args.batch_size.to_string()),
        ("CONSUMERS".into(), args.consumers.to_string()),
        (
            "EMAIL_COOLDOWN_SECS".into(),
            args.email_cooldown_secs.to_string(),
        ),
        (
            "COMMAND_QUEUE_MAX_LENGTH".into(),
            broker_names.command_queue_max_length.to_string(),
        ),
        (
            "COMMAND_QUEUE_MAX_BYTES".into(),
            broker_names.command_queue_max_bytes.to_string(),
        ),
        (
            "DEAD_LETTER_QUEUE_MAX_LENGTH".into(),
            broker_names.dead_letter_queue_max_length.to_string(),
        ),
        (
            "DEAD_LETTER_QUEUE_MAX_BYTES".into(),
            broker_names.dead_letter_queue_max_bytes.to_string(),
        ),
        // Metrics are recorded as in production; any free port, so workers of
        // one run (and a worker already running here) do not collide.
        ("HTTP_ADDR".into(), "127.0.0.1:0".into()),
        // JSON, so the bench can read where that is (and the stage timings there).
        ("LOG_FORMAT".into(), "json".into()),
    ];
    let mut workers: Vec<WorkerProcess> = Vec::new();
    for k in 0..args.workers {
        let log = std::env::temp_dir().join(format!("{db}-worker{k}.log"));
        workers.push(setup::spawn_worker(&bin, &env, log)?);
    }
    let conn = broker::connect(uri.first(), &Default::default())
        .await
        .map_err(|e| format!("AMQP_URL: {}", broker::describe(&e)))?;
    wait_for_consumers(&conn, &broker_names, &mut workers).await?;
    let metrics_addrs: Vec<String> = workers
        .iter()
        .filter_map(|w| setup::http_addr_in_log(&w.log))
        .collect();

    // The load channel: direct reply-to and publishes must share a channel.
    let (channel, replies) = profile_worker::client::reply_channel(&conn)
        .await
        .map_err(|e| e.to_string())?;
    // What the email dispatcher sees: the dispatch queue the workers declared
    // (quorum, durable, as in production), counted and purged after every round.
    let email_queue = broker_names.email_queue.clone();

    // The events ceiling's own exchange and email queue, shaped like the worker's.
    let ceiling_events = ceiling_events_exchange(&prefix);
    let ceiling_email_queue = ceiling_email_queue(&prefix);
    if args.ceiling_events {
        // Durable and topic, as the worker declares its events exchange.
        channel
            .exchange_declare(
                ceiling_events.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("{ceiling_events}: {}", broker::describe(&e)))?;
        declare_email_sink(
            &channel,
            &ceiling_events,
            &ceiling_email_queue,
            broker::email_queue_arguments(&broker_names),
        )
        .await?;
    }

    let stop_ceiling = CancellationToken::new();
    let ceiling_q = ceiling_queue(&prefix);
    let events_ceiling_q = events_ceiling_queue(&prefix);
    // The echo consumers: plain, and (with --ceiling-events) one publishing the
    // contract's events, each on its own queue shaped like the worker's.
    let mut echoes = Vec::new();
    for (wanted, queue, events_exchange) in [
        (args.ceiling, &ceiling_q, None),
        (
            args.ceiling_events,
            &events_ceiling_q,
            Some(ceiling_events.clone()),
        ),
    ] {
        if !wanted {
            continue;
        }
        let shape = ceiling::Shape {
            consumers: args.consumers,
            prefetch: args.prefetch,
            max_batch: args.batch_size as usize,
            events_exchange,
        };
        let arguments = command_queue_arguments(&broker_names);
        echoes.push(
            ceiling::start(uri.first(), queue, arguments, shape, stop_ceiling.clone()).await?,
        );
    }
    let worker_target = Target::Worker {
        exchange: &broker_names.command_exchange,
    };
    let ceiling_target = Target::Ceiling { queue: &ceiling_q };
    let events_ceiling_target = Target::Ceiling {
        queue: &events_ceiling_q,
    };
    let mut loader = load::Loader {
        channel: &channel,
        replies,
        plan: &plan,
        window: args.in_flight as usize,
        stall: Duration::from_secs(args.stall_secs.max(1)),
        rounds: 0,
    };
    let mut checks = Checks::default();
    let counter = Counter {
        channel: &channel,
        email_queue: &email_queue,
        dead_queue: &broker_names.dead_letter_queue,
    };

    let mut next_index = 0u64;
    if args.warmup > 0 {
        if args.ceiling {
            loader.round(&ceiling_target, 0, args.warmup, None).await?;
        }
        if args.ceiling_events {
            let r = loader
                .round(&events_ceiling_target, 0, args.warmup, None)
                .await?;
            counter
                .take(&ceiling_email_queue, r.expected.verification_tokens)
                .await?;
        }
        let r = loader.round(&worker_target, 0, args.warmup, None).await?;
        next_index += args.warmup;
        check_round(&r, &counter, &mut checks, "warm-up").await?;
    }
    let meters = Meters {
        broker: setup::pids_named("beam.smp"),
        db_url: db_url.clone(),
    };
    let mut rows = Vec::new();
    // The closed-loop rounds (open at --rate when given), then, with
    // --load-percent, open-loop rounds at those shares of the worker's
    // closed-loop rate, every target alternated at each load.
    let mut phases: Vec<(Option<f64>, Option<f64>, u64)> = vec![(None, args.rate, args.commands)];
    let mut phase = 0;
    while phase < phases.len() {
        let (load_percent, rate, n) = phases[phase];
        phase += 1;
        for k in 1..=args.rounds {
            for (wanted, target, name) in [
                (args.ceiling, &ceiling_target, "ceiling"),
                (args.ceiling_events, &events_ceiling_target, EVENTS_CEILING),
            ] {
                if !wanted {
                    continue;
                }
                let before = meters.read(&workers, None).await;
                let r = loader.round(target, 0, n, rate).await?;
                let (_, split) = meters.since(before, &workers, n).await;
                if name == EVENTS_CEILING {
                    let want = r.expected.verification_tokens;
                    let emails = counter.take(&ceiling_email_queue, want).await?;
                    checks.ceiling_email_requested += emails;
                    if emails < want {
                        checks.problems.push(format!(
                            "events ceiling round {k}: {emails} email.requested events for {want} verification tokens"
                        ));
                    }
                }
                rows.push(RoundRow {
                    round: k,
                    target: name,
                    load_percent,
                    result: r,
                    cpu_secs_per_1k: None,
                    cpu_per_1k: split,
                    stages: None,
                });
            }
            let before = meters.read(&workers, None).await;
            let samples = batch_samples_of(&metrics_addrs).await;
            let r = loader.round(&worker_target, next_index, n, rate).await?;
            let (worker_cpu, split) = meters.since(before, &workers, n).await;
            let stages = stages_between(&samples, &batch_samples_of(&metrics_addrs).await);
            next_index += n;
            check_round(&r, &counter, &mut checks, &format!("round {k}")).await?;
            rows.push(RoundRow {
                round: k,
                target: "worker",
                load_percent,
                cpu_secs_per_1k: Some(worker_cpu),
                cpu_per_1k: split,
                result: r,
                stages,
            });
        }
        if phase == 1 && !args.load_percent.is_empty() {
            let worker_rates: Vec<f64> = rows
                .iter()
                .filter(|r| r.target == "worker")
                .map(|r| r.result.rate)
                .collect();
            let max = median(&worker_rates);
            for &pct in &args.load_percent {
                let rate = max * pct / 100.0;
                let n = ((rate * args.open_loop_secs).round() as u64).max(1);
                phases.push((Some(pct), Some(rate), n));
            }
        }
    }
    let peak_rss: Vec<u64> = workers
        .iter()
        .map(|w| setup::peak_rss_kib(w.pid).unwrap_or(0))
        .collect();

    stop_ceiling.cancel();
    for t in echoes {
        if let Ok(Err(e)) = t.await {
            checks.problems.push(format!("ceiling consumer: {e}"));
        }
    }
    for w in workers {
        let log = w.log.clone();
        match w.stop().await {
            Ok(()) if !args.keep => {
                let _ = std::fs::remove_file(&log);
            }
            Ok(()) => {}
            Err(e) => checks
                .problems
                .push(format!("{e} (log: {})", log.display())),
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    check_rows(&db_url, &mut checks).await?;
    store.close();

    // Rates and their ratios mean something only for closed-loop rounds; with
    // --rate every round is open, and the summary is of those.
    let closed = |r: &&RoundRow| r.load_percent.is_none();
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
            p50_ms: m(&|r| r.result.latency.p50_ms),
            p99_ms: m(&|r| r.result.latency.p99_ms),
            p999_ms: m(&|r| r.result.latency.p999_ms),
            max_ms: rs
                .iter()
                .map(|r| r.result.latency.max_ms)
                .fold(0.0, f64::max),
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
    let ratio = (args.ceiling && !open).then(|| paired_ratio(&rates("worker"), &rates("ceiling")));
    let ratio_to_events_ceiling = (args.ceiling_events && !open)
        .then(|| paired_ratio(&rates("worker"), &rates(EVENTS_CEILING)));
    let events_bound = (args.ceiling_events && !open)
        .then(|| paired_ratio(&rates(EVENTS_CEILING), &rates("ceiling")));
    Ok(Report {
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
        rounds: rows,
        worker_peak_rss_kib: peak_rss,
        checks,
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

fn cpu_of(workers: &[WorkerProcess]) -> f64 {
    workers
        .iter()
        .map(|w| setup::cpu_secs(w.pid).unwrap_or(f64::NAN))
        .sum()
}

async fn wait_for_consumers(
    conn: &broker::Connection,
    names: &BrokerSettings,
    workers: &mut [WorkerProcess],
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for w in workers.iter_mut() {
            if let Ok(Some(status)) = w.child.try_wait() {
                let tail = std::fs::read_to_string(&w.log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(format!(
                    "worker {} exited with {status} before consuming:\n  {}",
                    w.pid,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                ));
            }
        }
        // Declared exactly as the worker declares it, so there is no error (and no
        // closed channel) while the worker has not declared it yet.
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let q = ch
            .queue_declare(
                names.command_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                command_queue_arguments(names),
            )
            .await
            .map_err(|e| format!("{}: {}", names.command_queue, broker::describe(&e)))?;
        let _ = ch.close(200, "ok".into()).await;
        if q.consumer_count() as usize >= workers.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the workers were not consuming {} within {} s",
                names.command_queue,
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events echo's stand-in for the dispatch queue: durable and quorum like
/// the worker's, bound to `email.requested` on `exchange`, so the echo pays the
/// broker what the worker's email requests cost.
async fn declare_email_sink(
    channel: &lapin::Channel,
    exchange: &str,
    queue: &str,
    arguments: FieldTable,
) -> Result<(), String> {
    let fail = |e: lapin::Error| format!("{queue}: {}", broker::describe(&e));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map_err(fail)?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "email.requested".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail)
}

struct Counter<'a> {
    channel: &'a lapin::Channel,
    email_queue: &'a str,
    dead_queue: &'a str,
}

impl Counter<'_> {
    async fn depth(&self, queue: &str) -> Result<u64, String> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("{queue}: {e}"))?;
        Ok(q.message_count() as u64)
    }

    /// Waits until `queue` holds at least `want` messages (or the settle time
    /// runs out), then empties it and returns how many it held.
    async fn take(&self, queue: &str, want: u64) -> Result<u64, String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while self.depth(queue).await? < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map(u64::from)
            .map_err(|e| format!("{queue}: {e}"))
    }
}

/// After a round: every reply right, every email event and dead letter there.
async fn check_round(
    r: &RoundResult,
    counter: &Counter<'_>,
    checks: &mut Checks,
    name: &str,
) -> Result<(), String> {
    let e = r.expected;
    checks.expected.tickets += e.tickets;
    checks.expected.verification_tokens += e.verification_tokens;
    checks.expected.dead_letters += e.dead_letters;
    if r.wrong > 0 {
        checks.problems.push(format!(
            "{name}: {} wrong replies, e.g. {}",
            r.wrong,
            r.wrong_examples.join("; ")
        ));
    }
    let emails = counter
        .take(counter.email_queue, e.verification_tokens)
        .await?;
    let dead = counter.take(counter.dead_queue, e.dead_letters).await?;
    checks.email_requested += emails;
    checks.dead_letters += dead;
    if emails < e.verification_tokens {
        checks.problems.push(format!(
            "{name}: {emails} email.requested events for {} verification tokens",
            e.verification_tokens
        ));
    }
    if dead != e.dead_letters {
        checks.problems.push(format!(
            "{name}: {dead} dead letters, expected {}",
            e.dead_letters
        ));
    }
    Ok(())
}

/// At the end: exactly one row per valid command, no more, no fewer.
async fn check_rows(db_url: &str, checks: &mut Checks) -> Result<(), String> {
    (checks.tickets, checks.verification_tokens) = setup::row_counts(db_url).await?;
    if checks.tickets != checks.expected.tickets {
        checks.problems.push(format!(
            "{} tickets stored for {} valid create-ticket commands",
            checks.tickets, checks.expected.tickets
        ));
    }
    if checks.verification_tokens != checks.expected.verification_tokens {
        checks.problems.push(format!(
            "{} verification tokens stored for {} valid create-verification-token commands",
            checks.verification_tokens, checks.expected.verification_tokens
        ));
    }
    Ok(())
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

fn print(r: &Report) {
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
    let opt = |c: Option<f64>| c.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into());
    for row in &r.rounds {
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
    let w = &r.worker;
    println!(
        "worker  (median of rounds): {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} CPU s per 1k, peak RSS {} MiB",
        w.rate,
        w.p50_ms,
        w.p99_ms,
        w.max_ms,
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
            c.rate, c.p50_ms, c.p99_ms, c.max_ms
        );
        println!("worker ÷ {name} (median of paired rounds): {ratio:.3}");
    }
    // The latency-against-load curve: medians of each target's rounds at each load.
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
    print_stages(r, None);
    if let Some(bound) = r.events_bound {
        println!(
            "ceiling with events ÷ ceiling (median of paired rounds): {bound:.3}, the most a worker answering with the contract's events could reach here"
        );
    }
    let c = &r.checks;
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
