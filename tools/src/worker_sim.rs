//! A simulated ADC worker: loops that claim jobs, fetch tasks, "process" each image into a
//! deterministic synthetic result and post the results back, over Antenna's worker HTTP API,
//! so the gateway and ingest can be exercised end to end without a GPU (`tally-tools worker-sim`).
//!
//! - [`api`]: the three calls over one keep-alive client, retries, refusals.
//! - [`task`]: tasks and claims as received, and the result of each task.
//! - [`report`]: what a run did: counters, errors by status, latency histograms.
//!
//! Each loop does what one ADC GPU worker does (`antenna/jobs-protocol.md` §1.3, §4.1): claim
//! one job, fetch its tasks in batches until a fetch comes back empty, process each task
//! (the per-task delay stands for download and inference), post results in batches, then claim
//! again; it sleeps the poll interval only when an iteration found no work. Results depend on
//! the image only, so a redelivered task gets the same result. Retried posts are harmless: the
//! gateway publishes each result with its reply subject as `Nats-Msg-Id`.

pub mod api;
pub mod cli;
pub mod report;
pub mod task;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::synth::results::ResultFactory;
pub use api::Retry;
use api::{Api, Outcome};
pub use report::{Call, Refusal, StopReason, WorkerReport};
use task::ClaimedJob;

/// A simulator that cannot start.
#[derive(Debug, Error)]
pub enum WorkerSimError {
    /// The base URL is not an http:// URL.
    #[error("invalid gateway URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The token has characters an HTTP header cannot carry.
    #[error("the token cannot be sent in an Authorization header")]
    Token,
    /// No pipeline slug to claim jobs for.
    #[error("no pipeline slug given: claims would take jobs of every pipeline")]
    NoPipeline,
    /// A count that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// When a run ends, besides cancellation (whichever comes first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopWhen {
    /// Stop once no loop has fetched, processed or posted anything for this long (claims that
    /// find no job, or a job whose tasks are all out, count as idle).
    pub idle: Option<Duration>,
    /// Take at most this many tasks in all, process and post them, then stop.
    pub max_tasks: Option<u64>,
}

/// A simulated worker's configuration.
#[derive(Clone, Debug)]
pub struct WorkerSim {
    /// Where the gateway is (`http://127.0.0.1:8000`; a path prefix is kept).
    pub base_url: String,
    /// The worker's API token (`Authorization: Token <key>`).
    pub token: String,
    /// Pipeline slugs to claim jobs for (`pipeline__slug__in`).
    pub pipelines: Vec<String>,
    /// Worker loops running at once (ADC: one per GPU).
    pub concurrency: usize,
    /// Tasks asked for per `/tasks` call (ADC: 24).
    pub batch_size: usize,
    /// Results per POST (ADC posts one batch's results: 24).
    pub post_batch: usize,
    /// Time each task takes to "process" (download and inference).
    pub delay: Duration,
    /// Sleep after an iteration that found no work (ADC: 5 s).
    pub poll_interval: Duration,
    /// When to stop.
    pub stop: StopWhen,
    /// Results: its `keys.pipeline` is replaced by each claimed job's pipeline.
    pub results: ResultFactory,
    /// Retries of transient failures.
    pub retry: Retry,
}

/// Runs the simulator until a stop condition, a refusal that no retry can fix (a bad token:
/// every loop stops at once), or `cancel`. Only an unusable configuration is an error;
/// everything that happens on the wire is in the report.
pub async fn run(sim: &WorkerSim, cancel: CancellationToken) -> Result<WorkerReport, WorkerSimError> {
    if sim.pipelines.iter().all(|p| p.trim().is_empty()) {
        return Err(WorkerSimError::NoPipeline);
    }
    for (name, n) in [("concurrency", sim.concurrency), ("batch size", sim.batch_size), ("post batch", sim.post_batch)]
    {
        if n == 0 {
            return Err(WorkerSimError::Zero(name));
        }
    }
    let api = Api::new(&sim.base_url, &sim.token, &sim.pipelines, sim.retry)?;
    let shared = Arc::new(Shared {
        api,
        sim: sim.clone(),
        external: cancel.clone(),
        stop: cancel.child_token(),
        budget: sim.stop.max_tasks.map(AtomicU64::new),
        last_work: Mutex::new(Instant::now()),
        refused_jobs: Mutex::new(HashSet::new()),
        refusal: Mutex::new(None),
        factories: Mutex::new(HashMap::new()),
    });
    let started = Instant::now();
    let loops: Vec<_> = (0..sim.concurrency).map(|n| tokio::spawn(worker_loop(Arc::clone(&shared), n))).collect();
    let mut report = WorkerReport { loops: sim.concurrency, ..WorkerReport::default() };
    for handle in loops {
        match handle.await {
            Ok(part) => report.merge(&part),
            Err(e) => tracing::error!(error = %e, "a worker loop stopped abnormally"),
        }
    }
    report.elapsed = started.elapsed();
    report.busy = lock(&shared.last_work).saturating_duration_since(started);
    report.stopped = shared.stop_reason();
    Ok(report)
}

/// What the loops share.
struct Shared {
    api: Api,
    sim: WorkerSim,
    /// The caller's token: cancelled means Ctrl-C.
    external: CancellationToken,
    /// Cancelled by the caller or by a refusal: every loop stops taking work.
    stop: CancellationToken,
    /// Tasks that may still be taken, when limited.
    budget: Option<AtomicU64>,
    /// When any loop last fetched, processed or posted something.
    last_work: Mutex<Instant>,
    /// Jobs whose `/tasks` answered 4xx: claiming them again counts as finding no job.
    refused_jobs: Mutex<HashSet<i64>>,
    /// The refusal that stopped the run.
    refusal: Mutex<Option<Refusal>>,
    /// One result factory per pipeline slug.
    factories: Mutex<HashMap<String, Arc<ResultFactory>>>,
}

impl Shared {
    fn touch(&self) {
        *lock(&self.last_work) = Instant::now();
    }

    fn idle(&self) -> bool {
        self.sim.stop.idle.is_some_and(|idle| lock(&self.last_work).elapsed() >= idle)
    }

    fn budget_spent(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.load(Ordering::SeqCst) == 0)
    }

    /// Takes up to `want` tasks from the budget.
    fn reserve(&self, want: usize) -> usize {
        let Some(budget) = &self.budget else { return want };
        let mut taken = 0;
        let _ = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            taken = left.min(want as u64);
            Some(left - taken)
        });
        taken as usize
    }

    fn give_back(&self, n: usize) {
        if let Some(budget) = &self.budget {
            budget.fetch_add(n as u64, Ordering::SeqCst);
        }
    }

    /// Stops every loop because of `refusal` (the first one is reported).
    fn refuse(&self, refusal: Refusal) {
        let mut first = lock(&self.refusal);
        if first.is_none() {
            tracing::warn!(%refusal, "stopping every worker loop");
            *first = Some(refusal);
        }
        self.stop.cancel();
    }

    fn factory(&self, pipeline: &str) -> Arc<ResultFactory> {
        let mut factories = lock(&self.factories);
        let f = factories.entry(pipeline.to_string()).or_insert_with(|| {
            let mut f = self.sim.results.clone();
            f.keys.pipeline = pipeline.to_string();
            Arc::new(f)
        });
        Arc::clone(f)
    }

    fn stop_reason(&self) -> StopReason {
        if let Some(r) = lock(&self.refusal).clone() {
            StopReason::Refused(r)
        } else if self.external.is_cancelled() {
            StopReason::Cancelled
        } else if let (true, Some(n)) = (self.budget_spent(), self.sim.stop.max_tasks) {
            StopReason::TaskLimit(n)
        } else {
            StopReason::Idle(self.sim.stop.idle.unwrap_or_default())
        }
    }
}

/// A lock that survives a panicked holder (the data are counters and timestamps).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One ADC-like worker: claim, drain, repeat, until a stop condition.
async fn worker_loop(shared: Arc<Shared>, n: usize) -> WorkerReport {
    let mut report = WorkerReport::default();
    let stop = &shared.stop;
    while !stop.is_cancelled() && !shared.budget_spent() {
        let worked = match shared.api.claim(&mut report, stop).await {
            Outcome::Done(Some(job)) if !lock(&shared.refused_jobs).contains(&job.id) => {
                report.claims += 1;
                tracing::debug!(worker = n, job_id = job.id, "claimed");
                drain(&shared, &job, &mut report).await
            }
            Outcome::Done(_) => {
                report.empty_claims += 1;
                false
            }
            Outcome::Failed => false,
            Outcome::Refused(refusal) => {
                // A claim refused is a configuration problem (token, URL): no claim will work.
                shared.refuse(refusal);
                break;
            }
        };
        if !worked {
            if shared.idle() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(shared.sim.poll_interval) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
    report
}

/// Fetches, processes and posts `job`'s tasks until a fetch comes back empty; true if any
/// task was fetched.
async fn drain(shared: &Shared, job: &ClaimedJob, report: &mut WorkerReport) -> bool {
    let factory = shared.factory(&job.pipeline_slug);
    let mut pending: Vec<Value> = Vec::with_capacity(shared.sim.post_batch);
    let mut worked = false;
    'fetching: while !shared.stop.is_cancelled() {
        let want = shared.reserve(shared.sim.batch_size);
        if want == 0 {
            break;
        }
        let tasks = match shared.api.tasks(job.id, want, report, &shared.stop).await {
            Outcome::Done(tasks) => tasks,
            Outcome::Failed => {
                shared.give_back(want);
                break;
            }
            Outcome::Refused(refusal) => {
                shared.give_back(want);
                if matches!(refusal.status, 401 | 403) {
                    shared.refuse(refusal);
                } else {
                    lock(&shared.refused_jobs).insert(job.id);
                }
                break;
            }
        };
        shared.give_back(want.saturating_sub(tasks.len()));
        if tasks.is_empty() {
            report.empty_fetches += 1;
            break;
        }
        worked = true;
        report.tasks_fetched += tasks.len() as u64;
        shared.touch();
        let total = tasks.len();
        for (done, t) in tasks.into_iter().enumerate() {
            if !shared.sim.delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(shared.sim.delay) => {}
                    _ = shared.stop.cancelled() => {}
                }
            }
            if shared.stop.is_cancelled() {
                report.tasks_abandoned += (total - done) as u64;
                break 'fetching;
            }
            let (item, ok) = task::task_result(&factory, &t);
            report.error_results += u64::from(!ok);
            pending.push(item);
            shared.touch();
            if pending.len() >= shared.sim.post_batch {
                post(shared, job, &mut pending, report).await;
            }
        }
    }
    // The job is drained (or the run stops): post what is left.
    post(shared, job, &mut pending, report).await;
    worked
}

/// Posts `pending` (emptied) and counts what became of it.
async fn post(shared: &Shared, job: &ClaimedJob, pending: &mut Vec<Value>, report: &mut WorkerReport) {
    if pending.is_empty() {
        return;
    }
    let n = pending.len() as u64;
    match shared.api.post_results(job.id, pending, report).await {
        Outcome::Done(_) => {
            report.results_posted += n;
            report.result_posts += 1;
            shared.touch();
        }
        Outcome::Failed => report.results_dropped += n,
        Outcome::Refused(refusal) => {
            report.results_refused += n;
            if matches!(refusal.status, 401 | 403) {
                shared.refuse(refusal);
            }
        }
    }
    pending.clear();
}
