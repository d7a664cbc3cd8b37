//! An ingest test bench on the shared services: a scratch database seeded with a synthetic
//! world and a pipeline, a results stream and subject prefix of the test's own, Antenna-style
//! job streams with tasks (so results carry real ack subjects), and ingest running in-process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use tally::config::NatsArgs;
use tally::django_cache::DjangoCacheArgs;
use tally::http::Health;
use tally::ingest::daemon::{Acked, Hooks, IngestArgs};
use tally::server::Config;
use tally::store::seed::{self, PipelineSpec};
use tally::store::Store;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::Id;
use tally_tools::synth::results::{ResultFactory, ResultKeys, World, WorldConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Flavor, TestDb};

/// The NATS server of the tests (`TALLY_TEST_NATS_URL`, default nats://127.0.0.1:4222).
pub fn nats_url() -> String {
    std::env::var("TALLY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Connects to the test NATS server or panics saying how to start it.
pub async fn nats() -> async_nats::Client {
    let url = nats_url();
    async_nats::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "NATS with JetStream is required for this test and is not reachable at {url}: {e} (run scripts/services)"
        )
    })
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A number unique to this test process and call (job ids and stream names).
pub fn unique() -> u64 {
    (std::process::id() as u64 % 100_000) * 1_000 + NEXT.fetch_add(1, Ordering::SeqCst)
}

/// The pipeline every fixture registers.
pub const PIPELINE: &str = "tally-test-pipeline";

/// A seeded database plus NATS names of the test's own.
pub struct Fixture {
    /// The database on the shared server, dropped with the fixture (`None` for a database on a
    /// private server).
    pub db: Option<TestDb>,
    /// Its store.
    pub store: Store,
    /// The world seeded into it.
    pub world: World,
    /// NATS settings with a results stream and subject prefix of this test's own.
    pub nats_args: NatsArgs,
    /// The connection.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Results for the world's images.
    pub factory: ResultFactory,
    /// Job streams created, deleted by [`Fixture::cleanup`].
    pub jobs: Vec<i64>,
}

impl Fixture {
    /// Seeds a world of `config` over a small synthetic taxonomy.
    pub async fn new(label: &str, flavor: Flavor, config: WorldConfig) -> Fixture {
        let (db, store) = TestDb::new(label, flavor).await;
        Fixture::on(Some(db), store, &nats_url(), config).await
    }

    /// Seeds a world of `config` into `store` (migrated) and uses the NATS server at `url`.
    pub async fn on(db: Option<TestDb>, store: Store, url: &str, config: WorldConfig) -> Fixture {
        let taxonomy = Taxonomy::synthetic(4, 3, 5);
        let world = World::new(&taxonomy, &config);
        seed::seed_named(&store, &world.tables, &world.names).await.expect("seed world");
        seed::seed_pipeline(&store, &PipelineSpec::antenna_test(PIPELINE)).await.expect("seed pipeline");
        let n = unique();
        let mut nats_args = NatsArgs::for_url(url);
        nats_args.results_stream = format!("TALLY_RESULTS_TEST_{n}");
        nats_args.results_subject_prefix = format!("test{n}.results");
        let client = async_nats::connect(url).await.unwrap_or_else(|e| panic!("NATS at {url}: {e}"));
        let js = jetstream::new(client.clone());
        // Results may be published before ingest starts: the stream must exist first.
        tally::ingest::nats::ensure_stream(&js, &nats_args, &Default::default()).await.expect("results stream");
        let factory = ResultFactory {
            species: world.species.clone(),
            keys: ResultKeys::antenna_test(PIPELINE),
            mean_detections: 3.0,
            score_len: 8,
            seed: 7,
        };
        Fixture { db, store, world, nats_args, client, js, factory, jobs: Vec::new() }
    }

    /// Creates an async job over `images` (in project 1) as Antenna does, through
    /// `tally::jobs::create` (a `jobs_job` row, stream `job_{id}`, consumer
    /// `job-{id}-consumer`, one task per image), then pulls every task as a worker would and
    /// returns `(image, reply_subject)` pairs.
    pub async fn job(&mut self, images: &[Id]) -> (i64, Vec<(Id, String)>) {
        use tally::jobs::create::{create, Images, JobSpec};
        use tally::jobs::logs::{JobLogs, JobLogsConfig};
        let job = unique() as i64;
        let mut spec = JobSpec::new(Images::List(images.to_vec()), PIPELINE);
        spec.id = Some(job);
        spec.project = Some(1);
        spec.name = Some("test job".into());
        let (logs, writer) = JobLogs::start(self.store.clone(), JobLogsConfig::default());
        let created = create(&self.store, &self.js, &logs, &spec).await.expect("create job");
        writer.shutdown().await;
        self.jobs.push(job);
        assert_eq!(created.tasks, images.len(), "one task per image");
        let consumer: consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(tally::jobs::consumer_name(job), tally::jobs::stream_name(job))
            .await
            .expect("job consumer");
        let tasks = tally_tools::synth::jobs::pull(&consumer, job, images.len()).await.expect("every task pulled");
        (job, tasks.into_iter().map(|t| (t.image, t.reply_subject)).collect())
    }

    /// An ingestor over the fixture's database (bootstrapped, one local worker), for tests
    /// that drive batches through it directly.
    pub async fn ingestor(&self) -> tally::ingest::batch::Ingestor {
        tally::ingest::batch::Ingestor::start(
            self.store.clone(),
            tally_dataflows::Topology::local(1),
            self.nats_args.results_subject_prefix.clone(),
            256 << 20,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("ingestor")
    }

    /// The subject results of `job` go to.
    pub fn subject(&self, job: i64) -> String {
        self.nats_args.results_subject(job)
    }

    /// Publishes `payload` to `job`'s results subject with `Nats-Msg-Id` = `msg_id`, and waits
    /// for the stream to store it (or drop it as a duplicate).
    pub async fn publish(&self, job: i64, msg_id: &str, payload: Vec<u8>) -> bool {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let ack = self
            .js
            .publish_with_headers(self.subject(job), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        !ack.duplicate
    }

    /// Starts ingest in-process through `tally::server::start`, as `tally serve --no-gateway`
    /// runs it, and waits until it is bootstrapped and consuming.
    pub async fn start(&self, args: IngestArgs) -> Running {
        self.start_with(args, DjangoCacheArgs::default()).await
    }

    /// Starts ingest in-process, invalidating Django's query cache described by `django` after
    /// commits.
    pub async fn start_with(&self, args: IngestArgs, django: DjangoCacheArgs) -> Running {
        self.start_config(args, django, true).await
    }

    /// Starts a second ingest loop on the same database, which `tally serve`'s ingest lock
    /// forbids: for the test that proves the progress writes exact without it.
    pub async fn start_unlocked(&self, args: IngestArgs) -> Running {
        self.start_config(args, DjangoCacheArgs::default(), false).await
    }

    async fn start_config(&self, args: IngestArgs, django: DjangoCacheArgs, ingest_lock: bool) -> Running {
        let (tx, acked) = mpsc::unbounded_channel();
        let mut config = Config::new(self.store.args.clone(), self.nats_args.clone());
        config.ingest = args;
        config.django_cache = django;
        config.gateway.no_gateway = true;
        // The job monitor's first pass comes one period after start: an hour keeps it out of
        // the tests, which check the queues it would delete.
        config.monitor.job_monitor_every = Duration::from_secs(3600);
        config.hooks = Hooks { acked: Some(tx) };
        config.ingest_lock = ingest_lock;
        let server = tally::server::start(config, CancellationToken::new())
            .await
            .expect("tally starts")
            .until_ready(Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("ingest did not become ready: {e:#}"));
        let health = Arc::clone(&server.health);
        Running { server, acked, health, saved: 0, dead: 0 }
    }

    /// `(num_pending, num_ack_pending)` of consumer `name` on `stream`.
    pub async fn consumer_state(&self, stream: &str, name: &str) -> (u64, usize) {
        let mut c: consumer::PullConsumer =
            self.js.get_consumer_from_stream(name, stream).await.expect("consumer exists");
        let info = c.info().await.expect("consumer info");
        (info.num_pending, info.num_ack_pending)
    }

    /// Deletes the streams this fixture created.
    pub async fn cleanup(&self) {
        let _ = self.js.delete_stream(&self.nats_args.results_stream).await;
        for job in &self.jobs {
            let _ = self.js.delete_stream(format!("job_{job}")).await;
        }
    }
}

/// Ingest running in-process.
pub struct Running {
    /// The daemon.
    pub server: tally::server::Running,
    /// Every batch's acks.
    pub acked: mpsc::UnboundedReceiver<Acked>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Results saved (acked) so far.
    pub saved: usize,
    /// Results dead-lettered so far.
    pub dead: usize,
}

impl Running {
    /// Waits until `saved` results were acked and `dead` dead-lettered in all, or panics after
    /// `timeout`.
    pub async fn wait_for(&mut self, saved: usize, dead: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.saved < saved || self.dead < dead {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.acked.recv()).await {
                Ok(Some(a)) => {
                    self.saved += a.reply_subjects.len();
                    self.dead += a.dead_lettered;
                }
                _ => panic!(
                    "timed out: {} of {saved} results acked, {} of {dead} dead-lettered (ready: {}, {})",
                    self.saved,
                    self.dead,
                    self.health.is_ready(),
                    self.health.reason()
                ),
            }
        }
    }

    /// Stops it (SIGTERM-like) and waits.
    pub async fn stop(self) {
        self.server.stop().await.expect("ingest stops cleanly");
    }
}

/// A world of `projects` × 2 deployments × 2 nights × `images` captures.
pub fn world(projects: usize, images: usize) -> WorldConfig {
    WorldConfig { projects, deployments_per_project: 2, events_per_deployment: 2, images_per_event: images }
}

/// What the rows of `images` must be after their results are saved (once or many times).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// Detections with a box.
    pub detections: i64,
    /// Null markers.
    pub null_markers: i64,
    /// Classifications.
    pub classifications: i64,
    /// Occurrences.
    pub occurrences: i64,
}

/// The rows the factory's results for `images` must produce, computed from the payloads alone:
/// one detection and occurrence per distinct box, one classification per distinct
/// (label, algorithm, score) of a box, a null marker for an image with no detection.
pub fn expected(f: &Fixture, images: &[Id]) -> Expected {
    use std::collections::{BTreeMap, BTreeSet};
    let mut e = Expected::default();
    for image in images {
        let r = f.factory.response(*image);
        let mut boxes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for d in r["detections"].as_array().expect("detections") {
            let b = &d["bbox"];
            let key = format!("{}", serde_json::json!([b["x1"], b["y1"], b["x2"], b["y2"]]));
            let set = boxes.entry(key).or_default();
            for c in d["classifications"].as_array().expect("classifications") {
                let score =
                    c["scores"].as_array().expect("scores").iter().filter_map(|s| s.as_f64()).fold(f64::MIN, f64::max);
                set.insert(format!("{}|{}|{}", c["classification"], c["algorithm"]["key"], score.to_bits()));
            }
        }
        if boxes.is_empty() {
            e.null_markers += 1;
        }
        e.detections += boxes.len() as i64;
        e.occurrences += boxes.len() as i64;
        e.classifications += boxes.values().map(|s| s.len() as i64).sum::<i64>();
    }
    e
}

/// The rows in the database.
pub async fn rows(store: &Store) -> Expected {
    let c = store.client().await.expect("client");
    let one = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.expect(sql).get::<_, i64>(0) }
    };
    Expected {
        detections: one("SELECT count(*) FROM main_detection WHERE bbox IS NOT NULL").await,
        null_markers: one("SELECT count(*) FROM main_detection WHERE bbox IS NULL").await,
        classifications: one("SELECT count(*) FROM main_classification").await,
        occurrences: one("SELECT count(*) FROM main_occurrence").await,
    }
}

/// Panics unless every stored count equals its SQL definition.
pub async fn assert_counts_exact(store: &Store) {
    let v = tally::store::verify::verify(store, tally::store::verify::Scope::default()).await.expect("verify");
    assert!(
        v.differences.is_empty(),
        "stored counts differ from their SQL definition: {:?}",
        &v.differences[..v.differences.len().min(10)]
    );
    assert!(!v.expected.events.is_empty());
}

/// Panics unless every image of `job` (`images`, all of the fixture's) was saved through
/// ingest exactly: the rows their payloads make (`what`, the message when they differ),
/// every count equal to its SQL definition, the job finished as `SUCCESS` with exact
/// progress, and every result acked.
pub async fn assert_job_saved_exactly(f: &Fixture, job: i64, images: &[i64], what: &str) {
    assert_eq!(rows(&f.store).await, expected(f, images), "{what}");
    assert_counts_exact(&f.store).await;
    let e = expected(f, images);
    assert_eq!(
        job_progress(&f.store, job).await,
        ("SUCCESS".to_string(), images.len() as i64, 0, e.detections, e.classifications)
    );
    assert_eq!(f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await, (0, 0), "every result acked");
}

/// A job's `progress` as Antenna's `MLJob.run` leaves it after collecting `total` images.
pub fn antenna_progress(total: usize) -> serde_json::Value {
    let empty =
        |name: &str| serde_json::json!({"name": name, "key": name.to_lowercase(), "category": "default", "value": ""});
    serde_json::json!({
        "summary": {"status": "STARTED", "progress": 0.3333},
        "stages": [
            {"key": "collect", "name": "Collect", "status": "SUCCESS", "progress": 1.0,
             "params": [{"name": "Total Images", "key": "total_images", "category": "default", "value": total}]},
            {"key": "process", "name": "Process", "status": "CREATED", "progress": 0.0,
             "params": [empty("Processed"), empty("Remaining"), empty("Failed")]},
            {"key": "results", "name": "Results", "status": "CREATED", "progress": 0.0,
             "params": [empty("Captures"), empty("Detections"), empty("Classifications")]}
        ],
        "errors": [], "logs": []
    })
}

/// `(status, processed, failed, detections, classifications)` of a job as Django would read
/// them from `jobs_job`.
pub async fn job_progress(store: &Store, job: i64) -> (String, i64, i64, i64, i64) {
    let c = store.client().await.expect("client");
    let r = c.query_one("SELECT status, progress FROM jobs_job WHERE id = $1", &[&job]).await.expect("job");
    let progress: serde_json::Value = r.get(1);
    let param = |stage: &str, key: &str| -> i64 {
        progress["stages"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["key"] == stage))
            .and_then(|s| s["params"].as_array()?.iter().find(|p| p["key"] == key)?["value"].as_i64())
            .unwrap_or(-1)
    };
    (
        r.get(0),
        param("process", "processed"),
        param("process", "failed"),
        param("results", "detections"),
        param("results", "classifications"),
    )
}

/// A job's task queue as Antenna leaves it: stream `job_{id}` (replacing one of that name),
/// durable consumer `job-{id}-consumer` with `max_deliver` and `ack_wait`, and one task per
/// image in Antenna's body. No task is pulled.
pub async fn antenna_queue(js: &jetstream::Context, job: i64, images: &[Id], max_deliver: i64, ack_wait: Duration) {
    let name = tally::jobs::stream_name(job);
    let _ = js.delete_stream(&name).await;
    js.create_stream(stream::Config {
        name,
        subjects: vec![format!("job.{job}.tasks")],
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("job stream");
    antenna_consumer(js, job, max_deliver, ack_wait).await;
    for image in images {
        let task = serde_json::json!({"id": image.to_string(), "image_id": image.to_string(),
                                      "image_url": format!("https://example.org/{image}.jpg"), "reply_subject": null});
        js.publish(format!("job.{job}.tasks"), serde_json::to_vec(&task).expect("json").into())
            .await
            .expect("publish task")
            .await
            .expect("task stored");
    }
}

/// (Re)creates job `job`'s consumer with `max_deliver` and `ack_wait` (Antenna's other
/// settings), replacing the one there.
pub async fn antenna_consumer(js: &jetstream::Context, job: i64, max_deliver: i64, ack_wait: Duration) {
    let s = js.get_stream(tally::jobs::stream_name(job)).await.expect("job stream");
    let _ = s.delete_consumer(&tally::jobs::consumer_name(job)).await;
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(tally::jobs::consumer_name(job)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver,
        max_ack_pending: 1000,
        filter_subject: format!("job.{job}.tasks"),
        ..Default::default()
    })
    .await
    .expect("job consumer");
}

/// A parameter of a stage of a job's `progress` (`Null` when absent).
pub fn progress_param(progress: &serde_json::Value, stage: &str, key: &str) -> serde_json::Value {
    progress["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["key"] == stage))
        .and_then(|s| s["params"].as_array()?.iter().find(|p| p["key"] == key).map(|p| p["value"].clone()))
        .unwrap_or(serde_json::Value::Null)
}
