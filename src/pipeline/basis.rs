//! What a batch is decided on, and the retries that choice needs: the rows
//! earlier batches read (`known`), when every token and profile the batch
//! names is among them, else a load. The commit checks the versions either
//! way; a check that fails means a row changed (a token revoked, a profile
//! disabled) or an email another worker claimed, and the batch is decided
//! again on a fresh load, a few times at once before the retries take over.

use super::answer::{self, Answer};
use super::item::Item;
use super::plan::{self, Input, Plan};
use super::ports::{Ports, Store, StoreBatch, World};
use super::publish::Publications;
use super::{decided, stage, Pipeline};
use crate::records::Loaded;
use crate::store::StoreError;
use std::time::{Duration, Instant};

/// Loads in a row after commits that found a row changed since the load,
/// before the failure is left to the transient retries.
const RELOADS: usize = 3;

/// The rows a batch is decided on.
pub(super) enum Basis {
    /// Read by earlier batches: no load. The commit checks only records, so a
    /// plan that refuses a command (which writes nothing to check) is not
    /// committed on this basis.
    Known(Loaded),
    /// Loaded for this batch.
    Loaded(Loaded),
}

/// What became of a plan on its basis.
enum Outcome {
    Committed(Plan),
    /// The plan refuses a command on known rows: nothing was committed; the
    /// batch must be decided on a load.
    Unchecked,
}

impl<P: Ports> Pipeline<P> {
    /// One attempt at the database part: decided on known rows when it can
    /// be, else on a load; committed. Returns what to publish and how each
    /// command was answered.
    pub(super) async fn commit_batch(
        &self,
        items: &[Item],
    ) -> Result<(Publications, Vec<Answer>), StoreError> {
        let inputs: Vec<Input> = items.iter().map(Item::input).collect();
        let keys = plan::keys(&inputs);
        let known = &self.parts.known;
        let mut db = self.parts.store.batch().await?;
        if let Some(rows) = known.recall(&keys) {
            match self
                .plan_and_commit(&mut db, &inputs, Basis::Known(rows))
                .await
            {
                Ok(Outcome::Committed(plan)) => {
                    decided("known");
                    return Ok(answer::batch(items, &plan, self.routes()));
                }
                Ok(Outcome::Unchecked) => {}
                Err(e) if e.is_rows_changed() || e.is_serialization_failure() => {
                    // A changed row, or an email another worker claimed (which
                    // only a load would have shown): decide again on a load.
                    known.forget(&keys);
                    decided("changed");
                }
                Err(e) => {
                    known.forget(&keys);
                    return Err(e);
                }
            }
        }
        // A row written between the load and the commit fails the commit too:
        // load again at once, a few times, before leaving it to the retries.
        let mut reloads = 0;
        loop {
            let loading = Instant::now();
            let mut loaded = db
                .load(&keys.access_token_ids, &keys.profile_ids, &keys.message_ids)
                .await?;
            self.drop_confirmed(&mut loaded);
            stage("load", loading.elapsed());
            known.learn(&loaded);
            match self
                .plan_and_commit(&mut db, &inputs, Basis::Loaded(loaded))
                .await
            {
                Ok(Outcome::Committed(plan)) => {
                    decided("loaded");
                    return Ok(answer::batch(items, &plan, self.routes()));
                }
                Ok(Outcome::Unchecked) => unreachable!("a loaded batch's plan always stands"),
                Err(e) if e.is_rows_changed() && reloads < RELOADS => reloads += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Events already confirmed are not pending, whatever their rows say
    /// until the next commit deletes them. Read only when there are earlier
    /// events, which most batches have none of.
    fn drop_confirmed(&self, loaded: &mut Loaded) {
        if loaded
            .processed
            .values()
            .all(|p| p.pending_events.is_empty())
        {
            return;
        }
        let confirmed = self.parts.confirmed.snapshot();
        for p in loaded.processed.values_mut() {
            p.pending_events
                .retain(|e| !confirmed.contains(&e.event_id));
        }
    }

    /// Plans the batch on its basis, commits it (checking the rows' versions),
    /// and answers the records another transaction won from that one's.
    async fn plan_and_commit(
        &self,
        db: &mut <P::Store as Store>::Batch<'_>,
        inputs: &[Input<'_>],
        basis: Basis,
    ) -> Result<Outcome, StoreError> {
        let planning = Instant::now();
        let (mut rows, on_known) = match basis {
            Basis::Known(rows) => (rows, true),
            Basis::Loaded(rows) => (rows, false),
        };
        let versions = std::mem::take(&mut rows.versions);
        #[cfg(feature = "sim-bugs")]
        let versions = if on_known && self.has_bug(super::bugs::Bug::KnownRowsUnchecked) {
            crate::records::Versions::default()
        } else {
            versions
        };
        let w = &self.parts.settings.worker;
        let world = &*self.parts.world;
        let mut plan = plan::plan(
            inputs,
            rows,
            plan::Params {
                now_ms: world.now_ms(),
                default_verification_url: w.verification_url(),
                email_cooldown_secs: w.email_cooldown_secs,
            },
            || world.new_id(),
        );
        if on_known && !plan.only_records() {
            return Ok(Outcome::Unchecked);
        }
        let cooldown = Duration::from_secs(w.email_cooldown_secs);
        let committing = Instant::now();
        stage("plan", committing - planning);
        // The confirmed events' rows go with this commit, or back for the next.
        let confirmed = self.parts.confirmed.take();
        let lost = match db
            .commit(&plan.records, &versions, &confirmed, cooldown)
            .await
        {
            Ok(lost) => lost,
            Err(e) => {
                self.parts.confirmed.add(confirmed);
                return Err(e);
            }
        };
        stage("commit", committing.elapsed());
        self.parts.known.note_emails(
            plan.records
                .iter()
                .enumerate()
                .filter(|(n, _)| !lost.contains(n))
                .filter_map(|(_, r)| r.email.as_ref()),
        );
        #[cfg(feature = "sim-bugs")]
        if self.has_bug(super::bugs::Bug::AnswerLostFromOwnPlan) {
            return Ok(Outcome::Committed(plan));
        }
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
        Ok(Outcome::Committed(plan))
    }
}
