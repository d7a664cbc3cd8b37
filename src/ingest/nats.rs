//! NATS transport for ingest: the results stream and the durable pull consumer (created or
//! validated at start), and confirmed, concurrent task acks.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use clap::Args;
use futures_util::stream::{self as fstream, StreamExt};
use tracing::{info, warn};

use crate::config::NatsArgs;
use crate::duration::{parse_hours, parse_secs};
use crate::ingest::IngestError;

/// Settings of the results consumer.
#[derive(Clone, Debug, Args)]
pub struct ConsumerArgs {
    /// Durable name of tally's pull consumer on the results stream.
    #[arg(long, env = "TALLY_CONSUMER", default_value = "tally-ingest")]
    pub consumer: String,
    /// How long a delivered result may stay unacked before JetStream redelivers it (also how
    /// long results in flight at a crash wait before they are redelivered; a bare number is
    /// seconds).
    #[arg(long, env = "TALLY_ACK_WAIT", value_parser = parse_secs, default_value = "60")]
    pub ack_wait: Duration,
    /// Delivery attempts per result (-1: unlimited). Transient failures are retried; a result
    /// that can never be saved is dead-lettered, so unlimited loses nothing.
    #[arg(long, env = "TALLY_MAX_DELIVER", default_value_t = -1, allow_negative_numbers = true)]
    pub max_deliver: i64,
    /// Results delivered and not yet acked, at most (JetStream stops delivering silently at
    /// this cap: keep it above the batch size).
    #[arg(long, env = "TALLY_MAX_ACK_PENDING", default_value_t = 20_000)]
    pub max_ack_pending: i64,
    /// Duplicate window of the results stream (publishes with the same Nats-Msg-Id inside it
    /// are dropped; a bare number is seconds).
    #[arg(long, env = "TALLY_DUPLICATE_WINDOW", value_parser = parse_secs, default_value = "120")]
    pub duplicate_window: Duration,
    /// How long result messages are kept in the stream (0: forever; a bare number is hours).
    #[arg(long = "results-max-age", alias = "max-age-hours", env = "TALLY_RESULTS_MAX_AGE_HOURS", value_parser = parse_hours, default_value = "24h")]
    pub results_max_age: Duration,
    /// How long to wait for a task ack's confirmation (a bare number is seconds).
    #[arg(long, env = "TALLY_TASK_ACK_TIMEOUT", value_parser = parse_secs, default_value = "5")]
    pub task_ack_timeout: Duration,
    /// Task acks in flight at once.
    #[arg(long, env = "TALLY_TASK_ACK_CONCURRENCY", default_value_t = 256)]
    pub task_ack_concurrency: usize,
    /// Attempts at a task ack that JetStream does not confirm (the first included) before it
    /// is given up and dead-lettered as `task_ack_failed`. The result is acked at once either
    /// way; retries run in the background with backoff.
    #[arg(long, env = "TALLY_TASK_ACK_ATTEMPTS", default_value_t = 12)]
    pub task_ack_attempts: u32,
    /// Longest wait between two attempts at a task ack (the wait starts at 1 s and doubles).
    #[arg(long, env = "TALLY_TASK_ACK_BACKOFF_MAX", value_parser = parse_secs, default_value = "60s")]
    pub task_ack_backoff_max: Duration,
}

impl Default for ConsumerArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
    }
}

impl ConsumerArgs {
    /// How long result messages (and the objects of large ones) are kept.
    pub fn max_age(&self) -> Duration {
        self.results_max_age
    }
}

/// Creates the results stream, or checks that the existing one carries our subjects.
pub async fn ensure_stream(
    js: &jetstream::Context,
    nats: &NatsArgs,
    args: &ConsumerArgs,
) -> Result<stream::Stream, IngestError> {
    let subjects = format!("{}.>", nats.results_subject_prefix);
    let config = stream::Config {
        name: nats.results_stream.clone(),
        subjects: vec![subjects.clone()],
        duplicate_window: args.duplicate_window,
        max_age: args.max_age(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    };
    let mut s = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| IngestError::nats(format!("results stream {}", nats.results_stream), e))?;
    let info = s.info().await.map_err(|e| IngestError::nats("stream info", e))?;
    if !info.config.subjects.iter().any(|s| s == &subjects || s == ">") {
        return Err(IngestError::StreamSubjects {
            stream: nats.results_stream.clone(),
            subjects: info.config.subjects.clone(),
            wanted: subjects,
        });
    }
    if info.config.duplicate_window != args.duplicate_window {
        warn!(
            stream = %nats.results_stream,
            existing = ?info.config.duplicate_window,
            "results stream has another duplicate window than configured; keeping the existing one"
        );
    }
    info!(stream = %nats.results_stream, messages = info.state.messages, "results stream ready");
    Ok(s)
}

/// Creates the durable pull consumer, or binds to the existing one.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    nats: &NatsArgs,
    args: &ConsumerArgs,
) -> Result<consumer::PullConsumer, IngestError> {
    let config = consumer::pull::Config {
        durable_name: Some(args.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: args.ack_wait,
        max_deliver: args.max_deliver,
        max_ack_pending: args.max_ack_pending,
        filter_subject: format!("{}.>", nats.results_subject_prefix),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&args.consumer, config)
        .await
        .map_err(|e| IngestError::nats(format!("consumer {}", args.consumer), e))
}

/// How a task ack went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAck {
    /// JetStream confirmed it.
    Acked,
    /// Nobody answers on the subject: the job's stream or consumer is gone (finished,
    /// cancelled or cleaned up). Nothing is left to ack.
    NoStream,
    /// No confirmation (timeout or connection trouble).
    Failed,
}

/// Acks tasks by their reply subjects (`+ACK` as a request, so JetStream confirms it), many
/// at once over the one connection.
pub async fn ack_tasks(client: &async_nats::Client, subjects: Vec<String>, args: &ConsumerArgs) -> Vec<TaskAck> {
    let timeout = args.task_ack_timeout;
    fstream::iter(subjects)
        .map(|subject| async move {
            let request = client.request(subject, bytes::Bytes::from_static(b"+ACK"));
            match tokio::time::timeout(timeout, request).await {
                Ok(Ok(_)) => TaskAck::Acked,
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => TaskAck::NoStream,
                Ok(Err(_)) | Err(_) => TaskAck::Failed,
            }
        })
        .buffered(args.task_ack_concurrency.max(1))
        .collect()
        .await
}
