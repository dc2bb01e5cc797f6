//! The bulk lane (issue 32, CONTRACT §1): an import in the bulk queue never
//! holds up an interactive caller, gets at least its share when both lanes
//! are full, and is the same contract (idempotency across lanes, malformed
//! commands dead-lettered) as the interactive lane. The worker runs as its own
//! process, so its per-lane counters are its alone. A binary of its own: its
//! imports (tens of thousands of commands) would otherwise share the two cores
//! with the integration tests' timing-sensitive ones.

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use profile_worker_testkit::*;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

/// Publishes `n` fire-and-forget create-ticket commands (a message_id each,
/// no reply_to) to `exchange`, pipelined, every one confirmed.
async fn import(env: &Env, exchange: &str, n: usize) {
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for _ in chunk {
            let props = BasicProperties::default()
                .with_type("create-ticket".into())
                .with_content_type("application/json".into())
                .with_message_id(Uuid::new_v4().to_string().into())
                .with_delivery_mode(2);
            confirms.push(
                env.channel
                    .basic_publish(
                        exchange.into(),
                        "create-ticket".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for c in confirms {
            assert!(c.await.expect("confirm").is_ack(), "the broker took it");
        }
    }
}

/// (interactive, bulk) commands the worker answered so far.
async fn done(w: &WorkerProcess) -> (f64, f64) {
    let (_, page) = http_get(w.http(), "/metrics").await.expect("metrics");
    let m = samples(&page);
    let lane = |name: &str| {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("profile_worker_commands_total")
                    && k.contains(&format!("lane=\"{name}\""))
            })
            .map(|(_, v)| v)
            .sum()
    };
    (lane("interactive"), lane("bulk"))
}

async fn worker(env: &Env) -> WorkerProcess {
    let mut cmd = worker_process(env);
    cmd.env("RUST_LOG", "warn");
    WorkerProcess::start(cmd, None).await
}

async fn wait_tickets(env: &Env, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while env.count("tickets").await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} tickets within 120 s",
            env.count("tickets").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("tickets").await, n, "none twice");
}

#[tokio::test]
async fn an_interactive_command_behind_20000_bulk_ones_is_answered_before_most_of_them() {
    let env = Env::prepare().await;
    import(&env, &env.settings.broker.bulk_exchange, 20_000).await;
    let login = env
        .publish(
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            Send {
                correlation_id: Some("login".into()),
                ..Default::default()
            },
        )
        .await;
    let w = worker(&env).await;
    let r = env.reply_for(&login).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    // The bulk commands answered by the time the reply arrived (or a few
    // more); the login itself is counted once its reply is confirmed, which
    // may be just after the caller has it.
    let (_, bulk) = done(&w).await;
    let mut interactive = 0.0;
    for _ in 0..100 {
        interactive = done(&w).await.0;
        if interactive > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(interactive, 1.0);
    assert!(
        bulk < 5_000.0,
        "the login was answered after {bulk} of the 20,000 bulk commands"
    );
    eprintln!("the login was answered after {bulk} of 20,000 bulk commands");
    wait_tickets(&env, 20_001).await;
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn with_both_lanes_full_interactive_goes_first_and_bulk_gets_its_share() {
    let env = Env::prepare_with(|s| s.worker.bulk_share_percent = 10).await;
    import(&env, &env.settings.broker.command_exchange, 4_000).await;
    import(&env, &env.settings.broker.bulk_exchange, 4_000).await;
    let w = worker(&env).await;
    // Midway through the interactive backlog, both lanes still full.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (interactive, bulk) = loop {
        let (i, b) = done(&w).await;
        if i >= 2_000.0 {
            break (i, b);
        }
        assert!(tokio::time::Instant::now() < deadline, "{i} interactive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("with {interactive} interactive commands done, {bulk} bulk");
    // At least its share (one bulk for every nine interactive), less what is
    // in flight; and no more than a bulk lane that waited its turn takes.
    assert!(
        bulk >= 0.8 * interactive / 9.0,
        "bulk got {bulk} while interactive got {interactive}"
    );
    assert!(
        bulk <= 0.5 * interactive,
        "interactive first: bulk got {bulk} while interactive got {interactive}"
    );
    wait_tickets(&env, 8_000).await;
    // Once interactive is done, bulk gets everything.
    let (i, b) = done(&w).await;
    assert_eq!((i, b), (4_000.0, 4_000.0));
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn a_message_id_is_one_command_whichever_lane_carries_it() {
    let env = Env::prepare().await;
    let w = worker(&env).await;
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let via = |lane: &str, message_id: &str, correlation: &str, body: &str| {
        let exchange = if lane == "bulk" {
            env.settings.broker.bulk_exchange.clone()
        } else {
            env.settings.broker.command_exchange.clone()
        };
        let props = BasicProperties::default()
            .with_type("create-ticket".into())
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_correlation_id(correlation.into())
            .with_reply_to(env.reply_queue.as_str().into());
        let (body, correlation) = (body.to_string(), correlation.to_string());
        let env = &env;
        async move {
            env.publish_as_is(&exchange, "create-ticket", body.as_bytes(), props)
                .await;
            env.reply_for(&correlation).await
        }
    };
    for (first, then) in [("interactive", "bulk"), ("bulk", "interactive")] {
        let id = Uuid::new_v4().to_string();
        let a = via(first, &id, &format!("{id}-1"), &body).await;
        let b = via(then, &id, &format!("{id}-2"), &body).await;
        assert_eq!(a.status, 200, "{}", a.raw);
        assert_eq!(
            (b.status, &b.body),
            (200, &a.body),
            "{first} then {then}: the stored reply"
        );
        // Another command under the same message_id, in the other lane.
        let other = ticket(ADMIN_TOKEN, DISABLED_PROFILE).to_string();
        let c = via(then, &id, &format!("{id}-3"), &other).await;
        assert_eq!(c.status, 409, "{}", c.raw);
    }
    assert_eq!(env.count("tickets").await, 2, "one per message_id");
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn a_bad_bulk_command_is_answered_and_dead_lettered_like_any_other() {
    let env = Env::prepare().await;
    let w = worker(&env).await;
    let bulk = env.settings.broker.bulk_exchange.clone();
    for (routing_key, body, correlation, code) in [
        (
            "create-ticket",
            br#"{"accessTokenId":"x"}"#.as_slice(),
            "malformed",
            "PARAM_DESERIALIZATION_ERROR",
        ),
        (
            "create-nothing",
            br#"{}"#.as_slice(),
            "unknown",
            "UNKNOWN_COMMAND",
        ),
    ] {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation.into())
            .with_reply_to(env.reply_queue.as_str().into());
        env.publish_as_is(&bulk, routing_key, body, props).await;
        let r = env.reply_for(correlation).await;
        assert_eq!(r.status, 400, "{}", r.raw);
        assert_eq!(r.body["errorCode"], code);
        let dead = env.wait_dead_letters(1).await;
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].header("x-error-code").as_deref(), Some(code));
    }
    let (interactive, bulk_done) = done(&w).await;
    assert_eq!(
        (interactive, bulk_done),
        (0.0, 2.0),
        "both in the bulk lane"
    );
    // And a good one with a reply, as a caller that wants one may ask.
    let props = BasicProperties::default()
        .with_type("create-verification-token".into())
        .with_content_type("application/json".into())
        .with_correlation_id("good".into())
        .with_reply_to(env.reply_queue.as_str().into());
    env.publish_as_is(
        &bulk,
        "create-verification-token",
        json!({"accessTokenId": ADMIN_TOKEN, "id": ENABLED_PROFILE})
            .to_string()
            .as_bytes(),
        props,
    )
    .await;
    assert_eq!(env.reply_for("good").await.status, 200);
    drop(w);
    env.teardown().await;
}
