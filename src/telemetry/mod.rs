//! What the worker tells its operators: logs (`logs`: human-readable by
//! default, JSON lines for log shippers), spans over OTLP when asked
//! (`export`), and Prometheus metrics (`metrics`). [`init`] installs the first
//! two.

mod export;
mod logs;
mod metrics;

pub use self::metrics::*;
pub use export::{exported_span, exporting, traces_url, OtlpError, TraceExport};
pub use logs::{id_prefix, token_prefix, LogFormat, Report, WIRE_LOG_CAPS};

use std::sync::atomic::Ordering;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

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
            .with_filter(logs::wire_safe())
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(logs::wire_safe())
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
            export::EXPORTING.store(true, Ordering::Relaxed);
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
