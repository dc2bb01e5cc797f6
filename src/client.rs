//! What a publisher of this project sends: a command's properties, and a
//! channel that consumes its own direct replies (`send`, `provision` and the
//! load generator publish this way).

use crate::broker::{Channel, Connection, Consumer};
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

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
