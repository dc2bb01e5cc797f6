//! The ceiling: consumers that do everything the worker does with the broker
//! (as many consumers, the same prefetch window and batch drain, confirmed
//! replies, `ack multiple`) and nothing else — no database, no events. What they
//! reach is what the broker allows on this machine; the worker's rate is
//! reported as a share of it.

use crate::broker::{self, properties, Connection, Outgoing, Publisher};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BODY: &[u8] = br#"{"echo":true}"#;

pub struct Shape {
    pub consumers: u16,
    /// Shared out between the consumers, as the worker does.
    pub prefetch: u16,
    pub max_batch: usize,
}

fn describe(e: lapin::Error) -> String {
    format!("ceiling consumer: {}", broker::describe(&e))
}

/// Declares `queue` with `arguments` and starts answering what arrives on it.
pub async fn start(
    uri: &AMQPUri,
    queue: &str,
    arguments: FieldTable,
    shape: Shape,
    stop: CancellationToken,
) -> Result<JoinHandle<Result<(), String>>, String> {
    let conn = broker::connect(uri).await.map_err(describe)?;
    let channel = conn.create_channel().await.map_err(describe)?;
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
        .map_err(describe)?;
    let _ = channel.close(200, "declared".into()).await;
    let consumers = shape.consumers.max(1);
    let prefetch = shape.prefetch.div_ceil(consumers);
    let mut lanes = Vec::new();
    for _ in 0..consumers {
        lanes.push(echo(&conn, queue, prefetch, shape.max_batch, stop.clone()).await?);
    }
    Ok(tokio::spawn(async move {
        let result = futures_util::future::try_join_all(lanes).await.map(|_| ());
        let _ = conn.close(200, "bye".into()).await;
        result
    }))
}

async fn echo(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    max_batch: usize,
    stop: CancellationToken,
) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
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
    Ok(async move {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => {
                    publisher.close().await;
                    let _ = channel.close(200, "done".into()).await;
                    return Ok(());
                }
                d = consumer.next() => d,
            };
            let mut batch = match first {
                Some(d) => vec![d.map_err(|e| e.to_string())?],
                None => return Err("the broker cancelled the ceiling consumer".to_string()),
            };
            while batch.len() < max_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    _ => break,
                }
            }
            let out: Vec<Outgoing> = batch
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
                            None,
                        ),
                        body: BODY.to_vec(),
                    })
                })
                .collect();
            publisher
                .publish_all(&out)
                .await
                .map_err(|e| e.to_string())?;
            let last = batch.iter().map(|d| d.delivery_tag).max().unwrap_or(0);
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| e.to_string())?;
        }
    })
}
