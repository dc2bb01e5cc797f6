//! Whether the worker did right: every reply, every email event and dead
//! letter after each round, and every row at the end.

use crate::error::{BenchError, Result};
use crate::load::RoundResult;
use crate::plan::Expected;
use crate::setup;
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How long a round's email events and dead letters may take to arrive.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the run left behind, against what it must have.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    pub expected: Expected,
    pub tickets: u64,
    pub verification_tokens: u64,
    pub email_requested: u64,
    /// `email.requested` events the echo consumer published (`--ceiling-events`).
    pub ceiling_email_requested: u64,
    pub dead_letters: u64,
    pub problems: Vec<String>,
}

pub struct Counter<'a> {
    pub channel: &'a lapin::Channel,
    pub email_queue: &'a str,
    pub dead_queue: &'a str,
    /// Where the drain keeps its counts (`drain.rs`), and how much of each
    /// count earlier rounds took.
    pub counts: &'a std::path::Path,
    pub taken: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Counter<'_> {
    async fn depth(&self, queue: &str) -> Result<u64> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BenchError::broker(queue, e))?;
        Ok(q.message_count() as u64)
    }

    /// Waits until the drain has consumed at least `want` more messages of
    /// `queue` than earlier rounds took (or the settle time runs out), and
    /// returns how many more it consumed.
    pub async fn drained(&self, queue: &str, want: u64) -> u64 {
        let before = self.taken.lock().unwrap().get(queue).copied().unwrap_or(0);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut now = crate::drain::drained(self.counts, queue);
        while now - before < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            now = crate::drain::drained(self.counts, queue);
        }
        // What arrives after the count was read belongs to the next round.
        self.taken.lock().unwrap().insert(queue.to_string(), now);
        now - before
    }

    /// Waits until `queue` holds at least `want` messages (or the settle time
    /// runs out), then empties it and returns how many it held.
    pub async fn take(&self, queue: &str, want: u64) -> Result<u64> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while self.depth(queue).await? < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map(u64::from)
            .map_err(|e| BenchError::broker(queue, e))
    }
}

/// After a round: every reply right, every email event and dead letter there.
pub async fn check_round(
    r: &RoundResult,
    counter: &Counter<'_>,
    checks: &mut Checks,
    name: &str,
) -> Result<()> {
    let e = r.expected;
    checks.expected.tickets += e.tickets;
    checks.expected.verification_tokens += e.verification_tokens;
    checks.expected.dead_letters += e.dead_letters;
    if r.wrong > 0 {
        checks.problems.push(format!(
            "{name}: {} wrong replies, e.g. {}",
            r.wrong,
            r.wrong_examples.join("; ")
        ));
    }
    let emails = counter
        .drained(counter.email_queue, e.verification_tokens)
        .await;
    let dead = counter.take(counter.dead_queue, e.dead_letters).await?;
    checks.email_requested += emails;
    checks.dead_letters += dead;
    if emails < e.verification_tokens {
        checks.problems.push(format!(
            "{name}: {emails} email.requested events for {} verification tokens",
            e.verification_tokens
        ));
    }
    if dead != e.dead_letters {
        checks.problems.push(format!(
            "{name}: {dead} dead letters, expected {}",
            e.dead_letters
        ));
    }
    Ok(())
}

/// At the end: exactly one row per valid command, no more, no fewer.
pub async fn check_rows(db_url: &str, checks: &mut Checks) -> Result<()> {
    (checks.tickets, checks.verification_tokens) = setup::row_counts(db_url).await?;
    if checks.tickets != checks.expected.tickets {
        checks.problems.push(format!(
            "{} tickets stored for {} valid create-ticket commands",
            checks.tickets, checks.expected.tickets
        ));
    }
    if checks.verification_tokens != checks.expected.verification_tokens {
        checks.problems.push(format!(
            "{} verification tokens stored for {} valid create-verification-token commands",
            checks.verification_tokens, checks.expected.verification_tokens
        ));
    }
    Ok(())
}
