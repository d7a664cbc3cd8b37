//! `tally-tools bench dataflow`: the count dataflow alone, no services. Per-result cost
//! (incremental vs recompute of the affected owners) at several deployment sizes, bulk-load
//! rate, a filter edit and memory, on one process or on a timely cluster of several processes
//! (the peers are child processes of this command, talking over loopback TCP).

mod peers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tally_dataflows::oracle::Oracle;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::{Engine, Tables};

use crate::plot::{Chart, Series};
use crate::stats::{human_us, resident_bytes, Samples};
use crate::synth::{Workload, WorkloadConfig};
use tally::table::thousands;

pub use peers::PeerArgs;

/// Options of `tally-tools bench dataflow`.
#[derive(Debug, Args)]
pub struct DataflowArgs {
    /// Deployment sizes in detections, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<u64>,
    /// Timely processes, comma separated: each count is measured at every size. Above 1, the
    /// other processes are child processes of this command on 127.0.0.1, and the memory column
    /// shows every process.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub processes: Vec<usize>,
    /// Single result messages timed at each size.
    #[arg(long, default_value_t = 500)]
    pub messages: usize,
    /// Recomputes timed at each size on one process (each scans the whole deployment: slow at
    /// 1M). Not repeated for clusters: the recompute does not depend on the topology.
    #[arg(long, default_value_t = 20)]
    pub recompute_samples: usize,
    /// Result messages per dataflow time during the bulk load.
    #[arg(long, default_value_t = 1000)]
    pub load_batch: usize,
    /// Timely worker threads per process.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Also write the markdown table to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also draw per-result cost against deployment size (SVG, log-log) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Also draw memory per detection of each process against the number of processes, at the
    /// largest size (SVG) to this file.
    #[arg(long)]
    pub memory_plot: Option<PathBuf>,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

/// Figures measured at one deployment size on one topology.
#[derive(Debug, Serialize)]
struct SizeReport {
    processes: usize,
    detections: u64,
    /// (c) bulk load, detections per second.
    load_rate: f64,
    /// (a) one result message, incremental: mean and p99 in µs.
    incremental_mean_us: f64,
    incremental_p99_us: f64,
    /// (b) recompute of the image, event and deployment a message touches: mean µs (one
    /// process only).
    recompute_mean_us: Option<f64>,
    /// (d) including one more family (10% of species) in the project filter: µs and owners changed.
    filter_edit_us: f64,
    filter_edit_owners: usize,
    /// (e) resident memory growth per loaded detection, bytes, of each process (process 0,
    /// which also holds the counts, first), read once process 0's feeding worker has finished
    /// the merges the load began (`Engine::settle`).
    bytes_per_detection: Vec<Option<f64>>,
}

/// Runs the benchmark.
pub fn run(args: DataflowArgs) -> anyhow::Result<ExitCode> {
    let mut reports = Vec::new();
    for &processes in &args.processes {
        for &size in &args.sizes {
            reports.push(measure(size, processes.max(1), &args)?);
        }
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
    if let Some(path) = &args.memory_plot {
        std::fs::write(path, memory_plot(&reports).to_svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one peer process of a cluster until process 0 ends it.
pub fn peer(args: PeerArgs) -> anyhow::Result<ExitCode> {
    peers::run(args)
}

fn workload_config(size: u64) -> WorkloadConfig {
    // 10 families: including one more family flips the filter for 10% of the detections.
    let images_per_night = ((size as f64 / 8.0 / 10.0).ceil() as usize).max(1);
    WorkloadConfig { nights: 10, images_per_night, mean_detections: 8.0, include_fraction: 0.5, seed: size }
}

fn measure(size: u64, processes: usize, args: &DataflowArgs) -> anyhow::Result<SizeReport> {
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), workload_config(size));
    let (mut engine, peers) = if processes == 1 {
        (Engine::new(args.workers).context("starting the dataflow")?, None)
    } else {
        let (engine, peers) = peers::start(processes, args.workers)?;
        (engine, Some(peers))
    };
    engine.apply(&workload.setup())?;

    let rss = |peers: &Option<peers::Peers>| {
        let mut all = vec![resident_bytes()];
        if let Some(peers) = peers {
            all.extend(peers.resident_bytes());
        }
        all
    };
    let rss_before = rss(&peers);
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} detections  {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("load {} ×{processes}", thousands(size as i64)));
    let mut loading = 0.0;
    let mut loaded = 0u64;
    let mut load_calls = 0usize;
    while loaded < size {
        let batch = workload.messages(args.load_batch.max(1));
        load_calls += 1;
        loaded += batch.detections.len() as u64;
        let start = Instant::now();
        engine.apply(&batch)?;
        loading += start.elapsed().as_secs_f64();
        bar.set_position(loaded);
    }
    bar.finish_and_clear();
    // Memory at rest: once worker 0 has finished the merges the load began (it would between
    // batches anyway), so that the figure does not depend on where a merge happened to be.
    engine.settle()?;
    // As `tally serve` and `tally rebuild` do after loading the database.
    tally::memory::trim();
    let rss_after = rss(&peers);

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
    // from scratch (indexes already built, as Postgres' are). The engine keeps no copy of the
    // rows, so the oracle's are generated again from the same seed, after memory was measured.
    let recompute_mean_us = if processes == 1 {
        let tables = replay(size, args.load_batch.max(1), load_calls, args.messages);
        let oracle = Oracle::new(&tables);
        let mut recompute = Samples::new();
        for image in touched.iter().take(args.recompute_samples.max(1)) {
            let start = Instant::now();
            std::hint::black_box(oracle.recompute_for_image(*image));
            recompute.push(start.elapsed());
        }
        Some(recompute.mean_us())
    } else {
        None
    };

    // (d) a filter edit affecting 10% of the detections.
    let (filter_edit_us, filter_edit_owners) = match workload.include_next_family() {
        Some(edit) => {
            let start = Instant::now();
            let changes = engine.apply(&edit)?;
            (start.elapsed().as_secs_f64() * 1e6, changes.len())
        }
        None => (0.0, 0),
    };
    drop(engine);
    if let Some(peers) = peers {
        peers.wait()?;
    }

    let bytes_per_detection = rss_before
        .iter()
        .zip(&rss_after)
        .map(|(before, after)| match (before, after) {
            (Some(b), Some(a)) if loaded > 0 => Some(a.saturating_sub(*b) as f64 / loaded as f64),
            _ => None,
        })
        .collect();
    Ok(SizeReport {
        processes,
        detections: loaded,
        load_rate: loaded as f64 / loading.max(1e-9),
        incremental_mean_us: incremental.mean_us(),
        incremental_p99_us: incremental.quantile_us(0.99),
        recompute_mean_us,
        filter_edit_us,
        filter_edit_owners,
        bytes_per_detection,
    })
}

/// The rows a measurement at `size` applied: the same workload, replayed into [`Tables`].
fn replay(size: u64, load_batch: usize, load_calls: usize, messages: usize) -> Tables {
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), workload_config(size));
    let mut tables = Tables::default();
    tables.apply(&workload.setup());
    for _ in 0..load_calls {
        tables.apply(&workload.messages(load_batch));
    }
    for _ in 0..messages {
        tables.apply(&workload.message());
    }
    tables
}

fn plot(reports: &[SizeReport]) -> Chart {
    let one: Vec<&SizeReport> = reports.iter().filter(|r| r.processes == 1).collect();
    let series = |name: &str, color, points: Vec<(f64, f64)>| Series { name: name.to_string(), color, points };
    let mut series_list = vec![
        series(
            "recompute image + event + deployment (what Antenna does)",
            "#c0392b",
            one.iter().filter_map(|r| r.recompute_mean_us.map(|us| (r.detections as f64, us))).collect(),
        ),
        series(
            "incremental (tally dataflow), mean",
            "#2471a3",
            one.iter().map(|r| (r.detections as f64, r.incremental_mean_us)).collect(),
        ),
        series(
            "incremental, p99",
            "#7fb3d5",
            one.iter().map(|r| (r.detections as f64, r.incremental_p99_us)).collect(),
        ),
    ];
    let colors = ["#1e8449", "#7d3c98", "#b9770e", "#566573"];
    let mut cluster_sizes: Vec<usize> = reports.iter().map(|r| r.processes).filter(|p| *p > 1).collect();
    cluster_sizes.dedup();
    for (n, processes) in cluster_sizes.into_iter().enumerate() {
        series_list.push(series(
            &format!("incremental, mean, {processes} processes"),
            colors[n % colors.len()],
            reports
                .iter()
                .filter(|r| r.processes == processes)
                .map(|r| (r.detections as f64, r.incremental_mean_us))
                .collect(),
        ));
    }
    Chart {
        title: "Cost of one ML result vs deployment size".into(),
        x_label: "detections in the deployment".into(),
        y_label: "µs per result".into(),
        series: series_list,
        log_x: true,
        log_y: true,
    }
}

/// Memory per detection of process 0 and of the largest other process, against the number of
/// processes, at the largest size measured.
fn memory_plot(reports: &[SizeReport]) -> Chart {
    let largest = reports.iter().map(|r| r.detections).max().unwrap_or(0);
    let at_largest: Vec<&SizeReport> = reports.iter().filter(|r| r.detections == largest).collect();
    let point = |r: &&SizeReport, pick: fn(&[Option<f64>]) -> Option<f64>| {
        pick(&r.bytes_per_detection).map(|b| (r.processes as f64, b))
    };
    let first = |all: &[Option<f64>]| all.first().copied().flatten();
    let peak = |all: &[Option<f64>]| all.iter().flatten().copied().reduce(f64::max);
    let mean = |all: &[Option<f64>]| {
        let known: Vec<f64> = all.iter().flatten().copied().collect();
        (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
    };
    Chart {
        title: format!("Resident memory per detection, per process, at {} detections", thousands(largest as i64)),
        x_label: "timely processes".into(),
        y_label: "bytes per detection".into(),
        series: vec![
            Series {
                name: "process 0 (feeds the input, holds the counts)".into(),
                color: "#2471a3",
                points: at_largest.iter().filter_map(|r| point(r, first)).collect(),
            },
            Series {
                name: "largest process".into(),
                color: "#c0392b",
                points: at_largest.iter().filter_map(|r| point(r, peak)).collect(),
            },
            Series {
                name: "mean over processes".into(),
                color: "#1e8449",
                points: at_largest.iter().filter_map(|r| point(r, mean)).collect(),
            },
        ],
        log_x: false,
        log_y: false,
    }
}

fn render(reports: &[SizeReport], args: &DataflowArgs) -> String {
    let mut out = format!(
        "`tally-tools bench dataflow --sizes {} --processes {} --messages {} --recompute-samples {} --load-batch {} -w {}`\n\n",
        args.sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        args.processes.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        args.messages,
        args.recompute_samples,
        args.load_batch,
        args.workers
    );
    out.push_str("| processes | detections in deployment | (a) one result, incremental: mean / p99 | (b) recompute image+event+deployment | (b)/(a) | (c) bulk load | (d) include edit, 10% of detections | (e) memory per detection, per process |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let bytes: Vec<String> = r
            .bytes_per_detection
            .iter()
            .map(|b| b.map(|b| format!("{b:.0} B")).unwrap_or_else(|| "n/a".into()))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} / {} | {} | {} | {} det/s | {} ({} owners) | {} |\n",
            r.processes,
            thousands(r.detections as i64),
            human_us(r.incremental_mean_us),
            human_us(r.incremental_p99_us),
            r.recompute_mean_us.map(human_us).unwrap_or_else(|| "—".into()),
            r.recompute_mean_us
                .map(|us| format!("{:.0}×", us / r.incremental_mean_us.max(1e-9)))
                .unwrap_or_else(|| "—".into()),
            thousands(r.load_rate as i64),
            human_us(r.filter_edit_us),
            r.filter_edit_owners,
            bytes.join(" / "),
        ));
    }
    let mut processes: Vec<usize> = reports.iter().map(|r| r.processes).collect();
    processes.dedup();
    for p in processes {
        let of: Vec<&SizeReport> = reports.iter().filter(|r| r.processes == p).collect();
        if let (Some(first), Some(last)) = (of.first(), of.last()) {
            if of.len() > 1 {
                out.push_str(&format!(
                    "\n{p} process(es): (a) at {} is {:.2}× (a) at {}.",
                    thousands(last.detections as i64),
                    last.incremental_mean_us / first.incremental_mean_us.max(1e-9),
                    thousands(first.detections as i64)
                ));
            }
        }
    }
    out.push('\n');
    out
}
