//! Ingest: result messages from NATS JetStream → rows in Antenna's tables → incrementally
//! maintained counts → acks (SPEC §3, §4, §6).
//!
//! - [`message`]: decode and validate one message (no I/O).
//! - [`save`]: save a batch of valid messages inside a transaction: read what exists, plan,
//!   then write with bulk statements.
//! - [`plan`]: the pure middle of a save: what to insert and update, decided without I/O.
//! - [`determination`]: Antenna's determination rule, pure.
//! - [`analyze`]: planner statistics kept fresh as ingest grows the tables.
//! - [`batch`]: one batch end to end: decode, save, dead letters, dataflow, counts, commit,
//!   then acks.
//! - [`nats`]: the results stream and durable consumer, the pull loop's transport, task acks.
//! - [`feed`]: the change feed: Django's edits to the count inputs, from the outbox its
//!   triggers fill, applied between batches.
//! - [`daemon`]: `tally serve`'s ingest loop: bootstrap, consume, shutdown.

pub mod ack;
pub mod analyze;
pub mod batch;
pub mod daemon;
pub mod determination;
pub mod feed;
pub mod message;
pub mod monitor;
pub mod nats;
pub mod plan;
pub mod save;

use thiserror::Error;

use crate::store::StoreError;

/// Errors of the ingest path, classified so that the loop knows whether to retry.
#[derive(Debug, Error)]
pub enum IngestError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(String),
}

impl IngestError {
    /// Whether retrying the same work later can succeed (connection lost, server restarting,
    /// serialization failure, lock or statement timeout), as opposed to an error that the same
    /// input will hit again (a data exception, a constraint violation).
    pub fn is_transient(&self) -> bool {
        match self {
            IngestError::Nats(_) => true,
            IngestError::Store(StoreError::Db(e)) => match e.code() {
                // No SQLSTATE: the connection or the protocol failed.
                None => true,
                Some(code) => {
                    let class = &code.code()[..2];
                    // 08 connection, 40 rollback (serialization, deadlock), 53 resources,
                    // 57 operator intervention (shutdown, statement timeout), 58 system error,
                    // 55P03 lock not available.
                    matches!(class, "08" | "40" | "53" | "57" | "58") || code.code() == "55P03"
                }
            },
            IngestError::Store(StoreError::Unreachable { .. } | StoreError::Pool(_)) => true,
            IngestError::Store(_) => false,
        }
    }
}
