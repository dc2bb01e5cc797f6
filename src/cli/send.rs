//! `profile-worker send`: publish one command and print its reply — the quickest
//! way to talk to a running worker from a shell.

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use profile_worker::broker::properties;
use profile_worker::client::{command_properties, reply_channel};

use std::time::Duration;

/// Sends `body` as command `kind` and returns (status, reply body).
pub async fn run(
    settings: &super::Commands,
    kind: &str,
    body: &str,
    timeout: Duration,
) -> anyhow::Result<(i64, String)> {
    let conn = super::connect(&settings.address).await?;
    let (channel, mut replies) = reply_channel(&conn).await?;
    let message_id = uuid::Uuid::new_v4().to_string();
    let props = command_properties(kind, &message_id, &message_id);
    let confirm = channel
        .basic_publish(
            settings.command_exchange.as_str().into(),
            kind.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        anyhow::bail!("the broker refused the command");
    }
    let reply = tokio::time::timeout(timeout, replies.next())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no reply within {} s: is `profile-worker run` running?",
                timeout.as_secs()
            )
        })?
        .context("reply consumer closed")??;
    let status = properties::reply_status(&reply.properties);
    let _ = conn.close(200, "bye".into()).await;
    Ok((status, String::from_utf8_lossy(&reply.data).into_owned()))
}
