//! The job a request names: its row in `jobs_job` (read, never written, by the gateway), and a
//! cache of the facts that never change (pipeline, project) for the result path.

use crate::jobs::state::JobState;
use std::collections::HashMap;
use std::sync::Mutex;

use deadpool_postgres::Object;

use super::GatewayError;

/// Statuses in which Antenna serves tasks (`JobState.active_states()`).
pub const ACTIVE_STATES: [&str; 2] = [JobState::Started.as_str(), JobState::Retry.as_str()];

/// Jobs whose facts are kept at most; the cache is emptied when full.
const MAX_CACHED_JOBS: usize = 100_000;

/// What the gateway reads of a job.
#[derive(Clone, Debug)]
pub struct Job {
    /// `jobs_job.id`.
    pub id: i64,
    /// `jobs_job.status` (Celery's state names).
    pub status: String,
    /// `jobs_job.dispatch_mode`: only `async_api` jobs have task queues.
    pub dispatch_mode: String,
    /// The job's facts.
    pub facts: Facts,
}

/// What never changes about a job: whose services a heartbeat marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    /// `jobs_job.pipeline_id`.
    pub pipeline_id: Option<i64>,
    /// `jobs_job.project_id`.
    pub project_id: i64,
}

impl Job {
    /// Whether the job's tasks travel through NATS.
    pub fn is_async(&self) -> bool {
        self.dispatch_mode == "async_api"
    }

    /// Whether tasks are served now.
    pub fn is_active(&self) -> bool {
        ACTIVE_STATES.contains(&self.status.as_str())
    }
}

/// Reads job `id`, `None` when there is no such job.
pub async fn load(client: &Object, id: i64) -> Result<Option<Job>, GatewayError> {
    let statement = client
        .prepare_cached("SELECT status, dispatch_mode, pipeline_id, project_id FROM jobs_job WHERE id = $1")
        .await
        .map_err(GatewayError::db)?;
    let Some(row) = client.query_opt(&statement, &[&id]).await.map_err(GatewayError::db)? else {
        return Ok(None);
    };
    Ok(Some(Job {
        id,
        status: row.try_get(0).map_err(GatewayError::db)?,
        dispatch_mode: row.try_get(1).map_err(GatewayError::db)?,
        facts: Facts {
            pipeline_id: row.try_get(2).map_err(GatewayError::db)?,
            project_id: row.try_get(3).map_err(GatewayError::db)?,
        },
    }))
}

/// Facts of jobs seen before, so that posting results reads the database once per job.
#[derive(Default)]
pub struct JobCache {
    facts: Mutex<HashMap<i64, Facts>>,
}

impl JobCache {
    /// The facts of job `id` if known.
    pub fn get(&self, id: i64) -> Option<Facts> {
        self.facts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&id).copied()
    }

    /// Remembers the facts of job `id`.
    pub fn put(&self, id: i64, facts: Facts) {
        let mut map = self.facts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= MAX_CACHED_JOBS {
            map.clear();
        }
        map.insert(id, facts);
    }
}
