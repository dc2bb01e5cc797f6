//! The one-statement batch commit against real PostgreSQL: the idempotency
//! record decides what is written, including when another transaction committed
//! the same message_id first (two workers, or a publisher's retry racing the
//! original) — a path the end-to-end tests reach only by chance.

use profile_worker::contract::Reply;
use profile_worker::domain::{Ticket, VerificationToken};
// The port's `stored_replies`, as the pipeline asks for a lost race's replies.
use profile_worker::pipeline::ports::StoreBatch;
use profile_worker::records::{Created, EmailClaim, NewRecord, OutboxEvent, Versions};
use profile_worker::store::Store;
use profile_worker_testkit::*;
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

const COOLDOWN: Duration = Duration::from_secs(60);

fn record(message_id: Option<&str>, reply: &str, token: bool) -> NewRecord {
    let id = Uuid::new_v4();
    NewRecord {
        message_id: message_id.map(str::to_string),
        command: if token {
            "create-verification-token"
        } else {
            "create-ticket"
        },
        fingerprint: [7; 32],
        reply: Reply {
            status: 200,
            body: reply.to_string(),
        },
        email: None,
        created: if token {
            Created::VerificationToken(VerificationToken {
                id,
                tenant: "default".into(),
                profile_id: ENABLED_PROFILE.into(),
                timestamp: 1_700_000_000_000,
            })
        } else {
            Created::Ticket(Ticket {
                id,
                tenant: "default".into(),
                profile_id: ENABLED_PROFILE.into(),
                last_request_time: 1_700_000_000_000,
            })
        },
        events: vec![OutboxEvent {
            event_id: Uuid::new_v4(),
            message_id: message_id.map(str::to_string),
            routing_key: "ticket.created".into(),
            body: "{}".into(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        }],
    }
}

#[tokio::test]
async fn a_message_id_committed_first_elsewhere_writes_nothing_the_second_time() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let mut first = store.batch().await.unwrap();
    let lost = first
        .commit(
            &[record(Some("m1"), "first", false), record(None, "-", true)],
            &Versions::default(),
            &[],
            COOLDOWN,
        )
        .await
        .unwrap();
    assert!(lost.is_empty());

    let mut second = store.batch().await.unwrap();
    let lost = second
        .commit(
            &[
                record(Some("m2"), "m2", true),
                record(Some("m1"), "second", false),
                record(None, "-", false),
            ],
            &Versions::default(),
            &[],
            COOLDOWN,
        )
        .await
        .unwrap();
    assert_eq!(lost, HashSet::from([1]), "only m1 lost");
    // m1's second ticket and event are not written; m2 and the unkeyed ones are.
    assert_eq!(env.count("tickets").await, 2);
    assert_eq!(env.count("verification_tokens").await, 2);
    assert_eq!(env.count("processed_commands").await, 2);
    assert_eq!(env.count("outbox").await, 4);
    let stored = second.stored_replies(&["m1"]).await.unwrap();
    assert_eq!(
        stored["m1"].reply.body, "first",
        "the winner's reply is kept"
    );
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
    store
        .batch()
        .await
        .unwrap()
        .commit(&[r], &Versions::default(), &[], COOLDOWN)
        .await
        .unwrap();
    assert_eq!(env.count("outbox").await, 1);
    // Until a commit deletes it, a redelivery's load still sees its row (the
    // pipeline knows it was confirmed: pipeline::outbox::ConfirmedEvents).
    let loaded = store
        .batch()
        .await
        .unwrap()
        .load(&[], &[], &["m1"])
        .await
        .unwrap();
    assert_eq!(loaded.processed["m1"].pending_events.len(), 1);
    store
        .batch()
        .await
        .unwrap()
        .commit(
            &[record(Some("m2"), "r", false)],
            &Versions::default(),
            &[event],
            COOLDOWN,
        )
        .await
        .unwrap();
    assert_eq!(env.count("outbox").await, 1, "m1's event gone, m2's in");
    store.close();
    env.teardown().await;
}

#[tokio::test]
async fn one_load_returns_tokens_profiles_and_earlier_replies_with_pending_events_in_written_order()
{
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    store
        .batch()
        .await
        .unwrap()
        .commit(
            &[
                record(Some("m1"), "r1", true),
                record(Some("m2"), "r2", false),
            ],
            &Versions::default(),
            &[],
            COOLDOWN,
        )
        .await
        .unwrap();
    // m1 also has two later events, inserted (so stored, and read back through
    // the index) in neither the order of their times nor that of their ids.
    let (later, latest) = (Uuid::from_u128(2), Uuid::from_u128(1));
    for (id, key, at) in [
        (latest, "email.requested", "now() + interval '2 s'"),
        (
            later,
            "verification-token.created",
            "now() + interval '1 s'",
        ),
    ] {
        env.db
            .execute(
                &format!("INSERT INTO outbox (event_id, message_id, routing_key, body, created_at) VALUES ($1, 'm1', $2, '{{}}', {at})"),
                &[&id, &key],
            )
            .await
            .unwrap();
    }
    let loaded = store
        .batch()
        .await
        .unwrap()
        .load(
            &[ADMIN_TOKEN, EXPIRED_TOKEN, "no-such-token"],
            &[ENABLED_PROFILE, DISABLED_PROFILE, "no-such-profile"],
            &["m1", "m2", "m3"],
        )
        .await
        .unwrap();
    let mut tokens: Vec<&str> = loaded.tokens.keys().map(String::as_str).collect();
    tokens.sort();
    assert_eq!(tokens, [ADMIN_TOKEN, EXPIRED_TOKEN]);
    assert!(loaded.tokens[EXPIRED_TOKEN].expires_on.is_some());
    assert!(loaded.tokens[ADMIN_TOKEN].expires_on.is_none());
    assert!(!loaded.tokens[ADMIN_TOKEN].tenant_permissions.is_empty());
    assert_eq!(loaded.profiles.len(), 2);
    let disabled = &loaded.profiles[DISABLED_PROFILE];
    assert_eq!(
        (
            disabled.tenant.as_str(),
            disabled.email.as_str(),
            disabled.enabled
        ),
        ("sample-tenant", "john.doe@example.com", false)
    );
    assert!(loaded.profiles[ENABLED_PROFILE].enabled);
    assert_eq!(loaded.processed.len(), 2, "m3 was never processed");
    let m1 = &loaded.processed["m1"];
    assert_eq!((m1.reply.status, m1.reply.body.as_str()), (200, "r1"));
    let order: Vec<&str> = m1
        .pending_events
        .iter()
        .map(|e| e.routing_key.as_str())
        .collect();
    assert_eq!(
        order,
        [
            "ticket.created",
            "verification-token.created",
            "email.requested"
        ],
        "re-published in the order they were written"
    );
    assert_eq!(loaded.processed["m2"].pending_events.len(), 1);
    // An event re-published from the outbox keeps its whole trace context.
    let e = &loaded.processed["m2"].pending_events[0];
    assert_eq!(
        e.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(e.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    store.close();
    env.teardown().await;
}

#[tokio::test]
async fn batch_lookups_take_their_indexes_even_on_small_analyzed_tables() {
    // A new database, analyzed (as autovacuum soon does): the statistics say the
    // tables are tiny and the idempotency records and the outbox empty. A plan
    // made now and cached on the connection must not be a sequential scan, which
    // would then read the whole table on every batch as it grows. Read from the
    // server's own counters, around a real load through the worker's pool.
    let env = Env::prepare().await;
    env.db.batch_execute("ANALYZE").await.unwrap();
    let tables = [
        "access_tokens",
        "profiles",
        "tenants",
        "processed_commands",
        "outbox",
        "email_cooldowns",
    ];
    let scans = || async {
        let rows = env
            .db
            .query(
                "SELECT relname::text, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables \
                 WHERE relname = ANY($1)",
                &[&&tables[..]],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (r.get::<_, i64>(1), r.get::<_, i64>(2)),
                )
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    let before = scans().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let batch = store.batch().await.unwrap();
    batch
        .load(&["some token"], &[ENABLED_PROFILE], &["m1"])
        .await
        .unwrap();
    drop(batch);
    // A backend reports its counters when idle, within about a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = scans().await;
        if tables.iter().all(|t| after[*t].1 > before[*t].1) || std::time::Instant::now() > deadline
        {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for t in tables {
        assert!(
            after[t].1 > before[t].1,
            "{t} not read through an index: {before:?} → {after:?}"
        );
        assert_eq!(
            after[t].0, before[t].0,
            "{t} scanned sequentially: {before:?} → {after:?}"
        );
    }
    store.close();
    env.teardown().await;
}

/// A batch may be decided on rows an earlier batch read (the worker's known
/// rows): the commit writes nothing if one of them is no longer the version
/// it was decided on, whichever table it is in.
#[tokio::test]
async fn a_commit_decided_on_a_row_that_changed_since_writes_nothing() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let read = || async {
        store
            .batch()
            .await
            .unwrap()
            .load(&[ADMIN_TOKEN], &[ENABLED_PROFILE], &[])
            .await
            .unwrap()
            .versions
    };
    let commit = |mid: &'static str, versions: Versions| {
        let store = &store;
        async move {
            store
                .batch()
                .await
                .unwrap()
                .commit(&[record(Some(mid), "r", false)], &versions, &[], COOLDOWN)
                .await
        }
    };
    let versions = read().await;
    assert_eq!(versions.tokens.len(), 1);
    assert_eq!(versions.profiles[ENABLED_PROFILE].tenant, "default");
    // Unchanged: written, however often it is checked.
    commit("m1", versions.clone()).await.unwrap();
    commit("m2", versions.clone()).await.unwrap();
    assert_eq!(env.count("processed_commands").await, 2);

    let changes = [
        // Any write makes a new version, even one that changes no value.
        "UPDATE profiles SET enabled = enabled WHERE id = '5925a68def86951f895cf497'",
        "UPDATE tenants SET verify_new_profiles = verify_new_profiles WHERE name = 'default'",
        // Revoked: no row at all.
        "DELETE FROM access_tokens WHERE id_sha256 = sha256(convert_to('3b0bd9b6-1c0f-4d37-9b49-3d7c8f1e2a10', 'UTF8'))",
    ];
    for (n, change) in changes.into_iter().enumerate() {
        let versions = read().await;
        let before = (
            env.count("processed_commands").await,
            env.count("tickets").await,
        );
        env.db.batch_execute(change).await.unwrap();
        let e = commit("stale", versions).await.unwrap_err();
        assert!(
            e.is_rows_changed() && e.is_transient(),
            "after {change}: {e:?}"
        );
        let after = (
            env.count("processed_commands").await,
            env.count("tickets").await,
        );
        assert_eq!(after, before, "nothing written after {change}");
        if n < 2 {
            // Read again, it is written.
            commit(["m3", "m4"][n], read().await).await.unwrap();
        }
    }
    store.close();
    env.teardown().await;
}

/// Row versions are transaction IDs, which mean something on the server that
/// wrote them only (issue 31): versions read on another server (a failover to
/// an asynchronous standby, a restore) fail the commit like changed rows, even
/// when every xmin happens to match.
#[tokio::test]
async fn versions_read_on_another_server_are_no_evidence_here() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let batch = || async { store.batch().await.unwrap() };
    let versions = batch()
        .await
        .load(&[ADMIN_TOKEN], &[ENABLED_PROFILE], &[])
        .await
        .unwrap()
        .versions;
    let started: i64 = env
        .db
        .query_one(
            "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions.server, Some(started), "the load says which server");
    let mut elsewhere = versions.clone();
    elsewhere.server = Some(started - 1);
    let e = batch()
        .await
        .commit(&[record(Some("m1"), "r", false)], &elsewhere, &[], COOLDOWN)
        .await
        .unwrap_err();
    assert!(e.is_rows_changed() && e.is_transient(), "{e:?}");
    assert_eq!(env.count("processed_commands").await, 0, "nothing written");
    // Read on this server, the same versions commit.
    batch()
        .await
        .commit(&[record(Some("m1"), "r", false)], &versions, &[], COOLDOWN)
        .await
        .unwrap();
    assert_eq!(env.count("processed_commands").await, 1);
    store.close();
    env.teardown().await;
}

#[tokio::test]
async fn an_email_claim_another_batch_took_first_fails_the_commit_as_transient() {
    let env = Env::prepare().await;
    let store = Store::connect(&env.settings.database).unwrap();
    let claim = |mid: &str, at_ms: i64| {
        let mut r = record(Some(mid), "r", true);
        r.email = Some(EmailClaim {
            profile_id: ENABLED_PROFILE.into(),
            purpose: "verify-account",
            at_ms,
        });
        r
    };
    let now = 1_700_000_000_000;
    assert!(store
        .batch()
        .await
        .unwrap()
        .commit(&[claim("a", now)], &Versions::default(), &[], COOLDOWN)
        .await
        .unwrap()
        .is_empty());
    // A second claim inside the cooldown (a batch that loaded before the first
    // committed): nothing of it is written, and the error says retry.
    let e = store
        .batch()
        .await
        .unwrap()
        .commit(
            &[claim("b", now + 1_000), record(Some("c"), "r", false)],
            &Versions::default(),
            &[],
            COOLDOWN,
        )
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(
        env.count("processed_commands").await,
        1,
        "b and c rolled back"
    );
    assert_eq!(env.count("tickets").await, 0);
    // A whole cooldown later the claim is taken.
    assert!(store
        .batch()
        .await
        .unwrap()
        .commit(
            &[claim("d", now + 60_000)],
            &Versions::default(),
            &[],
            COOLDOWN
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.count("verification_tokens").await, 2);
    let at: i64 = env
        .db
        .query_one(
            "SELECT (extract(epoch FROM requested_at) * 1000)::bigint FROM email_cooldowns",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(at, now + 60_000);
    store.close();
    env.teardown().await;
}

/// A server that answers read-only (a standby during failover, or a primary an
/// operator set read-only) holds commands as a database outage does, never
/// fails them; and the worker drops such connections itself, so once the
/// server takes writes again the commands go through on fresh ones.
#[tokio::test]
async fn a_read_only_server_holds_commands_and_its_connections_are_replaced() {
    let env = Env::start().await;
    let ok = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.raw);
    let db = &env.db_name;
    env.db
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    // The worker's sessions end; the ones it opens next are read-only.
    env.db
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND usename = $2",
            &[db, &runtime_role()],
        )
        .await
        .unwrap();
    let held = env
        .send("create-ticket", &ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.count("processed_commands").await, 1, "nothing written");
    assert!(env.dead_letters().await.is_empty(), "nothing dead-lettered");
    // Writable again for new sessions only: the worker's read-only sessions
    // stay read-only until it replaces them.
    env.db
        .batch_execute(&format!(
            "ALTER DATABASE {db} RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    let reply = env.reply_for(&held).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(env.count("processed_commands").await, 2);
    env.teardown().await;
}
