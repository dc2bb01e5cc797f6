//! The transactional outbox: how an event reaches the broker at least once.
//!
//! 1. The batch's commit writes each event's row in the same transaction as the
//!    ticket or token it announces (`store::Batch::commit`).
//! 2. The pipeline publishes the event right after the commit, on the
//!    session's [`EventPublisher`]; the command is acked without waiting for the
//!    event's confirm (its row is what guarantees it). Once the broker confirms
//!    it, its ID joins the worker's [`ConfirmedEvents`] and its row is deleted
//!    by the next commit, saving a transaction per batch.
//! 3. The relay here deletes confirmed rows when no commit comes along, and
//!    re-publishes rows whose confirm never came (the worker died in between,
//!    the broker refused the event) once they are `OUTBOX_GRACE_SECS` old.
//!
//! A row is deleted only after its event was confirmed, so an event is lost
//! only with the database; it may be published twice (a crash between confirm
//! and delete), which is why events carry their `event_id` as `message_id`.

use crate::broker::{self, properties, Outgoing, Publisher};
use crate::config::{BrokerSettings, Settings};
use crate::contract::message;
use crate::records::OutboxEvent;
use crate::store::{ConfirmedEvents, Store, StoreError};
use crate::telemetry::{self, Report};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How soon confirmed outbox rows are deleted when no commit takes them along.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Events re-published per relay pass.
const RELAY_BATCH: i64 = 500;
/// Batches' events awaiting their confirms before a batch that publishes
/// events waits: bounds what a broker slow to confirm can make the worker hold.
const UNSETTLED_BATCHES: usize = 64;

/// Publishes committed batches' events on one confirm channel per session,
/// shared by its consumers, and settles their confirms off the batches' path:
/// a batch is acked once committed and its replies confirmed, not after the
/// fsync of every queue its events reach. A confirmed event's ID joins
/// [`ConfirmedEvents`]; a refused one, or one whose confirm never comes
/// (the channel is lost), keeps its row for the relay.
#[derive(Clone)]
pub struct EventPublisher {
    publisher: Publisher,
    unsettled: tokio::sync::mpsc::Sender<Unsettled>,
}

struct Unsettled {
    event_ids: Vec<Uuid>,
    confirms: Vec<lapin::PublisherConfirm>,
}

impl EventPublisher {
    /// The publisher, and its settling task: that ends, and closes the
    /// channel, once every clone of the publisher is dropped and what they
    /// sent is settled.
    pub fn start(
        publisher: Publisher,
        confirmed: ConfirmedEvents,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(UNSETTLED_BATCHES);
        let settling = tokio::spawn(settle(rx, confirmed, publisher.clone()));
        (
            EventPublisher {
                publisher,
                unsettled: tx,
            },
            settling,
        )
    }

    /// Sends committed events, each with the ID of its outbox row, without
    /// waiting for their confirms. Waits only when [`UNSETTLED_BATCHES`]
    /// batches' events are unconfirmed already.
    pub async fn send(&self, events: Vec<(Outgoing, Uuid)>) -> Result<(), lapin::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let confirms = self
            .publisher
            .send_each(events.iter().map(|(o, _)| o))
            .await?;
        let event_ids = events.into_iter().map(|(_, id)| id).collect();
        // Only fails when the session is ending: the rows stay for the relay.
        let _ = self
            .unsettled
            .send(Unsettled {
                event_ids,
                confirms,
            })
            .await;
        Ok(())
    }
}

/// Awaits each batch's confirms in the order they were sent (the order the
/// broker confirms them in, on one channel).
async fn settle(
    mut unsettled: tokio::sync::mpsc::Receiver<Unsettled>,
    confirmed: ConfirmedEvents,
    channel: Publisher,
) {
    while let Some(u) = unsettled.recv().await {
        let acked = match broker::confirmed(u.confirms).await {
            Ok(acked) => acked,
            Err(e) => {
                tracing::debug!(error = %broker::describe(&e), events = u.event_ids.len(), "event confirms lost with the channel; the relay will re-publish them");
                continue;
            }
        };
        let sent = acked.len();
        let ok: Vec<Uuid> = u
            .event_ids
            .into_iter()
            .zip(acked)
            .filter_map(|(id, acked)| acked.then_some(id))
            .collect();
        let refused = sent - ok.len();
        if refused > 0 {
            metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "nack").increment(refused as u64);
            tracing::warn!(
                events = refused,
                "broker refused events; they stay in the outbox for the relay"
            );
        }
        confirmed.add(ok);
    }
    channel.close().await;
}

/// The message that announces `e`: `email.requested` on the email exchange,
/// which only the dispatcher reads, the others on the events exchange, in the
/// shape that carries no secret (rows an earlier version wrote are re-shaped).
/// `None`: a row that cannot be made safe for the events exchange; it is
/// withheld, and stays in the outbox for an operator to look at.
pub fn event_message(broker: &BrokerSettings, e: &OutboxEvent) -> Option<Outgoing> {
    let Some(body) = message::publishable_event_body(&e.routing_key, &e.body) else {
        tracing::error!(
            event_id = %e.event_id,
            routing_key = %e.routing_key.escape_default(),
            "outbox event withheld: its body is no event this version knows, and it could carry a secret"
        );
        metrics::counter!(telemetry::EVENTS_WITHHELD).increment(1);
        return None;
    };
    let exchange = if message::is_email(&e.routing_key) {
        &broker.email_exchange
    } else {
        &broker.events_exchange
    };
    Some(Outgoing {
        exchange: exchange.clone(),
        routing_key: e.routing_key.clone(),
        properties: properties::event(
            &e.routing_key,
            &e.event_id.to_string(),
            e.traceparent.as_deref(),
            e.tracestate.as_deref(),
        ),
        body: body.into_owned().into_bytes(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing failed")]
    Broker(#[source] lapin::Error),
    #[error("the broker refused {refused} of {of} events; they stay in the outbox")]
    Refused { refused: usize, of: usize },
}

/// Re-publishes outbox events older than the grace period whose confirm never
/// arrived; returns how many were confirmed and deleted.
pub async fn relay(
    store: &Store,
    publisher: &Publisher,
    settings: &Settings,
) -> Result<usize, RelayError> {
    let grace = Duration::from_secs(settings.worker.outbox_grace_secs);
    let events = store.lease_stale_outbox(grace, RELAY_BATCH).await?;
    if events.is_empty() {
        return Ok(0);
    }
    let (ids, out): (Vec<Uuid>, Vec<Outgoing>) = events
        .iter()
        .filter_map(|e| Some((e.event_id, event_message(&settings.broker, e)?)))
        .unzip();
    let acked = publisher
        .publish_each(&out)
        .await
        .map_err(RelayError::Broker)?;
    // A refused (or withheld) event keeps its row (its lease ran forward) and
    // is tried again after another grace period.
    let ids: Vec<Uuid> = ids
        .into_iter()
        .zip(&acked)
        .filter(|(_, ok)| **ok)
        .map(|(id, _)| id)
        .collect();
    store.delete_outbox(&ids).await?;
    if ids.len() < events.len() {
        return Err(RelayError::Refused {
            refused: events.len() - ids.len(),
            of: events.len(),
        });
    }
    Ok(ids.len())
}

/// Runs for one broker session: deletes confirmed rows every second, and every
/// grace period reports the outbox's depth and relays what is stale.
pub async fn relay_loop(
    store: Store,
    confirmed: ConfirmedEvents,
    publisher: Publisher,
    settings: Arc<Settings>,
    stop: CancellationToken,
) {
    let every = Duration::from_secs(settings.worker.outbox_grace_secs.clamp(1, 60));
    let mut last_relay = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
            _ = stop.cancelled() => break,
        }
        // Before leasing, so the relay never re-publishes what was confirmed.
        if let Err(e) = store.flush_confirmed(&confirmed).await {
            tracing::warn!(error = %Report(&e), "could not clear confirmed events from the outbox; will retry");
            continue;
        }
        if last_relay.elapsed() < every {
            continue;
        }
        last_relay = tokio::time::Instant::now();
        match store.outbox_pending().await {
            Ok(n) => metrics::gauge!(telemetry::OUTBOX_PENDING).set(n as f64),
            Err(e) => tracing::debug!(error = %Report(&e), "could not count the outbox"),
        }
        match relay(&store, &publisher, &settings).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "re-published events left unconfirmed"),
            Err(e) => tracing::warn!(error = %Report(&e), "outbox relay failed; will retry"),
        }
    }
    publisher.close().await;
}
