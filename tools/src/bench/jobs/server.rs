//! The system under test, in this process: `tally::server::start` (ingest with its bootstrap
//! and the worker gateway, exactly as `tally serve` runs them) served on `127.0.0.1:0`, on a
//! tokio runtime of its own.
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
use tally::http::Health;
use tally::ingest::daemon::{Hooks, IngestArgs};
use tally::server::{self, Config};

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
    health: Arc<Health>,
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
        server.health = started.health;
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
) -> anyhow::Result<Started> {
    let (tx, mut acked) = mpsc::unbounded_channel();
    let mut config = Config::new(DbArgs::for_url(&url), nats_args);
    config.ingest = ingest;
    config.hooks = Hooks { acked: Some(tx) };
    // The job monitor's first pass comes one period after start: an hour keeps it out of the
    // run, whose checks read the finished jobs' queues it would delete.
    config.monitor.job_monitor_every = std::time::Duration::from_secs(3600);
    let running = server::start(config, shutdown).await?.until_ready(std::time::Duration::from_secs(600)).await?;
    if let Some(gateway) = &running.gateway {
        gateway.wait_connected().await;
    }
    let addr = running.addr;
    let health = Arc::clone(&running.health);
    let counter = tokio::spawn(async move {
        while let Some(a) = acked.recv().await {
            saved.fetch_add(a.reply_subjects.len() as u64, Ordering::Relaxed);
            dead_lettered.fetch_add(a.dead_lettered as u64, Ordering::Relaxed);
        }
    });
    let daemon = tokio::spawn(async move {
        if let Err(e) = running.wait().await {
            tracing::error!(error = %e, "tally stopped on an error");
        }
    });
    Ok(Started { addr, health, tasks: vec![daemon, counter] })
}
