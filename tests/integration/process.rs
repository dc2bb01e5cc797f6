//! The real binary as an operator runs it: graceful SIGTERM mid-burst (kill -9 and
//! server restarts are in faults.rs), clear one-line errors for bad settings, refusal of a conflicting topology, and
//! a poison command paused between attempts and dead-lettered after the delivery limit.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use profile_worker_testkit::*;
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use uuid::Uuid;

fn worker_command(env: &Env) -> Command {
    let mut c = worker_process(env);
    c.env(
        "RUST_LOG",
        match (test_log(), std::env::var("RUST_LOG")) {
            (true, Ok(filter)) => filter,
            (true, Err(_)) => "info".into(),
            (false, _) => "warn".into(),
        },
    );
    c
}

async fn spawn_worker(env: &Env) -> WorkerProcess {
    WorkerProcess::start(worker_command(env), None).await
}

/// Publishes `n` commands (a mix of both, valid and rejected) and returns
/// correlation id → (message_id, expected status).
async fn publish_mix(env: &Env, n: usize) -> HashMap<String, (String, i64)> {
    let mut sent = HashMap::new();
    for i in 0..n {
        let mid = Uuid::new_v4().to_string();
        let (kind, body, status) = match i % 3 {
            0 => ("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE), 200),
            1 => (
                "create-verification-token",
                verification(ADMIN_TOKEN, DISABLED_PROFILE),
                200,
            ),
            _ => ("create-ticket", ticket(ADMIN_TOKEN, DISABLED_PROFILE), 403),
        };
        let c = env
            .publish(
                body.to_string().as_bytes(),
                Send {
                    kind: Some(kind.into()),
                    message_id: Some(mid.clone()),
                    ..Default::default()
                },
            )
            .await;
        sent.insert(c, (mid, status));
    }
    sent
}

#[tokio::test]
async fn sigterm_finishes_held_commands_and_exits_zero() {
    let env = Env::prepare().await;
    let sent = publish_mix(&env, 10_000).await;
    let mut child = spawn_worker(&env).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Its events' confirms were settled before it left (the ack does not wait
    // for them): no row is left for a relay to publish a second time.
    assert_eq!(
        env.count("outbox").await,
        0,
        "a clean stop leaves no event behind"
    );
    // Everything it took was finished and acked; the rest is still queued (the
    // broker counts returned deliveries a moment after the connection closes).
    let (mut done, mut remaining) = (0, 0);
    for _ in 0..50 {
        remaining = env.queue_depth().await as usize;
        done = env.count("processed_commands").await as usize;
        if done + remaining == sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        done + remaining,
        sent.len(),
        "processed {done} + queued {remaining}"
    );
    // A second worker finishes the rest; every command is answered once committed.
    let mut child = spawn_worker(&env).await;
    for (c, (_, status)) in &sent {
        assert_eq!(env.reply_for(c).await.status, *status);
    }
    signal(&child, SIGTERM);
    assert!(child.wait().await.unwrap().success());
    assert_eq!(env.count("processed_commands").await as usize, sent.len());
    env.teardown().await;
}

async fn run_expecting_error(envs: &[(&str, &str)]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_profile-worker"));
    // Any free port, unless the case sets one: a worker already serving 8742
    // on this machine must not turn a DATABASE_URL case into an HTTP_ADDR one.
    c.arg("run")
        .env("RUST_LOG", "off")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("VERIFICATION_URL", "https://example.com/verify")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("exits")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[tokio::test]
async fn bad_or_unreachable_urls_are_one_line_errors_naming_the_setting() {
    let env = Env::prepare().await;
    let good_db = env
        .settings
        .database
        .database_url
        .expose_secret()
        .to_string();
    let e = run_expecting_error(&[("DATABASE_URL", "mysql://nope")]).await;
    assert!(e.starts_with("error: DATABASE_URL:"), "{e}");
    let e = run_expecting_error(&[("DATABASE_URL", "postgres://u:secretpw@127.0.0.1:1/db")]).await;
    assert!(
        e.starts_with("error: DATABASE_URL:") && !e.contains("secretpw"),
        "{e}"
    );
    let e = run_expecting_error(&[
        ("DATABASE_URL", &good_db),
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ])
    .await;
    assert!(
        e.starts_with("error: AMQP_URL:") && e.contains("127.0.0.1:1"),
        "{e}"
    );
    let e = run_expecting_error(&[("DATABASE_URL", &good_db), ("AMQP_URL", "not a url")]).await;
    assert!(e.starts_with("error: AMQP_URL:"), "{e}");
    let e = run_expecting_error(&[("DATABASE_URL", &good_db), ("HTTP_ADDR", "localhost")]).await;
    assert!(e.starts_with("error: HTTP_ADDR:"), "{e}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = run_expecting_error(&[("DATABASE_URL", &good_db), ("HTTP_ADDR", &addr)]).await;
    assert!(
        e.starts_with("error: HTTP_ADDR: cannot listen on") && e.contains(&addr),
        "{e}"
    );
    drop(taken);
    // No default: a worker without it would email links to nowhere.
    let e = run_expecting_error(&[("DATABASE_URL", &good_db), ("VERIFICATION_URL", "")]).await;
    assert!(e.starts_with("error: VERIFICATION_URL: not set"), "{e}");
    let e = run_expecting_error(&[
        ("DATABASE_URL", &good_db),
        ("VERIFICATION_URL", "http://app.example.com/verify"),
    ])
    .await;
    assert!(
        e.starts_with("error: VERIFICATION_URL: http is allowed only on a loopback host"),
        "{e}"
    );
    env.teardown().await;
}

#[tokio::test]
async fn refuses_to_start_on_conflicting_topology() {
    let env = Env::prepare().await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    // The dead-letter queue, already there as a classic queue (a name the
    // worker's broker user may declare: a conflict, not a permission problem).
    let conflicting = env.settings.broker.dead_letter_queue.clone();
    env.channel
        .queue_delete(conflicting.as_str().into(), Default::default())
        .await
        .unwrap();
    env.channel
        .queue_declare(
            conflicting.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        worker_command(&env).env("RUST_LOG", "off").output(),
    )
    .await
    .expect("exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conflicts") && stderr.contains(&conflicting),
        "{stderr}"
    );
    let _ = env
        .channel
        .queue_delete(conflicting.as_str().into(), Default::default())
        .await;
    env.teardown().await;
}

/// Publishes a command that fails every attempt for a reason of its own,
/// neither its input nor an outage: its access token's tenant permissions are
/// made JSON the worker cannot read. Returns its correlation id.
async fn publish_poison(env: &Env, message_id: &str) -> String {
    env.db
        .execute(
            "UPDATE access_tokens SET tenant_permissions = '{\"broken\": true}' \
             WHERE id_sha256 = sha256(convert_to($1, 'UTF8'))",
            &[&PROFILES_ONLY_TOKEN],
        )
        .await
        .unwrap();
    env.publish(
        ticket(PROFILES_ONLY_TOKEN, ENABLED_PROFILE)
            .to_string()
            .as_bytes(),
        Send {
            message_id: Some(message_id.into()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn poison_command_is_paused_between_attempts_and_dead_lettered_after_the_delivery_limit() {
    // One consumer, so the commands below share the poison command's channel,
    // and a fixed pause (300-600 ms with jitter) before each redelivery.
    let mut env = Env::prepare_with(|s| {
        s.worker.consumers = 1;
        s.worker.poison_retry_min_ms = 300;
        s.worker.poison_retry_max_ms = 300;
    })
    .await;
    env.start_worker().await;
    let sent_at = std::time::Instant::now();
    let poison = publish_poison(&env, "poison-1").await;
    // While the poison delivery is held, batches of other commands on its
    // channel are acked: no `multiple` ack may settle the held delivery too
    // (the command would be lost, and its reject would close the channel).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fine = Vec::new();
    for _ in 0..40 {
        fine.push(
            env.send("create-ticket", &ticket(ADMIN_TOKEN, ENABLED_PROFILE))
                .await,
        );
    }
    for c in &fine {
        assert_eq!(
            env.reply_for(c).await.status,
            200,
            "the poison command does not block others"
        );
    }
    let r = env.reply_for(&poison).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.raw, r#"{"message":"Internal server error"}"#);
    // Five deliveries, four pauses of at least 300 ms between them.
    let took = sent_at.elapsed();
    assert!(
        took >= Duration::from_millis(1_200),
        "given up after {took:?}: the attempts were not paused"
    );
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id.as_deref(), Some("poison-1"));
    assert_eq!(
        dead[0].header("x-error-code").as_deref(),
        Some("INTERNAL_SERVER_ERROR")
    );
    assert!(dead[0]
        .header("x-error-reason")
        .unwrap()
        .contains("tenant_permissions"));
    assert!(dead[0]
        .header("x-error-reason")
        .unwrap()
        .contains("on 5 deliveries"));
    assert_eq!(env.count("tickets").await, 40);
    env.stop_worker().await;
    assert_eq!(env.queue_depth().await, 0);
    env.teardown().await;
}

#[tokio::test]
async fn a_poison_command_held_at_shutdown_goes_back_to_the_queue_at_once() {
    // A minute's pause: the worker must neither wait it out on SIGTERM nor
    // settle the held delivery on the way out.
    let mut env = Env::prepare_with(|s| {
        s.worker.consumers = 1;
        s.worker.poison_retry_min_ms = 60_000;
        s.worker.poison_retry_max_ms = 60_000;
    })
    .await;
    env.start_worker().await;
    let poison = publish_poison(&env, "poison-2").await;
    // Its first attempt fails within milliseconds; then it is held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = std::time::Instant::now();
    env.stop_worker().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown waited {took:?} for a held delivery"
    );
    assert_eq!(
        env.queue_depth().await,
        1,
        "the held command is back in the queue"
    );
    assert!(env.dead_letters().await.is_empty());

    // Nothing was lost: a worker with short pauses takes it up and gives up on it.
    env.settings.worker.poison_retry_min_ms = 50;
    env.settings.worker.poison_retry_max_ms = 50;
    env.start_worker().await;
    let r = env.reply_for(&poison).await;
    assert_eq!(r.status, 500);
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].message_id.as_deref(), Some("poison-2"));
    env.stop_worker().await;
    assert_eq!(env.queue_depth().await, 0);
    env.teardown().await;
}

/// Each subcommand's `--help` shows the options it uses: the operator's tools
/// do not list the worker's settings, and only `run` exports spans.
#[test]
fn each_subcommand_lists_only_its_own_options() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_profile-worker"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let worker_only = [
        "PREFETCH",
        "AMQP_HEARTBEAT_SECS",
        "COMMAND_QUEUE_MAX_LENGTH",
        "DELIVERY_LIMIT=",
        "BATCH_SIZE",
        "DATABASE_URL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ];
    let run = help(&["run"]);
    for name in worker_only {
        assert!(run.contains(name), "run --help lacks {name}");
    }
    for tool in [
        &["send"][..],
        &["provision"],
        &["dead-letters", "list"],
        &["dead-letters", "replay"],
        &["dead-letters", "purge"],
    ] {
        let text = help(tool);
        assert!(text.contains("AMQP_URL"), "{tool:?} --help:\n{text}");
        for name in worker_only {
            assert!(
                !text.contains(name),
                "{tool:?} --help lists {name}:\n{text}"
            );
        }
    }
    for admin in [&["migrate"][..], &["seed"], &["access-tokens", "create"]] {
        let text = help(admin);
        assert!(text.contains("DATABASE_URL"), "{admin:?}");
        for name in ["AMQP_URL", "PREFETCH", "OTEL_EXPORTER_OTLP_ENDPOINT"] {
            assert!(
                !text.contains(name),
                "{admin:?} --help lists {name}:\n{text}"
            );
        }
    }
}
