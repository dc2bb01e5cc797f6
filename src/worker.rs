//! `profile-worker run`: start-up checks, the supervisor that rebuilds the broker
//! session after any failure, the consume-and-batch loop, graceful shutdown, and
//! the background sweeper.

use crate::broker::{self, Connection, Publisher, TopologyError};
use crate::config::{ConfigError, Settings};
use crate::ops::{Endpoint, Health};
use crate::pipeline::{self, BatchError, Pipeline};
use crate::store::Store;
use crate::telemetry;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// On shutdown, how long a consumer's buffer must stay empty before it is done.
const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// How soon confirmed outbox rows are deleted when no commit takes them along.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("DATABASE_URL: {0}")]
    Database(String),
    #[error("AMQP_URL: {0}")]
    Broker(String),
    #[error(transparent)]
    Topology(TopologyError),
    #[error("HTTP_ADDR")]
    Http(#[source] crate::ops::EndpointError),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("broker: {0}")]
    Broker(String),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        SessionError::Broker(broker::describe(&e))
    }
}

/// Runs until `shutdown` is cancelled and held commands are finished.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    settings.validate()?;
    let settings = Arc::new(settings);
    let uri = settings.broker.validate()?;
    let endpoint = match settings.worker.http_addr()? {
        Some(addr) => Some(Endpoint::bind(addr).await.map_err(RunError::Http)?),
        None => None,
    };
    let store = Store::connect(&settings.database)?;
    store
        .check()
        .await
        .map_err(|e| RunError::Database(format!("cannot connect: {}", e.message)))?;
    apply_migrations(&store, &settings.database).await?;

    let tls = settings.broker.tls()?;
    let broker_at = format!("{}:{}", uri.authority.host, uri.authority.port);
    let first = broker::connect(&uri, &tls).await.map_err(|e| {
        RunError::Broker(format!(
            "cannot connect to {broker_at}: {}",
            broker::describe(&e)
        ))
    })?;
    tracing::info!(broker = %broker_at, queue = %settings.broker.command_queue, "connected");

    let health = Arc::new(Health::new(shutdown.clone()));
    let ops_stop = CancellationToken::new();
    let ops = endpoint.map(|e| {
        if let Some(addr) = e.local_addr() {
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        tokio::spawn(e.serve(health.clone(), store.clone(), ops_stop.clone()))
    });
    let _stop_ops = ops_stop.clone().drop_guard();

    let sweeper = tokio::spawn(sweep_loop(
        store.clone(),
        settings.clone(),
        shutdown.clone(),
    ));
    let mut conn = Some(first);
    let result = loop {
        let c = match conn.take() {
            Some(c) => c,
            None => match reconnect(&uri, &tls, &broker_at, &shutdown).await {
                Some(c) => c,
                None => break Ok(()),
            },
        };
        let outcome = session(&c, &store, &settings, &health, &shutdown).await;
        let _ = c.close(200, "bye".into()).await;
        match outcome {
            Ok(()) => break Ok(()),
            Err(SessionError::Topology(e)) if e.is_fatal() => break Err(RunError::Topology(e)),
            Err(e) if shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "broker session ended during shutdown; unacked commands will be redelivered");
                break Ok(());
            }
            Err(e) => {
                metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "session").increment(1);
                tracing::warn!(error = %e, "broker session lost; reconnecting")
            }
        }
    };
    shutdown.cancel();
    let _ = sweeper.await;
    if let Err(e) = store.flush_forgotten().await {
        tracing::warn!(error = %e, "confirmed events left in the outbox; the relay will re-publish them once");
    }
    ops_stop.cancel();
    if let Some(ops) = ops {
        // A scraper holding a request open must not keep the process alive.
        let _ = tokio::time::timeout(Duration::from_secs(2), ops).await;
    }
    store.close();
    result
}

/// `run` migrates when it may; under a role without DDL rights (as it should
/// run, CONTRACT §9) it starts when nothing is pending and otherwise says which
/// command to run.
async fn apply_migrations(
    store: &Store,
    db: &crate::config::DatabaseSettings,
) -> Result<(), RunError> {
    let failed = |e: crate::store::StoreError| RunError::Database(format!("migration failed: {e}"));
    let pending = store.pending_migrations().await.map_err(failed)?;
    if pending.is_empty() {
        return Ok(());
    }
    match store.migrate().await {
        Ok(_) => {}
        Err(e) if e.is_permission_denied() => {
            return Err(RunError::Database(format!(
                "migrations {pending:?} are pending and this role may not apply them ({e}); \
                 run `profile-worker migrate` as the schema's owner, then start again"
            )))
        }
        Err(e) => return Err(failed(e)),
    }
    if !db.runtime_role.is_empty() {
        store
            .grant_runtime(&db.runtime_role)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

async fn reconnect(
    uri: &AMQPUri,
    tls: &broker::OwnedTLSConfig,
    endpoint: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return None,
        }
        match broker::connect(uri, tls).await {
            Ok(c) => {
                metrics::counter!(telemetry::RECONNECTS).increment(1);
                tracing::info!(broker = %endpoint, "reconnected");
                return Some(c);
            }
            Err(e) => {
                tracing::warn!(error = %broker::describe(&e), retry_in_ms = backoff.as_millis() as u64, "broker unreachable")
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One connection's life: topology, consumers, batches, outbox relay. Returns Ok
/// only after a requested shutdown has drained what this worker held.
async fn session(
    conn: &Connection,
    store: &Store,
    settings: &Arc<Settings>,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let channel = conn.create_channel().await?;
    broker::declare(&channel, &settings.broker).await?;
    let _ = channel.close(200, "declared".into()).await;

    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(relay_loop(
        store.clone(),
        Publisher::open(conn).await?,
        settings.clone(),
        relay_stop.clone(),
    ));
    let _stop_relay = relay_stop.clone().drop_guard();

    // Several consumers, each with its own channel, batches and confirms: while
    // one waits for Postgres another publishes, so neither the database nor the
    // broker sits idle. Each channel acks only its own deliveries, so their
    // `ack multiple` cannot overlap. PREFETCH is shared out between them.
    let consumers = usize::from(settings.worker.consumers);
    let prefetch = settings.broker.prefetch.div_ceil(settings.worker.consumers);
    let mut lanes = Vec::with_capacity(consumers);
    for lane in 0..consumers {
        lanes.push(consume(
            conn, store, settings, health, shutdown, prefetch, lane,
        ));
    }
    tracing::info!(queue = %settings.broker.command_queue, consumers, prefetch_each = prefetch, "consuming");
    // The first consumer to fail ends the session; the others are dropped with the
    // connection and their unacked deliveries return to the queue.
    let result = futures_util::future::try_join_all(lanes).await.map(|_| ());
    relay_stop.cancel();
    let _ = relay.await;
    result
}

/// One consumer on its own channel: take what the prefetch window delivered,
/// hand it to the pipeline as one batch, repeat.
async fn consume(
    conn: &Connection,
    store: &Store,
    settings: &Arc<Settings>,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
    prefetch: u16,
    lane: usize,
) -> Result<(), SessionError> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(conn).await?;
    let mut consumer = channel
        .basic_consume(
            settings.broker.command_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer_tag = consumer.tag();
    let consuming = health.consuming();
    let pipeline = Pipeline::new(
        store.clone(),
        publisher.clone(),
        channel.clone(),
        settings.clone(),
        shutdown.clone(),
    );
    let max_batch = settings.worker.batch_size as usize;
    let mut cancelling = false;
    let result = loop {
        let first = if cancelling {
            // basic_cancel returned, so the broker sends nothing more; what it sent
            // before is in lapin's buffer or on its way there. Drain until the
            // stream ends or stays quiet. (Waiting for the end alone is not enough:
            // lapin does not always wake a consumer that drained its buffer after
            // the cancel.) Anything left is requeued when the channel closes.
            match tokio::time::timeout(DRAIN_QUIET, consumer.next()).await {
                Ok(d) => d,
                Err(_) => break Ok(()),
            }
        } else {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    cancelling = true;
                    tracing::info!(lane, "shutdown requested: no new commands; finishing the ones held");
                    if let Err(e) = channel.basic_cancel(consumer_tag.clone(), BasicCancelOptions::default()).await {
                        break Err(e.into());
                    }
                    continue;
                }
                d = consumer.next() => d,
            }
        };
        let mut batch = match first {
            None if cancelling => break Ok(()),
            None => {
                break Err(SessionError::Broker(
                    "the broker cancelled the consumer".into(),
                ))
            }
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(d)) => vec![d],
        };
        // Take whatever else the prefetch window already delivered, without waiting.
        while batch.len() < max_batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        match pipeline.handle(batch).await {
            Ok(()) => {}
            Err(BatchError::Broker(m)) => break Err(SessionError::Broker(m)),
            Err(BatchError::Abandoned) => {
                tracing::warn!(
                    lane,
                    "shutdown grace exceeded; leaving held commands to redelivery"
                );
                break Ok(());
            }
        }
    };
    drop(consuming);
    publisher.close().await;
    let _ = channel.close(200, "bye".into()).await;
    result
}

/// Deletes confirmed outbox rows no commit took along (the worker went idle), and
/// re-publishes events whose confirm never came.
async fn relay_loop(
    store: Store,
    publisher: Publisher,
    settings: Arc<Settings>,
    stop: CancellationToken,
) {
    let every = Duration::from_secs(settings.worker.outbox_grace_secs.clamp(1, 60));
    let mut last_relay = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
            _ = stop.cancelled() => break,
        }
        // Before leasing, so the relay never re-publishes what was confirmed.
        if let Err(e) = store.flush_forgotten().await {
            tracing::warn!(error = %e, "could not clear confirmed events from the outbox; will retry");
            continue;
        }
        if last_relay.elapsed() < every {
            continue;
        }
        last_relay = tokio::time::Instant::now();
        match store.outbox_pending().await {
            Ok(n) => metrics::gauge!(telemetry::OUTBOX_PENDING).set(n as f64),
            Err(e) => tracing::debug!(error = %e, "could not count the outbox"),
        }
        match pipeline::relay_outbox(&store, &publisher, &settings).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "re-published events left unconfirmed"),
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; will retry"),
        }
    }
    publisher.close().await;
}

async fn sweep_loop(store: Store, settings: Arc<Settings>, shutdown: CancellationToken) {
    let w = &settings.worker;
    if w.sweep_interval_secs == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(w.sweep_interval_secs)) => {}
            _ = shutdown.cancelled() => break,
        }
        let now = crate::store::epoch_millis(SystemTime::now());
        match store
            .sweep(
                now,
                crate::store::Retention {
                    ticket_max_age: Duration::from_secs(w.ticket_max_age_secs),
                    token_max_age: Duration::from_secs(w.token_max_age_secs),
                    idempotency: Duration::from_secs(w.idempotency_retention_secs),
                    email_cooldown: Duration::from_secs(w.email_cooldown_secs),
                },
            )
            .await
        {
            Ok(r) if r == Default::default() => {}
            Ok(r) => tracing::info!(
                tickets = r.tickets,
                verification_tokens = r.verification_tokens,
                processed_commands = r.processed_commands,
                email_cooldowns = r.email_cooldowns,
                "deleted expired rows"
            ),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; will retry"),
        }
    }
}
