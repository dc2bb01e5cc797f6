//! The outbox relay and the expiry sweep, made deterministic: a crash between commit
//! and publish is staged as an outbox row, and the sweep is given a clock.

use profile_worker::store::Store;
use profile_worker_testkit::*;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn relay_republishes_events_left_unconfirmed_by_a_crash() {
    let mut env = Env::prepare().await;
    env.settings.worker.outbox_grace_secs = 1;
    let event_id = Uuid::new_v4();
    // (Rows an earlier version wrote, in another shape: tests/integration/trust.rs.)
    let body = r#"{"tenant":"default","profileId":"p","lastRequestTime":1,"idSha256":"3198614c36cbeb7f819204b251b466c19b7230547acd8a6c37b9afd358718d07"}"#;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // As a worker killed after its commit would leave it: committed, never confirmed.
    env.db
        .execute(
            "INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent, created_at) \
             VALUES ($1, 'crashed-1', 'ticket.created', $2, $3, now() - interval '1 minute')",
            &[&event_id, &body, &traceparent],
        )
        .await
        .unwrap();
    env.start_worker().await;
    let events = env.events(1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].routing_key, "ticket.created");
    assert_eq!(
        events[0].message_id.as_deref(),
        Some(event_id.to_string().as_str())
    );
    assert_eq!(events[0].body, body.as_bytes());
    assert_eq!(
        events[0].header("traceparent").as_deref(),
        Some(traceparent),
        "the relay keeps the event in its command's trace"
    );
    for _ in 0..50 {
        if env.count("outbox").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.count("outbox").await,
        0,
        "relayed events are removed once confirmed"
    );
    env.teardown().await;
}

#[tokio::test]
async fn redelivered_command_resends_its_pending_events() {
    let env = Env::start().await;
    // The same command, published twice with the same message_id.
    let command = verification(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let send = || Send {
        kind: Some("create-verification-token".into()),
        message_id: Some("again-1".into()),
        ..Default::default()
    };
    let r = env.call_raw(command.as_bytes(), send()).await;
    assert_eq!(r.status, 200);
    let first = env.events(2).await;
    assert_eq!(first.len(), 2);
    // Put the email event back as if its confirm had never arrived, then redeliver.
    let email = first
        .iter()
        .find(|e| e.routing_key == "email.requested")
        .unwrap();
    let event_id: Uuid = email.message_id.as_deref().unwrap().parse().unwrap();
    let body = String::from_utf8(email.body.clone()).unwrap();
    let traceparent = email
        .header("traceparent")
        .expect("events carry a traceparent");
    assert_eq!(env.settled_outbox().await, 0);
    env.db
        .execute(
            "INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent) VALUES ($1, 'again-1', 'email.requested', $2, $3)",
            &[&event_id, &body, &traceparent],
        )
        .await
        .unwrap();
    let again = env.call_raw(command.as_bytes(), send()).await;
    assert_eq!(again.raw, r.raw);
    let resent = env.events(1).await;
    assert_eq!(
        resent.len(),
        1,
        "only the unconfirmed event is re-sent: {resent:?}"
    );
    assert_eq!(
        resent[0].message_id, email.message_id,
        "same message_id for the subscriber to dedupe"
    );
    assert_eq!(resent[0].body, email.body);
    assert_eq!(
        resent[0].header("traceparent").as_deref(),
        Some(traceparent.as_str()),
        "a re-sent event stays in the trace of the command that caused it"
    );
    assert_eq!(env.settled_outbox().await, 0);
    assert_eq!(env.count("verification_tokens").await, 1);
    env.teardown().await;
}

#[tokio::test]
async fn sweep_deletes_exactly_the_expired_rows() {
    let env = Env::prepare().await;
    let now: i64 = 1_800_000_000_000;
    let ms = |offset_secs: i64| {
        std::time::UNIX_EPOCH + Duration::from_millis((now - offset_secs * 1000) as u64)
    };
    for (age, n) in [(899, 2), (901, 3)] {
        for _ in 0..n {
            env.db
                .execute(
                    "INSERT INTO tickets (id, tenant, profile_id, last_request_time) VALUES ($1, 'default', 'p', $2)",
                    &[&Uuid::new_v4(), &ms(age)],
                )
                .await
                .unwrap();
        }
    }
    for (age, n) in [(86_399, 4), (86_401, 1)] {
        for _ in 0..n {
            env.db
                .execute(
                    "INSERT INTO verification_tokens (id, tenant, profile_id, \"timestamp\") VALUES ($1, 'default', 'p', $2)",
                    &[&Uuid::new_v4(), &ms(age)],
                )
                .await
                .unwrap();
        }
    }
    // Email claims: one inside the 60 s cooldown, two past it.
    for (profile, purpose, age) in [
        ("p1", "verify-account", 59),
        ("p1", "reset-password", 61),
        ("p2", "verify-account", 600),
    ] {
        env.db
            .execute(
                "INSERT INTO email_cooldowns (profile_id, purpose, requested_at) VALUES ($1, $2, $3)",
                &[&profile, &purpose, &ms(age)],
            )
            .await
            .unwrap();
    }
    // The sweep runs as the worker does: as the runtime role.
    let store = Store::connect(&env.settings.database).unwrap();
    let day = Duration::from_secs(86_400);
    let keep = profile_worker::store::Retention {
        ticket_max_age: Duration::from_secs(900),
        token_max_age: day,
        idempotency: day * 7,
        email_cooldown: Duration::from_secs(60),
    };
    let report = store.sweep(now, keep).await.unwrap();
    assert_eq!((report.tickets, report.verification_tokens), (3, 1));
    assert_eq!(report.email_cooldowns, 2);
    assert_eq!(env.count("tickets").await, 2);
    assert_eq!(env.count("verification_tokens").await, 4);
    assert_eq!(env.count("email_cooldowns").await, 1);
    // Moving the clock on expires the rest.
    let later = store.sweep(now + 86_400_000, keep).await.unwrap();
    assert_eq!((later.tickets, later.verification_tokens), (2, 4));
    assert_eq!(later.email_cooldowns, 1);
    store.close();
    env.teardown().await;
}
