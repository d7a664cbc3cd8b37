//! Jobs (SPEC §5): creating async ML jobs as Antenna does, their status and cancellation,
//! exact progress from the durable per-job image set, and buffered job logs.
//!
//! - [`create`]: a `jobs_job` row, the job's JetStream stream and consumer, one task per image.
//! - [`status`]: what a job's row, image set and task queue say now.
//! - [`cancel`]: Antenna's `Job.cancel`: guarded move to REVOKED, then the queue is deleted.
//! - [`progress`]: the `process` and `results` stages, written by ingest.
//! - [`queue`]: a job's JetStream stream and consumer, its tasks, their state and deletion.
//! - [`state`]: Antenna's `JobState`, the statuses above as an enum.
//! - [`row`]: the `jobs_job` row and its `progress` JSON as Antenna writes them.
//! - [`logs`]: `jobs_joblog` lines, written in batches off the hot path.
//! - [`monitor`]: the periodic pass of `tally serve` that runs [`lost`] (images whose tasks
//!   are exhausted or gone are marked failed, so every job finishes) and [`cleanup`] (finished
//!   jobs' consumers and streams deleted).

pub mod cancel;
pub mod cleanup;
pub mod create;
pub mod logs;
pub mod lost;
pub mod monitor;
pub mod progress;
pub mod queue;
pub mod row;
pub mod state;
pub mod status;

use thiserror::Error;

use crate::store::StoreError;

/// Errors of the job commands (create, status, cancel).
#[derive(Debug, Error)]
pub enum JobError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NATS failed while doing `what`.
    #[error("nats: {what}: {source}")]
    Nats {
        /// What tally was doing.
        what: String,
        /// The client's error.
        #[source]
        source: crate::BoxError,
    },
    /// No job has this id.
    #[error("no job {0}")]
    NotFound(i64),
    /// No pipeline has this slug.
    #[error("no pipeline with slug {0:?} in ml_pipeline")]
    UnknownPipeline(String),
    /// No deployment has this id.
    #[error("no deployment {0}")]
    UnknownDeployment(i64),
    /// Some of the images asked for do not exist.
    #[error("no such images: {0:?}")]
    UnknownImages(Vec<i64>),
    /// The job's project could not be derived (`jobs_job.project_id` is NOT NULL).
    #[error("cannot tell the job's project: {0}; pass one explicitly")]
    NoProject(String),
    /// The images belong to more than one project.
    #[error("the images belong to projects {0:?}; pass one explicitly")]
    MixedProjects(Vec<i64>),
    /// An image's URL cannot be built.
    #[error("image {image}: no valid URL from base {base:?} and path {path:?}: {reason}")]
    BadUrl {
        /// The image.
        image: i64,
        /// The base URL tried.
        base: String,
        /// The image's path.
        path: String,
        /// Why it is not a URL.
        reason: String,
    },
    /// Some tasks could not be published; the job was marked FAILURE as Antenna does.
    #[error("job {job}: {failed} of {total} tasks could not be published (first error: {first}); job marked FAILURE")]
    PublishFailed {
        /// The job.
        job: i64,
        /// Tasks not published.
        failed: usize,
        /// Tasks to publish.
        total: usize,
        /// The first error.
        first: String,
    },
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        JobError::Store(StoreError::Db(e))
    }
}

/// A NATS failure while doing `what`.
pub(crate) fn nats_error(what: &str, e: impl Into<crate::BoxError>) -> JobError {
    JobError::Nats { what: what.to_string(), source: e.into() }
}

/// Job `id`'s task stream (`nats_queue.py::_get_stream_name`).
pub fn stream_name(id: i64) -> String {
    format!("job_{id}")
}

/// The subject job `id`'s tasks are published on.
pub fn tasks_subject(id: i64) -> String {
    format!("job.{id}.tasks")
}

/// Job `id`'s durable pull consumer.
pub fn consumer_name(id: i64) -> String {
    format!("job-{id}-consumer")
}

/// Job `id`'s dead-letter advisory consumer on Antenna's `advisories` stream (Antenna creates
/// it only from a management command; cancel removes it if present).
pub fn dlq_consumer_name(id: i64) -> String {
    format!("job-{id}-dlq")
}
