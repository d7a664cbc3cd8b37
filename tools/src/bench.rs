//! `tally-tools bench`: benchmark harnesses that measure competing approaches side by side, in one
//! run, and print a markdown table (the README's figures come from here).

pub mod dataflow;
pub mod feed;
pub mod ingest;
pub mod jobs;
pub mod store;

use std::process::ExitCode;

use clap::Subcommand;

/// The benchmark harnesses.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The count dataflow alone, no services: per-result cost (incremental vs recompute of the
    /// affected owners) at several deployment sizes, bulk-load rate, a filter edit, memory.
    Dataflow(dataflow::DataflowArgs),
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
    /// One peer process of `bench dataflow --processes N` (started by it, not by hand).
    #[command(hide = true)]
    DataflowPeer(dataflow::PeerArgs),
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
        BenchCommand::Dataflow(args) => dataflow::run(args),
        BenchCommand::DataflowPeer(args) => dataflow::peer(args),
        BenchCommand::Store(args) => tally::cli::runtime()?.block_on(crate::bench::store::run(args)),
        BenchCommand::Ingest(args) => tally::cli::runtime()?.block_on(crate::bench::ingest::run(*args)),
        BenchCommand::Jobs(args) => tally::cli::runtime()?.block_on(crate::bench::jobs::run(*args)),
        BenchCommand::Feed(args) => tally::cli::runtime()?.block_on(crate::bench::feed::run(*args)),
    }
}
