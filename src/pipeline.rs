//! One batch of deliveries, left to right: decode → load → decide → commit →
//! publish (confirmed) → ack. Also the failure policy: transient failures are
//! retried with backoff while the deliveries stay unacked; a batch that fails for
//! another reason is split so one poison command cannot block the others; a
//! command that keeps failing gets a 500 reply and a dead letter on its last
//! allowed delivery.

use crate::broker::{properties, Channel, Delivery, Outgoing, PublishError, Publisher};
use crate::config::Settings;
use crate::contract::{self, Command, CommandName, Incoming, InternalErrorReply, Rejection};
use crate::domain::{self, Outcome};
use crate::render;
use crate::store::{NewRecord, OutboxEvent, Store, StoreError, StoredReply};
use crate::telemetry::{self, token_prefix};
use crate::trace::{self, TraceContext};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Dead-letter code for a command that failed on every allowed delivery.
pub const POISON_CODE: &str = "INTERNAL_SERVER_ERROR";

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

impl From<PublishError> for Failure {
    fn from(e: PublishError) -> Self {
        Failure::Broker(e.to_string())
    }
}

/// A delivery and what its properties say.
struct Item {
    delivery: Delivery,
    decoded: Result<Command, Rejection>,
    message_id: Option<String>,
    reply_to: Option<String>,
    /// correlation_id, else message_id (CONTRACT §2).
    correlation: Option<String>,
    /// The worker's span for this command: its reply and events carry it.
    trace: TraceContext,
    traceparent: String,
}

impl Item {
    fn new(delivery: Delivery) -> Self {
        let p = &delivery.properties;
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
            reply_to: properties::short(p.reply_to()).map(str::to_string),
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
    status: u16,
    /// `created`, `rejected`, `malformed` (also dead-lettered), `repeated` (a
    /// stored reply sent again for a message_id seen before), `failed`.
    outcome: &'static str,
    code: Option<&'static str>,
}

/// What happens to one item of a batch.
enum Step {
    Malformed(Rejection),
    Stored(StoredReply),
    /// A record of this batch, and its error code when the domain refused it.
    New(usize, Option<&'static str>),
    /// A second command with the message_id of an earlier item in the same batch.
    SameAs(usize),
}

pub struct Pipeline {
    store: Store,
    publisher: Publisher,
    acks: Channel,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
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
        }
    }

    /// Handles a batch; every delivery ends acked, rejected for redelivery, or
    /// (on error) unacked for the broker to redeliver.
    pub async fn handle(&self, deliveries: Vec<Delivery>) -> Result<(), BatchError> {
        let items: Vec<Item> = deliveries.into_iter().map(Item::new).collect();
        match self.process(&items).await {
            Ok(()) => {
                let last = items.iter().map(Item::tag).max().unwrap_or(0);
                self.ack(last, true).await
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
            Ok(()) => self.ack(item.tag(), false).await,
            Err(Failure::Store(e)) => self.poison(item, e).await,
            Err(Failure::Broker(m)) => Err(BatchError::Broker(m)),
            Err(Failure::Abandoned) => Err(BatchError::Abandoned),
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
        let mut out = Vec::new();
        let body = serde_json::to_string(&InternalErrorReply::default()).unwrap_or_default();
        self.push_reply(&mut out, &item, 500, body);
        out.push(self.dead_letter(
            &item,
            POISON_CODE,
            &format!("failed on {attempts} deliveries: {error}"),
        ));
        self.publish(&out).await.map_err(|f| match f {
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
        self.ack(item.tag(), false).await
    }

    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BatchError> {
        self.acks
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| BatchError::Broker(format!("ack failed: {e}")))
    }

    /// Load, decide and commit, retrying transient database failures with backoff;
    /// then publish and await every confirm. Nothing is acked here.
    async fn process(&self, items: &[Item]) -> Result<(), Failure> {
        let started = Instant::now();
        let (out, confirmed_events, answers) = self.with_retry(|| self.commit_batch(items)).await?;
        let committed = Instant::now();
        self.publish(&out).await?;
        let (db, publish) = (committed - started, committed.elapsed());
        tracing::debug!(
            commands = items.len(),
            publications = out.len(),
            db_ms = db.as_secs_f64() * 1e3,
            publish_ms = publish.as_secs_f64() * 1e3,
            "batch committed and confirmed"
        );
        metrics::histogram!(telemetry::BATCH_SIZE).record(items.len() as f64);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "database").record(db);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "publish").record(publish);
        metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => "total").record(db + publish);
        // The events are confirmed: their outbox rows go with the next commit.
        self.store.forget_outbox(confirmed_events);
        for (item, answer) in items.iter().zip(answers) {
            record_answer(item, answer);
        }
        Ok(())
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

    async fn publish(&self, out: &[Outgoing]) -> Result<(), Failure> {
        let mut backoff = BACKOFF_START;
        loop {
            match self.publisher.publish_all(out).await {
                Ok(()) => return Ok(()),
                Err(PublishError::Nacked(n)) => {
                    metrics::counter!(telemetry::BROKER_ERRORS, "kind" => "nack").increment(1);
                    // Everything is re-sent: replies and events are at-least-once.
                    tracing::warn!(nacked = n, "broker nacked publications; re-publishing");
                    if self.shutdown.is_cancelled() && backoff >= BACKOFF_MAX {
                        return Err(Failure::Abandoned);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One attempt at the database part. Returns what to publish and which outbox
    /// events those publications settle.
    async fn commit_batch(
        &self,
        items: &[Item],
    ) -> Result<(Vec<Outgoing>, Vec<Uuid>, Vec<Answer>), StoreError> {
        let commands: Vec<&Command> = items
            .iter()
            .filter_map(|i| i.decoded.as_ref().ok())
            .collect();
        let mut token_ids: Vec<&str> = commands.iter().map(|c| c.access_token_id()).collect();
        let mut profile_ids: Vec<&str> = commands.iter().map(|c| c.profile_id()).collect();
        let mut message_ids: Vec<&str> = items
            .iter()
            .filter(|i| i.decoded.is_ok())
            .filter_map(|i| i.message_id.as_deref())
            .collect();
        for v in [&mut token_ids, &mut profile_ids, &mut message_ids] {
            v.sort_unstable();
            v.dedup();
        }
        let mut db = self.store.batch().await?;
        let loaded = db.load(&token_ids, &profile_ids, &message_ids).await?;

        let now_ms = crate::store::epoch_millis(SystemTime::now());
        let ctx_url = self.settings.worker.verification_url.as_str();
        let mut processed = loaded.processed;
        let mut first_with_id: HashMap<&str, usize> = HashMap::new();
        let mut records: Vec<NewRecord> = Vec::new();
        let mut steps: Vec<Step> = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let command = match &item.decoded {
                Err(r) => {
                    steps.push(Step::Malformed(r.clone()));
                    continue;
                }
                Ok(c) => c,
            };
            if let Some(mid) = item.message_id.as_deref() {
                if let Some(&earlier) = first_with_id.get(mid) {
                    steps.push(Step::SameAs(earlier));
                    continue;
                }
                first_with_id.insert(mid, index);
                if let Some(stored) = processed.remove(mid) {
                    steps.push(Step::Stored(stored));
                    continue;
                }
            }
            let outcome = domain::decide(
                command,
                loaded.tokens.get(command.access_token_id()),
                loaded.profiles.get(command.profile_id()),
                domain::Context {
                    now_ms,
                    new_id: Uuid::new_v4(),
                    default_verification_url: ctx_url,
                },
            );
            let mut rendered = render::outcome(&outcome, item.message_id.as_deref());
            for e in &mut rendered.events {
                e.traceparent = Some(item.traceparent.clone());
            }
            let (ticket, token, code) = match outcome {
                Outcome::TicketCreated(t) => (Some(t), None, None),
                Outcome::VerificationTokenCreated(t, _) => (None, Some(t), None),
                Outcome::Rejected(r) => (None, None, Some(r.code.as_str())),
            };
            steps.push(Step::New(records.len(), code));
            records.push(NewRecord {
                message_id: item.message_id.clone(),
                command: command.name().as_str(),
                status: rendered.status,
                reply: rendered.reply,
                ticket,
                token,
                events: rendered.events,
            });
        }

        let lost = if records.is_empty() {
            Default::default()
        } else {
            db.commit(&records).await?
        };
        if !lost.is_empty() {
            // Another transaction committed these message_ids first: answer with its reply.
            let ids: Vec<&str> = lost
                .iter()
                .filter_map(|&r| records[r].message_id.as_deref())
                .collect();
            let mut stored = db.stored_replies(&ids).await?;
            for step in steps.iter_mut() {
                if let Step::New(r, _) = *step {
                    if lost.contains(&r) {
                        let mid = records[r].message_id.as_deref().unwrap_or_default();
                        match stored.remove(mid) {
                            Some(s) => *step = Step::Stored(s),
                            None => {
                                return Err(StoreError {
                                    kind: crate::store::ErrorKind::Transient,
                                    context: "commit",
                                    message: format!(
                                        "message_id {mid} conflicted but its record is gone"
                                    ),
                                })
                            }
                        }
                    }
                }
            }
        }
        Ok(self.outgoing(items, &steps, &records))
    }

    fn outgoing(
        &self,
        items: &[Item],
        steps: &[Step],
        records: &[NewRecord],
    ) -> (Vec<Outgoing>, Vec<Uuid>, Vec<Answer>) {
        let mut out = Vec::with_capacity(items.len() * 2);
        let mut settled = Vec::new();
        let mut answers = Vec::with_capacity(items.len());
        for (item, step) in items.iter().zip(steps) {
            let resolved = |s: &Step| -> Option<(u16, String)> {
                match s {
                    Step::Malformed(r) => Some((r.status(), render::rejection(r))),
                    Step::Stored(s) => Some((s.status, s.reply.clone())),
                    Step::New(r, _) => Some((records[*r].status, records[*r].reply.clone())),
                    Step::SameAs(_) => None,
                }
            };
            answers.push(match step {
                Step::Malformed(r) => Answer {
                    status: r.status(),
                    outcome: "malformed",
                    code: Some(r.code.as_str()),
                },
                Step::Stored(s) => Answer {
                    status: s.status,
                    outcome: "repeated",
                    code: None,
                },
                Step::New(r, code) => Answer {
                    status: records[*r].status,
                    outcome: if code.is_some() {
                        "rejected"
                    } else {
                        "created"
                    },
                    code: *code,
                },
                Step::SameAs(j) => Answer {
                    status: resolved(&steps[*j]).map_or(0, |(s, _)| s),
                    outcome: "repeated",
                    code: None,
                },
            });
            match step {
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
                    self.push_reply(&mut out, item, r.status(), render::rejection(r));
                    out.push(self.dead_letter(item, r.code.as_str(), &r.message));
                }
                Step::Stored(s) => {
                    self.push_reply(&mut out, item, s.status, s.reply.clone());
                    for e in &s.pending_events {
                        out.push(self.event(e));
                        settled.push(e.event_id);
                    }
                }
                Step::New(r, _) => {
                    let rec = &records[*r];
                    self.push_reply(&mut out, item, rec.status, rec.reply.clone());
                    for e in &rec.events {
                        out.push(self.event(e));
                        settled.push(e.event_id);
                    }
                }
                Step::SameAs(j) => {
                    if let Some((status, body)) = resolved(&steps[*j]) {
                        self.push_reply(&mut out, item, status, body);
                    }
                }
            }
        }
        (out, settled, answers)
    }

    fn push_reply(&self, out: &mut Vec<Outgoing>, item: &Item, status: u16, body: String) {
        if let Some(reply_to) = &item.reply_to {
            out.push(Outgoing {
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

    fn dead_letter(&self, item: &Item, code: &str, reason: &str) -> Outgoing {
        Outgoing {
            exchange: self.settings.broker.dead_letter_exchange.clone(),
            routing_key: item.delivery.routing_key.as_str().to_string(),
            properties: properties::dead_letter(&item.delivery.properties, code, reason),
            body: item.delivery.data.clone(),
        }
    }
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
    if let ("malformed" | "failed", Some(code)) = (a.outcome, a.code) {
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
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
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

/// Re-publishes outbox events whose confirm never arrived (the worker died between
/// commit and publish, or the delivery was dead-lettered before its redelivery).
pub async fn relay_outbox(
    store: &Store,
    publisher: &Publisher,
    settings: &Settings,
) -> Result<usize, String> {
    let grace = Duration::from_secs(settings.worker.outbox_grace_secs);
    let events = store
        .lease_stale_outbox(grace, 500)
        .await
        .map_err(|e| e.to_string())?;
    if events.is_empty() {
        return Ok(0);
    }
    let out: Vec<Outgoing> = events
        .iter()
        .map(|e| event_outgoing(&settings.broker.events_exchange, e))
        .collect();
    publisher
        .publish_all(&out)
        .await
        .map_err(|e| e.to_string())?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    store.delete_outbox(&ids).await.map_err(|e| e.to_string())?;
    Ok(events.len())
}
