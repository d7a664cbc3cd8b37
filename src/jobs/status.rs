//! What a job is doing now, for `tally job status`: its `jobs_job` row (status, times, the
//! progress stages with their parameters as Django shows them), tally's durable image set
//! (`tally.job_image`: images with a result, failed ones, rows inserted), its log line count,
//! and its task queue as JetStream reports it.

use async_nats::jetstream;
use serde::Serialize;
use serde_json::Value;

use super::queue::{self, QueueState};
use super::JobError;
use crate::store::{Store, StoreError};

/// A job's state.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    /// `jobs_job.id`.
    pub id: i64,
    /// `name`.
    pub name: String,
    /// `status` (Celery's state names).
    pub status: String,
    /// `dispatch_mode`: only `async_api` jobs have task queues.
    pub dispatch_mode: String,
    /// `project_id`.
    pub project: i64,
    /// `deployment_id`.
    pub deployment: Option<i64>,
    /// The pipeline's slug.
    pub pipeline: Option<String>,
    /// `limit`.
    pub limit: Option<i32>,
    /// `created_at`, Antenna's wall-clock time (the session's time zone).
    pub created_at: String,
    /// `started_at`.
    pub started_at: Option<String>,
    /// `finished_at`.
    pub finished_at: Option<String>,
    /// `updated_at`.
    pub updated_at: String,
    /// `progress.summary`.
    pub summary: Summary,
    /// `progress.stages`.
    pub stages: Vec<Stage>,
    /// What `tally.job_image` holds for the job.
    pub images: ImageSet,
    /// Rows in `jobs_joblog`.
    pub log_lines: i64,
    /// The task queue.
    pub queue: Queue,
}

/// `progress.summary`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// The status Django shows.
    pub status: String,
    /// The mean of the stages' progress, 0 to 1.
    pub progress: f64,
}

/// One stage of `progress.stages`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stage {
    /// `collect`, `process`, `results`, ….
    pub key: String,
    /// Its display name.
    pub name: String,
    /// Its status.
    pub status: String,
    /// 0 to 1.
    pub progress: f64,
    /// Its parameters.
    pub params: Vec<Param>,
}

/// A stage parameter.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    /// Display name.
    pub name: String,
    /// Key (`total_images`, `processed`, …).
    pub key: String,
    /// Value: a number, or `""` while unknown.
    pub value: Value,
}

/// A job's rows in `tally.job_image`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImageSet {
    /// Images with a result or an error.
    pub processed: i64,
    /// Images whose result was an error.
    pub failed: i64,
    /// Detections results inserted.
    pub detections: i64,
    /// Classifications results inserted.
    pub classifications: i64,
}

/// A job's task queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Queue {
    /// NATS was not asked (not connected, or not an async job).
    NotAsked {
        /// Why.
        reason: String,
    },
    /// The job has no stream: never created, or cleaned up after it finished or was cancelled.
    Absent,
    /// The stream exists.
    Present(QueueState),
    /// NATS answered with an error.
    Unavailable {
        /// The error.
        error: String,
    },
}

const TIME: &str = "YYYY-MM-DD HH24:MI:SS";

/// Reads job `id`; asks NATS about its queue when `js` is given.
pub async fn read(store: &Store, js: Option<&jetstream::Context>, id: i64) -> Result<JobStatus, JobError> {
    let client = store.client().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT j.name, j.status, j.dispatch_mode, j.project_id, j.deployment_id, p.slug, j.\"limit\",
                        to_char(j.created_at, '{TIME}'), to_char(j.started_at, '{TIME}'),
                        to_char(j.finished_at, '{TIME}'), to_char(j.updated_at, '{TIME}'), j.progress,
                        (SELECT count(*) FROM jobs_joblog l WHERE l.job_id = j.id)
                 FROM jobs_job j LEFT JOIN ml_pipeline p ON p.id = j.pipeline_id WHERE j.id = $1"
            ),
            &[&id],
        )
        .await?
        .ok_or(JobError::NotFound(id))?;
    let progress: Value = row.try_get(11)?;
    let (summary, stages) = parse_progress(&progress);
    let dispatch_mode: String = row.try_get(2)?;
    let migrated: bool =
        client.query_one("SELECT to_regclass('tally.job_image') IS NOT NULL", &[]).await?.try_get(0)?;
    if !migrated {
        return Err(StoreError::NotMigrated("tally.job_image".into()).into());
    }
    let sums = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE failed), coalesce(sum(detections), 0)::int8,
                    coalesce(sum(classifications), 0)::int8
             FROM tally.job_image WHERE job_id = $1",
            &[&id],
        )
        .await?;
    let images = ImageSet {
        processed: sums.try_get(0)?,
        failed: sums.try_get(1)?,
        detections: sums.try_get(2)?,
        classifications: sums.try_get(3)?,
    };
    let queue = match js {
        _ if dispatch_mode != "async_api" => Queue::NotAsked { reason: format!("a {dispatch_mode} job has no queue") },
        None => Queue::NotAsked { reason: "not connected to NATS".into() },
        Some(js) => match queue::state(js, id).await {
            Ok(Some(state)) => Queue::Present(state),
            Ok(None) => Queue::Absent,
            Err(e) => Queue::Unavailable { error: e.to_string() },
        },
    };
    Ok(JobStatus {
        id,
        name: row.try_get(0)?,
        status: row.try_get(1)?,
        dispatch_mode,
        project: row.try_get(3)?,
        deployment: row.try_get(4)?,
        pipeline: row.try_get(5)?,
        limit: row.try_get(6)?,
        created_at: row.try_get(7)?,
        started_at: row.try_get(8)?,
        finished_at: row.try_get(9)?,
        updated_at: row.try_get(10)?,
        summary,
        stages,
        images,
        log_lines: row.try_get(12)?,
        queue,
    })
}

/// The summary and stages of a `progress` value, tolerating missing or mistyped fields (the
/// column is written by Django, by tally and by hand).
pub fn parse_progress(progress: &Value) -> (Summary, Vec<Stage>) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let summary = Summary {
        status: text(&progress["summary"]["status"]),
        progress: progress["summary"]["progress"].as_f64().unwrap_or(0.0),
    };
    let stages = progress["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .map(|s| Stage {
                    key: text(&s["key"]),
                    name: text(&s["name"]),
                    status: text(&s["status"]),
                    progress: s["progress"].as_f64().unwrap_or(0.0),
                    params: s["params"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| Param {
                                    name: text(&p["name"]),
                                    key: text(&p["key"]),
                                    value: p["value"].clone(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    (summary, stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::row::initial_progress;

    #[test]
    fn progress_is_read_whatever_its_state() {
        let (summary, stages) = parse_progress(&initial_progress(Some(5), None));
        assert_eq!(summary.status, "STARTED");
        assert_eq!(stages.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["collect", "process", "results"]);
        assert_eq!(stages[0].params[0].value, serde_json::json!(5));
        let (summary, stages) = parse_progress(&serde_json::json!({}));
        assert_eq!((summary, stages), (Summary::default(), Vec::new()));
        let (_, stages) = parse_progress(&serde_json::json!({"stages": [{"key": 3, "params": "x"}]}));
        assert_eq!(stages, vec![Stage::default()]);
    }
}
