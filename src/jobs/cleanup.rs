//! Finished jobs clean up (SPEC §5; jobs-protocol.md §1.8): the task queue of a job that is
//! SUCCESS, FAILURE or REVOKED (Antenna's `final_states`) is deleted, consumer first, then
//! stream, then the dead-letter consumer, as Antenna's `cleanup_async_job_resources` does.
//!
//! tally deletes it from the job monitor rather than on the ingest path, once the job has been
//! finished (`finished_at`, else `updated_at`) for `--cleanup-grace`: the batch that finished a
//! job acks its tasks just after its commit, and those acks should find the stream. The monitor
//! lists the `job_*` streams on the server, so it also removes zombie streams: those whose job
//! is finished, and those whose job does not exist in this database once the stream is older
//! than `--zombie-stream-age` (Antenna's `ZOMBIE_STREAMS_MAX_AGE_MINUTES`, 60; the age guard
//! keeps a stream whose job row is not committed yet, or that belongs to another database
//! sharing the NATS server, from being deleted). Deleting what is already gone is not an error.
//! `tally job status` reads Postgres and shows such a job's queue as deleted.

use crate::jobs::state::JobState;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, warn};

use super::logs::Level;
use super::queue::{self, Deleted};
use super::{consumer_name, nats_error, stream_name, JobError};
use crate::metrics::names;
use crate::store::Store;

/// Antenna's `final_states`: a job in one of these never runs again.
pub const FINAL: &[&str] = &[JobState::Success.as_str(), JobState::Failure.as_str(), JobState::Revoked.as_str()];

/// What one sweep deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// Jobs whose queue was deleted because they are finished.
    pub finished: Vec<i64>,
    /// Streams deleted whose job does not exist.
    pub zombies: Vec<i64>,
}

/// The job id of stream `name` when it is a job's task stream (`job_{id}`).
pub fn job_of_stream(name: &str) -> Option<i64> {
    name.strip_prefix("job_")?.parse().ok().filter(|id| *id > 0)
}

/// Deletes the queues of finished jobs (finished for `grace`) and of jobs that do not exist
/// (stream older than `zombie_age`).
pub async fn sweep(
    store: &Store,
    js: &jetstream::Context,
    grace: Duration,
    zombie_age: Duration,
) -> Result<Swept, JobError> {
    let mut names = js.stream_names();
    let mut ids = Vec::new();
    while let Some(name) = names.next().await {
        if let Some(id) = job_of_stream(&name.map_err(|e| nats_error("list streams", e))?) {
            ids.push(id);
        }
    }
    let mut swept = Swept::default();
    if ids.is_empty() {
        return Ok(swept);
    }
    let client = store.client().await?;
    let mut known: HashMap<i64, bool> = HashMap::with_capacity(ids.len());
    for r in client
        .query(
            "SELECT id, status = ANY($2) AND coalesce(finished_at, updated_at) < now() - make_interval(secs => $3)
             FROM jobs_job WHERE id = ANY($1)",
            &[&ids, &FINAL, &grace.as_secs_f64()],
        )
        .await?
    {
        known.insert(r.try_get(0)?, r.try_get(1)?);
    }
    let mut lines: Vec<(i64, String)> = Vec::new();
    for id in ids {
        match known.get(&id) {
            Some(false) => {}
            Some(true) => {
                let last = queue::state(js, id).await.ok().flatten().and_then(|s| s.consumer);
                let Some(deleted) = delete(js, id).await else { continue };
                if let Some(s) = last {
                    lines.push((id, format!("Final stats of NATS consumer {} for job '{id}': {s}", consumer_name(id))));
                }
                lines.extend(deleted_lines(id, deleted));
                metrics::counter!(names::JOB_QUEUES_DELETED, "why" => "finished").increment(1);
                info!(
                    job_id = id,
                    stream = deleted.stream,
                    consumer = deleted.consumer,
                    "finished job's queue deleted"
                );
                swept.finished.push(id);
            }
            None => {
                let stream = match js.get_stream(stream_name(id)).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(job_id = id, error = %e, "zombie stream already gone");
                        continue;
                    }
                };
                let created = stream.cached_info().created.unix_timestamp();
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
                if now.saturating_sub(created) < zombie_age.as_secs() as i64 {
                    continue;
                }
                let Some(deleted) = delete(js, id).await else { continue };
                metrics::counter!(names::JOB_QUEUES_DELETED, "why" => "zombie").increment(1);
                info!(job_id = id, stream = deleted.stream, "zombie stream deleted: no such job");
                swept.zombies.push(id);
            }
        }
    }
    if !lines.is_empty() {
        let context = json!({"source": "tally"});
        let mut rows = super::logs::Rows::default();
        for (id, line) in &lines {
            rows.push(*id, Level::Info, line, &context, None);
        }
        let client: &tokio_postgres::Client = &client;
        super::logs::insert(client, &rows).await?;
    }
    Ok(swept)
}

/// Deletes job `id`'s queue; a failure is logged and counted, and the next sweep retries.
async fn delete(js: &jetstream::Context, id: i64) -> Option<Deleted> {
    match queue::delete(js, id).await {
        Ok(deleted) => Some(deleted),
        Err(e) => {
            warn!(job_id = id, error = %e, "cannot delete the job's queue; retrying next pass");
            metrics::counter!(names::JOB_MONITOR_ERRORS, "part" => "cleanup").increment(1);
            None
        }
    }
}

/// Antenna's cleanup log lines for what was deleted (nothing for what was already gone).
fn deleted_lines(id: i64, deleted: Deleted) -> Vec<(i64, String)> {
    let mut lines = Vec::new();
    if deleted.consumer {
        lines.push((id, format!("Deleted NATS consumer {} for job '{id}'", consumer_name(id))));
    }
    if deleted.stream {
        lines.push((id, format!("Deleted NATS stream {} for job '{id}'", stream_name(id))));
    }
    if deleted.dlq_consumer {
        lines.push((id, format!("Deleted NATS dead-letter consumer for job '{id}'")));
    }
    if !deleted.consumer && !deleted.stream {
        debug!(job_id = id, "job queue already gone");
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_job_streams_name_a_job() {
        assert_eq!(job_of_stream("job_42"), Some(42));
        assert_eq!(job_of_stream("job_0"), None);
        assert_eq!(job_of_stream("job_x"), None);
        assert_eq!(job_of_stream("TALLY_RESULTS"), None);
        assert_eq!(job_of_stream("advisories"), None);
        assert_eq!(job_of_stream("job_-1"), None);
    }
}
