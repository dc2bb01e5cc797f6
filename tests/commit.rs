//! The one-statement batch commit against real PostgreSQL: the idempotency
//! record decides what is written, including when another transaction committed
//! the same message_id first (two workers, or a publisher's retry racing the
//! original) — a path the end-to-end tests reach only by chance.

mod common;

use common::*;
use profile_worker::domain::{Ticket, VerificationToken};
use profile_worker::store::{NewRecord, OutboxEvent, Store};
use std::collections::HashSet;
use uuid::Uuid;

fn record(message_id: Option<&str>, reply: &str, token: bool) -> NewRecord {
    let id = Uuid::new_v4();
    NewRecord {
        message_id: message_id.map(str::to_string),
        command: if token {
            "create-verification-token"
        } else {
            "create-ticket"
        },
        status: 200,
        reply: reply.to_string(),
        ticket: (!token).then(|| Ticket {
            id,
            tenant: "default".into(),
            profile_id: ENABLED_PROFILE.into(),
            last_request_time: 1_700_000_000_000,
        }),
        token: token.then(|| VerificationToken {
            id,
            tenant: "default".into(),
            profile_id: ENABLED_PROFILE.into(),
            timestamp: 1_700_000_000_000,
        }),
        events: vec![OutboxEvent {
            event_id: Uuid::new_v4(),
            message_id: message_id.map(str::to_string),
            routing_key: "ticket.created".into(),
            body: "{}".into(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        }],
    }
}

#[tokio::test]
async fn a_message_id_committed_first_elsewhere_writes_nothing_the_second_time() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let mut first = store.batch().await.unwrap();
    let lost = first
        .commit(&[record(Some("m1"), "first", false), record(None, "-", true)])
        .await
        .unwrap();
    assert!(lost.is_empty());

    let mut second = store.batch().await.unwrap();
    let lost = second
        .commit(&[
            record(Some("m2"), "m2", true),
            record(Some("m1"), "second", false),
            record(None, "-", false),
        ])
        .await
        .unwrap();
    assert_eq!(lost, HashSet::from([1]), "only m1 lost");
    // m1's second ticket and event are not written; m2 and the unkeyed ones are.
    assert_eq!(env.count("tickets").await, 2);
    assert_eq!(env.count("verification_tokens").await, 2);
    assert_eq!(env.count("processed_commands").await, 2);
    assert_eq!(env.count("outbox").await, 4);
    let stored = second.stored_replies(&["m1"]).await.unwrap();
    assert_eq!(stored["m1"].reply, "first", "the winner's reply is kept");
    drop((first, second));
    store.close();
    env.teardown().await;
}

#[tokio::test]
async fn confirmed_events_are_deleted_by_the_next_commit() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let r = record(Some("m1"), "r", true);
    let event = r.events[0].event_id;
    store.batch().await.unwrap().commit(&[r]).await.unwrap();
    assert_eq!(env.count("outbox").await, 1);
    store.forget_outbox([event]);
    // Until then, a redelivery does not treat it as pending.
    let loaded = store
        .batch()
        .await
        .unwrap()
        .load(&[], &[], &["m1"])
        .await
        .unwrap();
    assert!(loaded.processed["m1"].pending_events.is_empty());
    store
        .batch()
        .await
        .unwrap()
        .commit(&[record(Some("m2"), "r", false)])
        .await
        .unwrap();
    assert_eq!(env.count("outbox").await, 1, "m1's event gone, m2's in");
    store.close();
    env.teardown().await;
}

#[tokio::test]
async fn batch_lookups_take_their_indexes_even_on_small_analyzed_tables() {
    // A new database, analyzed (as autovacuum soon does): the statistics say the
    // tables are tiny and the idempotency records and the outbox empty. A plan
    // made now and cached on the connection must not be a sequential scan, which
    // would then read the whole table on every batch as it grows.
    let env = Env::prepare().await;
    env.db.batch_execute("ANALYZE").await.unwrap();
    let store = Store::connect(&env.settings.database).unwrap();
    let batch = store.batch().await.unwrap();
    let plans = batch.lookup_plans().await.unwrap();
    assert_eq!(plans.len(), 3);
    for (plan, index) in plans.iter().zip([
        "access_tokens_pkey",
        "profiles_pkey",
        "processed_commands_pkey",
    ]) {
        assert!(plan.contains(index), "not through {index}:\n{plan}");
        assert!(!plan.contains("Seq Scan"), "a sequential scan:\n{plan}");
    }
    // The earlier replies' pending events: through the outbox's message_id index.
    assert!(plans[2].contains("outbox_message_id"), "{}", plans[2]);
    drop(batch);
    env.teardown().await;
}
