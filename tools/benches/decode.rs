//! Criterion: decoding and validating one result message (`ingest::decode::decode`) at the
//! benchmark's 100 classes and ADC's real 2,497 and 29,176, eight detections each (a binary
//! and a species classification per detection, full score and logit vectors). Throughput is
//! in bytes of JSON, so the three sizes compare directly.
//!
//! `cargo bench -p tally-tools --bench decode`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tally::ingest::decode::{decode, Envelope};
use tally_tools::synth::results::{ResultFactory, ResultKeys};

/// A result of `classes`-long vectors for the first image of the seed's sequence that has
/// exactly eight detections (the benchmark world's Poisson mean).
fn message(classes: usize) -> Vec<u8> {
    let factory = ResultFactory {
        species: (0..classes).map(|i| format!("Species {i}")).collect(),
        keys: ResultKeys::antenna_test("bench"),
        mean_detections: 8.0,
        score_len: classes,
        seed: 7,
    };
    (1..)
        .find(|&image| factory.response(image)["detections"].as_array().is_some_and(|d| d.len() == 8))
        .map(|image| factory.task_result("$JS.ACK.job_1.job-1-consumer.1.1.1.1700000000000000000.0", image))
        .unwrap_or_default()
}

fn one_result(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode one result");
    for classes in [100usize, 2_497, 29_176] {
        let body = message(classes);
        let envelope = Envelope { subject: "tally.results.1", prefix: "tally.results", max_bytes: usize::MAX };
        assert!(decode(&envelope, &body).is_ok(), "the benchmark's message must decode");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.sample_size(if classes > 10_000 { 20 } else { 50 });
        group.bench_with_input(BenchmarkId::from_parameter(classes), &body, |b, body| {
            b.iter(|| black_box(decode(&envelope, black_box(body))))
        });
    }
    group.finish();
}

criterion_group!(benches, one_result);
criterion_main!(benches);
