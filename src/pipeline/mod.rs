//! One batch of deliveries, left to right: decode → load → plan (pure) → commit →
//! publish (confirmed) → ack. Also the failure policy: transient failures are
//! retried with backoff while the deliveries stay unacked; a batch that fails for
//! another reason is split so one poison command cannot block the others; a
//! command that keeps failing gets a 500 reply and a dead letter on its last
//! allowed delivery.
//!
//! What the broker refuses (a nack) is handled by whose it is, so that no caller
//! can hold the worker: a reply is the caller's, retried briefly in the
//! background and then dropped and counted; an event stays in the outbox for the
//! relay; a dead letter is handed to the queue's own dead-lettering.

pub mod plan;

use crate::broker::{properties, Channel, Delivery, Outgoing, Publisher};
use crate::config::Settings;
use crate::contract::{self, Command, CommandName, Incoming, InternalErrorReply, Rejection};
use crate::store::{OutboxEvent, Store, StoreError};
use crate::telemetry::{self, token_prefix};
use crate::trace::{self, TraceContext};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use plan::{Input, Plan, Step};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Dead-letter code for a command that failed on every allowed delivery.
pub const POISON_CODE: &str = "INTERNAL_SERVER_ERROR";
/// Dead-letter code for a command whose `reply_to` names no reply queue (CONTRACT §2).
pub const REPLY_TO_NOT_ALLOWED: &str = "REPLY_TO_NOT_ALLOWED";
/// Pauses between the attempts at a refused reply: about a second in all.
const REPLY_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
];
/// Refused replies being retried at once; past that a refused reply is dropped
/// at once, so a caller whose queue refuses everything costs bounded memory.
const REPLY_RETRY_TASKS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The broker connection or a channel is gone: rebuild the session. Unacked
    /// deliveries return to the queue by themselves.
    #[error("{0}")]
    Broker(String),
    /// Shutting down and the grace period ran out while the database was
    /// unavailable: the deliveries are left unacked for redelivery.
    #[error("gave up on held commands at shutdown; they will be redelivered")]
    Abandoned,
}

enum Failure {
    Store(StoreError),
    Broker(String),
    Abandoned,
}

impl From<lapin::Error> for Failure {
    fn from(e: lapin::Error) -> Self {
        Failure::Broker(crate::broker::describe(&e))
    }
}

/// A delivery and what its properties say.
struct Item {
    delivery: Delivery,
    decoded: Result<Command, Rejection>,
    message_id: Option<String>,
    /// Where the reply goes: only a reply queue (CONTRACT §2).
    reply_to: Option<String>,
    /// A `reply_to` that names no reply queue: the command is dead-lettered unprocessed.
    refused_reply_to: Option<String>,
    /// correlation_id, else message_id (CONTRACT §2).
    correlation: Option<String>,
    /// The worker's span for this command: its reply and events carry it.
    trace: TraceContext,
    traceparent: String,
}

impl Item {
    fn new(delivery: Delivery, reply_prefixes: &[String]) -> Self {
        let p = &delivery.properties;
        let (reply_to, refused_reply_to) = match properties::short(p.reply_to()) {
            Some(r) if contract::reply_to_allowed(r, reply_prefixes) => (Some(r.to_string()), None),
            Some(r) => (None, Some(r.to_string())),
            None => (None, None),
        };
        let decoded = contract::decode(Incoming {
            kind: properties::short(p.kind()),
            routing_key: delivery.routing_key.as_str(),
            content_type: properties::short(p.content_type()),
            body: &delivery.data,
        });
        let message_id = properties::short(p.message_id()).map(str::to_string);
        let correlation = properties::short(p.correlation_id())
            .map(str::to_string)
            .or_else(|| message_id.clone());
        let parent = properties::header_text(p, trace::TRACEPARENT).and_then(TraceContext::parse);
        let trace = TraceContext::continue_or_start(parent, trace::random_ids);
        Item {
            traceparent: trace.to_string(),
            trace,
            decoded,
            reply_to,
            refused_reply_to,
            message_id,
            correlation,
            delivery,
        }
    }

    fn tag(&self) -> u64 {
        self.delivery.delivery_tag
    }

    fn command_name(&self) -> Option<CommandName> {
        let kind = properties::short(self.delivery.properties.kind())
            .unwrap_or(self.delivery.routing_key.as_str());
        CommandName::parse(kind)
    }

    /// The reply's `type`: `<command>.reply`, or `error.reply` when the command is unknown.
    fn reply_type(&self) -> &'static str {
        self.command_name()
            .map(CommandName::reply_type)
            .unwrap_or("error.reply")
    }

    /// The command's name for logs and metrics (`unknown` when it has none we know).
    fn command_label(&self) -> &'static str {
        self.command_name()
            .map(CommandName::as_str)
            .unwrap_or("unknown")
    }

    fn message_id_label(&self) -> &str {
        self.message_id.as_deref().unwrap_or("-")
    }
}

/// How one command was answered, for its log line and metrics.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// The reply's status; 0 when nothing is replied (reply_to refused).
    status: u16,
    /// `created`, `rejected` (answered, acked), `malformed` (also
    /// dead-lettered), `repeated` (a stored reply sent again for a message_id
    /// seen before), `refused` (reply_to not allowed: dead-lettered, no reply),
    /// `failed`.
    outcome: &'static str,
    code: Option<&'static str>,
}

/// What one batch publishes, grouped by what a nack means for it.
#[derive(Default)]
struct Publications {
    replies: Vec<Outgoing>,
    /// With the outbox row each settles.
    events: Vec<(Outgoing, Uuid)>,
    /// With the delivery each is for.
    dead_letters: Vec<(Outgoing, u64)>,
}

/// What the broker's confirms left to do.
#[derive(Default)]
struct Settled {
    /// Deliveries whose dead letter was refused: rejected without requeue, so
    /// the queue's own (at-least-once) dead-lettering keeps them.
    reject: Vec<u64>,
}

pub struct Pipeline {
    store: Store,
    publisher: Publisher,
    acks: Channel,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
    reply_retries: Arc<Semaphore>,
}

impl Pipeline {
    pub fn new(
        store: Store,
        publisher: Publisher,
        acks: Channel,
        settings: Arc<Settings>,
        shutdown: CancellationToken,
    ) -> Self {
        Pipeline {
            store,
            publisher,
            acks,
            settings,
            shutdown,
            reply_retries: Arc::new(Semaphore::new(REPLY_RETRY_TASKS)),
        }
    }

    /// Handles a batch; every delivery ends acked, rejected for redelivery, or
    /// (on error) unacked for the broker to redeliver.
    pub async fn handle(&self, deliveries: Vec<Delivery>) -> Result<(), BatchError> {
        let prefixes = &self.settings.broker.reply_to_prefixes;
        let items: Vec<Item> = deliveries
            .into_iter()
            .map(|d| Item::new(d, prefixes))
            .collect();
        match self.process(&items).await {
            Ok(settled) => {
                let tags: Vec<u64> = items.iter().map(Item::tag).collect();
                self.finish(settled, &tags).await
            }
            Err(Failure::Store(e)) if items.len() > 1 => {
                tracing::warn!(error = %e, batch = items.len(), "batch failed; retrying its commands one by one");
                for item in items {
                    self.handle_alone(item).await?;
                }
                Ok(())
            }
            Err(Failure::Store(e)) => {
                self.poison(items.into_iter().next().expect("one item"), e)
                    .await
            }
            Err(Failure::Broker(m)) => Err(BatchError::Broker(m)),
            Err(Failure::Abandoned) => Err(BatchError::Abandoned),
        }
    }

    async fn handle_alone(&self, item: Item) -> Result<(), BatchError> {
        let one = std::slice::from_ref(&item);
        match self.process(one).await {
            Ok(settled) => self.finish(settled, &[item.tag()]).await,
            Err(Failure::Store(e)) => self.poison(item, e).await,
            Err(Failure::Broker(m)) => Err(BatchError::Broker(m)),
            Err(Failure::Abandoned) => Err(BatchError::Abandoned),
        }
    }

    /// Rejects what must go to the queue's dead-lettering, then acks the rest of
    /// `tags` (this channel's unsettled deliveries, all of them from this batch)
    /// with one `multiple` ack on the highest tag not rejected: the broker
    /// refuses an ack naming a tag that is already settled, and a `multiple` ack
    /// skips the rejected ones below it.
    async fn finish(&self, settled: Settled, tags: &[u64]) -> Result<(), BatchError> {
        for &t in &settled.reject {
            self.acks
                .basic_reject(t, BasicRejectOptions { requeue: false })
                .await
                .map_err(|e| BatchError::Broker(e.to_string()))?;
        }
        match tags.iter().filter(|t| !settled.reject.contains(t)).max() {
            Some(&last) => self.ack(last, tags.len() > 1).await,
            None => Ok(()),
        }
    }

    /// A command that fails for a reason other than its input or an outage.
    /// Rejected with requeue so the quorum queue counts the attempt; on the last
    /// allowed delivery it is answered 500 and dead-lettered with the reason.
    async fn poison(&self, item: Item, error: StoreError) -> Result<(), BatchError> {
        let attempts = properties::delivery_count(&item.delivery.properties) + 1;
        let limit = u64::from(self.settings.broker.delivery_limit);
        let last = attempts >= limit;
        tracing::error!(
            message_id = item.message_id_label(),
            command = item.command_label(),
            outcome = if last { "failed" } else { "retry" },
            trace_id = %item.trace.trace_id_hex(),
            attempt = attempts,
            limit,
            error = %error,
            "command failed"
        );
        if !last {
            return self
                .acks
                .basic_reject(item.tag(), BasicRejectOptions { requeue: true })
                .await
                .map_err(|e| BatchError::Broker(e.to_string()));
        }
        let mut out = Publications::default();
        let body = serde_json::to_string(&InternalErrorReply::default()).unwrap_or_default();
        self.push_reply(&mut out, &item, 500, body);
        out.dead_letters.push((
            self.dead_letter(
                &item,
                POISON_CODE,
                &format!("failed on {attempts} deliveries: {error}"),
            ),
            item.tag(),
        ));
        let settled = self.publish(out).await.map_err(|f| match f {
            Failure::Abandoned => BatchError::Abandoned,
            Failure::Broker(m) | Failure::Store(StoreError { message: m, .. }) => {
                BatchError::Broker(m)
            }
        })?;
        record_answer(
            &item,
            Answer {
                status: 500,
                outcome: "failed",
                code: Some(POISON_CODE),
            },
        );
        self.finish(settled, &[item.tag()]).await
    }

    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BatchError> {
        self.acks
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| BatchError::Broker(format!("ack failed: {e}")))
    }

    /// Load, plan and commit, retrying transient database failures with backoff;
    /// then publish and await every confirm. Nothing is acked here.
    async fn process(&self, items: &[Item]) -> Result<Settled, Failure> {
        let started = Instant::now();
        let (out, answers) = self.with_retry(|| self.commit_batch(items)).await?;
        let committed = Instant::now();
        let publications = out.replies.len() + out.events.len() + out.dead_letters.len();
        let settled = self.publish(out).await?;
        let (db, publish) = (committed - started, committed.elapsed());
        tracing::debug!(
            commands = items.len(),
            publications,
            db_ms = db.as_secs_f64() * 1e3,
            publish_ms = publish.as_secs_f64() * 1e3,
            "batch committed and confirmed"
        );
        metrics::histogram!(telemetry::BATCH_SIZE).record(items.len() as f64);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "database").record(db);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "publish").record(publish);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "total").record(db + publish);
        for (item, answer) in items.iter().zip(answers) {
            record_answer(item, answer);
        }
        Ok(settled)
    }

    async fn with_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = BACKOFF_START;
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
                    metrics::counter!(telemetry::DATABASE_ERRORS, "kind" => "transient")
                        .increment(1);
                    if since.is_none() {
                        tracing::warn!(error = %e, "not ready: database unavailable; holding commands and retrying");
                        since = Some(Instant::now());
                    } else {
                        tracing::debug!(error = %e, "database still unavailable");
                    }
                }
                Err(e) => {
                    metrics::counter!(telemetry::DATABASE_ERRORS, "kind" => "permanent")
                        .increment(1);
                    return Err(Failure::Store(e));
                }
            }
            if self.shutdown.is_cancelled() {
                let t = *shutdown_at.get_or_insert_with(Instant::now);
                if t.elapsed() >= Duration::from_secs(self.settings.worker.shutdown_grace_secs) {
                    return Err(Failure::Abandoned);
                }
            }
            // Sleep, but wake at once for shutdown so the grace period is measured.
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.cancelled(), if shutdown_at.is_none() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Publishes replies, events and dead letters together and waits for every
    /// confirm; then settles each refusal by whose message it was (module docs).
    async fn publish(&self, out: Publications) -> Result<Settled, Failure> {
        let Publications {
            replies,
            events,
            dead_letters,
        } = out;
        let (event_ids, dead_tags): (Vec<Uuid>, Vec<u64>) = (
            events.iter().map(|(_, id)| *id).collect(),
            dead_letters.iter().map(|(_, t)| *t).collect(),
        );
        let (n_replies, n_events) = (replies.len(), events.len());
        let all: Vec<Outgoing> = replies
            .into_iter()
            .chain(events.into_iter().map(|(o, _)| o))
            .chain(dead_letters.into_iter().map(|(o, _)| o))
            .collect();
        let acked = self.publisher.publish_each(&all).await?;
        let mut all = all.into_iter();
        let refused_replies: Vec<Outgoing> = all
            .by_ref()
            .take(n_replies)
            .zip(&acked[..n_replies])
            .filter(|(_, ok)| !**ok)
            .map(|(o, _)| o)
            .collect();
        let event_acks = &acked[n_replies..n_replies + n_events];
        let mut confirmed = Vec::with_capacity(n_events);
        let mut refused_events = 0;
        for (id, ok) in event_ids.into_iter().zip(event_acks) {
            if *ok {
                confirmed.push(id);
            } else {
                refused_events += 1;
            }
        }
        // The events are confirmed: their outbox rows go with the next commit.
        self.store.forget_outbox(confirmed);
        if refused_events > 0 {
            metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "nack").increment(refused_events);
            tracing::warn!(
                events = refused_events,
                "broker refused events; they stay in the outbox for the relay"
            );
        }
        let mut settled = Settled::default();
        for (tag, ok) in dead_tags.into_iter().zip(&acked[n_replies + n_events..]) {
            if !*ok {
                metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "nack").increment(1);
                tracing::warn!(
                    delivery_tag = tag,
                    "broker refused a dead letter; rejecting the command to the queue's own dead-lettering"
                );
                settled.reject.push(tag);
            }
        }
        if !refused_replies.is_empty() {
            self.retry_replies(refused_replies);
        }
        Ok(settled)
    }

    /// A refused reply (its queue is full, say) is its caller's problem: a few
    /// more attempts within about a second, off the batch's path, then it is
    /// dropped and counted. It never holds the batch or re-sends events.
    fn retry_replies(&self, mut pending: Vec<Outgoing>) {
        let refused = pending.len() as u64;
        metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "nack").increment(refused);
        let Ok(permit) = self.reply_retries.clone().try_acquire_owned() else {
            drop_replies(refused, "too many refused replies already being retried");
            return;
        };
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            let _permit = permit;
            for pause in REPLY_RETRIES {
                tokio::time::sleep(pause).await;
                match publisher.publish_each(&pending).await {
                    Ok(acked) => {
                        pending = pending
                            .into_iter()
                            .zip(acked)
                            .filter(|(_, ok)| !ok)
                            .map(|(o, _)| o)
                            .collect();
                    }
                    Err(e) => {
                        drop_replies(pending.len() as u64, &crate::broker::describe(&e));
                        return;
                    }
                }
                if pending.is_empty() {
                    return;
                }
            }
            drop_replies(pending.len() as u64, "the broker kept refusing them");
        });
    }

    /// One attempt at the database part. Returns what to publish and how each
    /// command was answered.
    async fn commit_batch(
        &self,
        items: &[Item],
    ) -> Result<(Publications, Vec<Answer>), StoreError> {
        // A command whose reply_to names no reply queue is not processed at all.
        let planned: Vec<&Item> = items
            .iter()
            .filter(|i| i.refused_reply_to.is_none())
            .collect();
        let inputs: Vec<Input> = planned
            .iter()
            .map(|i| Input {
                decoded: &i.decoded,
                message_id: i.message_id.as_deref(),
            })
            .collect();
        let commands = inputs.iter().filter_map(|i| i.decoded.as_ref().ok());
        let mut token_ids: Vec<&str> = commands.clone().map(|c| c.access_token_id()).collect();
        let mut profile_ids: Vec<&str> = commands.map(|c| c.profile_id()).collect();
        let mut message_ids: Vec<&str> = inputs
            .iter()
            .filter(|i| i.decoded.is_ok())
            .filter_map(|i| i.message_id)
            .collect();
        for v in [&mut token_ids, &mut profile_ids, &mut message_ids] {
            v.sort_unstable();
            v.dedup();
        }
        let mut db = self.store.batch().await?;
        let loaded = db.load(&token_ids, &profile_ids, &message_ids).await?;

        let w = &self.settings.worker;
        let mut plan = plan::plan(
            &inputs,
            loaded,
            plan::Settings {
                now_ms: crate::store::epoch_millis(SystemTime::now()),
                default_verification_url: &w.verification_url,
                email_cooldown_secs: w.email_cooldown_secs,
            },
            Uuid::new_v4,
        );
        // Events carry the trace of the command that caused them.
        for (item, step) in planned.iter().zip(&plan.steps) {
            if let Step::New { record: r, .. } = *step {
                for e in &mut plan.records[r].events {
                    e.traceparent = Some(item.traceparent.clone());
                }
            }
        }
        let cooldown = Duration::from_secs(w.email_cooldown_secs);
        let lost = db.commit(&plan.records, cooldown).await?;
        if !lost.is_empty() {
            // Another transaction committed these message_ids first: answer from its record.
            let ids: Vec<&str> = lost
                .iter()
                .filter_map(|&r| plan.records[r].message_id.as_deref())
                .collect();
            let stored = db.stored_replies(&ids).await?;
            plan::resolve_lost(&mut plan, &lost, stored)
                .map_err(|e| StoreError::transient("commit", e.to_string()))?;
        }
        Ok(self.outgoing(items, &planned, &plan))
    }

    fn outgoing(
        &self,
        items: &[Item],
        planned: &[&Item],
        plan: &Plan,
    ) -> (Publications, Vec<Answer>) {
        let mut out = Publications::default();
        let mut answers = Vec::with_capacity(items.len());
        let mut steps = planned.iter().zip(plan.steps.iter().enumerate()).peekable();
        for item in items {
            if let Some(name) = &item.refused_reply_to {
                let reason = format!(
                    "reply_to \"{}\" is not a reply queue: replies go only to amq.rabbitmq.reply-to or a queue named with one of the prefixes {:?}",
                    name.escape_default(),
                    self.settings.broker.reply_to_prefixes
                );
                tracing::warn!(
                    message_id = item.message_id_label(),
                    command = item.command_label(),
                    outcome = "refused",
                    code = REPLY_TO_NOT_ALLOWED,
                    trace_id = %item.trace.trace_id_hex(),
                    reason = %reason,
                    "command with a reply_to that is no reply queue dead-lettered unprocessed"
                );
                out.dead_letters.push((
                    self.dead_letter(item, REPLY_TO_NOT_ALLOWED, &reason),
                    item.tag(),
                ));
                answers.push(Answer {
                    status: 0,
                    outcome: "refused",
                    code: Some(REPLY_TO_NOT_ALLOWED),
                });
                continue;
            }
            let (_, (i, step)) = steps.next().expect("a step for every planned item");
            let (status, body) = plan.answer(i);
            self.push_reply(&mut out, item, status, body);
            answers.push(match step {
                Step::Malformed(r) => {
                    tracing::warn!(
                        message_id = item.message_id_label(),
                        command = item.command_label(),
                        outcome = "malformed",
                        code = r.code.as_str(),
                        trace_id = %item.trace.trace_id_hex(),
                        reason = %r.message,
                        "malformed command answered 400 and dead-lettered"
                    );
                    out.dead_letters.push((
                        self.dead_letter(item, r.code.as_str(), &r.message),
                        item.tag(),
                    ));
                    Answer {
                        status,
                        outcome: "malformed",
                        code: Some(r.code.as_str()),
                    }
                }
                Step::Refused(r) => Answer {
                    status,
                    outcome: "rejected",
                    code: Some(r.code.as_str()),
                },
                Step::Stored(s) => {
                    for e in &s.pending_events {
                        out.events.push((self.event(e), e.event_id));
                    }
                    Answer {
                        status,
                        outcome: "repeated",
                        code: None,
                    }
                }
                Step::New { record, rejected } => {
                    for e in &plan.records[*record].events {
                        out.events.push((self.event(e), e.event_id));
                    }
                    Answer {
                        status,
                        outcome: if rejected.is_some() {
                            "rejected"
                        } else {
                            "created"
                        },
                        code: rejected.map(|c| c.as_str()),
                    }
                }
                Step::SameAs(_) => Answer {
                    status,
                    outcome: "repeated",
                    code: None,
                },
            });
        }
        (out, answers)
    }

    fn push_reply(&self, out: &mut Publications, item: &Item, status: u16, body: String) {
        if let Some(reply_to) = &item.reply_to {
            out.replies.push(Outgoing {
                exchange: String::new(),
                routing_key: reply_to.clone(),
                properties: properties::reply(
                    item.reply_type(),
                    item.correlation.as_deref(),
                    status,
                    Some(&item.traceparent),
                ),
                body: body.into_bytes(),
            });
        }
    }

    fn event(&self, e: &OutboxEvent) -> Outgoing {
        event_outgoing(&self.settings.broker.events_exchange, e)
    }

    /// The command as it came, with why it is here. An oversized body is cut to
    /// the limit (a header gives its size), so a caller cannot make the dead-letter
    /// queue hold more than the command queue would process.
    fn dead_letter(&self, item: &Item, code: &str, reason: &str) -> Outgoing {
        let data = &item.delivery.data;
        let keep = data.len().min(contract::command::MAX_BODY_BYTES);
        let original_size = (keep < data.len()).then_some(data.len());
        Outgoing {
            exchange: self.settings.broker.dead_letter_exchange.clone(),
            routing_key: item.delivery.routing_key.as_str().to_string(),
            properties: properties::dead_letter(
                &item.delivery.properties,
                code,
                reason,
                original_size,
            ),
            body: data[..keep].to_vec(),
        }
    }
}

fn drop_replies(n: u64, why: &str) {
    if n == 0 {
        return;
    }
    metrics::counter!(telemetry::REPLIES_DROPPED).increment(n);
    tracing::warn!(
        replies = n,
        reason = why,
        "replies refused by the broker dropped"
    );
}

/// The command's log line (debug: one per command is too many for info at
/// thousands per second; refusals and failures are logged at warn and error
/// where they happen) and its metrics.
fn record_answer(item: &Item, a: Answer) {
    let command = item.command_label();
    tracing::debug!(
        message_id = item.message_id_label(),
        command,
        outcome = a.outcome,
        status = a.status,
        code = a.code.unwrap_or("-"),
        token = item
            .decoded
            .as_ref()
            .map(|c| token_prefix(c.access_token_id()))
            .unwrap_or_default(),
        trace_id = %item.trace.trace_id_hex(),
        span_id = %item.trace.span_id_hex(),
        "answered"
    );
    metrics::counter!(telemetry::COMMANDS, "command" => command, "status" => status_label(a.status))
        .increment(1);
    // Counted here, once the dead letter is confirmed, like the answer itself.
    if let ("malformed" | "failed" | "refused", Some(code)) = (a.outcome, a.code) {
        metrics::counter!(telemetry::DEAD_LETTERS, "code" => code).increment(1);
    }
    if let Some(sent) = properties::sent_at_ms(&item.delivery.properties) {
        let age = properties::now_ms().saturating_sub(sent);
        metrics::histogram!(telemetry::COMMAND_AGE_SECONDS).record(age as f64 / 1000.0);
    }
}

/// Status codes as static labels (no allocation per command).
fn status_label(status: u16) -> &'static str {
    match status {
        0 => "none",
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
        409 => "409",
        429 => "429",
        500 => "500",
        _ => "other",
    }
}

pub fn event_outgoing(exchange: &str, e: &OutboxEvent) -> Outgoing {
    Outgoing {
        exchange: exchange.to_string(),
        routing_key: e.routing_key.clone(),
        properties: properties::event(
            &e.routing_key,
            &e.event_id.to_string(),
            e.traceparent.as_deref(),
        ),
        body: e.body.as_bytes().to_vec(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing failed: {}", crate::broker::describe(.0))]
    Broker(#[source] lapin::Error),
    #[error("the broker refused {refused} of {of} events; they stay in the outbox")]
    Refused { refused: usize, of: usize },
}

/// Re-publishes outbox events whose confirm never arrived (the worker died between
/// commit and publish, or the delivery was dead-lettered before its redelivery).
pub async fn relay_outbox(
    store: &Store,
    publisher: &Publisher,
    settings: &Settings,
) -> Result<usize, RelayError> {
    let grace = Duration::from_secs(settings.worker.outbox_grace_secs);
    let events = store.lease_stale_outbox(grace, 500).await?;
    if events.is_empty() {
        return Ok(0);
    }
    let out: Vec<Outgoing> = events
        .iter()
        .map(|e| event_outgoing(&settings.broker.events_exchange, e))
        .collect();
    let acked = publisher
        .publish_each(&out)
        .await
        .map_err(RelayError::Broker)?;
    // A refused event keeps its row (its lease ran forward) and is tried again
    // after another grace period.
    let ids: Vec<Uuid> = events
        .iter()
        .zip(&acked)
        .filter(|(_, ok)| **ok)
        .map(|(e, _)| e.event_id)
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
