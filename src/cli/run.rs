//! `profile-worker run`: the worker until SIGTERM or SIGINT.

use profile_worker::config::Settings;
use tokio_util::sync::CancellationToken;

/// Where spans go, besides the logs (only `run` makes spans worth exporting).
/// The standard `OTEL_*` variables configure the export (docs/OPERATIONS.md,
/// "Spans"); these flags only fill in what they leave unset.
#[derive(clap::Args)]
pub struct Export {
    /// OTLP endpoint to export spans to when neither
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT nor OTEL_EXPORTER_OTLP_ENDPOINT is
    /// set (e.g. http://127.0.0.1:4318; OTEL_EXPORTER_OTLP_PROTOCOL picks grpc,
    /// http/protobuf or http/json); nothing set: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The service name exported spans carry when neither OTEL_SERVICE_NAME
    /// nor OTEL_RESOURCE_ATTRIBUTES names one [default: profile-worker].
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

impl Export {
    pub fn fallbacks(&self) -> profile_worker::telemetry::Fallbacks<'_> {
        profile_worker::telemetry::Fallbacks {
            endpoint: self.otlp_endpoint.as_deref(),
            service_name: self.otel_service_name.as_deref(),
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub export: Export,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let worker = profile_worker::worker::Worker::build(settings).await?;
    worker.run_until_stopped(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
