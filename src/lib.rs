//! tally: Antenna's ML-result ingest and count maintenance, as a daemon and a set of tools.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands and their arguments.
//! - [`config`]: database settings (flags and environment).
//! - [`store`]: Postgres: migrations, schema checks, bootstrap, sink, verify.
//! - [`synth`]: a synthetic ADC-like workload for the demo and the benchmarks.
//! - [`taxa_file`]: Antenna's taxonomy fixture files.
//! - [`plot`]: small SVG line charts for benchmark reports.
//! - [`stats`]: means, percentiles and resident memory for reports.
//! - [`table`]: aligned terminal tables and timestamp formatting.
//! - [`telemetry`]: `tracing` setup (text or JSON).
//!
//! The count dataflow itself, its engine and its oracle live in the `tally-dataflows` crate.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod plot;
pub mod stats;
pub mod store;
pub mod synth;
pub mod table;
pub mod taxa_file;
pub mod telemetry;
