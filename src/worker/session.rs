//! The broker side of `run`: one session per connection (topology, consumers,
//! the outbox relay), rebuilt with jittered backoff whenever the connection or
//! a channel fails, until shutdown.

use super::adapters::{self, Amqp, Real};
use super::gather;
use super::lanes::{InHand, Lane, Lanes};
use crate::broker::{self, properties, Connection, Delivery, Nodes, Publisher, TopologyError};
use crate::config::Settings;
use crate::ops::Health;
use crate::pipeline::known::SharedKnown;
use crate::pipeline::outbox::{self, ConfirmedEvents};
use crate::pipeline::ports::SystemWorld;
use crate::pipeline::{BatchError, Parts, Pipeline, Prepared, SessionLost};
use crate::store::Store;
use crate::telemetry::{self, Report};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// On shutdown, how long a consumer's buffer must stay empty before it is done.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// How long closing a lost session's connection may take before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("broker session lost")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Lost(#[from] SessionLost),
    #[error("the broker cancelled the consumer")]
    Cancelled,
    #[error("a batch's completion task failed")]
    Completion(#[from] tokio::task::JoinError),
    #[error("the AMQP connection's I/O thread panicked: {0}")]
    IoThreadPanicked(Arc<str>),
}

/// What every session and consumer of one worker shares.
pub(super) struct Shared<'a> {
    pub store: &'a Store,
    /// Confirmed events whose outbox rows are not deleted yet (`outbox`).
    pub confirmed: &'a ConfirmedEvents,
    pub known: &'a SharedKnown,
    pub settings: &'a Arc<Settings>,
    pub health: &'a Arc<Health>,
    pub shutdown: &'a CancellationToken,
}

/// Where the broker's nodes are, and how fast to come back to them.
pub(super) struct Broker<'a> {
    pub nodes: &'a Nodes,
    pub tls: &'a OwnedTLSConfig,
    pub pace: crate::backoff::Backoff,
}

/// Runs sessions until shutdown; returns an error only for what no reconnect can fix.
pub(super) async fn supervise(
    broker: Broker<'_>,
    first: (Connection, usize),
    shared: &Shared<'_>,
) -> Result<(), super::RunError> {
    let shutdown = shared.shutdown;
    let mut node = first.1;
    let mut conn = Some(first.0);
    loop {
        let c = match conn.take() {
            Some(c) => c,
            // The node just lost is tried last: in a cluster another one is
            // likely up, and the lost one may be coming back half-started.
            None => match reconnect(&broker, node + 1, shutdown).await {
                Some((c, n)) => {
                    node = n;
                    c
                }
                None => return Ok(()),
            },
        };
        let outcome = session(&c, shared).await;
        // Bounded: a connection whose I/O thread is gone never answers the close.
        let _ = tokio::time::timeout(CLOSE_WAIT, c.close(200, "bye".into())).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(SessionError::Topology(e)) if e.is_fatal() => return Err(e.into()),
            Err(e @ SessionError::IoThreadPanicked(_)) => {
                metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "io_thread").increment(1);
                tracing::error!(error = %Report(&e), "broker connection dropped; reconnecting");
            }
            Err(e) if shutdown.is_cancelled() => {
                tracing::warn!(error = %Report(&e), "broker session ended during shutdown; unacked commands will be redelivered");
                return Ok(());
            }
            Err(e) => {
                metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "session").increment(1);
                tracing::warn!(error = %Report(&e), "broker session lost; reconnecting")
            }
        }
    }
}

async fn reconnect(
    broker: &Broker<'_>,
    start: usize,
    shutdown: &CancellationToken,
) -> Option<(Connection, usize)> {
    let mut start = start;
    for delay in broker.pace.delays() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return None,
        }
        match broker.nodes.connect(broker.tls, start).await {
            Ok((c, node)) => {
                metrics::counter!(telemetry::RECONNECTS).increment(1);
                tracing::info!(broker = %broker.nodes.at(node), "reconnected");
                return Some((c, node));
            }
            Err((at, e)) => {
                tracing::warn!(broker = %at, error = %broker::describe(&e), retry_in_ms = delay.as_millis() as u64, "broker unreachable");
                // Each round starts one node further, so no node is always tried first.
                start += 1;
            }
        }
    }
    None
}

/// One connection's life: topology, consumers, batches, outbox relay. Returns Ok
/// only after a requested shutdown has drained what this worker held.
async fn session(conn: &Connection, shared: &Shared<'_>) -> Result<(), SessionError> {
    let (store, settings) = (shared.store, shared.settings);
    // From before the first frame of this session: a panic of the connection's
    // I/O thread ends it at once instead of at a heartbeat timeout.
    let mut io_thread = broker::io_thread::Watch::new();
    let channel = conn.create_channel().await?;
    broker::declare(&channel, &settings.broker).await?;
    let _ = channel.close(200, "declared".into()).await;

    let relay_stop = CancellationToken::new();
    let relay_publisher = Publisher::open(conn).await?;
    let relay = tokio::spawn(outbox::relay_loop(
        store.clone(),
        shared.confirmed.clone(),
        Amqp {
            publisher: relay_publisher.clone(),
            acks: None,
        },
        settings.clone(),
        relay_stop.clone(),
    ));
    let _stop_relay = relay_stop.clone().drop_guard();
    let depths = tokio::spawn(poll_depths(
        conn.create_channel().await?,
        settings.clone(),
        relay_stop.clone(),
    ));

    // Several consumers per lane, each with its own channel, batches and
    // confirms: while one waits for Postgres another publishes, so neither the
    // database nor the broker sits idle. Each channel acks only its own
    // deliveries, so their `ack multiple` cannot overlap. Each lane's
    // prefetch is shared out between its consumers, and each lane gathers
    // behind its own batches only: an interactive command never waits for a
    // bulk batch to leave the database.
    let consumers = settings.worker.consumers;
    let lanes = Lanes::new(settings.worker.bulk_share_percent);
    let in_db = [gather::InDatabase::default(), gather::InDatabase::default()];
    let mut consuming = Vec::new();
    for (lane, in_db) in Lane::ALL.into_iter().zip(&in_db) {
        let (queue, prefetch) = match lane {
            Lane::Interactive => (&settings.broker.command_queue, settings.broker.prefetch),
            Lane::Bulk => (&settings.broker.bulk_queue, settings.broker.bulk_prefetch),
        };
        let each = prefetch.div_ceil(consumers);
        for n in 0..usize::from(consumers) {
            let spec = LaneSpec {
                lane,
                queue,
                prefetch: each,
                n,
            };
            consuming.push(consume(conn, shared, spec, (in_db, &lanes)));
        }
        tracing::info!(lane = lane.as_str(), %queue, consumers, prefetch_each = each, "consuming");
    }
    // The first consumer to fail ends the session; the others are dropped with the
    // connection and their unacked deliveries return to the queue.
    let result = tokio::select! {
        r = futures_util::future::try_join_all(consuming) => r.map(|_| ()),
        why = io_thread.died() => Err(SessionError::IoThreadPanicked(why)),
    };
    relay_stop.cancel();
    if matches!(result, Err(SessionError::IoThreadPanicked(_))) {
        // They may be waiting for a confirm or an answer that cannot come.
        relay.abort();
        depths.abort();
    }
    let _ = relay.await;
    relay_publisher.close().await;
    let _ = depths.await;
    result
}

/// Reads the worker's queues' depths and consumers (a passive declare each)
/// every `QUEUE_DEPTH_POLL_SECS` until `stop`, so "dead letters are piling
/// up", "the backlog grows" and "no dispatcher reads the emails" can be
/// alerted on without the broker's own exporter. A failed read ends the poll
/// quietly: the session's loss is reported elsewhere.
async fn poll_depths(channel: lapin::Channel, settings: Arc<Settings>, stop: CancellationToken) {
    if read_depths(&channel, &settings, &stop).await {
        // Closed, and its close-ok awaited, before the session closes the
        // connection, as every other channel of the session is: one merely
        // dropped is left to whatever the connection's close does with it.
        let _ = channel.close(200, "stopping".into()).await;
    }
}

/// Polls until `stop` (true) or a failed read (false: the channel is gone).
async fn read_depths(
    channel: &lapin::Channel,
    settings: &Settings,
    stop: &CancellationToken,
) -> bool {
    let queues = [
        ("commands", settings.broker.command_queue.clone()),
        ("bulk", settings.broker.bulk_queue.clone()),
        ("dead_letters", settings.broker.dead_letter_queue.clone()),
        ("email", settings.broker.email_queue.clone()),
        ("email_dead", settings.broker.email_dead_letter_queue()),
    ];
    loop {
        for (label, name) in &queues {
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => {
                    metrics::gauge!(telemetry::QUEUE_MESSAGES, "queue" => *label)
                        .set(f64::from(q.message_count()));
                    metrics::gauge!(telemetry::QUEUE_CONSUMERS, "queue" => *label)
                        .set(f64::from(q.consumer_count()));
                }
                Err(_) => return false,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(settings.worker.queue_depth_poll_secs)) => {}
            _ = stop.cancelled() => return true,
        }
    }
}

/// Which queue a consumer takes from, with what prefetch; `n` tells it from
/// its lane's other consumers in the logs.
struct LaneSpec<'a> {
    lane: Lane,
    queue: &'a str,
    prefetch: u16,
    n: usize,
}

/// One consumer on its own channel: take what the prefetch window delivered,
/// hand it to the pipeline as one batch, repeat. A bulk consumer processes
/// what the lanes admit (`Lanes::admit_bulk`) and carries the rest to its
/// next batch.
async fn consume(
    conn: &Connection,
    shared: &Shared<'_>,
    spec: LaneSpec<'_>,
    (in_db, lanes): (&gather::InDatabase, &Arc<Lanes>),
) -> Result<(), SessionError> {
    let LaneSpec {
        lane,
        queue,
        prefetch,
        n,
    } = spec;
    // In log lines: which lane, and which of its consumers.
    let who = (lane, n);
    let Shared {
        store,
        confirmed,
        known,
        settings,
        health,
        shutdown,
    } = *shared;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(conn).await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer_tag = consumer.tag();
    // Peekable: gathering a batch looks at what comes next and leaves an
    // error or the stream's end for the loop to handle.
    let mut consumer = consumer.peekable();
    let batch_wait = Duration::from_millis(settings.worker.batch_wait_ms);
    let consuming = health.consuming();
    let pipeline = Arc::new(Pipeline::<Real>::new(Parts {
        store: store.clone(),
        confirmed: confirmed.clone(),
        known: known.clone(),
        broker: Amqp {
            publisher: publisher.clone(),
            acks: Some(channel.clone()),
        },
        world: Arc::new(SystemWorld),
        lane: lane.as_str(),
        settings: settings.clone(),
        shutdown: shutdown.clone(),
        frame_max: conn.configuration().frame_max() as usize,
    }));
    // Bulk deliveries taken from the stream but not yet admitted.
    let mut carried: Vec<Delivery> = Vec::new();
    // The batch whose publications are waiting for their confirms: it completes
    // (confirms, then ack) on its own task while the next batch is prepared, so
    // the database and the broker's fsync overlap instead of taking turns. The
    // next batch sends its replies as soon as it is committed; only its ack
    // waits for this one.
    let mut completing: Option<Completion> = None;
    let max_batch = settings.worker.batch_size as usize;
    let mut cancelling = false;
    let result = loop {
        let first = if !carried.is_empty() {
            // What the lanes did not admit last time goes first.
            None
        } else if cancelling {
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
                done = completed(&mut completing) => {
                    completing = None;
                    match after_batch(done, who) {
                        Some(stop) => break stop,
                        None => continue,
                    }
                }
                _ = shutdown.cancelled() => {
                    cancelling = true;
                    tracing::info!(lane = lane.as_str(), consumer = n, "shutdown requested: no new commands; finishing the ones held");
                    if let Err(e) = channel.basic_cancel(consumer_tag.clone(), BasicCancelOptions::default()).await {
                        break Err(e.into());
                    }
                    continue;
                }
                d = consumer.next() => d,
            }
        };
        let received = std::time::Instant::now();
        let mut batch = match first {
            None if !carried.is_empty() => std::mem::take(&mut carried),
            None if cancelling => break Ok(()),
            None => break Err(SessionError::Cancelled),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(d)) => vec![d],
        };
        // What has already arrived and, with BATCH_WAIT_MS, what arrives while
        // another batch is in the database (`gather`). Not while draining.
        let wait = if cancelling {
            Duration::ZERO
        } else {
            batch_wait
        };
        gather::gather(&mut consumer, &mut batch, max_batch, wait, in_db).await;
        let in_hand = match lane {
            Lane::Interactive => Some(lanes.interactive(batch.len())),
            Lane::Bulk => {
                // At shutdown what is held is finished, whatever the share.
                let admitted = tokio::select! {
                    n = lanes.admit_bulk(batch.len()) => n,
                    _ = shutdown.cancelled() => batch.len(),
                };
                carried = batch.split_off(admitted);
                None
            }
        };
        record_waits(lane, &batch, received);
        let prepared = {
            let _in_db = in_db.enter();
            pipeline
                .prepare(batch.into_iter().map(adapters::delivery).collect())
                .await
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => break stop(e, who),
        };

        // Batches complete in the order they were prepared: an ack is `multiple`,
        // so the previous batch must be settled before this one's ack is sent.
        if let Some(previous) = completing.take() {
            if !previous.is_finished() {
                tracing::debug!(
                    lane = lane.as_str(),
                    consumer = n,
                    "prepared a batch while the previous one awaited its confirms"
                );
            }
            if let Some(stop) = after_batch(previous.await, who) {
                break stop;
            }
        }
        match prepared {
            Prepared::Committed(c) => {
                let pipeline = pipeline.clone();
                // Interactive commands are in hand until settled: releasing
                // them at the commit instead let bulk batches start while the
                // caller's next command arrived (draining p50 6.9-7.5 ms
                // against 4.5; bench/archive/BENCHMARKS-to-2026-12-07.md,
                // "Lanes").
                completing = Some(tokio::spawn(async move {
                    let done = pipeline.complete(c).await;
                    drop::<Option<InHand>>(in_hand);
                    done
                }));
            }
            Prepared::Failed(f) => {
                let recovered = pipeline.recover(f).await;
                drop(in_hand);
                if let Err(e) = recovered {
                    break stop(e, who);
                }
            }
        }
    };
    // The batch still completing is finished, unless the session failed: then
    // its deliveries go back to the queue with the channel.
    let result = match (result, completing.take()) {
        (Ok(()), Some(last)) => after_batch(last.await, who).unwrap_or(Ok(())),
        (failed, Some(last)) => {
            last.abort();
            failed
        }
        (r, None) => r,
    };
    drop(consuming);
    publisher.close().await;
    let _ = channel.close(200, "bye".into()).await;
    result
}

type Completion = tokio::task::JoinHandle<Result<(), BatchError>>;

/// How long each command of a batch waited before it: since its publisher sent
/// it (`timestamp_in_ms`, else the AMQP `timestamp`), never less than since
/// the batch's first delivery reached this consumer. The AMQP timestamp is in
/// whole seconds, so it counts only beyond the second it may be off by.
fn record_waits(lane: Lane, batch: &[Delivery], received: std::time::Instant) {
    let now_ms = properties::now_ms();
    let held = received.elapsed().as_secs_f64();
    let histogram = metrics::histogram!(telemetry::QUEUE_WAIT_SECONDS, "lane" => lane.as_str());
    for d in batch {
        let since_sent = match properties::sent_at_ms_exactly(&d.properties) {
            Some(sent) => now_ms.saturating_sub(sent),
            None => d.properties.timestamp().map_or(0, |secs| {
                now_ms.saturating_sub(secs.saturating_add(1).saturating_mul(1000))
            }),
        };
        histogram.record(held.max(since_sent as f64 / 1000.0));
    }
}

/// Resolves when the batch completing finishes; never, when there is none.
async fn completed(
    c: &mut Option<Completion>,
) -> Result<Result<(), BatchError>, tokio::task::JoinError> {
    match c {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// What a finished batch means for its consumer: go on (`None`), or stop.
fn after_batch(
    done: Result<Result<(), BatchError>, tokio::task::JoinError>,
    who: (Lane, usize),
) -> Option<Result<(), SessionError>> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(stop(e, who)),
        Err(e) => Some(Err(e.into())),
    }
}

fn stop(e: BatchError, (lane, consumer): (Lane, usize)) -> Result<(), SessionError> {
    match e {
        BatchError::Broker(e) => Err(e.into()),
        BatchError::Abandoned => {
            tracing::warn!(
                lane = lane.as_str(),
                consumer,
                "shutdown grace exceeded; leaving held commands to redelivery"
            );
            Ok(())
        }
    }
}
