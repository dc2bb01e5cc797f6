//! `profile-worker-bench`: an honest load generator for profile-worker. It seeds its own database
//! and vhost, starts real worker processes, publishes real commands through the
//! broker with confirms, checks every reply and the rows and events left behind,
//! and reports rate, latency, CPU per 1,000 commands and peak RSS. With
//! `--ceiling` it alternates rounds with an echo consumer that does no database
//! work, and reports the worker's rate as a share of that. `--ceiling-events`
//! adds a third target, an echo that also publishes the contract's events, so one
//! run tells how much of the distance is the broker's work for those events and
//! how much the database's and the worker's.

mod args;
mod bench;
pub mod ceiling;
mod checks;
pub mod drain;
mod error;
mod isolation;
mod load;
mod meter;
pub mod mix;
mod plan;
mod prepared;
mod report;
mod setup;
pub mod stats;

pub use args::BenchArgs;
pub use checks::Checks;
pub use error::BenchError;
pub use meter::{CpuSplit, Stages};
pub use plan::Mix;
pub use report::{Report, RoundRow, Summary};

use error::Result;
use isolation::Isolation;

const BENCH_TENANT: &str = "bench";
/// The events ceiling's rounds, in the report.
const EVENTS_CEILING: &str = "ceiling-events";
const BENCH_TOKEN: &str = "bench-admin-token";

/// The lanes benchmark (`--import`): prints its table, appends its report to
/// `--json`; fails when the interactive caller got a wrong answer.
pub async fn run_mix(args: BenchArgs) -> Result<mix::MixReport> {
    let report = isolated(&args, |db, iso| {
        let args = args.clone();
        async move { bench::run_mix_isolated(&args, &db, &iso).await }
    })
    .await?;
    mix::print(&report);
    append_json(&args, &report)?;
    if report.problems.is_empty() {
        Ok(report)
    } else {
        Err(BenchError::Wrong(report.problems))
    }
}

/// Runs `f` in a database and vhost of its own, removed afterwards (unless
/// `--keep`), also when interrupted.
async fn isolated<T, F, Fut>(args: &BenchArgs, f: F) -> Result<T>
where
    F: FnOnce(String, Isolation) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let db = format!("pw_bench_{id}");
    let vhost = format!("pw-bench-{id}");
    setup::create_database(&args.database_url, &db).await?;
    let isolation = match setup::create_vhost(&args.amqp_url, &vhost).await {
        Ok(()) => Isolation::Vhost(vhost),
        Err(e) => {
            eprintln!("bench: no vhost of its own ({e}); using the name prefix {vhost}. instead");
            Isolation::Prefix(format!("{vhost}."))
        }
    };
    // Interrupted, the run still removes what it made (the worker processes are
    // killed when their handles drop).
    let result = tokio::select! {
        r = f(db.clone(), isolation.clone()) => r,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    };
    if args.keep {
        eprintln!("bench: kept database {db} and {}", isolation.describe());
    } else {
        let db_dropped = setup::drop_database(&args.database_url, &db).await;
        let broker_cleaned = isolation.remove(&args.amqp_url).await;
        for r in [db_dropped, broker_cleaned] {
            if let Err(e) = r {
                eprintln!("bench: cleanup: {e}");
            }
        }
    }
    result
}

/// Appends `report` as one JSON line to `--json`, when given.
fn append_json(args: &BenchArgs, report: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = &args.json {
        use std::io::Write;
        let line = serde_json::to_string(report).expect("reports always serialize");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"))
            .map_err(|e| BenchError::io(path.display().to_string(), e))?;
    }
    Ok(())
}

/// Runs the benchmark, prints the report, appends it to `--json`; fails when any
/// reply, row, event or dead letter is not what the commands must produce.
pub async fn run(mut args: BenchArgs) -> Result<Report> {
    args.ceiling |= args.ceiling_events;
    if !(0.0..=1.0).contains(&args.invalid_share) {
        return Err(BenchError::Usage(
            "--invalid-share must be between 0 and 1".into(),
        ));
    }
    let report = isolated(&args, |db, iso| {
        let args = args.clone();
        async move { bench::run_isolated(&args, &db, &iso).await }
    })
    .await?;
    report::print(&report);
    append_json(&args, &report)?;
    if report.is_correct() {
        Ok(report)
    } else {
        Err(BenchError::Wrong(report.checks.problems))
    }
}
