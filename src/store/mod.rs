//! Postgres: pool, migrations, seed, the batch load and the one-transaction commit,
//! the outbox and the expiry sweep. Knows SQL, nothing about AMQP.

mod access_tokens;
mod batch;
mod maintenance;
mod migrate;
pub use migrate::{MigrationState, MigrationStatus};
mod outbox;
mod rows;
mod seed;
pub mod tls;

pub use access_tokens::{AccessTokenInfo, Expires, NewAccessToken};
pub use batch::Batch;
pub use maintenance::{Retention, SweepReport};
pub use seed::{SeedFile, SeedReport, SeedTenantPermission};

use crate::config::DatabaseSettings;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How `access_tokens` keys a token (CONTRACT §7): the SHA-256 of its ID's UTF-8
/// bytes, so the table never holds the bearer secret itself. (In SQL:
/// `sha256(convert_to(id, 'UTF8'))`.)
pub fn access_token_hash(id: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(id.as_bytes()).into()
}

/// Whether retrying can help: the database (or the way to it) is down or busy,
/// versus something wrong with what we asked it to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Transient,
    Permanent,
}

/// A failed database step: what the worker was doing (`context`), whether
/// retrying can help, and the cause as its source.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct StoreError {
    pub kind: ErrorKind,
    pub context: &'static str,
    /// The server's SQLSTATE, when it answered with an error.
    pub sqlstate: Option<String>,
    #[source]
    source: Cause,
}

#[derive(Debug, thiserror::Error)]
enum Cause {
    #[error(transparent)]
    Postgres(tokio_postgres::Error),
    #[error(transparent)]
    Pool(deadpool_postgres::PoolError),
    /// Rows the worker could not read, or a condition it found itself.
    #[error("{0}")]
    Found(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// The server refused a write because it is read-only (SQLSTATE 25006): a
    /// standby, or a primary an operator set read-only.
    pub fn is_read_only(&self) -> bool {
        self.sqlstate.as_deref() == Some(READ_ONLY_TRANSACTION)
    }

    /// A commit found a token, profile or tenant row changed since the batch
    /// was decided on it (migration 7's `profile_worker_rows_changed`).
    pub fn is_rows_changed(&self) -> bool {
        self.sqlstate.as_deref() == Some(ROWS_CHANGED)
    }

    /// SQLSTATE 40001: in a batch's commit (READ COMMITTED), an email claim
    /// another transaction took first (migration 3's `profile_worker_cooldown_taken`).
    pub fn is_serialization_failure(&self) -> bool {
        self.sqlstate.as_deref() == Some("40001")
    }

    /// The role lacks a privilege (SQLSTATE 42501), e.g. DDL as the runtime role.
    pub fn is_permission_denied(&self) -> bool {
        self.sqlstate.as_deref() == Some("42501")
    }

    pub fn transient(context: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Transient,
            context,
            sqlstate: None,
            source: Cause::Found(message.into()),
        }
    }

    /// A commit's finding that a row changed since the batch was decided on
    /// it, as the server reports it (a store other than PostgreSQL's says so
    /// with this).
    pub fn rows_changed(context: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            sqlstate: Some(ROWS_CHANGED.into()),
            ..StoreError::transient(context, message)
        }
    }

    /// A commit's email claim another transaction took first (SQLSTATE 40001).
    pub fn serialization_failure(context: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            sqlstate: Some("40001".into()),
            ..StoreError::transient(context, message)
        }
    }

    pub fn permanent(context: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Permanent,
            context,
            sqlstate: None,
            source: Cause::Found(message.into()),
        }
    }

    fn pg(context: &'static str, e: tokio_postgres::Error) -> Self {
        StoreError {
            kind: classify(&e),
            context,
            sqlstate: e.as_db_error().map(|db| db.code().code().to_string()),
            source: Cause::Postgres(e),
        }
    }

    fn pool(context: &'static str, e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::pg(context, e),
            other => StoreError {
                kind: ErrorKind::Transient,
                context,
                sqlstate: None,
                source: Cause::Pool(other),
            },
        }
    }
}

const READ_ONLY_TRANSACTION: &str = "25006";
/// Migration 7's code for a batch decided on rows that changed since.
const ROWS_CHANGED: &str = "PW001";

fn classify(e: &tokio_postgres::Error) -> ErrorKind {
    if e.is_closed() {
        return ErrorKind::Transient;
    }
    match e.as_db_error() {
        // No server answer at all (I/O, connect, timeout): the way to the database.
        None => ErrorKind::Transient,
        Some(db) => {
            let code = db.code().code();
            // 08 connection, 40 serialization/deadlock, 53 resources, 57 operator
            // intervention (shutdown, cannot connect now), 58 system error;
            // a read-only server (a standby answering while failover promotes
            // another) is the way to the database too, not the command.
            if ["08", "40", "53", "57", "58"]
                .iter()
                .any(|c| code.starts_with(c))
                || code == "55P03"
                || code == READ_ONLY_TRANSACTION
                // Decided on rows that changed: deciding again will do.
                || code == ROWS_CHANGED
            {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            }
        }
    }
}

/// The worker's handle on Postgres.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Builds the pool. Connections are made lazily; call [`Store::check`] to fail fast.
    pub fn connect(settings: &DatabaseSettings) -> Result<Self, crate::config::ConfigError> {
        let (pg, tls) = settings.validate()?;
        Store::connect_checked(pg, &tls, settings)
    }

    /// As [`Store::connect`], with `DATABASE_URL` already checked (`DatabaseSettings::validate`).
    pub fn connect_checked(
        mut pg: tokio_postgres::Config,
        tls: &crate::config::TlsSettings,
        settings: &DatabaseSettings,
    ) -> Result<Self, crate::config::ConfigError> {
        let tls = tls::client_config(tls)
            .map_err(|e| crate::config::ConfigError::new("DATABASE_URL", e.to_string()))?;
        pg.connect_timeout(settings.db_timeout());
        if pg.get_application_name().is_none() {
            pg.application_name("profile-worker");
        }
        // Every statement here finds its rows through an index: key lists
        // (`= ANY($1)` over a batch), or a time range with a LIMIT (the sweep and
        // the relay). A plan that chose a sequential scan because a table was small
        // (or empty, as every table is on a new database) stays cached on the
        // connection while the table grows, until autovacuum next analyzes it
        // (bench/archive/BENCHMARKS-to-2026-12-07.md, "Where the time goes").
        // With sequential scans off, the index is chosen whatever the
        // statistics said when the plan was made.
        // Generic plans spare the planning on every execution.
        let options = pg.get_options().unwrap_or_default().to_string();
        pg.options(
            format!("{options} -c plan_cache_mode=force_generic_plan -c enable_seqscan=off").trim(),
        );
        // Fast recycling: a connection Postgres closed (restart, admin shutdown)
        // has already ended its task and reports `is_closed`, so it is dropped
        // without the extra round trip `Verified` spends on every checkout; one
        // that died unnoticed fails its query with a transient error and the batch
        // is retried on a fresh connection.
        let config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                config,
            ),
            None => Manager::from_config(pg, tokio_postgres::NoTls, config),
        };
        let timeout = Some(settings.db_timeout());
        let pool = Pool::builder(manager)
            .max_size(settings.db_pool_size as usize)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| crate::config::ConfigError::new("DATABASE_URL", e.to_string()))?;
        Ok(Store { pool })
    }

    /// One round trip, to report an unreachable database at start-up.
    pub async fn check(&self) -> Result<(), StoreError> {
        let client = self.client("connect").await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| StoreError::pg("connect", e))?;
        Ok(())
    }

    async fn client(&self, context: &'static str) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::pool(context, e))
    }

    pub fn close(&self) {
        self.pool.close();
    }
}

pub(crate) fn to_system_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Milliseconds since the epoch, truncated so a value read back from Postgres
/// (microsecond precision) equals the one put in the reply.
pub fn epoch_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_tokens_are_keyed_by_the_sha256_of_their_id() {
        // The standard test vector for "abc".
        let h = access_token_hash("abc");
        assert_eq!(
            h.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn millis_round_trip() {
        for ms in [0, 1, 1_495_660_441_508, -1_000] {
            assert_eq!(epoch_millis(to_system_time(ms)), ms);
        }
    }
}
