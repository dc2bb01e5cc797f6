//! TLS both ways and least privilege (CONTRACT §9): PostgreSQL with libpq's
//! `sslmode`, `amqps://` with a CA file, a runtime database role with row rights
//! only, and a broker user limited to the worker's own objects.

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use profile_worker::worker::Worker;
use profile_worker_testkit::*;
use std::time::Duration;

/// Whether the worker's connections to this test's database are encrypted
/// (asked as the worker's own role: others' sessions' details are hidden).
async fn worker_connections_use_tls(env: &Env) -> Vec<bool> {
    worker_connections(env, "s.ssl").await
}

/// `what` (an SQL condition over `a`, pg_stat_activity, and `s`, pg_stat_ssl)
/// for each of the worker's connections to this test's database.
async fn worker_connections(env: &Env, what: &str) -> Vec<bool> {
    let (db, conn) =
        tokio_postgres::connect(&runtime_db_url_for(&env.db_name), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    db.query(
        &format!(
            "SELECT {what} FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND a.application_name = 'profile-worker'"
        ),
        &[&env.db_name],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Builds the worker with `settings`, expecting it to fail within 20 s; its error.
async fn start_error(settings: profile_worker::config::Settings) -> String {
    match tokio::time::timeout(Duration::from_secs(20), Worker::build(settings)).await {
        Ok(Err(e)) => Report(&e).to_string(),
        Ok(Ok(_)) => panic!("the worker started"),
        Err(_) => panic!("the worker did not fail within 20 s"),
    }
}

#[tokio::test]
async fn database_tls_follows_libpq_sslmode() {
    let mut env = Env::prepare().await;
    let plain = env
        .settings
        .database
        .database_url
        .expose_secret()
        .to_string();
    // Without sslmode, libpq's default (prefer): encrypted when the server can.
    for (query, encrypted) in [
        ("?sslmode=require", true),
        ("?sslmode=prefer", true),
        ("?sslmode=disable", false),
        ("", true),
    ] {
        env.settings.database.database_url = format!("{plain}{query}").into();
        env.start_worker().await;
        assert_eq!(
            env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
                .await
                .status,
            200
        );
        let tls = worker_connections_use_tls(&env).await;
        assert!(!tls.is_empty());
        assert!(tls.iter().all(|t| *t == encrypted), "{query:?}: {tls:?}");
        env.stop_worker().await;
    }

    // verify-ca against the server's own (self-signed) certificate: trusted.
    let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    env.settings.database.database_url =
        format!("{plain}?sslmode=verify-ca&sslrootcert={snakeoil}").into();
    env.start_worker().await;
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    env.stop_worker().await;

    // Verifying modes refuse a server their roots do not vouch for, or whose
    // name (here 127.0.0.1) the certificate does not carry; a clear start-up
    // error names the setting.
    let ca = std::env::var("TEST_AMQPS_CA")
        .unwrap_or_else(|_| "/etc/rabbitmq/profile-worker-tls/ca.pem".into());
    for url in [
        format!("{plain}?sslmode=verify-ca&sslrootcert={ca}"),
        format!("{plain}?sslmode=verify-full&sslrootcert={snakeoil}"),
    ] {
        let mut s = env.settings.clone();
        s.database.database_url = url.as_str().into();
        let e = start_error(s).await;
        assert!(e.starts_with("DATABASE_URL: cannot connect"), "{url}: {e}");
        assert!(!e.contains("profile_worker:"), "no password in {e}");
    }
    let mut s = env.settings.clone();
    s.database.database_url = format!("{plain}?sslmode=verify-full").into();
    let e = start_error(s).await;
    assert!(e.contains("sslrootcert"), "{e}");
    let mut s = env.settings.clone();
    s.database.database_url = format!("{plain}?sslmode=allow").into();
    assert!(start_error(s).await.contains("sslmode"));
    env.teardown().await;
}

/// The README's set-up connects over PostgreSQL's Unix socket when the server
/// is this machine's own cluster (`scripts/services.sh`, `pg_host`): the same
/// URL with the socket's directory as its host works, with `sslmode=prefer`
/// (no TLS is offered there) and without TLS on the connection.
/// `TEST_PG_SOCKET_HOST` is that host as the set-up writes it; `scripts/test.sh`
/// sets it wherever the set-up would use the socket.
#[tokio::test]
async fn the_worker_connects_over_the_unix_socket() {
    let Ok(host) = std::env::var("TEST_PG_SOCKET_HOST") else {
        eprintln!("TEST_PG_SOCKET_HOST unset: PostgreSQL is not this machine's own cluster here");
        return;
    };
    let mut env = Env::prepare().await;
    let tcp = env
        .settings
        .database
        .database_url
        .expose_secret()
        .to_string();
    let socket = tcp.replacen("@127.0.0.1:", &format!("@{host}:"), 1);
    assert_ne!(socket, tcp, "the tests' URL names 127.0.0.1: {tcp}");
    env.settings.database.database_url = socket.into();
    env.start_worker().await;
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    let unix = worker_connections(&env, "a.client_addr IS NULL AND NOT s.ssl").await;
    assert!(!unix.is_empty());
    assert!(unix.iter().all(|u| *u), "over the socket, no TLS: {unix:?}");
    env.stop_worker().await;
    env.teardown().await;
}

#[tokio::test]
async fn the_worker_speaks_amqps_with_a_configured_ca() {
    let mut env = Env::prepare().await;
    let url = std::env::var("TEST_AMQPS_URL").unwrap_or_else(|_| {
        "amqps://profile-worker-test:profile-worker-test@localhost:5671/%2f".into()
    });
    let ca = std::env::var("TEST_AMQPS_CA")
        .unwrap_or_else(|_| "/etc/rabbitmq/profile-worker-tls/ca.pem".into());
    env.settings.broker.address.amqp_url = url.as_str().into();
    // Without the CA the broker's certificate is not trusted.
    let e = start_error(env.settings.clone()).await;
    assert!(e.starts_with("AMQP_URL: cannot connect"), "{e}");
    env.settings.broker.address.amqp_ca_file = Some(ca.into());
    env.start_worker().await;
    let r = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    env.stop_worker().await;
    // A missing CA file is a start-up error naming its setting.
    env.settings.broker.address.amqp_ca_file = Some("/nonexistent/ca.pem".into());
    let e = start_error(env.settings.clone()).await;
    assert!(e.starts_with("AMQP_CA_FILE:"), "{e}");
    env.teardown().await;
}

#[tokio::test]
async fn run_under_the_runtime_role_says_which_command_to_run_when_migrations_are_pending() {
    let mut env = Env::prepare().await;
    // A database the owner has not migrated yet.
    let name = format!("{}_new", env.db_name);
    admin_client()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    env.settings.database.database_url = runtime_db_url_for(&name).into();
    let e = start_error(env.settings.clone()).await;
    assert!(
        e.contains("pending") && e.contains("profile-worker migrate"),
        "{e}"
    );
    // After `migrate` as the owner (granting the runtime role), run starts.
    let out = cli(&env, &["migrate"])
        .env("DATABASE_URL", db_url_for(&name))
        .env("DATABASE_RUNTIME_ROLE", runtime_role())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.start_worker().await;
    let r = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(r.status, 403, "no tokens seeded there: {}", r.raw);
    env.stop_worker().await;
    admin_client()
        .await
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    env.teardown().await;
}

#[tokio::test]
async fn the_runtime_role_has_row_rights_only() {
    let env = Env::prepare().await;
    let (db, conn) = tokio_postgres::connect(
        env.settings.database.database_url.expose_secret(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for sql in [
        "CREATE TABLE intruder (x int)",
        "ALTER TABLE tickets ADD COLUMN x int",
        "DROP TABLE outbox",
        "UPDATE access_tokens SET application = 'x'",
        "DELETE FROM profiles",
        "INSERT INTO tenants (name) VALUES ('x')",
        "TRUNCATE tickets",
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("42501"),
            "{sql} was allowed or failed otherwise: {e}"
        );
    }
    // What it does need, it has.
    db.query("SELECT count(*) FROM access_tokens", &[])
        .await
        .unwrap();
    drop(db);
    env.teardown().await;
}

#[tokio::test]
async fn the_workers_broker_user_reaches_only_its_own_objects() {
    let env = Env::prepare().await;
    let conn = Connection::connect(&worker_amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    // Declaring someone else's queue, or publishing to someone else's exchange,
    // is refused by the broker (each closes the channel, so one channel each).
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .queue_declare(
            "billing.inbox".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .basic_publish(
            "amq.topic".into(),
            "x".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await;
    let closed = e.is_err() || !ch.status().connected();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        closed || !ch.status().connected(),
        "publishing to amq.topic was allowed"
    );
    // Replies go through the default exchange.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        "amq.gen-nonexistent".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ch.status().connected());
    let _ = conn.close(200, "bye".into()).await;
    env.teardown().await;
}
