//! Job progress (SPEC §5) is exact under replays, reordering, concurrency, cancellation and
//! failures, on real NATS JetStream and Postgres:
//!
//! - results published shuffled and in reverse, re-published under new `Nats-Msg-Id`s
//!   (redeliveries the duplicate window cannot catch) and as identical duplicates, leave
//!   `process.processed` = the distinct images, nothing past the total, SUCCESS, and the
//!   `results` figures equal to the rows inserted;
//! - while results stream in, no stage's percentage or figure ever goes down or past
//!   100 % / the total, and at each wave's end the figures are exactly the images so far;
//! - two ingest loops pulling batches of one durable consumer concurrently lose no update;
//! - a job cancelled mid-run keeps the progress and status it had at cancel, while its late
//!   results are still saved with exact counts;
//! - a job finishes FAILURE when more than half of its images failed, SUCCESS at exactly half,
//!   and failed images get no rows;
//! - `tally.job_progress`, the sums progress reads, equals a recount of `tally.job_image` after
//!   any sequence of inserts, upserts, updates, deletes and truncates (proptest), writers
//!   of several jobs at once never deadlock on it, and its migration counts the rows already
//!   there.

use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ingest::{assert_counts_exact, expected, rows, world, Expected, Fixture, Running};
use common::Flavor;
use serde_json::{json, Value};
use tally::ingest::daemon::IngestArgs;
use tally::jobs::cancel;
use tally::jobs::logs::{JobLogs, JobLogsConfig};
use tally::store::Store;

const WAIT: Duration = Duration::from_secs(30);

/// Small batches and no linger: many transactions, many progress writes.
fn small_batches(batch_size: usize) -> IngestArgs {
    IngestArgs { batch_size, batch_linger: Duration::ZERO, nak_delay: Duration::from_secs(1), ..IngestArgs::default() }
}

/// Deterministic Fisher–Yates shuffle (splitmix64).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// An error result (`PipelineResultsError`) for `image`.
fn error_result(reply: &str, image: i64) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"reply_subject": reply, "result": {"error": "download failed", "image_id": image.to_string()}}),
    )
    .expect("json")
}

async fn query_i64(store: &Store, sql: &str) -> i64 {
    let c = store.client().await.expect("client");
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// `(status, progress)` of a job.
async fn job_row(store: &Store, job: i64) -> (String, Value) {
    let c = store.client().await.expect("client");
    let r = c.query_one("SELECT status, progress FROM jobs_job WHERE id = $1", &[&job]).await.expect("job");
    (r.get(0), r.get(1))
}

/// One stage of a progress document, as Django reads it.
#[derive(Debug, Clone, PartialEq)]
struct Stage {
    status: String,
    progress: f64,
    /// Params by key; `""` (not yet written) reads as 0.
    params: Vec<(String, i64)>,
}

impl Stage {
    fn get(&self, key: &str) -> i64 {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no param {key}: {self:?}"))
    }
}

fn stage(progress: &Value, key: &str) -> Stage {
    let s = progress["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["key"] == key))
        .unwrap_or_else(|| panic!("no stage {key} in {progress}"));
    let params = s["params"]
        .as_array()
        .unwrap_or_else(|| panic!("stage {key} has no params: {s}"))
        .iter()
        .map(|p| {
            let key = p["key"].as_str().expect("param key").to_string();
            let value = match &p["value"] {
                Value::Number(n) => n.as_i64().unwrap_or_else(|| panic!("{key} is not an integer: {n}")),
                Value::String(s) if s.is_empty() => 0,
                other => panic!("param {key} has value {other}"),
            };
            (key, value)
        })
        .collect();
    Stage {
        status: s["status"].as_str().unwrap_or_default().to_string(),
        progress: s["progress"].as_f64().unwrap_or_else(|| panic!("stage {key} progress: {s}")),
        params,
    }
}

/// Panics unless `job` is finished in `status` with exact figures: `images` processed, of
/// which `failed` failed, and the `results` stage equal to `rows` (the rows the job's
/// successful images produced).
async fn assert_finished(f: &Fixture, job: i64, status: &str, images: usize, failed: usize, rows: &Expected) {
    let (got_status, progress) = job_row(&f.store, job).await;
    assert_eq!(got_status, status, "job {job} status; progress: {progress}");
    assert_eq!(progress["summary"]["status"], status, "job {job} summary status");
    let process = stage(&progress, "process");
    let results = stage(&progress, "results");
    let total = images as i64;
    assert_eq!(
        (process.get("processed"), process.get("remaining"), process.get("failed")),
        (total, 0, failed as i64),
        "job {job} process stage: {process:?}"
    );
    assert_eq!(
        (results.get("captures"), results.get("detections"), results.get("classifications")),
        (total - failed as i64, rows.detections, rows.classifications),
        "job {job} results stage equals the rows inserted: {results:?}"
    );
    for s in [&process, &results] {
        assert_eq!(s.progress, 1.0, "job {job}: {s:?}");
        assert_eq!(s.status, status, "job {job}: {s:?}");
    }
    let summary = progress["summary"]["progress"].as_f64().expect("summary progress");
    assert!((summary - 1.0).abs() < 1e-9, "job {job} summary progress {summary}");
    // The durable image set behind the figures.
    let c = f.store.client().await.expect("client");
    let r = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE failed), coalesce(sum(detections), 0)::int8,
                    coalesce(sum(classifications), 0)::int8
             FROM tally.job_image WHERE job_id = $1",
            &[&job],
        )
        .await
        .expect("job images");
    let set: (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(set, (total, failed as i64, rows.detections, rows.classifications), "tally.job_image of job {job}");
    assert_eq!(progress_sums(&c, job).await, Some(set), "tally.job_progress of job {job} equals its recount");
}

/// `tally.job_progress`'s sums of `job` (processed, failed, detections, classifications).
async fn progress_sums(c: &tokio_postgres::Client, job: i64) -> Option<(i64, i64, i64, i64)> {
    c.query_opt(
        "SELECT processed, failed, detections, classifications FROM tally.job_progress WHERE job_id = $1",
        &[&job],
    )
    .await
    .expect("job progress sums")
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// Waits until `runs` acked `saved` results between them.
async fn wait_all(runs: &mut [&mut Running], saved: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        for r in runs.iter_mut() {
            while let Ok(a) = r.acked.try_recv() {
                r.saved += a.reply_subjects.len();
                r.dead += a.dead_lettered;
            }
        }
        let total: usize = runs.iter().map(|r| r.saved).sum();
        if total >= saved {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {total} of {saved} results acked ({:?} per loop, dead-lettered {:?})",
            runs.iter().map(|r| r.saved).collect::<Vec<_>>(),
            runs.iter().map(|r| r.dead).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_out_of_order_results_count_each_image_once() {
    let mut f = Fixture::new("progress_dups", Flavor::Empty, world(1, 6)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..20]).await;
    let total = tasks.len();

    // Before ingest starts (so that originals and their replays share batches): the second
    // half of the images, shuffled, each followed or preceded by a redelivery under a new
    // Nats-Msg-Id.
    let mut published = 0;
    let mut early: Vec<(i64, String, String)> = Vec::new();
    for (k, (image, reply)) in tasks[total / 2..].iter().enumerate() {
        early.push((*image, reply.clone(), reply.clone()));
        if k % 2 == 0 {
            early.push((*image, reply.clone(), format!("redelivery-{reply}")));
        }
    }
    shuffle(&mut early, 11);
    for (image, reply, msg_id) in &early {
        assert!(f.publish(job, msg_id, f.factory.task_result(reply, *image)).await);
        published += 1;
    }
    let mut running = f.start(small_batches(7)).await;
    // While it runs: the first half in reverse order, then redeliveries of every image in
    // reverse, and identical duplicates (dropped by JetStream's duplicate window).
    for (image, reply) in tasks[..total / 2].iter().rev() {
        assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
        published += 1;
    }
    for (image, reply) in tasks.iter().rev() {
        assert!(f.publish(job, &format!("again-{reply}"), f.factory.task_result(reply, *image)).await);
        published += 1;
    }
    for (image, reply) in tasks.iter().step_by(3) {
        assert!(!f.publish(job, reply, f.factory.task_result(reply, *image)).await, "JetStream drops a duplicate");
    }
    running.wait_for(published, 0, WAIT).await;

    let job_images: Vec<i64> = tasks.iter().map(|(i, _)| *i).collect();
    let want = expected(&f, &job_images);
    assert_eq!(rows(&f.store).await, want, "each image's rows exactly once");
    assert_finished(&f, job, "SUCCESS", total, 0, &want).await;
    assert_counts_exact(&f.store).await;

    // Replays after the job finished: saved as no-ops, the progress document does not move.
    let (_, finished) = job_row(&f.store, job).await;
    for (image, reply) in &tasks {
        assert!(f.publish(job, &format!("late-{reply}"), f.factory.task_result(reply, *image)).await);
        published += 1;
    }
    running.wait_for(published, 0, WAIT).await;
    running.stop().await;
    assert_eq!(job_row(&f.store, job).await, ("SUCCESS".to_string(), finished), "a finished job's progress stays");
    assert_eq!(rows(&f.store).await, want);
    assert_eq!(query_i64(&f.store, "SELECT count(*) FROM tally.dead_letter").await, 0);
    assert_eq!(f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await, (0, 0), "every result acked");
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

/// What a poller saw at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    summary: f64,
    process: Stage,
    results: Stage,
}

async fn snapshot(store: &Store, job: i64) -> Snapshot {
    let (_, p) = job_row(store, job).await;
    Snapshot {
        summary: p["summary"]["progress"].as_f64().expect("summary progress"),
        process: stage(&p, "process"),
        results: stage(&p, "results"),
    }
}

/// Panics unless `s` is within bounds for a job of `total` images.
fn assert_bounded(s: &Snapshot, total: i64) {
    for st in [&s.process, &s.results] {
        assert!((0.0..=1.0).contains(&st.progress), "stage progress out of [0, 1]: {s:?}");
    }
    assert!((0.0..=1.0 + 1e-9).contains(&s.summary), "summary progress out of [0, 1]: {s:?}");
    let (processed, remaining, failed) =
        (s.process.get("processed"), s.process.get("remaining"), s.process.get("failed"));
    if processed > 0 {
        assert!(processed <= total, "processed past the total: {s:?}");
        assert_eq!(processed + remaining, total, "processed + remaining = total: {s:?}");
        assert!(failed <= processed, "{s:?}");
        assert_eq!(s.results.get("captures"), processed - failed, "{s:?}");
        let fraction = processed as f64 / total as f64;
        assert!((s.process.progress - fraction).abs() < 1e-9, "process progress = processed / total: {s:?}");
    }
}

/// Panics if anything in `b` went backwards from `a`.
fn assert_not_backwards(a: &Snapshot, b: &Snapshot) {
    let ctx = || format!("went backwards:\n  before {a:?}\n  after  {b:?}");
    assert!(b.summary >= a.summary - 1e-9, "summary {}", ctx());
    for (x, y) in [(&a.process, &b.process), (&a.results, &b.results)] {
        assert!(y.progress >= x.progress, "{}", ctx());
    }
    for key in ["processed", "failed"] {
        assert!(b.process.get(key) >= a.process.get(key), "{key} {}", ctx());
    }
    if a.process.get("processed") > 0 {
        assert!(b.process.get("remaining") <= a.process.get("remaining"), "remaining {}", ctx());
    }
    for key in ["captures", "detections", "classifications"] {
        assert!(b.results.get(key) >= a.results.get(key), "{key} {}", ctx());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_never_goes_backwards_or_past_the_total() {
    let mut f = Fixture::new("progress_monotonic", Flavor::Empty, world(1, 10)).await;
    let images = f.world.images.clone();
    let (job, mut tasks) = f.job(&images[0..40]).await;
    let total = tasks.len() as i64;
    shuffle(&mut tasks, 23);
    // Two images fail: `failed` moves too, and the job still succeeds.
    let failing: BTreeSet<i64> = [tasks[5].0, tasks[17].0].into();

    // A poller reads the job row as fast as it can for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let store = f.store.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                seen.push(snapshot(&store, job).await);
                tokio::task::yield_now().await;
            }
            seen.push(snapshot(&store, job).await);
            seen
        })
    };

    let mut running = f.start(small_batches(3)).await;
    let mut published = 0;
    let mut done: Vec<i64> = Vec::new();
    let mut boundaries = Vec::new();
    for (wave, chunk) in tasks.chunks(8).enumerate() {
        for (k, (image, reply)) in chunk.iter().enumerate() {
            let payload = if failing.contains(image) {
                error_result(reply, *image)
            } else {
                f.factory.task_result(reply, *image)
            };
            assert!(f.publish(job, reply, payload.clone()).await);
            published += 1;
            // A redelivery of an earlier image of the run, mid-wave.
            if k % 3 == 0 && !done.is_empty() {
                let (image, reply) = &tasks[(wave * 5 + k) % done.len()];
                let payload = if failing.contains(image) {
                    error_result(reply, *image)
                } else {
                    f.factory.task_result(reply, *image)
                };
                assert!(f.publish(job, &format!("redelivery-{wave}-{reply}"), payload).await);
                published += 1;
            }
        }
        running.wait_for(published, 0, WAIT).await;
        done.extend(chunk.iter().map(|(i, _)| *i));
        // At a wave's end the figures are exactly those of the images so far.
        let s = snapshot(&f.store, job).await;
        let ok: Vec<i64> = done.iter().copied().filter(|i| !failing.contains(i)).collect();
        let want = expected(&f, &ok);
        let failed = done.iter().filter(|i| failing.contains(i)).count() as i64;
        assert_eq!(
            (s.process.get("processed"), s.process.get("failed"), s.results.get("detections")),
            (done.len() as i64, failed, want.detections),
            "after wave {wave}: {s:?}"
        );
        assert_eq!(s.results.get("classifications"), want.classifications, "after wave {wave}: {s:?}");
        boundaries.push(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    running.stop().await;
    let mut seen = poller.await.expect("poller");

    let ok: Vec<i64> = tasks.iter().map(|(i, _)| *i).filter(|i| !failing.contains(i)).collect();
    assert_finished(&f, job, "SUCCESS", tasks.len(), failing.len(), &expected(&f, &ok)).await;
    // Every read is within bounds; the poller's reads, in the order taken, never go backwards,
    // nor do the wave-end reads (the two series interleave in time without a common order).
    for s in seen.iter().chain(&boundaries) {
        assert_bounded(s, total);
    }
    for pair in seen.windows(2) {
        assert_not_backwards(&pair[0], &pair[1]);
    }
    for pair in boundaries.windows(2) {
        assert_not_backwards(&pair[0], &pair[1]);
    }
    let distinct: BTreeSet<i64> = seen.iter().map(|s| s.process.get("processed")).collect();
    assert!(distinct.len() >= 5, "the poller saw the run in progress: {distinct:?} over {} reads", seen.len());
    seen.dedup_by(|a, b| a.process == b.process && a.results == b.results);
    println!("{} distinct progress states observed, processed values {distinct:?}", seen.len());
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_ingest_loops_lose_no_progress_update() {
    let mut f = Fixture::new("progress_concurrent", Flavor::Empty, world(2, 10)).await;
    let images = f.world.images.clone();
    let (big, big_tasks) = f.job(&images[0..60]).await;
    let (small, small_tasks) = f.job(&images[60..80]).await;

    // Two loops on the same durable consumer: they pull different batches and commit them
    // concurrently (one ingest writer per database is `tally serve`'s rule, enforced by its
    // advisory lock; the progress write must still be exact without it).
    let mut a = f.start_unlocked(small_batches(3)).await;
    let mut b = f.start_unlocked(small_batches(3)).await;
    let mut all: Vec<(i64, i64, String)> = big_tasks.iter().map(|(i, r)| (big, *i, r.clone())).collect();
    all.extend(small_tasks.iter().map(|(i, r)| (small, *i, r.clone())));
    shuffle(&mut all, 5);
    for (job, image, reply) in &all {
        assert!(f.publish(*job, reply, f.factory.task_result(reply, *image)).await);
    }
    wait_all(&mut [&mut a, &mut b], all.len(), WAIT).await;
    let (by_a, by_b) = (a.saved, b.saved);
    a.stop().await;
    b.stop().await;
    assert!(by_a > 0 && by_b > 0, "both loops saved results ({by_a} and {by_b})");
    println!("loop a saved {by_a}, loop b saved {by_b}");

    for (job, tasks) in [(big, &big_tasks), (small, &small_tasks)] {
        let job_images: Vec<i64> = tasks.iter().map(|(i, _)| *i).collect();
        assert_finished(&f, job, "SUCCESS", tasks.len(), 0, &expected(&f, &job_images)).await;
        let finished = query_i64(
            &f.store,
            &format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND message LIKE 'job finished:%'"),
        )
        .await;
        assert_eq!(finished, 1, "job {job} finished exactly once");
    }
    assert_eq!(rows(&f.store).await, expected(&f, &images[0..80]), "every result's rows exactly once");
    assert_eq!(f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await, (0, 0), "every result acked");

    // Stored counts: each loop's dataflow saw only its own batches, so the counts they wrote
    // may disagree (the reason `tally serve` admits one writer). Report them; a restart must
    // correct every one.
    let v = tally::store::verify::verify(&f.store, tally::store::verify::Scope::default()).await.expect("verify");
    println!("count differences after two concurrent loops: {}", v.differences.len());
    let restarted = f.start(IngestArgs::default()).await;
    restarted.stop().await;
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_mid_run_keeps_its_progress_and_status() {
    let mut f = Fixture::new("progress_cancel", Flavor::Empty, world(1, 5)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..16]).await;
    let (first, rest) = tasks.split_at(8);
    let mut running = f.start(small_batches(3)).await;
    for (image, reply) in first {
        assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
    }
    running.wait_for(first.len(), 0, WAIT).await;
    let (status, progress) = job_row(&f.store, job).await;
    assert_eq!(status, "STARTED");
    let first_images: Vec<i64> = first.iter().map(|(i, _)| *i).collect();
    let want = expected(&f, &first_images);
    let (process, results) = (stage(&progress, "process"), stage(&progress, "results"));
    assert_eq!(
        (process.get("processed"), process.get("remaining"), results.get("detections")),
        (8, 8, want.detections),
        "half done: {progress}"
    );
    assert_eq!(process.progress, 0.5);

    let (logs, writer) = JobLogs::start(f.store.clone(), JobLogsConfig::default());
    let c = cancel::cancel(&f.store, Some(&f.js), &logs, job, "test").await.expect("cancel");
    writer.shutdown().await;
    assert!(c.revoked && c.status == "REVOKED", "{c:?}");
    let at_cancel = job_row(&f.store, job).await;
    assert_eq!(at_cancel.0, "REVOKED");
    assert_eq!(at_cancel.1["summary"]["status"], "REVOKED");

    // The rest, plus a redelivery of a result saved before the cancel.
    let mut published = first.len();
    for (image, reply) in rest.iter().rev() {
        assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
        published += 1;
    }
    let (image, reply) = &first[3];
    assert!(f.publish(job, &format!("redelivery-{reply}"), f.factory.task_result(reply, *image)).await);
    published += 1;
    running.wait_for(published, 0, WAIT).await;
    running.stop().await;

    assert_eq!(job_row(&f.store, job).await, at_cancel, "status and progress are what they were at cancel");
    assert_eq!(query_i64(&f.store, &format!("SELECT count(*) FROM tally.job_image WHERE job_id = {job}")).await, 8);
    let all: Vec<i64> = tasks.iter().map(|(i, _)| *i).collect();
    assert_eq!(rows(&f.store).await, expected(&f, &all), "late results are saved, exactly once");
    for (image, _) in rest {
        let n =
            query_i64(&f.store, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {image}")).await;
        assert!(n > 0, "image {image}'s late result was saved");
    }
    let warnings =
        query_i64(&f.store, &format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND level = 'WARNING'"))
            .await;
    assert_eq!(warnings, rest.len() as i64 + 1, "each late result is logged");
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_half_failed_is_failure_and_exactly_half_is_success() {
    let mut f = Fixture::new("progress_failure", Flavor::Empty, world(1, 5)).await;
    let images = f.world.images.clone();
    let (over, over_tasks) = f.job(&images[0..10]).await;
    let (half, half_tasks) = f.job(&images[10..20]).await;
    let mut running = f.start(small_batches(4)).await;

    let mut all: Vec<(i64, i64, String, bool)> = Vec::new();
    for (job, tasks, failing) in [(over, &over_tasks, 6), (half, &half_tasks, 5)] {
        for (k, (image, reply)) in tasks.iter().enumerate() {
            all.push((job, *image, reply.clone(), k < failing));
        }
    }
    shuffle(&mut all, 3);
    for (job, image, reply, fails) in &all {
        let payload = if *fails { error_result(reply, *image) } else { f.factory.task_result(reply, *image) };
        assert!(f.publish(*job, reply, payload).await);
    }
    running.wait_for(all.len(), 0, WAIT).await;
    running.stop().await;

    for (job, status, failing) in [(over, "FAILURE", 6), (half, "SUCCESS", 5)] {
        let ok: Vec<i64> = all.iter().filter(|(j, _, _, fails)| *j == job && !fails).map(|(_, i, _, _)| *i).collect();
        let failed: Vec<i64> =
            all.iter().filter(|(j, _, _, fails)| *j == job && *fails).map(|(_, i, _, _)| *i).collect();
        assert_eq!(failed.len(), failing);
        assert_finished(&f, job, status, 10, failing, &expected(&f, &ok)).await;
        for image in &failed {
            let sql = format!("SELECT count(*) FROM main_detection WHERE source_image_id = {image}");
            assert_eq!(
                query_i64(&f.store, &sql).await,
                0,
                "failed image {image} has no detection, not even a null marker"
            );
            let sql = format!(
                "SELECT count(*) FROM tally.job_image WHERE job_id = {job} AND image_id = {image} AND failed
                 AND error = 'download failed'"
            );
            assert_eq!(query_i64(&f.store, &sql).await, 1, "image {image} is failed for job {job}");
        }
        let sql =
            format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND message LIKE 'job finished: {status}%'");
        assert_eq!(query_i64(&f.store, &sql).await, 1, "job {job} logged its end");
    }
    let ok: Vec<i64> = all.iter().filter(|(_, _, _, fails)| !fails).map(|(_, i, _, _)| *i).collect();
    assert_eq!(rows(&f.store).await, expected(&f, &ok), "rows for the successful images only");
    assert_eq!(query_i64(&f.store, "SELECT count(*) FROM tally.dead_letter").await, 0);
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

/// One statement (or transaction) on `tally.job_image`, as ingest, the lost-images sweep or an
/// operator may run it.
#[derive(Debug, Clone)]
enum Write {
    /// Ingest's upsert of `(job, image, failed, detections, classifications)` rows.
    Upsert(Vec<(i64, i64, bool, i64, i64)>),
    /// The sweep's insert of failed rows, existing ones left alone.
    InsertFailed {
        job: i64,
        images: Vec<i64>,
    },
    /// An UPDATE of rows of `job` whose image is `image` modulo 3: marked failed or not, with
    /// `detections` more detections.
    Update {
        job: i64,
        image: i64,
        failed: bool,
        detections: i64,
    },
    /// Rows moved to another job.
    Move {
        from: i64,
        to: i64,
    },
    /// A DELETE of `job`'s rows whose image is `image` modulo 2.
    Delete {
        job: i64,
        image: i64,
    },
    /// Two upserts in one transaction that rolls back.
    RolledBack(Vec<(i64, i64, bool, i64, i64)>),
    Truncate,
}

fn job_image_write() -> impl proptest::strategy::Strategy<Value = Write> {
    use proptest::prelude::*;
    let row = (1..4i64, 1..13i64, any::<bool>(), 0..5i64, 0..9i64);
    prop_oneof![
        4 => prop::collection::vec(row.clone(), 1..8).prop_map(Write::Upsert),
        1 => (1..4i64, prop::collection::vec(1..13i64, 1..5)).prop_map(|(job, images)| Write::InsertFailed { job, images }),
        2 => (1..4i64, 0..3i64, any::<bool>(), -2..3i64)
            .prop_map(|(job, image, failed, detections)| Write::Update { job, image, failed, detections }),
        1 => (1..4i64, 1..5i64).prop_map(|(from, to)| Write::Move { from, to }),
        1 => (1..4i64, 0..2i64).prop_map(|(job, image)| Write::Delete { job, image }),
        1 => prop::collection::vec(row, 1..4).prop_map(Write::RolledBack),
        1 => Just(Write::Truncate),
    ]
}

/// Ingest's upsert (`save::write`'s statement), as SQL text.
fn upsert_sql(rows: &[(i64, i64, bool, i64, i64)]) -> String {
    let values: Vec<String> = rows.iter().map(|(j, i, f, d, c)| format!("({j}, {i}, {f}, NULL, {d}, {c})")).collect();
    format!(
        "INSERT INTO tally.job_image (job_id, image_id, failed, error, detections, classifications)
         SELECT DISTINCT ON (1, 2) * FROM (VALUES {}) AS v ORDER BY 1, 2
         ON CONFLICT (job_id, image_id) DO UPDATE SET
             failed = tally.job_image.failed OR EXCLUDED.failed,
             detections = tally.job_image.detections + EXCLUDED.detections,
             classifications = tally.job_image.classifications + EXCLUDED.classifications,
             last_seen = now()",
        values.join(", ")
    )
}

fn write_sql(w: &Write) -> String {
    match w {
        Write::Upsert(rows) => upsert_sql(rows),
        Write::InsertFailed { job, images } => format!(
            "INSERT INTO tally.job_image (job_id, image_id, failed, error)
             SELECT {job}, i, true, 'lost' FROM unnest('{{{}}}'::int8[]) AS i ON CONFLICT DO NOTHING",
            images.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ),
        Write::Update { job, image, failed, detections } => format!(
            "UPDATE tally.job_image SET failed = {failed}, detections = detections + {detections}, last_seen = now()
             WHERE job_id = {job} AND image_id % 3 = {image}"
        ),
        // Moved rows get negative image ids of their own (a sequence), so that no key collides.
        Write::Move { from, to } => format!(
            "CREATE SEQUENCE IF NOT EXISTS moved;
             UPDATE tally.job_image SET job_id = {to}, image_id = -nextval('moved')
             WHERE job_id = {from} AND {from} <> {to}"
        ),
        Write::Delete { job, image } => {
            format!("DELETE FROM tally.job_image WHERE job_id = {job} AND abs(image_id) % 2 = {image}")
        }
        Write::RolledBack(rows) => format!("BEGIN; {}; {}; ROLLBACK", upsert_sql(rows), upsert_sql(rows)),
        Write::Truncate => "TRUNCATE tally.job_image".into(),
    }
}

/// Jobs whose `tally.job_progress` sums differ from a recount of `tally.job_image` (a job
/// without rows may keep a row of zeros).
const PROGRESS_SUMS_DIFFER: &str = "
    SELECT coalesce(p.job_id, r.job_id), p.processed, r.processed, p.failed, r.failed,
           p.detections, r.detections, p.classifications, r.classifications
    FROM tally.job_progress p
    FULL JOIN (SELECT job_id, count(*) AS processed, count(*) FILTER (WHERE failed) AS failed,
                      sum(detections)::int8 AS detections, sum(classifications)::int8 AS classifications
               FROM tally.job_image GROUP BY job_id) r USING (job_id)
    WHERE (coalesce(p.processed, 0), coalesce(p.failed, 0), coalesce(p.detections, 0), coalesce(p.classifications, 0))
          IS DISTINCT FROM
          (coalesce(r.processed, 0), coalesce(r.failed, 0), coalesce(r.detections, 0), coalesce(r.classifications, 0))";

/// `tally.job_progress` equals a recount of `tally.job_image` after every one of a random
/// sequence of writes: ingest's upserts (inserting and updating), the sweep's inserts, plain
/// updates (rows marked failed and back, detections changed, rows moved between jobs),
/// deletes, rolled-back transactions and truncates. And the latest `last_seen` never moves back.
#[test]
fn random_writes_to_job_image_keep_the_progress_sums_exact() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (db, store) = rt.block_on(common::TestDb::new("job_progress_prop", Flavor::Empty));
    let client = rt.block_on(store.client()).expect("client");
    let config = ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(writes in prop::collection::vec(job_image_write(), 1..24))| {
        rt.block_on(async {
            client.batch_execute("TRUNCATE tally.job_image").await.expect("truncate");
            for (n, w) in writes.iter().enumerate() {
                let seen_before: Vec<(i64, Option<std::time::SystemTime>)> = client
                    .query("SELECT job_id, last_seen FROM tally.job_progress", &[])
                    .await
                    .expect("last seen")
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                client.batch_execute(&write_sql(w)).await.unwrap_or_else(|e| panic!("write {n} {w:?}: {e:?}"));
                let differ = client.query(PROGRESS_SUMS_DIFFER, &[]).await.expect("recount");
                let differ: Vec<Vec<Option<i64>>> =
                    differ.iter().map(|r| (0..9).map(|i| r.get(i)).collect()).collect();
                assert!(differ.is_empty(), "after write {n} {w:?} of {writes:?}: (job, sum, recount)… {differ:?}");
                if matches!(w, Write::Truncate) {
                    continue;
                }
                for (job, before) in seen_before {
                    let now: Option<std::time::SystemTime> = client
                        .query_opt("SELECT last_seen FROM tally.job_progress WHERE job_id = $1", &[&job])
                        .await
                        .expect("last seen")
                        .and_then(|r| r.get(0));
                    assert!(now >= before, "job {job}'s last_seen moved back after write {n} {w:?}");
                }
            }
        });
    });
    drop(client);
    drop(store);
    drop(db);
}

/// Writers of several jobs' `tally.job_image` rows at once (two ingest loops, ingest and the
/// lost-images sweep) lock the jobs' sums in one order, and then the jobs' rows, as
/// `progress::update` does: none is ever chosen as a deadlock victim, and the sums are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_several_jobs_at_once_never_deadlock_on_the_progress_sums() {
    let f = Fixture::new("job_progress_locks", Flavor::Empty, world(1, 1)).await;
    let store = f.store.clone();
    let c = store.client().await.expect("client");
    let pipeline: i64 = c.query_one("SELECT min(id) FROM ml_pipeline", &[]).await.expect("pipeline").get(0);
    for id in 1..=6 {
        let job = tally::jobs::row::NewJob {
            id: Some(id),
            name: format!("job {id}"),
            project: 1,
            pipeline,
            deployment: None,
            limit: None,
            total: None,
        };
        tally::jobs::row::insert_job(&c, &job).await.expect("job");
    }
    drop(c);
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut c = store.client().await.expect("client");
                for round in 0..40i64 {
                    // Each writer's jobs in its own order; images of its own, so that only the
                    // sums and the job rows are shared.
                    let mut jobs: Vec<i64> = (1..=6).collect();
                    jobs.rotate_left(((w + round) % 6) as usize);
                    if (w + round) % 2 == 1 {
                        jobs.reverse();
                    }
                    // Two to six of them.
                    jobs.truncate(2 + ((w * 7 + round * 3) % 5) as usize);
                    let rows: Vec<(i64, i64, bool, i64, i64)> =
                        jobs.iter().map(|&j| (j, w * 1_000 + round, round % 5 == 0, 2, 3)).collect();
                    let tx = c.transaction().await.expect("begin");
                    tx.batch_execute(&upsert_sql(&rows))
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} round {round}: {e:?}"));
                    tally::jobs::progress::update(tx.client(), &jobs)
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} round {round}: progress: {e:?}"));
                    tx.commit().await.unwrap_or_else(|e| panic!("writer {w} round {round}: commit: {e:?}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("a writer failed");
    }
    let c = store.client().await.expect("client");
    assert!(c.query(PROGRESS_SUMS_DIFFER, &[]).await.expect("recount").is_empty(), "sums exact");
    for job in 1..=6 {
        let (processed, ..) = progress_sums(&c, job).await.expect("sums");
        assert!(processed > 0, "job {job} was written");
        let (_, progress) = job_row(&store, job).await;
        assert_eq!(stage(&progress, "process").get("processed"), processed, "job {job}'s progress: {progress}");
    }
    f.cleanup().await;
}

/// Migration V8 on a database that already has `tally.job_image` rows (a tally upgraded in
/// place): the sums start equal to a recount, and the triggers keep them so from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_sums_migration_counts_the_rows_already_there() {
    let (_db, store) = common::TestDb::new("job_progress_upgrade", Flavor::Empty).await;
    let c = store.client().await.expect("client");
    // Back to the schema before V8, with rows of three jobs written then.
    c.batch_execute(
        "DROP TABLE tally.job_progress;
         DROP FUNCTION tally.job_progress_add() CASCADE;
         DELETE FROM tally.schema_history WHERE version = 8;
         INSERT INTO tally.job_image (job_id, image_id, failed, detections, classifications, last_seen)
         SELECT 1 + g % 3, g, g % 7 = 0, g % 4, g % 5, now() - make_interval(secs => g) FROM generate_series(1, 500) AS g;",
    )
    .await
    .expect("schema before V8");
    drop(c);
    tally::store::migrate::migrate(&store).await.expect("migrate to V8");
    let c = store.client().await.expect("client");
    assert!(c.query(PROGRESS_SUMS_DIFFER, &[]).await.expect("recount").is_empty(), "sums of the rows already there");
    assert_eq!(progress_sums(&c, 2).await, Some((167, 24, 250, 335)), "job 2 (images 1, 4, …, 499)");
    let latest: bool = c
        .query_one(
            "SELECT p.last_seen = (SELECT max(last_seen) FROM tally.job_image WHERE job_id = 1)
             FROM tally.job_progress p WHERE p.job_id = 1",
            &[],
        )
        .await
        .expect("last seen")
        .get(0);
    assert!(latest, "last_seen is the latest of the job's rows");
    c.batch_execute(&upsert_sql(&[(2, 1, true, 1, 1), (2, 1000, false, 2, 2)])).await.expect("upsert");
    assert!(c.query(PROGRESS_SUMS_DIFFER, &[]).await.expect("recount").is_empty(), "sums after a write");
}
