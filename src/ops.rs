//! The operations endpoint of `profile-worker run`: `/metrics` (Prometheus),
//! `/healthz` (the process answers) and `/readyz` (it is consuming and its
//! database answers). Readiness is decided by a pure function; the handlers
//! only gather what it needs.

use crate::store::Store;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for the database to answer.
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Histogram upkeep (the exporter's buffers are drained on this period).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the worker reports about itself: its consumers count themselves in
/// and out, and it says when it is stopping. [`Ready`] waits on it.
#[derive(Debug)]
pub struct Health {
    consuming: tokio::sync::watch::Sender<usize>,
    /// Consumers a session runs: ready means all of them are consuming.
    consumers: usize,
    stopping: CancellationToken,
}

impl Health {
    pub fn new(consumers: usize) -> Self {
        Health {
            consuming: tokio::sync::watch::Sender::new(0),
            consumers,
            stopping: CancellationToken::new(),
        }
    }

    /// Counts a consumer as taking commands until the guard is dropped.
    pub fn consuming(self: &Arc<Self>) -> ConsumingGuard {
        let mut now = 0;
        self.consuming.send_modify(|n| {
            *n += 1;
            now = *n;
        });
        metrics::gauge!(crate::telemetry::CONSUMING).set(now as f64);
        if now == self.consumers {
            tracing::info!(consumers = now, "ready");
        }
        ConsumingGuard(self.clone())
    }

    pub fn consuming_now(&self) -> usize {
        *self.consuming.borrow()
    }

    /// From now on `/readyz` says the worker is shutting down.
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    pub fn ready(self: &Arc<Self>) -> Ready {
        Ready(self.clone())
    }
}

pub struct ConsumingGuard(Arc<Health>);

impl Drop for ConsumingGuard {
    fn drop(&mut self) {
        let mut now = 0;
        self.0.consuming.send_modify(|n| {
            *n -= 1;
            now = *n;
        });
        metrics::gauge!(crate::telemetry::CONSUMING).set(now as f64);
    }
}

/// The worker's readiness signal: resolves once every consumer is consuming
/// (`true`), or the worker stopped before that (`false`).
#[derive(Clone)]
pub struct Ready(Arc<Health>);

impl Ready {
    pub async fn wait(&self) -> bool {
        let mut rx = self.0.consuming.subscribe();
        let want = self.0.consumers;
        tokio::select! {
            r = rx.wait_for(|n| *n >= want) => r.is_ok(),
            _ = self.0.stopping.cancelled() => false,
        }
    }
}

/// The answer to `/readyz`.
#[derive(Debug, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub body: serde_json::Value,
}

/// Ready means: not shutting down, at least one consumer on a live broker
/// session, and the database answering. The body names what is missing.
/// `database_problem`: why the database did not answer, `None` when it did.
pub fn readiness(consuming: usize, stopping: bool, database_problem: Option<String>) -> Readiness {
    let mut problems = Vec::new();
    if stopping {
        problems.push("shutting down".to_string());
    }
    if consuming == 0 {
        problems.push("broker: not consuming (connecting or reconnecting)".to_string());
    }
    if let Some(e) = &database_problem {
        problems.push(format!("database: {e}"));
    }
    Readiness {
        ready: problems.is_empty(),
        body: json!({
            "ready": problems.is_empty(),
            "consumers": consuming,
            "database": if database_problem.is_none() { "ok" } else { "unavailable" },
            "problems": problems,
        }),
    }
}

#[derive(Clone)]
struct Ops {
    health: Arc<Health>,
    store: Store,
    metrics: PrometheusHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, so a bad `HTTP_ADDR` fails start-up rather than later.
pub struct Endpoint {
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
}

impl Endpoint {
    pub async fn bind(addr: SocketAddr) -> Result<Self, EndpointError> {
        let metrics = crate::telemetry::metrics_handle()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| EndpointError::Listen { addr, source })?;
        Ok(Endpoint { listener, metrics })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop`; the worker stops it last, so `/readyz` reports the
    /// shutdown while held commands are finished.
    pub async fn serve(self, health: Arc<Health>, store: Store, stop: CancellationToken) {
        let upkeep = {
            let handle = self.metrics.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                        _ = stop.cancelled() => break,
                    }
                }
            })
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Ops {
                health,
                store,
                metrics: self.metrics,
            });
        let result = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "operations endpoint stopped");
        }
        let _ = upkeep.await;
    }
}

async fn metrics(State(ops): State<Ops>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let database = match tokio::time::timeout(DB_PING_TIMEOUT, ops.store.check()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(crate::telemetry::Report(&e).to_string()),
        Err(_) => Some(format!("no answer within {DB_PING_TIMEOUT:?}")),
    };
    let r = readiness(
        ops.health.consuming_now(),
        ops.health.stopping.is_cancelled(),
        database,
    );
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{}\n", r.body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_consuming_with_a_database_and_not_stopping() {
        assert!(readiness(2, false, None).ready);
        let r = readiness(0, false, None);
        assert!(!r.ready);
        assert!(r.body["problems"][0].as_str().unwrap().contains("broker"));
        let r = readiness(2, false, Some("connection refused".into()));
        assert!(!r.ready);
        assert_eq!(r.body["database"], "unavailable");
        assert!(r.body["problems"][0]
            .as_str()
            .unwrap()
            .contains("connection refused"));
        let r = readiness(2, true, None);
        assert!(!r.ready);
        assert_eq!(r.body["problems"][0], "shutting down");
    }

    #[tokio::test]
    async fn the_consuming_count_follows_the_guards_and_ready_waits_for_all() {
        let h = Arc::new(Health::new(2));
        let ready = h.ready();
        let a = h.consuming();
        let waiting = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one of two consumers is not ready");
        let b = h.consuming();
        assert!(waiting.await.unwrap());
        assert_eq!(h.consuming_now(), 2);
        drop(a);
        drop(b);
        assert_eq!(h.consuming_now(), 0);
        h.stop();
        assert!(!ready.wait().await, "a stopped worker is never ready");
    }
}
