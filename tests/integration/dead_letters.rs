//! `profile-worker dead-letters list|replay` against a real broker and a running
//! worker: listing changes nothing; replay sends exactly the chosen commands
//! back, the worker answers them, and only they leave the dead-letter queue.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use profile_worker_testkit::*;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

async fn dead_letter_depth(env: &Env) -> u32 {
    env.queue(&env.settings.broker.dead_letter_queue)
        .await
        .message_count()
}

async fn wait_depth(env: &Env, n: u32) -> u32 {
    let mut depth = 0;
    for _ in 0..50 {
        depth = dead_letter_depth(env).await;
        if depth == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    depth
}

async fn run_cli(env: &Env, args: &[&str]) -> (String, String) {
    let out = cli(env, args).output().await.expect("run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

fn listed(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[tokio::test]
async fn dead_letters_are_listed_with_reasons_and_replayed_after_a_fix() {
    let env = Env::start().await;

    // A malformed command, dead-lettered by the worker.
    let malformed_id = Uuid::new_v4().to_string();
    let bad = Send {
        kind: Some("create-ticket".into()),
        message_id: Some(malformed_id.clone()),
        ..Default::default()
    };
    assert_eq!(env.call_raw(b"{not json", bad).await.status, 400);

    // A valid command as the worker dead-letters one that failed on every
    // delivery (say, while a migration was broken), now fixed.
    let failed_id = Uuid::new_v4().to_string();
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-error-code", "INTERNAL_SERVER_ERROR"),
        ("x-error-reason", "failed on 5 deliveries: relation missing"),
        ("x-delivery-count", "4"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let props = BasicProperties::default()
        .with_type("create-ticket".into())
        .with_content_type("application/json".into())
        .with_message_id(failed_id.as_str().into())
        .with_correlation_id(failed_id.as_str().into())
        .with_reply_to(env.reply_queue.as_str().into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    env.publish_as_is(
        &env.settings.broker.dead_letter_exchange,
        "create-ticket",
        body.as_bytes(),
        props,
    )
    .await;
    assert_eq!(wait_depth(&env, 2).await, 2);

    let (out, _) = run_cli(&env, &["dead-letters", "list", "--json"]).await;
    let all = listed(&out);
    assert_eq!(all.len(), 2, "{out}");
    let by_id = |id: &str| {
        all.iter()
            .find(|d| d["message_id"] == id)
            .unwrap_or_else(|| panic!("{id} listed: {out}"))
            .clone()
    };
    let m = by_id(&malformed_id);
    assert_eq!(m["code"], "PARAM_DESERIALIZATION_ERROR");
    assert_eq!(m["command"], "create-ticket");
    assert_eq!(m["body"], "{not json");
    assert!(!m["reason"].as_str().unwrap().is_empty());
    let f = by_id(&failed_id);
    assert_eq!(f["code"], "INTERNAL_SERVER_ERROR");
    assert_eq!(f["reason"], "failed on 5 deliveries: relation missing");
    assert_eq!(
        wait_depth(&env, 2).await,
        2,
        "listing leaves the queue as it was"
    );

    let (table, _) = run_cli(&env, &["dead-letters", "list"]).await;
    assert!(
        table.contains(&failed_id) && table.contains("INTERNAL_SERVER_ERROR"),
        "{table}"
    );

    let (dry, _) = run_cli(&env, &["dead-letters", "replay", "--all", "--dry-run"]).await;
    assert_eq!(dry.lines().count(), 2, "{dry}");
    assert_eq!(wait_depth(&env, 2).await, 2, "a dry run changes nothing");

    let (replayed, _) = run_cli(
        &env,
        &["dead-letters", "replay", "--code", "INTERNAL_SERVER_ERROR"],
    )
    .await;
    assert!(replayed.contains(&failed_id), "{replayed}");
    assert!(!replayed.contains(&malformed_id), "{replayed}");

    // The worker answers the replayed command to its original reply_to.
    let reply = env.reply_for(&failed_id).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(env.count("tickets").await, 1);
    assert_eq!(wait_depth(&env, 1).await, 1, "only the replayed one left");
    let (out, _) = run_cli(&env, &["dead-letters", "list", "--json"]).await;
    let left = listed(&out);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["message_id"], malformed_id.as_str());
    env.teardown().await;
}

#[tokio::test]
async fn replay_needs_a_selection() {
    let env = Env::prepare().await;
    let out = cli(&env, &["dead-letters", "replay"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--message-id") || err.contains("--all"),
        "{err}"
    );
    env.teardown().await;
}

/// Reading a quorum queue returns what was read, and RabbitMQ counts a
/// returned message as a delivery (x-delivery-count); where the queue has a
/// delivery limit (RabbitMQ 4.x: 20 by default) enough listings would drop
/// dead letters. Listing, replaying and purging must leave the ones they do
/// not take as they were: there, and not one delivery older.
#[tokio::test]
async fn listing_fifty_times_loses_nothing_and_counts_no_delivery() {
    let env = Env::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = Uuid::new_v4().to_string();
        let bad = Send {
            kind: Some("create-ticket".into()),
            message_id: Some(id.clone()),
            ..Default::default()
        };
        assert_eq!(
            env.call_raw(format!("{{\"accessTokenId\":{i}}}").as_bytes(), bad)
                .await
                .status,
            400
        );
        ids.push(id);
    }
    assert_eq!(wait_depth(&env, 3).await, 3);
    for _ in 0..50 {
        run_cli(&env, &["dead-letters", "list", "--json"]).await;
    }
    // A dry run and a replay and a purge of nothing in particular count no
    // delivery against the rest either.
    run_cli(&env, &["dead-letters", "replay", "--all", "--dry-run"]).await;
    run_cli(
        &env,
        &["dead-letters", "purge", "--message-id", "none", "--yes"],
    )
    .await;
    assert_eq!(dead_letter_depth(&env).await, 3, "nothing lost");
    let dead = env.dead_letters().await;
    let mut seen: Vec<String> = dead.iter().filter_map(|d| d.message_id.clone()).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    for d in &dead {
        let count = d.header("x-delivery-count").unwrap_or_else(|| "0".into());
        assert_eq!(
            count, "0",
            "a listing counted as a delivery: {:?}",
            d.headers
        );
    }
    env.teardown().await;
}

#[tokio::test]
async fn purge_removes_only_the_chosen_after_a_dry_run_and_asks_for_yes() {
    let env = Env::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = Uuid::new_v4().to_string();
        let bad = Send {
            kind: Some("create-ticket".into()),
            message_id: Some(id.clone()),
            ..Default::default()
        };
        assert_eq!(env.call_raw(b"{not json", bad).await.status, 400);
        ids.push(id);
    }
    assert_eq!(wait_depth(&env, 3).await, 3);
    let (dry, _) = run_cli(
        &env,
        &[
            "dead-letters",
            "purge",
            "--message-id",
            &ids[0],
            "--dry-run",
        ],
    )
    .await;
    assert!(dry.contains(&format!("would purge {}", ids[0])), "{dry}");
    assert_eq!(
        dead_letter_depth(&env).await,
        3,
        "a dry run changes nothing"
    );
    let refused = cli(&env, &["dead-letters", "purge", "--all"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(dead_letter_depth(&env).await, 3, "refused without --yes");
    let (_, summary) = run_cli(
        &env,
        &[
            "dead-letters",
            "purge",
            "--message-id",
            &ids[0],
            "--message-id",
            &ids[1],
            "--yes",
        ],
    )
    .await;
    assert!(summary.contains("purged 2 of the 3"), "{summary}");
    let left: Vec<String> = env
        .dead_letters()
        .await
        .iter()
        .filter_map(|d| d.message_id.clone())
        .collect();
    assert_eq!(left, [ids[2].clone()]);
    env.teardown().await;
}

/// The email requests the dispatcher gave up on (issue 33): listed with their
/// reasons and no secret, replayed into the email exchange as the worker
/// publishes them (so the dispatcher's queue, and only it, gets them), with a
/// new ID when asked, and purged.
#[tokio::test]
async fn email_dead_letters_are_listed_without_secrets_replayed_to_the_dispatcher_and_purged() {
    let env = Env::prepare().await;
    let b = env.settings.broker.clone();
    // As the dispatcher dead-letters: a copy with its reason, to the dispatch
    // queue's dead-letter exchange.
    let mut ids = Vec::new();
    for code in ["SMTP_UNAVAILABLE", "INTERRUPTED_WHILE_SENDING"] {
        let id = Uuid::new_v4().to_string();
        let token = Uuid::new_v4();
        let body = serde_json::json!({
            "id": id, "tenant": "default", "profileId": ENABLED_PROFILE,
            "to": "jane.doe@example.com", "template": "reset-password", "tokenId": token,
            "verificationLink": format!("https://example.com/verify?tokenId={token}"),
            "timestamp": 1_495_746_285_875i64,
        });
        let mut headers = FieldTable::default();
        headers.insert("x-error-code".into(), AMQPValue::LongString(code.into()));
        headers.insert(
            "x-error-reason".into(),
            AMQPValue::LongString("the reason".into()),
        );
        env.publish_as_is(
            &b.email_dead_letter_exchange(),
            "email.requested",
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(headers),
        )
        .await;
        ids.push((id, token));
    }
    let (out, _) = run_cli(
        &env,
        &["dead-letters", "list", "--queue", "email", "--json"],
    )
    .await;
    let list = listed(&out);
    assert_eq!(list.len(), 2, "{out}");
    assert_eq!(list[0]["code"], "SMTP_UNAVAILABLE");
    assert_eq!(list[0]["command"], "email.requested");
    for (id, token) in &ids {
        assert!(
            !out.contains(&token.to_string()),
            "a link's token in the list"
        );
        assert!(out.contains(id.as_str()));
    }
    assert!(!out.contains("jane.doe@example.com") && out.contains("j***@example.com"));
    // Replay the first as it was, the second as new.
    run_cli(
        &env,
        &[
            "dead-letters",
            "replay",
            "--queue",
            "email",
            "--message-id",
            &ids[0].0,
        ],
    )
    .await;
    run_cli(
        &env,
        &[
            "dead-letters",
            "replay",
            "--queue",
            "email",
            "--as-new",
            "--message-id",
            &ids[1].0,
        ],
    )
    .await;
    // Into the dispatch queue (the harness's email consumer reads it).
    let emails: Vec<Received> = env
        .events(2)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .collect();
    assert_eq!(emails.len(), 2, "{emails:?}");
    assert_eq!(emails[0].message_id.as_deref(), Some(ids[0].0.as_str()));
    assert!(
        emails[0].header("x-error-code").is_none(),
        "reasons dropped"
    );
    let renewed = &emails[1];
    assert_ne!(renewed.message_id.as_deref(), Some(ids[1].0.as_str()));
    assert_eq!(
        renewed.json()["id"].as_str(),
        renewed.message_id.as_deref(),
        "the body's id is the new message_id"
    );
    assert_eq!(
        renewed.json()["tokenId"],
        ids[1].1.to_string(),
        "the same email"
    );
    assert_eq!(
        env.queue(&b.email_dead_letter_queue())
            .await
            .message_count(),
        0
    );
    // Purge.
    env.publish_as_is(
        &b.email_dead_letter_exchange(),
        "email.requested",
        b"{}",
        BasicProperties::default().with_message_id("x".into()),
    )
    .await;
    run_cli(
        &env,
        &[
            "dead-letters",
            "purge",
            "--queue",
            "email",
            "--all",
            "--yes",
        ],
    )
    .await;
    assert_eq!(
        env.queue(&b.email_dead_letter_queue())
            .await
            .message_count(),
        0
    );
    // --as-new is for email requests only.
    let out = cli(&env, &["dead-letters", "replay", "--as-new", "--all"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    env.teardown().await;
}
