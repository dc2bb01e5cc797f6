//! A run's prepared world: its database (migrated and seeded), broker names,
//! workers, echo consumers and drain, shared by the bench and the mix.

use crate::args::BenchArgs;
use crate::ceiling;
use crate::error::{BenchError, Result};
use crate::isolation::{
    audit_queue, ceiling_audit_queue, ceiling_email_queue, ceiling_events_exchange, ceiling_queue,
    events_ceiling_queue, names, Isolation,
};
use crate::plan::Plan;
use crate::setup::{self, Party, WorkerProcess};
use crate::{BENCH_TENANT, BENCH_TOKEN};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use profile_worker::broker::{self, command_queue_arguments, Nodes};
use profile_worker::config::{BrokerSettings, DatabaseSettings};
use profile_worker::store::{SeedFile, Store};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The run's database (migrated and seeded) and broker names.
pub(crate) struct Setup {
    pub(crate) db_url: String,
    pub(crate) amqp_url: String,
    pub(crate) prefix: String,
    pub(crate) names: BrokerSettings,
    pub(crate) nodes: Nodes,
    pub(crate) store: Store,
    pub(crate) plan: Plan,
}

impl Setup {
    pub(crate) async fn prepare(args: &BenchArgs, db: &str, iso: &Isolation) -> Result<Setup> {
        let db_url = setup::with_database(&args.database_url, db)?;
        let amqp_url = iso.amqp_url(&args.amqp_url)?;
        let prefix = iso.prefix().to_string();
        let mut names = names(&prefix, &amqp_url, args.prefetch, args.bulk_prefetch);
        if args.unbounded_queues {
            names.command_queue_max_length = 0;
            names.command_queue_max_bytes = 0;
            names.dead_letter_queue_max_length = 0;
            names.dead_letter_queue_max_bytes = 0;
        }
        names
            .validate()
            .map_err(|e| BenchError::Usage(e.to_string()))?;
        let nodes = broker::nodes(&names.address, names.heartbeat_secs)
            .map_err(|e| BenchError::Usage(e.to_string()))?;
        let store = Store::connect(&DatabaseSettings {
            database_url: db_url.as_str().into(),
            db_pool_size: 2,
            db_timeout_secs: 10,
            runtime_role: String::new(),
        })
        .map_err(|e| BenchError::Usage(e.to_string()))?;
        store
            .migrate()
            .await
            .map_err(|e| BenchError::database("migrating the bench database", e))?;
        store
            .seed(&seed_file(args.profiles))
            .await
            .map_err(|e| BenchError::database("seeding the bench database", e))?;
        let plan = Plan {
            mix: args.mix,
            invalid_share: args.invalid_share,
            access_token_id: BENCH_TOKEN.into(),
            profile_ids: (0..args.profiles).map(profile_id).collect(),
        };
        Ok(Setup {
            db_url,
            amqp_url,
            prefix,
            names,
            nodes,
            store,
            plan,
        })
    }

    /// The workers' environment: this run's database, vhost and names, and the
    /// flags' settings.
    pub(crate) fn worker_env(&self, args: &BenchArgs) -> Vec<(String, String)> {
        let n = &self.names;
        [
            ("DATABASE_URL", self.db_url.clone()),
            ("AMQP_URL", self.amqp_url.clone()),
            ("COMMAND_EXCHANGE", n.command_exchange.clone()),
            ("COMMAND_QUEUE", n.command_queue.clone()),
            ("BULK_EXCHANGE", n.bulk_exchange.clone()),
            ("BULK_QUEUE", n.bulk_queue.clone()),
            ("BULK_PREFETCH", n.bulk_prefetch.to_string()),
            ("DEAD_LETTER_EXCHANGE", n.dead_letter_exchange.clone()),
            ("DEAD_LETTER_QUEUE", n.dead_letter_queue.clone()),
            ("EVENTS_EXCHANGE", n.events_exchange.clone()),
            ("EMAIL_EXCHANGE", n.email_exchange.clone()),
            ("EMAIL_QUEUE", n.email_queue.clone()),
            ("PREFETCH", args.prefetch.to_string()),
            ("BATCH_SIZE", args.batch_size.to_string()),
            ("CONSUMERS", args.consumers.to_string()),
            ("EMAIL_COOLDOWN_SECS", args.email_cooldown_secs.to_string()),
            // Required by `run`; the bench's emails go to a drained queue.
            ("VERIFICATION_URL", "https://example.com/verify".to_string()),
            (
                "COMMAND_QUEUE_MAX_LENGTH",
                n.command_queue_max_length.to_string(),
            ),
            (
                "COMMAND_QUEUE_MAX_BYTES",
                n.command_queue_max_bytes.to_string(),
            ),
            (
                "DEAD_LETTER_QUEUE_MAX_LENGTH",
                n.dead_letter_queue_max_length.to_string(),
            ),
            (
                "DEAD_LETTER_QUEUE_MAX_BYTES",
                n.dead_letter_queue_max_bytes.to_string(),
            ),
            // Metrics are recorded as in production; any free port, so workers of
            // one run (and a worker already running here) do not collide.
            ("HTTP_ADDR", "127.0.0.1:0".into()),
            // JSON, so the bench can read where that is (and the stage timings there).
            ("LOG_FORMAT", "json".into()),
            // At least info, whatever RUST_LOG the bench runs under: the line
            // saying where /metrics is served is how the bench finds it.
            (
                "RUST_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            args.batch_wait_ms
                .map(|w| ("BATCH_WAIT_MS".to_string(), w.to_string())),
        )
        .chain(
            args.bulk_share_percent
                .map(|p| ("BULK_SHARE_PERCENT".to_string(), p.to_string())),
        )
        .collect()
    }

    /// Real processes, so their CPU time and memory are their own; returns
    /// once every one consumes.
    pub(crate) async fn start_workers(
        &self,
        args: &BenchArgs,
        db: &str,
        conn: &broker::Connection,
    ) -> Result<Vec<WorkerProcess>> {
        let bin = match &args.worker_bin {
            Some(b) => b.clone(),
            None => {
                let me = std::env::current_exe()
                    .map_err(|e| BenchError::io("finding this program", e))?;
                me.with_file_name(format!("profile-worker{}", std::env::consts::EXE_SUFFIX))
            }
        };
        let env = self.worker_env(args);
        let mut workers = Vec::new();
        for k in 0..args.workers {
            let log = std::env::temp_dir().join(format!("{db}-worker{k}.log"));
            workers.push(setup::spawn_worker(&bin, &env, log)?);
        }
        wait_for_consumers(conn, &self.names, &mut workers).await?;
        Ok(workers)
    }

    /// The echo consumers, each a process of its own: plain, and (with
    /// --ceiling-events) one publishing the contract's events into an
    /// exchange, email queue and audit queue shaped like the worker's, each on
    /// a command queue shaped like the worker's.
    pub(crate) async fn start_echoes(
        &self,
        args: &BenchArgs,
        channel: &lapin::Channel,
        db: &str,
    ) -> Result<Vec<Party>> {
        let ceiling_events = ceiling_events_exchange(&self.prefix);
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
                .map_err(|e| BenchError::broker(ceiling_events.clone(), e))?;
            // The events' consumers, as production has them: the dispatcher's
            // quorum queue bound to `email.requested` (the worker declares its
            // own), and an audit service's classic durable queue bound to
            // `ticket.created` (run_isolated binds the worker's).
            declare_subscriber(
                channel,
                &ceiling_events,
                "email.requested",
                &ceiling_email_queue(&self.prefix),
                broker::email_queue_arguments(&self.names),
            )
            .await?;
            declare_subscriber(
                channel,
                &ceiling_events,
                "ticket.created",
                &ceiling_audit_queue(&self.prefix),
                FieldTable::default(),
            )
            .await?;
        }
        let mut echoes = Vec::new();
        for (wanted, queue, events_exchange) in [
            (args.ceiling, ceiling_queue(&self.prefix), None),
            (
                args.ceiling_events,
                events_ceiling_queue(&self.prefix),
                Some(ceiling_events.clone()),
            ),
        ] {
            if !wanted {
                continue;
            }
            ceiling::declare_durable(channel, &queue, command_queue_arguments(&self.names)).await?;
            let mut a = vec![
                format!("--amqp-url={}", self.amqp_url),
                "echo".into(),
                format!("--queue={queue}"),
                format!("--consumers={}", args.consumers),
                format!("--prefetch={}", args.prefetch),
                format!("--batch={}", args.batch_size),
            ];
            if let Some(x) = events_exchange {
                a.push(format!("--events-exchange={x}"));
            }
            let log = std::env::temp_dir().join(format!("{db}-{queue}.log"));
            echoes.push(setup::spawn_party(&a, log).await?);
        }
        Ok(echoes)
    }

    /// What production has beside the worker: an audit service's queue on the
    /// worker's events exchange (the workers declared the dispatcher's), and
    /// one process consuming (and acking) every event queue. Returns the
    /// folder it counts into, and the process.
    pub(crate) async fn start_drain(
        &self,
        args: &BenchArgs,
        db: &str,
        channel: &lapin::Channel,
    ) -> Result<(std::path::PathBuf, Party)> {
        declare_subscriber(
            channel,
            &self.names.events_exchange,
            "ticket.created",
            &audit_queue(&self.prefix),
            FieldTable::default(),
        )
        .await?;
        let counts = std::env::temp_dir().join(format!("{db}-counts"));
        std::fs::create_dir_all(&counts)
            .map_err(|e| BenchError::io(counts.display().to_string(), e))?;
        let mut a = vec![format!("--amqp-url={}", self.amqp_url), "drain".into()];
        let mut queues = vec![self.names.email_queue.clone(), audit_queue(&self.prefix)];
        if args.ceiling_events {
            queues.push(ceiling_email_queue(&self.prefix));
            queues.push(ceiling_audit_queue(&self.prefix));
        }
        for q in queues {
            a.push(format!("--queue={q}"));
        }
        a.push(format!("--counts={}", counts.display()));
        let drain =
            setup::spawn_party(&a, std::env::temp_dir().join(format!("{db}-drain.log"))).await?;
        Ok((counts, drain))
    }
}

async fn wait_for_consumers(
    conn: &broker::Connection,
    names: &BrokerSettings,
    workers: &mut [WorkerProcess],
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for w in workers.iter_mut() {
            if let Ok(Some(status)) = w.child.try_wait() {
                let tail = std::fs::read_to_string(&w.log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(BenchError::Process(format!(
                    "worker {} exited with {status} before consuming:\n  {}",
                    w.pid,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                )));
            }
        }
        // Declared exactly as the worker declares it, so there is no error (and no
        // closed channel) while the worker has not declared it yet.
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| BenchError::broker("AMQP_URL", e))?;
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
            .map_err(|e| BenchError::broker(names.command_queue.clone(), e))?;
        let _ = ch.close(200, "ok".into()).await;
        if q.consumer_count() as usize >= workers.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Process(format!(
                "the workers were not consuming {} within {} s",
                names.command_queue,
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A subscriber's durable queue (with `arguments`: a quorum queue's, say),
/// bound to `routing_key` on `exchange`.
async fn declare_subscriber(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    queue: &str,
    arguments: FieldTable,
) -> Result<()> {
    ceiling::declare_durable(channel, queue, arguments).await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BenchError::broker(queue, e))
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
