//! A burst of commands with a fault in the middle, checked from the outside
//! (CONTRACT §6): the fault tests (tests/faults.rs) and the cluster tests
//! (tests/cluster.rs) share it. Every command has a unique message_id; both
//! commands, accepted, refused and malformed. After the run: every command
//! answered once (or identically), one row per valid command, every token's
//! `email.requested`, and exactly the malformed commands dead-lettered.

use crate::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const BURST: usize = 10_000;

/// One command as published.
pub struct Outgoing {
    kind: &'static str,
    body: String,
    props: BasicProperties,
    /// Into the bulk lane's exchange rather than the command exchange.
    bulk: bool,
}

impl Outgoing {
    /// Puts this command into the bulk lane.
    pub fn into_bulk(mut self) -> Self {
        self.bulk = true;
        self
    }
}

/// What one command must get.
#[derive(Clone, Debug)]
pub struct Sent {
    pub message_id: String,
    pub status: i64,
    pub creates_row: bool,
    pub malformed: bool,
}

/// A run's names and the durable queues that collect what the worker sends, so
/// nothing is lost while the broker restarts and everything can be read at the end.
pub struct Run {
    pub env: Env,
    /// The broker node this run's publisher and checks use (by default the
    /// one the topology was declared through).
    pub amqp: String,
    pub replies: String,
    pub events: String,
    pub log: PathBuf,
    /// Replies as they arrived, when [`Run::watch_replies`] is on.
    watched: Arc<std::sync::Mutex<Vec<(Received, Instant)>>>,
}

impl Run {
    pub async fn prepare() -> Run {
        Run::prepare_on(Servers::from_env(), None).await
    }

    /// On `servers`; the publisher and the checks on `client_amqp` when given.
    pub async fn prepare_on(servers: Servers, client_amqp: Option<String>) -> Run {
        let mut env = Env::prepare_on(servers, |_| {}).await;
        let prefix = env.settings.broker.command_queue.clone();
        // A durable, named reply queue (so no reply is lost while the broker
        // restarts), allowed as a reply_to the way an operator would allow it.
        let replies = format!("{prefix}.replies");
        env.settings.broker.reply_to_prefixes.push(replies.clone());
        let run = Run {
            amqp: client_amqp.unwrap_or_else(|| env.servers.admin_amqp.clone()),
            watched: Default::default(),
            replies,
            events: format!("{prefix}.all-events"),
            log: std::env::temp_dir().join(format!("{}-worker.log", env.db_name)),
            env,
        };
        let ch = run.channel().await;
        for q in [&run.replies, &run.events] {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        // Every event, and (as the dispatcher's queue gets them) the email requests.
        let b = &run.env.settings.broker;
        for (exchange, key) in [
            (&b.events_exchange, "#"),
            (&b.email_exchange, "email.requested"),
        ] {
            ch.queue_bind(
                run.events.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        run
    }

    /// A fresh connection: the harness's own may have died with the broker.
    pub async fn channel(&self) -> lapin::Channel {
        let conn = Connection::connect(&self.amqp, ConnectionProperties::default())
            .await
            .expect("broker reachable");
        conn.create_channel().await.unwrap()
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        let (db, conn) = tokio_postgres::connect(
            self.env.settings.database.database_url.expose_secret(),
            tokio_postgres::NoTls,
        )
        .await
        .expect("database reachable");
        tokio::spawn(conn);
        db
    }

    /// The burst: correlation id → what the command must get, and what to publish.
    pub fn plan_burst(&self) -> (HashMap<String, Sent>, Vec<Outgoing>) {
        self.plan(BURST)
    }

    /// `n` commands: correlation id → what each must get, and what to publish.
    pub fn plan(&self, n: usize) -> (HashMap<String, Sent>, Vec<Outgoing>) {
        let mut sent = HashMap::new();
        let mut out = Vec::new();
        for i in 0..n {
            let message_id = Uuid::new_v4().to_string();
            let correlation = format!("c{i}");
            let (kind, body, status, creates_row, malformed) = match i % 10 {
                0..=3 => (
                    "create-ticket",
                    ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string(),
                    200,
                    true,
                    false,
                ),
                4..=7 => (
                    "create-verification-token",
                    verification(ADMIN_TOKEN, ENABLED_PROFILE).to_string(),
                    200,
                    true,
                    false,
                ),
                8 => (
                    "create-ticket",
                    ticket(ADMIN_TOKEN, DISABLED_PROFILE).to_string(),
                    403,
                    false,
                    false,
                ),
                _ => (
                    "create-ticket",
                    format!("{{\"accessTokenId\":{i}}}"),
                    400,
                    false,
                    true,
                ),
            };
            out.push(Outgoing {
                kind,
                body,
                props: BasicProperties::default()
                    .with_type(kind.into())
                    .with_content_type("application/json".into())
                    .with_message_id(message_id.as_str().into())
                    .with_correlation_id(correlation.as_str().into())
                    .with_reply_to(self.replies.as_str().into())
                    .with_delivery_mode(2),
                bulk: false,
            });
            sent.insert(
                correlation,
                Sent {
                    message_id,
                    status,
                    creates_row,
                    malformed,
                },
            );
        }
        (sent, out)
    }

    /// Publishes like a careful publisher: windows of `window` with confirms, a
    /// `pause` after each; when the connection fails or anything is nacked, it
    /// reconnects (waiting for the broker to come back) and re-sends the whole
    /// unconfirmed window. Returns how many commands were sent more than once.
    pub async fn publish(&self, commands: &[Outgoing], window: usize, pause: Duration) -> usize {
        let b = &self.env.settings.broker;
        let exchange = |c: &Outgoing| {
            if c.bulk {
                b.bulk_exchange.as_str()
            } else {
                b.command_exchange.as_str()
            }
        };
        let (mut next, mut resent) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while next < commands.len() {
            assert!(Instant::now() < deadline, "could not publish the burst");
            let ch = match Connection::connect(&self.amqp, ConnectionProperties::default()).await {
                Ok(conn) => match conn.create_channel().await {
                    Ok(ch)
                        if ch
                            .confirm_select(ConfirmSelectOptions::default())
                            .await
                            .is_ok() =>
                    {
                        ch
                    }
                    _ => continue,
                },
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            while next < commands.len() {
                let window = &commands[next..(next + window).min(commands.len())];
                let mut confirms = Vec::new();
                for c in window {
                    match ch
                        .basic_publish(
                            exchange(c).into(),
                            c.kind.into(),
                            BasicPublishOptions::default(),
                            c.body.as_bytes(),
                            c.props.clone(),
                        )
                        .await
                    {
                        Ok(confirm) => confirms.push(confirm),
                        Err(_) => break,
                    }
                }
                let mut acked = confirms.len() == window.len();
                for confirm in confirms {
                    acked &= matches!(confirm.await, Ok(c) if c.is_ack());
                }
                if !acked {
                    resent += window.len();
                    break;
                }
                next += window.len();
                tokio::time::sleep(pause).await;
            }
        }
        resent
    }

    /// Starts a worker process (its log appended to this run's) and waits until it is ready.
    pub async fn spawn_worker(&self) -> WorkerProcess {
        self.spawn_worker_logging("info").await
    }

    pub async fn spawn_worker_logging(&self, filter: &str) -> WorkerProcess {
        self.spawn_worker_with(|cmd| {
            cmd.env("RUST_LOG", filter);
        })
        .await
    }

    /// As [`Run::spawn_worker`], with the command changed by `f` first.
    pub async fn spawn_worker_with(
        &self,
        f: impl FnOnce(&mut tokio::process::Command),
    ) -> WorkerProcess {
        let mut cmd = worker_process(&self.env);
        f(&mut cmd);
        WorkerProcess::start(cmd, Some(&self.log)).await
    }

    pub async fn processed(&self) -> usize {
        match tokio_postgres::connect(
            self.env.settings.database.database_url.expose_secret(),
            tokio_postgres::NoTls,
        )
        .await
        {
            Ok((db, conn)) => {
                tokio::spawn(conn);
                db.query_one("SELECT count(*) FROM processed_commands", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) as usize)
                    .unwrap_or(0)
            }
            Err(_) => 0,
        }
    }

    /// Waits until the worker has processed at least `n` commands.
    pub async fn wait_processed(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let done = self.processed().await;
            if done >= n || Instant::now() > deadline {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything a queue holds, read with basic.get until it is empty.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let ch = self.channel().await;
        let mut all = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            all.push(m);
        }
        all
    }

    /// The guarantees of CONTRACT §6, checked after the worker finished the burst.
    pub async fn verify(&self, sent: &HashMap<String, Sent>) {
        let db = self.db().await;
        let count = |sql: &'static str| {
            let db = &db;
            async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        // The outbox drains (relay after 1 s grace) before events are counted.
        let deadline = Instant::now() + Duration::from_secs(30);
        while count("SELECT count(*) FROM outbox").await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            count("SELECT count(*) FROM outbox").await,
            0,
            "outbox drained"
        );

        let (received, distinct) = self.verify_replies(sent).await;
        // Exactly one row per valid command.
        let valid = sent.values().filter(|s| s.creates_row).count() as i64;
        let rows = count(
            "SELECT (SELECT count(*) FROM tickets) + (SELECT count(*) FROM verification_tokens)",
        )
        .await;
        assert_eq!(rows, valid, "rows = distinct valid message_ids");

        self.verify_emails(&db).await;
        let (dead, dead_copies) = self.verify_dead_letters(sent).await;
        eprintln!(
            "verified: {} commands, {received} replies ({} repeated), {rows} rows, {dead} dead letters ({dead_copies} copies)",
            sent.len(),
            received - distinct,
        );
    }

    /// Every message_id answered, every reply for one message_id identical;
    /// returns (replies, distinct message_ids answered).
    async fn verify_replies(&self, sent: &HashMap<String, Sent>) -> (usize, usize) {
        let mut replies: HashMap<String, HashSet<(i64, String)>> = HashMap::new();
        let mut received: Vec<Received> = self
            .drain(&self.replies)
            .await
            .iter()
            .map(|m| Received::from_delivery(&m.delivery))
            .collect();
        received.extend(self.watched().into_iter().map(|(r, _)| r));
        for r in &received {
            let corr = r.correlation_id.clone().expect("a correlation_id");
            let status = r
                .header("status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            replies
                .entry(corr)
                .or_default()
                .insert((status, String::from_utf8_lossy(&r.body).into_owned()));
        }
        let mut wrong = Vec::new();
        for (corr, s) in sent {
            match replies.get(corr) {
                None => wrong.push(format!("{corr}: no reply")),
                Some(set) if set.len() > 1 => {
                    wrong.push(format!("{corr}: {} different replies", set.len()))
                }
                Some(set) => {
                    let (status, _) = set.iter().next().unwrap();
                    if *status != s.status {
                        wrong.push(format!("{corr}: status {status}, expected {}", s.status));
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{} commands answered wrongly, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );

        (received.len(), replies.len())
    }

    /// Every token has its email.requested, one message_id per token.
    async fn verify_emails(&self, db: &tokio_postgres::Client) {
        let tokens: HashSet<String> = db
            .query("SELECT id::text FROM verification_tokens", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut emails: HashMap<String, HashSet<String>> = HashMap::new();
        for m in self.drain(&self.events).await {
            let d = &m.delivery;
            if d.routing_key.as_str() != "email.requested" {
                continue;
            }
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            emails
                .entry(body["tokenId"].as_str().unwrap().to_string())
                .or_default()
                .insert(d.properties.message_id().as_ref().unwrap().to_string());
        }
        let missing = tokens.iter().filter(|t| !emails.contains_key(*t)).count();
        assert_eq!(missing, 0, "tokens without email.requested");
        assert!(
            emails.values().all(|ids| ids.len() == 1),
            "every event for one token carries one message_id"
        );
    }

    /// The dead-letter queue holds exactly the malformed commands; returns
    /// (commands dead-lettered, copies).
    async fn verify_dead_letters(&self, sent: &HashMap<String, Sent>) -> (usize, usize) {
        let expected_dead: HashSet<&str> = sent
            .values()
            .filter(|s| s.malformed)
            .map(|s| s.message_id.as_str())
            .collect();
        let dead: Vec<String> = self
            .drain(&self.env.settings.broker.dead_letter_queue)
            .await
            .iter()
            .map(|m| {
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let dead_set: HashSet<&str> = dead.iter().map(String::as_str).collect();
        assert_eq!(
            dead_set, expected_dead,
            "dead letters are exactly the malformed commands"
        );
        (dead_set.len(), dead.len())
    }

    pub async fn finish(self, mut worker: WorkerProcess) {
        signal(&worker, SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
            .await
            .expect("worker exits within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "worker exit status {status:?}");
        self.remove().await;
    }

    /// Removes the run's queues, log, database and the rest of its topology.
    pub async fn remove(self) {
        let ch = self.channel().await;
        for q in [&self.replies, &self.events] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = std::fs::remove_file(&self.log);
        self.env.teardown().await;
    }

    /// Consumes the reply queue as replies arrive, noting when each did (for
    /// failover times); [`Run::verify`] counts these with what is left queued.
    /// The consumer's node must stay up.
    pub async fn watch_replies(&self) {
        let ch = self.channel().await;
        let mut consumer = ch
            .basic_consume(
                self.replies.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let watched = self.watched.clone();
        tokio::spawn(async move {
            let _ch = ch;
            use futures_util::StreamExt;
            while let Some(Ok(d)) = consumer.next().await {
                watched
                    .lock()
                    .unwrap()
                    .push((Received::from_delivery(&d), Instant::now()));
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
    }

    /// What [`Run::watch_replies`] has seen so far, in arrival order.
    pub fn watched(&self) -> Vec<(Received, Instant)> {
        self.watched.lock().unwrap().clone()
    }

    /// After a fault at `at`: how long until the first reply arrived, and the
    /// longest silence between two replies from a second before it on.
    pub fn failover(&self, at: Instant) -> (Option<Duration>, Duration) {
        let times: Vec<Instant> = self.watched().into_iter().map(|(_, t)| t).collect();
        let first = times.iter().find(|t| **t > at).map(|t| *t - at);
        let from = at.checked_sub(Duration::from_secs(1)).unwrap_or(at);
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for t in times.iter().filter(|t| **t >= from) {
            gap = gap.max(*t - prev);
            prev = *t;
        }
        (first, gap)
    }

    /// Runs the burst to the end with `fault` injected once `at` commands are done.
    pub async fn burst_with<F, Fut>(self, at: usize, fault: F)
    where
        F: FnOnce(WorkerProcess, Run) -> Fut,
        Fut: std::future::Future<Output = (WorkerProcess, Run)>,
    {
        let plan = self.plan_burst();
        self.burst_of(plan, at, fault).await;
    }

    /// [`Run::burst_with`], with the commands given.
    pub async fn burst_of<F, Fut>(
        self,
        (sent, commands): (HashMap<String, Sent>, Vec<Outgoing>),
        at: usize,
        fault: F,
    ) where
        F: FnOnce(WorkerProcess, Run) -> Fut,
        Fut: std::future::Future<Output = (WorkerProcess, Run)>,
    {
        self.publish(&commands, 500, Duration::ZERO).await;
        let worker = self.spawn_worker().await;
        let done = self.wait_processed(at, Duration::from_secs(120)).await;
        assert!(done >= at, "worker started: {done} processed");
        let (worker, run) = fault(worker, self).await;
        run.complete(worker, &sent).await;
    }

    /// After the fault: the worker finishes everything, the guarantees hold, it stops cleanly.
    pub async fn complete(self, worker: WorkerProcess, sent: &HashMap<String, Sent>) {
        let expected = sent.values().filter(|s| !s.malformed).count();
        let done = self
            .wait_processed(expected, Duration::from_secs(240))
            .await;
        assert_eq!(done, expected, "every command processed after the fault");
        self.verify(sent).await;
        self.finish(worker).await;
    }
}
