//! The integration tests of `tally`, one binary (one link, one process): a module per area
//! against real Postgres and NATS, and `common` for the fixtures they share.

mod common;

mod change_feed;
mod claim_check;
mod cli_store;
mod cluster;
mod dead_letters;
mod django_cache;
mod fuzz;
mod gateway;
mod http;
mod ingest;
mod ingest_crash;
mod ingest_pipeline;
mod ingest_plans;
mod ingest_rules;
mod job_cli;
mod job_monitor;
mod jobs_loop;
mod progress;
mod services_harness;
mod startup;
mod store;
mod task_acks;
mod worker_sim;
mod write_methods;
