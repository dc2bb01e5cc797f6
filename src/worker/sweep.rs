//! The expiry sweep: deletes tickets, verification tokens, idempotency records
//! and email claims past their retention, in chunks, every `SWEEP_INTERVAL_SECS`.

use crate::config::Settings;
use crate::store::{Retention, Store};
use crate::telemetry::Report;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

pub(super) async fn sweep_loop(store: Store, settings: Arc<Settings>, shutdown: CancellationToken) {
    let w = &settings.worker;
    if w.sweep_interval_secs == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(w.sweep_interval_secs)) => {}
            _ = shutdown.cancelled() => break,
        }
        let now = crate::store::epoch_millis(SystemTime::now());
        match store
            .sweep(
                now,
                Retention {
                    ticket_max_age: Duration::from_secs(w.ticket_max_age_secs),
                    token_max_age: Duration::from_secs(w.token_max_age_secs),
                    idempotency: Duration::from_secs(w.idempotency_retention_secs),
                    email_cooldown: Duration::from_secs(w.email_cooldown_secs),
                },
            )
            .await
        {
            Ok(r) if r == Default::default() => {}
            Ok(r) => tracing::info!(
                tickets = r.tickets,
                verification_tokens = r.verification_tokens,
                processed_commands = r.processed_commands,
                email_cooldowns = r.email_cooldowns,
                "deleted expired rows"
            ),
            Err(e) => tracing::warn!(error = %Report(&e), "expiry sweep failed; will retry"),
        }
    }
}
