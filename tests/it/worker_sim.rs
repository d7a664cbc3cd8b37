//! `tally-tools worker-sim` against real Postgres, NATS and HTTP: the gateway served in-process on
//! `127.0.0.1:0`, ingest running in-process, and simulated ADC workers draining Antenna-style
//! jobs. Every task is acked, every image saved, every count exact, every job finished with
//! exact progress; a bad token stops the workers at once with the 401 in the report; a gateway
//! still connecting (503) is waited out.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::Served;
use common::ingest::{self, antenna_progress, assert_counts_exact, expected, job_progress, rows, world, Fixture};
use common::Flavor;
use tally::config::DbArgs;
use tally::gateway::{Gateway, GatewayArgs};
use tally::ingest::daemon::IngestArgs;
use tally_tools::worker_sim::{self, Call, Refusal, Retry, StopReason, StopWhen, WorkerReport, WorkerSim};
use tokio_util::sync::CancellationToken;

/// The token of an active superuser.
const TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";

/// `tally serve --no-ingest` over the fixture's database, with a pool of 8.
async fn served(fx: &Fixture) -> Served {
    let args = GatewayArgs { gateway_pool_size: 8, ..gateway_args() };
    Served::daemon(fx.store.args.clone(), fx.nats_args.clone(), args).await
}

/// A seeded fixture with a worker token.
async fn fixture(label: &str, images: usize) -> Fixture {
    let fx = Fixture::new(label, Flavor::Empty, world(2, images)).await;
    common::insert_worker_token(&fx.store, TOKEN).await;
    fx
}

fn gateway_args() -> GatewayArgs {
    GatewayArgs { gateway_fetch_wait: Duration::from_millis(200), ..GatewayArgs::default() }
}

/// An async job over `images` as Antenna creates it (row, stream `job_{id}`, consumer
/// `job-{id}-consumer`, one task per image), with no task pulled: the workers pull them.
async fn job(fx: &mut Fixture, images: &[i64]) -> i64 {
    let c = fx.store.client().await.expect("client");
    let pipeline: i64 =
        c.query_one("SELECT id FROM ml_pipeline WHERE slug = $1", &[&ingest::PIPELINE]).await.expect("pipeline").get(0);
    let job = ingest::unique() as i64;
    c.execute(
        "INSERT INTO jobs_job (id, created_at, updated_at, name, queue, status, progress, project_id, delay,
                               shuffle, job_type_key, logs, dispatch_mode, pipeline_id)
         VALUES ($1, now(), now(), 'sim job', 'default', 'STARTED', $2, 1, 0, false, 'ml',
                 '{\"stdout\": [], \"stderr\": []}', 'async_api', $3)",
        &[&job, &antenna_progress(images.len()), &pipeline],
    )
    .await
    .expect("insert job");
    ingest::antenna_queue(&fx.js, job, images, 2, Duration::from_secs(300)).await;
    fx.jobs.push(job);
    job
}

/// A simulator of `loops` loops against `addr`, stopping after 2 s idle.
fn sim(fx: &Fixture, addr: SocketAddr, token: &str, loops: usize) -> WorkerSim {
    WorkerSim {
        base_url: format!("http://{addr}"),
        token: token.into(),
        pipelines: vec![ingest::PIPELINE.into(), "some-other-pipeline".into()],
        concurrency: loops,
        batch_size: 5,
        post_batch: 4,
        delay: Duration::from_millis(2),
        poll_interval: Duration::from_millis(100),
        stop: StopWhen { idle: Some(Duration::from_secs(2)), max_tasks: None },
        results: fx.factory.clone(),
        retry: Retry { attempts: 4, first_backoff: Duration::from_millis(50), ..Retry::default() },
    }
}

fn assert_clean(report: &WorkerReport) {
    assert!(!report.failed(), "{}", report.render());
    assert_eq!((report.transport_errors, report.bad_responses, report.error_results), (0, 0, 0), "{}", report.render());
    assert_eq!((report.results_refused, report.results_dropped, report.tasks_abandoned), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_loops_drain_every_job_and_ingest_saves_every_image_exactly() {
    let mut fx = fixture("wsim_e2e", 8).await;
    let images = fx.world.images.clone();
    assert_eq!(images.len(), 64);
    let mut jobs = Vec::new();
    for chunk in [&images[0..30], &images[30..55], &images[55..64]] {
        jobs.push((job(&mut fx, chunk).await, chunk.to_vec()));
    }
    let mut running = fx.start(IngestArgs::default()).await;
    let server = served(&fx).await;

    let report = worker_sim::run(&sim(&fx, server.addr, TOKEN, 3), CancellationToken::new()).await.expect("run");
    eprintln!("{}", report.render());
    eprintln!("{:.0} results/s over {} ms busy", report.results_per_second(), report.busy.as_millis());
    assert!(report.busy > Duration::ZERO && report.busy < report.elapsed);
    assert_eq!(report.stopped, StopReason::Idle(Duration::from_secs(2)));
    assert_clean(&report);
    assert!(report.http_errors.is_empty(), "{:?}", report.http_errors);
    assert_eq!(report.tasks_fetched, 64, "each task fetched once");
    assert_eq!(report.results_posted, 64);
    assert!(report.result_posts >= 64 / 4, "posts of at most 4 results: {}", report.result_posts);
    assert!(report.claims >= 3, "every job claimed: {}", report.claims);
    assert_eq!(report.latency.result.len(), report.result_posts);

    running.wait_for(64, 0, Duration::from_secs(60)).await;
    running.stop().await;
    server.stop().await;

    assert_eq!(rows(&fx.store).await, expected(&fx, &images), "every image saved once");
    assert_counts_exact(&fx.store).await;
    let c = fx.store.client().await.expect("client");
    let saved: i64 = c.query_one("SELECT count(*) FROM tally.job_image", &[]).await.expect("q").get(0);
    assert_eq!(saved, 64);
    let dead: i64 = c.query_one("SELECT count(*) FROM tally.dead_letter", &[]).await.expect("q").get(0);
    assert_eq!(dead, 0, "no dead letters");
    assert_eq!(fx.consumer_state(&fx.nats_args.results_stream, "tally-ingest").await, (0, 0), "every result acked");
    for (job, images) in &jobs {
        let stream = format!("job_{job}");
        assert_eq!(fx.consumer_state(&stream, &format!("job-{job}-consumer")).await, (0, 0), "job {job} acked");
        let e = expected(&fx, images);
        assert_eq!(
            job_progress(&fx.store, *job).await,
            ("SUCCESS".to_string(), images.len() as i64, 0, e.detections, e.classifications),
            "job {job}"
        );
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_token_stops_every_loop_with_the_401() {
    let mut fx = fixture("wsim_401", 2).await;
    let images = fx.world.images.clone();
    let job = job(&mut fx, &images[..6]).await;
    let server = served(&fx).await;
    let mut s = sim(&fx, server.addr, "not-a-token", 3);
    // Would run 60 s if it looped on the refusal.
    s.stop.idle = Some(Duration::from_secs(60));
    let started = Instant::now();
    let report = worker_sim::run(&s, CancellationToken::new()).await.expect("run");
    eprintln!("{}", report.render());
    assert!(started.elapsed() < Duration::from_secs(10), "stopped at once: {:?}", started.elapsed());
    assert_eq!(
        report.stopped,
        StopReason::Refused(Refusal { call: Call::Claim, status: 401, detail: "Invalid token.".into() })
    );
    assert!(report.failed());
    let refusals = report.http_errors.get(&401).copied().unwrap_or(0);
    assert!((1..=3).contains(&refusals), "one 401 per loop at most, never retried: {:?}", report.http_errors);
    assert_eq!(report.http_errors.len(), 1);
    assert_eq!((report.retries, report.tasks_fetched, report.results_posted), (0, 0, 0));
    assert!(report.render().contains("refused: claim answered 401: Invalid token."), "{}", report.render());
    assert_eq!(report.to_json()["refusal"]["status"], 401);
    let stream = format!("job_{job}");
    assert_eq!(fx.consumer_state(&stream, &format!("job-{job}-consumer")).await, (6, 0), "no task taken");
    server.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_still_connecting_is_retried_and_a_task_limit_is_exact() {
    let mut fx = fixture("wsim_503", 4).await;
    let store = tally::store::connect(&DbArgs { pool_size: 8, ..fx.store.args.clone() }).await.expect("pool");
    let images = fx.world.images.clone();
    let job = job(&mut fx, &images[..20]).await;
    // Not connected yet: every request answers 503 until it is.
    let gateway = Gateway::new(fx.nats_args.clone(), gateway_args());
    let server = Served::alone(Arc::clone(&gateway)).await;
    let mut s = sim(&fx, server.addr, TOKEN, 3);
    s.stop = StopWhen { idle: Some(Duration::from_secs(30)), max_tasks: Some(13) };
    let run = tokio::spawn(async move { worker_sim::run(&s, CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    gateway.set_store(store);
    gateway.set_nats(fx.client.clone());
    let report = tokio::time::timeout(Duration::from_secs(30), run).await.expect("done").expect("task").expect("run");
    eprintln!("{}", report.render());
    assert_eq!(report.stopped, StopReason::TaskLimit(13));
    assert_clean(&report);
    assert!(report.http_errors.get(&503).copied().unwrap_or(0) >= 3, "503s answered: {:?}", report.http_errors);
    assert_eq!(report.http_errors.len(), 1, "{:?}", report.http_errors);
    assert!(report.retries > 0);
    assert_eq!((report.tasks_fetched, report.results_posted), (13, 13));
    let mut results = fx.js.get_stream(&fx.nats_args.results_stream).await.expect("results stream");
    assert_eq!(results.info().await.expect("info").state.messages, 13, "exactly the results of the tasks taken");
    let stream = format!("job_{job}");
    assert_eq!(fx.consumer_state(&stream, &format!("job-{job}-consumer")).await, (7, 13), "7 left, 13 held");
    server.stop().await;
    fx.cleanup().await;
}
