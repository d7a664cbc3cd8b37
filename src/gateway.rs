//! The worker gateway: the part of Antenna's HTTP API that pull-mode workers (ADC) speak, so an
//! unmodified worker can be pointed at tally (SPEC §5, `antenna/jobs-protocol.md` §1.3–1.4, §4).
//!
//! - [`auth`]: `Authorization: Token <key>` against `authtoken_token`, cached briefly.
//! - [`claim`]: `GET /api/v2/jobs?ids_only=1…` and `/api/v2/jobs/next`: one job per claim,
//!   least-recently-served first, under `FOR UPDATE SKIP LOCKED`.
//! - [`tasks`]: `POST /api/v2/jobs/{id}/tasks/`: tasks pulled from the job's consumer.
//! - [`result`]: `POST /api/v2/jobs/{id}/result/`: results checked and published to
//!   `tally.results.{id}`; no database write.
//! - [`queue`]: the job task queues over the one NATS connection: consumer handles, pulls,
//!   which jobs have deliverable tasks.
//! - [`heartbeat`]: processing services marked seen off the request path, and marked offline
//!   by a periodic sweep.
//! - [`job`]: the job a request names.
//! - [`body`], [`error`], [`observe`]: request bodies, JSON errors, request metrics.
//!
//! The gateway needs no bootstrap: [`start`] returns at once and connects to Postgres and NATS
//! in the background (requests answer 503 until then), so it serves while ingest rebuilds its
//! dataflow. It has its own pool and its own NATS connection, so worker traffic never waits
//! behind an ingest transaction.

pub mod auth;
pub mod body;
pub mod claim;
pub mod error;
pub mod heartbeat;
pub mod job;
pub mod observe;
pub mod queue;
pub mod result;
pub mod tasks;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{DbArgs, NatsArgs};
use crate::duration::parse_secs;
use crate::ingest::nats::ConsumerArgs;
use crate::retry::{self, BackoffBuilder};
use crate::startup::{Failure, Wait, Waiting};
use crate::store::{self, Store};

pub use error::GatewayError;

/// Options of the worker gateway (`tally serve`).
#[derive(Clone, Debug, Args)]
pub struct GatewayArgs {
    /// Do not serve the worker API (only /healthz, /readyz and /metrics).
    #[arg(long, env = "TALLY_NO_GATEWAY")]
    pub no_gateway: bool,
    /// Largest request body in bytes; larger ones get 413. ADC has sent 110–142 MB result
    /// bodies with its ~29,000-class global model. The body is held once in memory: results
    /// are published as slices of it, large ones by claim check (NATS' max_payload is never
    /// the limit).
    #[arg(long, env = "TALLY_GATEWAY_MAX_BODY_BYTES", default_value_t = 256 << 20)]
    pub gateway_max_body_bytes: usize,
    /// Postgres sessions of the gateway (a pool of its own, beside ingest's).
    #[arg(long, env = "TALLY_GATEWAY_POOL_SIZE", default_value_t = 8)]
    pub gateway_pool_size: usize,
    /// Statement timeout of the gateway's sessions (a bare number is seconds; workers time
    /// out at 30 s).
    #[arg(long, env = "TALLY_GATEWAY_STATEMENT_TIMEOUT", value_parser = parse_secs, default_value = "10")]
    pub gateway_statement_timeout: Duration,
    /// Seconds a verified token is trusted without asking the database again (a revoked
    /// token keeps working this long).
    #[arg(long, env = "TALLY_GATEWAY_AUTH_CACHE", value_parser = parse_secs, default_value = "60")]
    pub gateway_auth_cache: Duration,
    /// Most tasks one /tasks call may ask for (Antenna has no bound; JetStream's
    /// max_ack_pending, 1000 by default, is the effective one).
    #[arg(long, env = "TALLY_GATEWAY_MAX_BATCH_SIZE", default_value_t = 1000)]
    pub gateway_max_batch_size: usize,
    /// Seconds a /tasks call waits for tasks when none is ready (Antenna: 0.5).
    #[arg(long, env = "TALLY_GATEWAY_FETCH_WAIT", value_parser = parse_secs, default_value = "0.5")]
    pub gateway_fetch_wait: Duration,
    /// Seconds a claim reuses what it learnt about a job's consumer (whether it has
    /// deliverable tasks) before asking NATS again.
    #[arg(long, env = "TALLY_GATEWAY_DELIVERABLE_TTL", value_parser = parse_secs, default_value = "1")]
    pub gateway_deliverable_ttl: Duration,
    /// A processing service is marked seen at most once per this many seconds per key
    /// (Antenna's HEARTBEAT_THROTTLE_SECONDS).
    #[arg(long, env = "TALLY_HEARTBEAT_INTERVAL", value_parser = parse_secs, default_value = "30")]
    pub heartbeat_interval: Duration,
    /// Async processing services unseen for this many seconds are marked offline (Antenna's
    /// PROCESSING_SERVICE_LAST_SEEN_MAX).
    #[arg(long, env = "TALLY_HEARTBEAT_OFFLINE_AFTER", value_parser = parse_secs, default_value = "60")]
    pub heartbeat_offline_after: Duration,
    /// Seconds between two sweeps for offline services (Antenna's beat task: 300).
    #[arg(long, env = "TALLY_HEARTBEAT_SWEEP_EVERY", value_parser = parse_secs, default_value = "30")]
    pub heartbeat_sweep_every: Duration,
}

impl Default for GatewayArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
    }
}

/// The one NATS connection of the gateway and its JetStream context.
#[derive(Clone)]
pub struct Nats {
    /// The connection (reconnects on its own once established).
    pub client: async_nats::Client,
    /// JetStream over it.
    pub js: jetstream::Context,
}

/// What every request handler shares.
pub struct Gateway {
    /// Settings.
    pub args: GatewayArgs,
    /// Subject names (results go to `results_subject(job)`).
    pub nats_args: NatsArgs,
    /// Set once Postgres answers; requests that need it get 503 before.
    store: OnceLock<Store>,
    /// Set once NATS answers; requests that need it get 503 before.
    nats: OnceLock<Nats>,
    /// The object store bucket of large results, set once NATS answers and it exists.
    objects: OnceLock<crate::results_stream::Objects>,
    /// Django's query cache, invalidated after heartbeat writes (unset: none).
    django: OnceLock<crate::django_cache::DjangoCache>,
    /// True once both are set (`tally serve --no-ingest` is ready then).
    connected: watch::Sender<bool>,
    /// Verified tokens.
    pub tokens: auth::TokenCache,
    /// Consumer handles and what is known about each job's queue.
    pub queues: queue::Queues,
    /// Facts about jobs that never change (pipeline, project).
    pub jobs: job::JobCache,
    /// Where handlers drop heartbeats for the background writer.
    pub heartbeats: heartbeat::Heartbeats,
    /// What the gateway is waiting for while it connects.
    pub waiting: Waiting,
    /// Set when connecting failed in a way retrying cannot fix (no such database, bad
    /// credentials).
    failed: OnceLock<String>,
    /// The writer's end, taken by [`Gateway::run_background`].
    heartbeat_rx: Mutex<Option<mpsc::Receiver<heartbeat::Beat>>>,
}

impl Gateway {
    /// A gateway with no connections yet (see [`Gateway::set_store`], [`Gateway::set_nats`]).
    pub fn new(nats_args: NatsArgs, args: GatewayArgs) -> Arc<Gateway> {
        let (heartbeats, rx) = heartbeat::Heartbeats::channel();
        Arc::new(Gateway {
            tokens: auth::TokenCache::new(args.gateway_auth_cache),
            queues: queue::Queues::new(args.gateway_deliverable_ttl),
            jobs: job::JobCache::default(),
            heartbeats,
            heartbeat_rx: Mutex::new(Some(rx)),
            waiting: Waiting::default(),
            failed: OnceLock::new(),
            store: OnceLock::new(),
            nats: OnceLock::new(),
            objects: OnceLock::new(),
            django: OnceLock::new(),
            connected: watch::Sender::new(false),
            nats_args,
            args,
        })
    }

    /// A gateway over connections made elsewhere (tests, benchmarks).
    pub fn connected(store: Store, client: async_nats::Client, nats_args: NatsArgs, args: GatewayArgs) -> Arc<Gateway> {
        let gateway = Gateway::new(nats_args, args);
        gateway.set_store(store);
        gateway.set_nats(client);
        gateway
    }

    /// Hands the gateway its Postgres pool (the first call wins).
    pub fn set_store(&self, store: Store) {
        let _ = self.store.set(store);
        self.update_connected();
    }

    /// Hands the gateway its NATS connection (the first call wins).
    pub fn set_nats(&self, client: async_nats::Client) {
        let js = jetstream::new(client.clone());
        let _ = self.nats.set(Nats { client, js });
        self.update_connected();
    }

    fn update_connected(&self) {
        if self.store.get().is_some() && self.nats.get().is_some() {
            self.connected.send_replace(true);
        }
    }

    /// The pool, or 503 while Postgres has not answered yet.
    pub fn store(&self) -> Result<&Store, GatewayError> {
        self.store.get().ok_or(GatewayError::Starting("the database is not connected yet"))
    }

    /// What the gateway is waiting for, e.g. `waiting for NATS at nats://…: connection
    /// refused`; `None` once connected (or before its first attempt).
    pub fn waiting_for(&self) -> Option<String> {
        self.waiting.reason()
    }

    /// Why the gateway gave up connecting, if it did (retrying could not help).
    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// The NATS connection, if made.
    pub fn nats(&self) -> Option<&Nats> {
        self.nats.get()
    }

    /// The object store bucket of large results, once it exists.
    pub fn objects(&self) -> Option<&crate::results_stream::Objects> {
        self.objects.get()
    }

    /// Hands the gateway the bucket of large results (the first call wins).
    pub fn set_objects(&self, objects: crate::results_stream::Objects) {
        let _ = self.objects.set(objects);
    }

    /// Hands the gateway Django's query cache (the first call wins).
    pub fn set_django_cache(&self, django: crate::django_cache::DjangoCache) {
        let _ = self.django.set(django);
    }

    /// Django's query cache (disabled until set).
    pub fn django_cache(&self) -> crate::django_cache::DjangoCache {
        self.django.get().cloned().unwrap_or_else(crate::django_cache::DjangoCache::disabled)
    }

    /// Waits until both Postgres and NATS are connected.
    pub async fn wait_connected(&self) {
        let mut rx = self.connected.subscribe();
        let _ = rx.wait_for(|connected| *connected).await;
    }

    /// Runs the heartbeat writer and the offline sweep until `shutdown`. Only the first call
    /// does anything.
    pub fn run_background(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let rx = self.heartbeat_rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            match rx {
                Some(rx) => heartbeat::run(gateway, rx, shutdown).await,
                None => warn!("the gateway's background tasks are already running"),
            }
        })
    }
}

/// The worker API routes (merge with [`crate::http::ops_router`] and serve with
/// [`crate::http::serve`]). Paths are served with and without the trailing slash.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.args.gateway_max_body_bytes;
    let observed = |route: &'static str| middleware::from_fn_with_state(route, observe::observe);
    Router::new()
        .route("/api/v2/jobs", get(claim::list).layer(observed("claim")))
        .route("/api/v2/jobs/", get(claim::list).layer(observed("claim")))
        .route("/api/v2/jobs/next", get(claim::next).layer(observed("next")))
        .route("/api/v2/jobs/next/", get(claim::next).layer(observed("next")))
        .route("/api/v2/jobs/{id}/tasks", post(tasks::post).layer(observed("tasks")))
        .route("/api/v2/jobs/{id}/tasks/", post(tasks::post).layer(observed("tasks")))
        .route("/api/v2/jobs/{id}/result", post(result::post).layer(observed("result")))
        .route("/api/v2/jobs/{id}/result/", post(result::post).layer(observed("result")))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(error::json_rejections))
        .layer(middleware::from_fn_with_state(Arc::clone(&gateway), error::forget_stale_statements))
        .with_state(gateway)
}

/// Starts a gateway for `tally serve`: returns at once; connects to Postgres and NATS in the
/// background (retrying until `shutdown`), makes sure the results stream exists, and runs the
/// heartbeat writer and sweep. The handle finishes after `shutdown`.
pub fn start(
    db: &DbArgs,
    nats: &NatsArgs,
    results: &ConsumerArgs,
    args: &GatewayArgs,
    shutdown: CancellationToken,
) -> (Arc<Gateway>, JoinHandle<()>) {
    crate::metrics::install();
    let gateway = Gateway::new(nats.clone(), args.clone());
    let mut db = db.clone();
    db.pool_size = args.gateway_pool_size;
    db.statement_timeout = args.gateway_statement_timeout;
    let results = results.clone();
    let g = Arc::clone(&gateway);
    let handle = tokio::spawn(async move {
        let background = g.run_background(shutdown.clone());
        tokio::join!(connect_store(&g, &db, &shutdown), connect_nats(&g, &results, &shutdown));
        let _ = background.await;
    });
    (gateway, handle)
}

/// Connects to Postgres, one attempt at a time with backoff, until it answers or `shutdown`;
/// what it waits for is in [`Gateway::waiting_for`].
async fn connect_store(gateway: &Gateway, db: &DbArgs, shutdown: &CancellationToken) {
    let wait = Wait {
        service: "Postgres",
        at: store::connect::describe(&db.database_url),
        deadline: None,
        deadline_setting: Duration::ZERO,
        shutdown,
        first_backoff: db.connect_backoff,
        waiting: &gateway.waiting,
    };
    let attempt = || async {
        store::connect::connect_once(db)
            .await
            .map_err(|e| Failure { message: e.to_string(), permanent: e.is_permanent() })
    };
    match wait.until(attempt).await {
        Ok(Some(store)) => {
            check_table(&store).await;
            gateway.set_store(store);
            info!("gateway connected to the database");
        }
        Ok(None) => {}
        Err(e) => {
            // A permanent error: keep saying so (503s and `/readyz`) until shutdown.
            error!(error = %e, "the gateway cannot use the database");
            gateway.waiting.set("Postgres", e.to_string());
            let _ = gateway.failed.set(e.to_string());
        }
    }
}

/// Warns when `tally migrate` has not created the gateway's table (claims fail until it has).
async fn check_table(store: &Store) {
    let exists = async {
        let client = store.client().await.ok()?;
        let row = client.query_one("SELECT to_regclass('tally.job_dispatch') IS NOT NULL", &[]).await.ok()?;
        row.try_get::<_, bool>(0).ok()
    };
    if exists.await == Some(false) {
        warn!("table tally.job_dispatch does not exist: claims fail until `tally migrate` runs");
    }
}

/// Connects to NATS (one attempt at a time with backoff, until `shutdown`), then makes sure
/// the results stream exists.
async fn connect_nats(gateway: &Gateway, results: &ConsumerArgs, shutdown: &CancellationToken) {
    let wait = Wait {
        service: "NATS",
        at: gateway.nats_args.redacted_url(),
        deadline: None,
        deadline_setting: Duration::ZERO,
        shutdown,
        first_backoff: Duration::from_millis(100),
        waiting: &gateway.waiting,
    };
    let Ok(Some(client)) =
        wait.until(|| async { gateway.nats_args.connect_once().await.map_err(Failure::transient) }).await
    else {
        return;
    };
    gateway.set_nats(client);
    info!("gateway connected to NATS");
    let Some(nats) = gateway.nats() else { return };
    // Results published before the stream exists would be refused; ingest creates it too,
    // but may be off or still bootstrapping.
    let mut backoff = retry::gateway_stream().build();
    loop {
        let ready = async {
            crate::ingest::nats::ensure_stream(&nats.js, &gateway.nats_args, results)
                .await
                .map_err(|e| e.to_string())?;
            crate::results_stream::ensure_bucket(&nats.js, &gateway.nats_args.results_object_bucket, results.max_age())
                .await
                .map_err(|e| e.to_string())
        };
        match ready.await {
            Ok(objects) => {
                gateway.set_objects(objects);
                return;
            }
            Err(e) => {
                let pause = retry::pause(&mut backoff);
                warn!(error = %e, retry_in = ?pause, "gateway cannot set up the results stream yet");
                tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.cancelled() => return }
            }
        }
    }
}
