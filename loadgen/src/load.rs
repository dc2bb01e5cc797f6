//! One round of load: publish `n` commands through the broker with publisher
//! confirms and check every reply. Closed loop (the default): never more than
//! `window` without a reply, a new command as soon as one is answered. Open loop
//! (`rate`): command k is due at start + k / rate whatever the replies do, and
//! its latency counts from when it was due, so a slow reply cannot hide the
//! commands queued behind it (`window` then only caps what is outstanding; a
//! command held back by it is late, and that shows in its latency).

use super::plan::{Expected, Plan};
use super::stats::{Latency, Recorder};
use crate::error::{BenchError, Result};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use profile_worker::broker::{properties, Channel, Consumer};
use std::time::{Duration, Instant};

/// Where a round's commands go.
pub enum Target<'a> {
    /// The worker: the command exchange, routing key = command name.
    Worker { exchange: &'a str },
    /// The echo consumer's own queue, through the default exchange.
    Ceiling { queue: &'a str },
}

/// Wrong replies quoted in the report; the rest are only counted.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundResult {
    pub commands: u64,
    pub secs: f64,
    /// Commands answered per second (in an open-loop round, at most the offered rate).
    pub rate: f64,
    /// The open-loop schedule's rate; none for a closed-loop round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<f64>,
    #[serde(flatten)]
    pub latency: Latency,
    /// Replies whose status was not what the command must get.
    pub wrong: u64,
    /// Second replies for one command (allowed: replies are at-least-once).
    pub duplicates: u64,
    /// Replies that match no command of this round.
    pub strays: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wrong_examples: Vec<String>,
    pub expected: Expected,
}

struct Slot {
    /// When it was sent (closed loop) or due (open loop).
    sent: Instant,
    expect: u16,
    answered: bool,
}

/// Sends rounds of commands over one channel and its direct reply-to consumer.
pub struct Loader<'a> {
    pub channel: &'a Channel,
    pub replies: Consumer,
    pub plan: &'a Plan,
    pub window: usize,
    /// Give up when no reply arrives for this long.
    pub stall: Duration,
    /// Tags correlation ids, so late replies of an earlier round are recognised
    /// as strays, not taken as answers.
    pub rounds: usize,
}

impl Loader<'_> {
    /// Sends commands `first .. first + n` of the plan to `target`; open loop at
    /// `rate` commands per second when given.
    pub async fn round(
        &mut self,
        target: &Target<'_>,
        first: u64,
        n: u64,
        rate: Option<f64>,
    ) -> Result<RoundResult> {
        self.rounds += 1;
        round(self, target, first, n, rate).await
    }
}

/// Bookkeeping of one round: what was sent when, and what came back.
struct Tally {
    prefix: String,
    first: u64,
    slots: Vec<Slot>,
    latencies: Recorder,
    answered: u64,
    outstanding: usize,
    wrong: u64,
    duplicates: u64,
    strays: u64,
    wrong_examples: Vec<String>,
    last_progress: Instant,
}

impl Tally {
    fn on_reply(&mut self, reply: &lapin::message::Delivery) {
        let now = Instant::now();
        let index = reply
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|c| c.as_str().strip_prefix(&self.prefix))
            .and_then(|i| i.parse::<usize>().ok());
        let Some((index, slot)) = index.and_then(|i| Some((i, self.slots.get_mut(i)?))) else {
            self.strays += 1;
            return;
        };
        if slot.answered {
            self.duplicates += 1;
            return;
        }
        slot.answered = true;
        self.answered += 1;
        self.outstanding -= 1;
        self.last_progress = now;
        self.latencies
            .record(now.saturating_duration_since(slot.sent));
        let status = properties::reply_status(&reply.properties);
        if status != i64::from(slot.expect) {
            self.wrong += 1;
            if self.wrong_examples.len() < EXAMPLES {
                self.wrong_examples.push(format!(
                    "command {}: expected {}, got {}: {}",
                    self.first + index as u64,
                    slot.expect,
                    status,
                    String::from_utf8_lossy(&reply.data)
                ));
            }
        }
    }
}

async fn round(
    loader: &mut Loader<'_>,
    target: &Target<'_>,
    first: u64,
    n: u64,
    rate: Option<f64>,
) -> Result<RoundResult> {
    let Loader {
        channel,
        replies,
        plan,
        window,
        stall,
        rounds: round,
    } = loader;
    let (channel, plan, stall) = (*channel, *plan, *stall);
    let window = (*window).max(1);
    let mut t = Tally {
        prefix: format!("r{round}-"),
        first,
        slots: Vec::with_capacity(n as usize),
        latencies: Recorder::default(),
        answered: 0,
        outstanding: 0,
        wrong: 0,
        duplicates: 0,
        strays: 0,
        wrong_examples: Vec::new(),
        last_progress: Instant::now(),
    };
    let mut confirms = FuturesUnordered::new();
    let mut expected = Expected::default();
    let started = Instant::now();
    let due = |k: usize| rate.map(|r| started + Duration::from_secs_f64(k as f64 / r));

    while t.answered < n {
        // Fill the window. The publishes are started together: lapin resolves each
        // only once its I/O thread wrote it, and one at a time that hand-off would
        // cost the load generator more CPU than the commands themselves.
        let batch = fill(&mut t, plan, target, n, window, &due, &mut expected);
        let sent = futures_util::future::join_all(batch.iter().map(|(x, rk, body, props)| {
            channel.basic_publish(
                (*x).into(),
                (*rk).into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props.clone(),
            )
        }))
        .await;
        for s in sent {
            confirms.push(s.map_err(|e| BenchError::broker("publishing a command failed", e))?);
        }
        // Open loop: wake for the next command due (unless the cap holds it back).
        let next_due = (t.outstanding < window)
            .then(|| due(t.slots.len()))
            .flatten()
            .filter(|_| (t.slots.len() as u64) < n);
        tokio::select! {
            _ = tokio::time::sleep_until(next_due.unwrap_or(started).into()), if next_due.is_some() => {}
            reply = replies.next() => {
                let reply = reply
                    .ok_or_else(|| BenchError::Refused("the reply consumer was closed by the broker".into()))?
                    .map_err(|e| BenchError::broker("reading replies failed", e))?;
                t.on_reply(&reply);
                // Take every reply already here before refilling the window.
                while let Some(Some(Ok(reply))) = replies.next().now_or_never() {
                    t.on_reply(&reply);
                }
            }
            Some(confirm) = confirms.next(), if !confirms.is_empty() => {
                let confirm = confirm.map_err(|e| BenchError::broker("waiting for a publisher confirm failed", e))?;
                if confirm.is_nack() {
                    return Err(BenchError::Refused("the broker nacked a command (is the queue full?)".into()));
                }
            }
            _ = tokio::time::sleep_until((t.last_progress + stall).into()) => {
                return Err(BenchError::Stalled(format!(
                    "no reply for {} s: {} of {n} commands answered, {} in flight",
                    stall.as_secs(), t.answered, t.outstanding
                )));
            }
        }
    }
    // Every reply arrived, so every command was confirmed; settle the futures anyway.
    while let Some(confirm) = confirms.next().await {
        let confirm =
            confirm.map_err(|e| BenchError::broker("waiting for a publisher confirm failed", e))?;
        if confirm.is_nack() {
            return Err(BenchError::Refused("the broker nacked a command".into()));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(RoundResult {
        commands: n,
        secs,
        rate: n as f64 / secs,
        offered_rate: rate,
        latency: t.latencies.latency(),
        wrong: t.wrong,
        duplicates: t.duplicates,
        strays: t.strays,
        wrong_examples: t.wrong_examples,
        expected,
    })
}

/// The commands that fit the window now (open loop: those already due), each
/// with its slot in the tally.
fn fill<'t>(
    t: &mut Tally,
    plan: &Plan,
    target: &Target<'t>,
    n: u64,
    window: usize,
    due: &dyn Fn(usize) -> Option<Instant>,
    expected: &mut Expected,
) -> Vec<(&'t str, &'t str, String, lapin::BasicProperties)> {
    let first = t.first;
    let mut batch = Vec::new();
    let now = Instant::now();
    while t.outstanding < window && (t.slots.len() as u64) < n {
        let sent = match due(t.slots.len()) {
            Some(at) if at > now => break,
            Some(at) => at,
            None => Instant::now(),
        };
        let i = first + t.slots.len() as u64;
        let planned = plan.command(i);
        let (exchange, routing_key, expect) = match target {
            Target::Worker { exchange } => {
                (*exchange, planned.command.as_str(), planned.expect_status)
            }
            // The echo consumer checks nothing: it answers everything 200.
            Target::Ceiling { queue } => ("", *queue, 200),
        };
        // For the echo, what these commands would ask of the worker (its
        // events ceiling publishes at least the email events counted here).
        expected.add(&planned);
        let props = profile_worker::client::command_properties(
            planned.command.as_str(),
            &uuid::Uuid::new_v4().to_string(),
            &format!("{}{}", t.prefix, t.slots.len()),
        );
        t.slots.push(Slot {
            sent,
            expect,
            answered: false,
        });
        t.outstanding += 1;
        batch.push((exchange, routing_key, planned.body, props));
    }
    batch
}
