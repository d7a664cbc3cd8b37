//! The system under test, in this process: ingest (the pull loop `tally serve` runs, with its
//! bootstrap) and the worker gateway (started exactly as `tally serve` starts it) served on
//! `127.0.0.1:0`, both on a tokio runtime of their own.
//!
//! A runtime of their own keeps the benchmark's clients (up to 32 pollers, the simulated
//! workers, the progress sampler) off the server's scheduler, as a separate process would, while
//! the run keeps what in-process buys: the port is known at once, ingest reports each batch's
//! acks, and a failure anywhere stops everything and still cleans up. Its threads are named
//! `tally-serve`, so a profiler tells server time from client time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tally::config::{DbArgs, NatsArgs};
use tally::gateway::{self, GatewayArgs};
use tally::http::Health;
use tally::ingest::batch::Ingestor;
use tally::ingest::daemon::{self, Hooks, IngestArgs};
use tally::store;

/// Ingest and the gateway, running.
pub struct Server {
    /// Where the worker API answers.
    pub addr: SocketAddr,
    /// Results ingest has saved and acked so far.
    pub saved: Arc<AtomicU64>,
    /// Results ingest has dead-lettered so far (none is expected).
    pub dead_lettered: Arc<AtomicU64>,
    /// Ingest's readiness and, when stuck, why.
    pub health: Arc<Health>,
    /// Stops everything.
    shutdown: CancellationToken,
    /// The tasks to wait for at [`Server::stop`].
    tasks: Vec<JoinHandle<()>>,
    /// The server's runtime; `None` once stopped.
    runtime: Option<Runtime>,
}

/// What the server's runtime hands back once everything is up.
struct Started {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Bootstraps ingest from the database at `url` (migrated and seeded), then starts the pull
    /// loop and the gateway on `threads` worker threads of a runtime of their own.
    pub async fn start(url: &str, nats_args: &NatsArgs, ingest: IngestArgs, threads: usize) -> anyhow::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("tally-serve")
            .enable_all()
            .build()
            .context("starting the server's runtime")?;
        let shutdown = CancellationToken::new();
        let saved = Arc::new(AtomicU64::new(0));
        let dead_lettered = Arc::new(AtomicU64::new(0));
        let health = Arc::new(Health::default());
        let up = runtime.spawn(start_inner(
            url.to_string(),
            nats_args.clone(),
            ingest,
            shutdown.clone(),
            Arc::clone(&saved),
            Arc::clone(&dead_lettered),
            Arc::clone(&health),
        ));
        let mut server = Server {
            addr: ([127, 0, 0, 1], 0).into(),
            saved,
            dead_lettered,
            health,
            shutdown,
            tasks: Vec::new(),
            runtime: Some(runtime),
        };
        // On an error, dropping `server` stops whatever had started.
        let started = up.await.context("the server's start task failed")??;
        server.addr = started.addr;
        server.tasks = started.tasks;
        Ok(server)
    }

    /// Results saved and acked so far.
    pub fn saved(&self) -> u64 {
        self.saved.load(Ordering::Relaxed)
    }

    /// Ingest's state, for error messages: `ready`, or why not.
    pub fn state(&self) -> String {
        if self.health.is_ready() {
            "ready".into()
        } else {
            format!("not ready: {}", self.health.reason())
        }
    }

    /// Stops ingest (it finishes and acks the batch in hand) and the gateway, and waits for
    /// them.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a server task failed");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Server {
    /// After an error: stops everything without waiting (a runtime must not be dropped inside
    /// another's asynchronous context).
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs on the server's runtime, so every connection and task belongs to it.
async fn start_inner(
    url: String,
    nats_args: NatsArgs,
    ingest: IngestArgs,
    shutdown: CancellationToken,
    saved: Arc<AtomicU64>,
    dead_lettered: Arc<AtomicU64>,
    health: Arc<Health>,
) -> anyhow::Result<Started> {
    let db = DbArgs::for_url(&url);
    let store = store::connect(&db).await?;
    let client = nats_args.connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    tally::ingest::nats::ensure_stream(&js, &nats_args, &ingest.consumer).await?;
    let ingestor =
        Ingestor::start(store, ingest.workers, nats_args.results_subject_prefix.clone(), ingest.max_result_bytes)
            .await
            .context("bootstrapping ingest")?;

    let consumer = ingest.consumer.clone();
    let (tx, mut acked) = mpsc::unbounded_channel();
    let (token, n, h) = (shutdown.clone(), nats_args.clone(), Arc::clone(&health));
    let ingest_task = tokio::spawn(async move {
        if let Err(e) = daemon::run(ingestor, client, &n, &ingest, h, Hooks { acked: Some(tx) }, token).await {
            tracing::error!(error = %e, "ingest stopped on an error");
        }
    });
    let counter = tokio::spawn(async move {
        while let Some(a) = acked.recv().await {
            saved.fetch_add(a.reply_subjects.len() as u64, Ordering::Relaxed);
            dead_lettered.fetch_add(a.dead_lettered as u64, Ordering::Relaxed);
        }
    });

    // The gateway as `tally serve` starts it: its own pool and NATS connection.
    let (gateway, background) = gateway::start(&db, &nats_args, &consumer, &GatewayArgs::default(), shutdown.clone());
    gateway.wait_connected().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let http = tokio::spawn(async move {
        if let Err(e) = tally::http::serve(listener, gateway::router(gateway), shutdown).await {
            tracing::error!(error = %e, "the worker API stopped on an error");
        }
    });
    let background = tokio::spawn(async move {
        if let Err(e) = background.await {
            tracing::warn!(error = %e, "the gateway's background task failed");
        }
    });
    Ok(Started { addr, tasks: vec![ingest_task, http, background, counter] })
}
