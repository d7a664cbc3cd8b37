//! tally: Antenna's ML-result ingest and count maintenance, as a daemon and a set of tools.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands and their arguments.
//! - [`config`]: database settings (flags and environment).
//! - [`ingest`]: NATS results → validated rows → incremental counts → acks (`tally serve`).
//! - [`jobs`]: exact job progress from the per-job image set.
//! - [`store`]: Postgres: migrations, schema checks, bootstrap, sink, verify.
//! - [`dead_letters`]: result messages that could not be saved: store, list, replay.
//! - [`gateway`]: the worker API (claim, tasks, result) and processing-service heartbeats.
//! - [`startup`]: waiting for Postgres and NATS at start-up (backoff, deadline, `/readyz` reason).
//! - [`http`]: the operations endpoints (`/healthz`, `/readyz`, `/metrics`).
//! - [`metrics`]: the daemon's Prometheus metric names and recorder.
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
pub mod dead_letters;
pub mod django_cache;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod plot;
pub mod results_stream;
pub mod startup;
pub mod stats;
pub mod store;
pub mod synth;
pub mod table;
pub mod taxa_file;
pub mod telemetry;
pub mod worker_sim;
