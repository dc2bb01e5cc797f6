//! One batch of deliveries, left to right: decode (`item`) → load or recall
//! (`basis`) → `plan` (pure) → commit → `answer` (pure) → `publish`
//! (confirmed) → ack (`acks`), with the failure `policy` around it and each
//! answer tallied (`tally`). A batch that fails for a reason other than an
//! outage is split, so one poison command cannot block the others. The broker,
//! the store and the clock are `ports`; this module only orchestrates.

mod acks;
mod answer;
mod basis;
#[cfg(feature = "sim-bugs")]
pub mod bugs;
mod item;
pub mod known;
pub mod outbox;
pub mod plan;
pub mod policy;
pub mod ports;
mod publish;
mod tally;

pub use answer::{POISON_CODE, REPLY_TO_NOT_ALLOWED};
pub use ports::{Delivery, SessionLost};

use crate::broker::properties;
use crate::config::Settings;
use crate::store::StoreError;
use crate::telemetry::{self, Report};
use answer::{Answer, Routes};
use item::Item;
use known::SharedKnown;
use outbox::ConfirmedEvents;
use policy::{Failure, Verdict};
use ports::{Broker, Ports, World};
use publish::{Dispatcher, Sent, Settled};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The broker connection or a channel is gone: rebuild the session. Unacked
    /// deliveries return to the queue by themselves.
    #[error(transparent)]
    Broker(#[from] SessionLost),
    /// Shutting down and the grace period ran out while the database was
    /// unavailable: the deliveries are left unacked for redelivery.
    #[error("gave up on held commands at shutdown; they will be redelivered")]
    Abandoned,
}

/// A batch after its commit, its publications sent, their confirms not yet in.
pub struct Committed<B: Broker> {
    items: Vec<Item>,
    span: tracing::Span,
    started: Instant,
    sent: Sent<B>,
    publications: usize,
    publishing: Instant,
    publish_span: tracing::Span,
    answers: Vec<Answer>,
}

/// A batch whose commit failed for a reason of its own (not an outage).
pub struct FailedBatch {
    items: Vec<Item>,
    span: tracing::Span,
    error: StoreError,
}

pub enum Prepared<B: Broker> {
    Committed(Committed<B>),
    Failed(FailedBatch),
}

/// What one consumer's pipeline is made of.
pub struct Parts<P: Ports> {
    pub store: P::Store,
    /// Events confirmed whose outbox rows the next commit deletes; shared with
    /// the worker's other consumers and its relay.
    pub confirmed: ConfirmedEvents,
    /// Tokens and profiles earlier batches read; shared with the other consumers.
    pub known: SharedKnown,
    pub broker: P::Broker,
    pub world: Arc<P::World>,
    /// The lane this consumer takes from (`interactive`, `bulk`), for the metrics.
    pub lane: &'static str,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    /// The connection's negotiated frame size: a dead letter's properties must
    /// fit one frame, or the broker closes the connection (FRAME_ERROR).
    pub frame_max: usize,
}

pub struct Pipeline<P: Ports> {
    parts: Parts<P>,
    dispatcher: Dispatcher<P::Broker>,
    /// This channel's poison deliveries waiting out their pause (`acks`).
    held: acks::Held,
    #[cfg(feature = "sim-bugs")]
    bug: Option<bugs::Bug>,
}

impl<P: Ports> Pipeline<P> {
    pub fn new(parts: Parts<P>) -> Self {
        Pipeline {
            dispatcher: Dispatcher::new(parts.broker.clone(), parts.confirmed.clone()),
            held: acks::Held::default(),
            parts,
            #[cfg(feature = "sim-bugs")]
            bug: None,
        }
    }

    /// A pipeline with a bug this project has fixed put back, for the
    /// simulation to show it finds it (`tests/simulation`).
    #[cfg(feature = "sim-bugs")]
    pub fn with_bug(mut self, bug: Option<bugs::Bug>) -> Self {
        self.bug = bug;
        self
    }

    #[cfg(feature = "sim-bugs")]
    fn has_bug(&self, bug: bugs::Bug) -> bool {
        self.bug == Some(bug)
    }

    /// The first half of a batch: decode, then load, plan and commit (transient
    /// failures retried), then send its replies and events. Nothing is confirmed
    /// or acked yet, so a consumer may prepare its next batch while this one's
    /// publications wait for confirms, and this batch's replies need not wait
    /// for the previous batch's confirms.
    ///
    /// The batch's span is the parent of its commands' spans, given explicitly
    /// rather than entered: entering it on every poll of the batch measurably
    /// slowed single-command batches (BENCHMARKS.md).
    pub async fn prepare(
        &self,
        deliveries: Vec<Delivery>,
    ) -> Result<Prepared<P::Broker>, BatchError> {
        let started = Instant::now();
        let span = tracing::info_span!("batch", commands = deliveries.len());
        let prefixes = &self.parts.settings.broker.reply_to_prefixes;
        let world = &*self.parts.world;
        let items: Vec<Item> = deliveries
            .into_iter()
            .map(|d| Item::new(d, prefixes, &span, || world.trace_ids()))
            .collect();
        stage("decode", started.elapsed());
        #[cfg(feature = "sim-bugs")]
        if self.has_bug(bugs::Bug::AckBeforeCommit) {
            for item in &items {
                self.parts.broker.ack(item.tag(), false).await?;
            }
        }
        self.commit_and_send(items, span, started).await
    }

    /// Commits the batch (transient failures retried) and sends its
    /// publications; their confirms are [`Pipeline::complete`]'s.
    async fn commit_and_send(
        &self,
        items: Vec<Item>,
        span: tracing::Span,
        started: Instant,
    ) -> Result<Prepared<P::Broker>, BatchError> {
        let settings = &self.parts.settings;
        let grace = Duration::from_secs(settings.worker.shutdown_grace_secs);
        let committing = Instant::now();
        let pace = settings.worker.db_retry();
        let commit = telemetry::exported_span(
            || tracing::info_span!(parent: &span, "commit", otel.name = "commit", db.system = "postgresql"),
        );
        match policy::retry_transient(&self.parts.shutdown, grace, pace, || {
            self.commit_batch(&items)
        })
        .instrument(commit)
        .await
        {
            Ok((out, answers)) => {
                stage("database", committing.elapsed());
                let publishing = Instant::now();
                let publications = out.len();
                let publish_span = telemetry::exported_span(
                    || tracing::info_span!(parent: &span, "publish", otel.name = "publish", otel.kind = "producer", messaging.system = "rabbitmq", publications),
                );
                let sent = self
                    .dispatcher
                    .send(out)
                    .instrument(publish_span.clone())
                    .await?;
                Ok(Prepared::Committed(Committed {
                    items,
                    span,
                    started,
                    sent,
                    publications,
                    publishing,
                    publish_span,
                    answers,
                }))
            }
            Err(Failure::Store(error)) => Ok(Prepared::Failed(FailedBatch { items, span, error })),
            Err(Failure::Abandoned) => Err(BatchError::Abandoned),
        }
    }

    /// The second half: await every confirm, settle what was refused, ack. A
    /// consumer completes its batches in the order it prepared them, so a
    /// `multiple` ack never covers a delivery of a batch that is not done.
    pub async fn complete(&self, c: Committed<P::Broker>) -> Result<(), BatchError> {
        let Committed {
            items,
            span,
            started,
            sent,
            publications,
            publishing,
            publish_span,
            answers,
        } = c;
        let settled = self
            .dispatcher
            .confirm(sent)
            .instrument(publish_span)
            .await?;
        let publish = publishing.elapsed();
        stage("publish", publish);
        tracing::debug!(
            parent: &span,
            publications,
            publish_ms = publish.as_secs_f64() * 1e3,
            "batch committed and confirmed"
        );
        metrics::histogram!(telemetry::BATCH_SIZE).record(items.len() as f64);
        for (item, answer) in items.iter().zip(answers) {
            tally::record(item, answer, self.parts.lane);
        }
        let tags: Vec<u64> = items.iter().map(Item::tag).collect();
        let acking = Instant::now();
        let done = self.finish(settled, &tags).await;
        stage("ack", acking.elapsed());
        stage("total", started.elapsed());
        done
    }

    /// A batch whose commit failed for a reason other than an outage: its
    /// commands one by one, so one poison command cannot block the others.
    pub async fn recover(&self, f: FailedBatch) -> Result<(), BatchError> {
        let FailedBatch { items, span, error } = f;
        if items.len() == 1 {
            let item = items.into_iter().next().expect("one item");
            return self.poison(item, error).await;
        }
        tracing::warn!(parent: &span, error = %Report(&error), "batch failed; retrying its commands one by one");
        for item in items {
            self.handle_alone(item, &span).await?;
        }
        Ok(())
    }

    async fn handle_alone(&self, item: Item, batch: &tracing::Span) -> Result<(), BatchError> {
        match self
            .commit_and_send(vec![item], batch.clone(), Instant::now())
            .await?
        {
            Prepared::Committed(c) => self.complete(c).await,
            Prepared::Failed(f) => {
                let item = f.items.into_iter().next().expect("one item");
                self.poison(item, f.error).await
            }
        }
    }

    /// Rejects what must go to the queue's dead-lettering, then acks the rest of
    /// `tags` (this channel's unsettled deliveries from this batch), with one
    /// `multiple` ack where no held delivery is in its way (`acks::to_send`): the
    /// broker refuses an ack naming a tag that is already settled, and a
    /// `multiple` ack skips the rejected ones below it.
    async fn finish(&self, settled: Settled, tags: &[u64]) -> Result<(), BatchError> {
        #[cfg(feature = "sim-bugs")]
        if self.has_bug(bugs::Bug::AckBeforeCommit) {
            // Acked in `prepare` already.
            return Ok(());
        }
        let broker = &self.parts.broker;
        for &t in &settled.reject {
            broker.reject(t, false).await?;
        }
        for a in acks::to_send(tags, &settled.reject, self.held.lowest()) {
            broker.ack(a.tag, a.multiple).await?;
        }
        Ok(())
    }

    /// Holds a poison delivery for `pause`, then rejects it with requeue (the
    /// queue counts the attempt). At shutdown it goes back at once, for another
    /// worker. If the channel is gone the reject fails, and the delivery has
    /// gone back to the queue with it.
    fn redeliver_after(&self, tag: u64, pause: Duration) {
        self.held.hold(tag);
        let (broker, held, shutdown) = (
            self.parts.broker.clone(),
            self.held.clone(),
            self.parts.shutdown.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            let _ = broker.reject(tag, true).await;
            held.release(tag);
        });
    }

    /// A command that fails for a reason other than its input or an outage
    /// (see `policy`).
    async fn poison(&self, item: Item, error: StoreError) -> Result<(), BatchError> {
        let settings = &self.parts.settings;
        let limit = u64::from(settings.broker.delivery_limit);
        let (attempt, verdict) =
            policy::after_failure(properties::delivery_count(&item.delivery.properties), limit);
        let pause = (verdict == Verdict::Redeliver)
            .then(|| policy::redelivery_pause(attempt, settings.worker.poison_retry()));
        tracing::error!(
            parent: &item.span,
            outcome = if verdict == Verdict::GiveUp { "failed" } else { "retry" },
            attempt,
            limit,
            retry_in_ms = pause.map(|p| p.as_millis() as u64),
            error = %Report(&error),
            "command failed"
        );
        if let Some(pause) = pause {
            self.redeliver_after(item.tag(), pause);
            return Ok(());
        }
        let reason = format!("failed on {attempt} deliveries: {}", Report(&error));
        let (out, answer) = answer::failed(&item, &reason, self.routes());
        let settled = self.dispatcher.publish(out).await?;
        tally::record(&item, answer, self.parts.lane);
        self.finish(settled, &[item.tag()]).await
    }

    fn routes(&self) -> Routes<'_> {
        Routes {
            broker: &self.parts.settings.broker,
            frame_max: self.parts.frame_max,
        }
    }
}

/// How a batch was decided (`telemetry::BATCHES_DECIDED`).
fn decided(on: &'static str) {
    metrics::counter!(telemetry::BATCHES_DECIDED, "on" => on).increment(1);
}

/// One stage's time for one batch (`telemetry::BATCH_SECONDS`).
fn stage(name: &'static str, took: Duration) {
    metrics::histogram!(telemetry::BATCH_SECONDS, "stage" => name).record(took);
}
