//! The `tally-tools` command line: one subcommand per tool, dispatched from [`run`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally::cli::runtime;
use tally::telemetry::LogArgs;

use crate::{bench, demo, worker_sim};

/// tally's tools: the services-free demo, the benchmark harnesses that produce the figures in
/// docs/benchmarks.md, and simulated ADC workers.
#[derive(Debug, Parser)]
#[command(name = "tally-tools", version, propagate_version = true)]
pub struct Cli {
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the count dataflow on a synthetic deployment, with no services: stream ML results,
    /// edit a filter mid-stream, print the maintained counts, check them against a from-scratch
    /// recompute, and compare the time of both.
    Demo(demo::DemoArgs),
    /// Benchmarks that print figures side by side, measured in one run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Simulated ADC workers: claim jobs over the worker HTTP API, fetch tasks, post a
    /// deterministic synthetic result per task; print what they did and each call's latency.
    WorkerSim(worker_sim::cli::WorkerSimArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(command) => bench::run(command),
        Command::WorkerSim(args) => runtime()?.block_on(worker_sim::cli::run(args)),
    }
}

/// A score vector length for the simulated models: 1 to 30,000 classes (ADC's models have
/// 2,497 and 29,176).
pub fn parse_score_len(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("{s:?} is not a number of classes: {e}"))?;
    if (1..=30_000).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} classes: the score length must be from 1 to 30000"))
    }
}
