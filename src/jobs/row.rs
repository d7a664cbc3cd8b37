//! The `jobs_job` row of an async ML job as Antenna writes it: every NOT NULL column supplied
//! as Django would, the `progress` JSON of `Job.setup()` and `MLJob.run` (stages `collect`,
//! `process`, `results` with their parameters), and the FAILURE Antenna records when a job's
//! tasks cannot be queued.

use crate::jobs::state::JobState;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::progress::FINALIZABLE;
use super::JobError;

/// A `jobs_job` row to insert.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// The id; `None`: the table's identity.
    pub id: Option<i64>,
    /// `name`.
    pub name: String,
    /// `project_id`.
    pub project: i64,
    /// `pipeline_id`.
    pub pipeline: i64,
    /// `deployment_id`.
    pub deployment: Option<i64>,
    /// `limit`.
    pub limit: Option<i64>,
    /// Images queued (`collect.total_images`); `None`: not collected yet.
    pub total: Option<i64>,
}

/// Inserts an async ML job row as Antenna leaves it once collected: STARTED (SUCCESS with
/// `finished_at` when it has no image), every NOT NULL column supplied as Django would, and
/// [`initial_progress`]. Returns its id.
pub async fn insert_job(client: &Client, job: &NewJob) -> Result<i64, JobError> {
    let status = if job.total == Some(0) { JobState::Success.as_str() } else { JobState::Started.as_str() };
    let limit = job.limit.map(|l| i32::try_from(l).unwrap_or(i32::MAX));
    let progress = initial_progress(job.total, job.limit);
    let row = client
        .query_one(
            "INSERT INTO jobs_job (id, created_at, updated_at, name, queue, scheduled_at, started_at, finished_at,
                                   status, progress, project_id, deployment_id, pipeline_id, delay, \"limit\", shuffle,
                                   job_type_key, logs, dispatch_mode)
             VALUES (coalesce($1, nextval(pg_get_serial_sequence('jobs_job', 'id'))), now(), now(), $2, 'default',
                     now(), now(), CASE WHEN $3::text = 'SUCCESS' THEN now() END, $3, $4, $5, $6, $7, 0, $8, false,
                     'ml', '{\"stdout\": [], \"stderr\": []}', 'async_api')
             RETURNING id",
            &[&job.id, &job.name, &status, &progress, &job.project, &job.deployment, &job.pipeline, &limit],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Marks job `id` FAILURE with its `collect` stage failed, unless it already left the
/// finalizable states (a cancel is never overwritten).
pub async fn fail(client: &Client, id: i64) -> Result<(), JobError> {
    client
        .execute(
            "UPDATE jobs_job SET status = 'FAILURE', finished_at = now(), updated_at = now(),
                    progress = jsonb_set(jsonb_set(progress, '{summary,status}', '\"FAILURE\"'),
                                         '{stages,0,status}', '\"FAILURE\"')
             WHERE id = $1 AND status = ANY($2)",
            &[&id, &FINALIZABLE],
        )
        .await?;
    Ok(())
}

/// A job's `progress` as Antenna's `Job.setup()` creates it (stages `collect`, `process`,
/// `results`, their parameters `""`) and, when `total` is known, as `MLJob.run` leaves it after
/// collecting: `collect` SUCCESS with `total_images` (and `limit`), the summary at 1/3; with no
/// image every stage is done (`queue_images_to_nats`'s zero-image case).
pub fn initial_progress(total: Option<i64>, limit: Option<i64>) -> Value {
    let param = |name: &str, value: Value| json!({"name": name, "key": name.to_lowercase().replace(' ', "_"), "category": "default", "value": value});
    let stage = |key: &str, name: &str, status: &str, progress: f64, params: Vec<Value>| json!({"key": key, "name": name, "status": status, "progress": progress, "params": params});
    let mut collect_params = vec![param("Total Images", total.map_or(json!(""), |t| json!(t)))];
    if let (Some(limit), Some(_)) = (limit, total) {
        collect_params.push(param("Limit", json!(limit)));
    }
    let (collect, rest, summary) = match total {
        None => {
            ((JobState::Created.as_str(), 0.0), (JobState::Created.as_str(), 0.0), (JobState::Started.as_str(), 0.0))
        }
        Some(0) => {
            ((JobState::Success.as_str(), 1.0), (JobState::Success.as_str(), 1.0), (JobState::Success.as_str(), 1.0))
        }
        Some(_) => (
            (JobState::Success.as_str(), 1.0),
            (JobState::Created.as_str(), 0.0),
            (JobState::Started.as_str(), 1.0 / 3.0),
        ),
    };
    let empty = |names: [&str; 3]| names.iter().map(|n| param(n, json!(""))).collect::<Vec<_>>();
    json!({
        "summary": {"status": summary.0, "progress": summary.1},
        "stages": [
            stage("collect", "Collect", collect.0, collect.1, collect_params),
            stage("process", "Process", rest.0, rest.1, empty(["Processed", "Remaining", "Failed"])),
            stage("results", "Results", rest.0, rest.1, empty(["Captures", "Detections", "Classifications"])),
        ],
        "errors": [],
        "logs": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::progress::total_images;

    #[test]
    fn progress_has_antennas_shape_and_total() {
        let p = initial_progress(Some(40), None);
        assert_eq!(total_images(&p), Some(40));
        assert_eq!(p["stages"][0]["status"], "SUCCESS");
        assert_eq!(
            p["stages"][1]["params"][1],
            json!({"name": "Remaining", "key": "remaining", "category": "default", "value": ""})
        );
        assert_eq!(p["stages"][2]["key"], "results");
        assert!((p["summary"]["progress"].as_f64().unwrap_or(0.0) - 1.0 / 3.0).abs() < 1e-12);
        let limited = initial_progress(Some(4), Some(4));
        assert_eq!(limited["stages"][0]["params"][1]["key"], "limit");
        let empty = initial_progress(Some(0), None);
        assert_eq!(
            (empty["summary"]["status"].as_str(), empty["stages"][2]["progress"].as_f64()),
            (Some("SUCCESS"), Some(1.0))
        );
        let setup = initial_progress(None, None);
        assert_eq!((total_images(&setup), setup["stages"][0]["status"].as_str()), (None, Some("CREATED")));
    }
}
