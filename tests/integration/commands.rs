//! CONTRACT §3–§6 against a real broker and database: every rule, the reply and
//! event shapes, idempotency, fire-and-forget, and a burst with correlation.

use profile_worker_testkit::*;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

fn assert_uuid_v4(v: &serde_json::Value) {
    let id: Uuid = v
        .as_str()
        .expect("id is a string")
        .parse()
        .expect("id is a UUID");
    assert_eq!(id.get_version_num(), 4);
}

#[tokio::test]
async fn create_ticket_replies_persists_and_emits_event() {
    let env = Env::start().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let r = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.kind, "create-ticket.reply");
    let keys: Vec<&str> = r
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys.len(), 4, "{}", r.raw);
    assert!(
        r.raw.starts_with(
            r#"{"tenant":"default","profileId":"5925a68def86951f895cf497","lastRequestTime":"#
        ),
        "{}",
        r.raw
    );
    assert_uuid_v4(&r.body["id"]);
    let t = r.body["lastRequestTime"].as_i64().unwrap();
    assert!(t >= before && t < before + 60_000);

    let row = env
        .db
        .query_one(
            "SELECT tenant, profile_id, (extract(epoch FROM last_request_time) * 1000)::bigint FROM tickets WHERE id = $1",
            &[&r.body["id"].as_str().unwrap().parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "default");
    assert_eq!(row.get::<_, String>(1), ENABLED_PROFILE);
    assert_eq!(row.get::<_, i64>(2), t, "stored time equals replied time");

    let events = env.events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].routing_key, "ticket.created");
    assert_eq!(events[0].exchange, env.settings.broker.events_exchange);
    // The reply's fields, the ticket announced by its hash (CONTRACT §5).
    assert_eq!(events[0].json(), announced(&r.body));
    assert!(events[0].message_id.is_some());
    assert_eq!(
        env.settled_outbox().await,
        0,
        "confirmed events leave the outbox"
    );
    env.teardown().await;
}

/// A 200 reply's body as its event announces it: `idSha256` for `id`.
fn announced(reply: &serde_json::Value) -> serde_json::Value {
    let mut event = reply.clone();
    let id = event.as_object_mut().unwrap().remove("id").unwrap();
    event["idSha256"] = json!(profile_worker::contract::message::id_sha256(
        id.as_str().unwrap().parse().unwrap()
    ));
    event
}

#[tokio::test]
async fn create_verification_token_emits_email_requested() {
    let env = Env::start().await;
    let r = env
        .call(
            "create-verification-token",
            json!({ "accessTokenId": ADMIN_TOKEN, "id": DISABLED_PROFILE, "purpose": "reset-password",
                    "verificationUrl": "https://example.com/reset?lang=en" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.kind, "create-verification-token.reply");
    assert_eq!(r.body["tenant"], "sample-tenant");
    assert_eq!(r.body["profileId"], DISABLED_PROFILE);
    assert!(r.body["timestamp"].is_i64());
    assert_uuid_v4(&r.body["id"]);
    let token_id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(env.count("verification_tokens").await, 1);

    let events = env.events(2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    let by_key: HashMap<&str, &Received> =
        events.iter().map(|e| (e.routing_key.as_str(), e)).collect();
    assert_eq!(
        by_key["verification-token.created"].json(),
        announced(&r.body)
    );
    let email = by_key["email.requested"];
    assert_eq!(
        email.exchange, env.settings.broker.email_exchange,
        "the link travels on the email exchange only"
    );
    let body = email.json();
    assert_eq!(body["to"], "john.doe@example.com");
    assert_eq!(body["template"], "reset-password");
    assert_eq!(body["tokenId"], token_id.as_str());
    assert_eq!(body["tenant"], "sample-tenant");
    assert_eq!(body["profileId"], DISABLED_PROFILE);
    assert_eq!(body["timestamp"], r.body["timestamp"]);
    assert_eq!(
        body["verificationLink"],
        format!("https://example.com/reset?lang=en&tokenId={token_id}")
    );
    assert_eq!(
        body["id"].as_str(),
        email.message_id.as_deref(),
        "event id is its message_id"
    );

    // Defaults: purpose verify-account, the configured base URL, joined with '?'.
    let r = env
        .call(
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        )
        .await;
    assert_eq!(r.status, 200);
    let events = env.events(2).await;
    let email = events
        .iter()
        .find(|e| e.routing_key == "email.requested")
        .unwrap()
        .json();
    assert_eq!(email["template"], "verify-account");
    assert_eq!(
        email["verificationLink"],
        format!(
            "https://example.com/verify?tokenId={}",
            r.body["id"].as_str().unwrap()
        )
    );
    env.teardown().await;
}

#[tokio::test]
async fn every_rule_in_order() {
    let env = Env::start().await;
    let cases = [
        (
            "create-ticket",
            ticket("no-such-token", ENABLED_PROFILE),
            403,
            "NO_SUCH_ACCESS_TOKEN_ID",
            Some("No access token found for ID \"no-such-token\""),
        ),
        (
            "create-verification-token",
            verification("no-such-token", "nobody"),
            403,
            "NO_SUCH_ACCESS_TOKEN_ID",
            None,
        ),
        (
            "create-ticket",
            ticket(EXPIRED_TOKEN, "nobody"),
            403,
            "ACCESS_DENIED",
            None,
        ),
        (
            "create-verification-token",
            verification(EXPIRED_TOKEN, ENABLED_PROFILE),
            403,
            "ACCESS_DENIED",
            None,
        ),
        (
            "create-ticket",
            ticket(ADMIN_TOKEN, "nobody"),
            404,
            "NO_SUCH_PROFILE",
            Some("No profile with ID \"nobody\" found"),
        ),
        (
            "create-verification-token",
            verification(ADMIN_TOKEN, "nobody"),
            404,
            "NO_SUCH_PROFILE",
            None,
        ),
        (
            "create-ticket",
            ticket(OTHER_TENANT_TOKEN, ENABLED_PROFILE),
            403,
            "ACTION_DENIED",
            None,
        ),
        (
            "create-verification-token",
            verification(OTHER_TENANT_TOKEN, ENABLED_PROFILE),
            403,
            "ACTION_DENIED",
            None,
        ),
        (
            "create-ticket",
            ticket(PROFILES_ONLY_TOKEN, ENABLED_PROFILE),
            403,
            "ACTION_DENIED",
            None,
        ),
        (
            "create-ticket",
            ticket(ADMIN_TOKEN, DISABLED_PROFILE),
            403,
            "DISABLED_PROFILE",
            None,
        ),
        // The permission check comes before the disabled check.
        (
            "create-ticket",
            ticket(PROFILES_ONLY_TOKEN, DISABLED_PROFILE),
            403,
            "ACTION_DENIED",
            None,
        ),
    ];
    for (kind, body, status, code, message) in cases {
        let r = env.call(kind, body.clone()).await;
        assert_eq!(r.status, status, "{kind} {body}: {}", r.raw);
        assert_eq!(r.body["errorCode"], code, "{kind} {body}: {}", r.raw);
        assert_eq!(r.kind, format!("{kind}.reply"));
        if let Some(m) = message {
            assert_eq!(r.body["message"], m);
        }
        assert_eq!(r.body.as_object().unwrap().len(), 2, "{}", r.raw);
    }
    // Allowed: verification tokens need only MANAGE_PROFILES, and disabled profiles get them.
    assert_eq!(
        env.call(
            "create-verification-token",
            verification(PROFILES_ONLY_TOKEN, DISABLED_PROFILE)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        env.call(
            "create-ticket",
            ticket(OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE)
        )
        .await
        .status,
        200
    );
    assert_eq!(env.count("tickets").await, 1);
    assert_eq!(env.count("verification_tokens").await, 1);
    assert!(
        env.dead_letters().await.is_empty(),
        "business rejections are not dead-lettered"
    );
    env.teardown().await;
}

#[tokio::test]
async fn correlation_id_falls_back_to_message_id() {
    let env = Env::start().await;
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let mid = Uuid::new_v4().to_string();
    // Publish without correlation_id: the harness always sets one, so go lower.
    let props = lapin::BasicProperties::default()
        .with_type("create-ticket".into())
        .with_message_id(mid.as_str().into())
        .with_reply_to(env.reply_queue.as_str().into());
    env.publish_as_is(
        &env.settings.broker.command_exchange,
        "create-ticket",
        body.as_bytes(),
        props,
    )
    .await;
    let r = env.reply_for(&mid).await;
    assert_eq!(r.status, 200);
    env.teardown().await;
}

#[tokio::test]
async fn same_message_id_is_processed_once() {
    let env = Env::start().await;
    let mid = Uuid::new_v4().to_string();
    let body = verification(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let send = |c: &str| Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(mid.clone()),
        correlation_id: Some(c.into()),
        ..Default::default()
    };
    let first = env.call_raw(body.as_bytes(), send("first")).await;
    // The reply leaves at commit, before the events' confirms; a repeat that
    // came before those would (rightly, at least once) publish them again.
    // This test is about repeats after: wait until the outbox is settled.
    assert_eq!(env.settled_outbox().await, 0);
    let second = env.call_raw(body.as_bytes(), send("second")).await;
    assert_eq!(first.status, 200);
    assert_eq!(second.raw, first.raw, "a repeat gets the same reply");
    assert_eq!(second.correlation_id.as_deref(), Some("second"));
    // Several copies in flight at once (publisher retries): still one row.
    let mut cs = Vec::new();
    for i in 0..20 {
        cs.push(
            env.publish(body.as_bytes(), send(&format!("burst-{i}")))
                .await,
        );
    }
    for c in cs {
        assert_eq!(env.reply_for(&c).await.raw, first.raw);
    }
    assert_eq!(env.count("verification_tokens").await, 1);
    assert_eq!(env.count("processed_commands").await, 1);
    let events = env.events(2).await;
    assert_eq!(
        events.len(),
        2,
        "events of a repeat are not re-sent once confirmed: {events:?}"
    );
    // A rejection is remembered too: the same message_id keeps its answer.
    let mid2 = Uuid::new_v4().to_string();
    let nobody = ticket(ADMIN_TOKEN, "not-yet").to_string();
    let s = |c: &str| Send {
        message_id: Some(mid2.clone()),
        correlation_id: Some(c.into()),
        ..Default::default()
    };
    assert_eq!(env.call_raw(nobody.as_bytes(), s("a")).await.status, 404);
    assert_eq!(env.call_raw(nobody.as_bytes(), s("b")).await.status, 404);
    env.teardown().await;
}

#[tokio::test]
async fn fire_and_forget_commits_without_reply() {
    let env = Env::start().await;
    for _ in 0..5 {
        env.publish(
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            Send {
                reply_to: Some(String::new()),
                message_id: Some(Uuid::new_v4().to_string()),
                ..Default::default()
            },
        )
        .await;
    }
    let events = env.events(5).await;
    assert_eq!(events.len(), 5);
    assert_eq!(env.count("tickets").await, 5);
    // Replies would have come to our queue; a marker command proves ordering drained.
    let r = env
        .call("create-ticket", ticket("nope", ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 403);
    env.teardown().await;
}

#[tokio::test]
async fn burst_of_a_thousand_is_answered_with_correct_correlation() {
    let env = Env::start().await;
    let mut expected = HashMap::new();
    for i in 0..1000 {
        let (kind, body, status) = match i % 4 {
            0 => ("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE), 200),
            1 => (
                "create-verification-token",
                verification(ADMIN_TOKEN, DISABLED_PROFILE),
                200,
            ),
            2 => ("create-ticket", ticket(ADMIN_TOKEN, DISABLED_PROFILE), 403),
            _ => (
                "create-ticket",
                ticket(ADMIN_TOKEN, &format!("missing-{i}")),
                404,
            ),
        };
        let c = env.send(kind, &body).await;
        expected.insert(c, (status, body));
    }
    let mut ids = HashSet::new();
    for (c, (status, body)) in &expected {
        let r = env.reply_for(c).await;
        assert_eq!(r.status, *status, "{body}: {}", r.raw);
        if *status == 200 {
            assert!(
                ids.insert(r.body["id"].as_str().unwrap().to_string()),
                "ids are unique"
            );
            let profile = body.get("profileId").or_else(|| body.get("id")).unwrap();
            assert_eq!(&r.body["profileId"], profile);
        } else if *status == 404 {
            assert!(r.body["message"]
                .as_str()
                .unwrap()
                .contains(body["profileId"].as_str().unwrap()));
        }
    }
    assert_eq!(env.count("tickets").await, 250);
    assert_eq!(env.count("verification_tokens").await, 250);
    env.teardown().await;
}

/// `email.requested` carries the profile's `locale` attribute when it is a
/// language tag (the dispatcher picks its templates by it), and nothing when
/// it is not: a dispatcher looks files up by it.
#[tokio::test]
async fn an_email_request_carries_the_profiles_locale_when_it_is_one() {
    let env = Env::start().await;
    for (id, attributes, expected) in [
        ("loc-fr", json!({"locale": "fr-CA"}), Some("fr-CA")),
        ("loc-bad", json!({"locale": "../../etc"}), None),
        ("loc-none", json!({"theme": "dark"}), None),
    ] {
        env.insert_profile(id, "someone@example.com", &attributes)
            .await;
        let r = env
            .call(
                "create-verification-token",
                json!({"accessTokenId": ADMIN_TOKEN, "id": id}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        let email = env
            .events(2)
            .await
            .into_iter()
            .find(|e| e.routing_key == "email.requested")
            .expect("an email request")
            .json();
        assert_eq!(email["locale"].as_str(), expected, "{id}: {email}");
    }
    env.teardown().await;
}
