//! Claim-check messages whose object cannot be used are dead-lettered with a clear reason,
//! never retried forever: the object is missing, or larger than `--max-result-bytes`. Real
//! NATS (object store) and Postgres, ingest in-process.

use crate::common;

use std::collections::HashMap;
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

/// A fixture on Antenna's schema whose results carry ADC's 2,497-class vectors, with
/// `mean_detections` moths per image, and a job over its `images` images: the fixture, the
/// job and its tasks.
async fn adc_2497_job(
    label: &str,
    images: usize,
    mean_detections: f64,
) -> (Fixture, i64, Vec<(tally_dataflows::Id, String)>) {
    let mut fx = Fixture::new(label, Flavor::Antenna, world(1, images)).await;
    fx.factory.score_len = 2_497;
    fx.factory.mean_detections = mean_detections;
    let images = fx.world.images.clone();
    let (job, tasks) = fx.job(&images).await;
    (fx, job, tasks)
}

/// Large results make small batches: with `--batch-bytes` at about three results, no batch
/// holds more than the results that reach it plus one, whether they came inline or by claim
/// check (counted at their object's size), and every result is saved with exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_results_are_batched_by_bytes() {
    // ADC's smallest real species model: ~0.1 MB of JSON per detection, some results over
    // NATS's 1 MiB max_payload (claim checks), the others inline.
    let (fx, job, tasks) = adc_2497_job("batch_bytes", 3, 8.0).await;
    let objects = results_stream::ensure_bucket(&fx.js, &fx.nats_args.results_object_bucket, Duration::from_secs(3600))
        .await
        .expect("bucket");
    let bodies: Vec<Vec<u8>> = tasks.iter().map(|(image, reply)| fx.factory.task_result(reply, *image)).collect();
    let sizes: Vec<usize> = bodies.iter().map(Vec::len).collect();
    let items = tasks
        .iter()
        .zip(bodies)
        .map(|((_, reply), body)| results_stream::Outgoing {
            subject: fx.subject(job),
            headers: vec![(MSG_ID_HEADER, reply.clone())],
            payload: body.into(),
        })
        .collect();
    let published = results_stream::publish_all(&fx.js, &objects, fx.client.server_info().max_payload, items).await;
    let mut size_at: HashMap<u64, usize> = HashMap::new();
    let mut claimed = 0;
    for (p, size) in published.iter().zip(&sizes) {
        let p = p.as_ref().expect("published");
        claimed += usize::from(p.by_reference);
        size_at.insert(p.sequence, *size);
    }
    assert!(claimed > 0 && claimed < tasks.len(), "{claimed} of {} results by claim check", tasks.len());
    let budget = sizes.iter().sum::<usize>() / sizes.len() * 3;
    let mut running = fx.start(IngestArgs { batch_bytes: budget, ..IngestArgs::default() }).await;
    // Every batch, as the sizes of its results (by their sequence in the results stream).
    let mut batches: Vec<Vec<usize>> = Vec::new();
    while batches.iter().map(Vec::len).sum::<usize>() < tasks.len() {
        let acked = tokio::time::timeout(Duration::from_secs(120), running.acked.recv())
            .await
            .expect("a batch within 2 minutes")
            .expect("ingest runs");
        assert_eq!(acked.dead_lettered, 0);
        batches.push(
            acked
                .reply_subjects
                .iter()
                .map(|s| {
                    let sequence: u64 = s.split('.').nth(5).and_then(|t| t.parse().ok()).expect("$JS.ACK subject");
                    size_at[&sequence]
                })
                .collect(),
        );
    }
    running.stop().await;
    assert!(batches.len() >= tasks.len() / 4, "{} results in {} batches: {batches:?}", tasks.len(), batches.len());
    for batch in &batches {
        // A batch takes results while it holds less than the budget: all but its last fit.
        let before_last: usize = batch[..batch.len() - 1].iter().sum();
        assert!(before_last < budget, "batch {batch:?} went on past {budget} bytes");
    }
    common::ingest::assert_counts_exact(&fx.store).await;
    fx.cleanup().await;
}

/// A backlog of large results sent inline (ADC's 2,497-class model, ~0.6 MB each, ~220 MB in
/// all) is pulled in pieces the server can send. One pull of 500 of them overran the server's
/// 64 MiB `max_pending` for the client, which was disconnected as a slow consumer; the
/// results delivered on that connection came back only after `--ack-wait` (60 s), to be
/// pulled the same way again (before the fix: 217 of 378 acked after 45 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_large_inline_results_is_pulled_without_a_slow_consumer() {
    let (fx, job, tasks) = adc_2497_job("large_backlog", 100, 6.0).await;
    let max_payload = fx.client.server_info().max_payload;
    let (mut inline, mut published) = (0, 0);
    for (image, reply) in &tasks {
        let body = fx.factory.task_result(reply, *image);
        // Only what fits goes inline (the others would travel by claim check).
        if body.len() + 1024 <= max_payload {
            inline += body.len();
            published += 1;
            assert!(fx.publish(job, reply, body).await, "stored");
        }
    }
    assert!(inline > 64 << 20, "{inline} bytes inline: more than the server's max_pending");
    let mut running = fx.start(IngestArgs::default()).await;
    // Well within the 60 s a result lost with a dropped connection waits to come back.
    running.wait_for(published, 0, Duration::from_secs(45)).await;
    running.stop().await;
    common::ingest::assert_counts_exact(&fx.store).await;
    fx.cleanup().await;
}

/// Stores `size` bytes by claim check through `results_stream::send` on `js` and returns the
/// object's name and its info as the store reports it.
async fn claim_checked(
    js: &async_nats::jetstream::Context,
    max_payload: usize,
    size: usize,
) -> (results_stream::Objects, String, async_nats::jetstream::object_store::ObjectInfo, Vec<u8>) {
    let bucket = format!("TALLY_TEST_CHUNKS_{}", common::ingest::unique());
    let objects = results_stream::ensure_bucket(js, &bucket, Duration::from_secs(600)).await.expect("bucket");
    // Not a run of one byte: a chunk boundary in the wrong place would show.
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let item = results_stream::Outgoing {
        subject: format!("tally_test_chunks_{}", common::ingest::unique()),
        headers: vec![],
        payload: payload.clone().into(),
    };
    let (_ack, name) = results_stream::send(js, &objects, max_payload, item).await.expect("stored by claim check");
    let name = name.expect("too large for one message: a claim check");
    let info = objects.store.info(&name).await.expect("object info");
    (objects, name, info, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_cut_in_chunks_as_large_as_a_message_allows() {
    let client = async_nats::connect(common::ingest::nats_url()).await.expect("NATS is required for this test");
    let js = async_nats::jetstream::new(client.clone());
    let max_payload = client.server_info().max_payload;
    // A result of ADC's 29,176-class model is ~9 MB; 3 MB keeps the test quick.
    let size = 3_000_000;
    let (objects, name, info, payload) = claim_checked(&js, max_payload, size).await;
    let chunk = results_stream::object_chunk_size(max_payload);
    assert!(chunk > 128 * 1024 && chunk < max_payload, "chunk {chunk} for max_payload {max_payload}");
    // The object store's default (128 KiB) would make 23 chunks of this object.
    assert_eq!(info.chunks, size.div_ceil(chunk), "{info:?}");
    let read = results_stream::fetch_object(&objects, &name, size).await.expect("read back");
    assert_eq!(read.as_ref(), payload.as_slice());
    js.delete_object_store(&objects.name).await.expect("delete bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_small_max_payload_still_takes_claim_checks() {
    // 64 KiB: the object store's default 128 KiB chunks could not be published at all.
    let nats = tokio::task::block_in_place(|| common::services::PrivateNats::with_max_payload(64 * 1024));
    let client = async_nats::connect(nats.url()).await.expect("private NATS");
    let max_payload = client.server_info().max_payload;
    assert_eq!(max_payload, 64 * 1024);
    let js = async_nats::jetstream::new(client);
    let size = 300_000;
    let (objects, name, info, payload) = claim_checked(&js, max_payload, size).await;
    assert_eq!(info.chunks, size.div_ceil(results_stream::object_chunk_size(max_payload)), "{info:?}");
    let read = results_stream::fetch_object(&objects, &name, size).await.expect("read back");
    assert_eq!(read.as_ref(), payload.as_slice());
}
