//! `tally-tools bench`: benchmark harnesses that measure competing approaches side by side, in one
//! run, and print a markdown table (the README's figures come from here).

pub mod feed;
pub mod ingest;
pub mod jobs;
pub mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tally_dataflows::oracle::Oracle;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::Engine;

use crate::plot::{Chart, Series};
use crate::stats::{human_us, resident_bytes, Samples};
use crate::synth::{Workload, WorkloadConfig};
use tally::table::thousands;

/// The benchmark harnesses.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The count dataflow alone, no services: per-result cost (incremental vs recompute of the
    /// affected owners) at several deployment sizes, bulk-load rate, a filter edit, memory.
    Dataflow(DataflowArgs),
    /// Postgres: seed a scratch database with a synthetic deployment, then time the bootstrap,
    /// the changed-count sink and `verify`.
    Store(crate::bench::store::StoreBenchArgs),
    /// Ingest end to end (NATS JetStream → Postgres → acks) for each count strategy:
    /// throughput, publish → ack latency, the raw COPY ceiling and issue 4's targets.
    Ingest(Box<crate::bench::ingest::IngestBenchArgs>),
    /// Async jobs end to end (issue 5): N jobs × M images drained by simulated ADC workers over
    /// the worker API while ingest saves the results; completion times, throughput, call
    /// latencies, redeliveries, exact progress and fairness; then 32 claim pollers and result
    /// POSTs alone; and the targets.
    Jobs(Box<crate::bench::jobs::JobsBenchArgs>),
    /// The change feed (issue 10): the feed triggers' overhead on Django's own statements
    /// (bulk UPDATE, `save_results`, count-only UPDATE; with vs without), single-row edit →
    /// counts committed latency alone and under ingest, and filter edits on a large project;
    /// and the goals.
    Feed(Box<crate::bench::feed::FeedBenchArgs>),
}

/// Options of `tally-tools bench dataflow`.
#[derive(Debug, Args)]
pub struct DataflowArgs {
    /// Deployment sizes in detections, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<u64>,
    /// Single result messages timed at each size.
    #[arg(long, default_value_t = 500)]
    pub messages: usize,
    /// Recomputes timed at each size (each scans the whole deployment: slow at 1M).
    #[arg(long, default_value_t = 20)]
    pub recompute_samples: usize,
    /// Result messages per dataflow time during the bulk load.
    #[arg(long, default_value_t = 1000)]
    pub load_batch: usize,
    /// Timely worker threads.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Also write the markdown table to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also draw per-result cost against deployment size (SVG, log-log) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

/// Deletes the NATS streams a harness created (at its end, also after Ctrl-C or an error);
/// a NATS that does not answer leaves them.
pub(crate) async fn delete_streams(nats_url: &str, streams: &std::sync::Mutex<Vec<String>>) {
    let streams = streams.lock().map(|s| s.clone()).unwrap_or_default();
    if let Ok(client) = async_nats::connect(nats_url).await {
        let js = async_nats::jetstream::new(client);
        for name in streams {
            let _ = js.delete_stream(name).await;
        }
    }
}

/// Runs a benchmark harness.
pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Dataflow(args) => dataflow(args),
        BenchCommand::Store(args) => tally::cli::runtime()?.block_on(crate::bench::store::run(args)),
        BenchCommand::Ingest(args) => tally::cli::runtime()?.block_on(crate::bench::ingest::run(*args)),
        BenchCommand::Jobs(args) => tally::cli::runtime()?.block_on(crate::bench::jobs::run(*args)),
        BenchCommand::Feed(args) => tally::cli::runtime()?.block_on(crate::bench::feed::run(*args)),
    }
}

/// Figures measured at one deployment size.
#[derive(Debug, Serialize)]
struct SizeReport {
    detections: u64,
    /// (c) bulk load, detections per second.
    load_rate: f64,
    /// (a) one result message, incremental: mean and p99 in µs.
    incremental_mean_us: f64,
    incremental_p99_us: f64,
    /// (b) recompute of the image, event and deployment a message touches: mean µs.
    recompute_mean_us: f64,
    /// (d) including one more family (10% of species) in the project filter: µs and owners changed.
    filter_edit_us: f64,
    filter_edit_owners: usize,
    /// (e) resident memory growth per loaded detection, bytes.
    bytes_per_detection: Option<f64>,
    /// Of which the input-row mirror (`Tables`), estimated from hash-table capacity.
    mirror_bytes_per_detection: f64,
}

fn dataflow(args: DataflowArgs) -> anyhow::Result<ExitCode> {
    let mut reports = Vec::new();
    for &size in &args.sizes {
        reports.push(measure(size, &args)?);
    }
    let markdown = render(&reports, &args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{markdown}");
    }
    if let Some(path) = &args.output {
        std::fs::write(path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot(&reports).to_svg()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(size: u64, args: &DataflowArgs) -> anyhow::Result<SizeReport> {
    // 10 families: including one more family flips the filter for 10% of the detections.
    let images_per_night = ((size as f64 / 8.0 / 10.0).ceil() as usize).max(1);
    let config =
        WorkloadConfig { nights: 10, images_per_night, mean_detections: 8.0, include_fraction: 0.5, seed: size };
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), config);
    let mut engine = Engine::new(args.workers).context("starting the dataflow")?;
    engine.apply(&workload.setup())?;

    let rss_before = resident_bytes();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} detections  {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("load {}", thousands(size as i64)));
    let mut loading = 0.0;
    while (engine.tables().detections.len() as u64) < size {
        let batch = workload.messages(args.load_batch.max(1));
        let start = Instant::now();
        engine.apply(&batch)?;
        loading += start.elapsed().as_secs_f64();
        bar.set_position(engine.tables().detections.len() as u64);
    }
    bar.finish_and_clear();
    let loaded = engine.tables().detections.len() as u64;
    let rss_after = resident_bytes();
    let mirror_bytes_per_detection = engine.tables().approx_heap_bytes() as f64 / loaded.max(1) as f64;

    // (a) single result messages, one dataflow time each.
    let mut incremental = Samples::new();
    let mut touched = Vec::new();
    for _ in 0..args.messages {
        let message = workload.message();
        touched.extend(message.images.iter().map(|(id, _)| *id));
        let start = Instant::now();
        engine.apply(&message)?;
        incremental.push(start.elapsed());
    }

    // (b) what Antenna does per message: recompute the touched image, event and deployment
    // from scratch (indexes already built, as Postgres' are).
    let oracle = Oracle::new(engine.tables());
    let mut recompute = Samples::new();
    for image in touched.iter().take(args.recompute_samples.max(1)) {
        let start = Instant::now();
        std::hint::black_box(oracle.recompute_for_image(*image));
        recompute.push(start.elapsed());
    }
    drop(oracle);

    // (d) a filter edit affecting 10% of the detections.
    let (filter_edit_us, filter_edit_owners) = match workload.include_next_family() {
        Some(edit) => {
            let start = Instant::now();
            let changes = engine.apply(&edit)?;
            (start.elapsed().as_secs_f64() * 1e6, changes.len())
        }
        None => (0.0, 0),
    };

    let bytes_per_detection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if loaded > 0 => Some(a.saturating_sub(b) as f64 / loaded as f64),
        _ => None,
    };
    Ok(SizeReport {
        detections: loaded,
        load_rate: loaded as f64 / loading.max(1e-9),
        incremental_mean_us: incremental.mean_us(),
        incremental_p99_us: incremental.quantile_us(0.99),
        recompute_mean_us: recompute.mean_us(),
        filter_edit_us,
        filter_edit_owners,
        bytes_per_detection,
        mirror_bytes_per_detection,
    })
}

fn plot(reports: &[SizeReport]) -> Chart {
    let series = |name: &str, color, y: fn(&SizeReport) -> f64| Series {
        name: name.to_string(),
        color,
        points: reports.iter().map(|r| (r.detections as f64, y(r))).collect(),
    };
    Chart {
        title: "Cost of one ML result vs deployment size".into(),
        x_label: "detections in the deployment".into(),
        y_label: "µs per result".into(),
        series: vec![
            series("recompute image + event + deployment (what Antenna does)", "#c0392b", |r| r.recompute_mean_us),
            series("incremental (tally dataflow), mean", "#2471a3", |r| r.incremental_mean_us),
            series("incremental, p99", "#7fb3d5", |r| r.incremental_p99_us),
        ],
        log_x: true,
        log_y: true,
    }
}

fn render(reports: &[SizeReport], args: &DataflowArgs) -> String {
    let mut out = format!(
        "`tally-tools bench dataflow --sizes {} --messages {} --recompute-samples {} --load-batch {} -w {}`\n\n",
        args.sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        args.messages,
        args.recompute_samples,
        args.load_batch,
        args.workers
    );
    out.push_str("| detections in deployment | (a) one result, incremental: mean / p99 | (b) recompute image+event+deployment | (b)/(a) | (c) bulk load | (d) include edit, 10% of detections | (e) memory per detection (of which row mirror) |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        out.push_str(&format!(
            "| {} | {} / {} | {} | {:.0}× | {} det/s | {} ({} owners) | {} |\n",
            thousands(r.detections as i64),
            human_us(r.incremental_mean_us),
            human_us(r.incremental_p99_us),
            human_us(r.recompute_mean_us),
            r.recompute_mean_us / r.incremental_mean_us.max(1e-9),
            thousands(r.load_rate as i64),
            human_us(r.filter_edit_us),
            r.filter_edit_owners,
            r.bytes_per_detection
                .map(|b| format!("{b:.0} B ({:.0} B)", r.mirror_bytes_per_detection))
                .unwrap_or_else(|| "n/a".into()),
        ));
    }
    if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
        if reports.len() > 1 {
            out.push_str(&format!(
                "\n(a) at {} is {:.2}× (a) at {}.\n",
                thousands(last.detections as i64),
                last.incremental_mean_us / first.incremental_mean_us.max(1e-9),
                thousands(first.detections as i64)
            ));
        }
    }
    out
}
