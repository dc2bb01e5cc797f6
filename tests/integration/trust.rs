//! The events' trust boundary (CONTRACT §1, §5), tried from outside as the
//! broker users the project's set-up makes (scripts/test.sh): what a reader of
//! the events exchange can see and do, what the email dispatcher may do, and
//! what becomes of events an earlier version left in the outbox.

use futures_util::StreamExt;
use lapin::options::*;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use profile_worker::contract::message::id_sha256;
use profile_worker_testkit::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect as {}: {e}", url.split('@').next().unwrap_or("")))
}

/// Whether the broker refused an operation for the user's permissions.
fn access_refused<T: std::fmt::Debug>(r: Result<T, lapin::Error>) -> bool {
    match r {
        Err(e) => matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))),
        Ok(v) => panic!("the broker allowed it: {v:?}"),
    }
}

/// Runs `op` on a fresh channel of `conn` and says whether the broker refused
/// it with ACCESS_REFUSED (a refusal closes the channel, so one per attempt).
async fn refused<F, Fut, T>(conn: &Connection, op: F) -> bool
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, lapin::Error>>,
    T: std::fmt::Debug,
{
    let ch = conn.create_channel().await.unwrap();
    access_refused(op(ch).await)
}

/// Whether the broker refuses this user a confirmed publish to `exchange`.
async fn publish_refused(conn: &Connection, exchange: &str, key: &str) -> bool {
    let (x, k) = (exchange.to_string(), key.to_string());
    refused(conn, |c| async move {
        c.confirm_select(ConfirmSelectOptions::default()).await?;
        c.basic_publish(
            x.as_str().into(),
            k.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await
    })
    .await
}

/// A message as a reader gets it, with all its properties (a `Received` keeps
/// only some).
struct Seen {
    routing_key: String,
    properties: BasicProperties,
    data: Vec<u8>,
}

impl Seen {
    fn from(d: &lapin::message::Delivery) -> Self {
        Seen {
            routing_key: d.routing_key.as_str().to_string(),
            properties: d.properties.clone(),
            data: d.data.clone(),
        }
    }
}

/// A server-named queue of the reader's, and everything that reaches it.
async fn reader_queue(ch: &Channel) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let name = server_named_queue(ch)
        .await
        .expect("a reader may declare its own server-named queue");
    let (tx, rx) = mpsc::unbounded_channel();
    consume_into(ch, &name, "", Seen::from, tx).await;
    (name, rx)
}

/// Every byte sequence of a message a reader can see: body, properties, and
/// every header's name and value (nested tables and arrays included).
fn visible_parts(d: &Seen) -> Vec<Vec<u8>> {
    fn value(v: &AMQPValue, out: &mut Vec<Vec<u8>>) {
        match v {
            AMQPValue::LongString(s) => out.push(s.as_bytes().to_vec()),
            AMQPValue::ShortString(s) => out.push(s.as_str().as_bytes().to_vec()),
            AMQPValue::ByteArray(b) => out.push(b.as_slice().to_vec()),
            AMQPValue::FieldTable(t) => table(t, out),
            AMQPValue::FieldArray(a) => a.as_slice().iter().for_each(|v| value(v, out)),
            other => out.push(format!("{other:?}").into_bytes()),
        }
    }
    fn table(t: &FieldTable, out: &mut Vec<Vec<u8>>) {
        for (k, v) in t.inner() {
            out.push(k.as_str().as_bytes().to_vec());
            value(v, out);
        }
    }
    let p = &d.properties;
    let mut out = vec![d.data.clone(), d.routing_key.as_bytes().to_vec()];
    for s in [
        p.message_id(),
        p.correlation_id(),
        p.kind(),
        p.reply_to(),
        p.app_id(),
        p.user_id(),
        p.cluster_id(),
        p.content_type(),
        p.content_encoding(),
        p.expiration(),
    ]
    .into_iter()
    .flatten()
    {
        out.push(s.as_str().as_bytes().to_vec());
    }
    if let Some(h) = p.headers() {
        table(h, &mut out);
    }
    out
}

/// The forms a secret could take in a message: as stored, without hyphens,
/// upper case.
fn forms(secret: &str) -> Vec<String> {
    let mut f = vec![secret.to_string(), secret.to_uppercase()];
    if secret.contains('-') {
        f.push(secret.replace('-', ""));
        f.push(secret.replace('-', "").to_uppercase());
    }
    f
}

#[tokio::test]
async fn no_event_on_the_events_exchange_carries_a_secret() {
    let env = Env::start().await;
    let b = env.settings.broker.clone();
    // A subscriber as the project sets one up: every event, '#'.
    let reader = connect(&reader_amqp_url()).await;
    let reader_ch = reader.create_channel().await.unwrap();
    let (queue, mut seen) = reader_queue(&reader_ch).await;
    reader_ch
        .queue_bind(
            queue.as_str().into(),
            b.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("a reader may bind to the events exchange");

    // The full command mix: created, repeated, rejected, malformed, with and
    // without reply_to, both purposes, a caller's own link.
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(
            env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
                .await,
        );
        replies.push(
            env.call(
                "create-verification-token",
                verification(ADMIN_TOKEN, DISABLED_PROFILE),
            )
            .await,
        );
        let mut reset = verification(ADMIN_TOKEN, ENABLED_PROFILE);
        reset["purpose"] = json!("reset-password");
        reset["verificationUrl"] = json!(format!("https://example.com/reset?x={i}#/r"));
        replies.push(env.call("create-verification-token", reset).await);
    }
    for kind in ["create-ticket", "create-verification-token"] {
        let body = if kind == "create-ticket" {
            ticket(ADMIN_TOKEN, ENABLED_PROFILE)
        } else {
            verification(ADMIN_TOKEN, ENABLED_PROFILE)
        };
        let send = || Send {
            kind: Some(kind.into()),
            message_id: Some(format!("repeat-{kind}")),
            ..Default::default()
        };
        let first = env.call_raw(body.to_string().as_bytes(), send()).await;
        let again = env.call_raw(body.to_string().as_bytes(), send()).await;
        assert_eq!(first.raw, again.raw);
        replies.push(first);
        // Fire-and-forget: no reply, its IDs are read from the tables below.
        env.publish(
            body.to_string().as_bytes(),
            Send {
                kind: Some(kind.into()),
                reply_to: Some(String::new()),
                ..Default::default()
            },
        )
        .await;
    }
    for (kind, body) in [
        ("create-ticket", ticket(ADMIN_TOKEN, DISABLED_PROFILE)),
        ("create-ticket", ticket(EXPIRED_TOKEN, ENABLED_PROFILE)),
        ("create-ticket", ticket("no-such-token", ENABLED_PROFILE)),
        ("create-ticket", ticket(OTHER_TENANT_TOKEN, ENABLED_PROFILE)),
        (
            "create-ticket",
            ticket(PROFILES_ONLY_TOKEN, ENABLED_PROFILE),
        ),
        (
            "create-verification-token",
            verification(ADMIN_TOKEN, "no-such-profile"),
        ),
        ("create-ticket", json!({ "accessTokenId": ADMIN_TOKEN })),
    ] {
        let r = env.call(kind, body).await;
        assert!(r.status >= 400, "{}", r.raw);
    }
    // 4 + 1 repeated + 1 fire-and-forget tickets; 8 + 1 + 1 tokens.
    let ids = |table: &'static str| {
        let db = &env.db;
        async move {
            db.query(&format!("SELECT id::text FROM {table}"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let (mut tickets, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        (tickets, tokens) = (ids("tickets").await, ids("verification_tokens").await);
        if (tickets.len(), tokens.len()) == (6, 10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((tickets.len(), tokens.len()), (6, 10), "the mix's rows");
    for r in &replies {
        if r.status == 200 {
            let id = r.body["id"].as_str().unwrap();
            assert!(tickets.iter().chain(&tokens).any(|t| t == id));
        }
    }

    // The dispatcher's queue has each token's email, with its link.
    let mut links = Vec::new();
    let mut emailed = HashSet::new();
    for e in env.events(2 * (tickets.len() + tokens.len())).await {
        if e.routing_key == "email.requested" {
            assert_eq!(
                e.exchange, b.email_exchange,
                "email.requested only on the email exchange"
            );
            let body = e.json();
            emailed.insert(body["tokenId"].as_str().unwrap().to_string());
            links.push(body["verificationLink"].as_str().unwrap().to_string());
        } else {
            assert_eq!(e.exchange, b.events_exchange, "{}", e.routing_key);
        }
    }
    assert_eq!(emailed, tokens.iter().cloned().collect::<HashSet<_>>());

    // What the reader got: one announcement per row (at least once), by hash.
    let mut public = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let want = tickets.len() + tokens.len();
    while public.len() < want {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(d)) => public.push(d),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(d) = seen.try_recv() {
        public.push(d);
    }
    let hashes: HashMap<String, &str> = tickets
        .iter()
        .map(|t| (id_sha256(t.parse().unwrap()), "ticket.created"))
        .chain(
            tokens
                .iter()
                .map(|t| (id_sha256(t.parse().unwrap()), "verification-token.created")),
        )
        .collect();
    let mut announced = HashSet::new();
    for d in &public {
        let key = d.routing_key.as_str();
        assert_ne!(
            key, "email.requested",
            "no email request on the events exchange"
        );
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        let hash = body["idSha256"].as_str().expect("idSha256");
        assert_eq!(hashes.get(hash).copied(), Some(key), "{body}");
        assert!(body.get("id").is_none(), "{body}");
        announced.insert(hash.to_string());
    }
    assert_eq!(
        announced.len(),
        want,
        "every row announced on the events exchange"
    );

    // No byte of any of it holds a ticket ID, a token ID, a link or an access token ID.
    let secrets: Vec<String> = tickets
        .iter()
        .chain(&tokens)
        .chain(&links)
        .flat_map(|s| forms(s))
        .chain(
            [
                ADMIN_TOKEN,
                EXPIRED_TOKEN,
                OTHER_TENANT_TOKEN,
                PROFILES_ONLY_TOKEN,
            ]
            .iter()
            .map(|s| s.to_string()),
        )
        .collect();
    let mut scanned = 0;
    for d in &public {
        for part in visible_parts(d) {
            scanned += part.len();
            for s in &secrets {
                assert!(
                    !part.windows(s.len()).any(|w| w == s.as_bytes()),
                    "a secret ({s}) on the events exchange, in {:?}",
                    String::from_utf8_lossy(&part)
                );
            }
        }
    }
    assert!(
        scanned > 100 * want,
        "the scan read the events ({scanned} bytes)"
    );
    let _ = reader.close(200, "bye".into()).await;
    env.teardown().await;
}

#[tokio::test]
async fn an_events_reader_can_neither_read_emails_nor_forge_events() {
    let env = Env::prepare().await;
    let b = env.settings.broker.clone();
    let reader = connect(&reader_amqp_url()).await;
    let ch = reader.create_channel().await.unwrap();
    let (queue, _seen) = reader_queue(&ch).await;
    ch.queue_bind(
        queue.as_str().into(),
        b.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("binding to the events exchange is what a reader is for");
    // Binding to the email exchange needs read on it: refused, whatever the key.
    for key in ["email.requested", "#", ""] {
        let (q, x) = (queue.clone(), b.email_exchange.clone());
        assert!(
            refused(&reader, |c| async move {
                c.queue_bind(
                    q.as_str().into(),
                    x.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
            })
            .await,
            "a reader bound its queue to {} with {key:?}",
            b.email_exchange
        );
    }
    // Nor may it consume the dispatcher's queue or its dead letters, or the commands.
    for q in [
        b.email_queue.clone(),
        b.email_dead_letter_queue(),
        b.command_queue.clone(),
        b.dead_letter_queue.clone(),
    ] {
        let name = q.clone();
        assert!(
            refused(&reader, |c| async move {
                c.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
            })
            .await,
            "a reader consumed {name}"
        );
    }
    // Nor publish an event of its own making, on either exchange.
    for x in [b.events_exchange.clone(), b.email_exchange.clone()] {
        assert!(
            publish_refused(&reader, &x, "ticket.created").await,
            "a reader published to {x}"
        );
    }
    let _ = reader.close(200, "bye".into()).await;
    env.teardown().await;
}

#[tokio::test]
async fn the_dispatcher_may_consume_its_queue_and_dead_letter_and_nothing_else() {
    let mut env = Env::prepare().await;
    env.release_email_queue().await;
    env.start_worker().await;
    let b = env.settings.broker.clone();
    let r = env
        .call(
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);

    let dispatcher = connect(&dispatcher_amqp_url()).await;
    let ch = dispatcher.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            b.email_queue.as_str().into(),
            "dispatcher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the dispatcher consumes its queue");
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("an email request within 10 s")
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["tokenId"], r.body["id"]);
    assert_eq!(body["to"], "jane@example.com");
    d.ack(BasicAckOptions::default())
        .await
        .expect("and acks it");

    // Everything else is refused: other queues, declaring, binding, publishing.
    for q in [
        b.command_queue.clone(),
        b.dead_letter_queue.clone(),
        b.email_dead_letter_queue(),
    ] {
        let name = q.clone();
        assert!(
            refused(&dispatcher, |c| async move {
                c.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
            })
            .await,
            "the dispatcher consumed {name}"
        );
    }
    assert!(
        refused(&dispatcher, |c| async move {
            c.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        })
        .await,
        "the dispatcher declared a queue"
    );
    let (q, x) = (b.email_queue.clone(), b.events_exchange.clone());
    assert!(
        refused(&dispatcher, |c| async move {
            c.queue_bind(
                q.as_str().into(),
                x.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await,
        "the dispatcher bound its queue elsewhere"
    );
    for (x, key) in [
        (b.email_exchange.clone(), "email.requested".to_string()),
        (String::new(), b.email_queue.clone()),
        (b.command_exchange.clone(), "create-ticket".to_string()),
        (b.events_exchange.clone(), "ticket.created".to_string()),
        (b.dead_letter_exchange.clone(), "create-ticket".to_string()),
    ] {
        assert!(
            publish_refused(&dispatcher, &x, &key).await,
            "the dispatcher published to {x:?}"
        );
    }
    // Its own dead letters (an email it gives up on, with the reason) it may write.
    let ch = dispatcher.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            b.email_dead_letter_exchange().as_str().into(),
            "email.requested".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .expect("the dispatcher may dead-letter")
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = dispatcher.close(200, "bye".into()).await;
    env.teardown().await;
}

/// As an earlier version left them: `ticket.created` and
/// `verification-token.created` with the whole ID, committed, never confirmed.
async fn old_outbox_rows(env: &Env, tickets: usize, emails: usize) -> (Vec<Uuid>, Vec<Uuid>) {
    let mut ticket_ids = Vec::new();
    let mut token_ids = Vec::new();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for _ in 0..tickets {
        let id = Uuid::new_v4();
        let body = format!(
            r#"{{"tenant":"default","profileId":"{ENABLED_PROFILE}","lastRequestTime":1495660441508,"id":"{id}"}}"#
        );
        ticket_ids.push(id);
        insert_old(env, id, "ticket.created", &body, traceparent).await;
    }
    for _ in 0..emails {
        let id = Uuid::new_v4();
        let token = format!(
            r#"{{"tenant":"sample-tenant","profileId":"{DISABLED_PROFILE}","timestamp":1495746285875,"id":"{id}"}}"#
        );
        insert_old(env, id, "verification-token.created", &token, traceparent).await;
        let email_id = profile_worker::contract::message::event_message_id("email.requested", id);
        let email = json!({ "id": email_id, "tenant": "sample-tenant", "profileId": DISABLED_PROFILE,
            "to": "john.doe@example.com", "template": "verify-account", "tokenId": id,
            "verificationLink": format!("https://example.com/verify?tokenId={id}"), "timestamp": 1495746285875i64 });
        env.db
            .execute(
                "INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent, created_at) \
                 VALUES ($1, NULL, 'email.requested', $2, $3, now() - interval '1 hour')",
                &[&email_id, &email.to_string(), &traceparent],
            )
            .await
            .unwrap();
        token_ids.push(id);
    }
    (ticket_ids, token_ids)
}

async fn insert_old(env: &Env, entity: Uuid, key: &str, body: &str, traceparent: &str) {
    let event_id = profile_worker::contract::message::event_message_id(key, entity);
    env.db
        .execute(
            "INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent, created_at) \
             VALUES ($1, NULL, $2, $3, $4, now() - interval '1 hour')",
            &[&event_id, &key, &body, &traceparent],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn events_an_earlier_version_left_in_the_outbox_leave_in_the_new_shape() {
    let mut env = Env::prepare().await;
    env.settings.worker.outbox_grace_secs = 1;
    let (tickets, tokens) = old_outbox_rows(&env, 1, 1).await;
    env.start_worker().await;
    let events = env.events(3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let b = &env.settings.broker;
    for e in &events {
        let body = e.json();
        let (exchange, id) = match e.routing_key.as_str() {
            "ticket.created" => (&b.events_exchange, tickets[0]),
            "verification-token.created" => (&b.events_exchange, tokens[0]),
            "email.requested" => (&b.email_exchange, tokens[0]),
            other => panic!("{other}"),
        };
        assert_eq!(&e.exchange, exchange, "{}", e.routing_key);
        assert_eq!(
            e.message_id.as_deref(),
            Some(
                profile_worker::contract::message::event_message_id(&e.routing_key, id)
                    .to_string()
                    .as_str()
            ),
            "the event keeps its message_id, for subscribers that dedupe"
        );
        assert_eq!(
            e.header("traceparent").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        if e.routing_key == "email.requested" {
            assert_eq!(
                body["tokenId"],
                id.to_string(),
                "the dispatcher's link is whole"
            );
        } else {
            assert_eq!(body["idSha256"], id_sha256(id), "{body}");
            assert!(body.get("id").is_none(), "{body}");
            assert!(!String::from_utf8_lossy(&e.body).contains(&id.to_string()));
        }
    }
    assert_eq!(env.settled_outbox().await, 0, "relayed rows are deleted");
    env.teardown().await;
}

#[tokio::test]
async fn an_upgrade_killed_while_relaying_loses_no_email_request() {
    let env = Env::prepare().await;
    const EMAILS: usize = 2_000;
    let (_, tokens) = old_outbox_rows(&env, 0, EMAILS).await;
    let mut first = WorkerProcess::start(worker_process(&env), None).await;
    // Killed as soon as the relay has published some of them.
    let mut got: HashMap<String, usize> = HashMap::new();
    let mut arrived = 0;
    for _ in 0..6 {
        if arrived > 0 {
            break;
        }
        for e in env.events(1).await {
            arrived += 1;
            if e.routing_key == "email.requested" {
                *got.entry(e.json()["tokenId"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    assert!(arrived > 0, "the relay published nothing within a minute");
    signal(&first, SIGKILL);
    first.wait().await.unwrap();
    let outbox_left = env.count("outbox").await;
    assert!(
        outbox_left > 0,
        "the kill came after the relay had finished: nothing tested"
    );
    let _second = WorkerProcess::start(worker_process(&env), None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.count("outbox").await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.count("outbox").await,
        0,
        "the new worker relays every row"
    );
    for e in env.events(4 * EMAILS).await {
        let body = e.json();
        if e.routing_key == "email.requested" {
            assert_eq!(e.exchange, env.settings.broker.email_exchange);
            *got.entry(body["tokenId"].as_str().unwrap().to_string())
                .or_default() += 1;
        } else {
            assert!(body.get("id").is_none(), "{body}");
        }
    }
    let missing = tokens
        .iter()
        .filter(|t| !got.contains_key(&t.to_string()))
        .count();
    assert_eq!(
        missing, 0,
        "email requests lost across the kill ({outbox_left} rows were left then)"
    );
    env.teardown().await;
}

/// An importer's broker user (issue 32) may publish to the bulk lane only: it
/// cannot put its load in the interactive lane, read anyone's commands, or
/// forge events.
#[tokio::test]
async fn a_bulk_publisher_may_publish_to_the_bulk_lane_and_nowhere_else() {
    let env = Env::prepare().await;
    let b = env.settings.broker.clone();
    let importer = connect(&bulk_publisher_amqp_url()).await;
    let ch = importer.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            b.bulk_exchange.as_str().into(),
            "create-ticket".into(),
            BasicPublishOptions::default(),
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            BasicProperties::default().with_type("create-ticket".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack(),
        "publishing to the bulk lane is what it is for"
    );
    for x in [
        b.command_exchange.clone(),
        b.events_exchange.clone(),
        b.email_exchange.clone(),
        String::new(),
    ] {
        assert!(
            publish_refused(&importer, &x, "create-ticket").await,
            "an importer published to {x:?}"
        );
    }
    for q in [b.bulk_queue.clone(), b.command_queue.clone()] {
        let name = q.clone();
        assert!(
            refused(&importer, |c| async move {
                c.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
            })
            .await,
            "an importer consumed {name}"
        );
    }
    let _ = importer.close(200, "bye".into()).await;
    env.teardown().await;
}

/// KEDA's user (deploy/kubernetes components/keda) reads queue depths through
/// the management API; over AMQP it may declare, publish and read nothing, so
/// the password in the trigger's Secret opens no command, event or email.
#[tokio::test]
async fn the_keda_user_can_do_nothing_over_amqp() {
    let env = Env::prepare().await;
    let b = env.settings.broker.clone();
    let keda = connect(&keda_amqp_url()).await;
    for x in [
        b.command_exchange.clone(),
        b.bulk_exchange.clone(),
        b.events_exchange.clone(),
        b.email_exchange.clone(),
        String::new(),
    ] {
        assert!(
            publish_refused(&keda, &x, "create-ticket").await,
            "KEDA's user published to {x:?}"
        );
    }
    for q in [
        b.command_queue.clone(),
        b.bulk_queue.clone(),
        b.dead_letter_queue.clone(),
        b.email_queue.clone(),
    ] {
        let name = q.clone();
        assert!(
            refused(&keda, |c| async move {
                c.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
            })
            .await,
            "KEDA's user consumed {name}"
        );
    }
    assert!(
        refused(&keda, |c| async move {
            c.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        })
        .await,
        "KEDA's user declared a queue of its own"
    );
    let _ = keda.close(200, "bye".into()).await;
    env.teardown().await;
}
