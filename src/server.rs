//! `server::start`: the one place the daemon is put together. The CLI (`tally serve`), the
//! benchmarks and the tests all start tally through it, so what they run is what production
//! runs.
//!
//! It serves `/healthz`, `/readyz`, `/metrics` and the worker API (the gateway, which needs no
//! bootstrap) at once, then, in the background, waits for Postgres and NATS, takes the ingest
//! lock, rebuilds the dataflow from Postgres (correcting any count that differs) and consumes
//! results until `shutdown`, when it finishes and acks the batch in hand. Beside ingest runs
//! the job monitor (lost images marked failed, finished jobs' queues deleted;
//! `crate::jobs::monitor`). `--no-ingest` and `--no-gateway` turn either half off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{DbArgs, NatsArgs};
use crate::django_cache::{DjangoCache, DjangoCacheArgs};
use crate::gateway::{self, Gateway, GatewayArgs};
use crate::http::{self, Health};
use crate::ingest::batch::{AfterCommit, Ingestor};
use crate::ingest::daemon::{self, Hooks, IngestArgs};
use crate::ingest::IngestError;
use crate::jobs::monitor::{self, MonitorArgs, ResultsConsumer};
use crate::startup::{self, Failure, Wait, Waiting};
use crate::{dead_letters, metrics, store};

/// What the daemon runs with: the options of `tally serve` (flags and environment), plus the
/// observers tests and benchmarks attach.
#[derive(Debug, Args)]
pub struct Config {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// NATS options.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Ingest options.
    #[command(flatten)]
    pub ingest: IngestArgs,
    /// Worker gateway options.
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Django's query cache (django-cachalot), invalidated after tally's writes.
    #[command(flatten)]
    pub django_cache: DjangoCacheArgs,
    /// Job monitor options (lost images, finished jobs' queues; runs with ingest).
    #[command(flatten)]
    pub monitor: MonitorArgs,
    /// The dataflow cluster (timely's `-n`, `-p`, `-h`; `-w` is per process).
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// Print help (`-h` is the hostfile, as in timely).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// Do not ingest results (serve the worker API only; another `tally serve` ingests).
    #[arg(long, env = "TALLY_NO_INGEST")]
    pub no_ingest: bool,
    /// Address of the operations endpoints (/healthz, /readyz, /metrics) and the worker API.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Run `tally migrate` first.
    #[arg(long, env = "TALLY_MIGRATE")]
    pub migrate: bool,
    /// Seconds Postgres and NATS may take to answer at start (each retried with backoff,
    /// not ready meanwhile); past it, exit with an error. 0: wait forever.
    #[arg(long, env = "TALLY_STARTUP_DEADLINE", value_parser = crate::duration::parse_secs, default_value = "0")]
    pub startup_deadline: Duration,
    /// Observers of the ingest loop (tests and benchmarks count acked batches with it).
    #[arg(skip)]
    pub hooks: Hooks,
    /// How ingest keeps counts: always incrementally in `tally serve`; the ingest benchmark
    /// also runs the daemon without them, to compare.
    #[arg(skip)]
    pub counts: Counts,
    /// Take the per-database ingest lock before ingesting (always true but in the test that
    /// runs two ingest loops on one database on purpose, to prove the progress writes exact
    /// without it).
    #[arg(skip = true)]
    pub ingest_lock: bool,
}

impl Config {
    /// The daemon over the database at `database_url` and the NATS server of `nats`, with
    /// every other setting at its default (tests, benchmarks).
    pub fn new(db: DbArgs, nats: NatsArgs) -> Config {
        Config {
            db,
            nats,
            ingest: IngestArgs::default(),
            gateway: GatewayArgs::default(),
            django_cache: DjangoCacheArgs::default(),
            monitor: MonitorArgs::default(),
            cluster: crate::cluster::ClusterArgs::default(),
            help: None,
            no_ingest: false,
            listen: ([127, 0, 0, 1], 0).into(),
            migrate: false,
            startup_deadline: Duration::ZERO,
            hooks: Hooks::default(),
            counts: Counts::default(),
            ingest_lock: true,
        }
    }
}

/// How ingest keeps the stored counts.
#[derive(Clone, Default)]
pub enum Counts {
    /// The dataflow, bootstrapped from Postgres, writes the changed counts in each batch's
    /// transaction (tally).
    #[default]
    Incremental,
    /// No bootstrap and no count writes; `after_commit`, if any, runs after each batch commits
    /// and before its acks (`tally-tools bench ingest` recomputes counts in SQL there, as
    /// Antenna does, to measure the difference).
    Unkept {
        /// Work after each commit, given the batch's deployments.
        after_commit: Option<AfterCommit>,
    },
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counts::Incremental => f.write_str("Incremental"),
            Counts::Unkept { after_commit } => {
                f.debug_struct("Unkept").field("after_commit", &after_commit.as_ref().map(|_| "…")).finish()
            }
        }
    }
}

/// Advisory lock key held by the one ingest process allowed per database.
const INGEST_LOCK: i64 = 7_243_111;

/// The daemon, running.
pub struct Running {
    /// Where the operations endpoints and the worker API answer (the bound address, so a
    /// `listen` port of 0 is resolved).
    pub addr: SocketAddr,
    /// Readiness, and why not: what `/readyz` reports.
    pub health: Arc<Health>,
    /// Django's query cache it invalidates after its writes (what is still pending, when
    /// Redis is down).
    pub django: DjangoCache,
    /// The worker gateway, unless `--no-gateway` (its connection state, for callers that wait
    /// for it).
    pub gateway: Option<Arc<Gateway>>,
    /// The token [`start`] was given; cancelling it stops the daemon.
    shutdown: CancellationToken,
    /// Ingest (or the gateway alone), then the HTTP server and the gateway's background
    /// tasks, drained in that order.
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the daemon stops: after `shutdown` once the batch in hand is committed and
    /// acked, or on an error it cannot recover from.
    pub async fn wait(self) -> anyhow::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the daemon's task failed: {e}")),
        }
    }

    /// Stops the daemon (as SIGTERM does) and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits up to `timeout` for `/readyz` to say ready (ingest bootstrapped and consuming,
    /// or the gateway connected). An error says why not: the daemon's own error if it stopped,
    /// else what `/readyz` still reports.
    pub async fn until_ready(self, timeout: Duration) -> anyhow::Result<Running> {
        let deadline = Instant::now() + timeout;
        while !self.health.is_ready() {
            if self.task.is_finished() {
                let reason = self.health.reason();
                return Err(match self.wait().await {
                    Ok(()) => anyhow::anyhow!("tally stopped before it was ready ({reason})"),
                    Err(e) => e.context(format!("tally stopped before it was ready ({reason})")),
                });
            }
            if Instant::now() >= deadline {
                let reason = self.health.reason();
                self.shutdown.cancel();
                anyhow::bail!("tally was not ready within {timeout:?}: {reason}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self)
    }
}

/// Starts the daemon: binds `config.listen` and serves at once, and returns; the rest comes up
/// in the background (see the module's documentation). Cancelling `shutdown` stops it.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    if config.no_ingest && config.gateway.no_gateway {
        anyhow::bail!("--no-ingest and --no-gateway leave nothing to run");
    }
    let health = Arc::new(Health::default());
    health.set_not_ready("starting");
    // Postgres and NATS must answer within the deadline, counted from here.
    let deadline = startup::deadline(config.startup_deadline);
    let handle = metrics::install();
    let django = DjangoCache::new(&config.django_cache)?;
    tokio::spawn(django.clone().run_retries(Duration::from_secs(5), shutdown.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut router = http::ops_router(Arc::clone(&health), handle);
    // The gateway connects in the background and serves while ingest bootstraps.
    let gateway = (!config.gateway.no_gateway)
        .then(|| gateway::start(&config.db, &config.nats, &config.ingest.consumer, &config.gateway, shutdown.clone()));
    if let Some((g, _)) = &gateway {
        g.set_django_cache(django.clone());
        router = router.merge(gateway::router(Arc::clone(g)));
    }
    let server = tokio::spawn(http::serve(listener, router, shutdown.clone()));

    let (h, d) = (Arc::clone(&health), django.clone());
    let served_gateway = gateway.as_ref().map(|(g, _)| Arc::clone(g));
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let result = match (&gateway, config.no_ingest) {
            (Some((g, _)), true) => gateway_only(&config, Arc::clone(g), h, deadline, token.clone()).await,
            _ => ingest(&config, d, h, deadline, token.clone()).await,
        };
        token.cancel();
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "http server stopped with an error"),
            Err(e) => warn!(error = %e, "http server task failed"),
        }
        if let Some((_, background)) = gateway {
            if let Err(e) = background.await {
                warn!(error = %e, "gateway background task failed");
            }
        }
        result
    });
    Ok(Running { addr, health, django, gateway: served_gateway, shutdown, task })
}

/// Waits for Postgres and NATS side by side (each retried with backoff until `deadline`),
/// saying in `/readyz` what is still missing. `None`: shutdown came first.
async fn connect_both(
    args: &Config,
    health: &Health,
    deadline: Option<Instant>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(store::Store, async_nats::Client)>> {
    let waiting = Waiting::default();
    let wait = |service, at, first_backoff| Wait {
        service,
        at,
        deadline,
        deadline_setting: args.startup_deadline,
        shutdown,
        first_backoff,
        waiting: &waiting,
    };
    let postgres = wait("Postgres", store::connect::describe(&args.db.database_url), args.db.connect_backoff);
    let nats = wait("NATS", args.nats.redacted_url(), Duration::from_millis(100));
    let pg = postgres.until(|| async {
        store::connect::connect_once(&args.db)
            .await
            .map_err(|e| Failure { message: e.to_string(), permanent: e.is_permanent() })
    });
    let js = nats.until(|| async { args.nats.connect_once().await.map_err(Failure::transient) });
    let report = async {
        loop {
            if let Some(reason) = waiting.reason() {
                health.set_not_ready(reason);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let both = async { tokio::try_join!(pg, js) };
    let (store, client) = tokio::select! {
        r = both => r?,
        _ = report => unreachable!("the report loop never ends"),
    };
    let connected = store.zip(client);
    if connected.is_some() {
        info!("connected to Postgres and NATS");
    }
    Ok(connected)
}

async fn ingest(
    args: &Config,
    django: DjangoCache,
    health: Arc<Health>,
    deadline: Option<Instant>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    health.set_not_ready("connecting to Postgres and NATS");
    let Some((store, client)) = connect_both(args, &health, deadline, &shutdown).await? else {
        return Ok(());
    };
    if args.migrate {
        store::migrate::migrate(&store).await?;
    }
    store::check::check_schema(&store).await?;
    dead_letters::check_table(&store).await?;

    let lock = if args.ingest_lock {
        match take_ingest_lock(&store, &health, &shutdown).await? {
            Some(lock) => Some(lock),
            None => return Ok(()),
        }
    } else {
        None
    };

    health.set_not_ready("rebuilding the dataflow from Postgres");
    let (prefix, max_bytes) = (args.nats.results_subject_prefix.clone(), args.ingest.max_result_bytes);
    let mut ingestor = match &args.counts {
        Counts::Incremental => {
            let topology = args.cluster.topology(args.ingest.workers)?;
            if topology.processes() > 1 {
                health.set_not_ready(format!("waiting for the dataflow cluster ({topology}), then rebuilding"));
            }
            match Ingestor::start(store.clone(), topology, prefix, max_bytes, shutdown.clone()).await {
                Err(IngestError::Stopped) => return Ok(()),
                started => started?,
            }
        }
        Counts::Unkept { after_commit } => {
            let mut ingestor = Ingestor::without_counts(store.clone(), prefix, max_bytes).await?;
            if let Some(hook) = after_commit {
                ingestor.set_after_commit(std::sync::Arc::clone(hook));
            }
            ingestor
        }
    };
    ingestor.set_write_method(args.ingest.write_method);
    ingestor.set_django_cache(django).await;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let monitor = spawn_job_monitor(args, &store, &client, ingestor.django_cache(), shutdown.child_token());
    let ran =
        daemon::run(ingestor, client.clone(), &args.nats, &args.ingest, health, args.hooks.clone(), shutdown).await;
    monitor.abort();
    ran?;
    // Make sure every ack left the client before exiting.
    if let Err(e) = client.flush().await {
        warn!(error = %e, "flushing NATS at shutdown failed");
    }
    drop(lock);
    Ok(())
}

/// One ingest writer per database: a second `tally serve` waits here (and is not ready) until
/// the first stops. The lock lives as long as the returned session; `None`: shutdown came first.
async fn take_ingest_lock(
    store: &store::Store,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<deadpool_postgres::Object>> {
    health.set_not_ready("waiting for the ingest lock (another tally serve holds it)");
    let lock = store.client().await?;
    loop {
        let got: bool = lock.query_one("SELECT pg_try_advisory_lock($1)", &[&INGEST_LOCK]).await?.get(0);
        if got {
            return Ok(Some(lock));
        }
        warn!("another tally serve is ingesting into this database; waiting for its lock");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// The job monitor (lost images, finished jobs' queues) beside ingest: only the process holding
/// the ingest lock runs it, so there is one per database.
fn spawn_job_monitor(
    args: &Config,
    store: &store::Store,
    client: &async_nats::Client,
    django: DjangoCache,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let results =
        ResultsConsumer { stream: args.nats.results_stream.clone(), consumer: args.ingest.consumer.consumer.clone() };
    monitor::spawn(store.clone(), client.clone(), args.monitor.clone(), Some(results), django, stop)
}

/// `--no-ingest`: migrates if asked, is ready once the gateway reaches Postgres and NATS, and
/// runs until a signal.
async fn gateway_only(
    args: &Config,
    gateway: Arc<Gateway>,
    health: Arc<Health>,
    deadline: Option<Instant>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if args.migrate {
        health.set_not_ready("waiting for Postgres to migrate");
        let waiting = Waiting::default();
        let wait = Wait {
            service: "Postgres",
            at: store::connect::describe(&args.db.database_url),
            deadline,
            deadline_setting: args.startup_deadline,
            shutdown: &shutdown,
            first_backoff: args.db.connect_backoff,
            waiting: &waiting,
        };
        let attempt = || async {
            store::connect::connect_once(&args.db)
                .await
                .map_err(|e| Failure { message: e.to_string(), permanent: e.is_permanent() })
        };
        let Some(store) = wait.until(attempt).await? else { return Ok(()) };
        health.set_not_ready("migrating");
        store::migrate::migrate(&store).await?;
    }
    health.set_not_ready("gateway connecting to Postgres and NATS");
    let connected = gateway.wait_connected();
    tokio::pin!(connected);
    loop {
        tokio::select! {
            _ = &mut connected => break,
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if let Some(failure) = gateway.failed() {
            anyhow::bail!("the gateway cannot start: {failure}");
        }
        let reason = gateway.waiting_for();
        if let Some(reason) = &reason {
            health.set_not_ready(reason.clone());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            anyhow::bail!(
                "the gateway did not reach Postgres and NATS within the start-up deadline of {} s: {}",
                args.startup_deadline.as_secs_f64(),
                reason.unwrap_or_else(|| "still connecting".into())
            );
        }
    }
    health.set_ready();
    info!("serving the worker API only (--no-ingest)");
    shutdown.cancelled().await;
    Ok(())
}
