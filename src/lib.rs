//! tally: Antenna's ML-result ingest and count maintenance, as a daemon and a set of tools.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands and their arguments.
//! - [`config`]: database settings (flags and environment).
//! - [`duration`]: the parsers of duration flags ("250ms", "5s"; bare numbers in the flag's old unit).
//! - [`ingest`]: NATS results → validated rows → incremental counts → acks (`tally serve`).
//! - [`jobs`]: exact job progress from the per-job image set.
//! - [`store`]: Postgres: migrations, schema checks, bootstrap, sink, verify.
//! - [`dead_letters`]: result messages that could not be saved: store, list, replay.
//! - [`gateway`]: the worker API (claim, tasks, result) and processing-service heartbeats.
//! - [`retry`]: the retry policies (backon's exponential backoff), their numbers stated once.
//! - [`startup`]: waiting for Postgres and NATS at start-up (backoff, deadline, `/readyz` reason).
//! - [`server`]: `server::start`, the one place the daemon is put together.
//! - [`http`]: the operations endpoints (`/healthz`, `/readyz`, `/metrics`).
//! - [`metrics`]: the daemon's Prometheus metric names and recorder.
//! - [`taxa_file`]: Antenna's taxonomy fixture files.
//! - [`table`]: aligned terminal tables and timestamp formatting.
//! - [`telemetry`]: `tracing` setup (text or JSON).
//!
//! The count dataflow itself, its engine and its oracle live in the `tally-dataflows` crate;
//! the demo, the benchmarks, simulated workers and synthetic data in `tally-tools`.
#![warn(missing_docs)]

/// A source error kept as it is, for error variants whose sources are of several types (the
/// NATS client's errors are one generic type per operation).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod bytesize;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dead_letters;
pub mod django_cache;
pub mod duration;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod results_stream;
pub mod retry;
pub mod server;
pub mod startup;
pub mod store;
pub mod table;
pub mod taxa_file;
pub mod telemetry;
