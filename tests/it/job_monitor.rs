//! The job monitor (SPEC §5: every job finishes; a finished job's queue is deleted), on real
//! Postgres and NATS JetStream:
//!
//! - through `tally serve`: a job of five images whose one task a worker fetches twice and
//!   never answers (consumer `max_deliver` 2, `ack_wait` 1 s) ends SUCCESS with processed 5,
//!   failed 1 and exact progress, a job log line naming the image; `/tasks` on the exhausted
//!   queue answers `[]` within the fetch wait; the finished job's stream is deleted a little
//!   later and `tally job status` still answers;
//! - a job whose stream was deleted before all its results came in finishes with exactly its
//!   missing images failed (from `tally.job_task`);
//! - jobs created by Antenna (no `tally.job_task` rows): lost images are read from the stream,
//!   or counted without ids when the stream is gone; a job with undelivered tasks is left alone;
//! - cleanup (on a private NATS server, where deleting every old zombie is safe): finished jobs
//!   after the grace, zombies of missing jobs only past their age, active jobs never.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::ingest::{
    self, antenna_progress, antenna_queue, job_progress, progress_param as param, unique, world, Fixture, PIPELINE,
};
use common::services::PrivateNats;
use common::{Flavor, TestDb};
use serde_json::{json, Value};
use tally::ingest::daemon::IngestArgs;
use tally::jobs::create::{create, Images, JobSpec};
use tally::jobs::logs::{JobLogs, JobLogsConfig};
use tally::jobs::lost::Reason;
use tally::jobs::monitor::{self, MonitorArgs};
use tally::jobs::queue::QueueSettings;
use tally::jobs::{consumer_name, stream_name};
use tally::store::Store;

const TOKEN: &str = "5a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const WAIT: Duration = Duration::from_secs(30);

/// Monitor settings for the in-process tests: stalled after `after`, never a zombie (the
/// shared NATS server holds other tests' streams).
fn monitor_args(after: Duration) -> MonitorArgs {
    MonitorArgs {
        lost_images_after: after,
        job_monitor_every: Duration::from_millis(200),
        cleanup_grace: Duration::from_secs(1),
        zombie_stream_age: Duration::from_secs(86_400),
    }
}

/// Job log lines of `job`: `(level, message, context)`.
async fn log_lines(store: &Store, job: i64) -> Vec<(String, String, Value)> {
    let c = store.client().await.expect("client");
    c.query("SELECT level, message, context FROM jobs_joblog WHERE job_id = $1 ORDER BY id", &[&job])
        .await
        .expect("job log")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// `(image, failed, error)` of `job`'s `tally.job_image` rows that failed.
async fn failed_images(store: &Store, job: i64) -> Vec<(i64, Option<String>)> {
    let c = store.client().await.expect("client");
    c.query("SELECT image_id, error FROM tally.job_image WHERE job_id = $1 AND failed ORDER BY image_id", &[&job])
        .await
        .expect("job images")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn progress_of(store: &Store, job: i64) -> (String, Value) {
    let c = store.client().await.expect("client");
    let r = c.query_one("SELECT status, progress FROM jobs_job WHERE id = $1", &[&job]).await.expect("job");
    (r.get(0), r.get(1))
}

/// Panics unless `job` is finished in `status` with `n` images processed, `failed` of them
/// failed, nothing remaining, and the results stage equal to `tally.job_image`'s sums.
async fn assert_finished(store: &Store, job: i64, status: &str, n: i64, failed: i64) -> Value {
    let (got, progress) = progress_of(store, job).await;
    assert_eq!(got, status, "job {job}: {progress}");
    let c = store.client().await.expect("client");
    let r = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE failed), coalesce(sum(detections), 0)::int8,
                    coalesce(sum(classifications), 0)::int8 FROM tally.job_image WHERE job_id = $1",
            &[&job],
        )
        .await
        .expect("sums");
    let (rows, failed_rows, detections, classifications): (i64, i64, i64, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!((rows, failed_rows), (n, failed), "job {job}: tally.job_image");
    let figures = [
        param(&progress, "process", "processed"),
        param(&progress, "process", "remaining"),
        param(&progress, "process", "failed"),
        param(&progress, "results", "captures"),
        param(&progress, "results", "detections"),
        param(&progress, "results", "classifications"),
    ];
    assert_eq!(
        figures,
        [json!(n), json!(0), json!(failed), json!(n - failed), json!(detections), json!(classifications)],
        "job {job}: {progress}"
    );
    for stage in ["process", "results"] {
        let s = progress["stages"].as_array().and_then(|s| s.iter().find(|s| s["key"] == stage)).expect("stage");
        assert_eq!((s["status"].as_str(), s["progress"].as_f64()), (Some(status), Some(1.0)), "{progress}");
    }
    assert_eq!(progress["summary"]["status"], status, "{progress}");
    assert_eq!(progress["summary"]["progress"], 1.0, "{progress}");
    progress
}

async fn stream_exists(js: &jetstream::Context, job: i64) -> bool {
    js.get_stream(stream_name(job)).await.is_ok()
}

/// A job row as Antenna leaves it (STARTED, `async_api`, `total` images collected, no
/// `tally.job_task` rows), its stream and a consumer with `max_deliver` and `ack_wait`, and one
/// task per image.
async fn antenna_job(f: &mut Fixture, images: &[i64], max_deliver: i64, ack_wait: Duration) -> i64 {
    let c = f.store.client().await.expect("client");
    let pipeline: i64 =
        c.query_one("SELECT id FROM ml_pipeline WHERE slug = $1", &[&PIPELINE]).await.expect("pipeline").get(0);
    let job = unique() as i64;
    c.execute(
        "INSERT INTO jobs_job (id, created_at, updated_at, name, queue, status, progress, project_id, delay,
                               shuffle, job_type_key, logs, dispatch_mode, pipeline_id, started_at)
         VALUES ($1, now(), now(), 'antenna job', 'default', 'STARTED', $2, 1, 0, false, 'ml',
                 '{\"stdout\": [], \"stderr\": []}', 'async_api', $3, now())",
        &[&job, &antenna_progress(images.len()), &pipeline],
    )
    .await
    .expect("insert job");
    antenna_queue(&f.js, job, images, max_deliver, ack_wait).await;
    f.jobs.push(job);
    job
}

/// Pulls every task of `job` as a worker would: `(image, reply subject)`.
async fn pull_all(f: &Fixture, job: i64, n: usize) -> Vec<(i64, String)> {
    let c: consumer::PullConsumer =
        f.js.get_consumer_from_stream(consumer_name(job), stream_name(job)).await.expect("job consumer");
    let tasks = tally_tools::synth::jobs::pull(&c, job, n).await.expect("every task pulled");
    tasks.into_iter().map(|t| (t.image, t.reply_subject)).collect()
}

fn ingest_args() -> IngestArgs {
    IngestArgs { batch_linger: Duration::ZERO, nak_delay: Duration::from_secs(1), ..IngestArgs::default() }
}

// ---------------------------------------------------------------------------------------------
// Through `tally serve`.

struct Serve {
    child: tokio::process::Child,
    base: String,
    log: PathBuf,
}

impl Serve {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

async fn serve(f: &Fixture, extra: &[&str]) -> Serve {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("address").port();
    let listen = format!("127.0.0.1:{port}");
    let n = unique();
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("job_monitor-{}-{n}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", &listen])
        .args(["--database-url", &f.db.as_ref().expect("test database").url])
        .args(["--nats-url", &f.nats_args.nats_url])
        .args(["--results-stream", &f.nats_args.results_stream])
        .args(["--results-subject-prefix", &f.nats_args.results_subject_prefix])
        .args(["--consumer", &format!("tally-ingest-monitor-{n}")])
        .args(["--gateway-fetch-wait", "0.2", "--zombie-stream-age", "86400"])
        .args(extra)
        .env("TALLY_LOG", "info")
        .env("TALLY_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("start tally serve");
    let mut s = Serve { child, base: format!("http://{listen}"), log };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = s.child.try_wait().expect("try_wait") {
            panic!("tally serve exited before it was ready: {status}\n{}", s.log_tail());
        }
        if let Ok(r) = http.get(format!("{}/readyz", s.base)).timeout(Duration::from_secs(2)).send().await {
            if r.status().as_u16() == 200 {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "tally serve not ready within 30 s\n{}", s.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST /api/v2/jobs/{job}/tasks/`: `(status, tasks as (image, reply), seconds taken)`.
async fn fetch_tasks(base: &str, job: i64, n: usize) -> (u16, Vec<(i64, String)>, f64) {
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v2/jobs/{job}/tasks/"))
        .header("Authorization", format!("Token {TOKEN}"))
        .json(&json!({"batch_size": n}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("tasks call");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("tasks JSON");
    let took = started.elapsed().as_secs_f64();
    let tasks = body["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    let image = t["image_id"].as_str().and_then(|s| s.parse().ok()).expect("image id");
                    (image, t["reply_subject"].as_str().expect("reply subject").to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    (status, tasks, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_exhausts_max_deliver_is_marked_lost_then_the_finished_job_is_cleaned_up() {
    let f = Fixture::new("monitor_serve", Flavor::Empty, world(1, 3)).await;
    common::insert_worker_token(&f.store, TOKEN).await;
    let images: Vec<i64> = f.world.images[..5].to_vec();
    let job = unique() as i64;
    let mut spec = JobSpec::new(Images::List(images.to_vec()), PIPELINE);
    spec.id = Some(job);
    spec.project = Some(1);
    spec.queue = QueueSettings { ack_wait: Duration::from_secs(1), max_deliver: 2, ..QueueSettings::default() };
    let (logs, writer) = JobLogs::start(f.store.clone(), JobLogsConfig::default());
    create(&f.store, &f.js, &logs, &spec).await.expect("create job");
    writer.shutdown().await;
    let mut s = serve(&f, &["--lost-images-after", "3", "--job-monitor-every", "0.3", "--cleanup-grace", "1"]).await;

    // A worker takes all five tasks and answers four.
    let (status, tasks, _) = fetch_tasks(&s.base, job, 10).await;
    assert_eq!((status, tasks.len()), (200, 5));
    let (lost, lost_reply) = tasks[2].clone();
    let results: Vec<Value> = tasks
        .iter()
        .filter(|(i, _)| *i != lost)
        .map(|(i, r)| serde_json::from_slice(&f.factory.task_result(r, *i)).expect("result JSON"))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/api/v2/jobs/{job}/result/", s.base))
        .header("Authorization", format!("Token {TOKEN}"))
        .json(&json!({"results": results}))
        .send()
        .await
        .expect("result call");
    assert_eq!(r.status().as_u16(), 200);

    // The unanswered task comes back once after its ack wait, and is never answered again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, again, _) = fetch_tasks(&s.base, job, 10).await;
    assert_eq!(status, 200);
    assert_eq!(again.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![lost], "the redelivery");
    assert_ne!(again[0].1, lost_reply, "a new delivery has a new reply subject");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Exhausted: Antenna's `[]`, within the fetch wait (0.2 s) and a margin, not a 10 s hang.
    for _ in 0..2 {
        let (status, none, took) = fetch_tasks(&s.base, job, 10).await;
        assert_eq!((status, none.len()), (200, 0));
        assert!(took < 1.2, "an exhausted queue answered after {took:.2} s");
        eprintln!("/tasks on the exhausted queue answered [] in {:.0} ms", took * 1000.0);
    }

    // The monitor marks the image failed: SUCCESS (1 of 5 failed), exact progress.
    let deadline = Instant::now() + WAIT;
    while progress_of(&f.store, job).await.0 != "SUCCESS" {
        assert!(Instant::now() < deadline, "job {job} not finished\n{}", s.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let progress = assert_finished(&f.store, job, "SUCCESS", 5, 1).await;
    assert_eq!(failed_images(&f.store, job).await, vec![(lost, Some("lost: tasks exhausted max_deliver".into()))]);
    let lines = log_lines(&f.store, job).await;
    let (level, message, context) = lines
        .iter()
        .find(|(_, m, _)| m.starts_with("Marked 1 lost images failed"))
        .unwrap_or_else(|| panic!("no lost-images line in {lines:?}"));
    assert_eq!(level, "WARNING");
    assert!(message.contains("tasks exhausted max_deliver") && message.contains("num_pending=0"), "{message}");
    assert!(message.ends_with(&format!(": images {lost}")), "{message}");
    assert_eq!(context["image_ids"], json!([lost]), "{context}");
    assert_eq!(context["reason"], "max_deliver");
    assert_eq!(context["images_from"], "tally.job_task");
    assert!(
        lines.iter().any(|(_, m, _)| m.starts_with("job finished: SUCCESS (5 images processed, 1 failed")),
        "{lines:?}"
    );
    assert_eq!(progress["errors"].as_array().map(|e| e.len()), Some(1), "{progress}");

    // A little later its consumer and stream are gone; status still answers, from Postgres.
    let deadline = Instant::now() + WAIT;
    while stream_exists(&f.js, job).await {
        assert!(Instant::now() < deadline, "stream of finished job {job} not deleted\n{}", s.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The cleanup's log lines are written once the pass has deleted what it found.
    for want in [format!("Deleted NATS consumer job-{job}-consumer"), format!("Deleted NATS stream job_{job}")] {
        loop {
            let lines = log_lines(&f.store, job).await;
            if lines.iter().any(|(_, m, _)| m.starts_with(&want)) {
                break;
            }
            assert!(Instant::now() < deadline, "{want:?} not in {lines:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["job", "status", &job.to_string()])
        .env("DATABASE_URL", &f.db.as_ref().expect("test database").url)
        .env("NATS_URL", ingest::nats_url())
        .env("TALLY_LOG", "warn")
        .output()
        .await
        .expect("tally job status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("job {job}  SUCCESS")), "{text}");
    assert!(text.contains("images with a result  5 (1 failed)"), "{text}");
    assert!(text.contains(&format!("queue deleted (the job is SUCCESS; stream job_{job} no longer exists)")), "{text}");
    // After cleanup, /tasks on the finished job is `[]` at once.
    let (status, none, _) = fetch_tasks(&s.base, job, 1).await;
    assert_eq!((status, none.len()), (200, 0));

    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("tally_job_lost_images_total{reason=\"max_deliver\"} 1"), "{metrics}");
    assert!(metrics.contains("tally_job_queues_deleted_total{why=\"finished\"} 1"), "{metrics}");

    let pid = s.child.id().expect("pid").to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await.expect("stops").expect("wait");
    assert!(status.success(), "{status}\n{}", s.log_tail());
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "tally serve logged errors:\n{}", errors.join("\n"));
    f.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// The library entry (`monitor::pass`), with ingest in-process.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_stream_was_deleted_finishes_with_exactly_its_missing_images_failed() {
    let mut f = Fixture::new("monitor_gone", Flavor::Empty, world(1, 3)).await;
    let images: Vec<i64> = f.world.images[..5].to_vec();
    let (job, tasks) = f.job(&images).await;
    let mut running = f.start(ingest_args()).await;
    for (image, reply) in &tasks[..3] {
        assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
    }
    running.wait_for(3, 0, WAIT).await;
    f.js.delete_stream(stream_name(job)).await.expect("delete the job's stream");
    let args = monitor_args(Duration::from_secs(2));

    // Not stalled yet: results were saved just now.
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert!(pass.marked.iter().all(|m| m.job_id != job), "{pass:?}");
    assert_eq!(job_progress(&f.store, job).await.0, "STARTED");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    let marked = pass.marked.iter().find(|m| m.job_id == job).unwrap_or_else(|| panic!("{pass:?}"));
    let mut missing: Vec<i64> = tasks[3..].iter().map(|(i, _)| *i).collect();
    missing.sort_unstable();
    assert_eq!(
        (marked.reason, &marked.images, marked.unknown, marked.finished),
        (Reason::QueueGone, &missing, 0, Some("SUCCESS"))
    );
    assert_finished(&f.store, job, "SUCCESS", 5, 2).await;
    let failed = failed_images(&f.store, job).await;
    assert_eq!(failed, missing.iter().map(|i| (*i, Some("lost: task queue gone".to_string()))).collect::<Vec<_>>());
    let lines = log_lines(&f.store, job).await;
    let want = format!("images {}, {}", missing[0], missing[1]);
    assert!(
        lines.iter().any(|(l, m, _)| l == "WARNING"
            && m.starts_with("Marked 2 lost images failed (task queue gone")
            && m.contains("does not exist")
            && m.ends_with(&want)),
        "{lines:?}"
    );

    // Another pass changes nothing; a late result is saved but moves no figure.
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert!(pass.marked.iter().all(|m| m.job_id != job), "{pass:?}");
    let (image, reply) = &tasks[3];
    assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
    running.wait_for(4, 0, WAIT).await;
    assert_eq!(job_progress(&f.store, job).await.0, "SUCCESS");
    let (_, progress) = progress_of(&f.store, job).await;
    assert_eq!((param(&progress, "process", "processed"), param(&progress, "process", "failed")), (json!(5), json!(2)));
    running.stop().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_created_by_antenna_take_their_lost_images_from_the_stream_or_count_them() {
    let mut f = Fixture::new("monitor_antenna", Flavor::Empty, world(1, 4)).await;
    let images = f.world.images.clone();
    // Exhausted: one delivery each, ack wait 1 s; two of four answered.
    let exhausted = antenna_job(&mut f, &images[0..4], 1, Duration::from_secs(1)).await;
    let exhausted_tasks = pull_all(&f, exhausted, 4).await;
    // Gone: one of four answered, then the stream deleted.
    let gone = antenna_job(&mut f, &images[4..8], 2, Duration::from_secs(300)).await;
    let gone_tasks = pull_all(&f, gone, 4).await;
    // Waiting for workers: three tasks never delivered.
    let waiting = antenna_job(&mut f, &images[8..11], 2, Duration::from_secs(300)).await;

    let mut running = f.start(ingest_args()).await;
    for (image, reply) in &exhausted_tasks[..2] {
        assert!(f.publish(exhausted, reply, f.factory.task_result(reply, *image)).await);
    }
    let (image, reply) = &gone_tasks[0];
    assert!(f.publish(gone, reply, f.factory.task_result(reply, *image)).await);
    running.wait_for(3, 0, WAIT).await;
    running.stop().await;
    f.js.delete_stream(stream_name(gone)).await.expect("delete stream");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let pass = monitor::pass(&f.store, &f.js, &monitor_args(Duration::from_secs(1)), None).await;
    let of = |job: i64| pass.marked.iter().find(|m| m.job_id == job);

    // Read from the stream: the two unanswered images, by id. 2 of 4 is not more than half.
    let m = of(exhausted).unwrap_or_else(|| panic!("{pass:?}"));
    let mut want: Vec<i64> = exhausted_tasks[2..].iter().map(|(i, _)| *i).collect();
    want.sort_unstable();
    assert_eq!((m.reason, &m.images, m.unknown, m.finished), (Reason::MaxDeliver, &want, 0, Some("SUCCESS")));
    assert_finished(&f.store, exhausted, "SUCCESS", 4, 2).await;
    let lines = log_lines(&f.store, exhausted).await;
    let (_, message, context) =
        lines.iter().find(|(_, m, _)| m.starts_with("Marked 2 lost images")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(message.contains("tasks exhausted max_deliver") && message.contains("num_pending=0"), "{message}");
    assert_eq!(context["images_from"], "stream");
    assert_eq!(context["image_ids"], json!(want));

    // The stream is gone and tally never knew the images: three counted failed without ids.
    let m = of(gone).unwrap_or_else(|| panic!("{pass:?}"));
    assert_eq!((m.reason, m.images.len(), m.unknown, m.finished), (Reason::QueueGone, 0, 3, Some("FAILURE")));
    assert_finished(&f.store, gone, "FAILURE", 4, 3).await;
    let failed: Vec<i64> = failed_images(&f.store, gone).await.into_iter().map(|(i, _)| i).collect();
    assert_eq!(failed, vec![-3, -2, -1], "placeholder rows below every image id");
    let lines = log_lines(&f.store, gone).await;
    assert!(
        lines.iter().any(|(_, m, _)| m.starts_with("Marked 3 lost images failed (task queue gone")
            && m.ends_with(
                "3 more images counted failed without ids (the job's stream is gone and tally did not create the job)"
            )),
        "{lines:?}"
    );

    // Undelivered tasks: the job waits for workers, untouched.
    assert!(of(waiting).is_none(), "{pass:?}");
    assert_eq!(job_progress(&f.store, waiting).await.0, "STARTED");
    assert!(failed_images(&f.store, waiting).await.is_empty());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_queues_go_after_the_grace_zombies_after_their_age_active_ones_never() {
    // A private server: this test deletes every old zombie stream it finds.
    let nats = PrivateNats::start();
    let (db, store) = TestDb::new("monitor_sweep", Flavor::Empty).await;
    let mut f = Fixture::on(Some(db), store, &nats.url(), world(1, 1)).await;
    let images = f.world.images.clone();
    let finished_now = antenna_job(&mut f, &images[0..1], 2, Duration::from_secs(300)).await;
    let finished_long_ago = antenna_job(&mut f, &images[1..2], 2, Duration::from_secs(300)).await;
    let active = antenna_job(&mut f, &images[2..3], 2, Duration::from_secs(300)).await;
    let zombie = antenna_job(&mut f, &images[3..4], 2, Duration::from_secs(300)).await;
    let c = f.store.client().await.expect("client");
    c.execute("UPDATE jobs_job SET status = 'SUCCESS', finished_at = now() WHERE id = $1", &[&finished_now])
        .await
        .expect("finish");
    c.execute(
        "UPDATE jobs_job SET status = 'REVOKED', finished_at = now() - interval '1 hour' WHERE id = $1",
        &[&finished_long_ago],
    )
    .await
    .expect("revoke");
    c.execute("DELETE FROM jobs_job WHERE id = $1", &[&zombie]).await.expect("delete job");
    let mut args = monitor_args(Duration::from_secs(3600));
    args.cleanup_grace = Duration::from_secs(2);
    args.zombie_stream_age = Duration::from_secs(3600);

    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert_eq!((pass.swept.finished.clone(), pass.swept.zombies.clone()), (vec![finished_long_ago], vec![]));
    assert!(!stream_exists(&f.js, finished_long_ago).await);
    let lines = log_lines(&f.store, finished_long_ago).await;
    assert!(
        lines.iter().any(|(_, m, _)| m.starts_with(&format!("Deleted NATS stream job_{finished_long_ago}"))),
        "{lines:?}"
    );
    assert!(lines.iter().any(|(_, m, _)| m.starts_with("Final stats of NATS consumer")), "{lines:?}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert_eq!((pass.swept.finished.clone(), pass.swept.zombies.clone()), (vec![finished_now], vec![]));

    args.zombie_stream_age = Duration::ZERO;
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert_eq!((pass.swept.finished.clone(), pass.swept.zombies.clone()), (vec![], vec![zombie]));
    let pass = monitor::pass(&f.store, &f.js, &args, None).await;
    assert_eq!(pass.swept, Default::default(), "nothing left to delete");
    for (job, exists) in [(finished_now, false), (finished_long_ago, false), (active, true), (zombie, false)] {
        assert_eq!(stream_exists(&f.js, job).await, exists, "stream of job {job}");
    }
    let status = tally::jobs::status::read(&f.store, Some(&f.js), finished_now).await.expect("status");
    assert_eq!((status.status.as_str(), &status.queue), ("SUCCESS", &tally::jobs::status::Queue::Absent));
    f.cleanup().await;
    drop(nats);
}
