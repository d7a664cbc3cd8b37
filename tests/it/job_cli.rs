//! `tally job` against real Postgres and NATS JetStream: create (the `jobs_job` row, the stream
//! with one task per image in Antenna's body, the consumer's settings, the image order and
//! limit, refusals that write nothing), status, logs (with `--follow`), cancel (REVOKED, queue
//! deleted, a second cancel and a finished job left alone), the buffered job-log writer, and
//! ingest leaving a cancelled job's progress alone.
//!
//! Jobs created by the binary take their ids from the `jobs_job` identity, which each test
//! moves to a range of its own, so that stream names never collide on the shared NATS server.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use common::ingest::{antenna_progress, job_progress, unique, world, Fixture, PIPELINE};
use common::Flavor;
use serde_json::{json, Value};
use tally::ingest::daemon::IngestArgs;
use tally::jobs::create::{self, Images, JobSpec};
use tally::jobs::logs::{self, JobLogs, JobLogsConfig, Level, Rows};
use tally::jobs::{cancel, stream_name};

fn tally(f: &Fixture, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("DATABASE_URL", &f.db.as_ref().expect("test database").url)
        .env("NATS_URL", common::ingest::nats_url())
        .env("TALLY_CONNECT_ATTEMPTS", "2")
        .output()
        .expect("tally runs")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Moves the `jobs_job` identity to a range no other test uses.
async fn own_job_ids(f: &Fixture) {
    let c = f.store.client().await.expect("client");
    let first = 3_000_000_000 + unique() as i64 * 16;
    c.execute("SELECT setval(pg_get_serial_sequence('jobs_job', 'id'), $1, false)", &[&first]).await.expect("setval");
}

async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(f: &Fixture, sql: &str) -> T {
    f.store.client().await.expect("client").query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// Creates a job through the binary and returns its JSON description.
fn create_cli(f: &Fixture, args: &[&str]) -> Value {
    let mut all = vec!["job", "create", "--pipeline", PIPELINE, "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&tally(f, &all))).expect("create prints JSON")
}

/// The task bodies in job `id`'s stream, in stream order; asserts they carry no headers.
async fn task_bodies(f: &Fixture, id: i64) -> Vec<Value> {
    let mut stream = f.js.get_stream(stream_name(id)).await.expect("job stream");
    let n = stream.info().await.expect("stream info").state.messages;
    let mut bodies = Vec::new();
    for seq in 1..=n {
        let m = stream.get_raw_message(seq).await.expect("task message");
        assert!(m.headers.is_empty(), "Antenna publishes tasks without headers");
        assert_eq!(m.subject.as_str(), format!("job.{id}.tasks"));
        bodies.push(serde_json::from_slice(&m.payload).expect("task JSON"));
    }
    bodies
}

fn image_of(body: &Value) -> i64 {
    body["image_id"].as_str().and_then(|s| s.parse().ok()).expect("image id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_status_logs_and_cancel_through_the_binary() {
    let f = Fixture::new("jobcli_flow", Flavor::Antenna, world(1, 3)).await;
    own_job_ids(&f).await;
    let created = create_cli(&f, &["--deployment", "1"]);
    let id = created["id"].as_i64().expect("id");
    assert_eq!((created["tasks"].as_u64(), created["status"].as_str()), (Some(6), Some("STARTED")));

    let c = f.store.client().await.expect("client");
    let row = c
        .query_one(
            "SELECT status, dispatch_mode, project_id, deployment_id, pipeline_id = (SELECT id FROM ml_pipeline
                    WHERE slug = $2), \"limit\", job_type_key, started_at IS NOT NULL, finished_at IS NULL, progress
             FROM jobs_job WHERE id = $1",
            &[&id, &PIPELINE],
        )
        .await
        .expect("job row");
    assert_eq!(row.get::<_, String>(0), "STARTED");
    assert_eq!(row.get::<_, String>(1), "async_api");
    assert_eq!((row.get::<_, i64>(2), row.get::<_, Option<i64>>(3)), (1, Some(1)));
    assert!(row.get::<_, bool>(4), "the pipeline named");
    assert_eq!((row.get::<_, Option<i32>>(5), row.get::<_, String>(6)), (None, "ml".to_string()));
    assert!(row.get::<_, bool>(7) && row.get::<_, bool>(8));
    let progress: Value = row.get(9);
    assert_eq!(progress["stages"], antenna_progress(6)["stages"], "Antenna's stages after collect");

    // One task per image of the deployment, in Antenna's body, on a consumer with its settings.
    let bodies = task_bodies(&f, id).await;
    let mut images: Vec<i64> = bodies.iter().map(image_of).collect();
    images.sort_unstable();
    let mut expected: Vec<i64> =
        f.world.tables.images.iter().filter(|(_, i)| i.deployment == Some(1)).map(|(id, _)| *id).collect();
    expected.sort_unstable();
    assert_eq!(images, expected);
    for b in &bodies {
        let image = image_of(b);
        let url = format!("https://no-public-base-url.invalid/image/{image}.jpg");
        assert_eq!(
            b,
            &json!({"id": image.to_string(), "image_id": image.to_string(), "image_url": url, "reply_subject": null})
        );
    }
    let s = f.js.get_stream(stream_name(id)).await.expect("stream");
    assert_eq!(s.cached_info().config.subjects, vec![format!("job.{id}.tasks")]);
    assert_eq!(s.cached_info().config.max_age, Duration::from_secs(86_400));
    let consumer: consumer::PullConsumer =
        f.js.get_consumer_from_stream(format!("job-{id}-consumer"), stream_name(id)).await.expect("consumer");
    let config = &consumer.cached_info().config;
    assert_eq!((config.ack_wait, config.max_deliver, config.max_ack_pending), (Duration::from_secs(300), 2, 1000));
    assert_eq!(
        (config.ack_policy, config.deliver_policy),
        (consumer::AckPolicy::Explicit, consumer::DeliverPolicy::All)
    );
    assert_eq!(config.filter_subject, format!("job.{id}.tasks"));

    let text = ok(&tally(&f, &["job", "status", &id.to_string()]));
    assert!(text.contains(&format!("job {id}  STARTED")), "{text}");
    assert!(text.contains("6 tasks, 6 not yet delivered, 0 awaiting ack"), "{text}");
    assert!(text.contains("total_images=6"), "{text}");
    let status: Value =
        serde_json::from_str(&ok(&tally(&f, &["job", "status", &id.to_string(), "--json"]))).expect("json");
    assert_eq!((status["status"].as_str(), status["queue"]["state"].as_str()), (Some("STARTED"), Some("present")));
    assert_eq!(status["queue"]["consumer"]["num_pending"], 6);
    assert_eq!(status["stages"][0]["params"][0]["value"], 6);

    let log = ok(&tally(&f, &["job", "logs", &id.to_string()]));
    assert!(log.contains(&format!("] INFO Queuing 6 images to NATS stream for job '{id}'")), "{log}");
    assert!(log.contains(&format!("INFO Successfully queued 6/6 images to stream for job '{id}'")), "{log}");

    let out = ok(&tally(&f, &["job", "cancel", &id.to_string()]));
    assert!(out.contains(&format!("job {id} cancelled: STARTED → REVOKED")), "{out}");
    assert!(
        out.contains("deleted NATS consumer") && out.contains("(6 tasks never delivered, 0 awaiting ack)"),
        "{out}"
    );
    let row = c
        .query_one("SELECT status, finished_at IS NOT NULL, progress #>> '{summary,status}', finished_at::text FROM jobs_job WHERE id = $1", &[&id])
        .await
        .expect("job");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1), row.get::<_, String>(2)),
        ("REVOKED".into(), true, "REVOKED".into())
    );
    let finished: String = row.get(3);
    assert!(f.js.get_stream(stream_name(id)).await.is_err(), "the stream is deleted");
    let log = ok(&tally(&f, &["job", "logs", &id.to_string()]));
    assert!(log.contains(&format!("INFO Job {id} cancelled (tally job cancel): STARTED → REVOKED")), "{log}");
    assert!(log.contains(&format!("INFO Deleted NATS stream job_{id} for job '{id}'")), "{log}");

    let again = ok(&tally(&f, &["job", "cancel", &id.to_string()]));
    assert!(again.contains(&format!("job {id} is already REVOKED: nothing to cancel")), "{again}");
    assert!(again.contains("its task queue is already gone"), "{again}");
    let still: String = one(&f, &format!("SELECT finished_at::text FROM jobs_job WHERE id = {id}")).await;
    assert_eq!(still, finished, "a second cancel changes nothing");
    let text = ok(&tally(&f, &["job", "status", &id.to_string()]));
    assert!(text.contains(&format!("queue deleted (the job is REVOKED; stream job_{id} no longer exists)")), "{text}");
    let missing = tally(&f, &["job", "cancel", "424242"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no job 424242"));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_order_limit_lists_and_refusals() {
    let f = Fixture::new("jobcli_choose", Flavor::Empty, world(1, 3)).await;
    own_job_ids(&f).await;
    let c = f.store.client().await.expect("client");
    // The later night of deployment 1 now starts first: Antenna orders by event start, then time.
    let events: Vec<i64> = c
        .query("SELECT id FROM main_event WHERE deployment_id = 1 ORDER BY id", &[])
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.execute("UPDATE main_event SET start = start - interval '30 days' WHERE id = $1", &[&events[1]])
        .await
        .expect("move");
    let mut order: Vec<(i64, i64)> = c
        .query("SELECT id, event_id FROM main_sourceimage WHERE deployment_id = 1 ORDER BY \"timestamp\", id", &[])
        .await
        .expect("images")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    order.sort_by_key(|(_, event)| *event != events[1]);
    let created = create_cli(&f, &["--deployment", "1", "--limit", "4"]);
    let id = created["id"].as_i64().expect("id");
    let mut got: Vec<i64> = task_bodies(&f, id).await.iter().map(image_of).collect();
    let mut want: Vec<i64> = order.iter().take(4).map(|(i, _)| *i).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "the first four in Antenna's order");
    let (limit, progress): (Option<i32>, Value) = {
        let r = c.query_one("SELECT \"limit\", progress FROM jobs_job WHERE id = $1", &[&id]).await.expect("job");
        (r.get(0), r.get(1))
    };
    assert_eq!(limit, Some(4));
    assert_eq!(
        progress["stages"][0]["params"],
        json!([
        {"name": "Total Images", "key": "total_images", "category": "default", "value": 4},
        {"name": "Limit", "key": "limit", "category": "default", "value": 4}])
    );
    let log = ok(&tally(&f, &["job", "logs", &id.to_string(), "--level", "warning"]));
    assert_eq!(log.trim_end().lines().count(), 1, "{log}");
    assert!(log.contains("WARNING Limiting number of images to 4 (out of 6)"), "{log}");

    let listed = create_cli(&f, &["--images", "5,2,2,9"]);
    let id = listed["id"].as_i64().expect("id");
    assert_eq!(
        (listed["tasks"].as_u64(), listed["deployment"].is_null(), listed["project"].as_i64()),
        (Some(3), true, Some(1))
    );
    let mut got: Vec<i64> = task_bodies(&f, id).await.iter().map(image_of).collect();
    got.sort_unstable();
    assert_eq!(got, vec![2, 5, 9]);

    let jobs: i64 = one(&f, "SELECT count(*) FROM jobs_job").await;
    for (args, message) in
        [(vec!["--images", "1,99999"], "no such images: [99999]"), (vec!["--deployment", "77"], "no deployment 77")]
    {
        let out = tally(&f, &[&["job", "create", "--pipeline", PIPELINE][..], &args[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{stderr}");
    }
    let out = tally(&f, &["job", "create", "--pipeline", "no-such-pipeline", "--images", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pipeline with slug \"no-such-pipeline\""));
    assert_eq!(tally(&f, &["job", "create", "--pipeline", PIPELINE]).status.code(), Some(2), "images are required");
    assert_eq!(one::<i64>(&f, "SELECT count(*) FROM jobs_job").await, jobs, "refusals write nothing");

    // No image: finished at once, as Antenna's zero-image case, and no stream.
    let (logs, writer) = JobLogs::start(f.store.clone(), JobLogsConfig::default());
    let mut spec = JobSpec::new(Images::List(Vec::new()), PIPELINE);
    spec.project = Some(1);
    let empty = create::create(&f.store, &f.js, &logs, &spec).await.expect("empty job");
    writer.shutdown().await;
    assert_eq!((empty.status.as_str(), empty.stream.is_none()), ("SUCCESS", true));
    let status: String =
        one(&f, &format!("SELECT status FROM jobs_job WHERE id = {} AND finished_at IS NOT NULL", empty.id)).await;
    assert_eq!(status, "SUCCESS");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_finished_job_keeps_its_status() {
    let f = Fixture::new("jobcli_finished", Flavor::Empty, world(1, 2)).await;
    own_job_ids(&f).await;
    for status in ["SUCCESS", "FAILURE"] {
        let id = create_cli(&f, &["--images", "1,2"])["id"].as_i64().expect("id");
        let c = f.store.client().await.expect("client");
        c.execute(
            "UPDATE jobs_job SET status = $2, finished_at = '2026-01-02 03:04:05' WHERE id = $1",
            &[&id, &status],
        )
        .await
        .expect("finish");
        let out = ok(&tally(&f, &["job", "cancel", &id.to_string()]));
        assert!(out.contains(&format!("job {id} is already {status}: nothing to cancel")), "{out}");
        // Antenna's cleanup runs whatever the status: a leftover queue is released.
        assert!(out.contains("deleted NATS consumer"), "{out}");
        let row =
            c.query_one("SELECT status, finished_at::text FROM jobs_job WHERE id = $1", &[&id]).await.expect("job");
        assert_eq!(row.get::<_, String>(0), status);
        assert!(row.get::<_, String>(1).starts_with("2026-01-02 03:04:05"));
        let cancelled: i64 =
            one(&f, &format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {id} AND message LIKE '%cancelled%'"))
                .await;
        assert_eq!(cancelled, 0);
    }
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_job_logs_flush_in_batches_and_drain_on_shutdown() {
    let f = Fixture::new("jobcli_logs", Flavor::Empty, world(1, 1)).await;
    own_job_ids(&f).await;
    let handle = tally::metrics::install();
    let job = create_cli(&f, &["--images", "1"])["id"].as_i64().expect("id");
    let count = format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND message LIKE 'line %'");

    // A full batch is written at once; the rest waits for the interval or the shutdown.
    let config = JobLogsConfig { interval: Duration::from_secs(30), ..JobLogsConfig::default() };
    let (logs, writer) = JobLogs::start(f.store.clone(), config);
    for n in 0..1234 {
        assert!(logs.clone().info(job, format!("line {n:04}")));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while one::<i64>(&f, &count).await < 1000 {
        assert!(Instant::now() < deadline, "two full batches not written within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(one::<i64>(&f, &count).await, 1000, "the last 234 lines wait");
    assert!(logs.log(424_242, Level::Error, "line for no job"), "accepted, then skipped: no such job");
    let stats = writer.shutdown().await;
    assert_eq!((stats.written, stats.batches, stats.no_job, stats.failed), (1234, 3, 1, 0));
    let messages: Vec<String> = f
        .store
        .client()
        .await
        .expect("client")
        .query("SELECT message FROM jobs_joblog WHERE job_id = $1 AND message LIKE 'line %' ORDER BY id", &[&job])
        .await
        .expect("lines")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(messages, (0..1234).map(|n| format!("line {n:04}")).collect::<Vec<_>>(), "in order");
    assert!(!logs.info(job, "after shutdown"), "a closed writer takes no line");

    // A few lines are written after the interval, without a shutdown.
    let config = JobLogsConfig { interval: Duration::from_millis(200), ..JobLogsConfig::default() };
    let (logs, writer) = JobLogs::start(f.store.clone(), config);
    for n in 0..3 {
        logs.warning(job, format!("line late {n}"));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(one::<i64>(&f, &count).await, 1237);
    assert_eq!(writer.shutdown().await.batches, 1);

    // A full buffer drops lines (counted) instead of blocking.
    let config = JobLogsConfig { capacity: 8, ..JobLogsConfig::default() };
    let (logs, writer) = JobLogs::start(f.store.clone(), config);
    let accepted = (0..5000).filter(|n| logs.info(job, format!("line flood {n}"))).count() as u64;
    let stats = writer.shutdown().await;
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!((stats.written, stats.written + stats.dropped), (accepted, 5000));
    handle.run_upkeep();
    assert!(handle.render().contains("tally_job_log_lines_total{outcome=\"dropped\"}"));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_prints_lines_written_after_it_started() {
    let f = Fixture::new("jobcli_follow", Flavor::Empty, world(1, 1)).await;
    own_job_ids(&f).await;
    let job = create_cli(&f, &["--images", "1,2"])["id"].as_i64().expect("id");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["job", "logs", &job.to_string(), "--follow", "--poll-ms", "100"])
        .env("DATABASE_URL", &f.db.as_ref().expect("db").url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tally runs");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("`tally job logs --follow` did not print {needle:?} within 15 s"),
            }
        }
    };
    wait_for("Successfully queued 2/2 images");
    let (context, message) = (json!({}), format!("written later by test {}", unique()));
    let mut rows = Rows::default();
    rows.push(job, Level::Error, &message, &context, None);
    let client = f.store.client().await.expect("client");
    let client: &tokio_postgres::Client = &client;
    assert_eq!(logs::insert(client, &rows).await.expect("insert"), 1);
    assert!(wait_for(&message).contains(&format!("ERROR {message}")));
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "--follow did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_leaves_cancelled_jobs_progress_alone() {
    let mut f = Fixture::new("jobcli_ingest", Flavor::Empty, world(1, 2)).await;
    let images = f.world.images.clone();
    let (revoked, tasks) = f.job(&images[0..3]).await;
    let (canceling, other) = f.job(&images[3..5]).await;
    let mut running = f.start(IngestArgs::default()).await;
    f.publish(revoked, "first", f.factory.task_result(&tasks[0].1, tasks[0].0)).await;
    running.wait_for(1, 0, Duration::from_secs(30)).await;
    assert_eq!(job_progress(&f.store, revoked).await.1, 1);

    let (logs, writer) = JobLogs::start(f.store.clone(), JobLogsConfig::default());
    let c = cancel::cancel(&f.store, Some(&f.js), &logs, revoked, "test").await.expect("cancel");
    writer.shutdown().await;
    assert!(c.revoked && c.status == "REVOKED");
    assert!(f.js.get_stream(stream_name(revoked)).await.is_err());
    let client = f.store.client().await.expect("client");
    client.execute("UPDATE jobs_job SET status = 'CANCELING' WHERE id = $1", &[&canceling]).await.expect("canceling");
    let before: Value = one(&f, &format!("SELECT progress FROM jobs_job WHERE id = {revoked}")).await;

    for (job, (image, reply)) in [(revoked, &tasks[1]), (revoked, &tasks[2]), (canceling, &other[0])] {
        f.publish(job, reply, f.factory.task_result(reply, *image)).await;
    }
    running.wait_for(4, 0, Duration::from_secs(30)).await;
    running.stop().await;
    let after: Value = one(&f, &format!("SELECT progress FROM jobs_job WHERE id = {revoked}")).await;
    assert_eq!(after, before, "a REVOKED job's progress does not move");
    for (job, status, rows, warnings) in [(revoked, "REVOKED", 1, 2), (canceling, "CANCELING", 0, 1)] {
        assert_eq!(job_progress(&f.store, job).await.0, status, "never resurrected");
        assert_eq!(one::<i64>(&f, &format!("SELECT count(*) FROM tally.job_image WHERE job_id = {job}")).await, rows);
        let sql = format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND level = 'WARNING'");
        assert_eq!(one::<i64>(&f, &sql).await, warnings, "late results are logged");
    }
    let saved: i64 =
        one(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {}", tasks[2].0)).await;
    assert!(saved > 0, "late results are still saved");
    f.cleanup().await;
}
