//! The whole jobs loop through the real binaries, on the shared Postgres and NATS JetStream
//! (SPEC §5, `antenna/jobs-protocol.md`): `tally serve` (ingest and worker gateway) runs as a
//! child process, `tally job create` queues four Antenna-style jobs (one per deployment of two
//! projects, one of them with `--limit`), and three `tally-tools worker-sim` processes drain them
//! concurrently over HTTP with a worker token.
//!
//! It proves that, with nothing but the binaries in between:
//! - every task is delivered exactly once and acked (per-job consumer: delivered = tasks, no
//!   redelivery, nothing pending or awaiting ack), and every result is saved and acked once
//!   (results stream: one message per task, the serve's consumer has nothing left);
//! - every job ends SUCCESS with exact progress: processed = captures = its images, failed 0,
//!   remaining 0, and its results stage equal to the rows actually inserted for its images,
//!   which are also exactly the rows the simulated model's payloads call for;
//! - `tally verify` finds every stored count equal to its SQL definition, `tally job status`
//!   reports SUCCESS with an empty queue, the async processing service is marked seen;
//! - SIGTERM stops `tally serve` with exit status 0 within a few seconds.
//!
//! The database, the results stream and the job streams are removed even when an assertion
//! fails (the child processes are killed on drop).

use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use clap::Parser;
use common::ingest::progress_param as param;
use common::ingest::{self, expected, unique, world, Expected, Fixture, PIPELINE};
use common::Flavor;
use serde_json::Value;
use tally_tools::cli::{Cli, Command};
use tokio::process::Child;

/// The token of the workers' (active) user.
const TOKEN: &str = "9f3e0c1b2a4d5e6f708192a3b4c5d6e7f8091a2b";

/// `(deployment, --limit)` of each job: deployments 1–2 are project 1's, 3–4 project 2's.
const JOBS: [(i64, Option<u32>); 4] = [(1, None), (2, Some(5)), (3, None), (4, None)];

/// Images per event of the seeded world: 2 projects × 2 deployments × 2 nights × 10 captures.
const IMAGES_PER_EVENT: usize = 10;

/// Simulated worker processes, and loops in each.
const WORKER_PROCESSES: usize = 3;
const LOOPS: &str = "2";

/// The options of every `tally-tools worker-sim` (besides `--url` and `--token`).
const SIM_ARGS: &[&str] = &[
    "--pipeline",
    PIPELINE,
    "--concurrency",
    LOOPS,
    "--batch-size",
    "4",
    "--post-batch",
    "3",
    "--delay-ms",
    "5",
    "--poll-ms",
    "200",
    "--exit-when-idle",
    "3",
    "--mean-detections",
    "4",
    "--score-len",
    "20",
    "--attempts",
    "4",
    "--json",
];

/// Deletes NATS streams when dropped, also when the test panics.
struct Streams {
    url: String,
    names: Vec<String>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        let (url, names) = (self.url.clone(), std::mem::take(&mut self.names));
        // Drop runs outside async context: a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(client) = async_nats::connect(&url).await else { return };
                let js = jetstream::new(client);
                for name in names {
                    let _ = js.delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

fn db_url(f: &Fixture) -> String {
    f.db.as_ref().expect("test database").url.clone()
}

/// Runs `tally args…` against the fixture's database and NATS and waits for it.
async fn tally(f: &Fixture, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("DATABASE_URL", db_url(f))
        .env("NATS_URL", ingest::nats_url())
        .env("TALLY_CONNECT_ATTEMPTS", "2")
        .env("TALLY_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("tally runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stdout of a run that must have succeeded.
fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(out)
}

/// Moves the `jobs_job` identity to a range no other test uses, so that the binary's job ids,
/// and with them the stream names `job_{id}`, never collide on the shared NATS server.
async fn own_job_ids(f: &Fixture) {
    let c = f.store.client().await.expect("client");
    let first = 4_000_000_000 + unique() as i64 * 16;
    c.execute("SELECT setval(pg_get_serial_sequence('jobs_job', 'id'), $1, false)", &[&first]).await.expect("setval");
}

/// The worker user and its token, and an async processing service (no endpoint, never seen)
/// for the pipeline in both projects, as Antenna registers ADC; returns the service's id.
async fn workers_and_service(f: &Fixture) -> i64 {
    common::insert_worker_token(&f.store, TOKEN).await;
    let c = f.store.client().await.expect("client");
    let id: i64 = c
        .query_one(
            "INSERT INTO ml_processingservice (created_at, updated_at, name, description, endpoint_url)
             VALUES (now(), now(), 'adc', 'async workers', NULL) RETURNING id",
            &[],
        )
        .await
        .expect("service")
        .get(0);
    common::link_service(&f.store, id, PIPELINE, &[1, 2]).await;
    id
}

/// A port free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("address").port()
}

fn log_tail(path: &PathBuf) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Starts `tally serve` (ingest and gateway) with a results stream, subject prefix and consumer
/// of the test's own, logging to `log`.
fn serve(f: &Fixture, listen: &str, consumer: &str, log: &PathBuf) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", listen])
        .args(["--database-url", &db_url(f)])
        .args(["--nats-url", &f.nats_args.nats_url])
        .args(["--results-stream", &f.nats_args.results_stream])
        .args(["--results-subject-prefix", &f.nats_args.results_subject_prefix])
        .args(["--consumer", consumer])
        .args(["--gateway-fetch-wait", "0.2", "--connect-attempts", "4"])
        // The checks below read each finished job's consumer; the job monitor would delete it
        // 10 s after the job finished (tests/it/job_monitor.rs covers that cleanup).
        .args(["--cleanup-grace", "3600"])
        .env("TALLY_LOG", "info")
        .env("TALLY_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start tally serve")
}

/// Waits until `GET /readyz` answers 200.
async fn wait_ready(child: &mut Child, base: &str, log: &PathBuf) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("tally serve exited before it was ready: {status}\n{}", log_tail(log));
        }
        let ready = match http.get(format!("{base}/readyz")).timeout(Duration::from_secs(2)).send().await {
            Ok(r) => r.status().as_u16() == 200,
            Err(_) => false,
        };
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "tally serve not ready within 30 s\n{}", log_tail(log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stage<'a>(progress: &'a Value, key: &str) -> &'a Value {
    progress["stages"].as_array().and_then(|s| s.iter().find(|s| s["key"] == key)).unwrap_or(&Value::Null)
}

/// The image ids of the tasks in job `id`'s stream.
async fn task_images(f: &Fixture, id: i64) -> Vec<i64> {
    let mut stream = f.js.get_stream(tally::jobs::stream_name(id)).await.expect("job stream");
    let n = stream.info().await.expect("stream info").state.messages;
    let mut images = Vec::new();
    for seq in 1..=n {
        let m = stream.get_raw_message(seq).await.expect("task message");
        let body: Value = serde_json::from_slice(&m.payload).expect("task JSON");
        images.push(body["image_id"].as_str().and_then(|s| s.parse().ok()).expect("image id"));
    }
    images.sort_unstable();
    images
}

/// The rows in the database for `images`: what ingest actually inserted for them.
async fn rows_of(f: &Fixture, images: &[i64]) -> Expected {
    let ids: Vec<i64> = images.to_vec();
    let c = f.store.client().await.expect("client");
    let one = |sql: &'static str| {
        let (c, ids) = (&c, &ids);
        async move { c.query_one(sql, &[ids]).await.expect(sql).get::<_, i64>(0) }
    };
    Expected {
        detections: one("SELECT count(*) FROM main_detection WHERE bbox IS NOT NULL AND source_image_id = ANY($1)")
            .await,
        null_markers: one("SELECT count(*) FROM main_detection WHERE bbox IS NULL AND source_image_id = ANY($1)").await,
        classifications: one(
            "SELECT count(*) FROM main_classification c JOIN main_detection d ON d.id = c.detection_id
             WHERE d.source_image_id = ANY($1)",
        )
        .await,
        occurrences: one("SELECT count(DISTINCT d.occurrence_id) FROM main_detection d
             WHERE d.bbox IS NOT NULL AND d.source_image_id = ANY($1)")
        .await,
    }
}

/// Consumer `name` of `stream`.
async fn consumer_info(js: &jetstream::Context, stream: &str, name: &str) -> consumer::Info {
    let mut c: consumer::PullConsumer = js
        .get_consumer_from_stream(name, stream)
        .await
        .unwrap_or_else(|e| panic!("consumer {name} on stream {stream}: {e}"));
    c.info().await.expect("consumer info").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_drained_by_worker_processes_and_finish_with_exact_progress() {
    let started = Instant::now();
    let mut fx = Fixture::new("jobs_loop", Flavor::Antenna, world(2, IMAGES_PER_EVENT)).await;
    let mut streams = Streams { url: ingest::nats_url(), names: vec![fx.nats_args.results_stream.clone()] };
    own_job_ids(&fx).await;
    let service = workers_and_service(&fx).await;

    // The results the worker processes will post: the factory their own options describe.
    let mut cli = vec!["tally", "worker-sim", "--url", "http://127.0.0.1:1", "--token", "t"];
    cli.extend_from_slice(SIM_ARGS);
    let Command::WorkerSim(sim_args) = Cli::try_parse_from(&cli).expect("worker-sim options").command else {
        panic!("not worker-sim")
    };
    fx.factory = sim_args.sim().expect("simulator").results;

    // 1. tally serve: ingest and gateway.
    let n = unique();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let consumer = format!("tally-ingest-loop-{n}");
    let log =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jobs_loop-{}-{n}-serve.log", std::process::id()));
    let mut child = serve(&fx, &listen, &consumer, &log);
    wait_ready(&mut child, &base, &log).await;
    eprintln!("tally serve ready at {base} after {:.1} s (log: {})", started.elapsed().as_secs_f64(), log.display());

    // 2. Four jobs through `tally job create`.
    let mut jobs: Vec<(i64, i64, Vec<i64>)> = Vec::new();
    for (deployment, limit) in JOBS {
        let d = deployment.to_string();
        let mut args = vec!["job", "create", "--deployment", &d, "--pipeline", PIPELINE];
        let l = limit.map(|l| l.to_string());
        if let Some(l) = &l {
            args.extend(["--limit", l]);
        }
        let out = ok("tally job create", &tally(&fx, &args).await);
        let id: i64 = out
            .lines()
            .find_map(|l| l.strip_prefix("job ")?.split_once(" created: ")?.0.parse().ok())
            .unwrap_or_else(|| panic!("no job id in:\n{out}"));
        streams.names.push(tally::jobs::stream_name(id));
        let images = task_images(&fx, id).await;
        let mut of_deployment: Vec<i64> = fx
            .world
            .tables
            .images
            .iter()
            .filter(|(_, i)| i.deployment == Some(deployment))
            .map(|(id, _)| *id)
            .collect();
        of_deployment.sort_unstable();
        assert_eq!(of_deployment.len(), 2 * IMAGES_PER_EVENT);
        match limit {
            None => assert_eq!(images, of_deployment, "job {id}: one task per image of deployment {deployment}"),
            Some(l) => {
                assert_eq!(images.len(), l as usize, "job {id}: --limit {l}");
                assert!(
                    images.iter().all(|i| of_deployment.contains(i)),
                    "job {id}: images of deployment {deployment}"
                );
            }
        }
        assert!(
            out.contains(&format!("{} tasks published to stream job_{id} (subject job.{id}.tasks)", images.len())),
            "{out}"
        );
        jobs.push((id, deployment, images));
    }
    let total: usize = jobs.iter().map(|(_, _, i)| i.len()).sum();
    assert_eq!(total, 3 * 2 * IMAGES_PER_EVENT + 5);
    let all_images: Vec<i64> = jobs.iter().flat_map(|(_, _, i)| i.iter().copied()).collect();

    // 3. Three worker processes at once, until there is no more work.
    let loop_started = Instant::now();
    let workers: Vec<_> = (0..WORKER_PROCESSES)
        .map(|_| {
            tokio::process::Command::new(common::tools_bin())
                .args(["worker-sim", "--url", &base, "--token", TOKEN])
                .args(SIM_ARGS)
                .env("TALLY_LOG", "warn")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let outputs = tokio::time::timeout(Duration::from_secs(40), futures_util::future::join_all(workers))
        .await
        .expect("the workers stop within 40 s");
    let workers_took = loop_started.elapsed();
    let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
    for (w, out) in outputs.into_iter().enumerate() {
        let out = out.expect("worker-sim runs");
        let report: Value = serde_json::from_str(&ok("tally-tools worker-sim", &out)).expect("worker-sim prints JSON");
        eprintln!(
            "worker {w}: {} claims, {} tasks, {} results in {} posts, stopped: {}",
            report["claims"],
            report["tasks_fetched"],
            report["results_posted"],
            report["result_posts"],
            report["stopped"]
        );
        assert!(report["stopped"].as_str().is_some_and(|s| s.contains("idle")), "worker {w}: {report}");
        for key in ["tasks_fetched", "results_posted", "results_refused", "results_dropped", "error_results"] {
            *sum.entry(key).or_default() += report[key].as_u64().unwrap_or_else(|| panic!("{key} in {report}"));
        }
        for key in ["tasks_abandoned", "transport_errors", "bad_responses"] {
            assert_eq!(report[key], 0, "worker {w}: {key}: {report}");
        }
        assert_eq!(report["http_errors"], serde_json::json!({}), "worker {w}: {report}");
    }
    let total = total as u64;
    assert_eq!(
        sum,
        BTreeMap::from([
            ("tasks_fetched", total),
            ("results_posted", total),
            ("results_refused", 0),
            ("results_dropped", 0),
            ("error_results", 0)
        ]),
        "every task fetched once and answered, over all worker processes"
    );

    // Ingest saves the last results and acks their tasks.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = fx.store.client().await.expect("client");
        let finished: i64 = c
            .query_one(
                "SELECT count(*) FROM jobs_job WHERE status = 'SUCCESS' AND id = ANY($1)",
                &[&jobs.iter().map(|(id, _, _)| *id).collect::<Vec<_>>()],
            )
            .await
            .expect("jobs")
            .get(0);
        let results = consumer_info(&fx.js, &fx.nats_args.results_stream, &consumer).await;
        let mut tasks_acked = true;
        for (id, _, _) in &jobs {
            let info = consumer_info(&fx.js, &tally::jobs::stream_name(*id), &tally::jobs::consumer_name(*id)).await;
            tasks_acked &= info.num_ack_pending == 0 && info.num_pending == 0;
        }
        let seen: Option<bool> = c
            .query_one("SELECT last_seen_live FROM ml_processingservice WHERE id = $1", &[&service])
            .await
            .expect("service")
            .get(0);
        if finished == jobs.len() as i64
            && results.num_pending == 0
            && results.num_ack_pending == 0
            && tasks_acked
            && seen == Some(true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done 30 s after the workers stopped: {finished} of {} jobs SUCCESS, results consumer {} pending \
             {} awaiting ack, tasks acked: {tasks_acked}, service seen: {seen:?}\n{}",
            jobs.len(),
            results.num_pending,
            results.num_ack_pending,
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{total} tasks in {} jobs drained by {WORKER_PROCESSES} worker processes in {:.1} s, all saved {:.1} s after start",
        jobs.len(),
        workers_took.as_secs_f64(),
        loop_started.elapsed().as_secs_f64()
    );

    // 4. Every job SUCCESS with exact progress; every task delivered once and acked.
    let c = fx.store.client().await.expect("client");
    for (id, deployment, images) in &jobs {
        let n = images.len() as i64;
        let row = c
            .query_one(
                "SELECT status, progress, finished_at IS NOT NULL, deployment_id FROM jobs_job WHERE id = $1",
                &[id],
            )
            .await
            .expect("job row");
        let (status, progress): (String, Value) = (row.get(0), row.get(1));
        assert_eq!(status, "SUCCESS", "job {id}: {progress}");
        assert!(row.get::<_, bool>(2), "job {id}: finished_at set");
        assert_eq!(row.get::<_, Option<i64>>(3), Some(*deployment));
        let inserted = rows_of(&fx, images).await;
        assert_eq!(inserted, expected(&fx, images), "job {id}: the rows its images' payloads call for");
        assert_eq!(param(&progress, "collect", "total_images"), n, "job {id}");
        assert_eq!(
            (
                param(&progress, "process", "processed"),
                param(&progress, "process", "remaining"),
                param(&progress, "process", "failed"),
            ),
            (n.into(), 0.into(), 0.into()),
            "job {id}: {progress}"
        );
        assert_eq!(
            (
                param(&progress, "results", "captures"),
                param(&progress, "results", "detections"),
                param(&progress, "results", "classifications"),
            ),
            (n.into(), inserted.detections.into(), inserted.classifications.into()),
            "job {id}: results stage = rows inserted for its images: {progress}"
        );
        for key in ["process", "results"] {
            assert_eq!(stage(&progress, key)["status"], "SUCCESS", "job {id}: {progress}");
            assert_eq!(stage(&progress, key)["progress"], 1.0, "job {id}: {progress}");
        }
        assert_eq!(progress["summary"]["status"], "SUCCESS", "job {id}: {progress}");
        let r = c
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE failed), coalesce(sum(detections), 0)::bigint,
                        coalesce(sum(classifications), 0)::bigint
                 FROM tally.job_image WHERE job_id = $1",
                &[id],
            )
            .await
            .expect("job images");
        assert_eq!(
            (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3)),
            (n, 0, inserted.detections, inserted.classifications),
            "job {id}: tally.job_image"
        );

        let info = consumer_info(&fx.js, &tally::jobs::stream_name(*id), &tally::jobs::consumer_name(*id)).await;
        let n = n as u64;
        assert_eq!(
            (info.num_redelivered, info.num_ack_pending, info.num_pending),
            (0, 0, 0),
            "job {id}: consumer {info:?}"
        );
        assert_eq!(
            (info.delivered.consumer_sequence, info.delivered.stream_sequence, info.ack_floor.consumer_sequence),
            (n, n, n),
            "job {id}: each task delivered once (no redelivery) and acked"
        );

        let text = ok("tally job status", &tally(&fx, &["job", "status", &id.to_string()]).await);
        assert!(text.contains(&format!("job {id}  SUCCESS")), "{text}");
        assert!(
            text.contains(&format!("job_{id}: {n} tasks, 0 not yet delivered, 0 awaiting ack, 0 redelivered")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "images with a result  {n} (0 failed) · detections {} · classifications {}",
                inserted.detections, inserted.classifications
            )),
            "{text}"
        );
    }

    // Every result saved once and acked; nothing dead-lettered; the rows are exactly the
    // payloads' in all.
    let results = consumer_info(&fx.js, &fx.nats_args.results_stream, &consumer).await;
    assert_eq!((results.num_pending, results.num_ack_pending, results.num_redelivered), (0, 0, 0), "{results:?}");
    assert_eq!(
        (results.delivered.stream_sequence, results.ack_floor.stream_sequence),
        (total, total),
        "one result message per task, all acked"
    );
    let dead: i64 = c.query_one("SELECT count(*) FROM tally.dead_letter", &[]).await.expect("dead").get(0);
    assert_eq!(dead, 0, "no dead letters");
    assert_eq!(ingest::rows(&fx.store).await, expected(&fx, &all_images), "every image saved once");

    // `tally verify` through the binary: every count equals its SQL definition.
    let out = ok("tally verify", &tally(&fx, &["verify"]).await);
    assert!(out.trim_end().ends_with(" owners checked, 0 differences"), "{out}");

    // The serve counted every task ack.
    let metrics = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains(&format!("tally_task_acks_total{{outcome=\"acked\"}} {total}")), "{metrics}");

    // 5. SIGTERM: tally serve stops cleanly within a few seconds.
    let pid = child.id().expect("pid").to_string();
    let stopping = Instant::now();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill -TERM");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("tally serve still running 10 s after SIGTERM\n{}", log_tail(&log)))
        .expect("wait");
    assert!(status.success(), "tally serve exited with {status} on SIGTERM\n{}", log_tail(&log));
    let errors: Vec<String> =
        std::fs::read_to_string(&log).expect("log").lines().filter(|l| l.contains("ERROR")).map(String::from).collect();
    assert!(errors.is_empty(), "tally serve logged errors:\n{}", errors.join("\n"));
    eprintln!(
        "tally serve stopped in {:.2} s; whole test {:.1} s",
        stopping.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(streams);
    let _ = std::fs::remove_file(&log);
}
