//! Antenna-style async ML jobs for benchmarks: a `jobs_job` row, the job's JetStream stream
//! `job_{id}` and durable consumer `job-{id}-consumer` with one task per image, and the tasks
//! pulled back as a worker pulls them, so that every result answers a real ack subject
//! (`../shared/antenna/jobs-protocol.md` §1).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::stream::{self as fstream, StreamExt};
use tally_dataflows::Id;
use thiserror::Error;

use crate::store::{Store, StoreError};

/// Antenna's `NATS_MAX_ACK_PENDING`: tasks of one job a worker may hold unacked. Callers that
/// want Antenna's configuration split their images into jobs of at most this many.
pub const ANTENNA_MAX_ACK_PENDING: usize = 1000;

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
        format!("job_{}", self.id)
    }

    /// The subject tasks are published on.
    pub fn tasks_subject(&self) -> String {
        format!("job.{}.tasks", self.id)
    }

    /// Inserts the `jobs_job` row, every NOT NULL column supplied as Django would.
    pub async fn insert(&self, store: &Store) -> Result<(), JobSetupError> {
        let client = store.client().await?;
        client
            .execute(
                "INSERT INTO jobs_job (id, created_at, updated_at, name, queue, status, progress, project_id, delay,
                                       shuffle, job_type_key, logs, dispatch_mode, pipeline_id)
                 VALUES ($1, now(), now(), $4, 'default', 'STARTED', '{}', $2, 0, false, 'ml',
                         '{\"stdout\": [], \"stderr\": []}', 'async_api', $3)",
                &[&self.id, &self.project, &self.pipeline, &format!("ml job {}", self.id)],
            )
            .await?;
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
        let _ = js.delete_stream(self.stream_name()).await;
        let s = js
            .create_stream(stream::Config {
                name: self.stream_name(),
                subjects: vec![self.tasks_subject()],
                max_age: ack_wait * 2,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("job stream", e))?;
        let consumer: consumer::PullConsumer = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("job-{}-consumer", self.id)),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: 2,
                max_ack_pending: images.len().max(ANTENNA_MAX_ACK_PENDING) as i64,
                filter_subject: self.tasks_subject(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("job consumer", e))?;

        let subject = self.tasks_subject();
        let published: Vec<Result<(), JobSetupError>> = fstream::iter(images)
            .map(|image| {
                let body = serde_json::json!({"id": image.to_string(), "image_id": image.to_string(),
                                              "image_url": format!("https://example.org/captures/{image}.jpg"),
                                              "reply_subject": null});
                let (js, subject) = (js.clone(), subject.clone());
                async move {
                    let payload = serde_json::to_vec(&body).unwrap_or_default();
                    let ack = js.publish(subject, payload.into()).await.map_err(|e| nats("publish task", e))?;
                    ack.await.map_err(|e| nats("task stored", e))?;
                    Ok(())
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        published.into_iter().collect::<Result<(), _>>()?;

        let mut tasks = Vec::with_capacity(images.len());
        while tasks.len() < images.len() {
            let want = (images.len() - tasks.len()).min(PULL_BATCH);
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
        if tasks.len() != images.len() {
            return Err(JobSetupError::Missing { job: self.id, pulled: tasks.len(), expected: images.len() });
        }
        Ok(tasks)
    }

    /// Deletes the job's stream (and with it the consumer), as Antenna's cleanup does.
    pub async fn delete_stream(&self, js: &jetstream::Context) {
        let _ = js.delete_stream(self.stream_name()).await;
    }
}
