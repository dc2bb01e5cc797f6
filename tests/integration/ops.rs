//! Operating the worker: its HTTP endpoint (/metrics, /healthz, /readyz) against
//! what was really processed, and W3C trace context carried from a command to
//! its reply and events. (/readyz during a Postgres outage: tests/faults.rs.)

/// A traceparent's trace ID, span ID and flags, read as the W3C format says.
fn traceparent(h: &str) -> (String, String, String) {
    let parts: Vec<&str> = h.split('-').collect();
    assert_eq!(parts.len(), 4, "{h}");
    assert_eq!(parts[0], "00", "{h}");
    assert!(
        parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2,
        "{h}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}
use profile_worker_testkit::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

fn sample(page: &BTreeMap<String, f64>, key: &str) -> f64 {
    page.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_what_was_processed_and_health_answers() {
    let env = Env::prepare().await;
    let mut cmd = worker_process(&env);
    cmd.env("QUEUE_DEPTH_POLL_SECS", "1");
    let mut worker = WorkerProcess::start(cmd, None).await;
    let http = worker.http().to_string();

    assert_eq!(
        http_get(&http, "/healthz").await,
        Some((200, "ok\n".into()))
    );
    let ready = http_until(&http, "/readyz", Duration::from_secs(10), |s, _| s == 200)
        .await
        .expect("the endpoint answers");
    assert_eq!(ready.0, 200, "{ready:?}");
    let body: serde_json::Value = serde_json::from_str(&ready.1).unwrap();
    assert_eq!(body["consumers"], 4, "two per lane");
    assert_eq!(body["database"], "ok");
    assert_eq!(
        http_get(&http, "/nope").await.map(|a| a.0),
        Some(404),
        "unknown paths are not found"
    );

    // 3 tickets, one of them sent twice; 2 tokens; a 403, a 404 and a 400.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
                .await
                .status,
        );
    }
    let again = Send {
        kind: Some("create-ticket".into()),
        message_id: Some(Uuid::new_v4().to_string()),
        ..Default::default()
    };
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    statuses.push(env.call_raw(body.as_bytes(), again.clone()).await.status);
    statuses.push(env.call_raw(body.as_bytes(), again).await.status);
    for _ in 0..2 {
        statuses.push(
            env.call(
                "create-verification-token",
                verification(ADMIN_TOKEN, ENABLED_PROFILE),
            )
            .await
            .status,
        );
    }
    statuses.push(
        env.call("create-ticket", ticket(OTHER_TENANT_TOKEN, ENABLED_PROFILE))
            .await
            .status,
    );
    statuses.push(
        env.call("create-ticket", ticket(ADMIN_TOKEN, "nobody"))
            .await
            .status,
    );
    let malformed = Send {
        kind: Some("create-ticket".into()),
        message_id: Some(Uuid::new_v4().to_string()),
        ..Default::default()
    };
    statuses.push(env.call_raw(b"{not json", malformed).await.status);
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 403, 404, 400]);

    // Metrics are recorded once the replies are confirmed, which can be a moment
    // after the reply reached us.
    let ticket_ok =
        r#"profile_worker_commands_total{command="create-ticket",lane="interactive",status="200"}"#;
    // The last batch's stages are recorded after its commands are counted:
    // wait for its `total`, the last of them, too.
    let settled = |b: &str| {
        let m = samples(b);
        m.get(r#"profile_worker_batch_seconds_count{stage="total"}"#)
            == m.get("profile_worker_batch_size_count")
    };
    let page = http_until(&http, "/metrics", Duration::from_secs(10), |_, b| {
        samples(b).get(ticket_ok) == Some(&5.0) && b.contains("status=\"400\"") && settled(b)
    })
    .await
    .expect("metrics answer");
    assert_eq!(page.0, 200);
    let m = samples(&page.1);
    let commands = |command: &str, status: &str| {
        sample(
            &m,
            &format!(
                r#"profile_worker_commands_total{{command="{command}",lane="interactive",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(
        commands("create-ticket", "200"),
        5.0,
        "the repeat counts too: {m:?}"
    );
    assert_eq!(commands("create-verification-token", "200"), 2.0);
    assert_eq!(commands("create-ticket", "403"), 1.0);
    assert_eq!(commands("create-ticket", "404"), 1.0);
    assert_eq!(commands("create-ticket", "400"), 1.0);
    assert_eq!(
        sample(
            &m,
            r#"profile_worker_dead_letters_total{code="PARAM_DESERIALIZATION_ERROR"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "profile_worker_batch_size_sum"),
        10.0,
        "every command went through a batch"
    );
    let batches = sample(&m, "profile_worker_batch_size_count");
    assert!(batches >= 1.0);
    // Each batch was decided either on rows earlier batches read or on a
    // load; none of their rows changed meanwhile.
    let decided = |on: &str| {
        sample(
            &m,
            &format!(r#"profile_worker_batches_decided_total{{on="{on}"}}"#),
        )
    };
    let loaded = decided("loaded");
    assert_eq!(decided("known") + loaded, batches, "{m:?}");
    assert_eq!(decided("changed"), 0.0);
    // Every stage of every batch is timed (plan and the round trips per attempt).
    for stage in [
        "decode", "load", "plan", "commit", "database", "publish", "ack", "total",
    ] {
        assert_eq!(
            sample(
                &m,
                &format!(r#"profile_worker_batch_seconds_count{{stage="{stage}"}}"#)
            ),
            if stage == "load" { loaded } else { batches },
            "{stage}"
        );
    }
    assert_eq!(
        sample(&m, "profile_worker_command_age_seconds_count"),
        10.0,
        "one age per command published with a timestamp"
    );
    assert_eq!(sample(&m, "profile_worker_consumers"), 4.0, "two per lane");
    assert_eq!(
        sample(&m, "profile_worker_reconnects_total"),
        0.0,
        "no reconnects: {m:?}"
    );
    // The outbox gauge is refreshed by the relay (every OUTBOX_GRACE_SECS = 1 s here).
    let outbox = http_until(&http, "/metrics", Duration::from_secs(10), |_, b| {
        samples(b).contains_key("profile_worker_outbox_pending")
    })
    .await
    .unwrap();
    assert_eq!(
        samples(&outbox.1).get("profile_worker_outbox_pending"),
        Some(&0.0),
        "every event was confirmed and its outbox row removed"
    );
    // Queue depths, polled from the broker: the one dead letter, no backlog.
    let depth = |b: &str, q: &str| {
        samples(b)
            .get(&format!(r#"profile_worker_queue_messages{{queue="{q}"}}"#))
            .copied()
    };
    let polled = http_until(&http, "/metrics", Duration::from_secs(10), |_, b| {
        depth(b, "dead_letters") == Some(1.0)
    })
    .await
    .unwrap();
    assert_eq!(depth(&polled.1, "dead_letters"), Some(1.0), "{}", polled.1);
    assert_eq!(depth(&polled.1, "commands"), Some(0.0));

    signal(&worker, SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(40), worker.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success());
    assert_eq!(
        http_get(&http, "/healthz").await,
        None,
        "the endpoint goes with the process"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_commands_trace_continues_on_its_reply_and_events() {
    let env = Env::start().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let send = Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(Uuid::new_v4().to_string()),
        traceparent: Some(parent.into()),
        tracestate: Some(state.into()),
        ..Default::default()
    };
    let body = verification(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let reply = env.call_raw(body.as_bytes(), send).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let header = reply.traceparent.expect("the reply carries a traceparent");
    let child = traceparent(&header);
    let parent = traceparent(parent);
    assert_eq!(child.0, parent.0, "same trace");
    assert_ne!(child.1, parent.1, "the worker's own span");
    assert_eq!(child.2, parent.2, "sampling decision kept");
    assert_eq!(
        reply.tracestate.as_deref(),
        Some(state),
        "tracestate carried on"
    );

    let events = env.events(2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(
            e.header("traceparent").as_deref(),
            Some(header.as_str()),
            "{} is in the worker's span, like the reply",
            e.routing_key
        );
        assert_eq!(e.header("tracestate").as_deref(), Some(state));
    }
    env.teardown().await;
}

#[tokio::test]
async fn a_trace_is_started_when_a_command_has_none_or_a_broken_one() {
    let env = Env::start().await;
    let mut traces = Vec::new();
    for given in [None, Some("00-not-a-trace-01")] {
        let send = Send {
            kind: Some("create-ticket".into()),
            message_id: Some(Uuid::new_v4().to_string()),
            traceparent: given.map(str::to_string),
            ..Default::default()
        };
        let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
        let reply = env.call_raw(body.as_bytes(), send).await;
        assert_eq!(reply.status, 200, "{}", reply.raw);
        let header = reply.traceparent.expect("a traceparent even so");
        let started = traceparent(&header);
        assert_eq!(started.2, "01", "a new trace is sampled");
        let event = env.events(1).await;
        assert_eq!(event[0].header("traceparent"), Some(header));
        traces.push(started.0);
    }
    assert_ne!(traces[0], traces[1], "each command starts its own trace");

    // A refused command is traced too, and so is a malformed one.
    let reply = env
        .call("create-ticket", json!({"accessTokenId": ADMIN_TOKEN}))
        .await;
    assert_eq!(reply.status, 400);
    assert!(reply.traceparent.is_some());
    env.teardown().await;
}

#[tokio::test]
async fn json_logs_name_each_commands_id_type_and_outcome_and_never_a_whole_token() {
    let env = Env::prepare().await;
    let mut cmd = worker_process(&env);
    cmd.env("RUST_LOG", "info,profile_worker::pipeline=debug");
    let mut worker = WorkerProcess::start(cmd, None).await;
    let ok = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    let refused = env
        .call("create-ticket", ticket(OTHER_TENANT_TOKEN, ENABLED_PROFILE))
        .await;
    let malformed_id = Uuid::new_v4().to_string();
    let bad = Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(malformed_id.clone()),
        ..Default::default()
    };
    let malformed = env.call_raw(b"[]", bad).await;
    assert_eq!(
        (ok.status, refused.status, malformed.status),
        (200, 403, 400)
    );
    signal(&worker, SIGTERM);
    assert!(worker.wait().await.unwrap().success());

    let text = worker.log_text();
    assert!(
        !text.contains(ADMIN_TOKEN) && !text.contains(OTHER_TENANT_TOKEN),
        "a whole access token ID was logged"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // A line about a command is in the command's span, which names it.
    let about_commands: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "command")
        .collect();
    for l in &about_commands {
        let span = &l["span"];
        assert!(
            span["message_id"].is_string()
                && span["command"].is_string()
                && span["trace_id"].is_string()
                && l["outcome"].is_string(),
            "{l}"
        );
    }
    let mut answered: Vec<(&str, &str)> = about_commands
        .iter()
        .filter(|l| l["message"] == "answered")
        .map(|l| {
            (
                l["outcome"].as_str().unwrap(),
                l["span"]["command"].as_str().unwrap(),
            )
        })
        .collect();
    // Two consumers: the lines need not come in the order the commands were sent.
    answered.sort_unstable();
    assert_eq!(
        answered,
        [
            ("created", "create-ticket"),
            ("malformed", "create-verification-token"),
            ("rejected", "create-ticket"),
        ]
    );
    assert!(
        about_commands
            .iter()
            .any(|l| l["level"] == "WARN" && l["span"]["message_id"] == malformed_id.as_str()),
        "the malformed command is logged at warn"
    );
    env.teardown().await;
}

/// A publisher's tracestate is copied onto replies and events only when it
/// keeps to the W3C grammar: one with a control character is dropped, the
/// trace itself continued.
#[tokio::test]
async fn a_malformed_tracestate_is_not_copied_onto_replies_and_events() {
    let env = Env::start().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let send = Send {
        kind: Some("create-ticket".into()),
        message_id: Some(Uuid::new_v4().to_string()),
        traceparent: Some(parent.into()),
        tracestate: Some("k=v\u{1}\r\nx-evil: 1".into()),
        ..Default::default()
    };
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let reply = env.call_raw(body.as_bytes(), send).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(reply.tracestate, None);
    let header = reply.traceparent.expect("the trace continues");
    assert_eq!(traceparent(&header).0, traceparent(parent).0);
    let event = env.events(1).await;
    assert_eq!(event[0].header("tracestate"), None);
    env.teardown().await;
}

/// BATCH_WAIT_MS: while one batch is held in the database (its idempotency
/// record waits for this test's uncommitted one under the same message_id),
/// the other consumer gathers the commands that arrive, 20 ms apart, into one
/// batch instead of taking each as it comes; and a lone command, with nothing
/// else in the database, is answered without waiting (here the wait is a
/// whole second).
#[tokio::test]
async fn a_batch_wait_gathers_while_another_batch_is_in_the_database() {
    let env = Env::prepare().await;
    let mut batches = Vec::new();
    for wait in ["0", "1000"] {
        let mut cmd = worker_process(&env);
        cmd.env("BATCH_WAIT_MS", wait).env("CONSUMERS", "2");
        let mut worker = WorkerProcess::start(cmd, None).await;
        let http = worker.http().to_string();
        // A batch is counted once its ack is sent, just after its replies:
        // (batches, commands) once `commands` commands have been counted.
        let counted = |commands: f64| {
            let http = http.clone();
            async move {
                let page = http_until(&http, "/metrics", Duration::from_secs(10), |_, b| {
                    sample(&samples(b), "profile_worker_batch_size_sum") >= commands
                })
                .await
                .expect("metrics");
                let page = samples(&page.1);
                (
                    sample(&page, "profile_worker_batch_size_count"),
                    sample(&page, "profile_worker_batch_size_sum"),
                )
            }
        };
        // Alone: answered at once, never after the wait.
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let id = env
                .send(
                    "create-verification-token",
                    &verification(ADMIN_TOKEN, ENABLED_PROFILE),
                )
                .await;
            assert_eq!(env.reply_for(&id).await.status, 200);
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "BATCH_WAIT_MS={wait}: a lone command waited {:?}",
                started.elapsed()
            );
        }
        let before = counted(3.0).await;
        assert_eq!(before, (3.0, 3.0), "each lone command a batch of its own");
        // The next command's insert of its idempotency record waits for this
        // transaction's record under the same message_id; rolled back below.
        let held = format!("held-{wait}-{}", Uuid::new_v4());
        env.db
            .batch_execute(&format!(
                "BEGIN; INSERT INTO processed_commands (message_id, command, status, reply) \
                 VALUES ('{held}', 'create-ticket', 200, '{{}}')"
            ))
            .await
            .unwrap();
        let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
        let send = Send {
            kind: Some("create-ticket".into()),
            message_id: Some(held.clone()),
            ..Default::default()
        };
        let held = env.publish(body.as_bytes(), send).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut ids = Vec::new();
        for _ in 0..8 {
            ids.push(
                env.send("create-ticket", &ticket(ADMIN_TOKEN, ENABLED_PROFILE))
                    .await,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        env.db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(env.reply_for(&held).await.status, 200);
        for id in ids {
            assert_eq!(env.reply_for(&id).await.status, 200);
        }
        let after = counted(before.1 + 9.0).await;
        assert_eq!(after.1, before.1 + 9.0, "the held command and 8 tickets");
        batches.push(after.0 - before.0);
        signal(&worker, SIGTERM);
        assert!(worker.wait().await.unwrap().success());
    }
    eprintln!("batches from the held command on, BATCH_WAIT_MS 0 and 1000: {batches:?}");
    // Without the wait: the held command, the other consumer's four tickets
    // one by one, the held consumer's four together.
    assert!(batches[0] >= 5.0, "without a wait: {batches:?}");
    // With it: the held command, the other consumer's four gathered while it
    // was held, the held consumer's four.
    assert!(batches[1] <= 3.0, "with a wait: {batches:?}");
    env.teardown().await;
}
