//! Saving a batch of validated results in Antenna's tables (SPEC §3 rules 1–8), inside the
//! caller's transaction, with one bulk statement per table rather than one per row, in three
//! phases:
//!
//! - **read** ([`read`]): every SELECT the batch needs, into a [`plan::Snapshot`] of what exists;
//! - **plan** ([`crate::ingest::plan`]): a pure function of the snapshot and the messages that
//!   decides rejections, new and reused rows, determinations, job images and log lines;
//! - **write** ([`write`]): creates the plan's taxa, allocates the ids of its new rows from
//!   their sequences, and executes its inserts and updates.
//!
//! Besides the rows, the result carries the dataflow input for the batch: the inserted and
//! changed detections and occurrences, new taxa, and read-through copies of the images,
//! events, deployments, projects and taxa the batch refers to (Django may have created them
//! since the bootstrap; a row already mirrored produces no update).

use tally_dataflows::{InputBatch, Known};
use tokio_postgres::Transaction;

mod read;
mod write;

pub use write::write_job_logs;

use crate::ingest::decode::{Rejection, ResultMessage};
use crate::ingest::plan;
use crate::jobs::logs::Level;
use crate::jobs::state::JobState;
use crate::store::StoreError;

/// Rows inserted by a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RowCounts {
    /// Detections with a box.
    pub detections: u64,
    /// Null markers (detections without a box).
    pub null_markers: u64,
    /// Classifications.
    pub classifications: u64,
    /// Occurrences.
    pub occurrences: u64,
    /// Taxa created for unknown labels.
    pub taxa: u64,
    /// Occurrences whose determination changed.
    pub determinations: u64,
}

/// A line for `jobs_joblog`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLogLine {
    /// The job.
    pub job_id: i64,
    /// Its level (`INFO`, `WARNING` or `ERROR`).
    pub level: Level,
    /// The message.
    pub message: String,
    /// Structured context.
    pub context: serde_json::Value,
}

/// What saving a batch did.
#[derive(Debug, Default)]
pub struct Saved {
    /// Messages (by index in the input) rejected against the database: unknown pipeline,
    /// algorithm not on the pipeline, unknown image. Nothing of them was written.
    pub rejected: Vec<(usize, Rejection)>,
    /// Rows inserted, per message index (all zero: a replay).
    pub inserted: Vec<u64>,
    /// Rows inserted, all messages.
    pub rows: RowCounts,
    /// The dataflow input of the batch.
    pub input: InputBatch,
    /// Job log lines to write with the batch.
    pub job_logs: Vec<JobLogLine>,
    /// Jobs whose image set changed (their progress is due).
    pub progress_jobs: Vec<i64>,
}

/// Job statuses after which a job is never moved again (Antenna's final states, and a cancel
/// in progress).
pub const CLOSED_STATUSES: &[&str] =
    &[JobState::Success.as_str(), JobState::Failure.as_str(), JobState::Revoked.as_str(), JobState::Canceling.as_str()];

/// Saves `messages` (each already decoded and validated) in `tx`: read, plan, write.
pub async fn save(tx: &Transaction<'_>, known: &Known, messages: &[&ResultMessage]) -> Result<Saved, StoreError> {
    let snapshot = read::snapshot(tx, known, messages).await?;
    let plan = plan::plan(&snapshot, messages);
    let written = write::write(tx, known, &snapshot, &plan).await?;
    Ok(Saved {
        rejected: plan.rejected,
        inserted: plan.inserted,
        rows: RowCounts { taxa: written.taxa, ..plan.rows },
        input: written.input,
        job_logs: plan.job_logs,
        progress_jobs: plan.progress_jobs,
    })
}
