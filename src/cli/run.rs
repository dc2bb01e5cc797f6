//! `profile-worker run`: the worker until SIGTERM or SIGINT.

use profile_worker::config::Settings;
use tokio_util::sync::CancellationToken;

/// Where spans go, besides the logs (only `run` makes spans worth exporting).
#[derive(clap::Args)]
pub struct Export {
    /// OTLP/HTTP endpoint to export spans to (e.g. http://127.0.0.1:4318);
    /// unset: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The service name exported spans carry.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "profile-worker")]
    pub otel_service_name: String,
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
