//! `profile-worker run`, the zero2prod way: [`Worker::build`] checks the
//! settings once, reaches the database and the broker, applies migrations and
//! binds the operations endpoint, so every mistake an operator can make shows
//! before a command is taken; [`Worker::run_until_stopped`] then consumes until
//! shutdown, rebuilding the broker session after any failure (`session`), with
//! the expiry sweep beside it (`sweep`).

mod adapters;
mod gather;
pub mod lanes;
mod session;
mod sweep;

use crate::broker::{self, Connection, Nodes};
use crate::config::{ConfigError, Settings};
use crate::ops::{Endpoint, EndpointError, Health, Ready};
use crate::pipeline::known::SharedKnown;
use crate::pipeline::outbox::{self, ConfirmedEvents};
use crate::store::{Store, StoreError};
use crate::telemetry::Report;
use lapin::tcp::OwnedTLSConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("DATABASE_URL: cannot connect")]
    DatabaseUnreachable(#[source] StoreError),
    #[error("DATABASE_URL: migration failed")]
    Migration(#[source] StoreError),
    #[error(
        "DATABASE_URL: migrations {pending:?} are pending and this role may not apply them; \
         run `profile-worker migrate` as the schema's owner, then start again"
    )]
    MigrationsPending {
        pending: Vec<i32>,
        #[source]
        source: StoreError,
    },
    #[error("AMQP_URL: cannot connect to {at}")]
    BrokerUnreachable {
        at: String,
        #[source]
        source: lapin::Error,
    },
    #[error("HTTP_ADDR")]
    Http(#[source] EndpointError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Only an operator can fix it (a conflicting or forbidden declaration).
    #[error(transparent)]
    Topology(#[from] broker::TopologyError),
}

/// Settings checked once, in the forms the worker connects with.
struct Checked {
    database: (tokio_postgres::Config, crate::config::TlsSettings),
    amqp: Nodes,
    amqp_tls: OwnedTLSConfig,
    /// `None` when the operations endpoint is off.
    http_addr: Option<std::net::SocketAddr>,
}

/// Checks every setting; the first problem names its setting.
fn check(s: &Settings) -> Result<Checked, crate::config::ConfigError> {
    let database = s.database.validate()?;
    s.broker.validate()?;
    let amqp = crate::broker::nodes(&s.broker.address, s.broker.heartbeat_secs)?;
    let amqp_tls = crate::broker::tls(&s.broker.address)?;
    s.worker.validate()?;
    Ok(Checked {
        database,
        amqp,
        amqp_tls,
        http_addr: s.worker.http_addr()?,
    })
}

/// Whether `run` would accept these settings (the first problem names its
/// setting), without connecting to anything.
pub fn check_settings(s: &Settings) -> Result<(), crate::config::ConfigError> {
    check(s).map(|_| ())
}

/// A worker that is connected and has its listener bound, not yet consuming.
pub struct Worker {
    settings: Arc<Settings>,
    store: Store,
    amqp: Nodes,
    amqp_tls: OwnedTLSConfig,
    /// The connection `build` made, and to which of the nodes.
    first: (Connection, usize),
    endpoint: Option<Endpoint>,
    health: Arc<Health>,
}

impl Worker {
    pub async fn build(settings: Settings) -> Result<Worker, BuildError> {
        let checked = check(&settings)?;
        let endpoint = match checked.http_addr {
            Some(addr) => Some(Endpoint::bind(addr).await.map_err(BuildError::Http)?),
            None => None,
        };
        let (pg, pg_tls) = checked.database;
        let store = Store::connect_checked(pg, &pg_tls, &settings.database)?;
        store
            .check()
            .await
            .map_err(BuildError::DatabaseUnreachable)?;
        apply_migrations(&store, &settings.database.runtime_role).await?;

        let (first, node) = checked
            .amqp
            .connect(&checked.amqp_tls, checked.amqp.random_start())
            .await
            .map_err(|(at, source)| BuildError::BrokerUnreachable { at, source })?;
        tracing::info!(broker = %checked.amqp.at(node), queue = %settings.broker.command_queue, "connected");
        if let Some(addr) = endpoint.as_ref().and_then(Endpoint::local_addr) {
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        Ok(Worker {
            // Each lane has CONSUMERS consumers.
            health: Arc::new(Health::new(
                lanes::Lane::ALL.len() * usize::from(settings.worker.consumers),
            )),
            settings: Arc::new(settings),
            store,
            amqp: checked.amqp,
            amqp_tls: checked.amqp_tls,
            first: (first, node),
            endpoint,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (the port the
    /// system chose, for `HTTP_ADDR=…:0`); `None` when `HTTP_ADDR=off`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().and_then(Endpoint::local_addr)
    }

    /// Resolves once every consumer is consuming.
    pub fn ready(&self) -> Ready {
        self.health.ready()
    }

    /// Consumes until `shutdown` is cancelled and held commands are finished.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let Worker {
            settings,
            store,
            amqp,
            amqp_tls,
            first,
            endpoint,
            health,
        } = self;
        let ops_stop = CancellationToken::new();
        let _stop_ops = ops_stop.clone().drop_guard();
        let ops = endpoint
            .map(|e| tokio::spawn(e.serve(health.clone(), store.clone(), ops_stop.clone())));
        let sweeper = tokio::spawn(sweep::sweep_loop(
            store.clone(),
            settings.clone(),
            shutdown.clone(),
        ));
        let stopping = tokio::spawn({
            let (health, shutdown) = (health.clone(), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                health.stop();
            }
        });
        // Confirmed events, from the consumers' publishers to the commits and
        // the relay that delete their rows.
        let confirmed = ConfirmedEvents::default();
        // Rows batches read, for the next batches (pipeline::known); across
        // broker sessions, since the database is the same.
        let known = SharedKnown::new(settings.worker.known_rows as usize);
        let result = session::supervise(
            session::Broker {
                nodes: &amqp,
                tls: &amqp_tls,
                pace: settings.worker.broker_retry(),
            },
            first,
            &session::Shared {
                store: &store,
                confirmed: &confirmed,
                known: &known,
                settings: &settings,
                health: &health,
                shutdown: &shutdown,
            },
        )
        .await;
        shutdown.cancel();
        let _ = stopping.await;
        let _ = sweeper.await;
        if let Err(e) = outbox::flush(&store, &confirmed).await {
            tracing::warn!(error = %Report(&e), "confirmed events left in the outbox; the relay will re-publish them once");
        }
        ops_stop.cancel();
        if let Some(ops) = ops {
            // A scraper holding a request open must not keep the process alive.
            let _ = tokio::time::timeout(Duration::from_secs(2), ops).await;
        }
        store.close();
        result
    }
}

/// Migrates when the role may; under a role without DDL rights (as it should
/// run, CONTRACT §9) starts when nothing is pending and otherwise says which
/// command to run.
async fn apply_migrations(store: &Store, runtime_role: &str) -> Result<(), BuildError> {
    let pending = store
        .pending_migrations()
        .await
        .map_err(BuildError::Migration)?;
    if pending.is_empty() {
        return Ok(());
    }
    match store.migrate().await {
        Ok(_) => {}
        Err(source) if source.is_permission_denied() => {
            return Err(BuildError::MigrationsPending { pending, source })
        }
        Err(e) => return Err(BuildError::Migration(e)),
    }
    if !runtime_role.is_empty() {
        store
            .grant_runtime(runtime_role)
            .await
            .map_err(BuildError::Migration)?;
    }
    Ok(())
}
