//! Logging (human-readable by default, JSON lines for log shippers) and the
//! metrics the worker exports. Metric names live here, so the exporter, the
//! code that records them and docs/OPERATIONS.md agree.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint was set at [`init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `make()` when spans are exported, else a disabled span: the spans that
/// exist only for the trace cost nothing when there is none.
pub fn exported_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// The OTLP exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export spans to {endpoint}")]
pub struct OtlpError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Keeps the span exporter running; dropped at exit, it sends what is buffered.
pub struct TraceExport(opentelemetry_sdk::trace::SdkTracerProvider);

impl Drop for TraceExport {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "spans not exported at exit");
        }
    }
}

/// Where OTLP/HTTP wants the spans: the base endpoint (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is specified) plus `/v1/traces`.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Libraries whose verbose levels print what crosses the wire: lapin logs whole
/// frames at trace (command bodies, so access token IDs; replies, so ticket
/// IDs), amq-protocol likewise, and tokio-postgres every statement's parameters
/// at debug (stored replies among them). Whatever `RUST_LOG` asks, they log
/// at most this much (CONTRACT §7: no log line holds a whole access token ID).
pub const WIRE_LOG_CAPS: [(&str, tracing::Level); 3] = [
    ("lapin", tracing::Level::DEBUG),
    ("amq_protocol", tracing::Level::INFO),
    ("tokio_postgres", tracing::Level::INFO),
];

fn wire_safe() -> tracing_subscriber::filter::Targets {
    WIRE_LOG_CAPS.iter().fold(
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing_subscriber::filter::LevelFilter::TRACE),
        |t, &(target, level)| t.with_target(target, level),
    )
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`). With
/// an OTLP endpoint, spans are also exported there (OTLP/HTTP, protobuf, in
/// batches from a thread of the exporter's own), as `service_name`.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    service_name: &str,
) -> Result<Option<TraceExport>, OtlpError> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal, not in a file or a pipe.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(wire_safe())
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(wire_safe())
            .boxed(),
    };
    let (spans, export) = match otlp_endpoint.filter(|e| !e.trim().is_empty()) {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces_url(endpoint))
                .build()
                .map_err(|source| OtlpError {
                    endpoint: endpoint.to_string(),
                    source,
                })?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("profile-worker");
            EXPORTING.store(true, Ordering::Relaxed);
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(TraceExport(provider)),
            )
        }
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init();
    Ok(export)
}

/// Commands answered, by `command` (or `unknown`) and reply `status`.
pub const COMMANDS: &str = "profile_worker_commands_total";
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
/// Messages ready in the worker's queues, by `queue` (`commands`,
/// `dead_letters`, `email`: the dispatcher's backlog), as the broker reported
/// them at the last poll.
pub const QUEUE_MESSAGES: &str = "profile_worker_queue_messages";
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
    describe_counter!(COMMANDS, "Commands answered, by command and reply status");
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
    describe_counter!(BROKER_ERRORS, "Broker failures by kind (session, nack)");
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
        "Messages ready in the command, dead-letter and email dispatch queues, polled from the broker"
    );
    // Present from the start, so a dashboard's rate() sees the first failure.
    metrics::counter!(RECONNECTS).absolute(0);
    metrics::counter!(REPLIES_DROPPED).absolute(0);
    metrics::counter!(EVENTS_WITHHELD).absolute(0);
    for kind in ["transient", "permanent"] {
        metrics::counter!(DATABASE_ERRORS, "kind" => kind).absolute(0);
    }
    for kind in ["session", "nack"] {
        metrics::counter!(BROKER_ERRORS, "kind" => kind).absolute(0);
    }
}

/// An error and its causes on one line, `outer: inner: …`, for log fields and
/// the text of a dead letter's reason (`{:#}` of anyhow, for the library's own
/// errors, whose messages never repeat their source's).
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Access token IDs are bearer secrets: logs carry only enough to correlate.
/// At most 8 characters and at most a quarter of the ID, so a short token is
/// never logged whole.
pub fn token_prefix(id: &str) -> String {
    format!("{}…", id_prefix(id))
}

/// The part of an access token ID that may be shown (logs, `access-tokens
/// list`): at most 8 characters and at most a quarter of the ID.
pub fn id_prefix(id: &str) -> String {
    let n = (id.chars().count() / 4).min(8);
    id.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("commit")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("connection reset"));
        assert_eq!(super::Report(&e).to_string(), "commit: connection reset");
    }

    #[test]
    fn token_prefix_is_short() {
        assert_eq!(
            super::token_prefix("e8f5170c-877b-416f-b70f-4b09772f8e2d"),
            "e8f5170c…"
        );
        assert_eq!(super::token_prefix("tok"), "…");
        assert_eq!(super::token_prefix("12345678"), "12…");
    }
}
