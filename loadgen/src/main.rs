//! `profile-worker-bench`: see the library's docs and BENCHMARKS.md.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args = profile_worker_bench::BenchArgs::parse();
    // Logs only: the bench's own spans are not exported.
    let _ = profile_worker::telemetry::init(profile_worker::telemetry::LogFormat::Text, None);
    let done = if args.import > 0 {
        profile_worker_bench::run_mix(args).await.map(|_| ())
    } else {
        profile_worker_bench::run(args).await.map(|_| ())
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", profile_worker::telemetry::Report(&e));
            ExitCode::FAILURE
        }
    }
}
