//! Where the tests' servers are, as the test command exported them, and the
//! URLs of a test's own database.

use lapin::{Connection, ConnectionProperties};

/// The tests' own broker user (publishers, checks, clean-up): may do anything.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| profile_worker::config::DEFAULT_AMQP_URL.into())
}

/// The worker's broker user: permissions on the tests' names (`t<12 hex>.…`)
/// only, as the real one has on `profile.…` (scripts/test.sh creates it).
pub fn worker_amqp_url() -> String {
    std::env::var("TEST_WORKER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-worker-test:profile-worker-test@127.0.0.1:5672/%2f".into()
    })
}

/// The email dispatcher's broker user: may consume the tests' dispatch queues
/// (`t<12 hex>.email.dispatch`) and nothing else (scripts/test.sh).
pub fn dispatcher_amqp_url() -> String {
    std::env::var("TEST_DISPATCHER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-dispatcher-test:profile-dispatcher-test@127.0.0.1:5672/%2f".into()
    })
}

/// An events reader's broker user: its own queues bound to the tests' events
/// exchanges (`t<12 hex>.events`), and no right on the email exchanges.
pub fn reader_amqp_url() -> String {
    std::env::var("TEST_READER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-reader-test:profile-reader-test@127.0.0.1:5672/%2f".into()
    })
}

/// KEDA's management-API user (scripts/services.sh, rabbit_monitor_user):
/// access to the vhost and no right on any object over AMQP.
pub fn keda_amqp_url() -> String {
    std::env::var("TEST_KEDA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://profile-keda-test:profile-keda-test@127.0.0.1:5672/%2f".into())
}

/// An importer's broker user: may publish to the tests' bulk exchanges
/// (`t<12 hex>.commands.bulk`) and nowhere else, as `profile-bulk-publisher`
/// may to `profile.commands.bulk`.
pub fn bulk_publisher_amqp_url() -> String {
    std::env::var("TEST_BULK_PUBLISHER_AMQP_URL").unwrap_or_else(|_| {
        "amqp://profile-bulk-publisher-test:profile-bulk-publisher-test@127.0.0.1:5672/%2f".into()
    })
}

/// A URL to a database we may create databases from, as the schema owner.
pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://profile_worker_owner:profile_worker_owner@127.0.0.1:5432/postgres".into()
    })
}

/// The role `run` connects as: row rights only, granted by the migration step.
pub fn runtime_role() -> String {
    std::env::var("TEST_RUNTIME_DB_USER").unwrap_or_else(|_| "profile_worker".into())
}

/// The owner's URL for database `name`, on the servers of `admin` (a URL of
/// the owner's, perhaps multi-host, perhaps with a query).
pub fn db_url_on(admin: &str, name: &str) -> String {
    let (url, query) = match admin.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (admin, String::new()),
    };
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
    format!("{base}/{name}{query}")
}

/// The owner's URL for database `name`.
pub fn db_url_for(name: &str) -> String {
    db_url_on(&admin_db_url(), name)
}

/// The runtime role's URL for database `name` on the servers of `admin`.
pub fn runtime_db_url_on(admin: &str, name: &str) -> String {
    let owner = db_url_on(admin, name);
    let password =
        std::env::var("TEST_RUNTIME_DB_PASSWORD").unwrap_or_else(|_| "profile_worker".into());
    let (scheme, rest) = owner.split_once("://").expect("a URL");
    let at = rest.rfind('@').expect("credentials in TEST_DATABASE_URL");
    format!("{scheme}://{}:{password}{}", runtime_role(), &rest[at..])
}

/// The runtime role's URL for database `name`.
pub fn runtime_db_url_for(name: &str) -> String {
    runtime_db_url_on(&admin_db_url(), name)
}

/// Where a test's broker and database are: the shared single servers
/// ([`Servers::from_env`]), or a cluster's.
#[derive(Debug, Clone)]
pub struct Servers {
    /// The tests' own broker user on the node the test's publishers and checks use.
    pub admin_amqp: String,
    /// `AMQP_URL` of the worker (one URL or a comma-separated list).
    pub worker_amqp: String,
    /// The owner's URL of a database to create test databases from.
    pub admin_db: String,
}

impl Servers {
    pub fn from_env() -> Self {
        Servers {
            admin_amqp: amqp_url(),
            worker_amqp: worker_amqp_url(),
            admin_db: admin_db_url(),
        }
    }

    pub async fn admin_client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_db, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "admin database reachable (run the README's test command, which starts \
                     PostgreSQL): {e}"
                )
            });
        tokio::spawn(conn);
        client
    }

    pub async fn broker(&self) -> Connection {
        Connection::connect(&self.admin_amqp, ConnectionProperties::default())
            .await
            .expect("broker reachable")
    }
}

pub async fn admin_client() -> tokio_postgres::Client {
    Servers::from_env().admin_client().await
}

/// Drops a test's database, retrying for a while: a fault test may end while
/// PostgreSQL is still coming back from the restart it caused.
pub(crate) async fn drop_database(admin: &str, name: &str) {
    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let mut last = String::new();
    for _ in 0..30 {
        match tokio_postgres::connect(admin, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client.batch_execute(&sql).await {
                    Ok(()) => return,
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    eprintln!("test database {name} left behind: {last}");
}
