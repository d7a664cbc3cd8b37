//! `tally serve`: the daemon. Serves `/healthz`, `/readyz`, `/metrics` and the worker API
//! (the gateway, which needs no bootstrap) at once, rebuilds the dataflow from Postgres
//! (correcting any count that differs), then consumes results until SIGTERM or SIGINT, when it
//! finishes and acks the batch in hand and exits. Beside ingest runs the job monitor (lost
//! images marked failed, finished jobs' queues deleted; `crate::jobs::monitor`). `--no-ingest`
//! and `--no-gateway` turn either half off.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{DbArgs, NatsArgs};
use crate::django_cache::{DjangoCache, DjangoCacheArgs};
use crate::gateway::{self, Gateway, GatewayArgs};
use crate::http::{self, Health};
use crate::ingest::batch::Ingestor;
use crate::ingest::daemon::{self, Hooks, IngestArgs};
use crate::jobs::monitor::{self, MonitorArgs, ResultsConsumer};
use crate::startup::{self, Failure, Wait, Waiting};
use crate::{dead_letters, metrics, store};

/// Options of `tally serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
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
    #[arg(long, env = "TALLY_STARTUP_DEADLINE", value_parser = gateway::parse_seconds, default_value = "0")]
    pub startup_deadline: Duration,
}

/// Advisory lock key held by the one ingest process allowed per database.
const INGEST_LOCK: i64 = 7_243_111;

/// Runs the daemon until a signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.no_ingest && args.gateway.no_gateway {
        anyhow::bail!("--no-ingest and --no-gateway leave nothing to run");
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let health = Arc::new(Health::default());
    health.set_not_ready("starting");
    // Postgres and NATS must answer within the deadline, counted from here.
    let deadline = startup::deadline(args.startup_deadline);
    let handle = metrics::install();
    let django = DjangoCache::new(&args.django_cache)?;
    tokio::spawn(django.clone().run_retries(Duration::from_secs(5), shutdown.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let mut router = http::ops_router(Arc::clone(&health), handle);
    // The gateway connects in the background and serves while ingest bootstraps.
    let gateway = (!args.gateway.no_gateway)
        .then(|| gateway::start(&args.db, &args.nats, &args.ingest.consumer, &args.gateway, shutdown.clone()));
    if let Some((g, _)) = &gateway {
        g.set_django_cache(django.clone());
        router = router.merge(gateway::router(Arc::clone(g)));
    }
    let server = tokio::spawn(http::serve(listener, router, shutdown.clone()));

    let result = match (&gateway, args.no_ingest) {
        (Some((g, _)), true) => {
            gateway_only(&args, Arc::clone(g), Arc::clone(&health), deadline, shutdown.clone()).await
        }
        _ => ingest(&args, django, Arc::clone(&health), deadline, shutdown.clone()).await,
    };
    shutdown.cancel();
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
    match result {
        Ok(()) => {
            info!("tally stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            error!(error = %e, "tally stopped on an error");
            Err(e)
        }
    }
}

/// Waits for Postgres and NATS side by side (each retried with backoff until `deadline`),
/// saying in `/readyz` what is still missing. `None`: shutdown came first.
async fn connect_both(
    args: &ServeArgs,
    health: &Health,
    deadline: Option<std::time::Instant>,
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
    let postgres = wait(
        "Postgres",
        store::connect::describe(&args.db.database_url),
        Duration::from_millis(args.db.connect_backoff_ms),
    );
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
    args: &ServeArgs,
    django: DjangoCache,
    health: Arc<Health>,
    deadline: Option<std::time::Instant>,
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

    // One ingest writer per database: a second `tally serve` waits here (and is not ready).
    health.set_not_ready("waiting for the ingest lock (another tally serve holds it)");
    let lock = store.client().await?;
    loop {
        let got: bool = lock.query_one("SELECT pg_try_advisory_lock($1)", &[&INGEST_LOCK]).await?.get(0);
        if got {
            break;
        }
        warn!("another tally serve is ingesting into this database; waiting for its lock");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }

    health.set_not_ready("rebuilding the dataflow from Postgres");
    let mut ingestor = Ingestor::start(
        store.clone(),
        args.ingest.workers,
        args.nats.results_subject_prefix.clone(),
        args.ingest.max_result_bytes,
    )
    .await?;
    ingestor.set_django_cache(django).await;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let monitor = spawn_job_monitor(args, &store, &client, ingestor.django_cache(), shutdown.child_token());
    let ran = daemon::run(ingestor, client.clone(), &args.nats, &args.ingest, health, Hooks::default(), shutdown).await;
    monitor.abort();
    ran?;
    // Make sure every ack left the client before exiting.
    if let Err(e) = client.flush().await {
        warn!(error = %e, "flushing NATS at shutdown failed");
    }
    drop(lock);
    Ok(())
}

/// The job monitor (lost images, finished jobs' queues) beside ingest: only the process holding
/// the ingest lock runs it, so there is one per database.
fn spawn_job_monitor(
    args: &ServeArgs,
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
    args: &ServeArgs,
    gateway: Arc<Gateway>,
    health: Arc<Health>,
    deadline: Option<std::time::Instant>,
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
            first_backoff: Duration::from_millis(args.db.connect_backoff_ms),
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
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
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

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: finishing the batch in hand, then stopping"),
            _ = terminate => info!("SIGTERM: finishing the batch in hand, then stopping"),
        }
        shutdown.cancel();
    });
}
