//! `tally-tools demo`: the count dataflow on a synthetic deployment, checked against the oracle.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tally_dataflows::oracle::{recompute, Oracle};
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{AllCounts, Engine, Id, Tables};

use crate::stats::{human_us, Samples};
use crate::synth::{Workload, WorkloadConfig};
use tally::table::{format_opt_micros, thousands, Table};

/// Options of `tally-tools demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Antenna taxonomy fixture (JSON rows of species, genus, family), e.g.
    /// ../shared/data/taxa-quebec-vermont-2022.json; default: a built-in synthetic taxonomy of
    /// 10 families × 10 genera × 20 species.
    #[arg(long)]
    pub taxa: Option<PathBuf>,
    /// Nights of captures (one event each).
    #[arg(long, default_value_t = 5)]
    pub nights: usize,
    /// Images per night; each image is one ML result message.
    #[arg(long, default_value_t = 400)]
    pub images_per_night: usize,
    /// Mean detections per image (Poisson).
    #[arg(long, default_value_t = 8.0)]
    pub mean_detections: f64,
    /// Result messages applied per dataflow time (ingest batches them the same way).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timely worker threads.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Runs the demo; exits non-zero if the maintained counts differ from the recompute.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let taxonomy = match &args.taxa {
        Some(path) => tally::taxa_file::load(path)?,
        None => Taxonomy::synthetic(10, 10, 20),
    };
    println!(
        "taxonomy: {} taxa ({} families, {} genera, {} species){}",
        thousands(taxonomy.taxa.len() as i64),
        taxonomy.of_rank(Rank::Family).len(),
        taxonomy.of_rank(Rank::Genus).len(),
        taxonomy.of_rank(Rank::Species).len(),
        args.taxa.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default(),
    );
    let config = WorkloadConfig {
        nights: args.nights.max(1),
        images_per_night: args.images_per_night.max(1),
        mean_detections: args.mean_detections,
        include_fraction: 0.5,
        seed: args.seed,
    };
    let mut workload = Workload::new(taxonomy, config);
    let mut engine = Engine::new(args.workers).context("starting the dataflow")?;
    // The rows applied, for the oracle (the engine keeps no copy of its own).
    let mut tables = Tables::default();
    let setup = workload.setup();
    engine.apply(&setup)?;
    tables.apply(&setup);
    describe_filters(&workload);

    let messages = workload.total_images();
    let batch_size = args.batch.max(1);
    let edit_at = messages / 2;
    let bar = ProgressBar::new(messages as u64).with_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} results  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("streaming");
    let mut incremental = Samples::new();
    let mut changed_owners = 0usize;
    let mut sent = 0;
    let mut edited = None;
    while sent < messages {
        let n = batch_size.min(messages - sent);
        let batch = workload.messages(n);
        sent += n;
        let start = Instant::now();
        changed_owners += engine.apply(&batch)?.len();
        incremental.push(start.elapsed());
        tables.apply(&batch);
        bar.inc(n as u64);
        if edited.is_none() && sent >= edit_at {
            if let Some(edit) = workload.include_next_family() {
                let start = Instant::now();
                let changes = engine.apply(&edit)?;
                edited = Some((start.elapsed(), changes.len()));
                tables.apply(&edit);
                let line = format!(
                    "filter edit after {sent} results: included family {} → {} owners changed in {}",
                    workload.taxonomy.names[workload.included_families.last().unwrap_or(&0)],
                    changes.len(),
                    human_us(start.elapsed().as_secs_f64() * 1e6),
                );
                // On a terminal above the bar; elsewhere the bar is hidden and so is its println.
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
            }
        }
    }
    bar.finish_and_clear();

    let counts = engine.snapshot();
    print_counts(&counts, &workload);

    // The oracle, from scratch: full recompute, and per-message recompute of the owners a
    // result touches (image, event, deployment), with indexes already built.
    let start = Instant::now();
    let expected = recompute(&tables);
    let full = start.elapsed();
    let oracle = Oracle::new(&tables);
    let mut affected = Samples::new();
    let images: Vec<Id> = tables.images.keys().copied().take(200).collect();
    for image in images {
        let start = Instant::now();
        std::hint::black_box(oracle.recompute_for_image(image));
        affected.push(start.elapsed());
    }

    println!();
    let detections = tables.detections.len();
    println!(
        "{} results, {} detections, {} occurrences: {} owner updates reported",
        thousands(messages as i64),
        thousands(detections as i64),
        thousands(tables.occurrences.len() as i64),
        thousands(changed_owners as i64),
    );
    let mut timing = Table::new(&["", ">per result", ">p99", ">total"]);
    timing.row(vec![
        "incremental (dataflow)".into(),
        human_us(incremental.mean_us() / batch_size as f64),
        human_us(incremental.quantile_us(0.99)),
        format!("{:.2} s", incremental.total_s()),
    ]);
    timing.row(vec![
        "recompute image+event+deployment".into(),
        human_us(affected.mean_us()),
        human_us(affected.quantile_us(0.99)),
        format!("{:.2} s", affected.mean_us() * messages as f64 / 1e6),
    ]);
    timing.row(vec![
        "recompute everything once".into(),
        String::new(),
        String::new(),
        human_us(full.as_secs_f64() * 1e6),
    ]);
    print!("{}", timing.render());
    if incremental.mean_us() > 0.0 {
        println!(
            "recomputing the owners each result touches costs {:.0}× the incremental update (at {} detections)",
            affected.mean_us() / (incremental.mean_us() / batch_size as f64),
            thousands(detections as i64),
        );
    }
    if let Some((took, owners)) = edited {
        println!("filter edit: {owners} owners updated in {}", human_us(took.as_secs_f64() * 1e6));
    }

    if counts == expected {
        println!("✓ every maintained count equals the from-scratch recompute");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("✗ maintained counts differ from the recompute:");
        print_differences(&counts, &expected);
        Ok(ExitCode::FAILURE)
    }
}

fn describe_filters(w: &Workload) {
    let names = |ids: &[Id]| ids.iter().map(|i| w.taxonomy.names[i].clone()).collect::<Vec<_>>().join(", ");
    println!("project {}: score ≥ 0.5, include {} families ({})", w.project, w.included_families.len(), {
        let shown: Vec<Id> = w.included_families.iter().take(4).copied().collect();
        let more = w.included_families.len().saturating_sub(4);
        if more > 0 {
            format!("{}, … {more} more", names(&shown))
        } else {
            names(&shown)
        }
    });
    if let Some(genus) = w.excluded_genus {
        println!("             exclude genus {} (inside an included family: exclude wins)", w.taxonomy.names[&genus]);
    }
    println!(
        "deployment {}: {} nights × {} images, ~{} detections per image\n",
        w.deployment, w.config.nights, w.config.images_per_night, w.config.mean_detections
    );
}

fn print_counts(counts: &AllCounts, w: &Workload) {
    let mut events = Table::new(&["event", "start (UTC)", "end (UTC)", ">captures", ">detections", ">occurrences"]);
    for (id, c) in &counts.events {
        events.row(vec![
            id.to_string(),
            format_opt_micros(c.start),
            format_opt_micros(c.end),
            thousands(c.captures),
            thousands(c.detections),
            thousands(c.occurrences),
        ]);
    }
    println!("events (counts under project {}'s filters)", w.project);
    print!("{}", events.render());
    println!();
    let mut deployments = Table::new(&[
        "deployment",
        ">events",
        ">captures",
        ">size (MB)",
        ">detections",
        ">occurrences",
        ">taxa",
        "first capture (UTC)",
        "last capture (UTC)",
    ]);
    for (id, c) in &counts.deployments {
        deployments.row(vec![
            id.to_string(),
            thousands(c.events),
            thousands(c.captures),
            c.total_size.map(|s| thousands(s / 1_000_000)).unwrap_or_else(|| "—".into()),
            thousands(c.detections),
            thousands(c.occurrences),
            thousands(c.taxa),
            format_opt_micros(c.first_capture),
            format_opt_micros(c.last_capture),
        ]);
    }
    print!("{}", deployments.render());
}

fn print_differences(actual: &AllCounts, expected: &AllCounts) {
    for (id, e) in &expected.events {
        if actual.events.get(id) != Some(e) {
            println!("  event {id}: maintained {:?}, recomputed {e:?}", actual.events.get(id));
        }
    }
    for (id, e) in &expected.deployments {
        if actual.deployments.get(id) != Some(e) {
            println!("  deployment {id}: maintained {:?}, recomputed {e:?}", actual.deployments.get(id));
        }
    }
    let images = expected.images.iter().filter(|(id, e)| actual.images.get(id) != Some(e)).count();
    if images > 0 {
        println!("  {images} images differ");
    }
}
