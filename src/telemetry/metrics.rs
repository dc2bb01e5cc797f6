//! The metrics the worker exports. Their names live here, so the exporter, the
//! code that records them and docs/OPERATIONS.md agree.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Commands answered, by `command` (or `unknown`), reply `status` and `lane`
/// (`interactive`, `bulk`).
pub const COMMANDS: &str = "profile_worker_commands_total";
/// How long a command waited before its batch, by `lane`: from its publisher's
/// send time (`timestamp_in_ms` header, else the AMQP `timestamp`), else from
/// when the worker received it.
pub const QUEUE_WAIT_SECONDS: &str = "profile_worker_queue_wait_seconds";
/// Commands per batch (one database round trip for all of them).
pub const BATCH_SIZE: &str = "profile_worker_batch_size";
/// How long a batch spent in each `stage`: `decode` (properties and bodies),
/// `load` and `commit` (one round trip each, per attempt), `plan` (the pure
/// decisions), `database` (load to commit, retries and waits included),
/// `publish` (from sending the replies, events and dead letters right after
/// the commit until every confirm is settled, which follows the batch before it
/// on its consumer), `ack`, and
/// `total` (decode to ack).
pub const BATCH_SECONDS: &str = "profile_worker_batch_seconds";
/// From a command's send time (its `timestamp_in_ms` header, else its AMQP
/// `timestamp` in whole seconds) to its reply being confirmed: queueing plus
/// processing, the round trip as the publisher sees it.
pub const COMMAND_AGE_SECONDS: &str = "profile_worker_command_age_seconds";
/// Failed database attempts, by `kind` (`transient`: retried; `permanent`).
pub const DATABASE_ERRORS: &str = "profile_worker_database_errors_total";
/// Batches decided, by `on`: `known` (rows read by earlier batches, no load),
/// `loaded`, or `changed` (decided on known rows, one of which the commit found
/// changed; that batch is then counted again as `loaded`).
pub const BATCHES_DECIDED: &str = "profile_worker_batches_decided_total";
/// Broker failures, by `kind` (`session`: connection or channel lost; `nack`).
pub const BROKER_ERRORS: &str = "profile_worker_broker_errors_total";
/// Replies the broker kept refusing (their queue full, say), dropped after a
/// second of retries.
pub const REPLIES_DROPPED: &str = "profile_worker_replies_dropped_total";
/// Broker connections re-established after a loss.
pub const RECONNECTS: &str = "profile_worker_reconnects_total";
/// Commands dead-lettered, by error `code`.
pub const DEAD_LETTERS: &str = "profile_worker_dead_letters_total";
/// Events committed but not yet confirmed by the broker (outbox rows).
pub const OUTBOX_PENDING: &str = "profile_worker_outbox_pending";
/// Messages ready in the worker's queues, by `queue` (`commands`, `bulk`,
/// `dead_letters`, `email`: the dispatcher's backlog, `email_dead`: the
/// emails it gave up on), as the broker reported them at the last poll.
pub const QUEUE_MESSAGES: &str = "profile_worker_queue_messages";
/// Consumers of those queues, by `queue`, at the last poll: `email` is the
/// email dispatchers reading their queue.
pub const QUEUE_CONSUMERS: &str = "profile_worker_queue_consumers";
/// Outbox events not published because their body could carry a secret onto
/// the events exchange (a row no version of the worker writes); they stay in
/// the outbox.
pub const EVENTS_WITHHELD: &str = "profile_worker_events_withheld_total";
/// Consumers currently taking commands in this process.
pub const CONSUMING: &str = "profile_worker_consumers";

/// The Prometheus recorder could not be installed (kept for every later caller).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot install the metrics recorder")]
pub struct MetricsError(#[source] std::sync::Arc<metrics_exporter_prometheus::BuildError>);

/// Installs the Prometheus recorder once per process and returns its handle.
/// Until it is installed, recording a metric costs nothing and goes nowhere.
pub fn metrics_handle() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let age = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0, 3600.0,
            ];
            let sizes = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(BATCH_SECONDS.into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(COMMAND_AGE_SECONDS.into()), &age)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT_SECONDS.into()), &age)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .and_then(|b| b.install_recorder())
                .map_err(|e| MetricsError(std::sync::Arc::new(e)))?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        COMMANDS,
        "Commands answered, by command, reply status and lane (interactive, bulk)"
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "How long a command waited before its batch, by lane: from its send time when the publisher set one, else from its receipt"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Commands per batch");
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Time a batch spent by stage (decode, load, plan, commit, database, publish, ack, total)"
    );
    describe_histogram!(
        COMMAND_AGE_SECONDS,
        Unit::Seconds,
        "From the command's send time (timestamp_in_ms header, else AMQP timestamp) to its confirmed reply"
    );
    describe_counter!(
        DATABASE_ERRORS,
        "Failed database attempts by kind (transient, permanent)"
    );
    describe_counter!(
        BATCHES_DECIDED,
        "Batches decided, by what on: known (rows read by earlier batches), loaded, changed (a known row had changed)"
    );
    describe_counter!(
        BROKER_ERRORS,
        "Broker failures by kind (session, nack, io_thread: a connection's I/O thread panicked)"
    );
    describe_counter!(RECONNECTS, "Broker reconnections");
    describe_counter!(
        REPLIES_DROPPED,
        "Replies the broker kept refusing, dropped after about a second of retries"
    );
    describe_counter!(DEAD_LETTERS, "Commands dead-lettered, by error code");
    describe_counter!(
        EVENTS_WITHHELD,
        "Outbox events not published: their body could carry a secret onto the events exchange"
    );
    describe_gauge!(
        OUTBOX_PENDING,
        "Events committed and not yet confirmed by the broker"
    );
    describe_gauge!(CONSUMING, "Consumers taking commands in this process");
    describe_gauge!(
        QUEUE_MESSAGES,
        Unit::Count,
        "Messages ready in the command, bulk, dead-letter, email dispatch and email dead-letter queues, polled from the broker"
    );
    describe_gauge!(
        QUEUE_CONSUMERS,
        Unit::Count,
        "Consumers of those queues, polled from the broker (email: the dispatchers)"
    );
    // Present from the start, so a dashboard's rate() sees the first failure.
    metrics::counter!(RECONNECTS).absolute(0);
    metrics::counter!(REPLIES_DROPPED).absolute(0);
    metrics::counter!(EVENTS_WITHHELD).absolute(0);
    for kind in ["transient", "permanent"] {
        metrics::counter!(DATABASE_ERRORS, "kind" => kind).absolute(0);
    }
    for on in ["known", "loaded", "changed"] {
        metrics::counter!(BATCHES_DECIDED, "on" => on).absolute(0);
    }
    for kind in ["session", "nack"] {
        metrics::counter!(BROKER_ERRORS, "kind" => kind).absolute(0);
    }
}
