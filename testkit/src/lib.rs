//! Test harness: a real RabbitMQ and a real PostgreSQL on loopback. Every test gets
//! its own database and its own prefixed exchange/queue names, so tests run in
//! parallel and never see each other's messages. The worker runs as the
//! least-privileged database role and broker user the set-up makes
//! (scripts/test.sh), the tests' own checks as the owner and an admin user.
//!
//! `TEST_LOG=1` shows the workers' logs: those run in the test process through
//! the test's captured output (so a failing test shows them), those run as a
//! process on stderr. `RUST_LOG` filters both (default `info`).

pub mod burst;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use profile_worker::config::Settings;
pub use profile_worker::telemetry::Report;
/// `expose_secret()` on the settings' URLs.
pub use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const ADMIN_TOKEN: &str = "3b0bd9b6-1c0f-4d37-9b49-3d7c8f1e2a10";
pub const EXPIRED_TOKEN: &str = "expired-token";
pub const OTHER_TENANT_TOKEN: &str = "other-tenant-token";
pub const PROFILES_ONLY_TOKEN: &str = "profiles-only-token";
pub const ENABLED_PROFILE: &str = "5925a68def86951f895cf497";
pub const DISABLED_PROFILE: &str = "592715d4d4c650e226b03b62";
pub const OTHER_TENANT_PROFILE: &str = "other-tenant-profile";

/// The tests' own broker user (publishers, checks, clean-up): may do anything.
/// Whether the workers' logs are wanted (`TEST_LOG` set to anything but `0`).
pub fn test_log() -> bool {
    std::env::var("TEST_LOG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// With `TEST_LOG`, a log subscriber for workers run in this process, writing
/// through libtest's capture; once per process.
fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if test_log() {
        ONCE.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
    }
}

/// The `profile-worker` binary cargo built for these tests: `PROFILE_WORKER_BIN`,
/// else beside the test executable's `deps/` folder (target/<profile>/).
pub fn worker_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PROFILE_WORKER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    profile_dir.join(format!("profile-worker{}", std::env::consts::EXE_SUFFIX))
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// The tests' own broker user (publishers, checks, clean-up): may do anything.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| profile_worker::config::DEFAULT_AMQP_URL.into())
}

/// The worker's broker user: permissions on the tests' names (`t<12 hex>.…`)
/// only, as the real one has on `profile.…` (scripts/test.sh creates it).
pub fn worker_amqp_url() -> String {
    std::env::var("TEST_WORKER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-worker-test:profile-worker-test@127.0.0.1:5672/%2f".into()
    })
}

/// The email dispatcher's broker user: may consume the tests' dispatch queues
/// (`t<12 hex>.email.dispatch`) and nothing else (scripts/test.sh).
pub fn dispatcher_amqp_url() -> String {
    std::env::var("TEST_DISPATCHER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-dispatcher-test:profile-dispatcher-test@127.0.0.1:5672/%2f".into()
    })
}

/// An events reader's broker user: its own queues bound to the tests' events
/// exchanges (`t<12 hex>.events`), and no right on the email exchanges.
pub fn reader_amqp_url() -> String {
    std::env::var("TEST_READER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-reader-test:profile-reader-test@127.0.0.1:5672/%2f".into()
    })
}

/// A URL to a database we may create databases from, as the schema owner.
pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://profile_worker_owner:profile_worker_owner@127.0.0.1:5432/postgres".into()
    })
}

/// The role `run` connects as: row rights only, granted by the migration step.
pub fn runtime_role() -> String {
    std::env::var("TEST_RUNTIME_DB_USER").unwrap_or_else(|_| "profile_worker".into())
}

/// The owner's URL for database `name`, on the servers of `admin` (a URL of
/// the owner's, perhaps multi-host, perhaps with a query).
pub fn db_url_on(admin: &str, name: &str) -> String {
    let (url, query) = match admin.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (admin, String::new()),
    };
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
    format!("{base}/{name}{query}")
}

/// The owner's URL for database `name`.
pub fn db_url_for(name: &str) -> String {
    db_url_on(&admin_db_url(), name)
}

/// The runtime role's URL for database `name` on the servers of `admin`.
pub fn runtime_db_url_on(admin: &str, name: &str) -> String {
    let owner = db_url_on(admin, name);
    let password =
        std::env::var("TEST_RUNTIME_DB_PASSWORD").unwrap_or_else(|_| "profile_worker".into());
    let (scheme, rest) = owner.split_once("://").expect("a URL");
    let at = rest.rfind('@').expect("credentials in TEST_DATABASE_URL");
    format!("{scheme}://{}:{password}{}", runtime_role(), &rest[at..])
}

/// The runtime role's URL for database `name`.
pub fn runtime_db_url_for(name: &str) -> String {
    runtime_db_url_on(&admin_db_url(), name)
}

/// Where a test's broker and database are: the shared single servers
/// ([`Servers::from_env`]), or a cluster's.
#[derive(Debug, Clone)]
pub struct Servers {
    /// The tests' own broker user on the node the test's publishers and checks use.
    pub admin_amqp: String,
    /// `AMQP_URL` of the worker (one URL or a comma-separated list).
    pub worker_amqp: String,
    /// The owner's URL of a database to create test databases from.
    pub admin_db: String,
}

impl Servers {
    pub fn from_env() -> Self {
        Servers {
            admin_amqp: amqp_url(),
            worker_amqp: worker_amqp_url(),
            admin_db: admin_db_url(),
        }
    }

    pub async fn admin_client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_db, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "admin database reachable (run the README's test command, which starts \
                     PostgreSQL): {e}"
                )
            });
        tokio::spawn(conn);
        client
    }

    pub async fn broker(&self) -> Connection {
        Connection::connect(&self.admin_amqp, ConnectionProperties::default())
            .await
            .expect("broker reachable")
    }
}

pub async fn admin_client() -> tokio_postgres::Client {
    Servers::from_env().admin_client().await
}

/// Drops a test's database, retrying for a while: a fault test may end while
/// PostgreSQL is still coming back from the restart it caused.
async fn drop_database(admin: &str, name: &str) {
    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let mut last = String::new();
    for _ in 0..30 {
        match tokio_postgres::connect(admin, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client.batch_execute(&sql).await {
                    Ok(()) => return,
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    eprintln!("test database {name} left behind: {last}");
}

pub fn fixtures() -> Value {
    let all = json!([{ "tenant": "*", "allowedActions": ["*"] }]);
    json!({
        "tenants": [ { "name": "default" }, { "name": "sample-tenant" }, { "name": "other" } ],
        "accessTokens": [
            { "id": ADMIN_TOKEN, "application": "profile-admin", "master": true, "expiresOn": null, "tenantPermissions": all },
            { "id": EXPIRED_TOKEN, "application": "old-app", "expiresOn": 1_000_000_000_000i64, "tenantPermissions": all },
            { "id": OTHER_TENANT_TOKEN, "application": "other-app", "expiresOn": 4_102_444_800_000i64,
              "tenantPermissions": [ { "tenant": "other", "allowedActions": ["*"] } ] },
            { "id": PROFILES_ONLY_TOKEN, "application": "profiles-app",
              "tenantPermissions": [ { "tenant": "default", "allowedActions": ["MANAGE_PROFILES"] },
                                     { "tenant": "sample-tenant", "allowedActions": ["MANAGE_PROFILES"] } ] }
        ],
        "profiles": [
            { "id": ENABLED_PROFILE, "tenant": "default", "username": "jane", "email": "jane@example.com", "enabled": true },
            { "id": DISABLED_PROFILE, "tenant": "sample-tenant", "username": "john.doe", "email": "john.doe@example.com", "enabled": false },
            { "id": OTHER_TENANT_PROFILE, "tenant": "other", "username": "olga", "email": "olga@example.com", "enabled": true }
        ]
    })
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: i64,
    pub kind: String,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub body: Value,
    pub raw: String,
}

#[derive(Debug, Clone)]
pub struct Received {
    /// The exchange it was published to.
    pub exchange: String,
    pub routing_key: String,
    pub kind: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: FieldTable,
    pub body: Vec<u8>,
}

impl Received {
    pub fn from_delivery(d: &lapin::message::Delivery) -> Self {
        let p = &d.properties;
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_string());
        Received {
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            kind: text(p.kind()).unwrap_or_default(),
            message_id: text(p.message_id()),
            correlation_id: text(p.correlation_id()),
            headers: p.headers().clone().unwrap_or_default(),
            body: d.data.clone(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            other => match profile_worker::broker::properties::as_u64(other) {
                Some(n) => Some(n.to_string()),
                None => Some(format!("{other:?}")),
            },
        }
    }
}

/// Options for one published command.
#[derive(Debug, Clone, Default)]
pub struct Send {
    pub kind: Option<String>,
    pub routing_key: Option<String>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// `None`: our reply queue; `Some("")`: no reply_to (fire-and-forget).
    pub reply_to: Option<String>,
    /// A W3C traceparent header.
    pub traceparent: Option<String>,
    /// A W3C tracestate header.
    pub tracestate: Option<String>,
}

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
        settings.database.database_url = runtime_db_url_on(&servers.admin_db, &db_name).into();
        settings.database.db_pool_size = 4;
        settings.database.runtime_role = String::new();
        settings.broker.address.amqp_url = servers.worker_amqp.as_str().into();
        settings.broker.command_exchange = format!("{prefix}.commands");
        settings.broker.command_queue = format!("{prefix}.commands");
        settings.broker.dead_letter_exchange = format!("{prefix}.commands.dlx");
        settings.broker.dead_letter_queue = format!("{prefix}.commands.dead");
        settings.broker.events_exchange = format!("{prefix}.events");
        settings.broker.email_exchange = format!("{prefix}.email");
        settings.broker.email_queue = format!("{prefix}.email.dispatch");
        settings.worker.verification_url = "https://example.com/verify".into();
        settings.worker.sweep_interval_secs = 0;
        // Most tests send many emails to one profile; the cooldown's own tests turn it on.
        settings.worker.email_cooldown_secs = 0;
        // Any free port: every test worker serves /metrics and /readyz, so that
        // code runs everywhere, and parallel tests do not collide.
        settings.worker.http_addr = "127.0.0.1:0".into();
        f(&mut settings);
        leftovers.broker = settings.broker.clone();

        let mut owner = settings.database.clone();
        owner.database_url = owner_db_url.as_str().into();
        let store = profile_worker::store::Store::connect(&owner).unwrap();
        store.migrate().await.expect("migrate");
        store
            .grant_runtime(&runtime_role())
            .await
            .expect("grant the runtime role its rights");
        let seed = profile_worker::store::SeedFile::parse(&fixtures().to_string()).unwrap();
        store.seed(&seed).await.expect("seed");
        store.close();

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

        let (reply_queue, mut replies) = subscribe(&channel).await;
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
        // Events as a subscriber sees them (everything on the events
        // exchange) and email requests as the dispatcher does (its queue), in
        // one stream: `Received::exchange` tells them apart.
        let (events_queue, ev_rx) = subscribe(&channel).await;
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
            &channel,
            &settings.broker.email_queue,
            EMAIL_CONSUMER,
            Received::from_delivery,
            events_tx,
        )
        .await;

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

/// What a test leaves on the servers: its queues and exchanges and its
/// database. [`Env::teardown`] removes them; a test that panics before it gets
/// there has them removed by this guard's `Drop`, on a thread and runtime of
/// its own (`Drop` cannot await, and the test's runtime may be unwinding).
struct Leftovers {
    servers: Servers,
    broker: profile_worker::config::BrokerSettings,
    db_name: String,
    done: bool,
}

impl Leftovers {
    async fn remove(&self) {
        // A fresh connection: the harness's own may have died with a broker restart.
        if let Ok(conn) =
            Connection::connect(&self.servers.admin_amqp, ConnectionProperties::default()).await
        {
            if let Ok(channel) = conn.create_channel().await {
                let b = &self.broker;
                for q in [
                    &b.command_queue,
                    &b.dead_letter_queue,
                    &b.email_queue,
                    &b.email_dead_letter_queue(),
                ] {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let unrouted = profile_worker::broker::unrouted_exchange(b);
                for x in [
                    &b.command_exchange,
                    &b.dead_letter_exchange,
                    &b.events_exchange,
                    &b.email_exchange,
                    &b.email_dead_letter_exchange(),
                    &unrouted,
                ] {
                    let _ = channel
                        .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        drop_database(&self.servers.admin_db, &self.db_name).await;
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let leftovers = Leftovers {
            servers: self.servers.clone(),
            broker: self.broker.clone(),
            db_name: std::mem::take(&mut self.db_name),
            done: true,
        };
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(leftovers.remove()))
        })
        .join();
    }
}

/// The harness's consumer of a test's email dispatch queue.
const EMAIL_CONSUMER: &str = "testkit-emails";

/// A sender into `rx`'s stream besides its own, and the merged stream.
fn merge(
    mut rx: mpsc::UnboundedReceiver<Received>,
) -> (
    mpsc::UnboundedSender<Received>,
    mpsc::UnboundedReceiver<Received>,
) {
    let (tx, merged) = mpsc::unbounded_channel();
    let own = tx.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if own.send(m).is_err() {
                break;
            }
        }
    });
    (tx, merged)
}

/// Everything that arrives on the existing `queue` (taken without acks, as
/// consumer `tag`), made into a `T` by `f` and sent to `tx`.
pub async fn consume_into<T: std::marker::Send + 'static>(
    channel: &Channel,
    queue: &str,
    tag: &str,
    f: fn(&lapin::message::Delivery) -> T,
    tx: mpsc::UnboundedSender<T>,
) {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = tx.send(f(&d));
        }
    });
}

/// A new exclusive server-named queue of `channel`'s user.
pub async fn server_named_queue(channel: &Channel) -> Result<String, lapin::Error> {
    let q = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.name().as_str().to_string())
}

/// An exclusive server-named queue and everything that arrives on it.
async fn subscribe(channel: &Channel) -> (String, mpsc::UnboundedReceiver<Received>) {
    let queue = server_named_queue(channel).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    consume_into(channel, &queue, "", Received::from_delivery, tx).await;
    (queue, rx)
}

pub fn ticket(token: &str, profile: &str) -> Value {
    json!({ "accessTokenId": token, "profileId": profile })
}

pub fn verification(token: &str, profile: &str) -> Value {
    json!({ "accessTokenId": token, "id": profile })
}

pub use nix::sys::signal::Signal::{SIGKILL, SIGTERM};

/// Sends `sig` to a child process.
pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// `profile-worker ARGS…` against this test's broker names and database, as an
/// operator runs it: the owner's database role, the admin broker user.
pub fn cli(env: &Env, args: &[&str]) -> tokio::process::Command {
    let s = &env.settings;
    let mut c = tokio::process::Command::new(worker_bin());
    // The binary sizes its own threads' stacks (src/main.rs); the tests' own
    // setting (.cargo/config.toml) is for the test process.
    c.args(args)
        .env_remove("RUST_MIN_STACK")
        .env("DATABASE_URL", &env.owner_db_url)
        .env("AMQP_URL", &env.servers.admin_amqp)
        .env("COMMAND_EXCHANGE", &s.broker.command_exchange)
        .env("COMMAND_QUEUE", &s.broker.command_queue)
        .env("DEAD_LETTER_EXCHANGE", &s.broker.dead_letter_exchange)
        .env("DEAD_LETTER_QUEUE", &s.broker.dead_letter_queue)
        .env("EVENTS_EXCHANGE", &s.broker.events_exchange)
        .env("EMAIL_EXCHANGE", &s.broker.email_exchange)
        .env("EMAIL_QUEUE", &s.broker.email_queue)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// `profile-worker run` as a separate process, configured for this test's
/// database and broker names, as the worker's own (least-privileged) users
/// (stdio left to the caller).
pub fn worker_process(env: &Env) -> tokio::process::Command {
    let s = &env.settings;
    let mut c = cli(env, &["run"]);
    c.env("DATABASE_URL", s.database.database_url.expose_secret())
        .env("AMQP_URL", s.broker.address.amqp_url.expose_secret())
        .env("VERIFICATION_URL", &s.worker.verification_url)
        .env(
            "EMAIL_COOLDOWN_SECS",
            s.worker.email_cooldown_secs.to_string(),
        )
        .env("REPLY_TO_PREFIXES", s.broker.reply_to_prefixes.join(","))
        .env(
            "COMMAND_QUEUE_MAX_LENGTH",
            s.broker.command_queue_max_length.to_string(),
        )
        .env(
            "DEAD_LETTER_QUEUE_MAX_LENGTH",
            s.broker.dead_letter_queue_max_length.to_string(),
        )
        .env("OUTBOX_GRACE_SECS", "1")
        .env("SWEEP_INTERVAL_SECS", "0")
        .env("HTTP_ADDR", &s.worker.http_addr)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// `name{a="x",b="y"} value` lines of a Prometheus text page, keyed by the name
/// and its labels in sorted order, so a test need not know the exporter's order.
pub fn samples(page: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                l.sort_unstable();
                format!("{name}{{{}}}", l.join(","))
            }
            None => key.to_string(),
        };
        if let Ok(v) = value.parse() {
            out.insert(key, v);
        }
    }
    out
}

/// `GET path` on a worker's operations endpoint: status and body, or `None`
/// when nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    // One client per request: each test has its own runtime, and a pooled
    // connection must not outlive the runtime that made it.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client");
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Polls `path` until `want(status, body)` holds or `within` passes; returns the last answer.
pub async fn http_until(
    addr: &str,
    path: &str,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = http_get(addr, path).await;
        if let Some((status, body)) = &answer {
            if want(*status, body) {
                return answer;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `profile-worker run` as its own process, started and watched through its
/// JSON log lines on stderr: it is ready when it logs `ready` (every consumer
/// consuming) and says where it serves `/metrics` when it binds. The lines are
/// kept (and written to a file, if one is given); with `TEST_LOG` they are
/// also shown in the test's output.
pub struct WorkerProcess {
    child: tokio::process::Child,
    http: Option<String>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Woken for every line logged.
    lines: std::sync::Arc<tokio::sync::Notify>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl WorkerProcess {
    /// Spawns `cmd` (from [`worker_process`]) and waits until it is ready;
    /// panics with its log if it exits or is not ready within 60 s.
    pub async fn start(
        mut cmd: tokio::process::Command,
        log_file: Option<&std::path::Path>,
    ) -> Self {
        use tokio::io::AsyncBufReadExt;
        // Whatever else the test filters, the two lines this waits for are kept.
        let filter = cmd
            .as_std()
            .get_envs()
            .find(|(k, _)| *k == "RUST_LOG")
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let mut filter = filter;
        for target in ["profile_worker::ops", "profile_worker::worker"] {
            if !filter.contains(target) {
                filter.push_str(&format!(",{target}=info"));
            }
        }
        cmd.env("RUST_LOG", filter);
        cmd.env("LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the worker");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut file = log_file.map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open the worker's log file")
        });
        let (http_tx, mut http_rx) = mpsc::unbounded_channel::<String>();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
        let kept = log.clone();
        let lines = std::sync::Arc::new(tokio::sync::Notify::new());
        let line_logged = lines.clone();
        let echo = test_log();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("{line}");
                }
                if let Some(f) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    match (v["message"].as_str(), v["addr"].as_str()) {
                        (Some("serving /metrics, /healthz and /readyz"), Some(addr)) => {
                            let _ = http_tx.send(addr.to_string());
                        }
                        (Some("ready"), _) => {
                            let _ = ready_tx.send(());
                        }
                        _ => {}
                    }
                }
                {
                    let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
                    k.push_str(&line);
                    k.push('\n');
                }
                line_logged.notify_waiters();
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await;
        let log_text = || log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            matches!(ready, Ok(Some(()))),
            "the worker process was not ready within 60 s: {}",
            log_text()
        );
        // Bound before it connected, so logged before `ready`.
        let http = http_rx.try_recv().ok();
        WorkerProcess {
            child,
            http,
            log,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for the process to exit and for the last of its log to be read.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.wait().await?;
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        Ok(status)
    }

    /// Where it serves `/metrics`, `/healthz` and `/readyz`.
    pub fn http(&self) -> &str {
        self.http.as_deref().expect("a worker with HTTP_ADDR on")
    }

    /// Waits until what it logged satisfies `want`, at most `within`; whether it did.
    pub async fn wait_for_log(&self, within: Duration, want: impl Fn(&str) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next_line = self.lines.notified();
            tokio::pin!(next_line);
            next_line.as_mut().enable();
            if want(&self.log_text()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, next_line).await.is_err() {
                return want(&self.log_text());
            }
        }
    }

    /// Everything it logged so far (JSON lines).
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::ops::Deref for WorkerProcess {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for WorkerProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}
