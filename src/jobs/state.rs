//! Antenna's `JobState` (`ami/jobs/models.py`): the statuses a job, its stages and its
//! progress summary take, spelled as Antenna stores them in `jobs_job.status` and the
//! `progress` JSON.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of Antenna's job statuses. The database column is free text that Django also writes,
/// so reading one back goes through [`FromStr`], which refuses unknown spellings with
/// [`UnknownJobState`] rather than panicking or guessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Created, not yet queued.
    Created,
    /// Queued, not yet running.
    Pending,
    /// Running.
    Started,
    /// Finished with at most half of its images failed.
    Success,
    /// Finished with more than half of its images failed, or failed to start.
    Failure,
    /// Being retried.
    Retry,
    /// Cancel requested; Antenna's cancel moves it on to `REVOKED`.
    Canceling,
    /// Cancelled.
    Revoked,
    /// Received by a Celery worker.
    Received,
    /// Antenna lost track of it.
    Unknown,
}

impl JobState {
    /// Every state, in Antenna's order.
    pub const ALL: [JobState; 10] = [
        JobState::Created,
        JobState::Pending,
        JobState::Started,
        JobState::Success,
        JobState::Failure,
        JobState::Retry,
        JobState::Canceling,
        JobState::Revoked,
        JobState::Received,
        JobState::Unknown,
    ];

    /// The spelling Antenna stores. `const` so that lists of states used as SQL parameters
    /// (`status = ANY($1)`) can stay `&[&str]` constants.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "CREATED",
            JobState::Pending => "PENDING",
            JobState::Started => "STARTED",
            JobState::Success => "SUCCESS",
            JobState::Failure => "FAILURE",
            JobState::Retry => "RETRY",
            JobState::Canceling => "CANCELING",
            JobState::Revoked => "REVOKED",
            JobState::Received => "RECEIVED",
            JobState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status string that is none of Antenna's `JobState` values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| UnknownJobState(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_match_serde() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            assert_eq!(state.to_string(), state.as_str());
            assert_eq!(serde_json::to_value(state).unwrap(), serde_json::json!(state.as_str()));
        }
        assert_eq!("success".parse::<JobState>(), Err(UnknownJobState("success".into())));
    }
}
