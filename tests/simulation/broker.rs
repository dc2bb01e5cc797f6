//! An in-memory RabbitMQ, as far as the pipeline relies on it: one command
//! queue with prefetch, delivery tags per consumer, redelivery with a
//! delivery count (`x-delivery-count`), rejects to the dead-letter exchange,
//! publisher confirms that may be nacked, delayed (so they settle out of
//! order) or lost with the session, and sessions that drop, returning what
//! they held. Every publication is routed into a log the invariants read.

use super::sim::Sim;
use profile_worker::broker::{properties, HeaderValue, Outgoing, Properties};
use profile_worker::pipeline::ports::{self, Delivery, SessionLost};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// A message in the command queue.
#[derive(Debug, Clone)]
pub struct Msg {
    pub routing_key: String,
    pub properties: Properties,
    pub body: Vec<u8>,
    /// Earlier deliveries.
    pub deliveries: u64,
    /// The order it was published in.
    pub seq: u64,
}

impl Msg {
    pub fn message_id(&self) -> Option<String> {
        properties::short(self.properties.message_id()).map(String::from)
    }

    pub fn correlation(&self) -> Option<String> {
        properties::short(self.properties.correlation_id()).map(String::from)
    }
}

/// A reply the broker took.
#[derive(Debug, Clone)]
pub struct Reply {
    pub correlation: String,
    pub status: i64,
    pub body: String,
}

/// An event the broker took.
#[derive(Debug, Clone)]
pub struct Event {
    pub message_id: String,
    pub routing_key: String,
    pub body: String,
}

/// A dead letter: the worker's, or the queue's own.
#[derive(Debug, Clone)]
pub struct Dead {
    pub message_id: Option<String>,
}

pub struct Consumer {
    pub worker: usize,
    pub prefetch: usize,
    next_tag: u64,
    unacked: BTreeMap<u64, Msg>,
}

pub struct BrokerState {
    pub ready: VecDeque<Msg>,
    /// Each command as first published, by message_id, for callers' retries.
    originals: BTreeMap<String, Msg>,
    consumers: BTreeMap<u64, Consumer>,
    next_consumer: u64,
    /// Each worker's session: a handle of an older one is refused.
    pub epochs: BTreeMap<usize, u64>,
    pub replies: Vec<Reply>,
    /// Correlations of replies the broker refused (the worker retries them
    /// briefly, then drops them: the caller's queue is its own problem).
    pub refused_replies: BTreeSet<String>,
    pub events: Vec<Event>,
    pub dead: Vec<Dead>,
    /// Dead letters the worker published without saying why.
    pub unexplained: usize,
    seq: u64,
    events_exchange: String,
    email_exchange: String,
    dead_letter_exchange: String,
    delivery_limit: u64,
}

impl BrokerState {
    pub fn new(settings: &profile_worker::config::BrokerSettings) -> Self {
        BrokerState {
            ready: VecDeque::new(),
            originals: BTreeMap::new(),
            consumers: BTreeMap::new(),
            next_consumer: 1,
            epochs: BTreeMap::new(),
            replies: Vec::new(),
            refused_replies: BTreeSet::new(),
            events: Vec::new(),
            dead: Vec::new(),
            unexplained: 0,
            seq: 0,
            events_exchange: settings.events_exchange.clone(),
            email_exchange: settings.email_exchange.clone(),
            dead_letter_exchange: settings.dead_letter_exchange.clone(),
            delivery_limit: u64::from(settings.delivery_limit),
        }
    }

    pub fn publish_command(&mut self, routing_key: &str, properties: Properties, body: Vec<u8>) {
        self.seq += 1;
        let m = Msg {
            routing_key: routing_key.into(),
            properties,
            body,
            deliveries: 0,
            seq: self.seq,
        };
        if let Some(id) = m.message_id() {
            self.originals.entry(id).or_insert_with(|| m.clone());
        }
        self.ready.push_back(m);
    }

    /// The command first published under `message_id`.
    pub fn replay_of(&self, message_id: &str) -> Option<Msg> {
        self.originals.get(message_id).cloned()
    }

    pub fn unacked(&self) -> usize {
        self.consumers.values().map(|c| c.unacked.len()).sum()
    }

    /// A message back to the queue, counted; past the delivery limit, the
    /// queue dead-letters it instead.
    fn requeue(&mut self, mut m: Msg) {
        m.deliveries += 1;
        if m.deliveries >= self.delivery_limit {
            self.dead.push(Dead {
                message_id: m.message_id(),
            });
            return;
        }
        // Returned messages go back to the head, in their order.
        let at = self
            .ready
            .iter()
            .position(|r| r.seq > m.seq)
            .unwrap_or(self.ready.len());
        self.ready.insert(at, m);
    }

    /// The worker's session ends: its consumers go, and what they held
    /// returns to the queue.
    pub fn drop_session(&mut self, worker: usize) {
        *self.epochs.entry(worker).or_default() += 1;
        let gone: Vec<u64> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.worker == worker)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let c = self.consumers.remove(&id).expect("listed");
            for (_, m) in c.unacked {
                self.requeue(m);
            }
        }
    }

    pub fn epoch(&self, worker: usize) -> u64 {
        self.epochs.get(&worker).copied().unwrap_or(0)
    }

    fn route(&mut self, m: &Outgoing) {
        self.seq += 1;
        let header = |name: &str| -> Option<String> {
            match m.properties.headers().as_ref()?.inner().get(name)? {
                HeaderValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
                HeaderValue::ShortString(s) => Some(s.as_str().into()),
                _ => None,
            }
        };
        let body = String::from_utf8_lossy(&m.body).into_owned();
        if m.exchange.is_empty() {
            self.replies.push(Reply {
                correlation: properties::short(m.properties.correlation_id())
                    .unwrap_or_default()
                    .into(),
                status: properties::reply_status(&m.properties),
                body,
            });
        } else if m.exchange == self.events_exchange || m.exchange == self.email_exchange {
            self.events.push(Event {
                message_id: properties::short(m.properties.message_id())
                    .unwrap_or_default()
                    .into(),
                routing_key: m.routing_key.clone(),
                body,
            });
        } else if m.exchange == self.dead_letter_exchange {
            if header(properties::ERROR_CODE_HEADER).is_none() {
                self.unexplained += 1;
            }
            self.dead.push(Dead {
                message_id: properties::short(m.properties.message_id()).map(String::from),
            });
        } else {
            panic!(
                "published to an exchange the simulation has none of: {}",
                m.exchange
            );
        }
    }
}

/// One worker's handle on its broker session: a consumer's (deliveries,
/// acks) or a publisher's alone (the relay).
#[derive(Clone)]
pub struct SimBroker {
    pub sim: Sim,
    pub worker: usize,
    pub epoch: u64,
    pub consumer: Option<u64>,
}

/// Confirms of one `send`: decided when sent, known after a seeded delay.
pub struct Confirms {
    outcomes: Vec<bool>,
    after: Duration,
}

impl SimBroker {
    /// A consumer on the worker's current session.
    pub fn consume(sim: &Sim, worker: usize, prefetch: usize) -> SimBroker {
        let mut s = sim.lock();
        let epoch = s.broker.epoch(worker);
        let id = s.broker.next_consumer;
        s.broker.next_consumer += 1;
        s.broker.consumers.insert(
            id,
            Consumer {
                worker,
                prefetch,
                next_tag: 1,
                unacked: BTreeMap::new(),
            },
        );
        SimBroker {
            sim: sim.clone(),
            worker,
            epoch,
            consumer: Some(id),
        }
    }

    pub fn publisher(sim: &Sim, worker: usize) -> SimBroker {
        let epoch = sim.lock().broker.epoch(worker);
        SimBroker {
            sim: sim.clone(),
            worker,
            epoch,
            consumer: None,
        }
    }

    /// Refuses a handle whose session is gone; may drop the session now.
    fn live(&self, s: &mut super::sim::State) -> Result<(), SessionLost> {
        if s.broker.epoch(self.worker) != self.epoch {
            return Err(SessionLost("the session is gone".into()));
        }
        let p = s.faults.session_drop;
        if s.chance(p) {
            s.note(format!("worker {} session drops", self.worker));
            s.broker.drop_session(self.worker);
            return Err(SessionLost("the session dropped".into()));
        }
        Ok(())
    }

    /// Up to `max` deliveries the prefetch window allows (none: an empty batch).
    pub async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SessionLost> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        self.live(&mut s)?;
        let id = self.consumer.expect("a consumer fetches");
        let room = {
            let c = &s.broker.consumers[&id];
            c.prefetch.saturating_sub(c.unacked.len()).min(max)
        };
        let mut out = Vec::new();
        for _ in 0..room {
            let Some(m) = s.broker.ready.pop_front() else {
                break;
            };
            let c = s.broker.consumers.get_mut(&id).expect("consumer");
            let tag = c.next_tag;
            c.next_tag += 1;
            let mut props = m.properties.clone();
            if m.deliveries > 0 {
                let mut h = props.headers().clone().unwrap_or_default();
                h.insert(
                    "x-delivery-count".into(),
                    HeaderValue::LongLongInt(m.deliveries as i64),
                );
                props = props.with_headers(h);
            }
            out.push(Delivery {
                tag,
                routing_key: m.routing_key.clone(),
                properties: props,
                body: m.body.clone(),
            });
            c.unacked.insert(tag, m);
        }
        if !out.is_empty() {
            let tags: Vec<u64> = out.iter().map(|d| d.tag).collect();
            s.note(format!(
                "worker {} consumer {id} takes {tags:?}",
                self.worker
            ));
        }
        Ok(out)
    }

    /// Whether acking `m` now is safe: its command's effects are durable (a
    /// stored record), or it was answered or dead-lettered already.
    fn durable(s: &super::sim::State, m: &Msg) -> bool {
        let stored = m
            .message_id()
            .is_some_and(|id| s.store.processed.contains_key(&id));
        let answered = m.correlation().is_some_and(|c| {
            s.broker.refused_replies.contains(&c)
                || s.broker.replies.iter().any(|r| r.correlation == c)
        });
        let dead = m.message_id().is_some_and(|id| {
            s.broker
                .dead
                .iter()
                .any(|d| d.message_id.as_deref() == Some(&id))
        });
        stored || answered || dead
    }
}

impl ports::Broker for SimBroker {
    type Confirms = Confirms;

    async fn send(&self, messages: Vec<&Outgoing>) -> Result<Confirms, SessionLost> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        self.live(&mut s)?;
        let mut outcomes = Vec::with_capacity(messages.len());
        for m in messages {
            let p = s.faults.nack;
            let ok = !s.chance(p);
            if ok {
                s.broker.route(m);
            } else if m.exchange.is_empty() {
                let c = properties::short(m.properties.correlation_id()).unwrap_or_default();
                s.broker.refused_replies.insert(c.into());
            }
            outcomes.push(ok);
        }
        let max = s.max_pause_us.max(1) * 2;
        let after = Duration::from_micros(s.rng.u64(0..=max));
        s.note(format!("worker {} sends {outcomes:?}", self.worker));
        Ok(Confirms { outcomes, after })
    }

    async fn confirmed(&self, c: Confirms) -> Result<Vec<bool>, SessionLost> {
        tokio::time::sleep(c.after).await;
        let mut s = self.sim.lock();
        self.live(&mut s)?;
        Ok(c.outcomes)
    }

    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), SessionLost> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        self.live(&mut s)?;
        let id = self.consumer.expect("a consumer acks");
        let Some(c) = s.broker.consumers.get_mut(&id) else {
            return Err(SessionLost("no such consumer".into()));
        };
        let tags: Vec<u64> = if multiple {
            c.unacked.range(..=tag).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        };
        if !c.unacked.contains_key(&tag) {
            let worker = self.worker;
            s.violation(format!(
                "worker {worker} acked tag {tag}, which is not unacked: the broker closes the channel"
            ));
            s.broker.drop_session(worker);
            return Err(SessionLost(
                "PRECONDITION_FAILED - unknown delivery tag".into(),
            ));
        }
        let acked: Vec<Msg> = tags.iter().filter_map(|t| c.unacked.remove(t)).collect();
        for m in &acked {
            if !Self::durable(&s, m) {
                s.violation(format!(
                    "{} (correlation {}) acked before its effects were durable: no stored record, reply or dead letter",
                    m.message_id().unwrap_or_default(),
                    m.correlation().unwrap_or_default()
                ));
            }
        }
        s.note(format!("worker {} acks {tags:?}", self.worker));
        Ok(())
    }

    async fn reject(&self, tag: u64, requeue: bool) -> Result<(), SessionLost> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        self.live(&mut s)?;
        let id = self.consumer.expect("a consumer rejects");
        let Some(m) = s
            .broker
            .consumers
            .get_mut(&id)
            .and_then(|c| c.unacked.remove(&tag))
        else {
            let worker = self.worker;
            s.violation(format!(
                "worker {worker} rejected tag {tag}, which is not unacked"
            ));
            s.broker.drop_session(worker);
            return Err(SessionLost(
                "PRECONDITION_FAILED - unknown delivery tag".into(),
            ));
        };
        s.note(format!(
            "worker {} rejects {tag} requeue {requeue}",
            self.worker
        ));
        if requeue {
            s.broker.requeue(m);
        } else {
            s.broker.dead.push(Dead {
                message_id: m.message_id(),
            });
        }
        Ok(())
    }
}
