//! A test's own database and prefixed broker names, its worker in-process,
//! and what it publishes and reads.

use crate::leftovers::Leftovers;
use crate::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use profile_worker::config::Settings;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct Env {
    pub servers: Servers,
    /// The worker's settings: the runtime database role, the worker's broker user.
    pub settings: Settings,
    pub db_name: String,
    /// The owner's URL for this test's database (migrations, seeds, changes a
    /// test makes behind the worker's back).
    pub owner_db_url: String,
    /// Connected as the owner.
    pub db: tokio_postgres::Client,
    pub conn: Connection,
    pub channel: Channel,
    pub reply_queue: String,
    replies: Mutex<(mpsc::UnboundedReceiver<Reply>, HashMap<String, Reply>)>,
    events: Mutex<mpsc::UnboundedReceiver<Received>>,
    shutdown: CancellationToken,
    worker: Option<tokio::task::JoinHandle<Result<(), profile_worker::worker::RunError>>>,
    /// The operations endpoint of the worker running in this process.
    http: Option<String>,
    /// Removed by `teardown`, or by its `Drop` when a test panics first.
    leftovers: Leftovers,
}

impl Env {
    /// Database created and seeded, topology names prefixed; the worker is not started.
    pub async fn prepare() -> Self {
        Self::prepare_with(|_| {}).await
    }

    /// As [`Env::prepare`], with the settings changed by `f` before the topology
    /// is declared.
    pub async fn prepare_with(f: impl FnOnce(&mut Settings)) -> Self {
        Self::prepare_on(Servers::from_env(), f).await
    }

    /// As [`Env::prepare_with`], on `servers`.
    pub async fn prepare_on(servers: Servers, f: impl FnOnce(&mut Settings)) -> Self {
        init_test_log();
        let id = Uuid::new_v4().simple().to_string();
        let prefix = format!("t{}", &id[..12]);
        let db_name = format!("pw_test_{}", &id[..16]);
        servers
            .admin_client()
            .await
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .expect("create test database");

        let mut settings = Settings::from_env();
        let owner_db_url = db_url_on(&servers.admin_db, &db_name);
        // From here on, whatever happens, the database and (below) the names go.
        let mut leftovers = Leftovers {
            servers: servers.clone(),
            broker: settings.broker.clone(),
            db_name: db_name.clone(),
            done: false,
        };
        test_settings(&mut settings, &servers, &db_name, &prefix);
        f(&mut settings);
        leftovers.broker = settings.broker.clone();
        migrate_and_seed(&settings, &owner_db_url).await;

        let (db, db_conn) = tokio_postgres::connect(&owner_db_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(db_conn);

        let conn = servers.broker().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The topology, declared the way the worker will, so commands published
        // before the worker starts are kept.
        profile_worker::broker::declare(&channel, &settings.broker)
            .await
            .unwrap();
        let (reply_queue, reply_rx) = reply_stream(&channel).await;
        let ev_rx = event_stream(&channel, &settings).await;
        Env {
            servers,
            settings,
            db_name,
            owner_db_url,
            db,
            conn,
            channel,
            reply_queue,
            replies: Mutex::new((reply_rx, HashMap::new())),
            events: Mutex::new(ev_rx),
            shutdown: CancellationToken::new(),
            worker: None,
            http: None,
            leftovers,
        }
    }

    /// A prepared environment with the worker running in this process.
    pub async fn start() -> Self {
        let mut env = Env::prepare().await;
        env.start_worker().await;
        env
    }

    /// Builds the worker with this test's settings and runs it in this
    /// process; returns once all its consumers are consuming.
    pub async fn start_worker(&mut self) {
        let worker = profile_worker::worker::Worker::build(self.settings.clone())
            .await
            .unwrap_or_else(|e| panic!("worker starts: {}", Report(&e)));
        self.http = worker.http_addr().map(|a| a.to_string());
        let ready = worker.ready();
        self.shutdown = CancellationToken::new();
        self.worker = Some(tokio::spawn(
            worker.run_until_stopped(self.shutdown.clone()),
        ));
        let became_ready = tokio::time::timeout(Duration::from_secs(30), ready.wait()).await;
        assert_eq!(
            became_ready,
            Ok(true),
            "the worker is consuming within 30 s"
        );
    }

    /// Where the worker started by [`Env::start_worker`] serves `/metrics` and `/readyz`.
    pub fn http(&self) -> &str {
        self.http
            .as_deref()
            .expect("a worker started in this process, with HTTP_ADDR on")
    }

    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.worker.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("worker stops within 30 s")
                .expect("worker task")
                .expect("worker exits cleanly");
        }
    }

    /// Publishes one command with a publisher confirm; returns its correlation id.
    pub async fn publish(&self, body: &[u8], opts: Send) -> String {
        let kind = opts.kind.clone().unwrap_or_else(|| "create-ticket".into());
        let routing_key = opts.routing_key.clone().unwrap_or_else(|| kind.clone());
        let correlation = opts
            .correlation_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let mut props = BasicProperties::default()
            .with_correlation_id(correlation.as_str().into())
            .with_type(kind.as_str().into())
            .with_delivery_mode(2)
            .with_timestamp(profile_worker::broker::properties::now_secs());
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("traceparent", &opts.traceparent),
            ("tracestate", &opts.tracestate),
        ] {
            if let Some(v) = value {
                headers.insert(
                    name.into(),
                    lapin::types::AMQPValue::LongString(v.as_str().into()),
                );
            }
        }
        if !headers.inner().is_empty() {
            props = props.with_headers(headers);
        }
        if let Some(ct) = opts
            .content_type
            .clone()
            .or_else(|| Some("application/json".into()))
            .filter(|c| !c.is_empty())
        {
            props = props.with_content_type(ct.as_str().into());
        }
        if let Some(m) = &opts.message_id {
            props = props.with_message_id(m.as_str().into());
        }
        match opts.reply_to.as_deref() {
            None => props = props.with_reply_to(self.reply_queue.as_str().into()),
            Some("") => {}
            Some(r) => props = props.with_reply_to(r.into()),
        }
        self.publish_as_is(
            &self.settings.broker.command_exchange,
            &routing_key,
            body,
            props,
        )
        .await;
        correlation
    }

    /// Publishes a message exactly as given (for properties `publish` would not
    /// set) and waits for the broker's confirm.
    pub async fn publish_as_is(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "broker accepted the message");
    }

    pub async fn reply_for(&self, correlation: &str) -> Reply {
        let mut guard = self.replies.lock().await;
        let (rx, stash) = &mut *guard;
        if let Some(r) = stash.remove(correlation) {
            return r;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no reply for {correlation} within 30 s"))
                .expect("reply consumer alive");
            if r.correlation_id.as_deref() == Some(correlation) {
                return r;
            }
            stash.insert(r.correlation_id.clone().unwrap_or_default(), r);
        }
    }

    /// Publishes command `kind` with a fresh `message_id`; returns its correlation id.
    pub async fn send(&self, kind: &str, body: &Value) -> String {
        self.publish(
            body.to_string().as_bytes(),
            Send {
                kind: Some(kind.into()),
                message_id: Some(Uuid::new_v4().to_string()),
                ..Default::default()
            },
        )
        .await
    }

    /// Publish and wait for the reply.
    pub async fn call(&self, kind: &str, body: Value) -> Reply {
        let c = self.send(kind, &body).await;
        self.reply_for(&c).await
    }

    pub async fn call_raw(&self, body: &[u8], opts: Send) -> Reply {
        let c = self.publish(body, opts).await;
        self.reply_for(&c).await
    }

    /// Stops taking the email dispatch queue's messages (into [`Env::events`]),
    /// so that a test's own dispatcher gets them.
    pub async fn release_email_queue(&self) {
        self.channel
            .basic_cancel(EMAIL_CONSUMER.into(), BasicCancelOptions::default())
            .await
            .expect("cancel the harness's email consumer");
    }

    /// Waits until `n` events arrived (or 10 s passed) and returns all that did:
    /// everything on the events exchange, and what reaches the email dispatch
    /// queue (`Received::exchange` tells which).
    pub async fn events(&self, n: usize) -> Vec<Received> {
        let mut rx = self.events.lock().await;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => out.push(e),
                _ => break,
            }
        }
        // Anything more that is already here (to catch unexpected extras).
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    /// Takes every message now in the dead-letter queue.
    pub async fn dead_letters(&self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(
                self.settings.broker.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            out.push(Received::from_delivery(&m.delivery));
        }
        out
    }

    /// Waits up to 10 s for at least `n` dead letters.
    pub async fn wait_dead_letters(&self, n: usize) -> Vec<Received> {
        let mut out = Vec::new();
        for _ in 0..100 {
            out.extend(self.dead_letters().await);
            if out.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// An enabled, unverified profile of tenant `default` (its username is its
    /// ID), with the email and attributes a test needs.
    pub async fn insert_profile(&self, id: &str, email: &str, attributes: &serde_json::Value) {
        self.db
            .execute(
                "INSERT INTO profiles (id, tenant, username, email, enabled, verified, roles, attributes) \
                 VALUES ($1, 'default', $1, $2, true, false, '[]', $3)",
                &[&id, &email, attributes],
            )
            .await
            .unwrap();
    }

    /// Confirmed events leave the outbox with the next commit or within the
    /// worker's one-second flush; returns how many rows are left after 5 s.
    pub async fn settled_outbox(&self) -> i64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.count("outbox").await;
            if n == 0 || std::time::Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The command queue's state (passive declare).
    pub async fn command_queue(&self) -> lapin::Queue {
        self.queue(&self.settings.broker.command_queue).await
    }

    /// A queue's state (passive declare).
    pub async fn queue(&self, name: &str) -> lapin::Queue {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    pub async fn queue_depth(&self) -> u32 {
        self.command_queue().await.message_count()
    }

    /// Stops the worker and removes the test's queues, exchanges and database.
    pub async fn teardown(mut self) {
        self.stop_worker().await;
        let _ = self.conn.close(200, "bye".into()).await;
        drop(self.db);
        self.leftovers.remove().await;
        self.leftovers.done = true;
    }
}

/// A test's settings: its own database (as the runtime role), its worker's
/// broker user and its prefixed names, and what most tests want.
fn test_settings(settings: &mut Settings, servers: &Servers, db_name: &str, prefix: &str) {
    settings.database.database_url = runtime_db_url_on(&servers.admin_db, db_name).into();
    settings.database.db_pool_size = 4;
    settings.database.runtime_role = String::new();
    settings.broker.address.amqp_url = servers.worker_amqp.as_str().into();
    settings.broker.command_exchange = format!("{prefix}.commands");
    settings.broker.command_queue = format!("{prefix}.commands");
    settings.broker.bulk_exchange = format!("{prefix}.commands.bulk");
    settings.broker.bulk_queue = format!("{prefix}.commands.bulk");
    settings.broker.dead_letter_exchange = format!("{prefix}.commands.dlx");
    settings.broker.dead_letter_queue = format!("{prefix}.commands.dead");
    settings.broker.events_exchange = format!("{prefix}.events");
    settings.broker.email_exchange = format!("{prefix}.email");
    settings.broker.email_queue = format!("{prefix}.email.dispatch");
    settings.worker.verification_url = Some("https://example.com/verify".into());
    settings.worker.sweep_interval_secs = 0;
    // Most tests send many emails to one profile; the cooldown's own tests turn it on.
    settings.worker.email_cooldown_secs = 0;
    // Any free port: every test worker serves /metrics and /readyz, so that
    // code runs everywhere, and parallel tests do not collide.
    settings.worker.http_addr = "127.0.0.1:0".into();
}

/// Migrated and seeded as the owner, the runtime role granted its rights.
async fn migrate_and_seed(settings: &Settings, owner_db_url: &str) {
    let mut owner = settings.database.clone();
    owner.database_url = owner_db_url.into();
    let store = profile_worker::store::Store::connect(&owner).unwrap();
    store.migrate().await.expect("migrate");
    store
        .grant_runtime(&runtime_role())
        .await
        .expect("grant the runtime role its rights");
    let seed = profile_worker::store::SeedFile::parse(&fixtures().to_string()).unwrap();
    store.seed(&seed).await.expect("seed");
    store.close();
}

/// A reply queue of the test's own, and its replies as they arrive.
async fn reply_stream(channel: &Channel) -> (String, mpsc::UnboundedReceiver<Reply>) {
    let (reply_queue, mut replies) = subscribe(channel).await;
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(d) = replies.recv().await {
            let raw = String::from_utf8_lossy(&d.body).into_owned();
            let status =
                profile_worker::broker::properties::status(&d.headers).map_or(-1, |v| v as i64);
            let _ = reply_tx.send(Reply {
                traceparent: d.header("traceparent"),
                tracestate: d.header("tracestate"),
                status,
                kind: d.kind,
                correlation_id: d.correlation_id,
                body: serde_json::from_str(&raw).unwrap_or(Value::Null),
                raw,
            });
        }
    });
    (reply_queue, reply_rx)
}

/// Events as a subscriber sees them (everything on the events exchange) and
/// email requests as the dispatcher does (its queue), in one stream:
/// `Received::exchange` tells them apart.
async fn event_stream(channel: &Channel, settings: &Settings) -> mpsc::UnboundedReceiver<Received> {
    let (events_queue, ev_rx) = subscribe(channel).await;
    channel
        .queue_bind(
            events_queue.as_str().into(),
            settings.broker.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (events_tx, ev_rx) = merge(ev_rx);
    consume_into(
        channel,
        &settings.broker.email_queue,
        EMAIL_CONSUMER,
        Received::from_delivery,
        events_tx,
    )
    .await;
    ev_rx
}
