//! The operator's commands besides `run`, `migrate` and `seed`: tools that
//! talk to a running worker through the broker. They belong to the binary: the
//! library is the worker.

pub mod dead_letters;
pub mod provision;
pub mod send;

use anyhow::Context;
use profile_worker::broker;
use profile_worker::config::BrokerSettings;

/// The broker connection every one of these commands starts with.
pub async fn connect(settings: &BrokerSettings) -> anyhow::Result<lapin::Connection> {
    let uri = settings.validate()?;
    let tls = settings.tls()?;
    let at = format!("{}:{}", uri.authority.host, uri.authority.port);
    broker::connect(&uri, &tls)
        .await
        .with_context(|| format!("AMQP_URL: cannot connect to {at}"))
}
