//! Cancelling a job as Antenna's `Job.cancel` does for async jobs (jobs-protocol.md §1.9):
//! a guarded move to CANCELING from the finalizable states, then a guarded move to REVOKED
//! (with `finished_at`) from those or CANCELING, then the cleanup of the job's task queue,
//! which runs whatever the status (a finished job may still hold a stream). There is no Celery
//! task to revoke. A finished job's status is never touched, and ingest leaves the progress of
//! a REVOKED or CANCELING job alone (`progress::FINALIZABLE` excludes them).

use crate::jobs::state::JobState;
use async_nats::jetstream;
use serde::Serialize;
use tracing::{info, warn};

use super::logs::JobLogs;
use super::progress::FINALIZABLE;
use super::queue::{self, ConsumerState, Deleted};
use super::{consumer_name, stream_name, JobError};
use crate::store::Store;

/// What cancelling did.
#[derive(Clone, Debug, Serialize)]
pub struct Cancelled {
    /// The job.
    pub id: i64,
    /// Its status before.
    pub before: String,
    /// Its status after.
    pub status: String,
    /// Whether this call moved it to REVOKED.
    pub revoked: bool,
    /// What happened to its task queue.
    pub cleanup: Cleanup,
}

/// The cleanup of a job's task queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Cleanup {
    /// Not an async job: it has no queue.
    NotAsync,
    /// NATS was not reachable; the queue (if any) is still there.
    Skipped,
    /// Done (deleting what does not exist is not an error).
    Done {
        /// What existed and was deleted.
        deleted: Deleted,
        /// The consumer's figures just before, when it existed (Antenna's forensic line).
        last_state: Option<ConsumerState>,
    },
    /// NATS answered with an error; the queue may still be there.
    Failed {
        /// The error.
        error: String,
    },
}

/// Cancels job `id`; `source` says who asked, for the job log. `js`: `None` when NATS is not
/// reachable (the status still moves; the queue is left for a later cancel to clean up).
pub async fn cancel(
    store: &Store,
    js: Option<&jetstream::Context>,
    logs: &JobLogs,
    id: i64,
    source: &str,
) -> Result<Cancelled, JobError> {
    let client = store.client().await?;
    let row = client
        .query_opt("SELECT status, dispatch_mode FROM jobs_job WHERE id = $1", &[&id])
        .await?
        .ok_or(JobError::NotFound(id))?;
    let before: String = row.try_get(0)?;
    let dispatch_mode: String = row.try_get(1)?;
    // CANCELING only from a state that can still finish: never un-finish a finished job.
    client
        .execute(
            "UPDATE jobs_job SET status = 'CANCELING', updated_at = now(),
                    progress = jsonb_set(progress, '{summary,status}', '\"CANCELING\"')
             WHERE id = $1 AND status = ANY($2)",
            &[&id, &FINALIZABLE],
        )
        .await?;
    let from: Vec<&str> = FINALIZABLE.iter().copied().chain([JobState::Canceling.as_str()]).collect();
    let revoked = client
        .execute(
            "UPDATE jobs_job SET status = 'REVOKED', finished_at = now(), updated_at = now(),
                    progress = jsonb_set(progress, '{summary,status}', '\"REVOKED\"')
             WHERE id = $1 AND status = ANY($2)",
            &[&id, &from],
        )
        .await?
        == 1;
    let status: String = client
        .query_opt("SELECT status FROM jobs_job WHERE id = $1", &[&id])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or_else(|| "deleted".into());
    if revoked {
        info!(job_id = id, before = %before, source, "job cancelled");
        logs.info(id, format!("Job {id} cancelled ({source}): {before} → REVOKED"));
    }
    let cleanup = match js {
        _ if dispatch_mode != "async_api" => Cleanup::NotAsync,
        None => Cleanup::Skipped,
        Some(js) => clean_up(js, logs, id).await,
    };
    Ok(Cancelled { id, before, status, revoked, cleanup })
}

/// Antenna's `cleanup_job_resources`: a forensic line with the consumer's figures, then the
/// consumer, the stream and the dead-letter consumer deleted, each logged.
async fn clean_up(js: &jetstream::Context, logs: &JobLogs, id: i64) -> Cleanup {
    let last_state = match queue::state(js, id).await {
        Ok(state) => state.and_then(|s| s.consumer),
        Err(e) => {
            warn!(job_id = id, error = %e, "cannot read the task consumer before deleting it");
            None
        }
    };
    if let Some(s) = &last_state {
        logs.info(id, format!("Final stats of NATS consumer {} for job '{id}': {s}", consumer_name(id)));
    }
    match queue::delete(js, id).await {
        Ok(deleted) => {
            if deleted.consumer {
                logs.info(id, format!("Deleted NATS consumer {} for job '{id}'", consumer_name(id)));
            }
            if deleted.stream {
                logs.info(id, format!("Deleted NATS stream {} for job '{id}'", stream_name(id)));
            }
            if deleted.dlq_consumer {
                logs.info(id, format!("Deleted NATS dead-letter consumer for job '{id}'"));
            }
            info!(job_id = id, stream = deleted.stream, consumer = deleted.consumer, "job queue cleaned up");
            Cleanup::Done { deleted, last_state }
        }
        Err(e) => {
            warn!(job_id = id, error = %e, "cannot clean up the job's task queue");
            logs.error(id, format!("Failed to clean up NATS resources for job '{id}': {e}"));
            Cleanup::Failed { error: e.to_string() }
        }
    }
}
