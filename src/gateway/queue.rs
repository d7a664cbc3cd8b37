//! The job task queues, as Antenna leaves them (stream `job_{id}`, durable pull consumer
//! `job-{id}-consumer`), over the gateway's one NATS connection: consumer handles cached per
//! job (a pull is then one request, not a lookup plus a request), pulls, and what is known
//! about whether a job has tasks to deliver.
//!
//! **Deliverable** means the consumer has messages never delivered (`num_pending > 0`) and
//! room to deliver them (`num_ack_pending < max_ack_pending`). Tasks whose ack wait expired
//! are deliverable too, but consumer info does not count them, so a job that is not
//! deliverable stays claimable, after every deliverable one. What a claim learns is reused
//! for `--gateway-deliverable-ttl`; every pull refreshes it (a message carries the
//! consumer's pending count), so a job drained by `/tasks` stops being preferred at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::Message;
use futures_util::stream::{self, StreamExt};
use thiserror::Error;
use tracing::warn;

use super::Nats;

/// How long a claim waits for consumer info before treating the job's state as unknown.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);

/// Consumer info requests in flight at once per claim.
const INFO_CONCURRENCY: usize = 32;

/// How long past the fetch wait a pull may run before it is cut off with what it has.
pub const PULL_MARGIN: Duration = Duration::from_millis(500);

/// The shortest expiry a pull request gets (a zero fetch wait still needs one: see
/// [`Queues::pull`]).
const MIN_EXPIRES: Duration = Duration::from_millis(20);

/// Jobs whose consumer handle or state is kept at most; emptied when full.
const MAX_CACHED_JOBS: usize = 10_000;

/// The stream of job `job`'s tasks.
pub fn stream_name(job: i64) -> String {
    format!("job_{job}")
}

/// The durable consumer of job `job`'s tasks.
pub fn consumer_name(job: i64) -> String {
    format!("job-{job}-consumer")
}

/// Whether a job has tasks ready to hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deliverable {
    /// Never-delivered tasks and room to deliver them.
    Yes,
    /// None now (or no queue at all).
    No,
    /// NATS did not say in time.
    Unknown,
}

/// NATS failed (not "no such queue", which is an empty queue).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct QueueError(pub String);

/// Consumer handles and deliverability, per job.
pub struct Queues {
    /// How long a deliverability answer is reused.
    ttl: Duration,
    /// Bound handles: a pull through one is a single request.
    consumers: Mutex<HashMap<i64, PullConsumer>>,
    /// Job → (deliverable, learnt at).
    known: Mutex<HashMap<i64, (bool, Instant)>>,
}

impl Queues {
    /// Empty caches; deliverability answers are reused for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Queues { ttl, consumers: Mutex::new(HashMap::new()), known: Mutex::new(HashMap::new()) }
    }

    fn remember(&self, job: i64, deliverable: bool) {
        let mut known = self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.len() >= MAX_CACHED_JOBS {
            known.clear();
        }
        known.insert(job, (deliverable, Instant::now()));
    }

    fn recall(&self, job: i64) -> Option<bool> {
        let known = self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        known.get(&job).filter(|(_, at)| at.elapsed() < self.ttl).map(|(d, _)| *d)
    }

    fn cached(&self, job: i64) -> Option<PullConsumer> {
        self.consumers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&job).cloned()
    }

    /// Drops what is known of `job` (its queue is gone or the job is over).
    pub fn forget(&self, job: i64) {
        self.consumers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&job);
        self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&job);
    }

    /// The consumer of `job`, looked up once and then cached; `None` when the job has no
    /// stream or consumer (never created, or cleaned up after the job ended).
    async fn consumer(&self, nats: &Nats, job: i64) -> Result<Option<PullConsumer>, QueueError> {
        if let Some(c) = self.cached(job) {
            return Ok(Some(c));
        }
        match nats
            .js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(consumer_name(job), stream_name(job))
            .await
        {
            Ok(c) => {
                self.remember(job, deliverable(c.cached_info()));
                let mut consumers = self.consumers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if consumers.len() >= MAX_CACHED_JOBS {
                    consumers.clear();
                }
                consumers.insert(job, c.clone());
                Ok(Some(c))
            }
            Err(e) => match e.kind() {
                ConsumerErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                        || js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    self.forget(job);
                    self.remember(job, false);
                    Ok(None)
                }
                _ => Err(QueueError(format!("consumer {} of stream {}: {e}", consumer_name(job), stream_name(job)))),
            },
        }
    }

    /// Whether each of `jobs` has deliverable tasks, asking NATS (concurrently, briefly) about
    /// the jobs not asked about within the ttl.
    pub async fn deliverability(&self, nats: Option<&Nats>, jobs: &[i64]) -> HashMap<i64, Deliverable> {
        let mut answers: HashMap<i64, Deliverable> = HashMap::with_capacity(jobs.len());
        let mut ask = Vec::new();
        for &job in jobs {
            match self.recall(job) {
                Some(d) => {
                    answers.insert(job, if d { Deliverable::Yes } else { Deliverable::No });
                }
                None => ask.push(job),
            }
        }
        let Some(nats) = nats else {
            answers.extend(ask.into_iter().map(|job| (job, Deliverable::Unknown)));
            return answers;
        };
        let asked: Vec<(i64, Deliverable)> = stream::iter(ask)
            .map(|job| async move {
                let answer = tokio::time::timeout(INFO_TIMEOUT, self.ask(nats, job)).await;
                (job, answer.unwrap_or(Deliverable::Unknown))
            })
            .buffer_unordered(INFO_CONCURRENCY)
            .collect()
            .await;
        answers.extend(asked);
        answers
    }

    /// Asks NATS whether `job` has deliverable tasks.
    async fn ask(&self, nats: &Nats, job: i64) -> Deliverable {
        let cached = self.cached(job);
        let Some(c) = cached else {
            // The lookup returns fresh info and remembers it.
            return match self.consumer(nats, job).await {
                Ok(Some(c)) => verdict(deliverable(c.cached_info())),
                Ok(None) => Deliverable::No,
                Err(_) => Deliverable::Unknown,
            };
        };
        match c.get_info().await {
            Ok(info) => {
                let d = deliverable(&info);
                self.remember(job, d);
                verdict(d)
            }
            Err(e) => match e.kind() {
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
                    self.forget(job);
                    self.remember(job, false);
                    Deliverable::No
                }
                ConsumerInfoErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                        || js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    self.forget(job);
                    self.remember(job, false);
                    Deliverable::No
                }
                _ => Deliverable::Unknown,
            },
        }
    }

    /// Pulls up to `n` tasks of `job` in one pull request: what is ready comes back at once,
    /// else whatever arrives within `wait` (Antenna's 0.5 s fetch). No queue: no tasks.
    ///
    /// The request is a no-wait fetch *with an expiry*. Without one, JetStream holds a no-wait
    /// request on a consumer whose only outstanding tasks have used up `max_deliver` (they
    /// still count as due for redelivery) with no deadline, and the client library sets no
    /// timer either: the call hung until a 10 s cut-off and answered 503 where Antenna answers
    /// `[]` (reproduced against nats-server 2.9; see docs/worker-api.md). The whole pull is also cut
    /// off at `wait` + [`PULL_MARGIN`], returning what it has; messages delivered before a cut
    /// or a failure are returned, never dropped (they would wait out the ack wait otherwise).
    /// A connection that is not up fails at once.
    pub async fn pull(&self, nats: &Nats, job: i64, n: usize, wait: Duration) -> Result<Vec<Message>, QueueError> {
        if nats.client.connection_state() != State::Connected {
            return Err(QueueError(format!("NATS is {}", nats.client.connection_state())));
        }
        let expires = wait.max(MIN_EXPIRES);
        let deadline = Instant::now() + expires + PULL_MARGIN;
        let c = match tokio::time::timeout_at(deadline.into(), self.consumer(nats, job)).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return Ok(Vec::new()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(QueueError(format!(
                    "looking up {} took over {:?}",
                    consumer_name(job),
                    expires + PULL_MARGIN
                )))
            }
        };
        let request = tokio::time::timeout_at(deadline.into(), c.fetch().max_messages(n).expires(expires).messages());
        let batch = match request.await {
            Ok(batch) => batch,
            Err(_) => return Err(QueueError(format!("pull request to {} was not sent in time", consumer_name(job)))),
        };
        let tasks = self.drain(job, batch, deadline).await?;
        // A message's pending count is the consumer's num_pending after its delivery.
        let pending = tasks.last().and_then(|m| m.info().ok()).map(|i| i.pending).unwrap_or(0);
        self.remember(job, tasks.len() == n && pending > 0);
        Ok(tasks)
    }

    /// Collects a pull's messages until it ends or `deadline`. The request failing is an
    /// error; the server ending it with a status (e.g. 409 when max_ack_pending is reached, or
    /// the consumer deleted) ends the pull with what was delivered, and so does the deadline.
    async fn drain(
        &self,
        job: i64,
        batch: Result<consumer::pull::Batch, consumer::pull::BatchError>,
        deadline: Instant,
    ) -> Result<Vec<Message>, QueueError> {
        let mut batch = batch.map_err(|e| {
            self.forget(job);
            QueueError(format!("pull request to {}: {e}", consumer_name(job)))
        })?;
        let mut messages = Vec::new();
        loop {
            let next = match tokio::time::timeout_at(deadline.into(), batch.next()).await {
                Ok(next) => next,
                Err(_) => {
                    warn!(job_id = job, delivered = messages.len(), "pull cut off at the fetch wait");
                    break;
                }
            };
            match next {
                Some(Ok(m)) => messages.push(m),
                Some(Err(e)) => {
                    warn!(job_id = job, error = %e, delivered = messages.len(), "pull ended by the server");
                    break;
                }
                None => break,
            }
        }
        Ok(messages)
    }
}

/// Never-delivered messages and room to deliver them.
fn deliverable(info: &consumer::Info) -> bool {
    let cap = info.config.max_ack_pending;
    info.num_pending > 0 && (cap <= 0 || (info.num_ack_pending as i64) < cap)
}

fn verdict(deliverable: bool) -> Deliverable {
    if deliverable {
        Deliverable::Yes
    } else {
        Deliverable::No
    }
}
