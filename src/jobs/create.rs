//! Creating an async ML job as Antenna does (jobs-protocol.md §1.3): `Job.setup()` and
//! `MLJob.run` up to `queue_images_to_nats`, so that a database without Django can run end to
//! end: a `jobs_job` row (`dispatch_mode = 'async_api'`, STARTED, the `collect` stage done;
//! [`super::row`]), its image set in `tally.job_task` (read by [`super::lost`]), the job's
//! stream and consumer ([`super::queue`]), and one task per image published concurrently; job
//! log lines as Antenna writes them, through [`JobLogs`].
//!
//! Images come from a deployment, in Antenna's order (`SourceImage.Meta.ordering`: event
//! start, then capture time), optionally limited, or from an explicit list in its order.
//! Two deliberate differences: `collect.total_images` is the number of images queued (Antenna
//! writes the count before `--limit`; tally's progress divides by this number), and an image
//! without `public_base_url` gets a URL under [`MISSING_URL_BASE`] instead of failing the job.
//! Antenna also skips images a pipeline already processed; tally queues every image chosen.

use crate::jobs::state::JobState;
use std::time::Instant;

use async_nats::jetstream;
use serde::Serialize;
use tokio_postgres::Client;
use tracing::info;

use super::logs::JobLogs;
use super::queue::{self, QueueSettings, TaskBody, PUBLISH_FANOUT};
use super::row::{fail, insert_job, NewJob};
use super::{consumer_name, stream_name, tasks_subject, JobError};
use crate::store::Store;

/// Base URL for images whose `public_base_url` is NULL (seeded or synthetic data): the
/// reserved `.invalid` domain never resolves, so a real worker reports the image as failed
/// rather than fetching something else.
pub const MISSING_URL_BASE: &str = "https://no-public-base-url.invalid/";

/// Which images a job processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Images {
    /// The deployment's images in Antenna's order, the first `limit` when given.
    Deployment {
        /// `main_deployment.id`.
        id: i64,
        /// At most this many (`jobs_job.limit`).
        limit: Option<i64>,
    },
    /// These images, in this order (repeats dropped).
    List(Vec<i64>),
}

/// What to create.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The images.
    pub images: Images,
    /// `ml_pipeline.slug`.
    pub pipeline: String,
    /// `jobs_job.project_id`; by default the deployment's, or the images' single project.
    pub project: Option<i64>,
    /// `jobs_job.id`; by default the table's identity. Tests and benchmarks pass ids that are
    /// unique on a NATS server shared by many databases.
    pub id: Option<i64>,
    /// `jobs_job.name`; by default one that names the pipeline and the images.
    pub name: Option<String>,
    /// The stream's and consumer's settings.
    pub queue: QueueSettings,
    /// Base URL for images without `public_base_url`.
    pub missing_url_base: String,
}

impl JobSpec {
    /// A job of `pipeline` over `images`, with Antenna's queue settings.
    pub fn new(images: Images, pipeline: impl Into<String>) -> Self {
        JobSpec {
            images,
            pipeline: pipeline.into(),
            project: None,
            id: None,
            name: None,
            queue: QueueSettings::default(),
            missing_url_base: MISSING_URL_BASE.into(),
        }
    }
}

/// The job created.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedJob {
    /// `jobs_job.id`.
    pub id: i64,
    /// `jobs_job.name`.
    pub name: String,
    /// `STARTED`, or `SUCCESS` for a job without images.
    pub status: String,
    /// `jobs_job.project_id`.
    pub project: i64,
    /// The pipeline's slug.
    pub pipeline: String,
    /// `jobs_job.deployment_id`.
    pub deployment: Option<i64>,
    /// Tasks published (one per image).
    pub tasks: usize,
    /// The stream (`None` without images: nothing to queue).
    pub stream: Option<String>,
    /// The subject tasks are published on.
    pub subject: String,
    /// The durable consumer.
    pub consumer: String,
    /// Consumer `ack_wait` in seconds.
    pub ack_wait_seconds: u64,
    /// Consumer `max_deliver`.
    pub max_deliver: i64,
    /// Consumer `max_ack_pending`.
    pub max_ack_pending: i64,
    /// A stream of the same name was left by an earlier job and deleted.
    pub replaced_stale_stream: bool,
    /// Seconds spent publishing.
    pub publish_seconds: f64,
}

/// Creates the job of `spec`: row, queue, tasks, log lines (queued on `logs`). Nothing is
/// written when the pipeline, deployment or an image is unknown. When the queue cannot be
/// set up or a task cannot be published, the job is marked FAILURE (as Antenna's
/// `MLJob.run` does) and the error returned.
pub async fn create(
    store: &Store,
    js: &jetstream::Context,
    logs: &JobLogs,
    spec: &JobSpec,
) -> Result<CreatedJob, JobError> {
    let client = store.client().await?;
    let pipeline: i64 = client
        .query_opt("SELECT id FROM ml_pipeline WHERE slug = $1", &[&spec.pipeline])
        .await?
        .ok_or_else(|| JobError::UnknownPipeline(spec.pipeline.clone()))?
        .try_get(0)?;
    let chosen = collect(&client, spec).await?;
    let n = chosen.tasks.len();
    let limit = match spec.images {
        Images::Deployment { limit, .. } => limit,
        Images::List(_) => None,
    };
    let name = spec.name.clone().unwrap_or_else(|| match spec.images {
        Images::Deployment { id, .. } => format!("{} on deployment {id}", spec.pipeline),
        Images::List(_) => format!("{} on {n} images", spec.pipeline),
    });
    let new = NewJob {
        id: spec.id,
        name: name.clone(),
        project: chosen.project,
        pipeline,
        deployment: chosen.deployment,
        limit,
        total: Some(n as i64),
    };
    let id = insert_job(&client, &new).await?;
    let images: Vec<i64> = chosen.tasks.iter().filter_map(|t| t.image_id.parse().ok()).collect();
    if let Err(e) = record_images(&client, id, &images).await {
        logs.error(id, format!("Failed to record the images of job '{id}': {e}"));
        fail(&client, id).await?;
        return Err(e);
    }
    info!(job_id = id, images = n, pipeline = %spec.pipeline, "job created");
    let mut created = CreatedJob {
        id,
        name,
        status: JobState::Started.as_str().into(),
        project: chosen.project,
        pipeline: spec.pipeline.clone(),
        deployment: chosen.deployment,
        tasks: 0,
        stream: None,
        subject: tasks_subject(id),
        consumer: consumer_name(id),
        ack_wait_seconds: spec.queue.ack_wait.as_secs(),
        max_deliver: spec.queue.max_deliver,
        max_ack_pending: spec.queue.max_ack_pending,
        replaced_stale_stream: false,
        publish_seconds: 0.0,
    };
    if let Some(limit) = limit.filter(|_| chosen.available > n as i64) {
        logs.warning(id, format!("Limiting number of images to {limit} (out of {})", chosen.available));
    }
    if n == 0 {
        logs.info(id, format!("No images to process: job {id} finished"));
        created.status = JobState::Success.as_str().into();
        return Ok(created);
    }
    logs.info(id, format!("Queuing {n} images to NATS stream for job '{id}'"));
    let replaced = match queue::ensure(js, id, &spec.queue).await {
        Ok((_, replaced)) => replaced,
        Err(e) => {
            logs.error(id, format!("Failed to set up NATS stream/consumer for job '{id}': {e}"));
            fail(&client, id).await?;
            return Err(e);
        }
    };
    if replaced {
        logs.info(id, format!("Deleted stale NATS stream {} left by an earlier job with this id", stream_name(id)));
    }
    logs.info(id, format!("Created NATS stream {}", stream_name(id)));
    logs.info(
        id,
        format!(
            "Created NATS consumer {} (max_deliver={}, ack_wait={}s, max_ack_pending={}, deliver_policy=all, \
             ack_policy=explicit)",
            consumer_name(id),
            spec.queue.max_deliver,
            spec.queue.ack_wait.as_secs(),
            spec.queue.max_ack_pending
        ),
    );
    let started = Instant::now();
    let report = queue::publish(js, id, &chosen.tasks, PUBLISH_FANOUT).await;
    created.publish_seconds = started.elapsed().as_secs_f64();
    created.tasks = report.published;
    created.stream = Some(stream_name(id));
    created.replaced_stale_stream = replaced;
    if let Some((_, first)) = report.failed.first() {
        for (image, e) in report.failed.iter().take(10) {
            logs.error(id, format!("Failed to queue image {image} to stream for job '{id}': {e}"));
        }
        logs.warning(id, format!("Failed to queue {}/{n} images to stream for job '{id}'", report.failed.len()));
        logs.error(id, format!("Aborting job {id} because images could not be queued to NATS"));
        fail(&client, id).await?;
        return Err(JobError::PublishFailed { job: id, failed: report.failed.len(), total: n, first: first.clone() });
    }
    logs.info(id, format!("Successfully queued {n}/{n} images to stream for job '{id}'"));
    info!(job_id = id, tasks = n, seconds = created.publish_seconds, "tasks published");
    Ok(created)
}

/// Records the images of job `id` in `tally.job_task` (before any task is published), so that
/// the job monitor knows exactly which images a stalled job never got a result for.
async fn record_images(client: &Client, id: i64, images: &[i64]) -> Result<(), JobError> {
    client
        .execute(
            "INSERT INTO tally.job_task (job_id, image_id) SELECT $1, unnest($2::int8[]) ON CONFLICT DO NOTHING",
            &[&id, &images],
        )
        .await?;
    Ok(())
}

/// The images chosen, with the job's project.
struct Chosen {
    tasks: Vec<TaskBody>,
    project: i64,
    deployment: Option<i64>,
    /// Images available before the limit.
    available: i64,
}

async fn collect(client: &Client, spec: &JobSpec) -> Result<Chosen, JobError> {
    let base = spec.missing_url_base.as_str();
    match &spec.images {
        Images::Deployment { id, limit } => {
            let row = client
                .query_opt("SELECT project_id FROM main_deployment WHERE id = $1", &[id])
                .await?
                .ok_or(JobError::UnknownDeployment(*id))?;
            let project = spec
                .project
                .or(row.try_get(0)?)
                .ok_or_else(|| JobError::NoProject(format!("deployment {id} has no project")))?;
            let available: i64 = client
                .query_one("SELECT count(*) FROM main_sourceimage WHERE deployment_id = $1", &[id])
                .await?
                .try_get(0)?;
            // Django orders by `SourceImage.Meta.ordering` = (deployment, event, timestamp), an
            // event by its `start`; ascending order puts NULLs last, as Postgres does for Django.
            let rows = client
                .query(
                    "SELECT i.id, i.public_base_url, i.path FROM main_sourceimage i
                     LEFT JOIN main_event e ON e.id = i.event_id
                     WHERE i.deployment_id = $1
                     ORDER BY e.start, i.\"timestamp\", i.id LIMIT $2",
                    &[id, limit],
                )
                .await?;
            let mut tasks = Vec::with_capacity(rows.len());
            for r in rows {
                let image: i64 = r.try_get(0)?;
                tasks.push(TaskBody::new(image, image_url(image, r.try_get(1)?, r.try_get(2)?, base)?));
            }
            Ok(Chosen { tasks, project, deployment: Some(*id), available })
        }
        Images::List(ids) => {
            let mut order = Vec::with_capacity(ids.len());
            for id in ids {
                if !order.contains(id) {
                    order.push(*id);
                }
            }
            let rows = client
                .query(
                    "SELECT i.id, i.public_base_url, i.path, coalesce(i.project_id, d.project_id)
                     FROM main_sourceimage i LEFT JOIN main_deployment d ON d.id = i.deployment_id
                     WHERE i.id = ANY($1)",
                    &[&order],
                )
                .await?;
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            let mut projects = std::collections::BTreeSet::new();
            for r in rows {
                let image: i64 = r.try_get(0)?;
                let url = image_url(image, r.try_get(1)?, r.try_get(2)?, base)?;
                projects.extend(r.try_get::<_, Option<i64>>(3)?);
                found.insert(image, url);
            }
            let missing: Vec<i64> = order.iter().copied().filter(|i| !found.contains_key(i)).collect();
            if !missing.is_empty() {
                return Err(JobError::UnknownImages(missing));
            }
            let project = match (spec.project, projects.len()) {
                (Some(p), _) => p,
                (None, 1) => projects.into_iter().next().unwrap_or_default(),
                (None, 0) => return Err(JobError::NoProject("the images have no project".into())),
                (None, _) => return Err(JobError::MixedProjects(projects.into_iter().collect())),
            };
            let tasks =
                order.iter().filter_map(|i| found.remove(i).map(|url| TaskBody::new(*i, url))).collect::<Vec<_>>();
            let available = tasks.len() as i64;
            Ok(Chosen { tasks, project, deployment: None, available })
        }
    }
}

/// The URL a worker downloads image `image` from: Antenna's `SourceImage.build_public_url`
/// (`urljoin(public_base_url, path.lstrip("/"))`), under `missing_base` when the image has no
/// base URL. Like Antenna, a result without a host is refused.
pub fn image_url(
    image: i64,
    public_base_url: Option<&str>,
    path: &str,
    missing_base: &str,
) -> Result<String, JobError> {
    let base = public_base_url.filter(|b| !b.trim().is_empty()).unwrap_or(missing_base);
    let bad = |reason: String| JobError::BadUrl { image, base: base.into(), path: path.into(), reason };
    let url =
        url::Url::parse(base).and_then(|b| b.join(path.trim_start_matches('/'))).map_err(|e| bad(e.to_string()))?;
    if !url.has_host() {
        return Err(bad("no host".into()));
    }
    Ok(url.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_as_antenna_does() {
        let url = |base: Option<&str>, path: &str| image_url(7, base, path, MISSING_URL_BASE).ok();
        assert_eq!(
            url(Some("https://s3.org/bucket/"), "/2026/a.jpg").as_deref(),
            Some("https://s3.org/bucket/2026/a.jpg")
        );
        // urljoin replaces the last segment of a base without a trailing slash.
        assert_eq!(url(Some("https://s3.org/bucket"), "a.jpg").as_deref(), Some("https://s3.org/a.jpg"));
        assert_eq!(url(None, "image/7.jpg").as_deref(), Some("https://no-public-base-url.invalid/image/7.jpg"));
        assert_eq!(url(Some(""), "a.jpg").as_deref(), Some("https://no-public-base-url.invalid/a.jpg"));
        assert!(url(Some("not a url"), "a.jpg").is_none());
    }
}
