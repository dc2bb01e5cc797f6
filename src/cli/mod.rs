//! The operator's commands besides `run`, `migrate` and `seed`: tools that
//! talk to a running worker through the broker, and access-token
//! administration. They belong to the binary: the library is the worker.

pub mod access_tokens;
pub mod dead_letters;
pub mod provision;
pub mod send;

use profile_worker::config::BrokerSettings;

/// The broker connection every one of these commands starts with.
pub async fn connect(settings: &BrokerSettings) -> anyhow::Result<lapin::Connection> {
    let nodes = settings.validate()?;
    let tls = settings.tls()?;
    let (conn, _) = nodes
        .connect(&tls, nodes.random_start())
        .await
        .map_err(|(at, e)| {
            anyhow::Error::new(e).context(format!("AMQP_URL: cannot connect to {at}"))
        })?;
    Ok(conn)
}
