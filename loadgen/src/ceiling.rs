//! The ceiling: consumers that do everything the worker does with the broker
//! (as many consumers, the same prefetch window and batch drain, confirmed
//! replies, `ack multiple`) and nothing else — no database and, unless asked,
//! no events. What they reach is what the broker allows on this machine; the
//! worker's rate is reported as a share of it.
//!
//! With an events exchange the echo also publishes, per command, the events
//! CONTRACT §5 requires for its type (`ticket.created`, or
//! `verification-token.created` + `email.requested`), persistent and confirmed
//! with the reply. That ceiling asks of the broker everything the worker's
//! answers ask of it, so the distance to it is the database's and the worker's
//! own cost, not the contract's messages. Its replies and events also carry a
//! `traceparent` header, as the worker's do, so the broker parses the same
//! properties.

use crate::error::{BenchError, Result};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use profile_worker::broker::{self, properties, Connection, Outgoing, PublishError, Publisher};
use profile_worker::contract::message::routing;

const BODY: &[u8] = br#"{"echo":true}"#;
// About the size of the worker's reply and email bodies.
const REPLY_BODY: &[u8] = br#"{"tenant":"bench","profileId":"bench-profile-000000000","timestamp":1495746285875,"id":"055d58c4-fabb-44da-96eb-261e24e1d0c9"}"#;
// The shape of the worker's W3C trace context header (the value is immaterial).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const EMAIL_BODY: &[u8] = br#"{"id":"6a0c4b8e-2f6d-5b1e-9d0a-2b5b0f3c1e77","tenant":"bench","profileId":"bench-profile-000000000","to":"bench0@example.com","template":"verify-account","tokenId":"055d58c4-fabb-44da-96eb-261e24e1d0c9","verificationLink":"https://example.com/verify?tokenId=055d58c4-fabb-44da-96eb-261e24e1d0c9","timestamp":1495746285875}"#;

pub struct Shape {
    pub consumers: u16,
    /// Shared out between the consumers, as the worker does.
    pub prefetch: u16,
    pub max_batch: usize,
    /// Where to publish the contract's events for each command; `None`: no events.
    pub events_exchange: Option<String>,
}

/// Declares a durable queue with `arguments` (a quorum queue's, say).
pub async fn declare_durable(
    channel: &lapin::Channel,
    queue: &str,
    arguments: FieldTable,
) -> Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
        .map_err(|e| BenchError::broker(queue, e))
}

fn describe(e: lapin::Error) -> BenchError {
    BenchError::broker("ceiling consumer", e)
}

/// Answers what arrives on `queue` (declared by the bench) until the process
/// ends: the echo as a process of its own, so its CPU is its own.
pub async fn serve(uri: &AMQPUri, queue: &str, shape: Shape) -> Result<()> {
    let conn = broker::connect(uri, &Default::default())
        .await
        .map_err(describe)?;
    let consumers = shape.consumers.max(1);
    let prefetch = shape.prefetch.div_ceil(consumers);
    let mut lanes = Vec::new();
    for _ in 0..consumers {
        lanes.push(
            echo(
                &conn,
                queue,
                prefetch,
                shape.max_batch,
                shape.events_exchange.clone(),
            )
            .await?,
        );
    }
    println!("ready");
    futures_util::future::try_join_all(lanes).await.map(|_| ())
}

async fn echo(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    max_batch: usize,
    events_exchange: Option<String>,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    let channel = conn.create_channel().await.map_err(describe)?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(describe)?;
    let publisher = Publisher::open(conn).await.map_err(describe)?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(describe)?;
    // The events echo's replies carry the worker's headers; the plain echo's do not.
    let traceparent = events_exchange.as_ref().map(|_| TRACEPARENT);
    Ok(async move {
        loop {
            let mut batch = match consumer.next().await {
                Some(d) => vec![d.map_err(describe)?],
                None => {
                    return Err(BenchError::Refused(
                        "the broker cancelled the ceiling consumer".into(),
                    ))
                }
            };
            while batch.len() < max_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    _ => break,
                }
            }
            let mut out: Vec<Outgoing> = batch
                .iter()
                .filter_map(|d| {
                    let p = &d.properties;
                    let reply_to = p.reply_to().as_ref()?.as_str().to_string();
                    let correlation = p.correlation_id().as_ref().map(|c| c.as_str());
                    Some(Outgoing {
                        exchange: String::new(),
                        routing_key: reply_to,
                        properties: properties::reply(
                            "create-ticket.reply",
                            correlation,
                            200,
                            traceparent,
                            None,
                        ),
                        body: BODY.to_vec(),
                    })
                })
                .collect();
            if let Some(exchange) = &events_exchange {
                for d in &batch {
                    out.extend(contract_events(exchange, &d.properties));
                }
            }
            publisher.publish_all(&out).await.map_err(|e| match e {
                PublishError::Channel(e) => describe(e),
                refused => BenchError::Refused(format!("ceiling consumer: {refused}")),
            })?;
            let last = batch.iter().map(|d| d.delivery_tag).max().unwrap_or(0);
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(describe)?;
        }
    })
}

/// The events the worker publishes for a valid command of this type.
fn contract_events(exchange: &str, command: &lapin::BasicProperties) -> Vec<Outgoing> {
    let id = command
        .message_id()
        .as_ref()
        .map_or("", |m| m.as_str())
        .to_string();
    let event = |routing_key: &str, body: &[u8]| Outgoing {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        properties: properties::event(
            routing_key,
            &format!("{id}/{routing_key}"),
            Some(TRACEPARENT),
            None,
        ),
        body: body.to_vec(),
    };
    match command.kind().as_ref().map(|k| k.as_str()) {
        Some("create-verification-token") => vec![
            event(routing::VERIFICATION_TOKEN_CREATED, REPLY_BODY),
            event(routing::EMAIL_REQUESTED, EMAIL_BODY),
        ],
        _ => vec![event(routing::TICKET_CREATED, REPLY_BODY)],
    }
}
