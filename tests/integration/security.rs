//! What a publisher who is not the caller the worker imagined can do with it,
//! tried against the real broker and database (CONTRACT §2–§8): replaying
//! another caller's message_id, wider permissions than Crafter's, replies into
//! other queues, stalling the worker with a queue that refuses replies, links
//! that carry what the caller typed, control characters, email floods, and
//! access token IDs at rest.

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use profile_worker_testkit::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

fn with_mid(mid: &str) -> Send {
    Send {
        message_id: Some(mid.into()),
        ..Default::default()
    }
}

fn vt_with_mid(mid: &str) -> Send {
    Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(mid.into()),
        ..Default::default()
    }
}

/// A valid create-ticket whose reply_to is `target`.
async fn ticket_replying_to(env: &Env, target: &str, message_id: &str) {
    env.publish(
        ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
        Send {
            reply_to: Some(target.into()),
            message_id: Some(message_id.into()),
            ..Default::default()
        },
    )
    .await;
}

async fn insert_token(env: &Env, id: &str, permissions: Value) {
    env.db
        .execute(
            "INSERT INTO access_tokens (id_sha256, application, tenant_permissions) \
             VALUES (sha256(convert_to($1, 'UTF8')), 'late-app', $2)",
            &[&id, &permissions],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reused_message_id_never_hands_over_another_callers_ticket() {
    let env = Env::start().await;
    let first = env
        .call_raw(
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            with_mid("shared"),
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.raw);
    let ticket_id = first.body["id"].as_str().unwrap().to_string();
    // The same message_id with a made-up token, another valid token, another
    // profile, another command: 409, and nothing of the first reply.
    for (kind, body) in [
        ("create-ticket", ticket("made-up-token", ENABLED_PROFILE)),
        ("create-ticket", ticket(OTHER_TENANT_TOKEN, ENABLED_PROFILE)),
        ("create-ticket", ticket(ADMIN_TOKEN, OTHER_TENANT_PROFILE)),
        (
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        ),
    ] {
        let r = env
            .call_raw(
                body.to_string().as_bytes(),
                Send {
                    kind: Some(kind.into()),
                    ..with_mid("shared")
                },
            )
            .await;
        assert_eq!(r.status, 409, "{kind} {body}: {}", r.raw);
        assert_eq!(
            r.body,
            json!({"errorCode": "MESSAGE_ID_CONFLICT",
                   "message": "message_id \"shared\" was already used for a different command"})
        );
        assert!(!r.raw.contains(&ticket_id));
    }
    // The caller's own retry gets its reply again.
    let again = env
        .call_raw(
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            with_mid("shared"),
        )
        .await;
    assert_eq!(again.raw, first.raw);
    assert_eq!(env.count("tickets").await, 1);
    assert_eq!(env.count("verification_tokens").await, 0);
    assert!(
        env.dead_letters().await.is_empty(),
        "409 is answered, not dead-lettered"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_burst_racing_for_one_message_id_gives_the_ticket_only_to_its_owner() {
    let env = Env::start().await;
    // Published together, so they share batches and race across the two consumers.
    let mut calls = Vec::new();
    for i in 0..40 {
        let body = if i % 2 == 0 {
            ticket(ADMIN_TOKEN, ENABLED_PROFILE)
        } else {
            ticket(OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE)
        };
        let c = env
            .publish(body.to_string().as_bytes(), with_mid("contested"))
            .await;
        calls.push((i % 2 == 0, c));
    }
    let mut winners = HashSet::new();
    let mut ids = HashSet::new();
    for (admin, c) in calls {
        let r = env.reply_for(&c).await;
        match r.status {
            200 => {
                winners.insert(admin);
                ids.insert(r.body["id"].as_str().unwrap().to_string());
            }
            409 => assert_eq!(r.body["errorCode"], "MESSAGE_ID_CONFLICT"),
            other => panic!("{other}: {}", r.raw),
        }
    }
    assert_eq!(winners.len(), 1, "only one caller's command got 200s");
    assert_eq!(ids.len(), 1, "all of them the same ticket");
    assert_eq!(env.count("tickets").await, 1);
    env.teardown().await;
}

#[tokio::test]
async fn rejections_for_unknown_or_expired_tokens_are_not_remembered() {
    let env = Env::start().await;
    let body = ticket("late-token", ENABLED_PROFILE).to_string();
    let r = env.call_raw(body.as_bytes(), with_mid("m-late")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["errorCode"], "NO_SUCH_ACCESS_TOKEN_ID");
    let r = env
        .call_raw(
            ticket(EXPIRED_TOKEN, ENABLED_PROFILE)
                .to_string()
                .as_bytes(),
            with_mid("m-expired"),
        )
        .await;
    assert_eq!(
        r.body["message"],
        format!(
            "Access token \"{EXPIRED_TOKEN}\" for application \"old-app\" expired on 09/09/2001"
        )
    );
    assert_eq!(env.count("processed_commands").await, 0);
    // Once the token exists, the same command is decided again.
    insert_token(
        &env,
        "late-token",
        json!([{"tenant": "*", "allowedActions": ["*"]}]),
    )
    .await;
    let r = env.call_raw(body.as_bytes(), with_mid("m-late")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    env.teardown().await;
}

#[tokio::test]
async fn the_first_matching_permission_entry_decides_as_in_crafter() {
    let env = Env::start().await;
    insert_token(
        &env,
        "narrowed",
        json!([{"tenant": "default", "allowedActions": []},
               {"tenant": "*", "allowedActions": ["*"]}]),
    )
    .await;
    for (kind, body) in [
        ("create-ticket", ticket("narrowed", ENABLED_PROFILE)),
        (
            "create-verification-token",
            verification("narrowed", ENABLED_PROFILE),
        ),
    ] {
        let r = env.call(kind, body).await;
        assert_eq!(r.status, 403, "{}", r.raw);
        assert_eq!(
            r.body,
            json!({"errorCode": "ACTION_DENIED",
                   "message": "Current subject does not have permission to execute action \"MANAGE_PROFILES\" on tenant \"default\""})
        );
    }
    // On another tenant the `*` entry is the first that matches.
    let r = env
        .call("create-ticket", ticket("narrowed", OTHER_TENANT_PROFILE))
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(env.count("tickets").await, 1);
    env.teardown().await;
}

#[tokio::test]
async fn replies_go_only_to_reply_queues() {
    let env = Env::start().await;
    // Another service's queue, and the worker's own command queue.
    let victim = format!("{}.victim", env.settings.broker.command_queue);
    env.channel
        .queue_declare(
            victim.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let own = env.settings.broker.command_queue.clone();
    for (i, target) in [victim.as_str(), own.as_str(), "amq.rabbitmq.reply-tox"]
        .into_iter()
        .enumerate()
    {
        ticket_replying_to(&env, target, &format!("r{i}")).await;
    }
    let dead = env.wait_dead_letters(3).await;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(
            d.header("x-error-code").as_deref(),
            Some("REPLY_TO_NOT_ALLOWED")
        );
        assert!(d
            .header("x-error-reason")
            .unwrap()
            .contains("not a reply queue"));
    }
    assert_eq!(
        env.queue(&victim).await.message_count(),
        0,
        "nothing was put there"
    );
    assert_eq!(env.queue_depth().await, 0, "nothing looped back");
    assert_eq!(env.count("tickets").await, 0, "not processed");
    assert_eq!(env.count("processed_commands").await, 0);
    // The harness's own reply queue is server-named (amq.gen-…) and works.
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_reply_queue_that_refuses_everything_holds_nobody_up() {
    let env = Env::start().await;
    let http = env.http().to_string();
    // A server-named queue (an allowed reply_to) that refuses every message.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let full = env
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap()
        .name()
        .as_str()
        .to_string();
    assert!(full.starts_with("amq.gen-"));
    env.publish(
        verification(ADMIN_TOKEN, DISABLED_PROFILE)
            .to_string()
            .as_bytes(),
        Send {
            kind: Some("create-verification-token".into()),
            reply_to: Some(full.clone()),
            message_id: Some("refused-reply".into()),
            ..Default::default()
        },
    )
    .await;
    // Everyone else is answered meanwhile (a stalled batch would leave these
    // unanswered: reply_for waits 30 s).
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let r = env
            .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await;
        assert_eq!(r.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "other callers waited {:?}",
        started.elapsed()
    );
    // The refused reply was dropped and counted, its command acked once, its
    // email requested once.
    let page = http_until(&http, "/metrics", Duration::from_secs(10), |_, b| {
        samples(b)
            .get("profile_worker_replies_dropped_total")
            .is_some_and(|v| *v >= 1.0)
    })
    .await
    .expect("metrics");
    assert_eq!(
        samples(&page.1)["profile_worker_replies_dropped_total"],
        1.0,
        "{}",
        page.1
    );
    let emails: Vec<_> = env
        .events(23)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .collect();
    assert_eq!(
        emails.len(),
        1,
        "the email is requested once, not per retry"
    );
    assert_eq!(env.queue_depth().await, 0);
    assert_eq!(env.count("verification_tokens").await, 1);
    assert_eq!(env.settled_outbox().await, 0);
    env.teardown().await;
}

#[tokio::test]
async fn links_carry_a_validated_url_and_nothing_else() {
    let env = Env::start().await;
    for bad in [
        "https://example.com/v\r\nBcc: victim@example.org",
        "https://trusted.example@evil.example/",
        "https://example.com/<script>alert(1)</script>",
        "https://example.com/\"><img src=x>",
        "javascript:alert(1)",
        "https://example.com/v?tokenId=attacker",
    ] {
        let body =
            json!({"accessTokenId": ADMIN_TOKEN, "id": ENABLED_PROFILE, "verificationUrl": bad});
        let r = env.call("create-verification-token", body).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.raw);
        assert_eq!(r.body["errorCode"], "PARAM_DESERIALIZATION_ERROR");
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains("verificationUrl"),
            "{bad}: {}",
            r.raw
        );
        let dead = env.wait_dead_letters(1).await;
        assert_eq!(dead.len(), 1, "{bad}");
    }
    assert_eq!(env.count("verification_tokens").await, 0);
    // Crafter's concatenation: `?` or `&`, then tokenId, at the very end.
    for (base, sep) in [
        ("https://example.com/app#/verify", "?"),
        ("https://example.com/v?lang=en#/verify", "&"),
        ("https://example.com/v?", "&"),
    ] {
        let body =
            json!({"accessTokenId": ADMIN_TOKEN, "id": ENABLED_PROFILE, "verificationUrl": base});
        let r = env.call("create-verification-token", body).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        let token = r.body["id"].as_str().unwrap();
        let email = env
            .events(2)
            .await
            .into_iter()
            .find(|e| e.routing_key == "email.requested")
            .unwrap()
            .json();
        assert_eq!(
            email["verificationLink"],
            format!("{base}{sep}tokenId={token}")
        );
    }
    env.teardown().await;
}

#[tokio::test]
async fn a_tenants_link_hosts_bound_where_its_emails_point() {
    let env = Env::start().await;
    env.db
        .execute(
            "UPDATE tenants SET link_hosts = '{example.com,*.example.com}' WHERE name = 'default'",
            &[],
        )
        .await
        .unwrap();
    let with_url = |token: &str, url: &str| json!({"accessTokenId": token, "id": ENABLED_PROFILE, "verificationUrl": url});
    let r = env
        .call(
            "create-verification-token",
            with_url(ADMIN_TOKEN, "https://EVIL.test/v"),
        )
        .await;
    assert_eq!(
        (r.status, r.body.clone()),
        (
            400,
            json!({"errorCode": "PARAM_DESERIALIZATION_ERROR",
                   "message": "verificationUrl host \"evil.test\" is not allowed for tenant \"default\""})
        )
    );
    // A business rejection: answered and acked, not dead-lettered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.dead_letters().await.is_empty());
    // A caller without permission learns nothing about the tenant's hosts.
    let r = env
        .call(
            "create-verification-token",
            with_url(OTHER_TENANT_TOKEN, "https://evil.test/v"),
        )
        .await;
    assert_eq!(r.body["errorCode"], "ACTION_DENIED");
    for ok in ["https://example.com/v", "https://app.Example.com/v"] {
        let r = env
            .call("create-verification-token", with_url(ADMIN_TOKEN, ok))
            .await;
        assert_eq!(r.status, 200, "{ok}: {}", r.raw);
    }
    // The operator's default URL is trusted.
    let r = env
        .call(
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(env.count("verification_tokens").await, 3);
    env.teardown().await;
}

#[tokio::test]
async fn control_characters_are_a_400_at_once() {
    let env = Env::start().await;
    for (kind, body, field) in [
        (
            "create-ticket",
            json!({"accessTokenId": ADMIN_TOKEN, "profileId": "abc\u{0}def"}),
            "profileId",
        ),
        (
            "create-ticket",
            json!({"accessTokenId": "tok\u{1b}[0m", "profileId": ENABLED_PROFILE}),
            "accessTokenId",
        ),
        (
            "create-verification-token",
            json!({"accessTokenId": ADMIN_TOKEN, "id": "p\u{7f}"}),
            "id",
        ),
    ] {
        let r = env.call(kind, body).await;
        assert_eq!(r.status, 400, "{}", r.raw);
        let message = r.body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("\"{field}\"")) && message.contains("control character"),
            "{message}"
        );
        let dead = env.wait_dead_letters(1).await;
        assert_eq!(
            dead[0].header("x-error-code").as_deref(),
            Some("PARAM_DESERIALIZATION_ERROR")
        );
    }
    env.teardown().await;
}

#[tokio::test]
async fn one_email_per_profile_and_purpose_per_cooldown() {
    let mut env = Env::prepare().await;
    env.settings.worker.email_cooldown_secs = 60;
    env.start_worker().await;
    let mut calls = Vec::new();
    for i in 0..30 {
        let mut body = verification(ADMIN_TOKEN, DISABLED_PROFILE);
        if i % 3 == 0 {
            body["purpose"] = "reset-password".into();
        }
        let c = env
            .publish(body.to_string().as_bytes(), vt_with_mid(&format!("e{i}")))
            .await;
        calls.push(c);
    }
    let mut statuses = std::collections::BTreeMap::new();
    for c in &calls {
        let r = env.reply_for(c).await;
        *statuses.entry(r.status).or_insert(0) += 1;
        if r.status == 429 {
            let m = r.body["message"].as_str().unwrap();
            assert!(
                m.starts_with(&format!(
                    "A verification email was requested for profile \"{DISABLED_PROFILE}\" less than 60 s ago; retry in "
                )),
                "{m}"
            );
        }
    }
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([(200, 2), (429, 28)]),
        "one per purpose"
    );
    let emails = env
        .events(4)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .count();
    assert_eq!(emails, 2);
    assert_eq!(env.count("verification_tokens").await, 2);
    assert!(
        env.dead_letters().await.is_empty(),
        "429 is not dead-lettered"
    );
    // Other profiles are not held back; tickets never are.
    let r = env
        .call(
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        )
        .await;
    assert_eq!(r.status, 200);
    env.teardown().await;
}

#[tokio::test]
async fn access_token_ids_are_nowhere_at_rest() {
    let env = Env::start().await;
    let unknown = format!("unknown-{}", Uuid::new_v4());
    env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    env.call(
        "create-verification-token",
        verification(ADMIN_TOKEN, DISABLED_PROFILE),
    )
    .await;
    env.call("create-ticket", ticket(&unknown, ENABLED_PROFILE))
        .await;
    env.call("create-ticket", ticket(ADMIN_TOKEN, "nobody"))
        .await;
    env.settled_outbox().await;
    let tables: Vec<String> = env
        .db
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 9, "{tables:?}");
    for table in tables {
        for secret in [ADMIN_TOKEN, unknown.as_str()] {
            let n: i64 = env
                .db
                .query_one(
                    &format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'"),
                    &[&secret],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "{table} holds an access token ID");
        }
    }
    // A reader finds a token by hashing what it was given.
    let app: String = env
        .db
        .query_one(
            "SELECT application FROM access_tokens WHERE id_sha256 = sha256(convert_to($1, 'UTF8'))",
            &[&ADMIN_TOKEN],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "profile-admin");
    env.teardown().await;
}

#[tokio::test]
async fn dead_letter_listing_masks_access_tokens_unless_asked() {
    let env = Env::start().await;
    env.call_raw(
        format!(r#"{{"accessTokenId":"{ADMIN_TOKEN}","profileId":"p","extra":1}}"#).as_bytes(),
        with_mid("dl-1"),
    )
    .await;
    // Wait for it to be there, then leave it in the queue for the CLI.
    for _ in 0..100 {
        if env
            .queue(&env.settings.broker.dead_letter_queue)
            .await
            .message_count()
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (args, shown) in [
        (&["dead-letters", "list", "--json"][..], false),
        (&["dead-letters", "list"][..], false),
        (
            &["dead-letters", "list", "--json", "--show-secrets"][..],
            true,
        ),
    ] {
        let out = cli(&env, args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.contains(ADMIN_TOKEN), shown, "{args:?}: {text}");
        assert!(text.contains("dl-1"), "{text}");
    }
    // Listing left it where it was.
    let got = env
        .channel
        .basic_get(
            env.settings.broker.dead_letter_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(got.is_some());
    env.teardown().await;
}

/// Headers nested `depth` tables deep, as a publisher may send them.
fn nested_headers(depth: usize) -> FieldTable {
    let mut t = FieldTable::default();
    for _ in 0..depth {
        let mut outer = FieldTable::default();
        outer.insert("n".into(), AMQPValue::FieldTable(t));
        t = outer;
    }
    t
}

#[tokio::test]
async fn headers_nested_thousands_deep_do_not_bring_the_worker_down() {
    // The worker as its own process, so a crash (a stack overflow aborts) shows.
    let env = Env::prepare().await;
    let mut cmd = worker_process(&env);
    cmd.env("RUST_LOG", "info");
    let mut worker = WorkerProcess::start(cmd, None).await;
    // 5,000 levels, and about as deep as one 128 KiB header frame allows.
    for (depth, body) in [
        (5_000, ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string()),
        (18_000, ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string()),
        // Malformed: dead-lettered with its headers copied.
        (5_000, r#"{"accessTokenId":"x"}"#.to_string()),
    ] {
        let correlation = Uuid::new_v4().to_string();
        let props = lapin::BasicProperties::default()
            .with_type("create-ticket".into())
            .with_correlation_id(correlation.as_str().into())
            .with_reply_to(env.reply_queue.as_str().into())
            .with_headers(nested_headers(depth));
        env.publish_as_is(
            &env.settings.broker.command_exchange,
            "create-ticket",
            body.as_bytes(),
            props,
        )
        .await;
        let r = env.reply_for(&correlation).await;
        assert!(matches!(r.status, 200 | 400), "{depth}: {}", r.raw);
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker died on headers {depth} deep: {}",
            worker.log_text()
        );
    }
    // Still serving, and the malformed one is in the dead-letter queue.
    let r = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 200);
    let mut dead = 0;
    for _ in 0..50 {
        dead = env
            .queue(&env.settings.broker.dead_letter_queue)
            .await
            .message_count();
        if dead > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead, 1);
    assert_eq!(env.count("tickets").await, 3);
    signal(&worker, SIGTERM);
    assert!(worker.wait().await.unwrap().success());
    env.teardown().await;
}

#[tokio::test]
async fn bounded_queues_refuse_rather_than_drop_and_a_full_dead_letter_queue_holds_nobody_up() {
    let mut env = Env::prepare_with(|s| {
        s.broker.command_queue_max_length = 5;
        s.broker.dead_letter_queue_max_length = 2;
    })
    .await;
    // No worker yet: past the bound, commands are refused to their publisher (a
    // nack). A quorum queue applies its bound as it learns its length, so the
    // commands go one confirm at a time.
    let mut acked = Vec::new();
    for i in 0..20 {
        let props = lapin::BasicProperties::default()
            .with_type("create-ticket".into())
            .with_correlation_id(format!("q{i}").as_str().into())
            .with_reply_to(env.reply_queue.as_str().into());
        let confirm = env
            .channel
            .basic_publish(
                env.settings.broker.command_exchange.as_str().into(),
                "create-ticket".into(),
                Default::default(),
                // Malformed: each one is dead-lettered.
                br#"{"accessTokenId":"x"}"#,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_ack() {
            acked.push(i);
        }
    }
    assert!(
        (5..=7).contains(&acked.len()),
        "the queue takes its 5 (give or take) and refuses the rest: {acked:?}"
    );
    let depth = env.queue_depth().await as usize;
    assert_eq!(depth, acked.len(), "what was acked is kept");
    env.start_worker().await;
    // All answered, though the dead-letter queue has room for two: the rest
    // wait in the command queue's own dead-lettering, and the worker goes on.
    for i in &acked {
        assert_eq!(env.reply_for(&format!("q{i}")).await.status, 400);
    }
    let r = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 200);
    // A quorum queue applies its bound lazily, so how many of the dead letters
    // it refused (those wait in the command queue's dead-lettering) varies; none
    // is delivered twice and none reaches a consumer again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = env
        .queue(&env.settings.broker.dead_letter_queue)
        .await
        .message_count() as usize;
    assert!(
        (1..=acked.len()).contains(&dead),
        "{dead} of {}",
        acked.len()
    );
    assert_eq!(env.queue_depth().await, 0, "nothing left for consumers");
    env.teardown().await;
}

#[tokio::test]
async fn a_bogus_direct_reply_to_name_costs_the_worker_nothing() {
    let env = Env::start().await;
    let http = env.http().to_string();
    // Allowed by its prefix, but no consumer's. (A bare `amq.rabbitmq.reply-to`
    // is refused by the broker itself unless the publisher consumes from it.)
    for (i, name) in [
        "amq.rabbitmq.reply-to.garbage",
        "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNjI2NDk1OQAAd4cAAAAAZ0nDTA==",
    ]
    .into_iter()
    .enumerate()
    {
        ticket_replying_to(&env, name, &format!("bogus-{i}")).await;
    }
    // Processed, acked, and the worker's session never dropped.
    for _ in 0..20 {
        let r = env
            .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await;
        assert_eq!(r.status, 200);
    }
    let (_, page) = http_get(&http, "/metrics").await.expect("metrics");
    let s = samples(&page);
    assert_eq!(s["profile_worker_reconnects_total"], 0.0, "{page}");
    assert_eq!(
        s["profile_worker_broker_errors_total{kind=\"session\"}"], 0.0,
        "{page}"
    );
    assert_eq!(env.count("tickets").await, 22);
    assert_eq!(env.queue_depth().await, 0);
    env.teardown().await;
}
