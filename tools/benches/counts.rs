//! Criterion: one ML result applied incrementally by the count dataflow, against recomputing
//! the image, event and deployment it touches from scratch (what Antenna does per message),
//! at deployments of 10k and 100k detections; and the bulk-load rate.
//!
//! `cargo bench --bench counts`. The 1M-detection figures come from `tally bench dataflow`,
//! which measures the same operations in one run (criterion's repeated setup at 1M is slow).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tally_dataflows::oracle::Oracle;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::{Engine, Tables};
use tally_tools::synth::{Workload, WorkloadConfig};

/// An engine loaded with about `detections` detections, the rows it was given (for the
/// oracle) and the workload that made them.
fn loaded(detections: u64) -> (Engine, Tables, Workload) {
    let images_per_night = (detections / 80).max(1) as usize;
    let config = WorkloadConfig { nights: 10, images_per_night, ..WorkloadConfig::default() };
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), config);
    let mut engine = Engine::new(1).expect("engine");
    let mut tables = Tables::default();
    let setup = workload.setup();
    engine.apply(&setup).expect("setup");
    tables.apply(&setup);
    while (tables.detections.len() as u64) < detections {
        let batch = workload.messages(1000);
        engine.apply(&batch).expect("load");
        tables.apply(&batch);
    }
    (engine, tables, workload)
}

fn per_result(c: &mut Criterion) {
    let mut group = c.benchmark_group("one result");
    group.sample_size(20);
    for size in [10_000u64, 100_000] {
        let (mut engine, tables, mut workload) = loaded(size);
        // Recompute first: every incremental iteration below adds a result to the deployment.
        let image = *tables.images.keys().next().expect("an image");
        let oracle = Oracle::new(&tables);
        group.bench_with_input(BenchmarkId::new("recompute", size), &size, |b, _| {
            b.iter(|| black_box(oracle.recompute_for_image(image)))
        });
        drop(oracle);
        group.bench_with_input(BenchmarkId::new("incremental", size), &size, |b, _| {
            b.iter_batched(|| workload.message(), |m| engine.apply(&m).expect("apply"), BatchSize::SmallInput)
        });
    }
    group.finish();
}

fn bulk_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulk load");
    group.sample_size(10);
    let config = WorkloadConfig { nights: 10, images_per_night: 1_000, ..WorkloadConfig::default() };
    let mut workload = Workload::new(Taxonomy::synthetic(10, 10, 20), config);
    let batch = workload.messages(1_250);
    group.throughput(Throughput::Elements(batch.detections.len() as u64));
    group.bench_function("10k detections in one batch", |b| {
        b.iter_batched(
            || {
                let mut engine = Engine::new(1).expect("engine");
                let mut setup = Workload::new(Taxonomy::synthetic(10, 10, 20), WorkloadConfig::default());
                engine.apply(&setup.setup()).expect("setup");
                engine
            },
            |mut engine| {
                engine.apply(&batch).expect("load");
                engine
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, per_result, bulk_load);
criterion_main!(benches);
