//! `profile-worker-bench-consumer`: the bench's other parties as processes of
//! their own, so each one's CPU and run-queue delay is measured apart from the
//! load generator's: `echo` (the no-database ceiling, with or without the
//! contract's events) and `drain` (the events' consumers: the dispatcher's
//! queue, an audit queue). The bench starts them; each prints `ready`.

use clap::{Parser, Subcommand};
use profile_worker::broker::Nodes;
use profile_worker_bench::{ceiling, drain};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
struct Args {
    /// The broker (the bench's vhost).
    #[arg(long)]
    amqp_url: String,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Answer each command at once, as the worker does minus the database.
    Echo {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        consumers: u16,
        #[arg(long)]
        prefetch: u16,
        #[arg(long)]
        batch: usize,
        /// Also publish the contract's events here, confirmed with the reply.
        #[arg(long)]
        events_exchange: Option<String>,
    },
    /// Consume and ack these queues, counting into COUNTS/<queue>.
    Drain {
        #[arg(long, required = true)]
        queue: Vec<String>,
        #[arg(long)]
        counts: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let nodes = match Nodes::parse(&args.amqp_url, |_| {}) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: AMQP_URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.role {
        Role::Echo {
            queue,
            consumers,
            prefetch,
            batch,
            events_exchange,
        } => {
            let shape = ceiling::Shape {
                consumers,
                prefetch,
                max_batch: batch,
                events_exchange,
            };
            ceiling::serve(nodes.first(), &queue, shape).await
        }
        Role::Drain { queue, counts } => drain::run(nodes.first(), &queue, &counts).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", profile_worker::telemetry::Report(&e));
            ExitCode::FAILURE
        }
    }
}
