mod cli;

use clap::{Parser, Subcommand};
use profile_worker::config::DatabaseSettings;
use profile_worker::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

/// RabbitMQ worker for Crafter Profile's create-ticket and create-verification-token.
#[derive(Parser)]
#[command(name = "profile-worker", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Declare the topology, apply migrations, consume until SIGTERM/SIGINT.
    Run(Box<cli::run::RunArgs>),
    /// Apply pending migrations and exit (`--status`: list them, change nothing).
    Migrate(cli::migrate::MigrateArgs),
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
        /// The JSON body; absent or `-`: read from standard input. It holds an
        /// access token: given here, it is visible to every user of the machine
        /// (the process list) and stays in the shell's history.
        body: Option<String>,
        /// Read the JSON body from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "body")]
        file: Option<PathBuf>,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        #[command(flatten)]
        broker: cli::Commands,
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
    let export = match &cli.command {
        Cmd::Run(args) => Some(&args.export),
        _ => None,
    };
    // Held until the process exits, so buffered spans are sent then.
    // Only `run` exports spans: the other commands' are not worth a collector.
    let fallbacks = export.map(cli::run::Export::fallbacks);
    let _export = match telemetry::init(cli.log_format, fallbacks) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("error: {}", telemetry::Report(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Run(args) => cli::run::run(args.settings).await,
        Cmd::Migrate(args) => cli::migrate::migrate(args).await,
        Cmd::Seed { file, db } => cli::seed::seed(file, db).await,
        Cmd::Send {
            command,
            body,
            file,
            timeout,
            broker,
        } => match cli::send::body(body, file) {
            Ok(body) => cli::send::run(
                &broker,
                &command,
                &body,
                std::time::Duration::from_secs(timeout),
            )
            .await
            .map(|(status, reply)| println!("{status} {reply}")),
            Err(e) => Err(e),
        },
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
