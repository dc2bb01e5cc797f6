//! One round of load: publish `n` commands through the broker with publisher
//! confirms, never more than `window` without a reply, and check every reply.

use super::plan::{Expected, Plan};
use super::stats::Latency;
use crate::broker::{properties, Channel, Consumer};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use std::time::{Duration, Instant};

/// Where a round's commands go.
pub enum Target<'a> {
    /// The worker: the command exchange, routing key = command name.
    Worker { exchange: &'a str },
    /// The echo consumer's own queue, through the default exchange.
    Ceiling { queue: &'a str },
}

pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Wrong replies quoted in the report; the rest are only counted.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundResult {
    pub commands: u64,
    pub secs: f64,
    pub rate: f64,
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
    /// Sends commands `first .. first + n` of the plan to `target`.
    pub async fn round(
        &mut self,
        target: &Target<'_>,
        first: u64,
        n: u64,
    ) -> Result<RoundResult, String> {
        self.rounds += 1;
        round(self, target, first, n).await
    }
}

async fn round(
    loader: &mut Loader<'_>,
    target: &Target<'_>,
    first: u64,
    n: u64,
) -> Result<RoundResult, String> {
    let Loader {
        channel,
        replies,
        plan,
        window,
        stall,
        rounds: round,
    } = loader;
    let (channel, plan, stall, round) = (*channel, *plan, *stall, *round);
    let window = (*window).max(1);
    let prefix = format!("r{round}-");
    let mut slots: Vec<Slot> = Vec::with_capacity(n as usize);
    let mut latencies = Vec::with_capacity(n as usize);
    let mut confirms = FuturesUnordered::new();
    let mut expected = Expected::default();
    let (mut answered, mut outstanding) = (0u64, 0usize);
    let (mut wrong, mut duplicates, mut strays) = (0u64, 0u64, 0u64);
    let mut wrong_examples = Vec::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();

    while answered < n {
        while outstanding < window && (slots.len() as u64) < n {
            let i = first + slots.len() as u64;
            let planned = plan.command(i);
            let (exchange, routing_key, expect) = match target {
                Target::Worker { exchange } => {
                    (*exchange, planned.command.as_str(), planned.expect_status)
                }
                // The echo consumer checks nothing: it answers everything 200.
                Target::Ceiling { queue } => ("", *queue, 200),
            };
            if matches!(target, Target::Worker { .. }) {
                expected.add(&planned);
            }
            let correlation = format!("{prefix}{}", slots.len());
            let props = BasicProperties::default()
                .with_type(planned.command.as_str().into())
                .with_content_type("application/json".into())
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_correlation_id(correlation.into())
                .with_reply_to(DIRECT_REPLY_TO.into())
                .with_delivery_mode(2);
            slots.push(Slot {
                sent: Instant::now(),
                expect,
                answered: false,
            });
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    planned.body.as_bytes(),
                    props,
                )
                .await
                .map_err(|e| format!("publishing a command failed: {e}"))?;
            confirms.push(confirm);
            outstanding += 1;
        }
        tokio::select! {
            reply = replies.next() => {
                let reply = reply
                    .ok_or("the reply consumer was closed by the broker")?
                    .map_err(|e| format!("reading replies failed: {e}"))?;
                let now = Instant::now();
                let index = reply
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| c.as_str().strip_prefix(&prefix))
                    .and_then(|i| i.parse::<usize>().ok());
                let Some(slot) = index.and_then(|i| slots.get_mut(i)) else {
                    strays += 1;
                    continue;
                };
                if slot.answered {
                    duplicates += 1;
                    continue;
                }
                slot.answered = true;
                answered += 1;
                outstanding -= 1;
                last_progress = now;
                latencies.push((now - slot.sent).as_secs_f64() * 1e3);
                let status = reply.properties.headers().as_ref().and_then(properties::status);
                if status != Some(u64::from(slot.expect)) {
                    wrong += 1;
                    if wrong_examples.len() < EXAMPLES {
                        wrong_examples.push(format!(
                            "command {}: expected {}, got {:?}: {}",
                            first + index.unwrap_or_default() as u64,
                            slot.expect,
                            status,
                            String::from_utf8_lossy(&reply.data)
                        ));
                    }
                }
            }
            Some(confirm) = confirms.next(), if !confirms.is_empty() => {
                let confirm = confirm.map_err(|e| format!("waiting for a publisher confirm failed: {e}"))?;
                if confirm.is_nack() {
                    return Err("the broker nacked a command (is the queue full?)".into());
                }
            }
            _ = tokio::time::sleep_until((last_progress + stall).into()) => {
                return Err(format!(
                    "no reply for {} s: {answered} of {n} commands answered, {outstanding} in flight",
                    stall.as_secs()
                ));
            }
        }
    }
    // Every reply arrived, so every command was confirmed; settle the futures anyway.
    while let Some(confirm) = confirms.next().await {
        if confirm.map_err(|e| e.to_string())?.is_nack() {
            return Err("the broker nacked a command".into());
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(RoundResult {
        commands: n,
        secs,
        rate: n as f64 / secs,
        latency: Latency::of(latencies),
        wrong,
        duplicates,
        strays,
        wrong_examples,
        expected,
    })
}
