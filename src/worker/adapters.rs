//! RabbitMQ and PostgreSQL behind the pipeline's ports (`pipeline::ports`):
//! the only place that joins lapin's channels and the pool to the pipeline.

use crate::broker::{self, Channel, Outgoing, Publisher};
use crate::pipeline::ports::{self, Delivery, Ports, SessionLost, SystemWorld};
use crate::records::{Loaded, NewRecord, OutboxEvent, Versions};
use crate::store::{Batch, Store, StoreError};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

/// The worker's ports: RabbitMQ, PostgreSQL, the system's clock and randomness.
pub struct Real;

impl Ports for Real {
    type Broker = Amqp;
    type Store = Store;
    type World = SystemWorld;
}

/// One consumer's channels: its deliveries' (acks) and its confirm channel.
#[derive(Clone)]
pub struct Amqp {
    pub publisher: Publisher,
    /// `None` for a publisher alone (the outbox relay), which acks nothing.
    pub acks: Option<Channel>,
}

fn lost(e: lapin::Error) -> SessionLost {
    SessionLost(broker::describe(&e))
}

/// A delivery as the pipeline takes it.
pub fn delivery(d: lapin::message::Delivery) -> Delivery {
    Delivery {
        tag: d.delivery_tag,
        routing_key: d.routing_key.to_string(),
        properties: d.properties,
        body: d.data,
    }
}

impl Amqp {
    fn acks(&self) -> Result<&Channel, SessionLost> {
        self.acks
            .as_ref()
            .ok_or_else(|| SessionLost("a publisher has no deliveries to settle".into()))
    }
}

impl ports::Broker for Amqp {
    type Confirms = Vec<lapin::PublisherConfirm>;

    async fn send(&self, messages: Vec<&Outgoing>) -> Result<Self::Confirms, SessionLost> {
        self.publisher.send_each(messages).await.map_err(lost)
    }

    async fn confirmed(&self, confirms: Self::Confirms) -> Result<Vec<bool>, SessionLost> {
        broker::confirmed(confirms).await.map_err(lost)
    }

    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), SessionLost> {
        self.acks()?
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(lost)
    }

    async fn reject(&self, tag: u64, requeue: bool) -> Result<(), SessionLost> {
        self.acks()?
            .basic_reject(tag, BasicRejectOptions { requeue })
            .await
            .map_err(lost)
    }
}

impl ports::Store for Store {
    type Batch<'a> = Batch;

    async fn batch(&self) -> Result<Batch, StoreError> {
        Store::batch(self).await
    }
}

impl ports::StoreBatch for Batch {
    async fn load(
        &self,
        token_ids: &[&str],
        profile_ids: &[&str],
        message_ids: &[&str],
    ) -> Result<Loaded, StoreError> {
        Batch::load(self, token_ids, profile_ids, message_ids).await
    }

    async fn commit(
        &mut self,
        records: &[NewRecord],
        versions: &Versions,
        confirmed: &[Uuid],
        email_cooldown: Duration,
    ) -> Result<HashSet<usize>, StoreError> {
        Batch::commit(self, records, versions, confirmed, email_cooldown).await
    }
}

impl ports::OutboxRows for Store {
    async fn pending(&self) -> Result<u64, StoreError> {
        self.outbox_pending().await
    }

    async fn lease_stale(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.lease_stale_outbox(grace, limit).await
    }

    async fn delete(&self, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        self.delete_outbox(event_ids).await
    }
}
