//! Publishing a batch's replies, events and dead letters together, and settling
//! each refusal (a nack) by whose message it was, so that no caller can hold
//! the worker: a reply is the caller's, retried briefly in the background and
//! then dropped and counted; an event stays in the outbox for the relay; a dead
//! letter is handed to the queue's own dead-lettering.

use super::outbox::ConfirmedEvents;
use super::ports::{Broker, SessionLost};
use crate::broker::Outgoing;
use crate::config::BrokerSettings;
use crate::records::OutboxEvent;
use crate::telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Attempts at a refused reply after the first, paused 100 ms, 200 ms, 400 ms
/// (each with up to as much again of jitter): about a second in all.
const REPLY_RETRIES: usize = 3;
/// Refused replies being retried at once; past that a refused reply is dropped
/// at once, so a caller whose queue refuses everything costs bounded memory.
const REPLY_RETRY_TASKS: usize = 64;

/// What one batch publishes, grouped by what a nack means for it.
#[derive(Default)]
pub(super) struct Publications {
    pub replies: Vec<Outgoing>,
    /// With the outbox row each settles.
    pub events: Vec<(Outgoing, Uuid)>,
    /// With the delivery each is for.
    pub dead_letters: Vec<(Outgoing, u64)>,
}

impl Publications {
    /// An outbox event, on its exchange (`outbox::event_message`); one that is
    /// withheld keeps its row and is not published.
    pub fn push_event(&mut self, broker: &BrokerSettings, e: &OutboxEvent) {
        if let Some(m) = super::outbox::event_message(broker, e) {
            self.events.push((m, e.event_id));
        }
    }

    pub fn len(&self) -> usize {
        self.replies.len() + self.events.len() + self.dead_letters.len()
    }
}

/// A batch's publications, sent; their confirms not yet awaited.
pub struct Sent<B: Broker> {
    /// Kept to retry the ones the broker refuses.
    replies: Vec<Outgoing>,
    event_ids: Vec<Uuid>,
    dead_tags: Vec<u64>,
    /// Replies', then events', then dead letters' confirms.
    confirms: B::Confirms,
}

/// What the broker's confirms left to do.
#[derive(Default)]
pub(super) struct Settled {
    /// Deliveries whose dead letter was refused: rejected without requeue, so
    /// the queue's own (at-least-once) dead-lettering keeps them.
    pub reject: Vec<u64>,
}

/// Publishes on one confirm channel and settles what the broker refused.
pub(super) struct Dispatcher<B: Broker> {
    publisher: B,
    /// Where confirmed events go, for the next commit to delete their rows.
    confirmed: ConfirmedEvents,
    reply_retries: Arc<Semaphore>,
}

impl<B: Broker> Dispatcher<B> {
    pub fn new(publisher: B, confirmed: ConfirmedEvents) -> Self {
        Dispatcher {
            publisher,
            confirmed,
            reply_retries: Arc::new(Semaphore::new(REPLY_RETRY_TASKS)),
        }
    }

    /// Publishes everything and waits for every confirm.
    pub async fn publish(&self, out: Publications) -> Result<Settled, SessionLost> {
        let sent = self.send(out).await?;
        self.confirm(sent).await
    }

    /// Publishes everything without waiting for the confirms, so a batch's
    /// replies leave as soon as it is committed, even while the batch before it
    /// on the same consumer still waits for its own confirms.
    pub async fn send(&self, out: Publications) -> Result<Sent<B>, SessionLost> {
        let Publications {
            replies,
            events,
            dead_letters,
        } = out;
        let confirms = self
            .publisher
            .send(
                replies
                    .iter()
                    .chain(events.iter().map(|(o, _)| o))
                    .chain(dead_letters.iter().map(|(o, _)| o))
                    .collect(),
            )
            .await?;
        Ok(Sent {
            event_ids: events.into_iter().map(|(_, id)| id).collect(),
            dead_tags: dead_letters.into_iter().map(|(_, t)| t).collect(),
            replies,
            confirms,
        })
    }

    /// Waits for every confirm of what [`Dispatcher::send`] published and
    /// settles what the broker refused.
    pub async fn confirm(&self, sent: Sent<B>) -> Result<Settled, SessionLost> {
        let Sent {
            replies,
            event_ids,
            dead_tags,
            confirms,
        } = sent;
        let acked = self.publisher.confirmed(confirms).await?;
        let (n_replies, n_events) = (replies.len(), event_ids.len());
        let refused_replies: Vec<Outgoing> = replies
            .into_iter()
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
        self.confirmed.add(confirmed);
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
            let pauses =
                crate::backoff::backoff(Duration::from_millis(100), Duration::from_millis(400));
            for pause in pauses.take(REPLY_RETRIES) {
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
                        drop_replies(pending.len() as u64, &e.to_string());
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
