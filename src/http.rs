//! The operations endpoints: liveness, readiness and Prometheus metrics.
//!
//! The listener, the router and the shutdown token are arguments (as in mini-redis'
//! `server::run`), so tests start the server in-process on `127.0.0.1:0`, and the worker API
//! can later be merged into the same [`axum::Router`] and served by the same [`serve`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::metrics::names;

/// Whether the daemon can do its job now, and if not, why.
///
/// Readiness is separate from liveness: a daemon waiting for NATS or bootstrapping its
/// dataflow is alive (restarting it would not help) but must not be sent traffic, and the
/// reason tells the operator what it is waiting for.
#[derive(Debug)]
pub struct Health {
    /// Read on every `/readyz` without taking the lock.
    ready: AtomicBool,
    /// Why the daemon is not ready; only meaningful while `ready` is false.
    reason: Mutex<String>,
    /// Problems watched apart from the main loop (e.g. a stalled results consumer), by name:
    /// any of them makes the daemon not ready, whatever the main loop says.
    conditions: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Default for Health {
    /// Not ready, reason "starting": nothing is ready until the daemon says so.
    fn default() -> Self {
        metrics::gauge!(names::INGEST_READY).set(0.0);
        Health {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".to_string()),
            conditions: Mutex::new(Default::default()),
        }
    }
}

impl Health {
    /// Marks the daemon ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        let clear = self.conditions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty();
        metrics::gauge!(names::INGEST_READY).set(if clear { 1.0 } else { 0.0 });
    }

    /// Marks the daemon not ready, saying why (e.g. "bootstrapping", "nats unreachable").
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        // Reason first, so a reader that sees "not ready" never sees a stale reason.
        *self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = reason.into();
        self.ready.store(false, Ordering::SeqCst);
        metrics::gauge!(names::INGEST_READY).set(0.0);
    }

    /// Sets (`Some(why)`) or clears (`None`) the condition `name`; while any condition is set
    /// the daemon is not ready and `/readyz` gives the conditions as the reason.
    pub fn set_condition(&self, name: &'static str, problem: Option<String>) {
        let mut conditions = self.conditions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match problem {
            Some(why) => {
                conditions.insert(name, why);
            }
            None => {
                conditions.remove(name);
            }
        }
        let ready = conditions.is_empty() && self.ready.load(Ordering::SeqCst);
        metrics::gauge!(names::INGEST_READY).set(if ready { 1.0 } else { 0.0 });
    }

    fn conditions(&self) -> Vec<String> {
        let conditions = self.conditions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        conditions.iter().map(|(name, why)| format!("{name}: {why}")).collect()
    }

    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self.conditions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty()
    }

    /// Why the daemon is not ready (the conditions set, else the last reason given, even once
    /// ready again).
    pub fn reason(&self) -> String {
        let conditions = self.conditions();
        let reason = self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        match (self.ready.load(Ordering::SeqCst), conditions.is_empty()) {
            (_, true) => reason,
            (true, false) => conditions.join("; "),
            (false, false) => format!("{reason}; {}", conditions.join("; ")),
        }
    }
}

/// What the operations handlers share.
#[derive(Clone)]
struct Ops {
    /// Readiness, owned by the daemon's main loop.
    health: Arc<Health>,
    /// Renders the global recorder.
    metrics: PrometheusHandle,
}

/// `GET /healthz`, `GET /readyz` and `GET /metrics`. The router has no state left to supply, so
/// it merges with other routers (`ops_router(..).merge(api)`).
pub fn ops_router(health: Arc<Health>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Ops { health, metrics })
}

/// Liveness: answering at all is the signal.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 503 with the reason while not ready, so load balancers and orchestrators hold
/// traffic and operators see why.
async fn readyz(State(ops): State<Ops>) -> Response {
    if ops.health.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        let body = json!({"status": "not ready", "reason": ops.health.reason()});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// The Prometheus text exposition. Upkeep runs first because without the exporter's HTTP
/// listener nothing else drains histogram buckets.
async fn render_metrics(State(ops): State<Ops>) -> Response {
    ops.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render()).into_response()
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and
/// returns once in-flight requests have finished.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "http listening");
    }
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
