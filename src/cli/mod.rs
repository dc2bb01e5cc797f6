//! The binary's subcommands: `run` (the worker), the schema owner's
//! `migrate`, `seed` and `access-tokens`, and the tools that talk to a running
//! worker through the broker (`send`, `provision`, `dead-letters`). They
//! belong to the binary: the library is the worker.

pub mod access_tokens;
pub mod dead_letters;
pub mod migrate;
pub mod provision;
pub mod run;
pub mod seed;
pub mod send;

use anyhow::Context;
use profile_worker::config::DatabaseSettings;
use profile_worker::store::Store;

use profile_worker::config::{BrokerAddress, DEFAULT_BULK_EXCHANGE, DEFAULT_COMMAND_EXCHANGE};

/// Where the broker tools find the worker: the broker, and the exchange the
/// worker takes commands from. (Only what they use, so `--help` lists nothing
/// of the worker's own settings.)
#[derive(clap::Args, Clone, Debug)]
pub struct Commands {
    #[command(flatten)]
    pub address: BrokerAddress,
    /// Direct exchange the worker takes commands from.
    #[arg(long, env = "COMMAND_EXCHANGE", default_value = DEFAULT_COMMAND_EXCHANGE)]
    pub command_exchange: String,
    /// Direct exchange of the worker's bulk lane (`provision` and
    /// `dead-letters replay --lane bulk` publish there).
    #[arg(long, env = "BULK_EXCHANGE", default_value = DEFAULT_BULK_EXCHANGE)]
    pub bulk_exchange: String,
}

/// Which of the worker's lanes a tool publishes into (CONTRACT §1): the bulk
/// lane for work no one is waiting on, so it never holds up a login.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Interactive,
    Bulk,
}

impl Commands {
    /// The exchange of `lane`.
    pub fn exchange(&self, lane: Lane) -> &str {
        match lane {
            Lane::Interactive => &self.command_exchange,
            Lane::Bulk => &self.bulk_exchange,
        }
    }
}

/// Heartbeat of the tools' connections (a tool that waits on a reply should
/// notice a dead broker within half a minute).
const HEARTBEAT_SECS: u16 = 10;

/// The broker connection every one of these commands starts with.
pub async fn connect(settings: &BrokerAddress) -> anyhow::Result<lapin::Connection> {
    let nodes = profile_worker::broker::nodes(settings, HEARTBEAT_SECS)?;
    let tls = profile_worker::broker::tls(settings)?;
    let (conn, _) = nodes
        .connect(&tls, nodes.random_start())
        .await
        .map_err(|(at, e)| {
            anyhow::Error::new(e).context(format!("AMQP_URL: cannot connect to {at}"))
        })?;
    Ok(conn)
}

/// The database connection of the schema owner's commands, checked at once.
pub async fn connect_database(db: &DatabaseSettings) -> anyhow::Result<Store> {
    let store = Store::connect(db)?;
    store
        .check()
        .await
        .context("DATABASE_URL: cannot connect")?;
    Ok(store)
}
