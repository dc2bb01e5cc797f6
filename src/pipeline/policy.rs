//! What a failed attempt at a batch leads to. A transient database failure is
//! retried with jittered exponential backoff while the deliveries stay unacked;
//! once shutdown is requested, only for the shutdown grace. Any other failure
//! is the command's own: after a pause that grows with its attempts it goes back
//! to the queue, which counts deliveries, until its last allowed delivery, where
//! it is given up (500 and a dead letter).

use crate::backoff::Backoff;
use crate::store::StoreError;
use crate::telemetry;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a batch was not processed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A database failure retrying will not cure: the commands' own problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutting down, and the grace period ran out while the database was away.
    #[error("gave up on held commands at shutdown")]
    Abandoned,
}

/// What becomes of a command whose attempt failed for a reason of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Back to the queue (which counts the delivery) for another attempt.
    Redeliver,
    /// This was its last allowed delivery: answer 500 and dead-letter it.
    GiveUp,
}

/// `delivery_count`: the broker's count of earlier deliveries (`x-delivery-count`).
/// Returns this attempt's number and the verdict.
pub fn after_failure(delivery_count: u64, delivery_limit: u64) -> (u64, Verdict) {
    let attempt = delivery_count + 1;
    let verdict = if attempt >= delivery_limit {
        Verdict::GiveUp
    } else {
        Verdict::Redeliver
    };
    (attempt, verdict)
}

/// How long a command that failed its `attempt` (1 for the first) for a reason
/// of its own is held before it goes back to the queue: `pace.min` doubled per
/// earlier attempt up to `pace.max`, with up to as much again of jitter, so
/// that a poison command does not spin between workers and the workers that
/// failed it do not retry in step.
pub fn redelivery_pause(attempt: u64, pace: Backoff) -> Duration {
    // Past 63 doublings every base is capped; this keeps a huge limit cheap.
    let n = attempt.saturating_sub(1).min(63) as usize;
    pace.delays().nth(n).unwrap_or(pace.max)
}

/// Runs `attempt` until it succeeds or fails for good. Transient failures are
/// retried; after shutdown is requested, only until `grace` has passed.
pub async fn retry_transient<T, F, Fut>(
    shutdown: &CancellationToken,
    grace: Duration,
    pace: Backoff,
    mut attempt: F,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delays = pace.delays();
    let mut since: Option<Instant> = None;
    let mut shutdown_at: Option<Instant> = None;
    loop {
        match attempt().await {
            Ok(v) => {
                if let Some(t) = since {
                    tracing::info!(
                        after_secs = t.elapsed().as_secs_f32(),
                        "database available again; ready"
                    );
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                metrics::counter!(telemetry::DATABASE_ERRORS, "kind" => "transient").increment(1);
                if since.is_none() {
                    tracing::warn!(error = %telemetry::Report(&e), "not ready: database unavailable; holding commands and retrying");
                    since = Some(Instant::now());
                } else {
                    tracing::debug!(error = %telemetry::Report(&e), "database still unavailable");
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::DATABASE_ERRORS, "kind" => "permanent").increment(1);
                return Err(Failure::Store(e));
            }
        }
        if shutdown.is_cancelled() {
            let t = *shutdown_at.get_or_insert_with(Instant::now);
            if t.elapsed() >= grace {
                return Err(Failure::Abandoned);
            }
        }
        let delay = delays.next().unwrap_or(pace.max);
        // Sleep, but wake at once for shutdown so the grace period is measured.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled(), if shutdown_at.is_none() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_allowed_delivery_gives_up() {
        assert_eq!(after_failure(0, 5), (1, Verdict::Redeliver));
        assert_eq!(after_failure(3, 5), (4, Verdict::Redeliver));
        assert_eq!(after_failure(4, 5), (5, Verdict::GiveUp));
        // A limit of one: the first failure is the last.
        assert_eq!(after_failure(0, 1), (1, Verdict::GiveUp));
    }

    #[test]
    fn a_poison_command_waits_longer_after_each_failed_attempt() {
        let pace = Backoff::millis(200, 1_000);
        for (attempt, base) in [(1, 200), (2, 400), (3, 800), (4, 1_000), (50, 1_000)] {
            let base = Duration::from_millis(base);
            let p = redelivery_pause(attempt, pace);
            assert!(p >= base && p <= base * 2, "attempt {attempt}: {p:?}");
        }
        // An absurd attempt number costs nothing and stays capped.
        let p = redelivery_pause(u64::MAX, pace);
        assert!(p <= Duration::from_millis(2_000), "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_configured_pace_is_the_one_waited() {
        let stop = CancellationToken::new();
        let started = Instant::now();
        let mut calls = 0;
        let got = retry_transient(
            &stop,
            Duration::from_secs(1),
            Backoff::millis(1_000, 1_000),
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n <= 3 {
                        Err(StoreError::transient("load", "away"))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got.unwrap(), 4);
        let waited = started.elapsed();
        // Three pauses of 1 s, each with up to 1 s of jitter.
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_secs(6),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_permanent_ones_are_not() {
        let stop = CancellationToken::new();
        let mut calls = 0;
        let got = retry_transient(
            &stop,
            Duration::from_secs(1),
            Backoff::millis(100, 5_000),
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(StoreError::transient("test", "down"))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got.unwrap(), 3);

        let mut calls = 0;
        let got: Result<(), _> = retry_transient(
            &stop,
            Duration::from_secs(1),
            Backoff::millis(100, 5_000),
            || {
                calls += 1;
                async { Err(StoreError::permanent("test", "broken")) }
            },
        )
        .await;
        assert!(matches!(got, Err(Failure::Store(_))));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_shutdown_retries_stop_when_the_grace_runs_out() {
        let stop = CancellationToken::new();
        stop.cancel();
        let started = tokio::time::Instant::now();
        let got: Result<(), _> = retry_transient(
            &stop,
            Duration::from_secs(3),
            Backoff::millis(100, 5_000),
            || async { Err(StoreError::transient("test", "down")) },
        )
        .await;
        assert!(matches!(got, Err(Failure::Abandoned)));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(9),
            "{waited:?}"
        );
    }
}
