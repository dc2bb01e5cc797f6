//! The realistic topology's other consumers: what an email dispatcher and an
//! audit service do with the events, minus their own work. Each queue is
//! consumed with acks (one `multiple` ack per batch the prefetch window held),
//! so the broker pays for every delivery and ack as it would in production;
//! how many each queue delivered is written to a file per queue every 100 ms,
//! for the bench's checks.

use crate::error::{BenchError, Result};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use profile_worker::broker;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PREFETCH: u16 = 1000;

fn failed(e: lapin::Error) -> BenchError {
    BenchError::broker("drain consumer", e)
}

/// Drains `queues` until the process ends, keeping `counts/<queue>` current.
pub async fn run(uri: &AMQPUri, queues: &[String], counts: &Path) -> Result<()> {
    let conn = broker::connect(uri, &Default::default())
        .await
        .map_err(failed)?;
    let mut lanes = Vec::new();
    let mut counters = Vec::new();
    for queue in queues {
        let channel = conn.create_channel().await.map_err(failed)?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(failed)?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-drain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        let count = Arc::new(AtomicU64::new(0));
        counters.push((counts.join(queue), count.clone()));
        lanes.push(async move {
            while let Some(first) = consumer.next().await {
                let mut last = first.map_err(failed)?.delivery_tag;
                let mut n = 1;
                while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
                    last = d.delivery_tag;
                    n += 1;
                }
                channel
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await
                    .map_err(failed)?;
                count.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(())
        });
    }
    tokio::spawn(write_counts(counters));
    println!("ready");
    futures_util::future::try_join_all(lanes).await.map(|_| ())
}

async fn write_counts(counters: Vec<(PathBuf, Arc<AtomicU64>)>) {
    loop {
        for (path, count) in &counters {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, count.load(Ordering::Relaxed).to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a drain wrote for `queue` (0 before its first write).
pub fn drained(counts: &Path, queue: &str) -> u64 {
    std::fs::read_to_string(counts.join(queue))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}
