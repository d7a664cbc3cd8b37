//! tally: Antenna's ML-result ingest and count maintenance, as a daemon and a set of tools.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands (`demo`, `bench`) and their arguments.
//! - [`synth`]: a synthetic ADC-like workload for the demo and the benchmarks.
//! - [`taxa_file`]: Antenna's taxonomy fixture files.
//! - [`stats`]: means, percentiles and resident memory for reports.
//! - [`table`]: aligned terminal tables and timestamp formatting.
//! - [`telemetry`]: `tracing` setup (text or JSON).
//!
//! The count dataflow itself, its engine and its oracle live in the `tally-dataflows` crate.
#![warn(missing_docs)]

pub mod cli;
pub mod stats;
pub mod synth;
pub mod table;
pub mod taxa_file;
pub mod telemetry;
