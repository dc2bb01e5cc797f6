//! The bench's command line.

use crate::plan::Mix;
use profile_worker::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};
use std::path::PathBuf;

/// Publishes real commands to real `profile-worker run` processes through the
/// broker, checks every reply, row and event, and reports speed (BENCHMARKS.md).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "profile-worker-bench", version, about)]
pub struct BenchArgs {
    /// Commands per measured round.
    #[arg(long, short = 'n', default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub commands: u64,
    /// Most commands in flight (published and not yet answered). With --rate or
    /// --load-percent it only caps what is outstanding.
    #[arg(long, short = 'w', default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub in_flight: u64,
    /// Open loop: send the measured rounds on a fixed schedule of this many
    /// commands per second, latency counted from when each command was due.
    #[arg(long, conflicts_with = "load_percent")]
    pub rate: Option<f64>,
    /// After the closed-loop rounds, which measure the worker's maximum rate,
    /// open-loop rounds at these percentages of it (e.g. 10,25,50,75,90), every
    /// target alternated at each load: a latency-against-load curve.
    #[arg(long, value_delimiter = ',')]
    pub load_percent: Vec<f64>,
    /// After the closed-loop rounds, open-loop rounds at these absolute rates
    /// (commands per second, e.g. 1000,2000,4000), every target alternated at
    /// each: latency and every party's CPU at the same offered load, and the
    /// knee (the highest of them with p99 ≤ 50 ms, over each target's own
    /// closed-loop rate).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// How long each round of --rates lasts, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub rate_secs: f64,
    /// How long each open-loop round of --load-percent lasts, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub open_loop_secs: f64,
    /// Which commands to send.
    #[arg(long, value_enum, default_value_t = Mix::Both)]
    pub mix: Mix,
    /// Share of commands that must be refused (400, 403 and 404 in turn), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_share: f64,
    /// Also measure the no-database echo consumer, alternating rounds with the worker.
    #[arg(long)]
    pub ceiling: bool,
    /// Also measure a second echo consumer that publishes, with each reply, the
    /// events the contract requires for the command's type (as if every command
    /// were valid), so it asks of the broker what the worker's answers ask of it.
    /// Its rounds alternate with the other two; the report gives the worker's rate
    /// against both ceilings, and this ceiling's against the plain one: the most a
    /// worker whose database and own work cost nothing could reach. Implies --ceiling.
    #[arg(long)]
    pub ceiling_events: bool,
    /// Measured rounds per target.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Commands sent to each target before measuring (checked, not reported).
    #[arg(long, default_value_t = 1_000)]
    pub warmup: u64,
    /// Worker processes consuming the same queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub workers: u64,
    /// The workers' EMAIL_COOLDOWN_SECS. Commands cycle through the profiles, so
    /// with a cooldown most verification commands would be answered 429, which
    /// costs less than making a token: 0 (the default) measures full work.
    #[arg(long, default_value_t = 0)]
    pub email_cooldown_secs: u64,
    /// The workers' BATCH_WAIT_MS (unset: their default).
    #[arg(long)]
    pub batch_wait_ms: Option<u64>,
    /// Profiles seeded; commands cycle through them.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub profiles: u64,
    /// Prefetch of the worker and of the echo consumer.
    #[arg(long, env = "PREFETCH", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// The workers' BULK_PREFETCH: bulk commands each may hold at once.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u16).range(1..))]
    pub bulk_prefetch: u16,
    /// The workers' BULK_SHARE_PERCENT (unset: their default).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub bulk_share_percent: Option<u8>,
    /// Consumers per worker process, and of the echo consumer.
    #[arg(long, env = "CONSUMERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub consumers: u16,
    /// Most commands per batch, for the worker and the echo consumer.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 250, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// The lanes benchmark instead of the rounds above: an interactive caller
    /// (create-ticket, one at a time) alone for --idle-secs, then during an
    /// import of this many fire-and-forget create-tickets, published as fast
    /// as the broker confirms them into each of --import-lanes in turn,
    /// --rounds times (BENCHMARKS.md, "A login during a bulk import").
    #[arg(long, default_value_t = 0)]
    pub import: u64,
    /// Where the imports go, alternated: interactive (one queue for
    /// everything) and bulk.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "interactive,bulk"
    )]
    pub import_lanes: Vec<ImportLane>,
    /// How long the interactive caller runs alone before each import, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// An open-loop interactive load (fire-and-forget create-ticket, per
    /// second) through each import, besides the caller.
    #[arg(long)]
    pub steady_rate: Option<f64>,
    /// Append the results as one JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up when no reply arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub stall_secs: u64,
    /// Keep the database, vhost and worker logs afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Worker executable (default: `profile-worker` beside this program).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Declare the command and dead-letter queues without length bounds, as
    /// workers before them did, to compare against such a build (`--worker-bin`).
    #[arg(long)]
    pub unbounded_queues: bool,
    /// PostgreSQL URL the run's own database is created through (and dropped afterwards).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true, hide_default_value = true)]
    pub database_url: String,
    /// AMQP URL of the broker; the run creates its own vhost there.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
}

/// Where the import goes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportLane {
    /// The command queue, with the interactive caller: one lane for everything.
    Interactive,
    /// The bulk lane.
    Bulk,
}
