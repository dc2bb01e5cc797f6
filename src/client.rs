//! `profile-worker send`: publish one command and print its reply — the quickest
//! way to talk to a running worker from a shell.

use crate::broker::{self, properties, Channel, Connection, Consumer};
use crate::config::BrokerSettings;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::time::Duration;

/// RabbitMQ's direct reply-to pseudo-queue: no queue to create or clean up.
pub use crate::contract::DIRECT_REPLY_TO;

/// A confirm channel consuming its own direct replies. Commands whose replies
/// should come back here must be published on this same channel.
pub async fn reply_channel(conn: &Connection) -> Result<(Channel, Consumer), lapin::Error> {
    let channel = conn.create_channel().await?;
    let replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((channel, replies))
}

/// Sends `body` as command `kind` and returns (status, reply body).
pub async fn send(
    settings: &BrokerSettings,
    kind: &str,
    body: &str,
    timeout: Duration,
) -> Result<(i64, String), String> {
    let uri = settings.validate().map_err(|e| e.to_string())?;
    let conn = broker::connect(&uri, &settings.tls().map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("AMQP_URL: cannot connect: {}", broker::describe(&e)))?;
    let (channel, mut replies) = reply_channel(&conn).await.map_err(|e| e.to_string())?;
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
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err("the broker refused the command".into());
    }
    let reply = tokio::time::timeout(timeout, replies.next())
        .await
        .map_err(|_| {
            format!(
                "no reply within {} s: is `profile-worker run` running?",
                timeout.as_secs()
            )
        })?
        .ok_or("reply consumer closed")?
        .map_err(|e| e.to_string())?;
    let status = properties::reply_status(&reply.properties);
    let _ = conn.close(200, "bye".into()).await;
    Ok((status, String::from_utf8_lossy(&reply.data).into_owned()))
}

/// A command's properties as this project's publishers send it: JSON,
/// persistent, replies by direct reply-to, and the send time (the AMQP
/// `timestamp` and a `timestamp_in_ms` header) the worker's command-age metric
/// is measured from.
pub fn command_properties(kind: &str, message_id: &str, correlation_id: &str) -> BasicProperties {
    let now = crate::broker::properties::now_ms();
    let mut headers = FieldTable::default();
    headers.insert(
        crate::broker::properties::TIMESTAMP_MS_HEADER.into(),
        lapin::types::AMQPValue::LongLongInt(now as i64),
    );
    BasicProperties::default()
        .with_type(kind.into())
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_correlation_id(correlation_id.into())
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_delivery_mode(2)
        .with_timestamp(now / 1000)
        .with_headers(headers)
}
