//! The integration tests of `tally-tools`, one binary: a module per harness run end to end
//! through the binary.

mod bench_feed;
mod bench_ingest;
mod bench_jobs;
mod demo;
