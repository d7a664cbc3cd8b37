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
    /// Timely worker threads (per process in a cluster).
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// The dataflow cluster (timely's `-n`, `-p`, `-h`): process 0 reads and writes Postgres,
    /// the others (`tally rebuild -p 1 …`) hold state until it is done.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// Print help (`-h` is the hostfile, as in timely).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// Django's query cache, invalidated for the tables the rebuild writes.
    #[command(flatten)]
    pub django_cache: crate::django_cache::DjangoCacheArgs,
}

/// Bootstraps, then writes the counts that differ.
pub async fn run(args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let topology = args.cluster.topology(args.workers)?;
    if args.cluster.is_peer() {
        // Holds state for one rebuild: ends when process 0's engine does.
        tokio::task::spawn_blocking(move || tally_dataflows::engine::run_peer(&topology)).await??;
        return Ok(ExitCode::SUCCESS);
    }
    args.db.require_url()?;
    let store = store::connect(&args.db).await?;
    store::check::check_schema(&store).await?;
    let mut engine = tokio::task::spawn_blocking(move || Engine::start(topology)).await??;
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
