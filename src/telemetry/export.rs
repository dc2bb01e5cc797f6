//! Spans exported over OTLP/HTTP when an endpoint is set, and the spans that
//! exist only for that export.

use std::sync::atomic::{AtomicBool, Ordering};

pub(super) static EXPORTING: AtomicBool = AtomicBool::new(false);

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
    pub(super) endpoint: String,
    #[source]
    pub(super) source: opentelemetry_otlp::ExporterBuildError,
}

/// Keeps the span exporter running; dropped at exit, it sends what is buffered.
pub struct TraceExport(pub(super) opentelemetry_sdk::trace::SdkTracerProvider);

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
