//! The ingest loop of `tally serve`: pull a batch from the results consumer, process it
//! ([`Ingestor::process`]), then ack: task acks (confirmed, concurrent) and result acks for
//! saved messages, TERM for dead letters, NAK with a delay for a batch that failed
//! transiently. Any error of the pull stream rebuilds it with backoff; the durable consumer
//! keeps the ack state, so nothing is lost. On shutdown the batch in hand is finished and
//! acked; messages the pull stream had buffered but no batch had started are redelivered
//! after the consumer's ack wait.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind};
use clap::Args;
use futures_util::{FutureExt, StreamExt};
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::NatsArgs;
use crate::http::Health;
use crate::ingest::batch::{Incoming, Ingestor, Outcome};
use crate::ingest::message::job_of_reply_subject;
use crate::ingest::nats::{self, ConsumerArgs, TaskAck};
use crate::ingest::IngestError;
use crate::metrics::names;

/// Batching and limits of the ingest loop.
#[derive(Clone, Debug, Args)]
pub struct IngestArgs {
    /// Results per batch (one transaction, one dataflow step), at most.
    #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Milliseconds to keep collecting after the first message of a batch arrives while the
    /// batch is not full (0: take what is there).
    #[arg(long, env = "TALLY_BATCH_LINGER_MS", default_value_t = 5)]
    pub batch_linger_ms: u64,
    /// Largest result body accepted, in bytes; larger ones are dead-lettered.
    #[arg(long, env = "TALLY_MAX_RESULT_BYTES", default_value_t = 64 << 20)]
    pub max_result_bytes: usize,
    /// Seconds before a NAKed result (transient failure) is redelivered.
    #[arg(long, env = "TALLY_NAK_DELAY", default_value_t = 2)]
    pub nak_delay: u64,
    /// Timely worker threads of the count dataflow.
    #[arg(short = 'w', long, env = "TALLY_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Consumer settings.
    #[command(flatten)]
    pub consumer: ConsumerArgs,
}

impl Default for IngestArgs {
    fn default() -> Self {
        IngestArgs {
            batch_size: 500,
            batch_linger_ms: 5,
            max_result_bytes: 64 << 20,
            nak_delay: 2,
            workers: 1,
            consumer: ConsumerArgs::default(),
        }
    }
}

/// Results acked in one batch, for benchmarks and tests that measure publish → ack.
#[derive(Debug, Clone)]
pub struct Acked {
    /// When the acks were sent.
    pub at: Instant,
    /// The reply subjects of the saved results.
    pub reply_subjects: Vec<String>,
    /// How many results were dead-lettered.
    pub dead_lettered: usize,
}

/// Observers of the loop.
#[derive(Debug, Default, Clone)]
pub struct Hooks {
    /// Receives every batch's acks.
    pub acked: Option<mpsc::UnboundedSender<Acked>>,
}

/// Runs the ingest loop until `shutdown` is cancelled. `ingestor` is already bootstrapped.
pub async fn run(
    mut ingestor: Ingestor,
    client: async_nats::Client,
    nats_args: &NatsArgs,
    args: &IngestArgs,
    health: Arc<Health>,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    // Metrics recorded before a recorder exists are lost: make sure the global one is there
    // (idempotent; `tally serve` installed it already).
    crate::metrics::install();
    let js = jetstream::new(client.clone());
    // NATS may be restarting: keep trying (not ready meanwhile) rather than exit.
    let mut backoff = Duration::from_millis(100);
    let consumer = loop {
        let attempt = async {
            let stream = nats::ensure_stream(&js, nats_args, &args.consumer).await?;
            nats::ensure_consumer(&stream, nats_args, &args.consumer).await
        };
        match attempt.await {
            Ok(consumer) => break consumer,
            Err(e) => {
                health.set_not_ready(format!("nats: {e}"));
                warn!(error = %e, retry_in = ?backoff, "cannot set up the results stream and consumer yet");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.cancelled() => return Ok(()) }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    health.set_ready();
    info!(consumer = %args.consumer.consumer, batch_size = args.batch_size, "ingest consuming");
    backoff = Duration::from_millis(100);
    'connect: while !shutdown.is_cancelled() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(args.batch_size.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                counter!(names::NATS_PULL_ERRORS).increment(1);
                health.set_not_ready(format!("nats pull: {e}"));
                warn!(error = %e, retry_in = ?backoff, "cannot open the pull stream");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.cancelled() => break }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            // Wait for the first message of a batch (or shutdown).
            let first = tokio::select! {
                m = messages.next() => m,
                _ = shutdown.cancelled() => break 'connect,
            };
            let mut batch = match first {
                Some(Ok(m)) => vec![m],
                Some(Err(e)) => {
                    counter!(names::NATS_PULL_ERRORS).increment(1);
                    warn!(error = %e, retry_in = ?backoff, "pull stream failed; rebuilding it");
                    health.set_not_ready(format!("nats pull: {e}"));
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.cancelled() => break 'connect }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue 'connect;
                }
                None => continue 'connect,
            };
            backoff = Duration::from_millis(100);
            let linger = tokio::time::sleep(Duration::from_millis(args.batch_linger_ms));
            tokio::pin!(linger);
            while batch.len() < args.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(_))) | Some(None) => break,
                    None if args.batch_linger_ms == 0 => break,
                    None => {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(Ok(m)) => batch.push(m),
                                _ => break,
                            },
                            _ = &mut linger => break,
                        }
                    }
                }
            }
            handle_batch(&mut ingestor, &client, batch, args, &health, &hooks).await;
        }
    }
    health.set_not_ready("shutting down");
    info!("ingest stopped");
    Ok(())
}

/// Processes one batch and acks it, whatever happens: no error escapes, a failure NAKs.
async fn handle_batch(
    ingestor: &mut Ingestor,
    client: &async_nats::Client,
    batch: Vec<jetstream::Message>,
    args: &IngestArgs,
    health: &Health,
    hooks: &Hooks,
) {
    let started = Instant::now();
    histogram!(names::INGEST_BATCH_MESSAGES).record(batch.len() as f64);
    let mut oldest: Option<SystemTime> = None;
    let incoming: Vec<Incoming> = batch
        .iter()
        .map(|m| {
            let info = m.info().ok();
            if let Some(i) = &info {
                let published =
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(i.published.unix_timestamp_nanos().max(0) as u64);
                oldest = Some(oldest.map_or(published, |o| o.min(published)));
            }
            Incoming {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                headers: m.headers.as_ref().map(headers_json),
                stream_sequence: info.as_ref().map(|i| i.stream_sequence as i64),
                delivered: info.as_ref().map(|i| i.delivered),
            }
        })
        .collect();
    let report = match ingestor.process(&incoming).await {
        Ok(report) => report,
        Err(e) => {
            warn!(error = %e, messages = batch.len(), transient = e.is_transient(), "batch not saved; NAKing for redelivery");
            health.set_not_ready(format!("batch failed: {e}"));
            counter!(names::INGEST_MESSAGES, "outcome" => "retried").increment(batch.len() as u64);
            let delay = Duration::from_secs(args.nak_delay);
            futures_util::future::join_all(batch.iter().map(|m| m.ack_with(AckKind::Nak(Some(delay))))).await;
            return;
        }
    };
    health.set_ready();
    if let Some(oldest) = oldest {
        if let Ok(lag) = SystemTime::now().duration_since(oldest) {
            gauge!(names::DATAFLOW_LAG_SECONDS).set(lag.as_secs_f64());
        }
    }

    // Acks, only now that the rows and counts are committed.
    let ack_started = Instant::now();
    let tasks: Vec<String> = report
        .outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Saved { reply_subject, .. } => Some(reply_subject.clone()),
            Outcome::DeadLettered { .. } => None,
        })
        .collect();
    let task_acks = nats::ack_tasks(client, tasks.clone(), &args.consumer).await;
    for a in &task_acks {
        let outcome = match a {
            TaskAck::Acked => "acked",
            TaskAck::NoStream => "no_stream",
            TaskAck::Failed => "failed",
        };
        counter!(names::TASK_ACKS, "outcome" => outcome).increment(1);
    }
    // A result is acked only once its task is: a task ack not confirmed (or refused for a
    // stream JetStream still has) sends the result back with a delay; it comes back as a
    // replay, which saves nothing and acks the task again.
    let mut unsure: Vec<i64> = tasks
        .iter()
        .zip(&task_acks)
        .filter(|(_, a)| **a == TaskAck::NoStream)
        .filter_map(|(subject, _)| job_of_reply_subject(subject))
        .collect();
    unsure.sort_unstable();
    unsure.dedup();
    let gone = if unsure.is_empty() { Default::default() } else { nats::streams_gone(client, &unsure).await };
    let settled: Vec<bool> = tasks
        .iter()
        .zip(&task_acks)
        .map(|(subject, a)| match a {
            TaskAck::Acked => true,
            TaskAck::NoStream => job_of_reply_subject(subject).is_some_and(|job| gone.contains(&job)),
            TaskAck::Failed => false,
        })
        .collect();
    let retried = settled.iter().filter(|s| !**s).count();
    if retried > 0 {
        warn!(
            tasks = retried,
            "task acks not confirmed; their results go back to the stream and will ack them again as replays"
        );
        counter!(names::INGEST_MESSAGES, "outcome" => "task_ack_retry").increment(retried as u64);
    }
    let mut settled_iter = settled.iter();
    let verdicts: Vec<Option<bool>> = report
        .outcomes
        .iter()
        .map(|o| match o {
            Outcome::Saved { .. } => Some(settled_iter.next().copied().unwrap_or(false)),
            Outcome::DeadLettered { .. } => None,
        })
        .collect();
    let delay = Duration::from_secs(args.nak_delay);
    let acks = batch.iter().zip(&verdicts).map(|(m, verdict)| async move {
        match verdict {
            Some(true) => m.ack().await,
            Some(false) => m.ack_with(AckKind::Nak(Some(delay))).await,
            None => m.ack_with(AckKind::Term).await,
        }
    });
    let results = futures_util::future::join_all(acks).await;
    let unacked = results.iter().filter(|r| r.is_err()).count();
    if unacked > 0 {
        warn!(unacked, "result acks failed; those results will be redelivered and found already saved");
    }
    let now = SystemTime::now();
    for m in &batch {
        if let Ok(i) = m.info() {
            let published =
                SystemTime::UNIX_EPOCH + Duration::from_nanos(i.published.unix_timestamp_nanos().max(0) as u64);
            if let Ok(d) = now.duration_since(published) {
                histogram!(names::PUBLISH_TO_ACK_SECONDS).record(d.as_secs_f64());
            }
        }
    }
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "ack").record(ack_started.elapsed().as_secs_f64());
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "total").record(started.elapsed().as_secs_f64());

    let mut saved = 0u64;
    let mut noop = 0u64;
    let mut dead = 0usize;
    for o in &report.outcomes {
        match o {
            Outcome::Saved { inserted: 0, .. } => noop += 1,
            Outcome::Saved { .. } => saved += 1,
            Outcome::DeadLettered { .. } => dead += 1,
        }
    }
    counter!(names::INGEST_MESSAGES, "outcome" => "saved").increment(saved);
    counter!(names::INGEST_MESSAGES, "outcome" => "replay_noop").increment(noop);
    counter!(names::INGEST_MESSAGES, "outcome" => "dead_lettered").increment(dead as u64);
    debug!(
        messages = batch.len(),
        saved,
        replays = noop,
        dead_lettered = dead,
        detections = report.rows.detections,
        classifications = report.rows.classifications,
        changed_owners = report.changed_owners,
        ms = started.elapsed().as_millis() as u64,
        "committed batch"
    );
    if let Some(tx) = &hooks.acked {
        let acked = tasks.into_iter().zip(&settled).filter(|(_, s)| **s).map(|(t, _)| t).collect();
        let _ = tx.send(Acked { at: Instant::now(), reply_subjects: acked, dead_lettered: dead });
    }
}

fn headers_json(h: &async_nats::HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, values) in h.iter() {
        let values: Vec<serde_json::Value> = values.iter().map(|v| serde_json::Value::from(v.as_str())).collect();
        map.insert(name.to_string(), serde_json::Value::from(values));
    }
    serde_json::Value::Object(map)
}
