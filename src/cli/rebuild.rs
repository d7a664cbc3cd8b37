//! `tally rebuild`: load every input into the dataflow and write every count that differs
//! from its definition.

use std::process::ExitCode;

use clap::Args;
use tally_dataflows::Engine;

use crate::config::DbArgs;
use crate::store;
use crate::table::thousands;

/// Options of `tally rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// Timely worker threads.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Django's query cache, invalidated for the tables the rebuild writes.
    #[command(flatten)]
    pub django_cache: crate::django_cache::DjangoCacheArgs,
}

/// Bootstraps, then writes the counts that differ.
pub async fn run(args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let store = store::connect(&args.db).await?;
    store::check::check_schema(&store).await?;
    let mut engine = Engine::new(args.workers)?;
    let loaded = store::bootstrap::bootstrap(&store, &mut engine).await?;
    let written = store::sink::write_all(&store, &engine.snapshot()).await?;
    crate::django_cache::invalidate_once(&args.django_cache, &written.tables()).await?;
    println!(
        "read {} rows ({} detections) in {:.1} s; corrected {} images, {} events, {} deployments",
        thousands(loaded.rows as i64),
        thousands(loaded.detections as i64),
        loaded.seconds,
        thousands(written.images as i64),
        thousands(written.events as i64),
        thousands(written.deployments as i64),
    );
    Ok(ExitCode::SUCCESS)
}
