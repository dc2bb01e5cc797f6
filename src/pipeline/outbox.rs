//! The transactional outbox: how an event reaches the broker at least once.
//!
//! 1. The batch's commit writes each event's row in the same transaction as the
//!    ticket or token it announces (`ports::StoreBatch::commit`).
//! 2. The pipeline publishes the event right after the commit; once the broker
//!    confirms it, its ID joins the worker's [`ConfirmedEvents`] and its row is
//!    deleted by the next commit, saving a transaction per batch.
//! 3. The relay here deletes confirmed rows when no commit comes along, and
//!    re-publishes rows whose confirm never came (the worker died in between,
//!    the broker refused the event) once they are `OUTBOX_GRACE_SECS` old.
//!
//! A row is deleted only after its event was confirmed, so an event is lost
//! only with the database; it may be published twice (a crash between confirm
//! and delete), which is why events carry their `event_id` as `message_id`.

use super::ports::{Broker, OutboxRows, SessionLost};
use crate::broker::{properties, Outgoing};
use crate::config::{BrokerSettings, Settings};
use crate::contract::message;
use crate::records::OutboxEvent;
use crate::store::StoreError;
use crate::telemetry::{self, Report};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Outbox events the broker confirmed whose rows are not deleted yet: the
/// worker makes one and hands it to whatever confirms events (the pipeline's
/// publisher) and whatever deletes their rows (the next commit, or [`flush`]
/// when no commit comes). Until then a redelivered command's load ignores
/// them. Lost in a crash, they are only re-published once by the relay.
#[derive(Debug, Clone, Default)]
pub struct ConfirmedEvents(Arc<Mutex<Vec<Uuid>>>);

impl ConfirmedEvents {
    pub fn add(&self, event_ids: impl IntoIterator<Item = Uuid>) {
        self.lock().extend(event_ids);
    }

    /// Takes them all, for a statement that deletes them; give them back with
    /// [`ConfirmedEvents::add`] if it fails.
    pub fn take(&self) -> Vec<Uuid> {
        std::mem::take(&mut *self.lock())
    }

    pub fn snapshot(&self) -> HashSet<Uuid> {
        self.lock().iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Uuid>> {
        // A panic while holding the lock leaves a plain Vec, still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Deletes the confirmed events' rows, when no commit came to do it.
pub async fn flush(rows: &impl OutboxRows, confirmed: &ConfirmedEvents) -> Result<u64, StoreError> {
    let ids = confirmed.take();
    let result = rows.delete(&ids).await;
    if result.is_err() {
        confirmed.add(ids);
    }
    result
}

/// How soon confirmed outbox rows are deleted when no commit takes them along.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Events re-published per relay pass.
const RELAY_BATCH: i64 = 500;

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
    Broker(#[source] SessionLost),
    #[error("the broker refused {refused} of {of} events; they stay in the outbox")]
    Refused { refused: usize, of: usize },
}

/// Re-publishes outbox events older than the grace period whose confirm never
/// arrived; returns how many were confirmed and deleted.
pub async fn relay(
    rows: &impl OutboxRows,
    publisher: &impl Broker,
    settings: &Settings,
) -> Result<usize, RelayError> {
    let grace = Duration::from_secs(settings.worker.outbox_grace_secs);
    let events = rows.lease_stale(grace, RELAY_BATCH).await?;
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
    rows.delete(&ids).await?;
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
    rows: impl OutboxRows,
    confirmed: ConfirmedEvents,
    publisher: impl Broker,
    settings: Arc<Settings>,
    stop: CancellationToken,
) {
    let every = Duration::from_secs(settings.worker.outbox_grace_secs.clamp(1, 60));
    let mut last_relay = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
        }
        // Before leasing, so the relay never re-publishes what was confirmed.
        if let Err(e) = flush(&rows, &confirmed).await {
            tracing::warn!(error = %Report(&e), "could not clear confirmed events from the outbox; will retry");
            continue;
        }
        if last_relay.elapsed() < every {
            continue;
        }
        last_relay = tokio::time::Instant::now();
        match rows.pending().await {
            Ok(n) => metrics::gauge!(telemetry::OUTBOX_PENDING).set(n as f64),
            Err(e) => tracing::debug!(error = %Report(&e), "could not count the outbox"),
        }
        match relay(&rows, &publisher, &settings).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "re-published events left unconfirmed"),
            Err(e) => tracing::warn!(error = %Report(&e), "outbox relay failed; will retry"),
        }
    }
}
