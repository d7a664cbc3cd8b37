//! `tally migrate`: Antenna's tables on an empty database (V1 is a no-op where they exist),
//! then tally's own schema. Refinery checksums every applied file; its history table lives in
//! schema `tally` too.

use tracing::info;

use crate::store::{Store, StoreError};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Whether Antenna's tables were already there before the run.
    pub antenna_tables_existed: bool,
    /// Names of the migrations applied by this run (none when up to date).
    pub applied: Vec<String>,
}

/// Applies every pending migration.
pub async fn migrate(store: &Store) -> Result<MigrationReport, StoreError> {
    let mut client = store.client().await?;
    let existed: bool = client.query_one("SELECT to_regclass('public.main_project') IS NOT NULL", &[]).await?.get(0);
    // Serialise concurrent `tally migrate` runs (CREATE … IF NOT EXISTS races otherwise).
    client.execute("SELECT pg_advisory_lock(7243110)", &[]).await?;
    client.batch_execute("CREATE SCHEMA IF NOT EXISTS tally").await?;
    let result =
        embedded::migrations::runner().set_migration_table_name("tally.schema_history").run_async(&mut **client).await;
    client.execute("SELECT pg_advisory_unlock(7243110)", &[]).await?;
    let report = result.map_err(StoreError::Migration)?;
    let applied: Vec<String> = report.applied_migrations().iter().map(|m| m.to_string()).collect();
    info!(applied = applied.len(), antenna_tables_existed = existed, "migrations done");
    Ok(MigrationReport { antenna_tables_existed: existed, applied })
}
