//! Claim-check messages whose object cannot be used are dead-lettered with a clear reason,
//! never retried forever: the object is missing, or larger than `--max-result-bytes`. Real
//! NATS (object store) and Postgres, ingest in-process.

use crate::common;

use std::time::Duration;

use common::ingest::{world, Fixture};
use common::Flavor;
use serde_json::json;
use tally::ingest::daemon::IngestArgs;
use tally::results_stream::{self, MSG_ID_HEADER, OBJECT_HEADER, OBJECT_SIZE_HEADER};

async fn publish_claim(fx: &Fixture, job: i64, reply: &str, object: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MSG_ID_HEADER, reply);
    headers.insert(OBJECT_HEADER, object);
    headers.insert(OBJECT_SIZE_HEADER, "10");
    fx.js
        .publish_with_headers(fx.subject(job), headers, bytes::Bytes::new())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

async fn letters(fx: &Fixture, job: i64) -> Vec<(String, String)> {
    let c = fx.store.client().await.expect("client");
    c.query("SELECT reason_code, reason FROM tally.dead_letter WHERE job_id = $1 ORDER BY id", &[&job])
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_check_whose_object_is_missing_is_dead_lettered() {
    let mut fx = Fixture::new("claim_missing", Flavor::Empty, world(1, 2)).await;
    let images = fx.world.images.clone();
    let (job, tasks) = fx.job(&images[..1]).await;
    publish_claim(&fx, job, &tasks[0].1, "result-never-stored").await;
    let mut running = fx.start(IngestArgs::default()).await;
    running.wait_for(0, 1, Duration::from_secs(20)).await;
    running.stop().await;
    let got = letters(&fx, job).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "object_missing");
    assert!(got[0].1.contains("result-never-stored"), "{got:?}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_check_over_the_result_limit_is_dead_lettered_unread() {
    let mut fx = Fixture::new("claim_large", Flavor::Empty, world(1, 2)).await;
    let images = fx.world.images.clone();
    let (job, tasks) = fx.job(&images[..1]).await;
    let objects = results_stream::ensure_bucket(&fx.js, &fx.nats_args.results_object_bucket, Duration::from_secs(3600))
        .await
        .expect("bucket");
    let body = serde_json::to_vec(
        &json!({"reply_subject": tasks[0].1, "result": {"error": "x".repeat(5000), "image_id": images[0].to_string()}}),
    )
    .expect("json");
    let name = format!("result-test-{}", common::ingest::unique());
    objects.store.put(name.as_str(), &mut body.as_slice()).await.expect("object stored");
    publish_claim(&fx, job, &tasks[0].1, &name).await;
    let mut running = fx.start(IngestArgs { max_result_bytes: 1000, ..IngestArgs::default() }).await;
    running.wait_for(0, 1, Duration::from_secs(20)).await;
    running.stop().await;
    let got = letters(&fx, job).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "oversized");
    assert!(got[0].1.contains("over the limit of 1000 bytes"), "{got:?}");
    // Terminated and confirmed: its object is deleted.
    assert!(objects.store.get(&name).await.is_err(), "the object is deleted once the message is terminated");
    fx.cleanup().await;
}
