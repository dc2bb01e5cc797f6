//! Hostile properties (issue 22): whatever a publisher puts in a command's
//! properties and headers, the worker answers it or dead-letters it once, with
//! a reason, and no other caller's command is redelivered, delayed past its
//! batch or dead-lettered because of it. The worker runs as its own process so
//! its metrics (commands answered, reconnects) are its alone, and so that
//! `PROFILE_WORKER_BIN` can run these tests against another build (that is how
//! each was seen to fail on the build before the fix).

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use profile_worker::broker::properties::{self, encoded_len};
use profile_worker_testkit::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// A worker process with its metrics endpoint.
async fn worker(env: &Env, log: &str) -> WorkerProcess {
    let mut cmd = worker_process(env);
    cmd.env("HTTP_ADDR", "127.0.0.1:0").env("RUST_LOG", log);
    WorkerProcess::start(cmd, None).await
}

/// The worker's counters: commands answered (all statuses) and reconnects.
async fn answered_and_reconnects(w: &WorkerProcess) -> (f64, f64) {
    let (_, page) = http_get(w.http(), "/metrics").await.expect("metrics");
    let m = samples(&page);
    let answered = m
        .iter()
        .filter(|(k, _)| k.starts_with("profile_worker_commands_total"))
        .map(|(_, v)| v)
        .sum();
    let reconnects = m
        .get("profile_worker_reconnects_total")
        .copied()
        .unwrap_or(-1.0);
    (answered, reconnects)
}

fn good(env: &Env, correlation: &str) -> BasicProperties {
    BasicProperties::default()
        .with_type("create-ticket".into())
        .with_content_type("application/json".into())
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_correlation_id(correlation.into())
        .with_reply_to(env.reply_queue.as_str().into())
}

/// Publishes 10 good commands, `bad`, and 10 more on `channel`; returns the
/// good ones' correlation ids.
async fn between_good_ones(
    env: &Env,
    channel: &lapin::Channel,
    bad: (&[u8], BasicProperties),
) -> Vec<String> {
    between_good_ones_as(env, channel, bad, "create-ticket").await
}

/// [`between_good_ones`], the bad one published with `routing_key`.
async fn between_good_ones_as(
    env: &Env,
    channel: &lapin::Channel,
    bad: (&[u8], BasicProperties),
    routing_key: &str,
) -> Vec<String> {
    let ticket = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let mut goods = Vec::new();
    let mut confirms = Vec::new();
    for i in 0..21 {
        let (body, props, key) = if i == 10 {
            (bad.0, bad.1.clone(), routing_key)
        } else {
            let c = format!("good-{i}-{}", Uuid::new_v4().simple());
            goods.push(c.clone());
            (ticket.as_bytes(), good(env, &c), "create-ticket")
        };
        confirms.push(
            channel
                .basic_publish(
                    env.settings.broker.command_exchange.as_str().into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish"),
        );
    }
    for c in confirms {
        assert!(
            c.await.expect("confirm").is_ack(),
            "the broker took every command"
        );
    }
    goods
}

/// Every good command answered 200 within a few seconds, the bad one's reply
/// (when it has one: a refused `reply_to` gets none), exactly one dead letter,
/// and (the worker's own counts) each answered once since `before`, and no
/// reconnect.
async fn each_answered_once(
    env: &Env,
    w: &WorkerProcess,
    goods: &[String],
    bad_correlation: Option<&str>,
    before: f64,
) -> (Option<Reply>, Received) {
    // A batch's delay, not a connection's worth of redeliveries (the stall
    // this guards against held every caller for over 30 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reply = |c: &str| {
        let c = c.to_string();
        async move {
            tokio::time::timeout_at(deadline, env.reply_for(&c))
                .await
                .unwrap_or_else(|_| panic!("no reply for {c:?} within 10 s of the burst"))
        }
    };
    for c in goods {
        assert_eq!(reply(c).await.status, 200, "{c}");
    }
    let bad = match bad_correlation {
        Some(c) => Some(reply(c).await),
        None => None,
    };
    let dead = env.wait_dead_letters(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more = env.dead_letters().await;
    assert_eq!(
        dead.len() + more.len(),
        1,
        "one dead letter: {dead:?} {more:?}"
    );
    let (answered, reconnects) = answered_and_reconnects(w).await;
    assert_eq!(
        answered - before,
        (goods.len() + 1) as f64,
        "every command answered once: none redelivered"
    );
    assert_eq!(reconnects, 0.0, "the worker's connection never dropped");
    (bad, dead.into_iter().next().unwrap())
}

/// A loopback proxy to the broker that replaces each `from` with its `to`
/// (same length) in what the client sends: how a test publishes bytes no AMQP
/// client library will write (lapin's strings are Rust strings, so always
/// UTF-8).
async fn rewriting_proxy(broker: std::net::SocketAddr, swaps: Vec<(Vec<u8>, Vec<u8>)>) -> u16 {
    for (from, to) in &swaps {
        assert_eq!(from.len(), to.len(), "frames keep their lengths");
    }
    let swaps = std::sync::Arc::new(swaps);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(broker).await.expect("broker");
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            let swaps = swaps.clone();
            tokio::spawn(async move {
                let mut held: Vec<u8> = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    held.extend_from_slice(&buf[..n]);
                    for (from, to) in swaps.iter() {
                        while let Some(at) = held.windows(from.len()).position(|w| w == &from[..]) {
                            held[at..at + from.len()].copy_from_slice(to);
                        }
                    }
                    // Keep back only a tail that may be the start of a `from`.
                    let keep = swaps
                        .iter()
                        .filter_map(|(from, _)| {
                            (1..from.len())
                                .rev()
                                .find(|&k| held.len() >= k && held.ends_with(&from[..k]))
                        })
                        .max()
                        .unwrap_or(0);
                    let send = held.len() - keep;
                    if sw.write_all(&held[..send]).await.is_err() {
                        break;
                    }
                    held.drain(..send);
                }
            });
        }
    });
    port
}

/// A connection (and a confirming channel) to the broker through a proxy
/// making `swaps`, as the admin user.
async fn through_proxy(env: &Env, swaps: Vec<(Vec<u8>, Vec<u8>)>) -> (Connection, lapin::Channel) {
    let admin = env.servers.admin_amqp.clone();
    let port = rewriting_proxy(broker_addr(&admin), swaps).await;
    let (userinfo, rest) = admin.split_once('@').unwrap();
    let vhost = rest.split_once('/').map_or("%2f", |(_, v)| v);
    let via_proxy = format!("{userinfo}@127.0.0.1:{port}/{vhost}");
    let conn = Connection::connect(&via_proxy, ConnectionProperties::default())
        .await
        .expect("connect through the proxy");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

fn broker_addr(url: &str) -> std::net::SocketAddr {
    let host_port = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("amqp://user:pass@host:port/vhost");
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port
        .parse()
        .unwrap_or_else(|_| format!("{host_port}:5672").parse().unwrap())
}

#[tokio::test]
async fn a_property_that_is_not_utf8_costs_other_callers_nothing() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    const MARK: &[u8] = b"@@not-utf8-here@@";
    const BAD: &[u8] = b"id-\xff\xfe\xc3(-\x80\x80\xed\xa0\x80----";
    let (conn, ch) = through_proxy(&env, vec![(MARK.to_vec(), BAD.to_vec())]).await;
    // Not UTF-8 in the message_id, and in a header's name.
    let mut headers = FieldTable::default();
    headers.insert(
        std::str::from_utf8(MARK).unwrap().into(),
        AMQPValue::LongString(LongString::from("v")),
    );
    let bad_props = good(&env, "bad-one")
        .with_message_id(std::str::from_utf8(MARK).unwrap().into())
        .with_headers(headers);
    let goods = between_good_ones(
        &env,
        &ch,
        (
            ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string().as_bytes(),
            bad_props,
        ),
    )
    .await;
    let (bad, dead) = each_answered_once(&env, &w, &goods, Some("bad-one"), 0.0).await;
    let bad = bad.unwrap();
    assert_eq!(env.count("tickets").await, goods.len() as i64);
    assert_eq!(bad.status, 400, "{}", bad.raw);
    assert_eq!(bad.body["errorCode"], "PARAM_DESERIALIZATION_ERROR");
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .starts_with("Property \"message_id\" is not valid UTF-8"),
        "{}",
        bad.raw
    );
    assert_eq!(
        dead.header("x-error-code").as_deref(),
        Some("PARAM_DESERIALIZATION_ERROR")
    );
    let _ = conn.close(200, "bye".into()).await;
    drop(w);
    env.teardown().await;
}

/// What the bad command of a case is answered: under which correlation id,
/// with which code, and how its message starts.
struct Answer {
    correlation: String,
    code: &'static str,
    message: &'static str,
}

/// Issue 31: a short string holds at most 255 bytes, and 254 bytes of ASCII
/// and one invalid byte decode to 257 (U+FFFD takes three), which panicked
/// the worker's AMQP I/O thread and held every caller for over 30 s. Each
/// property a publisher sets, the routing key and a header's name, in turn,
/// each between 20 good commands, through one connection that writes the bytes.
#[tokio::test]
async fn a_255_byte_property_that_is_not_utf8_costs_other_callers_nothing() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    // Each case's marker is 255 bytes of ASCII; the proxy turns its last byte
    // into 0xff on the wire.
    let mark = |case: &str| {
        let mut m = if case == "reply_to" {
            format!("amq.gen-@@{case}@@")
        } else {
            format!("@@{case}@@")
        };
        while m.len() < 255 {
            m.push('z');
        }
        m
    };
    let cases = [
        "message_id",
        "routing_key",
        "reply_to",
        "correlation_id",
        "type",
        "header_name",
    ];
    let swaps = cases
        .iter()
        .map(|c| {
            let m = mark(c).into_bytes();
            let mut bad = m[..254].to_vec();
            bad.push(0xff);
            (m, bad)
        })
        .collect();
    let (conn, ch) = through_proxy(&env, swaps).await;
    // What the worker reads: cut to fit, ending in U+FFFD.
    let lossy = |m: &str| format!("{}\u{fffd}", &m[..252]);
    let ticket = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let malformed: &[u8] = br#"{"accessTokenId":"x"}"#;
    let mut goods_total = 0;
    for case in cases {
        let m = mark(case);
        let correlation = format!("bad-{case}");
        let base = good(&env, &correlation);
        let untyped = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_correlation_id(correlation.as_str().into())
            .with_reply_to(env.reply_queue.as_str().into());
        let expect = |correlation: &str, code, message| {
            Some(Answer {
                correlation: correlation.to_string(),
                code,
                message,
            })
        };
        let (body, props, key, answer) = match case {
            "message_id" => (
                ticket.as_bytes(),
                base.with_message_id(m.as_str().into()),
                "create-ticket",
                expect(
                    &correlation,
                    "PARAM_DESERIALIZATION_ERROR",
                    "Property \"message_id\" is not valid UTF-8",
                ),
            ),
            "routing_key" => (
                ticket.as_bytes(),
                untyped,
                m.as_str(),
                expect(&correlation, "UNKNOWN_COMMAND", ""),
            ),
            "reply_to" => (
                ticket.as_bytes(),
                base.with_reply_to(m.as_str().into()),
                "create-ticket",
                None,
            ),
            "correlation_id" => (
                ticket.as_bytes(),
                base.with_correlation_id(m.as_str().into()),
                "create-ticket",
                expect(
                    &lossy(&m),
                    "PARAM_DESERIALIZATION_ERROR",
                    "Property \"correlation_id\" is not valid UTF-8",
                ),
            ),
            "type" => (
                ticket.as_bytes(),
                base.with_type(m.as_str().into()),
                "create-ticket",
                expect(&correlation, "UNKNOWN_COMMAND", ""),
            ),
            "header_name" => {
                let mut headers = FieldTable::default();
                headers.insert(m.as_str().into(), AMQPValue::LongString("v".into()));
                (
                    malformed,
                    base.with_headers(headers),
                    "create-ticket",
                    expect(&correlation, "PARAM_DESERIALIZATION_ERROR", ""),
                )
            }
            _ => unreachable!(),
        };
        let before = answered_and_reconnects(&w).await.0;
        let goods = between_good_ones_as(&env, &ch, (body, props), key).await;
        goods_total += goods.len();
        let bad_correlation = answer.as_ref().map(|a| a.correlation.as_str());
        let (reply, dead) = each_answered_once(&env, &w, &goods, bad_correlation, before).await;
        let code = match (&answer, reply) {
            (Some(a), Some(r)) => {
                assert_eq!(r.status, 400, "{case}: {}", r.raw);
                assert_eq!(r.body["errorCode"], a.code, "{case}: {}", r.raw);
                assert!(
                    r.body["message"].as_str().unwrap().starts_with(a.message),
                    "{case}: {}",
                    r.raw
                );
                a.code
            }
            _ => "REPLY_TO_NOT_ALLOWED",
        };
        assert_eq!(dead.header("x-error-code").as_deref(), Some(code), "{case}");
        if case == "header_name" {
            assert!(
                dead.header(&lossy(&m)).is_some(),
                "the dead letter carries the header as read: {:?}",
                dead.headers
            );
        }
        assert_eq!(env.count("tickets").await, goods_total as i64, "{case}");
    }
    let _ = conn.close(200, "bye".into()).await;
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn a_reply_to_that_is_not_utf8_is_refused_not_replied_to() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    // Short, within the limit: the lossy name was taken as a reply queue.
    const MARK: &[u8] = b"amq.gen-@@reply@@";
    const BAD: &[u8] = b"amq.gen-@@repl\xff@@";
    let (conn, ch) = through_proxy(&env, vec![(MARK.to_vec(), BAD.to_vec())]).await;
    let props = good(&env, "refused").with_reply_to(std::str::from_utf8(MARK).unwrap().into());
    let ticket = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let goods = between_good_ones(&env, &ch, (ticket.as_bytes(), props)).await;
    let (reply, dead) = each_answered_once(&env, &w, &goods, None, 0.0).await;
    assert!(reply.is_none());
    assert_eq!(
        dead.header("x-error-code").as_deref(),
        Some("REPLY_TO_NOT_ALLOWED")
    );
    assert_eq!(
        env.count("tickets").await,
        goods.len() as i64,
        "not processed"
    );
    let _ = conn.close(200, "bye".into()).await;
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn a_dead_letter_of_a_command_at_the_frame_limit_fits_in_a_frame() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    let frame_max = env.conn.configuration().frame_max() as usize;
    // A malformed command whose content header frame is a few bytes short of
    // the limit: the broker takes it, and its dead letter could not carry
    // the reasons as well.
    let correlation = "at-the-limit";
    let base = good(&env, correlation);
    let fixed = {
        let p = base.clone().with_headers(FieldTable::default());
        // frame header and end (8), class/weight/size/flags (14), the short
        // strings and the empty table (4).
        let strings = [
            p.kind(),
            p.content_type(),
            p.message_id(),
            p.correlation_id(),
            p.reply_to(),
        ]
        .iter()
        .map(|s| s.as_ref().map_or(0, |v| 1 + v.as_str().len()))
        .sum::<usize>();
        8 + 14 + strings + 4
    };
    let entry = 1 + "padding".len() + 1 + 4; // name, type tag, length
    let n = frame_max - fixed - entry - 16;
    let mut headers = FieldTable::default();
    headers.insert(
        "padding".into(),
        AMQPValue::LongString(LongString::from("x".repeat(n))),
    );
    assert!(fixed + encoded_len(&headers) - 4 <= frame_max);
    let bad_props = base.with_headers(headers);
    let goods =
        between_good_ones(&env, &env.channel, (br#"{"accessTokenId":"x"}"#, bad_props)).await;
    let (bad, dead) = each_answered_once(&env, &w, &goods, Some(correlation), 0.0).await;
    let bad = bad.unwrap();
    assert_eq!(env.count("tickets").await, goods.len() as i64);
    assert_eq!(bad.status, 400, "{}", bad.raw);
    assert_eq!(
        dead.header("x-error-code").as_deref(),
        Some("PARAM_DESERIALIZATION_ERROR")
    );
    assert!(dead.header("x-error-reason").is_some());
    assert!(
        dead.header(properties::HEADERS_DROPPED_HEADER).is_some(),
        "the dead letter says its headers were dropped: {:?}",
        dead.headers
    );
    assert!(dead.header("padding").is_none());
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn caller_input_in_properties_never_reaches_postgresql_as_an_error() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    for (property, message_id, correlation_id) in [
        ("message_id", "nul\0inside", None),
        ("message_id", "del\u{7f}", None),
        ("message_id", "tab\there", None),
        ("correlation_id", "fine-id", Some("nul\0too")),
    ] {
        let started = std::time::Instant::now();
        let c = correlation_id.map_or_else(|| message_id.to_string(), str::to_string);
        let props = BasicProperties::default()
            .with_type("create-ticket".into())
            .with_message_id(message_id.into())
            .with_correlation_id(c.as_str().into())
            .with_reply_to(env.reply_queue.as_str().into());
        env.publish_as_is(
            &env.settings.broker.command_exchange,
            "create-ticket",
            body.as_bytes(),
            props,
        )
        .await;
        let r = env.reply_for(&c).await;
        assert_eq!(r.status, 400, "{property} {message_id:?}: {}", r.raw);
        assert_eq!(r.body["errorCode"], "PARAM_DESERIALIZATION_ERROR");
        assert!(
            r.body["message"].as_str().unwrap().starts_with(&format!(
                "Property \"{property}\" contains a control character"
            )),
            "{}",
            r.raw
        );
        // At once: not after a poison command's retries (seconds of pauses).
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let dead = env.wait_dead_letters(1).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].header("x-error-code").as_deref(),
            Some("PARAM_DESERIALIZATION_ERROR")
        );
    }
    assert_eq!(env.count("tickets").await, 0);
    assert_eq!(env.count("processed_commands").await, 0);
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn dead_letters_never_expire_and_keep_no_priority() {
    let env = Env::prepare().await;
    let w = worker(&env, "info").await;
    // A malformed command and one with a reply_to that is no reply queue,
    // each asking to expire in a second.
    for (correlation, reply_to, code) in [
        (
            "expiring-malformed",
            env.reply_queue.clone(),
            "PARAM_DESERIALIZATION_ERROR",
        ),
        (
            "expiring-refused",
            "billing.inbox".to_string(),
            "REPLY_TO_NOT_ALLOWED",
        ),
    ] {
        let props = BasicProperties::default()
            .with_type("create-ticket".into())
            .with_message_id(correlation.into())
            .with_correlation_id(correlation.into())
            .with_reply_to(reply_to.as_str().into())
            .with_expiration("1000".into())
            .with_priority(9);
        env.publish_as_is(
            &env.settings.broker.command_exchange,
            "create-ticket",
            br#"{"accessTokenId":"x"}"#,
            props,
        )
        .await;
        // Long after the expiration it asked for, the dead letter is there.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let m = env
            .channel
            .basic_get(
                env.settings.broker.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{correlation}: the dead letter expired"));
        let p = &m.delivery.properties;
        assert_eq!(p.expiration(), &None, "{correlation}");
        assert_eq!(p.priority(), &None, "{correlation}");
        assert_eq!(
            Received::from_delivery(&m.delivery)
                .header("x-error-code")
                .as_deref(),
            Some(code)
        );
    }
    drop(w);
    env.teardown().await;
}

#[tokio::test]
async fn no_secret_reaches_the_log_at_trace() {
    let env = Env::prepare().await;
    let w = worker(&env, "trace").await;
    let mut secrets = vec![ADMIN_TOKEN.to_string(), PROFILES_ONLY_TOKEN.to_string()];
    for (kind, body) in [
        ("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE)),
        (
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE),
        ),
        (
            "create-ticket",
            ticket(PROFILES_ONLY_TOKEN, ENABLED_PROFILE),
        ),
        ("create-ticket", ticket(ADMIN_TOKEN, DISABLED_PROFILE)),
        (
            "create-ticket",
            serde_json::json!({ "accessTokenId": ADMIN_TOKEN, "extra": 1 }),
        ),
    ] {
        let r = env.call(kind, body).await;
        if r.status == 200 {
            secrets.push(r.body["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(secrets.len(), 4, "a ticket and a token made");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = w.log_text();
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "the worker logged at trace: {log}"
    );
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "{s} in the log at trace");
    }
    drop(w);
    env.teardown().await;
}
