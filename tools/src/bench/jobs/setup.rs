//! The scratch world of `tally-tools bench jobs`: a database seeded with a synthetic world (one
//! project filtered on half the families, two deployments), the pipeline and a worker's API
//! token; and async jobs created through [`tally::jobs::create`] exactly as `tally job create`
//! creates them, with ids no other run or test uses on the shared NATS server.

use std::time::Instant;

use anyhow::Context;
use async_nats::jetstream;
use futures_util::future::try_join_all;
use indicatif::ProgressBar;
use rand::Rng;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::Id;

use crate::synth::results::{ResultFactory, ResultKeys, World, WorldConfig};
use tally::jobs::create::{create, Images, JobSpec};
use tally::jobs::logs::{JobLogs, JobLogsConfig};
use tally::store::seed::{self, PipelineSpec};
use tally::store::{self, Store};

/// The pipeline every job runs.
pub const PIPELINE: &str = "tally-bench-jobs-pipeline";

/// Nights per deployment, and deployments, in the world.
const NIGHTS: usize = 5;
const DEPLOYMENTS: usize = 2;

/// Job ids of a run: `5e9 + (pid mod 100,000) × 1,000 + n`, above every test's and
/// `tally-tools bench ingest`'s range, distinct per process (job ids name NATS streams).
pub const JOB_ID_BASE: i64 = 5_000_000_000;

/// Jobs a run may create (phase 1 and phase 2 together), so that ids stay in the run's range.
pub const MAX_JOBS: usize = 1_000;

/// The first job id of this process's run.
pub fn first_job_id() -> i64 {
    JOB_ID_BASE + i64::from(std::process::id() % 100_000) * 1_000
}

/// What was seeded.
pub struct Seeded {
    /// Every capture, in capture order; jobs take consecutive slices.
    pub images: Vec<Id>,
    /// The simulated model's results for the world's species.
    pub factory: ResultFactory,
    /// The worker's API token.
    pub token: String,
    /// Taxa in the taxonomy.
    pub taxa: usize,
    /// Seconds seeding took.
    pub seconds: f64,
}

/// What shapes the results.
pub struct Model {
    /// Mean detections per image (Poisson).
    pub mean_detections: f64,
    /// Length of the species classifier's score and logit vectors.
    pub score_len: usize,
    /// Seed of the results.
    pub seed: u64,
}

/// Migrates `store`'s (empty) database and seeds a world of at least `images` captures over
/// `taxonomy`, the pipeline and a superuser's token.
pub async fn seed_world(store: &Store, taxonomy: &Taxonomy, images: usize, model: &Model) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    store::migrate::migrate(store).await?;
    let config = WorldConfig {
        projects: 1,
        deployments_per_project: DEPLOYMENTS,
        events_per_deployment: NIGHTS,
        images_per_event: images.div_ceil(DEPLOYMENTS * NIGHTS).max(1),
    };
    let world = World::new(taxonomy, &config);
    seed::seed_named(store, &world.tables, &world.names).await?;
    seed::seed_pipeline(store, &PipelineSpec::antenna_test(PIPELINE)).await?;
    let token: String = {
        let mut rng = rand::rng();
        (0..40).map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)])).collect()
    };
    let client = store.client().await?;
    client
        .batch_execute(
            "INSERT INTO users_user (id, password, is_superuser, email, is_staff, is_active, date_joined, name)
             VALUES (1, '', true, 'bench-worker@example.org', true, true, now(), 'bench worker')",
        )
        .await
        .context("creating the worker's user")?;
    client
        .execute("INSERT INTO authtoken_token (key, created, user_id) VALUES ($1, now(), 1)", &[&token])
        .await
        .context("creating the worker's token")?;
    client.batch_execute("VACUUM ANALYZE").await?;
    let factory = ResultFactory {
        species: world.species.clone(),
        keys: ResultKeys::antenna_test(PIPELINE),
        mean_detections: model.mean_detections,
        score_len: model.score_len.max(1),
        seed: model.seed,
    };
    Ok(Seeded {
        images: world.images,
        factory,
        token,
        taxa: taxonomy.taxa.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A job of the run.
#[derive(Clone, Debug)]
pub struct BenchJob {
    /// `jobs_job.id`.
    pub id: i64,
    /// Its images, one task each.
    pub images: Vec<i64>,
}

/// Creates one job per image set, all at once, as `tally job create --images …` does (Antenna's
/// queue settings); ids are `first_id`, `first_id + 1`, …. Returns the jobs and the seconds
/// creation took.
pub async fn create_jobs(
    store: &Store,
    js: &jetstream::Context,
    sets: Vec<Vec<Id>>,
    first_id: i64,
    label: &str,
    bar: &ProgressBar,
) -> anyhow::Result<(Vec<BenchJob>, f64)> {
    let started = Instant::now();
    let (logs, writer) = JobLogs::start(store.clone(), JobLogsConfig::default());
    let jobs: Vec<BenchJob> = sets
        .into_iter()
        .enumerate()
        .map(|(n, images)| BenchJob { id: first_id + n as i64, images: images.to_vec() })
        .collect();
    let created = try_join_all(jobs.iter().map(|job| {
        let logs = &logs;
        async move {
            let mut spec = JobSpec::new(Images::List(job.images.clone()), PIPELINE);
            spec.id = Some(job.id);
            spec.project = Some(1);
            spec.name = Some(format!("{label} job {}", job.id - first_id + 1));
            let created = create(store, js, logs, &spec).await.with_context(|| format!("creating job {}", job.id))?;
            anyhow::ensure!(
                created.tasks == job.images.len(),
                "job {}: {} of {} tasks published",
                job.id,
                created.tasks,
                job.images.len()
            );
            bar.inc(1);
            anyhow::Ok(())
        }
    }))
    .await;
    writer.shutdown().await;
    created?;
    Ok((jobs, started.elapsed().as_secs_f64()))
}
