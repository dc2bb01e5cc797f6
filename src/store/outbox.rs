//! The outbox's rows: written by the batch's commit (batch.rs), deleted once
//! the broker confirmed their event, leased by the relay when a confirm never
//! came. What the worker does with them is `pipeline::outbox`.

use super::{Store, StoreError};
use crate::records::OutboxEvent;
use std::time::Duration;
use uuid::Uuid;

impl Store {
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
                event_id: r.get("event_id"),
                message_id: r.get("message_id"),
                routing_key: r.get("routing_key"),
                body: r.get("body"),
                traceparent: r.get("traceparent"),
                tracestate: r.get("tracestate"),
            })
            .collect())
    }
}
