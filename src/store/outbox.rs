//! The outbox's rows: written by the batch's commit (batch.rs), deleted once
//! the broker confirmed their event, leased by the relay when a confirm never
//! came. What the worker does with them is `crate::outbox`.

use super::{Store, StoreError};
use crate::records::OutboxEvent;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Outbox events the broker confirmed whose rows are not deleted yet: the
/// worker makes one and hands it to whatever confirms events (the pipeline's
/// publisher) and whatever deletes their rows (the next commit, or
/// [`Store::flush_confirmed`] when no commit comes). Until then a redelivered
/// command's load ignores them. Lost in a crash, they are only re-published
/// once by the relay.
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

impl Store {
    /// Deletes the confirmed events' rows, when no commit came to do it.
    pub async fn flush_confirmed(&self, confirmed: &ConfirmedEvents) -> Result<u64, StoreError> {
        let ids = confirmed.take();
        let result = self.delete_outbox(&ids).await;
        if result.is_err() {
            confirmed.add(ids);
        }
        result
    }

    /// Outbox rows, confirmed or not yet deleted included: a gauge of how far
    /// event publication is behind.
    pub async fn outbox_pending(&self) -> Result<u64, StoreError> {
        let client = self.client("outbox").await?;
        let row = client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .map_err(|e| StoreError::pg("outbox", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub async fn delete_outbox(&self, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        let client = self.client("outbox").await?;
        client
            .execute("DELETE FROM outbox WHERE event_id = ANY($1)", &[&event_ids])
            .await
            .map_err(|e| StoreError::pg("outbox", e))
    }

    /// Claims up to `limit` outbox events older than `grace` for re-publication.
    /// Claiming moves their `created_at` to now, so another worker's relay skips them
    /// for the next `grace`; if this worker dies before deleting them they become
    /// stale again and someone re-publishes them. No transaction is held meanwhile.
    pub async fn lease_stale_outbox(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let client = self.client("outbox").await?;
        let grace_secs = grace.as_secs_f64();
        let rows = client
            .query(
                "UPDATE outbox SET created_at = now() WHERE event_id IN ( \
                     SELECT event_id FROM outbox \
                     WHERE created_at < now() - make_interval(secs => $1) \
                     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING event_id, message_id, routing_key, body, traceparent, tracestate",
                &[&grace_secs, &limit],
            )
            .await
            .map_err(|e| StoreError::pg("outbox", e))?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxEvent {
                event_id: r.get(0),
                message_id: r.get(1),
                routing_key: r.get(2),
                body: r.get(3),
                traceparent: r.get(4),
                tracestate: r.get(5),
            })
            .collect())
    }
}
