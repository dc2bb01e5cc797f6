//! Periodic work: deleting expired tickets and tokens and old idempotency records
//! (CONTRACT §7), and leasing outbox events whose confirm never arrived.

use super::{to_system_time, Store, StoreError};
use std::time::Duration;

/// Rows per DELETE, so a sweep never holds long locks or a huge transaction.
const SWEEP_CHUNK: i64 = 5_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub tickets: u64,
    pub verification_tokens: u64,
    pub processed_commands: u64,
    pub email_cooldowns: u64,
}

/// How long each kind of row lives.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub ticket_max_age: Duration,
    pub token_max_age: Duration,
    pub idempotency: Duration,
    /// An email claim older than the cooldown holds nothing back.
    pub email_cooldown: Duration,
}

impl Store {
    /// Deletes what expired before `now_ms`, in bounded chunks. The clock is the
    /// caller's, so tests can move it.
    pub async fn sweep(&self, now_ms: i64, keep: Retention) -> Result<SweepReport, StoreError> {
        let client = self.client("sweep").await?;
        let err = |e| StoreError::pg("sweep", e);
        let cutoff = |age: Duration| to_system_time(now_ms - age.as_millis() as i64);
        let mut report = SweepReport::default();
        for (sql, cut, total) in [
            (
                "DELETE FROM tickets WHERE id IN \
                 (SELECT id FROM tickets WHERE last_request_time < $1 LIMIT $2)",
                cutoff(keep.ticket_max_age),
                &mut report.tickets,
            ),
            (
                "DELETE FROM verification_tokens WHERE id IN \
                 (SELECT id FROM verification_tokens WHERE \"timestamp\" < $1 LIMIT $2)",
                cutoff(keep.token_max_age),
                &mut report.verification_tokens,
            ),
            (
                "DELETE FROM processed_commands WHERE message_id IN \
                 (SELECT message_id FROM processed_commands WHERE processed_at < $1 LIMIT $2)",
                cutoff(keep.idempotency),
                &mut report.processed_commands,
            ),
            (
                "DELETE FROM email_cooldowns WHERE (profile_id, purpose) IN \
                 (SELECT profile_id, purpose FROM email_cooldowns WHERE requested_at < $1 LIMIT $2)",
                cutoff(keep.email_cooldown),
                &mut report.email_cooldowns,
            ),
        ] {
            loop {
                let n = client
                    .execute(sql, &[&cut, &SWEEP_CHUNK])
                    .await
                    .map_err(err)?;
                *total += n;
                if n < SWEEP_CHUNK as u64 {
                    break;
                }
            }
        }
        Ok(report)
    }
}
