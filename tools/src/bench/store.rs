//! `tally-tools bench store`: bootstrap, sink and verify against a real Postgres, on a scratch
//! database seeded with a synthetic deployment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::{Engine, Tables};
use tokio_postgres::NoTls;

use crate::synth::{Workload, WorkloadConfig};
use tally::config::DbArgs;
use tally::store::{self, verify::Scope};
use tally::table::thousands;

/// Options of `tally-tools bench store`.
#[derive(Debug, Args)]
pub struct StoreBenchArgs {
    /// A database on the server to benchmark on; a scratch database `tally_bench_<pid>` is
    /// created next to it and dropped afterwards.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Detections in the synthetic deployment (one occurrence each, 8 per image).
    #[arg(long, default_value_t = 1_000_000)]
    pub detections: u64,
    /// Timely worker threads for the bootstrap.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Keep the scratch database.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown table to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Runs the benchmark and prints a markdown table.
pub async fn run(args: StoreBenchArgs) -> anyhow::Result<ExitCode> {
    let name = format!("tally_bench_{}", std::process::id());
    let (admin, connection) = tokio_postgres::connect(&args.database_url, NoTls).await.context("connecting")?;
    tokio::spawn(connection);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let Some(url) = store::sibling_database_url(&args.database_url, &name) else {
        anyhow::bail!("--database-url must end with /<database>");
    };
    let result = measure(&url, &args).await;
    if !args.keep {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    }
    let markdown = result?;
    print!("{markdown}");
    if let Some(path) = &args.output {
        std::fs::write(path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(url: &str, args: &StoreBenchArgs) -> anyhow::Result<String> {
    let store = store::connect(&DbArgs::for_url(url)).await?;
    store::migrate::migrate(&store).await?;

    let images_per_night = ((args.detections as f64 / 8.0 / 10.0).ceil() as usize).max(1);
    let config = WorkloadConfig { nights: 10, images_per_night, ..WorkloadConfig::default() };
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), config);
    let mut tables = Tables::default();
    tables.apply(&workload.setup());
    while (tables.detections.len() as u64) < args.detections {
        tables.apply(&workload.messages(1000));
    }
    let rows = tables.len() as f64;
    let start = Instant::now();
    store::seed::seed(&store, &tables).await?;
    let seed_s = start.elapsed().as_secs_f64();
    let detections = tables.detections.len() as u64;
    let occurrences = tables.occurrences.len() as u64;
    drop(tables);
    store.client().await?.batch_execute("VACUUM ANALYZE").await?;

    let mut engine = Engine::new(args.workers)?;
    let boot = store::bootstrap::bootstrap(&store, &mut engine).await?;

    let snapshot = engine.snapshot();
    let owners = snapshot.images.len() + snapshot.events.len() + snapshot.deployments.len();
    let start = Instant::now();
    let written = store::sink::write_all(&store, &snapshot).await?;
    let sink_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let unchanged = store::sink::write_all(&store, &snapshot).await?;
    let sink_same_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(unchanged.total() == 0, "second write touched {} rows", unchanged.total());

    let start = Instant::now();
    let verification = store::verify::verify(&store, Scope::default()).await?;
    let verify_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(verification.differences.is_empty(), "verify found {} differences", verification.differences.len());

    let per_million = 1e6 / detections.max(1) as f64;
    let mut out = format!(
        "`tally-tools bench store --detections {} -w {}`: {} detections, {} occurrences, {} rows in all\n\n",
        args.detections,
        args.workers,
        thousands(detections as i64),
        thousands(occurrences as i64),
        thousands(rows as i64)
    );
    out.push_str("| step | time | rate |\n|---|---:|---:|\n");
    out.push_str(&format!(
        "| seed (UNNEST inserts, one transaction; reference) | {seed_s:.1} s | {} rows/s |\n",
        thousands((rows / seed_s) as i64)
    ));
    out.push_str(&format!(
        "| bootstrap: COPY out of every input table into the dataflow | {:.1} s | {} rows/s |\n",
        boot.seconds,
        thousands((boot.rows as f64 / boot.seconds) as i64)
    ));
    out.push_str(&format!(
        "| sink: write {} owners' counts, every row differing | {sink_s:.2} s | {} changed owners/s |\n",
        thousands(written.total() as i64),
        thousands((written.total() as f64 / sink_s) as i64)
    ));
    out.push_str(&format!(
        "| sink: same {} owners again, nothing differing (no row touched) | {sink_same_s:.2} s | {} owners checked/s |\n",
        thousands(owners as i64),
        thousands((owners as f64 / sink_same_s) as i64)
    ));
    out.push_str(&format!(
        "| verify: SQL recompute of every count and diff | {verify_s:.1} s | {:.1} s per 1M detections |\n",
        verify_s * per_million
    ));
    Ok(out)
}
