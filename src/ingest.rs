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
pub mod decode;
pub mod determination;
pub mod feed;
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
    /// NATS failed while doing `what`.
    #[error("nats: {what}: {source}")]
    Nats {
        /// What tally was doing.
        what: String,
        /// The client's error.
        #[source]
        source: crate::BoxError,
    },
    /// The results object store could not be set up.
    #[error("nats: {0}")]
    Bucket(#[from] crate::results_stream::BucketError),
    /// The results stream exists and does not take tally's subjects.
    #[error(
        "nats: stream {stream} exists with subjects {subjects:?}, which do not include {wanted}; fix or delete it"
    )]
    StreamSubjects {
        /// The stream.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
        /// The subjects tally publishes results on.
        wanted: String,
    },
    /// A background task of ingest failed (panicked or was cancelled).
    #[error("ingest task: {0}")]
    Internal(String),
    /// Shutdown came while the engine was waiting for the other processes of its cluster.
    #[error("stopping while waiting for the dataflow cluster")]
    Stopped,
}

impl IngestError {
    /// A NATS failure while doing `what`.
    pub fn nats(what: impl Into<String>, source: impl Into<crate::BoxError>) -> IngestError {
        IngestError::Nats { what: what.into(), source: source.into() }
    }
}

impl IngestError {
    /// Whether retrying the same work later can succeed (connection lost, server restarting,
    /// serialization failure, lock or statement timeout), as opposed to an error that the same
    /// input will hit again (a data exception, a constraint violation).
    pub fn is_transient(&self) -> bool {
        match self {
            IngestError::Nats { .. }
            | IngestError::Bucket(_)
            | IngestError::StreamSubjects { .. }
            | IngestError::Internal(_)
            | IngestError::Stopped => true,
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
            // A worker or a cluster process was lost: the engine is rebuilt (once the cluster
            // is whole again) and the batch redelivered; no message is at fault.
            IngestError::Store(StoreError::Engine(tally_dataflows::EngineError::WorkerStopped)) => true,
            IngestError::Store(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::IngestError;

    #[test]
    fn nats_errors_keep_their_source_and_their_message() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = IngestError::nats("consumer tally-ingest", cause);
        assert_eq!(e.to_string(), "nats: consumer tally-ingest: connection refused");
        let source = e.source().map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("connection refused"));
        assert!(e.is_transient());
    }
}
