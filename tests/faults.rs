//! Fault injection against the real servers (CONTRACT §6): kill -9, a RabbitMQ
//! restart, a PostgreSQL restart and a 60 s PostgreSQL outage, each in the middle
//! of a burst of 10,000 commands with unique message_ids (both commands, accepted,
//! refused and malformed). After each run every guarantee is checked from the
//! outside: replies, rows, email events and dead letters.
//!
//! These tests stop the shared RabbitMQ and PostgreSQL servers, so they run one
//! at a time (cargo runs test binaries one after another, so no other test sees
//! the outage). They need the servers on this machine and the right to control
//! them (`rabbitmqctl`, `pg_ctlcluster`): the README's test command gives both.

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use profile_worker_testkit::*;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use uuid::Uuid;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BURST: usize = 10_000;

/// One command as published.
struct Outgoing {
    kind: &'static str,
    body: String,
    props: BasicProperties,
}

/// What one command must get.
#[derive(Clone, Debug)]
struct Sent {
    message_id: String,
    status: i64,
    creates_row: bool,
    malformed: bool,
}

/// A run's names and the durable queues that collect what the worker sends, so
/// nothing is lost while the broker restarts and everything can be read at the end.
struct Run {
    env: Env,
    replies: String,
    events: String,
    log: PathBuf,
}

impl Run {
    async fn prepare() -> Run {
        let mut env = Env::prepare().await;
        let prefix = env.settings.broker.command_queue.clone();
        // A durable, named reply queue (so no reply is lost while the broker
        // restarts), allowed as a reply_to the way an operator would allow it.
        let replies = format!("{prefix}.replies");
        env.settings.broker.reply_to_prefixes.push(replies.clone());
        let run = Run {
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
        ch.queue_bind(
            run.events.as_str().into(),
            run.env.settings.broker.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        run
    }

    /// A fresh connection: the harness's own may have died with the broker.
    async fn channel(&self) -> lapin::Channel {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("broker reachable");
        conn.create_channel().await.unwrap()
    }

    async fn db(&self) -> tokio_postgres::Client {
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
    fn plan_burst(&self) -> (HashMap<String, Sent>, Vec<Outgoing>) {
        let mut sent = HashMap::new();
        let mut out = Vec::new();
        for i in 0..BURST {
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
    async fn publish(&self, commands: &[Outgoing], window: usize, pause: Duration) -> usize {
        let exchange = self.env.settings.broker.command_exchange.as_str();
        let (mut next, mut resent) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while next < commands.len() {
            assert!(Instant::now() < deadline, "could not publish the burst");
            let ch = match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
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
                            exchange.into(),
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
    async fn spawn_worker(&self) -> WorkerProcess {
        self.spawn_worker_logging("info").await
    }

    async fn spawn_worker_logging(&self, filter: &str) -> WorkerProcess {
        let mut cmd = worker_process(&self.env);
        cmd.env("RUST_LOG", filter);
        WorkerProcess::start(cmd, Some(&self.log)).await
    }

    async fn processed(&self) -> usize {
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
    async fn wait_processed(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let done = self.processed().await;
            if done >= n || Instant::now() > deadline {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything a queue holds, read with basic.get until it is empty.
    async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
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
    async fn verify(&self, sent: &HashMap<String, Sent>) {
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

        // Every message_id answered, every reply for one message_id identical.
        let mut replies: HashMap<String, HashSet<(i64, String)>> = HashMap::new();
        let received = self.drain(&self.replies).await;
        for m in &received {
            let d = &m.delivery;
            let corr = d.properties.correlation_id().as_ref().unwrap().to_string();
            let status = profile_worker::broker::properties::reply_status(&d.properties);
            replies
                .entry(corr)
                .or_default()
                .insert((status, String::from_utf8_lossy(&d.data).into_owned()));
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

        // Exactly one row per valid command.
        let valid = sent.values().filter(|s| s.creates_row).count() as i64;
        let rows = count(
            "SELECT (SELECT count(*) FROM tickets) + (SELECT count(*) FROM verification_tokens)",
        )
        .await;
        assert_eq!(rows, valid, "rows = distinct valid message_ids");

        // Every token has its email.requested, one message_id per token.
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

        // The dead-letter queue holds exactly the malformed commands.
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
        eprintln!(
            "verified: {} commands, {} replies ({} repeated), {rows} rows, {} dead letters ({} copies)",
            sent.len(),
            received.len(),
            received.len() - replies.len(),
            dead_set.len(),
            dead.len()
        );
    }

    async fn finish(self, mut worker: WorkerProcess) {
        signal(&worker, SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
            .await
            .expect("worker exits within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "worker exit status {status:?}");
        let ch = self.channel().await;
        for q in [&self.replies, &self.events] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = std::fs::remove_file(&self.log);
        self.env.teardown().await;
    }

    /// Runs the burst to the end with `fault` injected once `at` commands are done.
    async fn burst_with<F, Fut>(self, at: usize, fault: F)
    where
        F: FnOnce(WorkerProcess, Run) -> Fut,
        Fut: std::future::Future<Output = (WorkerProcess, Run)>,
    {
        let (sent, commands) = self.plan_burst();
        self.publish(&commands, 500, Duration::ZERO).await;
        let worker = self.spawn_worker().await;
        let done = self.wait_processed(at, Duration::from_secs(120)).await;
        assert!(done >= at, "worker started: {done} processed");
        let (worker, run) = fault(worker, self).await;
        run.complete(worker, &sent).await;
    }

    /// After the fault: the worker finishes everything, the guarantees hold, it stops cleanly.
    async fn complete(self, worker: WorkerProcess, sent: &HashMap<String, Sent>) {
        let expected = sent.values().filter(|s| !s.malformed).count();
        let done = self
            .wait_processed(expected, Duration::from_secs(240))
            .await;
        assert_eq!(done, expected, "every command processed after the fault");
        self.verify(sent).await;
        self.finish(worker).await;
    }
}

fn worker_cpu_secs(pid: u32) -> f64 {
    cpu_secs(pid).expect("/proc/PID/stat of the worker")
}

async fn control(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (fault tests need the servers on this machine)")
        });
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_cluster() -> (String, String) {
    let out = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (fault tests need PostgreSQL from Debian's packages)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("5432"))
        .or_else(|| text.lines().next())
        .expect("a PostgreSQL cluster");
    let mut f = line.split_whitespace();
    (f.next().unwrap().to_string(), f.next().unwrap().to_string())
}

async fn postgres(action: &str) {
    let (ver, name) = pg_cluster();
    let mut args = vec![ver.as_str(), name.as_str(), action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    control("pg_ctlcluster", &args).await;
    if action == "start" {
        // Ready when it accepts connections again.
        for _ in 0..200 {
            if tokio_postgres::connect(&admin_db_url(), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not come back");
    }
}

#[tokio::test]
async fn kill_9_five_times_during_a_burst_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(500, |mut worker, run| async move {
        for k in 0..5 {
            signal(&worker, SIGKILL);
            let _ = worker.wait().await;
            let done = run.processed().await;
            eprintln!("kill {}: {done} of {BURST} processed", k + 1);
            worker = run.spawn_worker().await;
            // Let it get some way before the next kill; the kills land mid-burst.
            run.wait_processed(done + 700, Duration::from_secs(60))
                .await;
        }
        let done = run.processed().await;
        assert!(
            done < 9_000,
            "the last kill landed before the end ({done} processed)"
        );
        (worker, run)
    })
    .await;
}

/// What a consumer logs (at debug) when it has committed a batch while the one
/// before it still waits for its confirms: two batches in flight.
const OVERLAP: &str = "prepared a batch while the previous one awaited its confirms";

#[tokio::test]
async fn kill_9_while_two_batches_are_in_flight_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    let (sent, commands) = run.plan_burst();
    run.publish(&commands, 500, Duration::ZERO).await;
    let filter = "info,profile_worker::worker=debug";
    let mut worker = run.spawn_worker_logging(filter).await;
    for k in 0..3 {
        // Some way into the burst, then the next moment a consumer has committed
        // one batch while the batch before it waits for its confirms: kill -9.
        let done = run.processed().await;
        run.wait_processed(done + 700, Duration::from_secs(60))
            .await;
        let seen = worker.log_text().matches(OVERLAP).count();
        let overlapping = worker
            .wait_for_log(Duration::from_secs(60), |log| {
                log.matches(OVERLAP).count() > seen
            })
            .await;
        assert!(overlapping, "the worker overlapped two batches");
        signal(&worker, SIGKILL);
        let _ = worker.wait().await;
        eprintln!(
            "kill {} with two batches in flight: {} of {BURST} processed",
            k + 1,
            run.processed().await
        );
        worker = run.spawn_worker_logging(filter).await;
    }
    let done = run.processed().await;
    assert!(done < BURST * 9 / 10, "the kills landed mid-burst ({done})");
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn rabbitmq_restart_mid_burst_the_worker_reconnects_and_finishes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    let (sent, commands) = run.plan_burst();
    let (first, rest) = commands.split_at(BURST / 2);
    run.publish(first, 500, Duration::ZERO).await;
    let worker = run.spawn_worker().await;
    let http = worker.http().to_string();
    assert!(run.wait_processed(1_000, Duration::from_secs(120)).await >= 1_000);
    // The second half is published, slowly enough to span the stop, while the
    // broker goes away and comes back; the publisher re-sends what was not confirmed.
    let restart = async {
        control("rabbitmqctl", &["-q", "stop_app"]).await;
        let (down, _) = tokio::join!(
            http_until(&http, "/readyz", Duration::from_secs(3), |s, b| {
                s == 503 && b.contains("broker")
            }),
            tokio::time::sleep(Duration::from_secs(3))
        );
        control("rabbitmqctl", &["-q", "start_app"]).await;
        control("rabbitmqctl", &["-q", "await_startup"]).await;
        let up = http_until(&http, "/readyz", Duration::from_secs(30), |s, _| s == 200).await;
        (run.processed().await, down, up)
    };
    let (resent, (before, down, up)) =
        tokio::join!(run.publish(rest, 100, Duration::from_millis(50)), restart);
    assert!(
        matches!(&down, Some((503, b)) if b.contains("not consuming")),
        "/readyz is 503 while the broker is away: {down:?}"
    );
    assert_eq!(up.map(|a| a.0), Some(200), "ready again once reconsuming");
    let metrics = samples(&http_get(&http, "/metrics").await.expect("metrics").1);
    let reconnects = metrics
        .get("profile_worker_reconnects_total")
        .expect("reconnects are counted");
    assert!(*reconnects >= 1.0, "{metrics:?}");
    eprintln!(
        "RabbitMQ back: {before} of {BURST} processed; {resent} commands re-sent by the publisher"
    );
    assert!(
        before < BURST * 9 / 10,
        "restart landed mid-burst ({before})"
    );
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn postgres_restart_mid_burst_holds_commands_and_resumes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(1_000, |worker, run| async move {
        postgres("stop").await;
        let pid = worker.id().unwrap();
        let cpu = worker_cpu_secs(pid);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waiting = worker_cpu_secs(pid) - cpu;
        eprintln!("worker CPU while Postgres was down 5 s: {waiting:.2} s");
        assert!(
            waiting < 0.5,
            "backs off instead of spinning: {waiting} s of CPU in 5 s"
        );
        postgres("start").await;
        (worker, run)
    })
    .await;
}

#[tokio::test]
async fn postgres_unreachable_for_60_s_reports_not_ready_and_recovers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(1_000, |mut worker, run| async move {
        let http = worker.http().to_string();
        let ready = |s: u16, _: &str| s == 200;
        let before = http_until(&http, "/readyz", Duration::from_secs(10), ready).await;
        assert_eq!(before.map(|a| a.0), Some(200), "ready while consuming");
        postgres("stop").await;
        let down = http_until(&http, "/readyz", Duration::from_secs(15), |s, b| {
            s == 503 && b.contains("database")
        })
        .await;
        assert!(
            matches!(&down, Some((503, b)) if b.contains("\"database\":\"unavailable\"")),
            "/readyz says the database is missing: {down:?}"
        );
        let pid = worker.id().unwrap();
        let cpu = worker_cpu_secs(pid);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let waiting = worker_cpu_secs(pid) - cpu;
        eprintln!("worker CPU while Postgres was down 60 s: {waiting:.2} s");
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker is still running: {}",
            run.log_text()
        );
        assert!(
            waiting < 3.0,
            "backs off instead of spinning: {waiting} s of CPU in 60 s"
        );
        assert!(
            run.log_text().contains("not ready"),
            "says it is not ready: {}",
            run.log_text()
        );
        assert_eq!(
            http_get(&http, "/readyz").await.map(|a| a.0),
            Some(503),
            "still not ready after 60 s"
        );
        assert_eq!(
            http_get(&http, "/healthz").await.map(|a| a.0),
            Some(200),
            "alive all along"
        );
        postgres("start").await;
        let back = http_until(&http, "/readyz", Duration::from_secs(30), ready).await;
        assert_eq!(
            back.map(|a| a.0),
            Some(200),
            "ready again once Postgres is back"
        );
        (worker, run)
    })
    .await;
}
