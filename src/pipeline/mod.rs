//! One batch of deliveries, left to right: decode (`item`) → load → `plan`
//! (pure) → commit → `answer` (pure) → `publish` (confirmed) → ack (`acks`),
//! with the failure `policy` around it and each answer tallied (`tally`). A
//! batch that fails for a reason other than an outage is split, so one poison
//! command cannot block the others. This module only orchestrates.

mod acks;
mod answer;
mod item;
pub mod known;
pub mod plan;
pub mod policy;
mod publish;
mod tally;

pub use answer::{POISON_CODE, REPLY_TO_NOT_ALLOWED};

use crate::broker::{properties, Channel, Delivery, Publisher};
use crate::config::Settings;
use crate::records::Loaded;
use crate::store::{Batch, ConfirmedEvents, Store, StoreError};
use crate::telemetry::{self, Report};
use answer::{Answer, Routes};
use item::Item;
use known::SharedKnown;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use plan::{Input, Plan};
use policy::{Failure, Verdict};
use publish::{Dispatcher, Publications, Sent, Settled};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The broker connection or a channel is gone: rebuild the session. Unacked
    /// deliveries return to the queue by themselves.
    #[error("broker session lost")]
    Broker(#[from] lapin::Error),
    /// Shutting down and the grace period ran out while the database was
    /// unavailable: the deliveries are left unacked for redelivery.
    #[error("gave up on held commands at shutdown; they will be redelivered")]
    Abandoned,
}

/// A batch after its commit, its publications sent, their confirms not yet in.
pub struct Committed {
    items: Vec<Item>,
    span: tracing::Span,
    started: Instant,
    sent: Sent,
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

pub enum Prepared {
    Committed(Committed),
    Failed(FailedBatch),
}

pub struct Pipeline {
    store: Store,
    /// Events confirmed whose outbox rows the next commit deletes; shared with
    /// the worker's other consumers and its relay.
    confirmed: ConfirmedEvents,
    /// Tokens and profiles earlier batches read; shared with the other consumers.
    known: SharedKnown,
    dispatcher: Dispatcher,
    acks: Channel,
    /// The lane this consumer takes from (`interactive`, `bulk`), for the metrics.
    lane: &'static str,
    /// This channel's poison deliveries waiting out their pause (`acks`).
    held: acks::Held,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
    /// The connection's negotiated frame size: a dead letter's properties must
    /// fit one frame, or the broker closes the connection (FRAME_ERROR).
    frame_max: usize,
}

impl Pipeline {
    pub fn new(
        (store, confirmed, known): (Store, ConfirmedEvents, SharedKnown),
        publisher: Publisher,
        (acks, lane): (Channel, &'static str),
        settings: Arc<Settings>,
        shutdown: CancellationToken,
        frame_max: usize,
    ) -> Self {
        Pipeline {
            frame_max,
            dispatcher: Dispatcher::new(publisher, confirmed.clone()),
            confirmed,
            known,
            store,
            acks,
            lane,
            held: acks::Held::default(),
            settings,
            shutdown,
        }
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
    pub async fn prepare(&self, deliveries: Vec<Delivery>) -> Result<Prepared, BatchError> {
        let started = Instant::now();
        let span = tracing::info_span!("batch", commands = deliveries.len());
        let prefixes = &self.settings.broker.reply_to_prefixes;
        let items: Vec<Item> = deliveries
            .into_iter()
            .map(|d| Item::new(d, prefixes, &span))
            .collect();
        stage("decode", started.elapsed());
        self.commit_items(items, span, started).await
    }

    async fn commit_items(
        &self,
        items: Vec<Item>,
        span: tracing::Span,
        started: Instant,
    ) -> Result<Prepared, BatchError> {
        let grace = Duration::from_secs(self.settings.worker.shutdown_grace_secs);
        let committing = Instant::now();
        let pace = self.settings.worker.db_retry();
        let commit = telemetry::exported_span(
            || tracing::info_span!(parent: &span, "commit", otel.name = "commit", db.system = "postgresql"),
        );
        match policy::retry_transient(&self.shutdown, grace, pace, || self.commit_batch(&items))
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
    pub async fn complete(&self, c: Committed) -> Result<(), BatchError> {
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
            tally::record(item, answer, self.lane);
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
            .commit_items(vec![item], batch.clone(), Instant::now())
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
        for &t in &settled.reject {
            self.acks
                .basic_reject(t, BasicRejectOptions { requeue: false })
                .await?;
        }
        for a in acks::to_send(tags, &settled.reject, self.held.lowest()) {
            self.acks
                .basic_ack(
                    a.tag,
                    BasicAckOptions {
                        multiple: a.multiple,
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// Holds a poison delivery for `pause`, then rejects it with requeue (the
    /// queue counts the attempt). At shutdown it goes back at once, for another
    /// worker. If the channel is gone the reject fails, and the delivery has
    /// gone back to the queue with it.
    fn redeliver_after(&self, tag: u64, pause: Duration) {
        self.held.hold(tag);
        let (channel, held, shutdown) =
            (self.acks.clone(), self.held.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => {}
            }
            let _ = channel
                .basic_reject(tag, BasicRejectOptions { requeue: true })
                .await;
            held.release(tag);
        });
    }

    /// A command that fails for a reason other than its input or an outage
    /// (see `policy`).
    async fn poison(&self, item: Item, error: StoreError) -> Result<(), BatchError> {
        let limit = u64::from(self.settings.broker.delivery_limit);
        let (attempt, verdict) =
            policy::after_failure(properties::delivery_count(&item.delivery.properties), limit);
        let pause = (verdict == Verdict::Redeliver)
            .then(|| policy::redelivery_pause(attempt, self.settings.worker.poison_retry()));
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
        tally::record(&item, answer, self.lane);
        self.finish(settled, &[item.tag()]).await
    }

    fn routes(&self) -> Routes<'_> {
        Routes {
            broker: &self.settings.broker,
            frame_max: self.frame_max,
        }
    }

    /// One attempt at the database part. Returns what to publish and how each
    /// command was answered.
    ///
    /// A batch whose every token and profile an earlier batch read is decided
    /// on those, without a load, when the commit can check them all (`known`):
    /// if one changed, it is forgotten and the batch loaded and decided again.
    async fn commit_batch(
        &self,
        items: &[Item],
    ) -> Result<(Publications, Vec<Answer>), StoreError> {
        let inputs: Vec<Input> = items.iter().map(Item::input).collect();
        let keys = plan::keys(&inputs);
        let mut db = self.store.batch(&self.confirmed).await?;
        if let Some(loaded) = self.known.recall(&keys) {
            match self.decide(&mut db, &inputs, loaded, true).await {
                Ok(Some(plan)) => {
                    decided("known");
                    return Ok(answer::batch(items, &plan, self.routes()));
                }
                // A rejection, which the commit would not check: load.
                Ok(None) => {}
                Err(e) => {
                    self.known.forget(&keys);
                    // A changed row, or an email another worker claimed (which
                    // only a load would have shown): decide again on a load.
                    if !(e.is_rows_changed() || e.is_serialization_failure()) {
                        return Err(e);
                    }
                    decided("changed");
                }
            }
        }
        // A row written between the load and the commit fails the commit too:
        // load again at once, a few times, before leaving it to the retries.
        let mut changed = 0;
        loop {
            let loading = Instant::now();
            let loaded = db
                .load(&keys.access_token_ids, &keys.profile_ids, &keys.message_ids)
                .await?;
            stage("load", loading.elapsed());
            self.known.learn(&loaded);
            match self.decide(&mut db, &inputs, loaded, false).await {
                Ok(plan) => {
                    decided("loaded");
                    let plan = plan.expect("a loaded batch's plan always stands");
                    return Ok(answer::batch(items, &plan, self.routes()));
                }
                Err(e) if e.is_rows_changed() && changed < 3 => changed += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Plans the batch on `loaded`, commits it (checking the rows' versions),
    /// and answers the records another transaction won from that one's.
    /// `None`, committing nothing, when `from_known` and the plan rests on a
    /// decision the commit would not check ([`Plan::only_records`]).
    async fn decide(
        &self,
        db: &mut Batch<'_>,
        inputs: &[Input<'_>],
        mut loaded: Loaded,
        from_known: bool,
    ) -> Result<Option<Plan>, StoreError> {
        let planning = Instant::now();
        let versions = std::mem::take(&mut loaded.versions);
        let w = &self.settings.worker;
        let mut plan = plan::plan(
            inputs,
            loaded,
            plan::Params {
                now_ms: crate::store::epoch_millis(SystemTime::now()),
                default_verification_url: w.verification_url(),
                email_cooldown_secs: w.email_cooldown_secs,
            },
            Uuid::new_v4,
        );
        if from_known && !plan.only_records() {
            return Ok(None);
        }
        let cooldown = Duration::from_secs(w.email_cooldown_secs);
        let committing = Instant::now();
        stage("plan", committing - planning);
        let lost = db.commit(&plan.records, &versions, cooldown).await?;
        stage("commit", committing.elapsed());
        self.known.note_emails(
            plan.records
                .iter()
                .enumerate()
                .filter(|(n, _)| !lost.contains(n))
                .filter_map(|(_, r)| r.email.as_ref()),
        );
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
        Ok(Some(plan))
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
