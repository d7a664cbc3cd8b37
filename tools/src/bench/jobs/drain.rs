//! Phase 1 of `tally-tools bench jobs`: simulated ADC workers drain every job over the worker API
//! while ingest saves the results; every job's progress (`jobs_job.progress`, the `process`
//! stage) is sampled at a fixed interval until every job has finished. Then each job is checked:
//! status, progress exactly equal to the rows its results inserted, and its task consumer's
//! deliveries.

use std::time::{Duration, Instant};
use tally::jobs::state::JobState;

use anyhow::Context;
use async_nats::jetstream;
use indicatif::ProgressBar;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::setup::BenchJob;
use crate::worker_sim::{self, WorkerReport, WorkerSim};
use tally::jobs::queue::{self, ConsumerState};
use tally::jobs::status::{parse_progress, Stage};
use tally::store::Store;

/// Statuses a job never leaves.
const FINAL: [&str; 3] = [JobState::Success.as_str(), JobState::Failure.as_str(), JobState::Revoked.as_str()];

/// Every job's progress at one instant.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the workers started.
    pub t: f64,
    /// The `process` stage's progress of each job, in %, in the jobs' order.
    pub percent: Vec<f64>,
}

/// What the jobs' rows say at one instant.
struct Snapshot {
    percent: Vec<f64>,
    processed: u64,
    all_final: bool,
    /// `finished_at` of each job, seconds since the Unix epoch.
    finished_epoch: Vec<Option<f64>>,
}

/// Reads the progress of `ids`, in that order.
async fn snapshot(store: &Store, ids: &[i64]) -> anyhow::Result<Snapshot> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT id, status, progress, extract(epoch FROM finished_at)::float8 FROM jobs_job WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    let mut s = Snapshot {
        percent: vec![0.0; ids.len()],
        processed: 0,
        all_final: true,
        finished_epoch: vec![None; ids.len()],
    };
    let mut seen = 0;
    for row in rows {
        let id: i64 = row.try_get(0)?;
        let Some(i) = ids.iter().position(|j| *j == id) else { continue };
        seen += 1;
        let status: String = row.try_get(1)?;
        let progress: Value = row.try_get(2)?;
        let (_, stages) = parse_progress(&progress);
        if let Some(p) = stages.iter().find(|st| st.key == "process") {
            s.percent[i] = p.progress * 100.0;
            s.processed += param(p, "processed").unwrap_or(0).max(0) as u64;
        }
        s.all_final &= FINAL.contains(&status.as_str());
        s.finished_epoch[i] = row.try_get(3)?;
    }
    anyhow::ensure!(seen == ids.len(), "{} of {} jobs have no jobs_job row", ids.len() - seen, ids.len());
    Ok(s)
}

/// An integer parameter of a stage.
fn param(stage: &Stage, key: &str) -> Option<i64> {
    stage.params.iter().find(|p| p.key == key).and_then(|p| p.value.as_i64())
}

/// The database clock, seconds since the Unix epoch (`finished_at` is written with it).
async fn db_epoch(store: &Store) -> anyhow::Result<f64> {
    Ok(store
        .client()
        .await?
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .try_get(0)?)
}

/// What phase 1 measured.
pub struct Drained {
    /// The simulated workers' report (latencies of every call).
    pub workers: WorkerReport,
    /// Progress samples, from the workers' start to the last job's completion.
    pub samples: Vec<Sample>,
    /// Each job's completion, seconds after the workers started (`jobs_job.finished_at`).
    pub finished: Vec<Option<f64>>,
    /// Each job's first sample with progress, seconds after the workers started.
    pub first_progress: Vec<Option<f64>>,
}

/// Runs `sim` until every job of `jobs` has finished (or `timeout`), sampling progress every
/// `interval`; `bar` counts processed images.
pub async fn drain(
    store: &Store,
    sim: &WorkerSim,
    jobs: &[BenchJob],
    interval: Duration,
    timeout: Duration,
    bar: &ProgressBar,
) -> anyhow::Result<Drained> {
    let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    let t0 = db_epoch(store).await?;
    let started = Instant::now();
    let cancel = CancellationToken::new();
    // Stops the workers whatever happens below.
    let _stop = cancel.clone().drop_guard();
    let run = {
        let (sim, cancel) = (sim.clone(), cancel.clone());
        tokio::spawn(async move { worker_sim::run(&sim, cancel).await })
    };
    let mut samples = Vec::new();
    let mut first_progress = vec![None; ids.len()];
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let last = loop {
        ticks.tick().await;
        let s = snapshot(store, &ids).await?;
        let t = started.elapsed().as_secs_f64();
        for (first, p) in first_progress.iter_mut().zip(&s.percent) {
            if first.is_none() && *p > 0.0 {
                *first = Some(t);
            }
        }
        bar.set_position(s.processed);
        samples.push(Sample { t, percent: s.percent.clone() });
        if s.all_final {
            break s;
        }
        if run.is_finished() {
            cancel.cancel();
            let report = run.await.context("the worker simulator failed")??;
            anyhow::bail!("the simulated workers stopped before every job finished: {}", report.stopped);
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "not every job finished within {} s ({} of {} images processed)",
            timeout.as_secs(),
            s.processed,
            jobs.iter().map(|j| j.images.len()).sum::<usize>()
        );
    };
    cancel.cancel();
    let workers = run.await.context("the worker simulator failed")??;
    let finished = last.finished_epoch.iter().map(|f| f.map(|e| (e - t0).max(0.0))).collect();
    Ok(Drained { workers, samples, finished, first_progress })
}

/// Waits until every job of `ids` has finished (or `timeout`).
pub async fn wait_final(store: &Store, ids: &[i64], timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let s = snapshot(store, ids).await?;
        if s.all_final {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < timeout, "not every job finished within {} s", timeout.as_secs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One job after the run.
#[derive(Clone, Debug)]
pub struct JobCheck {
    /// `jobs_job.status`.
    pub status: String,
    /// Images the `process` stage says were processed.
    pub processed: i64,
    /// Every way the job's progress differs from the rows (empty: exact).
    pub problems: Vec<String>,
    /// Its task consumer, `None` when the stream is gone.
    pub consumer: Option<ConsumerState>,
}

impl JobCheck {
    /// Whether the job succeeded with exact progress, every task delivered once and acked.
    pub fn clean(&self, tasks: usize) -> bool {
        self.status == JobState::Success.as_str()
            && self.problems.is_empty()
            && self.consumer.as_ref().is_some_and(|c| once(c, tasks))
    }
}

/// Every task delivered exactly once and acked.
pub fn once(c: &ConsumerState, tasks: usize) -> bool {
    c.num_redelivered == 0 && c.delivered == tasks as u64 && c.num_ack_pending == 0 && c.num_pending == 0
}

/// Checks `job`: SUCCESS, its `process` and `results` stages equal to what its images'
/// rows say (the images of a job are its own, so every row of theirs came from its results),
/// and its consumer's figures.
pub async fn check(store: &Store, js: &jetstream::Context, job: &BenchJob) -> anyhow::Result<JobCheck> {
    let client = store.client().await?;
    let row = client
        .query_one(
            "SELECT j.status, j.progress,
                    (SELECT count(*) FROM tally.job_image i WHERE i.job_id = j.id),
                    (SELECT count(*) FROM tally.job_image i WHERE i.job_id = j.id AND i.failed),
                    (SELECT count(*) FROM main_detection d WHERE d.source_image_id = ANY($2) AND d.bbox IS NOT NULL),
                    (SELECT count(*) FROM main_classification c JOIN main_detection d ON d.id = c.detection_id
                     WHERE d.source_image_id = ANY($2))
             FROM jobs_job j WHERE j.id = $1",
            &[&job.id, &job.images],
        )
        .await?;
    let status: String = row.try_get(0)?;
    let progress: Value = row.try_get(1)?;
    let (images, failed, detections, classifications): (i64, i64, i64, i64) =
        (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?, row.try_get(5)?);
    let (_, stages) = parse_progress(&progress);
    let total = job.images.len() as i64;
    let mut problems = Vec::new();
    let mut expect = |what: &str, got: Option<i64>, want: i64| {
        if got != Some(want) {
            problems.push(format!("{what} {} ≠ {want}", got.map_or("missing".into(), |g| g.to_string())));
        }
    };
    expect("tally.job_image rows", Some(images), total);
    expect("failed images", Some(failed), 0);
    let stage = |key: &str| stages.iter().find(|s| s.key == key);
    let process = stage("process");
    let results = stage("results");
    expect("processed", process.and_then(|s| param(s, "processed")), total);
    expect("remaining", process.and_then(|s| param(s, "remaining")), 0);
    expect("failed", process.and_then(|s| param(s, "failed")), 0);
    expect("captures", results.and_then(|s| param(s, "captures")), total);
    expect("detections", results.and_then(|s| param(s, "detections")), detections);
    expect("classifications", results.and_then(|s| param(s, "classifications")), classifications);
    for s in [process, results].into_iter().flatten() {
        if (s.progress - 1.0).abs() > 1e-9 || s.status != JobState::Success.as_str() {
            problems.push(format!("{} stage {} at {:.4}", s.key, s.status, s.progress));
        }
    }
    let processed = process.and_then(|s| param(s, "processed")).unwrap_or(0);
    let consumer = queue::state(js, job.id).await?.and_then(|q| q.consumer);
    Ok(JobCheck { status, processed, problems, consumer })
}
