//! The job monitor: a periodic pass that makes every job finish ([`lost`]: images whose tasks
//! are exhausted or gone are marked failed) and finished jobs clean up ([`cleanup`]: their
//! consumer and stream deleted). `tally serve` runs it beside ingest, in the one process that
//! holds the ingest lock, so two monitors never race each other; each pass is idempotent.
//!
//! Lost images are not marked while ingest has undelivered results (its consumer's
//! `num_pending > 0`): after a downtime every job looks stalled, and the results that would
//! move them may be waiting in `TALLY_RESULTS`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use clap::Args;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::cleanup::{self, Swept};
use super::lost::{self, Marked};
use super::JobError;
use crate::duration::parse_secs;
use crate::metrics::names;
use crate::store::Store;

/// Options of the job monitor (`tally serve`).
#[derive(Clone, Debug, Args)]
pub struct MonitorArgs {
    /// Seconds an active async job may go without progress (no result saved) before the images
    /// whose tasks are exhausted (max_deliver) or gone are marked failed (Antenna's
    /// STALLED_JOBS_MAX_MINUTES, 10 min). Keep it above the task ack_wait × max_deliver, or
    /// tasks still due a redelivery are marked failed too.
    #[arg(long, env = "TALLY_LOST_IMAGES_AFTER", value_parser = parse_secs, default_value = "600")]
    pub lost_images_after: Duration,
    /// Seconds between two passes of the job monitor (lost images, finished jobs' queues).
    #[arg(long, env = "TALLY_JOB_MONITOR_EVERY", value_parser = parse_secs, default_value = "30")]
    pub job_monitor_every: Duration,
    /// Seconds a job stays finished before its NATS consumer and stream are deleted (the acks
    /// of the batch that finished it go out first).
    #[arg(long, env = "TALLY_CLEANUP_GRACE", value_parser = parse_secs, default_value = "10")]
    pub cleanup_grace: Duration,
    /// Age in seconds after which a job_* stream whose job does not exist in this database is
    /// deleted (Antenna's ZOMBIE_STREAMS_MAX_AGE_MINUTES, 60 min).
    #[arg(long, env = "TALLY_ZOMBIE_STREAM_AGE", value_parser = parse_secs, default_value = "3600")]
    pub zombie_stream_age: Duration,
}

impl Default for MonitorArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
    }
}

/// The results consumer whose backlog holds lost-image marking back.
#[derive(Clone, Debug)]
pub struct ResultsConsumer {
    /// The results stream.
    pub stream: String,
    /// Ingest's durable consumer on it.
    pub consumer: String,
}

/// What one pass did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pass {
    /// Stalled jobs whose lost images were marked (or that were finished by the pass).
    pub marked: Vec<Marked>,
    /// Queues deleted.
    pub swept: Swept,
    /// Whether marking was held back by ingest's backlog.
    pub held_back: bool,
}

/// Runs a pass every `job_monitor_every` until `shutdown`. The first comes one period after
/// the start, once ingest has created its consumer and begun on any backlog.
pub async fn run(
    store: Store,
    js: jetstream::Context,
    args: MonitorArgs,
    results: Option<ResultsConsumer>,
    django: crate::django_cache::DjangoCache,
    shutdown: CancellationToken,
) {
    let every = args.job_monitor_every.max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            done = pass(&store, &js, &args, results.as_ref()) => {
                if !done.marked.is_empty() {
                    // Jobs finished and job-log lines written: Django must not serve the old ones.
                    django.invalidate(["jobs_job", "jobs_joblog"]).await;
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Spawns [`run`] on the current runtime.
pub fn spawn(
    store: Store,
    client: async_nats::Client,
    args: MonitorArgs,
    results: Option<ResultsConsumer>,
    django: crate::django_cache::DjangoCache,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(store, jetstream::new(client), args, results, django, shutdown))
}

/// One pass: lost images first (a job it finishes is cleaned up by a later pass, after the
/// grace), then cleanup. Errors are logged and counted; the next pass retries.
pub async fn pass(
    store: &Store,
    js: &jetstream::Context,
    args: &MonitorArgs,
    results: Option<&ResultsConsumer>,
) -> Pass {
    let mut done = Pass::default();
    match backlog(js, results).await {
        Ok(0) => match lost_images(store, js, args.lost_images_after).await {
            Ok(marked) => done.marked = marked,
            Err(e) => failed("lost_images", &e),
        },
        Ok(pending) => {
            debug!(pending, "ingest has undelivered results: lost images are not marked this pass");
            done.held_back = true;
        }
        Err(e) => failed("lost_images", &e),
    }
    match cleanup::sweep(store, js, args.cleanup_grace, args.zombie_stream_age).await {
        Ok(swept) => done.swept = swept,
        Err(e) => failed("cleanup", &e),
    }
    done
}

fn failed(part: &'static str, e: &JobError) {
    warn!(part, error = %e, "job monitor pass failed; retrying next pass");
    metrics::counter!(names::JOB_MONITOR_ERRORS, "part" => part).increment(1);
}

/// Results not yet delivered to ingest (0 without a results consumer to ask).
async fn backlog(js: &jetstream::Context, results: Option<&ResultsConsumer>) -> Result<u64, JobError> {
    let Some(r) = results else { return Ok(0) };
    let c: consumer::PullConsumer = js
        .get_consumer_from_stream(&r.consumer, &r.stream)
        .await
        .map_err(|e| super::nats_error("results consumer info", e))?;
    Ok(c.cached_info().num_pending)
}

/// Checks every stalled job; one job's failure does not stop the others.
async fn lost_images(store: &Store, js: &jetstream::Context, after: Duration) -> Result<Vec<Marked>, JobError> {
    let mut marked = Vec::new();
    for id in lost::stalled(store, after).await? {
        match lost::check(store, js, id, after).await {
            Ok(Some(m)) => marked.push(m),
            Ok(None) => {}
            Err(e) => {
                warn!(job_id = id, error = %e, "cannot check a stalled job; retrying next pass");
                metrics::counter!(names::JOB_MONITOR_ERRORS, "part" => "lost_images").increment(1);
            }
        }
    }
    Ok(marked)
}
