//! Publishing with publisher confirms: every message of a batch is sent pipelined,
//! then each one's own confirm is awaited (not `wait_for_confirms`, which says
//! nothing about a particular publish). A nack is a failure.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Connection};

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused some messages (e.g. a full queue with reject-publish); retrying may help.
    #[error("broker nacked {0} of the published messages")]
    Nacked(usize),
    /// The channel or connection is gone; the session must be rebuilt.
    #[error("publishing failed: {0}")]
    Channel(#[from] lapin::Error),
}

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Returns once the broker confirmed every message.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), PublishError> {
        let acked = self.publish_each(messages).await?;
        match acked.iter().filter(|a| !**a).count() {
            0 => Ok(()),
            n => Err(PublishError::Nacked(n)),
        }
    }

    /// Publishes every message and says, for each, whether the broker took it
    /// (ack) or refused it (nack), so a caller can retry just the refused ones.
    pub async fn publish_each(&self, messages: &[Outgoing]) -> Result<Vec<bool>, lapin::Error> {
        confirmed(self.send_each(messages).await?).await
    }

    /// Publishes every message without waiting for the broker's confirms; each
    /// one's confirm is returned, in the messages' order ([`confirmed`]).
    pub async fn send_each<'a>(
        &self,
        messages: impl IntoIterator<Item = &'a Outgoing>,
    ) -> Result<Vec<PublisherConfirm>, lapin::Error> {
        // lapin's `basic_publish` resolves only once its I/O thread has written the
        // frames; awaiting them one by one costs two thread hand-offs per message.
        // Started together, the I/O thread writes the whole batch in a few syscalls.
        // Each publish takes its delivery tag and queues its frames in the same
        // poll, so tags and wire order agree whatever order they are polled in.
        let sent = futures_util::future::join_all(messages.into_iter().map(|m| {
            self.channel.basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                m.properties.clone(),
            )
        }))
        .await;
        sent.into_iter().collect()
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// Waits for each confirm: `true` for an ack, `false` for a nack.
pub async fn confirmed(confirms: Vec<PublisherConfirm>) -> Result<Vec<bool>, lapin::Error> {
    let mut acked = Vec::with_capacity(confirms.len());
    for c in confirms {
        acked.push(c.await?.is_ack());
    }
    Ok(acked)
}
