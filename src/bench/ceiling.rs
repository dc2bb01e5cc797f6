//! The ceiling: a consumer that does everything the worker does with the broker
//! (prefetch window, batch drain, confirmed replies, `ack multiple`) and nothing
//! else — no database, no events. What it reaches is what the broker allows on
//! this machine; the worker's rate is reported as a share of it.

use crate::broker::{self, properties, Outgoing, Publisher};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BODY: &[u8] = br#"{"echo":true}"#;

/// Declares `queue` with `arguments` and starts answering what arrives on it.
pub async fn start(
    uri: &AMQPUri,
    queue: &str,
    arguments: FieldTable,
    prefetch: u16,
    max_batch: usize,
    stop: CancellationToken,
) -> Result<JoinHandle<Result<(), String>>, String> {
    let describe = |e: lapin::Error| format!("ceiling consumer: {}", broker::describe(&e));
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
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(describe)?;
    let publisher = Publisher::open(&conn).await.map_err(describe)?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(describe)?;
    Ok(tokio::spawn(async move {
        let result = async {
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
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
                            properties: properties::reply("create-ticket.reply", correlation, 200),
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
        }
        .await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }))
}
