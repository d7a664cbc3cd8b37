//! Phase 2 of `tally-tools bench jobs`: the two hot calls alone under load, through the worker
//! simulator's API client (one keep-alive client shared by every caller, as ADC's loops share
//! a process). Claims: `pollers` callers claim in a loop for a fixed time against live jobs.
//! Results: `posters` callers each take a job, fetch a batch of its tasks and post one result
//! per task in a single POST, until every job is drained; ingest saves what they post.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::setup::BenchJob;
use crate::synth::results::ResultFactory;
use crate::worker_sim::api::{Api, Outcome};
use crate::worker_sim::task;
use crate::worker_sim::WorkerReport;

/// What the claim pollers did.
pub struct Claims {
    /// Merged over the pollers: `claims` (a job), `empty_claims`, errors, the claim latencies.
    pub report: WorkerReport,
    /// Wall time of the hammering.
    pub seconds: f64,
}

/// `pollers` callers claim in a loop for `duration`.
pub async fn claims(api: &Api, pollers: usize, duration: Duration, bar: &ProgressBar) -> Claims {
    let started = Instant::now();
    let deadline = started + duration;
    let cancel = CancellationToken::new();
    let handles: Vec<_> = (0..pollers.max(1))
        .map(|_| {
            let (api, cancel, bar) = (api.clone(), cancel.clone(), bar.clone());
            tokio::spawn(async move {
                let mut report = WorkerReport::default();
                while Instant::now() < deadline {
                    match api.claim(&mut report, &cancel).await {
                        Outcome::Done(Some(_)) => report.claims += 1,
                        Outcome::Done(None) => report.empty_claims += 1,
                        // Counted in the report by the client; a refusal will not go away.
                        Outcome::Failed => {}
                        Outcome::Refused(_) => break,
                    }
                    bar.inc(1);
                }
                report
            })
        })
        .collect();
    let mut report = WorkerReport { loops: pollers, ..WorkerReport::default() };
    for h in handles {
        match h.await {
            Ok(part) => report.merge(&part),
            Err(e) => tracing::error!(error = %e, "a claim poller failed"),
        }
    }
    let elapsed = started.elapsed();
    report.elapsed = elapsed;
    report.busy = elapsed;
    Claims { report, seconds: elapsed.as_secs_f64() }
}

/// What the result posters did.
pub struct Posts {
    /// Merged over the posters: task fetches and result POSTs with their latencies.
    pub report: WorkerReport,
    /// Wall time of the posting.
    pub seconds: f64,
    /// Mean size of a POST body, bytes.
    pub mean_body_bytes: f64,
}

/// `posters` callers drain `jobs` in POSTs of `per_post` results: each takes a job from a shared
/// round-robin queue, fetches `per_post` of its tasks, posts their results at once, and puts
/// the job back while it has tasks left.
pub async fn posts(
    api: &Api,
    factory: &ResultFactory,
    jobs: &[BenchJob],
    posters: usize,
    per_post: usize,
    bar: &ProgressBar,
) -> Posts {
    let started = Instant::now();
    let queue: Arc<Mutex<VecDeque<i64>>> = Arc::new(Mutex::new(jobs.iter().map(|j| j.id).collect()));
    let factory = Arc::new(factory.clone());
    let handles: Vec<_> = (0..posters.max(1))
        .map(|_| {
            let (api, queue, factory, bar) = (api.clone(), Arc::clone(&queue), Arc::clone(&factory), bar.clone());
            tokio::spawn(async move {
                let mut report = WorkerReport::default();
                let (mut bytes, mut bodies) = (0u64, 0u64);
                let never = CancellationToken::new();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some(job) = next else { break };
                    // A fetch may hand out fewer than asked: fetch again until a full batch.
                    let mut tasks = Vec::with_capacity(per_post);
                    while tasks.len() < per_post {
                        match api.tasks(job, per_post - tasks.len(), &mut report, &never).await {
                            Outcome::Done(more) if !more.is_empty() => tasks.extend(more),
                            _ => break,
                        }
                    }
                    if tasks.is_empty() {
                        // Drained (or refused): the job leaves the queue.
                        report.empty_fetches += 1;
                        continue;
                    }
                    report.tasks_fetched += tasks.len() as u64;
                    queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(job);
                    let results: Vec<Value> = tasks.iter().map(|t| task::task_result(&factory, t).0).collect();
                    bytes += serde_json::to_vec(&json!({"results": results})).map_or(0, |b| b.len() as u64);
                    bodies += 1;
                    let n = results.len() as u64;
                    match api.post_results(job, &results, &mut report).await {
                        Outcome::Done(_) => {
                            report.results_posted += n;
                            report.result_posts += 1;
                        }
                        Outcome::Failed => report.results_dropped += n,
                        Outcome::Refused(_) => report.results_refused += n,
                    }
                    bar.inc(n);
                }
                (report, bytes, bodies)
            })
        })
        .collect();
    let mut report = WorkerReport { loops: posters, ..WorkerReport::default() };
    let (mut bytes, mut bodies) = (0, 0);
    for h in handles {
        match h.await {
            Ok((part, b, n)) => {
                report.merge(&part);
                bytes += b;
                bodies += n;
            }
            Err(e) => tracing::error!(error = %e, "a result poster failed"),
        }
    }
    let elapsed = started.elapsed();
    report.elapsed = elapsed;
    report.busy = elapsed;
    Posts { report, seconds: elapsed.as_secs_f64(), mean_body_bytes: bytes as f64 / bodies.max(1) as f64 }
}
