//! A job's task queue in JetStream, named and configured as Antenna's `TaskQueueManager` does
//! (jobs-protocol.md §1.2, §5): stream `job_{id}` on subject `job.{id}.tasks` kept 24 h, durable
//! pull consumer `job-{id}-consumer` (explicit ack, deliver all), one JSON task per image
//! published concurrently, its state for `tally job status`, and its deletion.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, consumer, stream, ErrorCode};
use futures_util::stream::{self as fstream, StreamExt};
use serde::{Deserialize, Serialize};

use super::{consumer_name, dlq_consumer_name, nats_error, stream_name, tasks_subject, JobError};

/// Antenna's `NATS_TASK_TTR`: the consumer's ack wait, after which an unacked task is
/// delivered again.
pub const TASK_TTR: Duration = Duration::from_secs(300);
/// Antenna's `NATS_MAX_DELIVER`: deliveries of one task (the original and one retry).
pub const MAX_DELIVER: i64 = 2;
/// Antenna's `NATS_MAX_ACK_PENDING`: tasks of one job held unacked at once.
pub const MAX_ACK_PENDING: i64 = 1000;
/// Antenna's stream `max_age` (24 h): undelivered tasks of a longer job are lost to retention.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(86_400);
/// Publishes in flight at once (Antenna's `NATS_PUBLISH_FANOUT_CHUNK_SIZE`; tally keeps a
/// sliding window of this many instead of awaiting chunk by chunk).
pub const PUBLISH_FANOUT: usize = 200;
/// Antenna's shared advisory stream, where its dead-letter consumers live.
const ADVISORIES: &str = "advisories";

/// How a job's stream and consumer are configured; [`Default`] is Antenna's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// Consumer `ack_wait`.
    pub ack_wait: Duration,
    /// Consumer `max_deliver` (-1: unlimited).
    pub max_deliver: i64,
    /// Consumer `max_ack_pending`.
    pub max_ack_pending: i64,
    /// Stream `max_age`.
    pub max_age: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            ack_wait: TASK_TTR,
            max_deliver: MAX_DELIVER,
            max_ack_pending: MAX_ACK_PENDING,
            max_age: STREAM_MAX_AGE,
        }
    }
}

/// A task message: `PipelineProcessingTask.dict()` (jobs-protocol.md §1.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskBody {
    /// `str(image.pk)`.
    pub id: String,
    /// The same.
    pub image_id: String,
    /// Where the worker downloads the image.
    pub image_url: String,
    /// Always null when stored; the gateway fills it in per delivery.
    pub reply_subject: Option<String>,
}

impl TaskBody {
    /// The task of `image`, to be downloaded from `url`.
    pub fn new(image: i64, url: String) -> Self {
        TaskBody { id: image.to_string(), image_id: image.to_string(), image_url: url, reply_subject: None }
    }
}

/// Whether a JetStream API error says the stream or consumer does not exist.
fn not_found(e: &jetstream::Error) -> bool {
    e.error_code() == ErrorCode::STREAM_NOT_FOUND || e.error_code() == ErrorCode::CONSUMER_NOT_FOUND
}

/// Creates job `job`'s stream and consumer. A stream of that name that already exists is
/// deleted first (the job row is new, so it belongs to a job that no longer exists, as
/// Antenna's zombie-stream check would conclude); returns the consumer and whether a stale
/// stream was deleted.
pub async fn ensure(
    js: &jetstream::Context,
    job: i64,
    settings: &QueueSettings,
) -> Result<(consumer::PullConsumer, bool), JobError> {
    let replaced = match js.delete_stream(stream_name(job)).await {
        Ok(_) => true,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if not_found(&j) => false,
            _ => return Err(nats_error("delete stale stream", e)),
        },
    };
    let s = js
        .create_stream(stream::Config {
            name: stream_name(job),
            subjects: vec![tasks_subject(job)],
            max_age: settings.max_age,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error("create job stream", e))?;
    let consumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some(consumer_name(job)),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            deliver_policy: consumer::DeliverPolicy::All,
            max_ack_pending: settings.max_ack_pending,
            filter_subject: tasks_subject(job),
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error("create job consumer", e))?;
    Ok((consumer, replaced))
}

/// What publishing a job's tasks did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Tasks JetStream confirmed storing.
    pub published: usize,
    /// `(image id, error)` of each task not stored.
    pub failed: Vec<(String, String)>,
}

/// Publishes `tasks` to job `job`'s subject with up to `fanout` publishes in flight, awaiting
/// JetStream's confirmation of each (no `Nats-Msg-Id`, as Antenna).
pub async fn publish(js: &jetstream::Context, job: i64, tasks: &[TaskBody], fanout: usize) -> PublishReport {
    let subject = tasks_subject(job);
    let outcomes: Vec<Result<(), (String, String)>> = fstream::iter(tasks)
        .map(|task| {
            let subject = subject.clone();
            async move {
                let payload = serde_json::to_vec(task).map_err(|e| (task.image_id.clone(), e.to_string()))?;
                let ack =
                    js.publish(subject, payload.into()).await.map_err(|e| (task.image_id.clone(), e.to_string()))?;
                ack.await.map(|_| ()).map_err(|e| (task.image_id.clone(), e.to_string()))
            }
        })
        .buffer_unordered(fanout.max(1))
        .collect()
        .await;
    let mut report = PublishReport::default();
    for o in outcomes {
        match o {
            Ok(()) => report.published += 1,
            Err(e) => report.failed.push(e),
        }
    }
    report
}

/// A job's task queue as JetStream reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueState {
    /// Tasks in the stream.
    pub messages: u64,
    /// The consumer's figures; `None` when the stream has no consumer.
    pub consumer: Option<ConsumerState>,
}

/// A task consumer's figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsumerState {
    /// Tasks never delivered yet.
    pub num_pending: u64,
    /// Tasks delivered and not acked.
    pub num_ack_pending: usize,
    /// Tasks delivered more than once.
    pub num_redelivered: usize,
    /// Deliveries so far (consumer sequence).
    pub delivered: u64,
    /// Deliveries acked in order so far (consumer sequence).
    pub ack_floor: u64,
}

impl std::fmt::Display for ConsumerState {
    /// Antenna's `_format_consumer_stats` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivered={} ack_floor={} num_pending={} num_ack_pending={} num_redelivered={}",
            self.delivered, self.ack_floor, self.num_pending, self.num_ack_pending, self.num_redelivered
        )
    }
}

/// Job `job`'s queue, `None` when it has no stream (never created, or cleaned up).
pub async fn state(js: &jetstream::Context, job: i64) -> Result<Option<QueueState>, JobError> {
    let stream = match js.get_stream(stream_name(job)).await {
        Ok(s) => s,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if not_found(&j) => return Ok(None),
            _ => return Err(nats_error("stream info", e)),
        },
    };
    let messages = stream.cached_info().state.messages;
    let consumer =
        match js.get_consumer_from_stream::<consumer::pull::Config, _, _>(consumer_name(job), stream_name(job)).await {
            Ok(c) => {
                let i = c.cached_info();
                Some(ConsumerState {
                    num_pending: i.num_pending,
                    num_ack_pending: i.num_ack_pending,
                    num_redelivered: i.num_redelivered,
                    delivered: i.delivered.consumer_sequence,
                    ack_floor: i.ack_floor.consumer_sequence,
                })
            }
            Err(e) => match e.kind() {
                ConsumerErrorKind::JetStream(j) if not_found(&j) => None,
                _ => return Err(nats_error("consumer info", e)),
            },
        };
    Ok(Some(QueueState { messages, consumer }))
}

/// What [`delete`] removed (a missing resource is not an error: cleanup may run twice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// The task consumer existed and was deleted.
    pub consumer: bool,
    /// The stream existed and was deleted.
    pub stream: bool,
    /// A dead-letter consumer on Antenna's `advisories` stream existed and was deleted.
    pub dlq_consumer: bool,
}

/// Deletes job `job`'s consumer, then its stream, then its dead-letter advisory consumer, in
/// Antenna's order (`cleanup_job_resources`).
pub async fn delete(js: &jetstream::Context, job: i64) -> Result<Deleted, JobError> {
    let consumer = delete_consumer(js, &consumer_name(job), &stream_name(job)).await?;
    let stream = match js.delete_stream(stream_name(job)).await {
        Ok(_) => true,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if not_found(&j) => false,
            _ => return Err(nats_error("delete stream", e)),
        },
    };
    let dlq_consumer = delete_consumer(js, &dlq_consumer_name(job), ADVISORIES).await?;
    Ok(Deleted { consumer, stream, dlq_consumer })
}

async fn delete_consumer(js: &jetstream::Context, consumer: &str, stream: &str) -> Result<bool, JobError> {
    match js.delete_consumer_from_stream(consumer, stream).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            ConsumerErrorKind::JetStream(j) if not_found(&j) => Ok(false),
            _ => Err(nats_error(&format!("delete consumer {consumer}"), e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_bodies_have_antennas_fields() {
        let body = serde_json::to_value(TaskBody::new(42, "https://x.org/a.jpg".into())).unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({"id": "42", "image_id": "42", "image_url": "https://x.org/a.jpg", "reply_subject": null})
        );
    }

    #[test]
    fn defaults_are_antennas() {
        let s = QueueSettings::default();
        assert_eq!(
            (s.ack_wait.as_secs(), s.max_deliver, s.max_ack_pending, s.max_age.as_secs()),
            (300, 2, 1000, 86_400)
        );
    }
}
