//! What the pipeline needs from the world, as traits of its own: the broker
//! (deliveries in; acks, rejects and publications out, confirms back), the
//! store (a batch's load and commit; the outbox's rows), and the clock and
//! randomness. The worker plugs in RabbitMQ and PostgreSQL (`worker::adapters`);
//! the simulation (`tests/simulation`) plugs in in-memory ones driven by one
//! seed. Nothing here names lapin or tokio-postgres: AMQP's properties are the
//! message model's (`broker::Properties`), errors are the pipeline's own.

use crate::broker::{Outgoing, Properties};
use crate::records::{Loaded, NewRecord, OutboxEvent, StoredReply, Versions};
use crate::store::StoreError;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// The broker session the pipeline was using is gone: the worker rebuilds it,
/// and the deliveries it had not acked return to their queue.
#[derive(Debug, thiserror::Error)]
#[error("broker session lost: {0}")]
pub struct SessionLost(pub String);

/// A command as the broker delivered it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The delivery tag, on the channel that acks it.
    pub tag: u64,
    pub routing_key: String,
    pub properties: Properties,
    pub body: Vec<u8>,
}

/// One consumer's channels: the one its deliveries came on (acks, rejects)
/// and the confirm channel it publishes on.
pub trait Broker: Clone + Send + Sync + 'static {
    /// Confirms of messages sent and not yet awaited.
    type Confirms: Send + 'static;

    /// Publishes every message, in order, without waiting for the confirms.
    fn send(
        &self,
        messages: Vec<&Outgoing>,
    ) -> impl Future<Output = Result<Self::Confirms, SessionLost>> + Send;

    /// Waits for each confirm: `true` for an ack, `false` for a nack.
    fn confirmed(
        &self,
        confirms: Self::Confirms,
    ) -> impl Future<Output = Result<Vec<bool>, SessionLost>> + Send;

    /// Acks `tag` (and, with `multiple`, every unsettled tag below it).
    fn ack(&self, tag: u64, multiple: bool)
        -> impl Future<Output = Result<(), SessionLost>> + Send;

    /// Rejects `tag`: back to the queue (`requeue`), else to its dead-lettering.
    fn reject(
        &self,
        tag: u64,
        requeue: bool,
    ) -> impl Future<Output = Result<(), SessionLost>> + Send;

    /// Publishes and waits: for each message, whether the broker took it.
    fn publish_each(
        &self,
        messages: &[Outgoing],
    ) -> impl Future<Output = Result<Vec<bool>, SessionLost>> + Send {
        async move {
            let confirms = self.send(messages.iter().collect()).await?;
            self.confirmed(confirms).await
        }
    }
}

/// The store a pipeline commits to.
pub trait Store: Clone + Send + Sync + 'static {
    type Batch<'a>: StoreBatch + Send
    where
        Self: 'a;

    /// A batch's connection, for its load and its commit.
    fn batch(&self) -> impl Future<Output = Result<Self::Batch<'_>, StoreError>> + Send;
}

/// One batch's round trips.
pub trait StoreBatch: Send + Sync {
    /// The tokens, profiles and earlier replies a batch refers to (each reply
    /// with its events still in the outbox, confirmed ones included).
    fn load(
        &self,
        token_ids: &[&str],
        profile_ids: &[&str],
        message_ids: &[&str],
    ) -> impl Future<Output = Result<Loaded, StoreError>> + Send;

    /// Writes the batch in one transaction if every row in `versions` is
    /// unchanged (else an error for which `is_rows_changed` holds, nothing
    /// written), deleting the `confirmed` events' rows on the way. Returns the
    /// records whose message_id another transaction committed first.
    fn commit(
        &mut self,
        records: &[NewRecord],
        versions: &Versions,
        confirmed: &[Uuid],
        email_cooldown: Duration,
    ) -> impl Future<Output = Result<HashSet<usize>, StoreError>> + Send;

    /// The replies stored for these message_ids by other transactions.
    fn stored_replies(
        &self,
        message_ids: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, StoredReply>, StoreError>> + Send {
        async move { Ok(self.load(&[], &[], message_ids).await?.processed) }
    }
}

/// The outbox's rows, as the relay sees them (`crate::outbox`).
pub trait OutboxRows: Clone + Send + Sync + 'static {
    /// Rows not yet deleted, confirmed ones included.
    fn pending(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Claims up to `limit` rows older than `grace` for re-publication,
    /// moving their age forward so no other relay takes them meanwhile.
    fn lease_stale(
        &self,
        grace: Duration,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;

    fn delete(&self, event_ids: &[Uuid]) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The clock and the randomness a batch's decisions use.
pub trait World: Send + Sync + 'static {
    /// Now, in milliseconds since the epoch.
    fn now_ms(&self) -> i64;
    /// A fresh random ID (tickets, verification tokens, events).
    fn new_id(&self) -> Uuid;
    /// 24 random bytes: a new trace's ID and span ID.
    fn trace_ids(&self) -> [u8; 24];
}

/// The real clock and the operating system's randomness.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemWorld;

impl World for SystemWorld {
    fn now_ms(&self) -> i64 {
        crate::store::epoch_millis(std::time::SystemTime::now())
    }

    fn new_id(&self) -> Uuid {
        Uuid::new_v4()
    }

    fn trace_ids(&self) -> [u8; 24] {
        crate::trace::random_ids()
    }
}

/// The three a pipeline runs on.
pub trait Ports: Send + Sync + 'static {
    type Broker: Broker;
    type Store: Store;
    type World: World;
}
