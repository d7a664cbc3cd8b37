//! The worker gateway against real Postgres, NATS and HTTP: the server runs in-process on
//! `127.0.0.1:0` and is spoken to as ADC does (plain HTTP/1.1). Auth, claims and their
//! fairness, tasks, results (read back from the stream), refusals that publish nothing,
//! heartbeats and the offline sweep, and `tally serve --no-ingest`.

pub mod client;
use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, Response};
use common::gateway::Served;
use common::ingest::{self, antenna_progress, world, Fixture, PIPELINE};
use common::Flavor;
use serde_json::{json, Value};
use tally::config::DbArgs;
use tally::gateway::{Gateway, GatewayArgs};
use tally::ingest::daemon::IngestArgs;
use tally::ingest::decode::job_of_reply_subject;
use tally::store::seed::{self, PipelineSpec};

/// The token of an active superuser.
const TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";
/// The token of a deactivated user.
const INACTIVE_TOKEN: &str = "fedcba9876543210fedcba9876543210fedcba98";
/// A second pipeline, for jobs a claim for [`PIPELINE`] must not return.
const OTHER_PIPELINE: &str = "tally-test-other-pipeline";

/// A fixture plus a gateway serving it.
struct Bench {
    fx: Fixture,
    server: Served,
    addr: SocketAddr,
}

impl Bench {
    /// A seeded database with a worker token and two pipelines, and a gateway with `args`
    /// (its own pool of 16, so concurrent claims really are concurrent).
    async fn new(label: &str, args: GatewayArgs) -> Bench {
        let fx = Fixture::new(label, Flavor::Empty, world(2, 4)).await;
        seed::seed_pipeline(&fx.store, &PipelineSpec::antenna_test(OTHER_PIPELINE)).await.expect("second pipeline");
        let c = fx.store.client().await.expect("client");
        c.batch_execute(&format!(
            "INSERT INTO users_user (id, password, is_superuser, email, is_staff, is_active, date_joined, name)
             VALUES (100, '', true, 'worker@example.org', true, true, now(), 'worker'),
                    (101, '', true, 'gone@example.org', true, false, now(), 'gone');
             INSERT INTO authtoken_token (key, created, user_id)
             VALUES ('{TOKEN}', now(), 100), ('{INACTIVE_TOKEN}', now(), 101);"
        ))
        .await
        .expect("users and tokens");
        let url = &fx.db.as_ref().expect("test database").url;
        let args = GatewayArgs { gateway_pool_size: 16, ..args };
        let server = Served::daemon(DbArgs::for_url(url), fx.nats_args.clone(), args).await;
        Bench { fx, addr: server.addr, server }
    }

    fn worker(&self) -> Client {
        Client { addr: self.addr, token: Some(TOKEN.into()) }
    }

    fn anonymous(&self) -> Client {
        Client { addr: self.addr, token: None }
    }

    /// Creates an async job of `pipeline` as Antenna does (row, stream `job_{id}`, consumer
    /// `job-{id}-consumer`, one task per image) without pulling any task.
    async fn job(&mut self, images: &[i64], status: &str, pipeline: &str) -> i64 {
        self.job_in(images, status, pipeline, "async_api", 1).await
    }

    async fn job_in(&mut self, images: &[i64], status: &str, pipeline: &str, mode: &str, project: i64) -> i64 {
        let c = self.fx.store.client().await.expect("client");
        let pipeline: i64 =
            c.query_one("SELECT id FROM ml_pipeline WHERE slug = $1", &[&pipeline]).await.expect("pipeline").get(0);
        let job = ingest::unique() as i64;
        c.execute(
            "INSERT INTO jobs_job (id, created_at, updated_at, name, queue, status, progress, project_id, delay,
                                   shuffle, job_type_key, logs, dispatch_mode, pipeline_id)
             VALUES ($1, now(), now(), 'test job', 'default', $2, $3, $4, 0, false, 'ml',
                     '{\"stdout\": [], \"stderr\": []}', $5, $6)",
            &[&job, &status, &antenna_progress(images.len()), &project, &mode, &pipeline],
        )
        .await
        .expect("insert job");
        ingest::antenna_queue(&self.fx.js, job, images, 2, Duration::from_secs(300)).await;
        self.fx.jobs.push(job);
        job
    }

    /// Messages in the test's results stream.
    async fn results_in_stream(&self) -> u64 {
        let mut s = self.fx.js.get_stream(&self.fx.nats_args.results_stream).await.expect("results stream");
        s.info().await.expect("stream info").state.messages
    }

    async fn stop(self) {
        self.server.stop().await;
        self.fx.cleanup().await;
    }
}

/// Arguments for tests: heartbeats and sweeps that do not get in the way.
fn args() -> GatewayArgs {
    GatewayArgs { gateway_fetch_wait: Duration::from_millis(200), ..GatewayArgs::default() }
}

/// `results[].id` of a claim.
fn claimed(r: &Response) -> Vec<i64> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["results"].as_array().expect("results").iter().map(|j| j["id"].as_i64().expect("id")).collect()
}

/// `(image, reply_subject)` of a tasks answer.
fn tasks_of(r: &Response) -> Vec<(i64, String)> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            assert_eq!(t["id"], t["image_id"]);
            let image: i64 = t["image_id"].as_str().and_then(|s| s.parse().ok()).expect("image id");
            assert_eq!(t["image_url"], format!("https://example.org/{image}.jpg"));
            (image, t["reply_subject"].as_str().expect("reply subject").to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_refuses_missing_wrong_and_inactive_tokens() {
    let mut b = Bench::new("gw_auth", args()).await;
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let path = format!("/api/v2/jobs?pipeline__slug__in={PIPELINE}&ids_only=1&incomplete_only=1");
    let cases = [
        (None, "Authentication credentials were not provided."),
        (Some("nope"), "Invalid token."),
        (Some(INACTIVE_TOKEN), "User inactive or deleted."),
    ];
    for (token, detail) in cases {
        let c = Client { addr: b.addr, token: token.map(String::from) };
        for r in [
            c.get(&path).await,
            c.tasks(job, 1).await,
            c.post(&format!("/api/v2/jobs/{job}/result/"), &json!({"results": []})).await,
        ] {
            assert_eq!(r.status, 401, "{token:?}: {}", r.body);
            assert_eq!(r.detail(), detail);
            assert_eq!(r.header("www-authenticate"), Some("Token"));
        }
    }
    assert_eq!(b.anonymous().get(&format!("/api/v2/jobs/next?pipeline__slug__in={PIPELINE}")).await.status, 401);
    // A scheme other than Token is no credential at all (DRF).
    let bearer = b.anonymous().get_authorized(&path, &format!("Bearer {TOKEN}")).await;
    assert_eq!(bearer.status, 401);
    // The right token, twice (the second from the cache).
    for _ in 0..2 {
        assert_eq!(claimed(&b.worker().get(&path).await), vec![job]);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_answers_in_antenna_s_shape_with_claimable_jobs_only() {
    let mut b = Bench::new("gw_claim", args()).await;
    let started = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let retry = b.job(&[3], "RETRY", PIPELINE).await;
    // None of these is claimable for PIPELINE.
    b.job(&[4], "PENDING", PIPELINE).await;
    b.job(&[5], "SUCCESS", PIPELINE).await;
    b.job(&[6], "STARTED", OTHER_PIPELINE).await;
    b.job_in(&[7], "STARTED", PIPELINE, "sync_api", 1).await;
    let finished_results = b.job(&[8], "STARTED", PIPELINE).await;
    let c = b.fx.store.client().await.expect("client");
    c.execute(
        "UPDATE jobs_job SET progress = jsonb_set(progress, '{stages,2,status}', '\"SUCCESS\"') WHERE id = $1",
        &[&finished_results],
    )
    .await
    .expect("results stage final");

    let w = b.worker();
    let r = w.claim(PIPELINE).await;
    let body = r.json();
    assert_eq!(r.header("content-type"), Some("application/json"));
    let first = body["results"][0]["id"].as_i64().expect("a job");
    assert!([started, retry].contains(&first), "{body}");
    assert_eq!(body["count"], 2);
    assert_eq!(body["next"], Value::Null);
    assert_eq!(body["previous"], Value::Null);
    assert_eq!(body["user_permissions"], json!([]));
    assert_eq!(body["results"][0]["pipeline_slug"], PIPELINE);
    assert_eq!(body["results"][0]["user_permissions"], json!([]));
    assert_eq!(body["results"].as_array().map(Vec::len), Some(1), "one job per claim: {body}");
    // The other job next, then the first again.
    let second = claimed(&w.claim(PIPELINE).await);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0], first);
    assert_eq!(claimed(&w.claim(PIPELINE).await), vec![first]);
    // /next gives the same shape.
    let next = w.get(&format!("/api/v2/jobs/next?pipeline__slug__in={PIPELINE}")).await;
    assert_eq!(claimed(&next), vec![second[0]]);
    assert_eq!(claimed(&w.get(&format!("/api/v2/jobs/next/?pipeline__slug__in={PIPELINE}")).await).len(), 1);
    // Several pipelines, and `limit`.
    let both = w.get(&format!("/api/v2/jobs?ids_only=1&pipeline__slug__in={PIPELINE},{OTHER_PIPELINE}&limit=5")).await;
    assert_eq!(both.json()["count"], 3);
    assert_eq!(claimed(&both).len(), 3);
    // Nothing for another dispatch mode or an unknown pipeline.
    let sync = w.get(&format!("/api/v2/jobs?ids_only=1&pipeline__slug__in={PIPELINE}&dispatch_mode=sync_api")).await;
    assert_eq!(claimed(&sync), Vec::<i64>::new());
    assert_eq!(sync.json()["count"], 0);
    assert_eq!(claimed(&w.claim("no-such-pipeline").await), Vec::<i64>::new());
    // The list call without ids_only is not a claim: tally does not serve it.
    let list = w.get(&format!("/api/v2/jobs?pipeline__slug__in={PIPELINE}")).await;
    assert_eq!(list.status, 400);
    assert!(list.detail().contains("ids_only=1"), "{}", list.body);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn eight_pollers_over_four_jobs_get_each_job_twice_per_round() {
    let mut b = Bench::new("gw_fair", args()).await;
    let mut jobs = Vec::new();
    for i in 0..4i64 {
        jobs.push(b.job(&[1 + i * 2, 2 + i * 2], "STARTED", PIPELINE).await);
    }
    let w = b.worker();
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let pollers: Vec<_> = (0..8)
            .map(|_| {
                let (w, barrier) = (w.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    claimed(&w.claim(PIPELINE).await)
                })
            })
            .collect();
        let mut got = Vec::new();
        for p in pollers {
            got.extend(p.await.expect("poller"));
        }
        got.sort();
        let mut want: Vec<i64> = jobs.iter().flat_map(|j| [*j, *j]).collect();
        want.sort();
        assert_eq!(got, want, "round {round}: every job exactly twice");
    }
    let c = b.fx.store.client().await.expect("client");
    for job in &jobs {
        let served: i64 = c
            .query_one("SELECT served_count FROM tally.job_dispatch WHERE job_id = $1", &[job])
            .await
            .expect("dispatch row")
            .get(0);
        assert_eq!(served, 2 * ROUNDS as i64);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_prefer_jobs_with_deliverable_tasks() {
    let mut b = Bench::new("gw_prefer", GatewayArgs { gateway_deliverable_ttl: Duration::ZERO, ..args() }).await;
    let drained = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let w = b.worker();
    assert_eq!(tasks_of(&w.tasks(drained, 10).await).len(), 2);
    let (pending, _) = b.fx.consumer_state(&format!("job_{drained}"), &format!("job-{drained}-consumer")).await;
    assert_eq!(pending, 0);
    // `drained` was never claimed, so least-recently-served order alone would pick it first.
    let ready = b.job(&[3, 4], "STARTED", PIPELINE).await;
    for _ in 0..3 {
        assert_eq!(claimed(&w.claim(PIPELINE).await), vec![ready]);
    }
    // Once `ready` is drained too, both are equal again and least-recently-served decides.
    assert_eq!(tasks_of(&w.tasks(ready, 10).await).len(), 2);
    assert_eq!(claimed(&w.claim(PIPELINE).await), vec![drained]);
    assert_eq!(claimed(&w.claim(PIPELINE).await), vec![ready]);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_carry_reply_subjects_that_ingest_accepts() {
    let mut b = Bench::new("gw_tasks", args()).await;
    let images: Vec<i64> = b.fx.world.images[..5].to_vec();
    let job = b.job(&images, "STARTED", PIPELINE).await;
    let w = b.worker();
    let mut tasks = tasks_of(&w.tasks(job, 3).await);
    assert_eq!(tasks.len(), 3);
    // Without the trailing slash too; fewer left than asked for.
    let rest =
        w.post(&format!("/api/v2/jobs/{job}/tasks"), &json!({"batch_size": 24, "client_info": {"host": "gpu1"}})).await;
    tasks.extend(tasks_of(&rest));
    assert_eq!(tasks.len(), 5);
    let started = Instant::now();
    assert!(tasks_of(&w.tasks(job, 24).await).is_empty());
    assert!(started.elapsed() >= Duration::from_millis(150), "an empty pull waits for the fetch wait");
    let mut seen: Vec<i64> = tasks.iter().map(|(i, _)| *i).collect();
    seen.sort();
    assert_eq!(seen, images);
    for (_, reply) in &tasks {
        assert!(reply.starts_with(&format!("$JS.ACK.job_{job}.job-{job}-consumer.")), "{reply}");
        assert_eq!(job_of_reply_subject(reply), Some(job));
    }
    let (_, ack_pending) = b.fx.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await;
    assert_eq!(ack_pending, 5, "nothing is acked at fetch time");

    // Results for them through the gateway; ingest saves them and acks every task.
    let results: Vec<Value> = tasks
        .iter()
        .map(|(image, reply)| json!({"reply_subject": reply, "result": b.fx.factory.response(*image)}))
        .collect();
    let r = w.post(&format!("/api/v2/jobs/{job}/result/"), &json!({"results": results})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut running = b.fx.start(IngestArgs::default()).await;
    running.wait_for(5, 0, Duration::from_secs(60)).await;
    running.stop().await;
    assert_eq!(b.fx.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await, (0, 0));
    assert_eq!(ingest::rows(&b.fx.store).await, ingest::expected(&b.fx, &images));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_refuse_bad_requests_and_serve_nothing_for_inactive_jobs() {
    let mut b = Bench::new("gw_tasks_bad", GatewayArgs { gateway_max_batch_size: 100, ..args() }).await;
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let pending = b.job(&[3], "PENDING", PIPELINE).await;
    let revoked = b.job(&[4], "REVOKED", PIPELINE).await;
    let sync = b.job_in(&[5], "STARTED", PIPELINE, "sync_api", 1).await;
    let no_pipeline = b.job(&[6], "STARTED", PIPELINE).await;
    let c = b.fx.store.client().await.expect("client");
    c.execute("UPDATE jobs_job SET pipeline_id = NULL WHERE id = $1", &[&no_pipeline]).await.expect("update");
    let w = b.worker();
    let path = format!("/api/v2/jobs/{job}/tasks/");
    for (body, want) in [
        (&b"{\"batch_size\": 0}"[..], "batch_size must be an integer from 1 to 100"),
        (b"{\"batch_size\": 101}", "batch_size must be an integer from 1 to 100"),
        (b"{\"batch_size\": -1}", "batch_size must be an integer from 1 to 100"),
        (b"{\"batch_size\": \"many\"}", "invalid body"),
        (b"{\"batch_size\": 2.5}", "invalid body"),
        (b"{}", "missing field `batch_size`"),
        (b"[24]", "invalid body"),
        (b"{\"batch_size\": 24", "malformed JSON"),
        (b"", "malformed JSON"),
    ] {
        let r = w.post_raw(&path, body).await;
        assert_eq!(r.status, 400, "{:?}: {}", String::from_utf8_lossy(body), r.body);
        assert!(r.detail().contains(want), "{:?}: {}", String::from_utf8_lossy(body), r.body);
    }
    for missing in ["/api/v2/jobs/999999999/tasks/", "/api/v2/jobs/abc/tasks/", "/api/v2/jobs/-1/tasks/"] {
        let r = w.post(missing, &json!({"batch_size": 1})).await;
        assert_eq!(r.status, 404, "{missing}: {}", r.body);
        assert_eq!(r.detail(), "Not found.");
    }
    let r = w.tasks(sync, 1).await;
    assert_eq!(r.status, 400);
    assert!(r.detail().contains("not an async_api job"), "{}", r.body);
    let r = w.tasks(no_pipeline, 1).await;
    assert_eq!(r.status, 400);
    assert!(r.detail().contains("has no pipeline"), "{}", r.body);
    for inactive in [pending, revoked] {
        let r = w.tasks(inactive, 5).await;
        assert_eq!(r.json(), json!({"tasks": []}));
    }
    // Nothing was delivered by any of those.
    assert_eq!(b.fx.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await, (2, 0));
    assert_eq!(b.fx.consumer_state(&format!("job_{pending}"), &format!("job-{pending}-consumer")).await, (1, 0));
    // Unknown paths and methods answer JSON too.
    let r = w.get("/api/v2/nothing").await;
    assert_eq!((r.status, r.detail()), (404, "Not found.".to_string()));
    let r = w.get(&path).await;
    assert_eq!(r.status, 405);
    assert!(r.detail().contains("GET"), "{}", r.body);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_published_as_sent_with_their_reply_subjects_as_msg_ids() {
    let mut b = Bench::new("gw_result", args()).await;
    let images: Vec<i64> = b.fx.world.images[..3].to_vec();
    let job = b.job(&images, "STARTED", PIPELINE).await;
    let w = b.worker();
    let tasks = tasks_of(&w.tasks(job, 3).await);
    let mut items: Vec<Value> = tasks[..2]
        .iter()
        .map(|(image, reply)| json!({"reply_subject": reply, "result": b.fx.factory.response(*image)}))
        .collect();
    items.push(json!({"reply_subject": tasks[2].1, "result": {"error": "download failed", "image_id": tasks[2].0.to_string()}}));
    let body = json!({"results": items, "client_info": {"hostname": "gpu-1"}});
    let r = w.post(&format!("/api/v2/jobs/{job}/result/"), &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.json();
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["job_id"], job);
    assert_eq!(answer["results_queued"], 3);
    let queued = answer["tasks"].as_array().expect("tasks");
    assert_eq!(queued.len(), 3);
    let s = b.fx.js.get_stream(&b.fx.nats_args.results_stream).await.expect("results stream");
    for (item, q) in items.iter().zip(queued) {
        assert_eq!(q["reply_subject"], item["reply_subject"]);
        assert_eq!(q["status"], "queued");
        let seq: u64 = q["task_id"].as_str().and_then(|s| s.parse().ok()).expect("task_id is the stream sequence");
        let m = s.get_raw_message(seq).await.expect("published message");
        assert_eq!(m.subject.as_str(), b.fx.subject(job));
        // Byte for byte as the worker sent it (re-serializing could change floats' last digits).
        let sent = serde_json::to_vec(item).expect("json");
        assert_eq!(String::from_utf8_lossy(&m.payload), String::from_utf8_lossy(&sent), "published as sent");
        let id = m.headers.get("Nats-Msg-Id").expect("Nats-Msg-Id").as_str();
        assert_eq!(Some(id), item["reply_subject"].as_str());
    }
    assert_eq!(b.results_in_stream().await, 3, "exactly the results, nothing else");
    // The same POST again (a worker retrying): JetStream drops the repeats.
    let again = w.post(&format!("/api/v2/jobs/{job}/result"), &body).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["tasks"], answer["tasks"], "same sequences: the originals");
    assert_eq!(b.results_in_stream().await, 3);
    // An empty list is accepted and publishes nothing.
    let empty = w.post(&format!("/api/v2/jobs/{job}/result/"), &json!({"results": []})).await;
    assert_eq!(
        empty.json(),
        json!({"status": "accepted", "job_id": job, "results_queued": 0, "tasks": [], "refused": []})
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_requests_publish_nothing() {
    let limit = 64 << 10;
    let mut b = Bench::new("gw_result_bad", GatewayArgs { gateway_max_body_bytes: limit, ..args() }).await;
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let w = b.worker();
    let mine = tasks_of(&w.tasks(job, 2).await);
    let path = format!("/api/v2/jobs/{job}/result/");
    // Requests that are not a results envelope at all: 400, nothing published.
    for (body, want) in [
        (json!({"results": {"a": 1}}).to_string(), "invalid body"),
        (json!({"result": []}).to_string(), "missing field `results`"),
        ("{\"results\": [".to_string(), "malformed JSON"),
        ("results=1".to_string(), "malformed JSON"),
    ] {
        let r = w.post_raw(&path, body.as_bytes()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.detail().contains(want), "{body}: {}", r.body);
    }
    let ok = |reply: &str| json!({"reply_subject": reply, "result": {"error": "x", "image_id": "1"}});
    // Unknown job.
    let r = w.post("/api/v2/jobs/987654321/result/", &json!({"results": [ok(&mine[0].1)]})).await;
    assert_eq!(r.status, 404);
    // Over the body limit: refused from Content-Length, before reading.
    let r = w.post_declaring(&path, limit + 1).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.detail().contains(&format!("limit of {limit} bytes")), "{}", r.body);
    // ...and a real one, just over.
    let big = json!({"results": [{"reply_subject": mine[0].1, "result": {"pad": "x".repeat(limit)}}]});
    let r = w.post(&path, &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(b.results_in_stream().await, 0, "nothing published");
    // Just under the limit is fine.
    let fits = json!({"results": [{"reply_subject": mine[0].1, "result": {"pad": "x".repeat(limit - 400)}}]});
    assert_eq!(w.post(&path, &fits).await.status, 200);
    assert_eq!(b.results_in_stream().await, 1);
    b.stop().await;
}

/// A POST mixing a result larger than a NATS message, invalid items and valid ones: 200 with
/// the valid ones queued and the others named; ingest saves the valid ones (the large one by
/// claim check) and dead-letters each invalid one with its reason, in the job log too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_item_never_sinks_the_batch() {
    let mut b = Bench::new("gw_result_mixed", args()).await;
    let images: Vec<i64> = b.fx.world.images[..3].to_vec();
    let job = b.job(&images, "STARTED", PIPELINE).await;
    let other = b.job(&[b.fx.world.images[3]], "STARTED", PIPELINE).await;
    let w = b.worker();
    let mine = tasks_of(&w.tasks(job, 3).await);
    let theirs = tasks_of(&w.tasks(other, 1).await);
    let mut factory = b.fx.factory.clone();
    factory.score_len = 2_497;
    factory.mean_detections = 20.0;
    let large = json!({"reply_subject": mine[0].1, "result": factory.response(mine[0].0)});
    let large_len = serde_json::to_vec(&large).expect("json").len();
    assert!(large_len > b.fx.client.max_payload(), "{large_len} bytes must exceed max_payload to test the claim check");
    let small = json!({"reply_subject": mine[1].1, "result": b.fx.factory.response(mine[1].0)});
    let failed =
        json!({"reply_subject": mine[2].1, "result": {"error": "download failed", "image_id": mine[2].0.to_string()}});
    let crlf = format!("{}\r\nX-Evil: 1", mine[0].1);
    let items = json!([
        large,
        {"reply_subject": theirs[0].1, "result": {"error": "x", "image_id": "1"}},
        small,
        7,
        {"reply_subject": crlf, "result": {"error": "x", "image_id": "1"}},
        {"reply_subject": format!("{}.extra", mine[1].1), "result": {"error": "x", "image_id": "1"}},
        {"reply_subject": mine[1].1},
        failed,
    ]);
    let r = w.post(&format!("/api/v2/jobs/{job}/result/"), &json!({"results": items})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.json();
    assert_eq!(answer["status"], "partial");
    assert_eq!(answer["results_queued"], 3);
    let refused: Vec<(u64, String)> = answer["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|x| (x["index"].as_u64().unwrap_or(99), x["reason_code"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(
        refused,
        vec![
            (1, "foreign_reply_subject".into()),
            (3, "wrong_shape".into()),
            (4, "foreign_reply_subject".into()),
            (5, "foreign_reply_subject".into()),
            (6, "wrong_shape".into()),
        ],
        "{}",
        r.body
    );
    assert!(answer["refused"].as_array().into_iter().flatten().all(|x| x["dead_lettered"] == true));
    // The large result travelled by reference.
    let s = b.fx.js.get_stream(&b.fx.nats_args.results_stream).await.expect("results stream");
    let seq: u64 = answer["tasks"][0]["task_id"].as_str().and_then(|t| t.parse().ok()).expect("sequence");
    let m = s.get_raw_message(seq).await.expect("claim check");
    let object = m.headers.get(tally::results_stream::OBJECT_HEADER).expect("object header").as_str().to_string();
    assert!(m.payload.is_empty());

    let mut ingest = b.fx.start(IngestArgs::default()).await;
    ingest.wait_for(3, 5, Duration::from_secs(60)).await;
    let c = b.fx.store.client().await.expect("client");
    let long: i64 = c
        .query_one("SELECT count(*) FROM main_classification WHERE cardinality(scores) = 2497", &[])
        .await
        .expect("classifications")
        .get(0);
    assert!(long > 0, "the large result's classifications are saved with their whole vectors");
    let letters: Vec<(String, Option<String>)> = c
        .query("SELECT reason_code, reply_subject FROM tally.dead_letter WHERE job_id = $1 ORDER BY id", &[&job])
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(letters.len(), 5, "{letters:?}");
    assert_eq!(letters.iter().filter(|l| l.0 == "foreign_reply_subject").count(), 3);
    assert_eq!(letters.iter().filter(|l| l.0 == "wrong_shape").count(), 2);
    let logged: i64 = c
        .query_one(
            "SELECT count(*) FROM jobs_joblog WHERE job_id = $1 AND message LIKE 'result rejected%refused by the gateway%'",
            &[&job],
        )
        .await
        .expect("job log")
        .get(0);
    assert_eq!(logged, 5, "each refusal is in the job log");
    let (_, processed, failed_n, _, _) = ingest::job_progress(&b.fx.store, job).await;
    assert_eq!((processed, failed_n), (3, 1));
    ingest.stop().await;
    // Acked, so its object is gone.
    let objects = tally::results_stream::ensure_bucket(
        &b.fx.js,
        &b.fx.nats_args.results_object_bucket,
        Duration::from_secs(3600),
    )
    .await
    .expect("bucket");
    assert!(objects.store.get(&object).await.is_err(), "the object of a saved result is deleted");
    ingest::assert_counts_exact(&b.fx.store).await;
    b.stop().await;
}

/// ADC's global model: a result of 20 detections, each with 29,176 scores and logits (~25 MB
/// of JSON), through the gateway and NATS with its default 1 MiB max_payload, saved whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_model_result_of_20_detections_is_saved() {
    let mut b = Bench::new("gw_result_global", args()).await;
    let image = b.fx.world.images[0];
    let job = b.job(&[image], "STARTED", PIPELINE).await;
    let w = b.worker();
    let tasks = tasks_of(&w.tasks(job, 1).await);
    let mut factory = b.fx.factory.clone();
    factory.score_len = 29_176;
    factory.mean_detections = 40.0;
    let mut result = factory.response(image);
    let detections = result["detections"].as_array_mut().expect("detections");
    assert!(detections.len() >= 20, "the factory made {} detections", detections.len());
    detections.truncate(20);
    let body =
        serde_json::to_vec(&json!({"results": [{"reply_subject": tasks[0].1, "result": result}]})).expect("json");
    // ~1.2 MB per classification, as ADC measured with this model.
    assert!(body.len() > 20 << 20, "{} bytes", body.len());
    let r = w.post_raw(&format!("/api/v2/jobs/{job}/result/"), &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results_queued"], 1);
    let mut ingest = b.fx.start(IngestArgs::default()).await;
    ingest.wait_for(1, 0, Duration::from_secs(120)).await;
    ingest.stop().await;
    let c = b.fx.store.client().await.expect("client");
    let row = c
        .query_one(
            "SELECT count(*), min(cardinality(scores)), min(cardinality(logits)) FROM main_classification c
             JOIN main_detection d ON d.id = c.detection_id WHERE d.source_image_id = $1 AND cardinality(scores) > 2",
            &[&(image as i64)],
        )
        .await
        .expect("classifications");
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, Option<i32>>(1), row.get::<_, Option<i32>>(2)),
        (20, Some(29_176), Some(29_176))
    );
    ingest::assert_counts_exact(&b.fx.store).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_nats_tasks_and_results_answer_antenna_s_503() {
    let mut b = Bench::new("gw_no_nats", args()).await;
    let job = b.job(&[1], "STARTED", PIPELINE).await;
    let tasks = tasks_of(&b.worker().tasks(job, 1).await);
    // A gateway whose NATS is not connected (yet), over the same database.
    let gateway = Gateway::new(b.fx.nats_args.clone(), args());
    let url = &b.fx.db.as_ref().expect("test database").url;
    gateway.set_store(tally::store::connect(&DbArgs::for_url(url)).await.expect("pool"));
    let cold = Served::alone(gateway).await;
    let w = Client { addr: cold.addr, token: Some(TOKEN.into()) };
    let r = w.tasks(job, 1).await;
    assert_eq!((r.status, r.json()), (503, json!({"error": "Task queue temporarily unavailable"})));
    let r = w
        .post(
            &format!("/api/v2/jobs/{job}/result/"),
            &json!({"results": [{"reply_subject": tasks[0].1, "result": {}}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.json()),
        (503, json!({"status": "error", "job_id": job, "detail": "Task queue temporarily unavailable"}))
    );
    // Claims need only Postgres.
    assert_eq!(claimed(&w.claim(PIPELINE).await), vec![job]);
    cold.stop().await;
    b.stop().await;
}

/// Inserts an async (or, with an endpoint, a push-mode) processing service linked to
/// `pipeline` and `project`; returns its id.
async fn service(b: &Bench, endpoint: Option<&str>, pipeline: &str, project: i64, last_seen_ago: Option<f64>) -> i64 {
    let c = b.fx.store.client().await.expect("client");
    let id: i64 = c
        .query_one(
            "INSERT INTO ml_processingservice (created_at, updated_at, name, description, endpoint_url, last_seen, last_seen_live)
             VALUES (now(), now(), 'svc', '', $1, now() - make_interval(secs => $2), CASE WHEN $2 IS NULL THEN NULL ELSE true END)
             RETURNING id",
            &[&endpoint, &last_seen_ago],
        )
        .await
        .expect("service")
        .get(0);
    common::link_service(&b.fx.store, id, pipeline, &[project]).await;
    id
}

/// `(last_seen as seconds since the epoch, last_seen_live)` of a service.
async fn seen(b: &Bench, id: i64) -> (Option<f64>, Option<bool>) {
    let c = b.fx.store.client().await.expect("client");
    let r = c
        .query_one(
            "SELECT extract(epoch FROM last_seen)::float8, last_seen_live FROM ml_processingservice WHERE id = $1",
            &[&id],
        )
        .await
        .expect("service");
    (r.get(0), r.get(1))
}

/// Waits until `check` holds for service `id`, or panics after `timeout`.
async fn until(b: &Bench, id: i64, timeout: Duration, what: &str, check: impl Fn((Option<f64>, Option<bool>)) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let state = seen(b, id).await;
        if check(state) {
            return;
        }
        assert!(Instant::now() < deadline, "service {id}: {what} within {timeout:?}; it is {state:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_mark_matching_async_services_at_most_once_per_interval() {
    let interval = Duration::from_millis(1500);
    let mut b = Bench::new("gw_heartbeat", GatewayArgs { heartbeat_interval: interval, ..args() }).await;
    let job = b.job(&[1, 2, 3], "STARTED", PIPELINE).await;
    let mine = service(&b, None, PIPELINE, 1, None).await;
    let other_project = service(&b, None, PIPELINE, 2, None).await;
    let push_mode = service(&b, Some("http://ml.example.org"), PIPELINE, 1, None).await;
    let other_pipeline = service(&b, None, OTHER_PIPELINE, 1, None).await;
    let w = b.worker();

    // A tasks call vouches for the async services of the job's pipeline and project.
    tasks_of(&w.tasks(job, 1).await);
    until(&b, mine, Duration::from_secs(5), "seen", |(at, live)| at.is_some() && live == Some(true)).await;
    let (first, _) = seen(&b, mine).await;
    let written = Instant::now();
    // Calls within the interval (tasks and result share the job's key) write nothing.
    tasks_of(&w.tasks(job, 1).await);
    let r = w.post(&format!("/api/v2/jobs/{job}/result/"), &json!({"results": []})).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen(&b, mine).await.0, first, "throttled");
    for untouched in [other_project, push_mode, other_pipeline] {
        assert_eq!(seen(&b, untouched).await, (None, None), "service {untouched} is not the job's");
    }
    // After the interval, the next call writes again.
    tokio::time::sleep(interval.saturating_sub(written.elapsed()) + Duration::from_millis(100)).await;
    tasks_of(&w.tasks(job, 1).await);
    until(&b, mine, Duration::from_secs(5), "seen again", |(at, _)| at > first).await;

    // A claim vouches for every async service of its pipelines, in any project (Antenna's rule).
    claimed(&w.claim(PIPELINE).await);
    until(&b, other_project, Duration::from_secs(5), "seen", |(at, live)| at.is_some() && live == Some(true)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen(&b, push_mode).await, (None, None), "push-mode services are not heartbeat");
    assert_eq!(seen(&b, other_pipeline).await, (None, None));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_marks_async_services_unseen_for_too_long_offline() {
    let offline_after = Duration::from_secs(2);
    let sweep = GatewayArgs {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_offline_after: offline_after,
        heartbeat_sweep_every: Duration::from_millis(100),
        ..args()
    };
    let mut b = Bench::new("gw_sweep", sweep).await;
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let stale = service(&b, None, PIPELINE, 1, Some(10.0)).await;
    let fresh = service(&b, None, PIPELINE, 1, Some(0.0)).await;
    let push_mode = service(&b, Some("http://ml.example.org"), PIPELINE, 1, Some(10.0)).await;
    let never = service(&b, None, OTHER_PIPELINE, 1, None).await;
    until(&b, stale, Duration::from_secs(3), "offline", |(_, live)| live == Some(false)).await;
    assert_eq!(seen(&b, fresh).await.1, Some(true), "seen within the window");
    assert_eq!(seen(&b, push_mode).await.1, Some(true), "push-mode services are left to Antenna");
    assert_eq!(seen(&b, never).await, (None, None), "never seen: left alone");
    // Unseen past the window, the fresh one goes offline too; a worker call brings both back.
    until(&b, fresh, offline_after + Duration::from_secs(2), "offline", |(_, live)| live == Some(false)).await;
    tasks_of(&b.worker().tasks(job, 1).await);
    for id in [stale, fresh] {
        until(&b, id, Duration::from_secs(3), "live again", |(_, live)| live == Some(true)).await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tally_serve_no_ingest_serves_the_worker_api() {
    let mut b = Bench::new("gw_serve", args()).await;
    let job = b.job(&[1], "STARTED", PIPELINE).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("address").port();
    let listen = format!("127.0.0.1:{port}");
    let url = b.fx.db.as_ref().expect("test database").url.clone();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--no-ingest", "--listen", &listen])
        .env("DATABASE_URL", &url)
        .env("NATS_URL", ingest::nats_url())
        .env("TALLY_RESULTS_STREAM", &b.fx.nats_args.results_stream)
        .env("TALLY_RESULTS_SUBJECT_PREFIX", &b.fx.nats_args.results_subject_prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("tally serve");
    let addr: SocketAddr = listen.parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => client::get(addr, "/readyz").await.status == 200,
            Err(_) => false,
        };
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "tally serve --no-ingest not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let anonymous = Client { addr, token: None };
    assert_eq!(anonymous.claim(PIPELINE).await.status, 401);
    let w = Client { addr, token: Some(TOKEN.into()) };
    assert_eq!(claimed(&w.claim(PIPELINE).await), vec![job]);
    assert_eq!(tasks_of(&w.tasks(job, 5).await).len(), 1);
    let metrics = client::get(addr, "/metrics").await;
    assert!(
        metrics.body.contains("tally_gateway_requests_total{route=\"claim\",status=\"401\"} 1"),
        "{}",
        metrics.body
    );
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let status =
        tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits on SIGTERM").expect("wait");
    assert!(status.success(), "{status}");
    b.stop().await;
}

/// Replaces job `job`'s consumer (before any delivery) by one with `max_deliver` and
/// `ack_wait`.
async fn recreate_consumer(b: &Bench, job: i64, max_deliver: i64, ack_wait: Duration) {
    ingest::antenna_consumer(&b.fx.js, job, max_deliver, ack_wait).await;
}

/// A `/tasks` call answered `{"tasks": []}` within the fetch wait (0.2 s) and a margin.
async fn empty_in_time(w: &Client, job: i64, what: &str) {
    let started = Instant::now();
    let r = w.tasks(job, 5).await;
    let took = started.elapsed();
    assert_eq!((r.status, r.json()), (200, json!({"tasks": []})), "{what}");
    assert!(took < Duration::from_millis(1200), "{what}: answered after {took:?}");
    eprintln!("{what}: [] in {} ms", took.as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_exhausted_or_drained_queues_answer_empty_within_the_fetch_wait() {
    let mut b = Bench::new("gw_exhausted", args()).await;
    let w = b.worker();
    // Two tasks, one delivery each, 1 s ack wait: one is acked, the other used up max_deliver.
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    recreate_consumer(&b, job, 1, Duration::from_secs(1)).await;
    let tasks = tasks_of(&w.tasks(job, 5).await);
    assert_eq!(tasks.len(), 2);
    b.fx.client.publish(tasks[0].1.clone(), "+ACK".into()).await.expect("ack");
    b.fx.client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // JetStream holds a no-wait pull without expiry on such a consumer: this used to take the
    // 10 s cut-off and answer 503.
    for _ in 0..3 {
        empty_in_time(&w, job, "exhausted queue").await;
    }
    // Every task acked.
    let drained = b.job(&[3], "STARTED", PIPELINE).await;
    let tasks = tasks_of(&w.tasks(drained, 5).await);
    b.fx.client.publish(tasks[0].1.clone(), "+ACK".into()).await.expect("ack");
    b.fx.client.flush().await.expect("flush");
    empty_in_time(&w, drained, "drained queue").await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_answer_503_at_once_when_nats_is_disconnected() {
    let mut b = Bench::new("gw_nats_down", args()).await;
    let job = b.job(&[1], "STARTED", PIPELINE).await;
    // A gateway over the same database and a NATS server of its own, which is then killed.
    let nats = common::services::PrivateNats::start();
    let client = async_nats::connect(nats.url()).await.expect("private NATS");
    let url = &b.fx.db.as_ref().expect("test database").url;
    let store = tally::store::connect(&DbArgs::for_url(url)).await.expect("pool");
    let server = Served::alone(Gateway::connected(store, client.clone(), b.fx.nats_args.clone(), args())).await;
    let w = Client { addr: server.addr, token: Some(TOKEN.into()) };
    let r = w.tasks(job, 1).await;
    assert_eq!((r.status, r.json()), (200, json!({"tasks": []})), "no queue on that server: no tasks");
    tokio::task::block_in_place(|| nats.kill());
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection_state() == async_nats::connection::State::Connected {
        assert!(Instant::now() < deadline, "the client did not notice the server is gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        let started = Instant::now();
        let r = w.tasks(job, 1).await;
        let took = started.elapsed();
        assert_eq!((r.status, r.json()), (503, json!({"error": "Task queue temporarily unavailable"})));
        assert!(took < Duration::from_millis(500), "503 after {took:?}");
        eprintln!("NATS down: 503 in {} ms", took.as_millis());
    }
    server.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_drf_answers_and_touches_nothing() {
    let mut b = Bench::new("gw_hostile", args()).await;
    let job = b.job(&[1, 2], "STARTED", PIPELINE).await;
    let w = b.worker();
    let store = b.fx.store.clone();
    let served = || async {
        let c = store.client().await.expect("client");
        c.query_one("SELECT count(*) FROM tally.job_dispatch WHERE served_count > 0", &[])
            .await
            .expect("served")
            .get::<_, i64>(0)
    };

    // Job ids are canonical decimals only: `+{job}` is no job (Rust and Python both parse it).
    for path in [
        format!("/api/v2/jobs/+{job}/tasks/"),
        format!("/api/v2/jobs/0{job}/tasks/"),
        format!("/api/v2/jobs/%20{job}/tasks/"),
        "/api/v2/jobs/%FF/tasks/".to_string(),
        format!("/api/v2/jobs/+{job}/result/"),
        format!("/api/v2/jobs/0{job}/result/"),
    ] {
        let body = if path.ends_with("tasks/") { json!({"batch_size": 2}) } else { json!({"results": []}) };
        let r = w.post(&path, &body).await;
        assert_eq!((r.status, r.detail()), (404, "Not found.".to_string()), "{path}: {}", r.body);
    }
    // A result path segment that is not UTF-8: a JSON error, not axum's plain text.
    let r = w.post("/api/v2/jobs/%FF/result/", &json!({"results": []})).await;
    assert!(r.status == 404 || r.status == 400, "{}", r.body);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", r.headers);
    let _ = r.detail();

    // Claims: a NUL or any control character in the slugs is a 400, not a 503.
    for slugs in ["moths%00", "%00", &format!("{PIPELINE},%07x"), "a%0Ab", "%7F"] {
        let r = w.claim(slugs).await;
        assert_eq!(r.status, 400, "{slugs}: {}", r.body);
        assert!(r.detail().contains("control characters"), "{slugs}: {}", r.body);
    }
    // Only empty slugs: django-filter's `slug IN ('', '', …)` matches no pipeline, so Antenna
    // answers with an empty page; a claimable job exists all the same.
    for slugs in [",,,", ",", "%20,%20"] {
        let r = w.claim(slugs).await;
        assert_eq!(r.status, 200, "{slugs}: {}", r.body);
        assert_eq!(
            r.json(),
            json!({"count": 0, "next": null, "previous": null, "results": [], "user_permissions": []}),
            "{slugs}"
        );
    }
    // Malformed parameters: 400 with DRF's shape.
    for query in ["limit=abc", "limit=0", "limit=-1", "offset=x"] {
        let r = w.get(&format!("/api/v2/jobs?ids_only=1&pipeline__slug__in={PIPELINE}&{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.detail().contains(query.split('=').next().unwrap_or_default()), "{query}: {}", r.body);
    }
    assert_eq!(served().await, 0, "none of those claimed anything");
    // Empty entries among real slugs are ignored.
    assert_eq!(claimed(&w.claim(&format!(",{PIPELINE},,")).await), vec![job]);
    assert_eq!(served().await, 1);

    // Bodies not sent as JSON: DRF's 415, and nothing pulled or published.
    let tasks_path = format!("/api/v2/jobs/{job}/tasks/");
    let result_path = format!("/api/v2/jobs/{job}/result/");
    let tasks_body = br#"{"batch_size": 2}"#;
    let result_body = br#"{"results": []}"#;
    for (content_type, shown) in [
        (Some("text/plain"), "text/plain"),
        (Some("application/x-www-form-urlencoded"), "application/x-www-form-urlencoded"),
        (Some("text/plain; charset=utf-8"), "text/plain; charset=utf-8"),
        (None, ""),
    ] {
        for (path, body) in [(&tasks_path, &tasks_body[..]), (&result_path, &result_body[..])] {
            let r = w.post_typed(path, content_type, body).await;
            assert_eq!(r.status, 415, "{content_type:?} {path}: {}", r.body);
            assert_eq!(r.json(), json!({"detail": format!("Unsupported media type \"{shown}\" in request.")}));
        }
    }
    assert_eq!(b.fx.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await, (2, 0));
    // JSON in any spelling is taken.
    for content_type in ["Application/JSON; charset=UTF-8", "application/vnd.api+json"] {
        let r = w.post_typed(&result_path, Some(content_type), result_body).await;
        assert_eq!(r.status, 200, "{content_type}: {}", r.body);
    }

    // Nested 5,000 deep: refused before any parser recurses.
    let deep = |key: &str| format!("{{\"{key}\": {}{}}}", "[".repeat(5000), "]".repeat(5000));
    for (path, body) in [(&tasks_path, deep("batch_size")), (&result_path, deep("results"))] {
        let r = w.post_raw(path, body.as_bytes()).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(r.detail().contains("nested deeper than 64 levels"), "{path}: {}", r.body);
    }
    assert_eq!(b.fx.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await, (2, 0));
    assert_eq!(b.results_in_stream().await, 0, "nothing published");
    // And the job's tasks are all still there for a well-formed request.
    assert_eq!(tasks_of(&w.tasks(job, 2).await).len(), 2);
    b.stop().await;
}

/// The gateway keeps its statements prepared per pooled session. A Django migration that
/// changes the type of a column one of them returns makes its next use fail ("cached plan
/// must not change result type"); that answer is one 503, after which every session's
/// statements are prepared afresh and requests succeed again (before, every session that
/// had cached the statement answered 503 until `tally serve` restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_changing_a_column_type_costs_at_most_one_failed_request() {
    let mut b = Bench::new("gw_migration", args()).await;
    let pending = b.job(&[1], "PENDING", PIPELINE).await;
    let w = b.worker();
    // Warm every session the pool hands out: each caches the job statement.
    for _ in 0..40 {
        let r = w.tasks(pending, 1).await;
        assert_eq!((r.status, r.json()), (200, json!({"tasks": []})), "{}", r.body);
    }
    let c = b.fx.store.client().await.expect("client");
    c.batch_execute("ALTER TABLE jobs_job ALTER COLUMN status TYPE text").await.expect("alter");
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(w.tasks(pending, 1).await.status);
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert!(failed <= 1, "after the migration: {statuses:?}");
    assert!(statuses[1..].iter().all(|s| *s == 200), "after the migration: {statuses:?}");
    b.stop().await;
}
