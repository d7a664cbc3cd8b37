//! The daemon's Prometheus metrics: their names, descriptions and histogram buckets, and the
//! one global recorder that `/metrics` renders.
//!
//! Code records with the `metrics` macros and the names in [`names`]
//! (`metrics::counter!(names::INGEST_MESSAGES, "outcome" => "saved").increment(n)`), so a
//! misspelt name is a compile error rather than a silently separate series. Label values are
//! listed on each name; keep them to those fixed sets, since every distinct value is a series
//! that Prometheus stores forever.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// One constant per metric name.
pub mod names {
    /// Counter of result messages handled, label `outcome` = `saved` | `dead_lettered` |
    /// `retried` (NAKed for redelivery after a transient failure) | `replay_noop` (a replay or
    /// redelivery that created no rows).
    pub const INGEST_MESSAGES: &str = "tally_ingest_messages_total";
    /// Counter of rows inserted into Antenna's tables, label `table` = `detection` |
    /// `classification` | `occurrence` | `taxon` | `null_marker`.
    pub const INGEST_ROWS: &str = "tally_ingest_rows_total";
    /// Counter: tables ingest analyzed after doubling them.
    pub const INGEST_ANALYZES: &str = "tally_ingest_analyzes_total";
    /// Histogram of messages per ingest batch: shows whether batching is effective.
    pub const INGEST_BATCH_MESSAGES: &str = "tally_ingest_batch_messages";
    /// Histogram of result bytes per ingest batch (claim checks at their object's size):
    /// shows whether `--batch-bytes` or `--batch-size` ends batches.
    pub const INGEST_BATCH_BYTES: &str = "tally_ingest_batch_bytes";
    /// Histogram of seconds per ingest batch, label `stage` = `resolve` (reading claim-checked
    /// results' objects) | `decode` | `save` | `dataflow` (waiting for the count workers after
    /// the batch's writes, which they compute beside) | `commit` | `ack` | `total`: says which
    /// stage to look at when ingest is slow.
    pub const INGEST_BATCH_SECONDS: &str = "tally_ingest_batch_seconds";
    /// Counter of messages stored as dead letters, label `reason` (the dead letter's
    /// `reason_code`, a fixed set such as `invalid_json`, `unknown_pipeline`).
    pub const INGEST_DEAD_LETTERS: &str = "tally_ingest_dead_letters_total";
    /// Counter of ingest pipeline events, label `event` = `overlapped` (a batch was saved
    /// while the one before it committed) | `conflict` (a batch read what the committing one
    /// wrote, and waited for it) | `abandoned` (a prepared batch rolled back because the one
    /// before it failed or its commit waited for one of its locks).
    pub const INGEST_PIPELINE: &str = "tally_ingest_pipeline_total";
    /// Counter of count rows written, label `table` = `main_sourceimage` | `main_event` |
    /// `main_deployment`.
    pub const COUNT_WRITES: &str = "tally_count_writes_total";
    /// Gauge: seconds between the oldest publish time in the last committed batch and its
    /// commit, i.e. how stale the stored counts were just before that commit.
    pub const DATAFLOW_LAG_SECONDS: &str = "tally_dataflow_lag_seconds";
    /// Histogram of seconds from a result's publish to its ack: the end-to-end latency a
    /// worker sees.
    pub const PUBLISH_TO_ACK_SECONDS: &str = "tally_publish_to_ack_seconds";
    /// Counter of task-message acks, label `outcome` = `acked` | `consumer_gone` (the job's
    /// consumer or stream is gone: nothing to ack) | `deferred` (not confirmed: stored and
    /// retried) | `retry_acked` | `retry_consumer_gone` | `given_up` (dead-lettered).
    pub const TASK_ACKS: &str = "tally_task_acks_total";
    /// Gauge of task acks stored for retry (`tally.task_ack_retry`).
    pub const TASK_ACK_RETRY_PENDING: &str = "tally_task_ack_retry_pending";
    /// Gauge of results delivered to ingest and not yet acked (the results consumer's
    /// `num_ack_pending`).
    pub const RESULTS_ACK_PENDING: &str = "tally_results_ack_pending";
    /// Gauge of the results consumer's `max_ack_pending`: at this cap JetStream delivers nothing.
    pub const RESULTS_MAX_ACK_PENDING: &str = "tally_results_max_ack_pending";
    /// Gauge of results in the stream not yet delivered to ingest.
    pub const RESULTS_PENDING: &str = "tally_results_pending";
    /// Gauge of the age in seconds of the oldest result not yet acked (0 when none).
    pub const RESULTS_OLDEST_UNACKED_SECONDS: &str = "tally_results_oldest_unacked_seconds";
    /// Counter of django-cachalot table keys invalidated, by `outcome` (`ok`, `failed`: retried).
    pub const DJANGO_CACHE_INVALIDATIONS: &str = "tally_django_cache_invalidations_total";
    /// Counter of results that travelled by claim check, by `side` (`published`, `fetched`,
    /// `deleted`).
    pub const RESULT_OBJECTS: &str = "tally_result_objects_total";
    /// Counter of failed pulls from the results stream (each is retried).
    pub const NATS_PULL_ERRORS: &str = "tally_nats_pull_errors_total";
    /// Gauge, 1 while the daemon is ready to ingest and 0 otherwise (mirrors `/readyz`).
    pub const INGEST_READY: &str = "tally_ingest_ready";
    /// Gauge of rows mirrored by the dataflow engine: its memory grows with it.
    pub const DATAFLOW_ROWS: &str = "tally_dataflow_rows";
    /// Counter of worker API requests, labels `route` = `claim` | `next` | `tasks` | `result`
    /// and `status` (the HTTP status code).
    pub const GATEWAY_REQUESTS: &str = "tally_gateway_requests_total";
    /// Histogram of seconds per worker API request, label `route` (as above).
    pub const GATEWAY_REQUEST_SECONDS: &str = "tally_gateway_request_seconds";
    /// Counter of claims, label `outcome` = `claimed` | `none` (no claimable job).
    pub const GATEWAY_CLAIMS: &str = "tally_gateway_claims_total";
    /// Counter of tasks handed to workers by `/tasks`.
    pub const GATEWAY_TASKS: &str = "tally_gateway_tasks_served_total";
    /// Counter of task messages that were not JSON objects, terminated instead of served.
    pub const GATEWAY_BAD_TASKS: &str = "tally_gateway_bad_tasks_total";
    /// Counter of results published by `/result`, label `outcome` = `queued` | `duplicate`
    /// (JetStream dropped it as a repeat of a result already in the stream).
    pub const GATEWAY_RESULTS: &str = "tally_gateway_results_total";
    /// Counter of heartbeats, label `outcome` = `written` | `throttled` | `dropped` (channel
    /// full) | `failed` (database error).
    pub const GATEWAY_HEARTBEATS: &str = "tally_gateway_heartbeats_total";
    /// Counter of processing services marked offline by the sweep.
    pub const GATEWAY_SERVICES_OFFLINE: &str = "tally_gateway_services_marked_offline_total";
    /// Counter of buffered job log lines, label `outcome` = `written` | `dropped` (buffer full) |
    /// `failed` (the database refused their batch) | `no_job` (their job does not exist).
    pub const JOB_LOG_LINES: &str = "tally_job_log_lines_total";
    /// Counter of images the job monitor marked failed because their task was lost, label
    /// `reason` = `max_deliver` (the consumer has nothing left to deliver: the tasks used up
    /// their deliveries) | `queue_gone` (the job's stream or consumer no longer exists).
    pub const JOB_LOST_IMAGES: &str = "tally_job_lost_images_total";
    /// Counter of job task queues (consumer and stream) the job monitor deleted, label `why` =
    /// `finished` (the job is SUCCESS, FAILURE or REVOKED) | `zombie` (no such job).
    pub const JOB_QUEUES_DELETED: &str = "tally_job_queues_deleted_total";
    /// Counter of job monitor passes that failed (Postgres or NATS errors; retried next pass),
    /// label `part` = `lost_images` | `cleanup`.
    pub const JOB_MONITOR_ERRORS: &str = "tally_job_monitor_errors_total";
    /// Counter of rows changed by other writers (Django) that the change feed applied, label
    /// `table`.
    pub const FEED_ROWS: &str = "tally_feed_rows_total";
    /// Histogram of seconds from a change's commit in Django to the commit of its counts.
    pub const FEED_LAG_SECONDS: &str = "tally_feed_lag_seconds";
    /// Histogram of seconds per change-feed step (read, dataflow, counts, commit).
    pub const FEED_STEP_SECONDS: &str = "tally_feed_step_seconds";
    /// Counter of change-feed steps that failed (retried; the engine is rebuilt).
    pub const FEED_ERRORS: &str = "tally_feed_errors_total";
    /// Gauge: outbox entries left after the last change-feed step.
    pub const FEED_BACKLOG: &str = "tally_feed_backlog";
}

/// Bucket bounds for durations in seconds: half a millisecond (one small batch's decode) to a
/// minute (a bootstrap-sized commit).
pub const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Bucket bounds for batch sizes in messages, 1 to 10 000 (the largest fetch tally asks for).
pub const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// Bucket bounds for batch sizes in bytes, 64 KiB to 1 GiB.
pub const BYTES_BUCKETS: &[f64] =
    &[65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 134217728.0, 268435456.0, 1073741824.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder on the first call and returns its handle; later
/// calls return a clone of the same handle, so the daemon and every test in one process can
/// call it freely (a process has exactly one global recorder).
///
/// If another recorder was installed by someone else first, the metrics macros report to that
/// one; the returned handle then renders an empty recorder, and a warning says so.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::warn!(%error, "a metrics recorder is already installed: /metrics will be empty");
                    builder().build_recorder().handle()
                }
            };
            describe();
            handle
        })
        .clone()
}

/// The exporter's configuration: histograms as true Prometheus histograms with our buckets
/// (summaries cannot be aggregated across instances).
fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (names::INGEST_BATCH_SECONDS, SECONDS_BUCKETS),
        (names::PUBLISH_TO_ACK_SECONDS, SECONDS_BUCKETS),
        (names::GATEWAY_REQUEST_SECONDS, SECONDS_BUCKETS),
        (names::FEED_LAG_SECONDS, SECONDS_BUCKETS),
        (names::FEED_STEP_SECONDS, SECONDS_BUCKETS),
        (names::INGEST_BATCH_MESSAGES, BATCH_BUCKETS),
        (names::INGEST_BATCH_BYTES, BYTES_BUCKETS),
    ] {
        // Only an empty bucket list is refused, and ours are non-empty constants.
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .expect("bucket lists are not empty");
    }
    builder
}

/// Registers the help text of every metric with the installed recorder.
fn describe() {
    use names::*;
    describe_counter!(INGEST_MESSAGES, Unit::Count, "Result messages handled, by outcome.");
    describe_counter!(INGEST_ROWS, Unit::Count, "Rows inserted into Antenna's tables, by table.");
    describe_counter!(
        INGEST_ANALYZES,
        Unit::Count,
        "Tables ingest analyzed because its inserts had doubled them (keeps cached foreign-key check plans on index scans)."
    );
    describe_histogram!(INGEST_BATCH_MESSAGES, Unit::Count, "Messages per ingest batch.");
    describe_histogram!(
        INGEST_BATCH_BYTES,
        Unit::Bytes,
        "Result bytes per ingest batch (claim checks at their object's size)."
    );
    describe_histogram!(INGEST_BATCH_SECONDS, Unit::Seconds, "Seconds per ingest batch, by stage.");
    describe_counter!(INGEST_DEAD_LETTERS, Unit::Count, "Messages stored as dead letters, by reason code.");
    describe_counter!(
        INGEST_PIPELINE,
        Unit::Count,
        "Ingest pipeline events: batches saved while the previous one committed, conflicts, abandoned batches."
    );
    describe_counter!(COUNT_WRITES, Unit::Count, "Count rows written to Antenna's tables, by table.");
    describe_counter!(
        FEED_ROWS,
        Unit::Count,
        "Rows changed by other writers (Django) applied from the change feed, by table."
    );
    describe_histogram!(FEED_LAG_SECONDS, Unit::Seconds, "Seconds from a Django change to the commit of its counts.");
    describe_histogram!(FEED_STEP_SECONDS, Unit::Seconds, "Seconds per change-feed step.");
    describe_counter!(FEED_ERRORS, Unit::Count, "Change-feed steps that failed (retried after a rebuild).");
    describe_gauge!(FEED_BACKLOG, Unit::Count, "Change-feed outbox entries left after the last step.");
    describe_gauge!(
        DATAFLOW_LAG_SECONDS,
        Unit::Seconds,
        "Seconds from the oldest publish in the last committed batch to its commit."
    );
    describe_histogram!(PUBLISH_TO_ACK_SECONDS, Unit::Seconds, "Seconds from a result's publish to its ack.");
    describe_counter!(TASK_ACKS, Unit::Count, "Task message acks, by outcome.");
    describe_gauge!(TASK_ACK_RETRY_PENDING, "Task acks stored for retry.");
    describe_gauge!(RESULTS_ACK_PENDING, "Results delivered to ingest and not yet acked.");
    describe_gauge!(RESULTS_MAX_ACK_PENDING, "The results consumer's max_ack_pending (no delivery at this cap).");
    describe_gauge!(RESULTS_PENDING, "Results in the stream not yet delivered to ingest.");
    describe_gauge!(RESULTS_OLDEST_UNACKED_SECONDS, Unit::Seconds, "Age of the oldest result not yet acked.");
    describe_counter!(
        DJANGO_CACHE_INVALIDATIONS,
        Unit::Count,
        "django-cachalot table keys invalidated in Django's cache Redis, by outcome (failed ones are retried)."
    );
    describe_counter!(RESULT_OBJECTS, Unit::Count, "Results carried by claim check (object store), by side.");
    describe_counter!(NATS_PULL_ERRORS, Unit::Count, "Failed pulls from the results stream.");
    describe_gauge!(INGEST_READY, "1 while ready to ingest, else 0.");
    describe_gauge!(DATAFLOW_ROWS, Unit::Count, "Rows mirrored by the dataflow engine.");
    describe_counter!(GATEWAY_REQUESTS, Unit::Count, "Worker API requests, by route and status.");
    describe_histogram!(GATEWAY_REQUEST_SECONDS, Unit::Seconds, "Seconds per worker API request, by route.");
    describe_counter!(GATEWAY_CLAIMS, Unit::Count, "Job claims, by outcome.");
    describe_counter!(GATEWAY_TASKS, Unit::Count, "Tasks handed to workers.");
    describe_counter!(GATEWAY_BAD_TASKS, Unit::Count, "Task messages that were not JSON objects (terminated).");
    describe_counter!(GATEWAY_RESULTS, Unit::Count, "Results published for ingest, by outcome.");
    describe_counter!(GATEWAY_HEARTBEATS, Unit::Count, "Processing-service heartbeats, by outcome.");
    describe_counter!(GATEWAY_SERVICES_OFFLINE, Unit::Count, "Processing services marked offline by the sweep.");
    describe_counter!(JOB_LOST_IMAGES, Unit::Count, "Images marked failed because their task was lost, by reason.");
    describe_counter!(JOB_QUEUES_DELETED, Unit::Count, "Job task queues deleted by the job monitor, by why.");
    describe_counter!(JOB_MONITOR_ERRORS, Unit::Count, "Failed job monitor passes, by part.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_and_renders_with_buckets_and_help() {
        let first = install();
        let second = install();
        metrics::counter!(names::TASK_ACKS, "outcome" => "acked").increment(2);
        metrics::histogram!(names::INGEST_BATCH_SECONDS, "stage" => "total").record(0.003);
        first.run_upkeep();
        let text = second.render();
        assert!(text.contains("tally_task_acks_total{outcome=\"acked\"} 2"), "{text}");
        assert!(text.contains("# HELP tally_task_acks_total Task message acks, by outcome."), "{text}");
        assert!(text.contains("tally_ingest_batch_seconds_bucket{stage=\"total\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("tally_ingest_batch_seconds_bucket{stage=\"total\",le=\"0.0025\"} 0"), "{text}");
    }
}
