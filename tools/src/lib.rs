//! tally's tools: everything that exercises the daemon rather than being it. None of this is
//! linked into `tally serve`.
//!
//! - [`cli`]: the `tally-tools` subcommands (`demo`, `bench …`, `worker-sim`).
//! - [`demo`]: the count dataflow on a synthetic deployment, no services.
//! - [`bench`]: benchmark harnesses that measure competing approaches side by side in one run.
//! - [`worker_sim`]: simulated ADC workers over the worker HTTP API.
//! - [`synth`]: a synthetic ADC-like workload (worlds, results, async jobs, preloads).
//! - [`plot`]: small SVG line charts for benchmark reports.
//! - [`stats`]: means, percentiles and resident memory for reports.
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod demo;
pub mod plot;
pub mod stats;
pub mod synth;
pub mod worker_sim;
