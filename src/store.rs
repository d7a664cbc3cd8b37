//! Postgres: connection, migrations, schema checks, bootstrap of the dataflow, the
//! changed-count sink, and the SQL recompute behind `tally verify`.
//!
//! tally reads and writes Antenna's own tables (SPEC §1); its bookkeeping lives in schema
//! `tally`. Every write is of absolute values, so any write can be retried.

pub mod bootstrap;
pub mod check;
pub mod connect;
pub mod migrate;
pub mod seed;
pub mod sink;
pub mod transaction;
pub mod verify;

use thiserror::Error;

pub use connect::{connect, is_stale_statement, sibling_database_url, Store};

/// Errors at the Postgres boundary.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be reached after every retry.
    #[error("cannot connect to the database after {attempts} attempts: {source}")]
    Unreachable {
        /// How many connection attempts were made.
        attempts: u32,
        /// The last error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The pool could not be built or could not hand out a connection.
    #[error("database pool: {0}")]
    Pool(#[source] crate::BoxError),
    /// A statement failed.
    #[error("database: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// Antenna's tables are missing.
    #[error("table {0} does not exist: run `tally migrate` first")]
    NotMigrated(String),
    /// A table lacks a column tally needs.
    #[error("table {table} has no column {column}, which tally needs; is this an Antenna database?")]
    MissingColumn {
        /// The table.
        table: String,
        /// The missing column.
        column: String,
    },
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] refinery::Error),
    /// The dataflow engine stopped.
    #[error(transparent)]
    Engine(#[from] tally_dataflows::EngineError),
    /// NATS failed where a store operation needed it (replaying dead letters).
    #[error("nats: {0}")]
    Nats(#[from] crate::results_stream::BucketError),
}

/// A Postgres error with the server's message, detail and SQLSTATE (tokio-postgres's own
/// `Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            s
        }
        None => e.to_string(),
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
            other => StoreError::Pool(other.into()),
        }
    }
}
