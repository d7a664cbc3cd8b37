//! A result's fate is always decided and no result waits on its task (issue 15): task acks
//! that JetStream cannot confirm never hold results on the results consumer. Real Postgres,
//! real NATS, ingest in-process.

use crate::common;

use std::time::{Duration, Instant};

use common::ingest::{world, Fixture};
use common::Flavor;
use serde_json::json;
use tally::ingest::daemon::IngestArgs;
use tally::ingest::nats::ConsumerArgs;

fn error_result(reply_subject: &str, image: i64) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"reply_subject": reply_subject, "result": {"error": "download failed", "image_id": image.to_string()}}),
    )
    .expect("json")
}

async fn count(fx: &Fixture, sql: &str, job: i64) -> i64 {
    fx.store.client().await.expect("client").query_one(sql, &[&job]).await.expect(sql).get(0)
}

/// The regression test of the stall: results of one job whose task acks are never confirmed
/// (the 12-token domain form of their ack subjects, which nothing answers on a server without
/// a domain, while the job's consumer exists) fill the results consumer's `max_ack_pending`;
/// a normal result of another job published after them must still be saved within seconds.
/// Before the fix they were NAKed for redelivery forever and nothing else was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unackable_tasks_of_one_job_never_stall_another_job() {
    let mut fx = Fixture::new("stall", Flavor::Empty, world(1, 4)).await;
    let images = fx.world.images.clone();
    let (job_a, tasks_a) = fx.job(&images[..12]).await;
    let (job_b, tasks_b) = fx.job(&images[12..13]).await;
    for (image, reply) in &tasks_a {
        let domain = format!("{}.tok", reply.replacen("$JS.ACK.", "$JS.ACK._.ACCHASH.", 1));
        assert_eq!(tally::ingest::decode::job_of_reply_subject(&domain), Some(job_a), "a well-formed ack subject");
        fx.publish(job_a, &domain, error_result(&domain, *image)).await;
    }
    let args = IngestArgs {
        batch_size: 4,
        consumer: ConsumerArgs {
            max_ack_pending: 8,
            task_ack_timeout: Duration::from_secs(1),
            task_ack_attempts: 3,
            task_ack_backoff_max: Duration::from_secs(1),
            ..ConsumerArgs::default()
        },
        ..IngestArgs::default()
    };
    let mut running = fx.start(args).await;
    let (image_b, reply_b) = &tasks_b[0];
    fx.publish(job_b, reply_b, error_result(reply_b, *image_b)).await;
    let started = Instant::now();
    running.wait_for(13, 0, Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        count(&fx, "SELECT count(*) FROM tally.job_image WHERE job_id = $1", job_b).await,
        1,
        "job B's result is saved"
    );
    assert_eq!(count(&fx, "SELECT count(*) FROM tally.job_image WHERE job_id = $1", job_a).await, 12);
    // Job B's task is acked; job A's are retried in the background, then given up.
    let (_, b_pending) = fx.consumer_state(&tally::jobs::stream_name(job_b), &tally::jobs::consumer_name(job_b)).await;
    assert_eq!(b_pending, 0, "job B's task is acked");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let letters = count(
            &fx,
            "SELECT count(*) FROM tally.dead_letter WHERE job_id = $1 AND reason_code = 'task_ack_failed'",
            job_a,
        )
        .await;
        let waiting = count(&fx, "SELECT count(*) FROM tally.task_ack_retry WHERE job_id = $1", job_a).await;
        if letters == 12 && waiting == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{letters} of 12 given up, {waiting} still waiting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logged =
        count(&fx, "SELECT count(*) FROM jobs_joblog WHERE job_id = $1 AND message LIKE 'task ack given up%'", job_a)
            .await;
    assert_eq!(logged, 12, "every give-up is in the job log");
    // The dead letter keeps the result, so a replay can ack the task once NATS is healthy.
    let payload: Vec<u8> = fx
        .store
        .client()
        .await
        .expect("client")
        .query_one(
            "SELECT payload FROM tally.dead_letter WHERE job_id = $1 AND reason_code = 'task_ack_failed' LIMIT 1",
            &[&job_a],
        )
        .await
        .expect("letter")
        .get(0);
    assert!(String::from_utf8_lossy(&payload).contains("download failed"));
    // Nothing is left pending on the results consumer.
    let (_, results_pending) = fx.consumer_state(&fx.nats_args.results_stream, "tally-ingest").await;
    assert_eq!(results_pending, 0);
    assert!(running.health.is_ready(), "{}", running.health.reason());
    running.stop().await;
    fx.cleanup().await;
}

/// A task whose consumer was deleted (Antenna's cleanup deletes the consumer first, then the
/// stream) settles its result at once: saved, acked, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_consumer_is_gone_settles_its_result() {
    let mut fx = Fixture::new("gone", Flavor::Empty, world(1, 2)).await;
    let images = fx.world.images.clone();
    let (job, tasks) = fx.job(&images[..2]).await;
    let stream = fx.js.get_stream(tally::jobs::stream_name(job)).await.expect("job stream");
    stream.delete_consumer(&tally::jobs::consumer_name(job)).await.expect("delete consumer");
    for (image, reply) in &tasks {
        fx.publish(job, reply, error_result(reply, *image)).await;
    }
    let mut running = fx.start(IngestArgs::default()).await;
    running.wait_for(2, 0, Duration::from_secs(20)).await;
    assert_eq!(count(&fx, "SELECT count(*) FROM tally.task_ack_retry WHERE job_id = $1", job).await, 0);
    assert_eq!(count(&fx, "SELECT count(*) FROM tally.job_image WHERE job_id = $1", job).await, 2);
    let (_, results_pending) = fx.consumer_state(&fx.nats_args.results_stream, "tally-ingest").await;
    assert_eq!(results_pending, 0, "the results are acked");
    running.stop().await;
    fx.cleanup().await;
}

/// `/readyz` shows a stalled consumer: at its `max_ack_pending` with an old unacked result,
/// on a real consumer that something else holds at its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_held_at_its_cap_reads_as_stalled() {
    use async_nats::jetstream::{consumer, stream};
    use futures_util::StreamExt;
    let client = common::ingest::nats().await;
    let js = async_nats::jetstream::new(client);
    let name = format!("TALLY_STALL_{}", common::ingest::unique());
    let s = js
        .create_stream(stream::Config { name: name.clone(), subjects: vec![format!("{name}.>")], ..Default::default() })
        .await
        .expect("stream");
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("held".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 2,
            ack_wait: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("consumer");
    for i in 0..3 {
        js.publish(format!("{name}.x"), format!("{i}").into()).await.expect("publish").await.expect("stored");
    }
    let mut held = c.fetch().max_messages(2).messages().await.expect("fetch");
    let mut kept = Vec::new();
    while let Some(m) = held.next().await {
        kept.push(m.expect("message"));
    }
    assert_eq!(kept.len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let health = std::sync::Arc::new(tally::http::Health::default());
    health.set_ready();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(tally::ingest::monitor::run(
        c.clone(),
        s.clone(),
        std::sync::Arc::clone(&health),
        Duration::from_millis(200),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while health.is_ready() {
        assert!(Instant::now() < deadline, "never reported the stall");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = health.reason();
    assert!(why.contains("results_consumer: stalled") && why.contains("max_ack_pending 2"), "{why}");
    // Acking unblocks it, and readiness comes back.
    for m in &kept {
        m.double_ack().await.expect("ack");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health.is_ready() {
        assert!(Instant::now() < deadline, "still not ready: {}", health.reason());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    watcher.await.expect("monitor");
    let _ = js.delete_stream(&name).await;
}
