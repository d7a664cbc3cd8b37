//! Antenna-style async ML jobs for benchmarks and tests: a `jobs_job` row, the job's JetStream
//! stream `job_{id}` and durable consumer `job-{id}-consumer` with one task per image (all
//! through [`tally::jobs::row`] and [`tally::jobs::queue`], the one implementation), and the
//! tasks pulled back as a worker pulls them, so that every result answers a real ack subject
//! (`../shared/antenna/jobs-protocol.md` §1).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::stream::StreamExt;
use tally_dataflows::Id;
use thiserror::Error;

use tally::jobs::create::{self, MISSING_URL_BASE};
use tally::jobs::queue::{self, QueueSettings, TaskBody, PUBLISH_FANOUT};
use tally::jobs::row::{self, NewJob};
use tally::jobs::JobError;
use tally::store::{Store, StoreError};

/// Antenna's `NATS_MAX_ACK_PENDING`: tasks of one job a worker may hold unacked. Callers that
/// want Antenna's configuration split their images into jobs of at most this many.
pub const ANTENNA_MAX_ACK_PENDING: usize = queue::MAX_ACK_PENDING as usize;

/// Tasks asked for per pull request.
const PULL_BATCH: usize = 500;

/// Errors while setting up a job.
#[derive(Debug, Error)]
pub enum JobSetupError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(String),
    /// Fewer tasks came back than were published.
    #[error("job {job}: pulled {pulled} of {expected} tasks")]
    Missing {
        /// The job.
        job: i64,
        /// Tasks pulled.
        pulled: usize,
        /// Tasks published.
        expected: usize,
    },
}

impl From<tokio_postgres::Error> for JobSetupError {
    fn from(e: tokio_postgres::Error) -> Self {
        JobSetupError::Store(StoreError::Db(e))
    }
}

impl From<JobError> for JobSetupError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Store(e) => JobSetupError::Store(e),
            other => JobSetupError::Nats(other.to_string()),
        }
    }
}

fn nats(what: &str, e: impl std::fmt::Display) -> JobSetupError {
    JobSetupError::Nats(format!("{what}: {e}"))
}

/// A task a worker holds: the image to process and the subject that acks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The image.
    pub image: Id,
    /// JetStream's delivery reply subject (`$JS.ACK.job_{id}.job-{id}-consumer.…`).
    pub reply_subject: String,
}

/// An async ML job as Antenna creates it (`dispatch_mode = 'async_api'`, status `STARTED`).
#[derive(Debug, Clone)]
pub struct AsyncJob {
    /// `jobs_job.id`; also names the stream, so it must be unique on the NATS server.
    pub id: i64,
    /// `jobs_job.project_id`.
    pub project: i64,
    /// `jobs_job.pipeline_id`.
    pub pipeline: i64,
}

impl AsyncJob {
    /// The job's task stream.
    pub fn stream_name(&self) -> String {
        tally::jobs::stream_name(self.id)
    }

    /// The subject tasks are published on.
    pub fn tasks_subject(&self) -> String {
        tally::jobs::tasks_subject(self.id)
    }

    /// Inserts the `jobs_job` row as Antenna's `Job.setup()` leaves it (images not collected
    /// yet, so ingest records progress but never completes the job), every NOT NULL column
    /// supplied as Django would.
    pub async fn insert(&self, store: &Store) -> Result<(), JobSetupError> {
        let client = store.client().await?;
        let job = NewJob {
            id: Some(self.id),
            name: format!("ml job {}", self.id),
            project: self.project,
            pipeline: self.pipeline,
            deployment: None,
            limit: None,
            total: None,
        };
        row::insert_job(&client, &job).await?;
        Ok(())
    }

    /// Creates the job's stream (replacing a stale one of the same name) and its consumer,
    /// publishes one task per image and pulls every task back without acking it. `ack_wait`
    /// must outlast the caller's use of the tasks, or JetStream redelivers them.
    pub async fn dispatch(
        &self,
        js: &jetstream::Context,
        images: &[Id],
        ack_wait: Duration,
    ) -> Result<Vec<Task>, JobSetupError> {
        let settings = QueueSettings {
            ack_wait,
            max_deliver: queue::MAX_DELIVER,
            max_ack_pending: images.len().max(ANTENNA_MAX_ACK_PENDING) as i64,
            max_age: ack_wait * 2,
        };
        let (consumer, _) = queue::ensure(js, self.id, &settings).await?;
        let mut bodies = Vec::with_capacity(images.len());
        for &image in images {
            // The path `store::seed` gives every synthetic image.
            let url = create::image_url(image, None, &format!("image/{image}.jpg"), MISSING_URL_BASE)?;
            bodies.push(TaskBody::new(image, url));
        }
        let report = queue::publish(js, self.id, &bodies, PUBLISH_FANOUT).await;
        if let Some((image, e)) = report.failed.first() {
            return Err(nats(&format!("publish task of image {image}"), e));
        }
        pull(&consumer, self.id, images.len()).await
    }

    /// Deletes the job's stream (and with it the consumer), as Antenna's cleanup does.
    pub async fn delete_stream(&self, js: &jetstream::Context) {
        let _ = js.delete_stream(self.stream_name()).await;
    }
}

/// Pulls `expected` tasks of job `job` from `consumer` as a worker would, without acking them.
pub async fn pull(consumer: &consumer::PullConsumer, job: i64, expected: usize) -> Result<Vec<Task>, JobSetupError> {
    let mut tasks = Vec::with_capacity(expected);
    while tasks.len() < expected {
        let want = (expected - tasks.len()).min(PULL_BATCH);
        let mut batch = consumer
            .fetch()
            .max_messages(want)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| nats("fetch tasks", e))?;
        let before = tasks.len();
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| nats("task", e))?;
            let image = serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|t| t["image_id"].as_str().and_then(|s| s.parse().ok()));
            if let (Some(image), Some(reply)) = (image, m.reply.as_ref()) {
                tasks.push(Task { image, reply_subject: reply.to_string() });
            }
        }
        if tasks.len() == before {
            break;
        }
    }
    if tasks.len() != expected {
        return Err(JobSetupError::Missing { job, pulled: tasks.len(), expected });
    }
    Ok(tasks)
}
