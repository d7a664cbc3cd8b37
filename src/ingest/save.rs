//! Saving a batch of validated results in Antenna's tables (SPEC §3 rules 1–8), inside the
//! caller's transaction, with one bulk statement per table rather than one per row, in three
//! phases:
//!
//! - **read** ([`read`]): every SELECT the batch needs, into a [`plan::Snapshot`] of what exists;
//! - **plan** ([`crate::ingest::plan`]): a pure function of the snapshot and the messages that
//!   decides rejections, new and reused rows, determinations, job images and log lines;
//! - **write**, in two steps: [`stage`] makes the plan, creates its taxa and allocates the ids
//!   of its new rows from their sequences, which is all the batch's dataflow input needs (the
//!   ingestor hands it to the count workers then, so that they compute while Postgres takes
//!   the rows); [`write`] executes the plan's inserts and updates.
//!
//! Besides the rows, the result carries the dataflow input for the batch: the inserted and
//! changed detections and occurrences, new taxa, and read-through copies of the images,
//! events, deployments, projects and taxa the batch refers to (Django may have created them
//! since the bootstrap; a row already mirrored produces no update).

use std::collections::HashSet;

use tally_dataflows::{InputBatch, Known};
use tokio_postgres::Client;

mod copy;
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

/// How the write phase sends the new occurrences, detections and classifications (the bulk
/// of a batch's bytes) to Postgres. Both store the same rows and values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMethod {
    /// Binary `COPY … FROM STDIN` into each table.
    #[default]
    Copy,
    /// One `INSERT … SELECT FROM UNNEST(…)` per table, the arrays sent as binary parameters.
    Unnest,
}

/// Saves `messages` (each already decoded and validated) in `tx`: read, stage, write.
pub async fn save(
    tx: &Client,
    known: &Known,
    messages: &[&ResultMessage],
    method: WriteMethod,
) -> Result<Saved, StoreError> {
    let snapshot = read(tx, known, messages).await?;
    let staged = stage(tx, known, &snapshot, messages).await?;
    write(tx, &snapshot, staged, method).await
}

/// The read phase alone: what exists of everything the plan of `messages` needs.
pub async fn read(tx: &Client, known: &Known, messages: &[&ResultMessage]) -> Result<plan::Snapshot, StoreError> {
    read::snapshot(tx, known, messages).await
}

/// A batch's plan with its taxa created and the ids of its new rows allocated: everything
/// but the rows themselves, which [`write`] inserts.
pub struct Staged {
    plan: plan::Plan,
    ids: plan::Ids,
    /// The dataflow input of the batch.
    pub input: InputBatch,
    taxa: u64,
}

/// The plan of `messages` from a snapshot [`read`] in the same transaction, its taxa created
/// and its ids allocated.
pub async fn stage(
    tx: &Client,
    known: &Known,
    snapshot: &plan::Snapshot,
    messages: &[&ResultMessage],
) -> Result<Staged, StoreError> {
    let plan = plan::plan(snapshot, messages);
    let (ids, input, taxa) = write::stage(tx, known, snapshot, &plan).await?;
    Ok(Staged { plan, ids, input, taxa })
}

/// Inserts and updates the rows of a [`stage`]d plan.
pub async fn write(
    tx: &Client,
    snapshot: &plan::Snapshot,
    staged: Staged,
    method: WriteMethod,
) -> Result<Saved, StoreError> {
    let Staged { plan, ids, input, taxa } = staged;
    write::write(tx, snapshot, &plan, &ids, method).await?;
    Ok(Saved {
        rejected: plan.rejected,
        inserted: plan.inserted,
        rows: RowCounts { taxa, ..plan.rows },
        input,
        job_logs: plan.job_logs,
        progress_jobs: plan.progress_jobs,
    })
}

/// What a batch's plan depends on that another batch's writes can change: the images whose
/// detections it read (rule 8 finds detections by value on them), the occurrences whose
/// determination state it read, and the jobs whose status it read. Two batches whose
/// footprints are disjoint plan the same whether or not the other has committed; one that
/// meets an uncommitted batch's footprint must wait for that commit and read again
/// (`Ingestor::prepare`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// Images read.
    pub images: HashSet<i64>,
    /// Occurrences read.
    pub occurrences: HashSet<i64>,
    /// Jobs read (for a snapshot) or moved to a final status (for a written batch).
    pub jobs: HashSet<i64>,
}

impl Footprint {
    /// What a plan made from `snapshot` depends on (its jobs: every job whose status it read).
    pub fn of(snapshot: &plan::Snapshot) -> Footprint {
        Footprint {
            images: snapshot.images.keys().copied().collect(),
            occurrences: snapshot.occurrences.keys().copied().collect(),
            jobs: snapshot.jobs.keys().copied().collect(),
        }
    }

    /// Whether a plan with this footprint depends on what a batch with footprint `written`
    /// (images and occurrences read, jobs finished) may change.
    pub fn meets(&self, written: &Footprint) -> bool {
        !self.images.is_disjoint(&written.images)
            || !self.occurrences.is_disjoint(&written.occurrences)
            || !self.jobs.is_disjoint(&written.jobs)
    }
}
