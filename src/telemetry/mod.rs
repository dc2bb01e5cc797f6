//! What the worker tells its operators: logs (`logs`: human-readable by
//! default, JSON lines for log shippers), spans over OTLP when the standard
//! `OTEL_*` variables ask for them (`export`), and Prometheus metrics
//! (`metrics`). [`init`] installs the first two.

mod export;
mod logs;
mod metrics;

pub use self::metrics::*;
pub use export::{
    exported_span, exporting, plan, traces_url, ExportPlan, Fallbacks, OtlpError, OtlpProtocol,
    TraceExport, DEFAULT_SERVICE_NAME,
};
pub use logs::{id_prefix, token_prefix, LogFormat, Report, WIRE_LOG_CAPS};

use std::sync::atomic::Ordering;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Installs the global subscriber; `RUST_LOG` filters (default `info`). With
/// `export` (the worker's fallbacks; `None`: a command whose spans are not
/// exported), spans are also exported over OTLP when the `OTEL_*` variables
/// ask for it ([`plan`]), in batches from a thread of the SDK's.
pub fn init(
    format: LogFormat,
    export: Option<Fallbacks<'_>>,
) -> Result<Option<TraceExport>, OtlpError> {
    use opentelemetry::trace::TracerProvider as _;
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
    let planned = match export {
        Some(fallbacks) => plan(|name| std::env::var(name).ok(), fallbacks)?,
        None => None,
    };
    let (spans, export) = match planned {
        None => (None, None),
        Some(plan) => {
            let (exporter, runtime) = span_exporter(&plan)?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            if let Some(name) = plan.service_name {
                resource = resource.with_service_name(name);
            }
            // The sampler (OTEL_TRACES_SAMPLER[_ARG]) and the batching
            // (OTEL_BSP_*) are the SDK's defaults, read from the environment.
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let tracer = provider.tracer("profile-worker");
            export::EXPORTING.store(true, Ordering::Relaxed);
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(TraceExport { provider, runtime }),
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

/// The exporter for the plan's protocol; the SDK reads the endpoint (unless
/// the plan fills it in), headers, timeout and compression from the
/// environment. gRPC's channel is made on a runtime of its own, which then
/// carries every export.
fn span_exporter(
    plan: &ExportPlan,
) -> Result<
    (
        opentelemetry_otlp::SpanExporter,
        Option<tokio::runtime::Runtime>,
    ),
    OtlpError,
> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithTonicConfig};
    let built = |source| OtlpError::Build {
        protocol: plan.protocol,
        source,
    };
    match plan.protocol {
        OtlpProtocol::Grpc => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .map_err(OtlpError::Runtime)?;
            let _inside = runtime.enter();
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &plan.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if plan.tls {
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_native_roots(),
                );
            }
            let exporter = builder.build().map_err(built)?;
            drop(_inside);
            Ok((exporter, Some(runtime)))
        }
        OtlpProtocol::HttpProtobuf | OtlpProtocol::HttpJson => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(if plan.protocol == OtlpProtocol::HttpJson {
                    Protocol::HttpJson
                } else {
                    Protocol::HttpBinary
                });
            if let Some(endpoint) = &plan.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            Ok((builder.build().map_err(built)?, None))
        }
    }
}
