mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use profile_worker::config::{BrokerSettings, DatabaseSettings, Settings};
use profile_worker::store::{SeedFile, Store};
use profile_worker::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// RabbitMQ worker for Crafter Profile's create-ticket and create-verification-token.
#[derive(Parser)]
#[command(name = "profile-worker", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// OTLP/HTTP endpoint to export spans to (e.g. http://127.0.0.1:4318);
    /// unset: nothing is exported.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The service name exported spans carry.
    #[arg(
        long,
        global = true,
        env = "OTEL_SERVICE_NAME",
        default_value = "profile-worker"
    )]
    otel_service_name: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Declare the topology, apply migrations, consume until SIGTERM/SIGINT.
    Run(Box<Settings>),
    /// Apply pending migrations and exit.
    Migrate(DatabaseSettings),
    /// Upsert tenants, access tokens and profiles from a seed file and exit.
    Seed {
        /// JSON seed file (CONTRACT §8).
        file: PathBuf,
        #[command(flatten)]
        db: DatabaseSettings,
    },
    /// Publish one command and print the reply (status and body).
    Send {
        /// create-ticket or create-verification-token.
        command: String,
        /// The JSON body.
        body: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        #[command(flatten)]
        broker: BrokerSettings,
    },
    /// Sends a file of commands (one per line) and writes one result line per input
    /// line; re-running the same file creates nothing twice.
    Provision(Box<cli::provision::ProvisionArgs>),
    /// Make, list, revoke and rotate access tokens (as the schema owner).
    AccessTokens {
        #[command(subcommand)]
        cmd: cli::access_tokens::AccessTokenCmd,
    },
    /// Lists dead letters with their reasons, or re-publishes chosen ones after a fix.
    DeadLetters {
        #[command(subcommand)]
        cmd: cli::dead_letters::DeadLetterCmd,
    },
}

/// Stack for every thread the process starts, unless RUST_MIN_STACK says
/// otherwise. A publisher controls how deeply a command's headers nest, and
/// lapin's AMQP parser (amq-protocol, nom) recurses once per level at about
/// 2 KiB of stack in a release build (several times that unoptimized): the
/// 2 MiB default overflows below a thousand levels and aborts the process,
/// while one 128 KiB header frame can nest some 21,800 (≈ 45 MiB). Copying,
/// re-encoding and dropping such headers recurse as well. The stack is
/// reserved, not committed: it costs address space, not memory.
const THREAD_STACK: usize = if cfg!(debug_assertions) {
    1 << 30
} else {
    128 << 20
};

fn main() -> ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // Before any thread exists (the runtime is built below), so no race.
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string());
    }
    // A thread per core unless TOKIO_WORKER_THREADS says otherwise (tokio reads
    // it). One thread measured within noise of two here (BENCHMARKS.md).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On a runtime thread (with the stack above), not on the main thread.
    runtime.block_on(async { tokio::spawn(run_cli()).await.unwrap_or(ExitCode::FAILURE) })
}

async fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    // Held until the process exits, so buffered spans are sent then.
    let _export = match telemetry::init(
        cli.log_format,
        cli.otlp_endpoint.as_deref(),
        &cli.otel_service_name,
    ) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("error: {}", telemetry::Report(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Run(settings) => run(*settings).await,
        Cmd::Migrate(db) => migrate(db).await,
        Cmd::Seed { file, db } => seed(file, db).await,
        Cmd::Send {
            command,
            body,
            timeout,
            broker,
        } => cli::send::run(
            &broker,
            &command,
            &body,
            std::time::Duration::from_secs(timeout),
        )
        .await
        .map(|(status, reply)| println!("{status} {reply}")),
        Cmd::DeadLetters { cmd } => cli::dead_letters::run(cmd).await,
        Cmd::AccessTokens { cmd } => cli::access_tokens::run(cmd).await,
        Cmd::Provision(args) => match cli::provision::run(*args).await {
            Ok(true) => Ok(()),
            // The summary and the result lines already say what failed.
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context, then each cause.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
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

async fn connect(db: &DatabaseSettings) -> anyhow::Result<Store> {
    let store = Store::connect(db)?;
    store
        .check()
        .await
        .context("DATABASE_URL: cannot connect")?;
    Ok(store)
}

async fn migrate(db: DatabaseSettings) -> anyhow::Result<()> {
    let store = connect(&db).await?;
    let applied = store
        .migrate()
        .await
        .context("DATABASE_URL: migration failed")?;
    if !db.runtime_role.is_empty() {
        store
            .grant_runtime(&db.runtime_role)
            .await
            .context("DATABASE_RUNTIME_ROLE")?;
        println!("row rights granted to {}", db.runtime_role);
    }
    println!(
        "migrations applied: {}",
        if applied.is_empty() {
            "none pending".to_string()
        } else {
            format!("{applied:?}")
        }
    );
    Ok(())
}

async fn seed(file: PathBuf, db: DatabaseSettings) -> anyhow::Result<()> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(&file).with_context(|| name.clone())?;
    let seed = SeedFile::parse(&text).with_context(|| name.clone())?;
    let store = connect(&db).await?;
    store
        .migrate()
        .await
        .context("DATABASE_URL: migration failed")?;
    let r = store.seed(&seed).await.with_context(|| name.clone())?;
    println!(
        "seeded {} tenants, {} access tokens, {} profiles from {}",
        r.tenants,
        r.access_tokens,
        r.profiles,
        file.display()
    );
    Ok(())
}
