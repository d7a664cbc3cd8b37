//! Command-line interface: one module per subcommand, dispatched from [`run`].

pub mod bench;
pub mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::LogArgs;

/// tally keeps Antenna's stored counts (per event, deployment and image, under each
/// project's score threshold and include/exclude taxa) exact and up to date, incrementally.
#[derive(Debug, Parser)]
#[command(name = "tally", version, propagate_version = true)]
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
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(command) => bench::run(command),
    }
}
