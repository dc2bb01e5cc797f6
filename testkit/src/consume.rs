//! Consuming for tests: without acks, mapped, forwarded to a channel.

use crate::*;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;

/// The harness's consumer of a test's email dispatch queue.
pub(crate) const EMAIL_CONSUMER: &str = "testkit-emails";

/// A sender into `rx`'s stream besides its own, and the merged stream.
pub(crate) fn merge(
    mut rx: mpsc::UnboundedReceiver<Received>,
) -> (
    mpsc::UnboundedSender<Received>,
    mpsc::UnboundedReceiver<Received>,
) {
    let (tx, merged) = mpsc::unbounded_channel();
    let own = tx.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if own.send(m).is_err() {
                break;
            }
        }
    });
    (tx, merged)
}

/// Everything that arrives on the existing `queue` (taken without acks, as
/// consumer `tag`), made into a `T` by `f` and sent to `tx`.
pub async fn consume_into<T: std::marker::Send + 'static>(
    channel: &Channel,
    queue: &str,
    tag: &str,
    f: fn(&lapin::message::Delivery) -> T,
    tx: mpsc::UnboundedSender<T>,
) {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = tx.send(f(&d));
        }
    });
}

/// A new exclusive server-named queue of `channel`'s user.
pub async fn server_named_queue(channel: &Channel) -> Result<String, lapin::Error> {
    let q = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.name().as_str().to_string())
}

/// An exclusive server-named queue and everything that arrives on it.
pub(crate) async fn subscribe(channel: &Channel) -> (String, mpsc::UnboundedReceiver<Received>) {
    let queue = server_named_queue(channel).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    consume_into(channel, &queue, "", Received::from_delivery, tx).await;
    (queue, rx)
}
