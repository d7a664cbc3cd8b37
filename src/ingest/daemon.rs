//! The ingest loop of `tally serve`. A collector task pulls batches from the results
//! consumer, reads claim-checked results back from the object store and decodes them, one
//! batch ahead; the loop saves each batch while the one before commits
//! ([`Ingestor::prepare`]), then acks it: task acks (confirmed, concurrent) and result acks
//! for saved messages, TERM for dead letters, NAK with a delay for a batch that failed
//! transiently. Any error of the pull stream rebuilds it with backoff; the durable consumer
//! keeps the ack state, so nothing is lost. On shutdown the batches in hand (the one being
//! saved and the one collected ahead) are finished and acked; messages the pull stream had
//! buffered but no batch had taken are redelivered after the consumer's ack wait.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use clap::Args;
use futures_util::{FutureExt, StreamExt};
use metrics::{counter, gauge, histogram};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bytesize::parse_bytes;
use crate::config::NatsArgs;
use crate::duration::{parse_millis, parse_secs};
use crate::http::Health;
use crate::ingest::ack::{self, Deferral, Settlement, Verdict};
use crate::ingest::batch::{BatchReport, Decoder, Incoming, Ingestor, Outcome, Prepare, Prepared};
use crate::ingest::decode::{RejectReason, Rejection, ResultMessage};
use crate::ingest::feed::{self, FeedArgs};
use crate::ingest::monitor;
use crate::ingest::nats::{self, ConsumerArgs};
use crate::ingest::save::{self, RowCounts, WriteMethod};
use crate::ingest::IngestError;
use crate::metrics::names;
use crate::results_stream::{self, FetchError};
use crate::retry::{self, BackoffBuilder};
use crate::store::transaction::waits_for;
use crate::store::Store;

/// Batching and limits of the ingest loop.
#[derive(Clone, Debug, Args)]
pub struct IngestArgs {
    /// Results per batch (one transaction, one dataflow step), at most.
    #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// A batch stops taking results once their bodies (claim-checked ones at their object's
    /// size) add up to this many bytes ("64MiB", bare numbers are bytes): bounds the memory a
    /// batch of large results takes and the size of its statements. A result larger than
    /// this is a batch of its own.
    #[arg(long, env = "TALLY_BATCH_BYTES", value_parser = parse_bytes, default_value = "64MiB")]
    pub batch_bytes: usize,
    /// How long to keep collecting after the first message of a batch arrives while the
    /// batch is not full (0: take what is there; a bare number is milliseconds).
    #[arg(long, alias = "batch-linger-ms", env = "TALLY_BATCH_LINGER_MS", value_parser = parse_millis, default_value = "5ms")]
    pub batch_linger: Duration,
    /// Largest result body accepted, in bytes; larger ones are dead-lettered. One result of
    /// ADC's 29,176-class model with 20 detections is ~50 MB (scores and logits).
    #[arg(long, env = "TALLY_MAX_RESULT_BYTES", value_parser = parse_bytes, default_value = "256MiB")]
    pub max_result_bytes: usize,
    /// How long before a NAKed result (transient failure) is redelivered (a bare number is
    /// seconds).
    #[arg(long, env = "TALLY_NAK_DELAY", value_parser = parse_secs, default_value = "2")]
    pub nak_delay: Duration,
    /// Save each batch only after the batch before it has committed and been acked, instead
    /// of while it commits (for comparison and as an escape hatch; the pipeline keeps every
    /// guarantee).
    #[arg(long, env = "TALLY_NO_PIPELINE")]
    pub no_pipeline: bool,
    /// How new occurrences, detections and classifications are sent to Postgres: `copy`
    /// (binary `COPY`) or `unnest` (`INSERT … SELECT FROM UNNEST`, the method before
    /// 2026-12-07, kept for comparison). Both store the same rows.
    #[arg(long, env = "TALLY_WRITE_METHOD", value_enum, default_value_t = WriteMethod::Copy)]
    pub write_method: WriteMethod,
    /// Timely worker threads of the count dataflow.
    #[arg(short = 'w', long, env = "TALLY_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// How often the results consumer's state is read for `/readyz` and `/metrics`
    /// (ack-pending at its cap = stalled).
    #[arg(long, env = "TALLY_MONITOR_EVERY", value_parser = parse_secs, default_value = "5s")]
    pub monitor_every: Duration,
    /// The results consumer counts as stalled (`/readyz` 503) when its ack-pending count is at
    /// `--max-ack-pending` and the oldest unacked result has waited this long.
    #[arg(long, env = "TALLY_STALL_AFTER", value_parser = parse_secs, default_value = "60s")]
    pub stall_after: Duration,
    /// Consumer settings.
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// Change feed settings.
    #[command(flatten)]
    pub feed: FeedArgs,
}

impl Default for IngestArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
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
    let mut backoff = retry::reconnect().build();
    let (stream, consumer, objects) = loop {
        let attempt = async {
            let stream = nats::ensure_stream(&js, nats_args, &args.consumer).await?;
            let consumer = nats::ensure_consumer(&stream, nats_args, &args.consumer).await?;
            let objects =
                results_stream::ensure_bucket(&js, &nats_args.results_object_bucket, args.consumer.max_age()).await?;
            Ok::<_, IngestError>((stream, consumer, objects))
        };
        match attempt.await {
            Ok(ready) => break ready,
            Err(e) => {
                health.set_not_ready(format!("nats: {e}"));
                let pause = retry::pause(&mut backoff);
                warn!(error = %e, retry_in = ?pause, "cannot set up the results stream and consumer yet");
                tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.cancelled() => return Ok(()) }
            }
        }
    };
    health.set_ready();
    info!(consumer = %args.consumer.consumer, batch_size = args.batch_size, "ingest consuming");
    // Background helpers, stopped when the loop ends.
    let helpers = shutdown.child_token();
    let monitor = tokio::spawn(monitor::run(
        consumer.clone(),
        stream,
        Arc::clone(&health),
        args.monitor_every,
        args.stall_after,
        helpers.clone(),
    ));
    let retries = tokio::spawn(ack::run_retries(
        ingestor.store().clone(),
        client.clone(),
        nats_args.clone(),
        args.consumer.clone(),
        Duration::from_secs(1),
        helpers.clone(),
    ));
    // Django's edits: the listener wakes the loop, which applies them between batches.
    let wake = Arc::new(tokio::sync::Notify::new());
    let listener = feed::spawn_listener(
        ingestor.store().args.database_url.clone(),
        Arc::clone(&wake),
        args.feed.feed_poll,
        helpers.clone(),
    );
    let ctx =
        Arc::new(Context { client: client.clone(), objects, args: args.clone(), health: Arc::clone(&health), hooks });
    // The batch committing in the background (ingest's pipeline), and the acks of committed
    // batches still being sent.
    let mut pipeline = Pipeline::default();
    // A cluster's lost process is noticed while idle too, not only by the next batch.
    let clustered = ingestor.is_clustered();
    let mut cluster_check = tokio::time::interval(CLUSTER_CHECK_EVERY);
    cluster_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Batches are pulled, resolved and decoded by a task of their own, one batch ahead of
    // the one being saved.
    let (ahead, mut batches) = mpsc::channel(1);
    let collecting = shutdown.child_token();
    let collector = Collector {
        consumer,
        client: client.clone(),
        objects: ctx.objects.clone(),
        args: args.clone(),
        health: Arc::clone(&health),
        decoder: ingestor.decoder(),
    };
    let collector = tokio::spawn(collector.run(ahead, collecting.clone()));
    loop {
        // Wait for the next batch (or shutdown).
        let batch = tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => break,
            },
            committed = pipeline.committed(), if pipeline.is_busy() => {
                ingestor.settle(committed.as_ref());
                continue;
            }
            _ = wake.notified() => {
                // Django's edits apply between committed batches, in the order read.
                pipeline.finish(&mut ingestor).await;
                drain_feed(&mut ingestor, &args.feed, &health, &wake).await;
                continue;
            }
            _ = cluster_check.tick(), if clustered => {
                pipeline.finish(&mut ingestor).await;
                check_cluster(&mut ingestor, &health).await;
                continue;
            }
            _ = shutdown.cancelled() => break,
        };
        handle_batch(&mut ingestor, &ctx, batch, &mut pipeline).await;
    }
    // A batch the collector has in hand is saved and acked too: it stops at its next wait for
    // a first message, and the channel closes.
    collecting.cancel();
    while let Some(batch) = batches.recv().await {
        handle_batch(&mut ingestor, &ctx, batch, &mut pipeline).await;
    }
    let _ = collector.await;
    // The batch in hand is committed and acked before the loop ends.
    pipeline.finish(&mut ingestor).await;
    pipeline.acks_sent().await;
    helpers.cancel();
    let _ = tokio::join!(monitor, retries, listener);
    health.set_not_ready("shutting down");
    info!("ingest stopped");
    Ok(())
}

/// A batch pulled, resolved and decoded, ready to be saved.
struct Collected {
    /// The messages whose results could be read (the others were NAKed).
    messages: Vec<jetstream::Message>,
    /// What ingest decodes of each.
    work: Vec<Incoming>,
    /// Each decoded (or its rejection).
    decoded: Vec<Result<ResultMessage, Rejection>>,
    /// When it started to be resolved.
    started: Instant,
    /// When its oldest message was published.
    oldest: Option<SystemTime>,
}

/// Pulls the results stream into batches and resolves and decodes each while the loop saves
/// the one before: a batch's claim-checked objects and its JSON (a large share of the time
/// with ADC's large models) no longer wait for the save before it.
struct Collector {
    consumer: PullConsumer,
    client: async_nats::Client,
    objects: results_stream::Objects,
    args: IngestArgs,
    health: Arc<Health>,
    decoder: Decoder,
}

impl Collector {
    /// Sends batches to `ahead` until `stop` is cancelled, waiting for room in it before it
    /// starts a batch: a batch takes what arrived while the one before it waited, and at most
    /// one batch waits.
    async fn run(self, ahead: mpsc::Sender<Collected>, stop: CancellationToken) {
        let args = &self.args;
        let mut backoff = retry::reconnect().build();
        'connect: while !stop.is_cancelled() {
            let mut messages = match self
                .consumer
                .stream()
                .max_messages_per_batch(args.batch_size.max(1))
                .max_bytes_per_batch(pull_bytes(args.batch_bytes, self.client.server_info().max_payload))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    if self.pause_after_pull_error(&e, "cannot open the pull stream", &mut backoff, &stop).await {
                        continue;
                    }
                    break;
                }
            };
            loop {
                let slot = tokio::select! {
                    slot = ahead.reserve() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break 'connect,
                    },
                    _ = stop.cancelled() => break 'connect,
                };
                // Wait for the first message of a batch (or shutdown).
                let first = tokio::select! {
                    m = messages.next() => m,
                    _ = stop.cancelled() => break 'connect,
                };
                let mut batch = match first {
                    Some(Ok(m)) => vec![m],
                    Some(Err(e)) => {
                        if self
                            .pause_after_pull_error(&e, "pull stream failed; rebuilding it", &mut backoff, &stop)
                            .await
                        {
                            continue 'connect;
                        }
                        break 'connect;
                    }
                    None => continue 'connect,
                };
                backoff = retry::reconnect().build();
                let bytes_of =
                    |m: &jetstream::Message| results_stream::result_bytes(m.headers.as_ref(), m.payload.len());
                let linger = tokio::time::sleep(args.batch_linger);
                tokio::pin!(linger);
                let mut bytes: usize = batch.iter().map(bytes_of).sum();
                while batch.len() < args.batch_size && bytes < args.batch_bytes {
                    let m = match messages.next().now_or_never() {
                        Some(Some(Ok(m))) => m,
                        Some(Some(Err(_))) | Some(None) => break,
                        None if args.batch_linger.is_zero() => break,
                        None => {
                            tokio::select! {
                                m = messages.next() => match m {
                                    Some(Ok(m)) => m,
                                    _ => break,
                                },
                                _ = &mut linger => break,
                            }
                        }
                    };
                    bytes += bytes_of(&m);
                    batch.push(m);
                }
                histogram!(names::INGEST_BATCH_BYTES).record(bytes as f64);
                histogram!(names::INGEST_BATCH_MESSAGES).record(batch.len() as f64);
                if let Some(collected) = self.resolve_and_decode(batch).await {
                    slot.send(collected);
                }
            }
        }
    }

    /// After the pull stream failed (`what`): counts and logs it, says so on `/readyz`, and
    /// waits the next backoff delay. False when shutdown came first.
    async fn pause_after_pull_error(
        &self,
        e: &(dyn std::fmt::Display + Sync),
        what: &str,
        backoff: &mut retry::ExponentialBackoff,
        stop: &CancellationToken,
    ) -> bool {
        counter!(names::NATS_PULL_ERRORS).increment(1);
        self.health.set_not_ready(format!("nats pull: {e}"));
        let pause = retry::pause(backoff);
        warn!(error = %e, retry_in = ?pause, "{what}");
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = stop.cancelled() => false,
        }
    }

    /// Resolves a batch's claim checks and refusals and decodes it; `None` when no message
    /// could be read now (all NAKed).
    async fn resolve_and_decode(&self, batch: Vec<jetstream::Message>) -> Option<Collected> {
        let started = Instant::now();
        let oldest: Option<SystemTime> = batch.iter().filter_map(|m| m.info().ok().map(|i| published_at(&i))).min();
        let (messages, work, decoded) = resolve(batch, &self.objects, &self.decoder, self.args.nak_delay).await;
        if work.is_empty() {
            return None;
        }
        Some(Collected { messages, work, decoded, started, oldest })
    }
}

/// Bytes one pull request may bring, at most. NATS disconnects a client as a slow consumer
/// once more than its `max_pending` (64 MiB by default) waits to be written to it, and a pull
/// of 500 results of ADC's 2,497-class model sent inline (~0.85 MB each) is 400 MB at once:
/// the connection dropped, the results delivered on it waited `--ack-wait` to come back, and
/// came back the same way. The pull stream keeps up to 1.5 requests outstanding.
const PULL_MAX_BYTES: usize = 16 << 20;

/// The pull requests' byte limit: `--batch-bytes`, at most [`PULL_MAX_BYTES`], and always
/// room for one message of the server's `max_payload` (a larger one could never be
/// delivered).
fn pull_bytes(batch_bytes: usize, max_payload: usize) -> usize {
    batch_bytes.min(PULL_MAX_BYTES).max(max_payload + 64 * 1024)
}

/// How often an idle process 0 checks that every process of its dataflow cluster is there.
const CLUSTER_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Checks the dataflow cluster (one empty dataflow time). When a process is gone: not ready,
/// wait for the cluster to form again, rebuild from Postgres, ready again. Shutdown ends the
/// wait (the loop then stops).
async fn check_cluster(ingestor: &mut Ingestor, health: &Health) {
    let Err(e) = ingestor.check_cluster() else { return };
    warn!(error = %e, "a process of the dataflow cluster is gone: waiting for the cluster to form again, then rebuilding");
    health.set_not_ready(format!("waiting for the dataflow cluster (a process was lost: {e}), then rebuilding"));
    match ingestor.rebuild().await {
        Ok(()) => health.set_ready(),
        Err(IngestError::Stopped) => {}
        Err(e) => {
            warn!(error = %e, "rebuilding after losing a cluster process failed; trying again at the next check");
            health.set_not_ready(format!("rebuilding the dataflow after losing a cluster process: {e}"));
        }
    }
}

/// Applies the change feed until the outbox is empty. A failure is logged and counted, and
/// the loop is woken again a second later (the engine is rebuilt first if it was applied).
async fn drain_feed(ingestor: &mut Ingestor, args: &FeedArgs, health: &Health, wake: &Arc<tokio::sync::Notify>) {
    loop {
        match ingestor.apply_feed(args.feed_batch, args.debug_feed_pause).await {
            Ok(report) if report.entries < args.feed_batch.max(1) as usize => break,
            Ok(_) => continue,
            Err(e) => {
                counter!(names::FEED_ERRORS).increment(1);
                warn!(error = %e, "change feed step failed; retrying in 1 s");
                health.set_not_ready(format!("change feed: {e}"));
                let wake = Arc::clone(wake);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    wake.notify_one();
                });
                return;
            }
        }
    }
    health.set_ready();
    if let Ok(client) = ingestor.store().client().await {
        if let Ok(n) = feed::backlog(&client).await {
            gauge!(names::FEED_BACKLOG).set(n as f64);
        }
    }
}

/// What the loop hands every batch.
struct Context {
    client: async_nats::Client,
    objects: results_stream::Objects,
    args: IngestArgs,
    health: Arc<Health>,
    hooks: Hooks,
}

/// Acks the tasks of the saved results (`saved`: their indices in `outcomes`) and stores
/// the unconfirmed ones for retry: returns the task subjects, their settlements, and whether
/// the deferrals were stored (which [`ack::verdicts`] needs).
async fn settle_tasks(
    store: &Store,
    ctx: &Context,
    outcomes: &[Outcome],
    saved: &[usize],
    work: &[Incoming],
) -> (Vec<String>, Vec<Settlement>, bool) {
    let (client, args) = (&ctx.client, &ctx.args);
    let tasks: Vec<String> = saved
        .iter()
        .filter_map(|&i| match &outcomes[i] {
            Outcome::Saved { reply_subject, .. } => Some(reply_subject.clone()),
            Outcome::DeadLettered { .. } => None,
        })
        .collect();
    let settlements = ack::settle(client, &tasks, &args.consumer).await;
    for s in &settlements {
        if !matches!(s, Settlement::Deferred(_)) {
            counter!(names::TASK_ACKS, "outcome" => s.label()).increment(1);
        }
    }
    let deferrals: Vec<Deferral> = saved
        .iter()
        .zip(&tasks)
        .zip(&settlements)
        .filter_map(|((&i, task), s)| match s {
            Settlement::Deferred(why) => Some(Deferral {
                reply_subject: task.clone(),
                results_subject: work[i].subject.clone(),
                results_sequence: work[i].stream_sequence,
                error: why.clone(),
            }),
            _ => None,
        })
        .collect();
    // A task ack that could not be confirmed is retried in the background; the result is
    // acked now so that it never holds the results consumer. Only if the retry cannot be
    // stored does the result go back (its replay saves nothing and acks the task again).
    let deferred_stored = match ack::defer(store, &deferrals, &args.consumer).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, tasks = deferrals.len(), "cannot store task acks for retry; their results go back to the stream");
            counter!(names::INGEST_MESSAGES, "outcome" => "task_ack_retry").increment(deferrals.len() as u64);
            false
        }
    };
    if !deferrals.is_empty() && deferred_stored {
        warn!(tasks = deferrals.len(), "task acks not confirmed; retrying them in the background");
    }
    (tasks, settlements, deferred_stored)
}

/// Applies the verdicts to the result messages; a claim check's object is deleted once the
/// server confirmed the ack or term (a lost ack would bring the message back without it).
async fn ack_results(
    messages: &[jetstream::Message],
    verdicts: &[Verdict],
    objects: &results_stream::Objects,
    delay: Duration,
) -> Vec<Result<(), async_nats::Error>> {
    let acks = messages.iter().zip(verdicts).map(|(m, verdict)| async move {
        let object = results_stream::object_of(m.headers.as_ref());
        let answer = match (verdict, &object) {
            (Verdict::Ack, None) => m.ack().await,
            (Verdict::Term, None) => m.ack_with(AckKind::Term).await,
            // The object goes once the server has confirmed the ack: a lost ack would bring
            // the message back without its object.
            (Verdict::Ack, Some(_)) => m.double_ack().await,
            (Verdict::Term, Some(_)) => m.double_ack_with(AckKind::Term).await,
            (Verdict::Nak, _) => m.ack_with(AckKind::Nak(Some(delay))).await,
        };
        if let (Ok(()), Some(name), Verdict::Ack | Verdict::Term) = (&answer, &object, verdict) {
            results_stream::delete_object(objects, name).await;
            counter!(names::RESULT_OBJECTS, "side" => "deleted").increment(1);
        }
        answer
    });
    futures_util::future::join_all(acks).await
}

/// Counts a committed batch's outcomes (saved, replays, dead letters) in metrics and the log;
/// returns the dead letters (the `acked` hook reports them).
fn record_outcomes(report: &BatchReport, messages: usize, started: Instant) -> usize {
    let mut saved_n = 0u64;
    let mut noop = 0u64;
    let mut dead = 0usize;
    for o in &report.outcomes {
        match o {
            Outcome::Saved { inserted: 0, .. } => noop += 1,
            Outcome::Saved { .. } => saved_n += 1,
            Outcome::DeadLettered { .. } => dead += 1,
        }
    }
    counter!(names::INGEST_MESSAGES, "outcome" => "saved").increment(saved_n);
    counter!(names::INGEST_MESSAGES, "outcome" => "replay_noop").increment(noop);
    counter!(names::INGEST_MESSAGES, "outcome" => "dead_lettered").increment(dead as u64);
    debug!(
        messages,
        saved = saved_n,
        replays = noop,
        dead_lettered = dead,
        detections = report.rows.detections,
        classifications = report.rows.classifications,
        changed_owners = report.changed_owners,
        ms = started.elapsed().as_millis() as u64,
        "committed batch"
    );
    dead
}

/// Objects of claim-check messages read at once while resolving a batch. A batch holds at
/// most `--batch-bytes` (64 MiB: 7–8 results of ADC's 29,176-class model), so this is about
/// all of such a batch; with each result decoded as it arrives, 8 drained 1.15× faster than 4
/// at that size (docs/benchmarks.md).
const OBJECTS_AT_ONCE: usize = 8;

/// Resolves each message of a batch (a claim check to its object's bytes, a refusal to its
/// rejection) and decodes it, in order: the messages whose result could be read, what ingest
/// decodes of each, and each decoded. A message whose object cannot be read now is NAKed to
/// wait.
///
/// Objects are read a few at a time, and each result is decoded as soon as it has been read,
/// while the next objects arrive: reading and decoding a 29,176-class result (9 MB) take tens
/// of milliseconds each, and one after the other for a whole batch they made the collector
/// slower than the save. `stage="decode"` records the time spent decoding, `stage="resolve"`
/// the rest of the phase (waiting for objects that decoding did not hide).
async fn resolve(
    batch: Vec<jetstream::Message>,
    objects: &results_stream::Objects,
    decoder: &Decoder,
    delay: Duration,
) -> (Vec<jetstream::Message>, Vec<Incoming>, Vec<Result<ResultMessage, Rejection>>) {
    let started = Instant::now();
    let reads: Vec<_> = batch.iter().map(|m| resolve_one(m, objects, decoder)).collect();
    let resolved: Vec<(Result<Resolved, String>, Duration)> =
        futures_util::stream::iter(reads).buffered(OBJECTS_AT_ONCE).collect().await;
    let decoding: Duration = resolved.iter().map(|(_, d)| *d).sum();
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "decode").record(decoding.as_secs_f64());
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "resolve")
        .record(started.elapsed().saturating_sub(decoding).as_secs_f64());
    let mut messages = Vec::with_capacity(batch.len());
    let mut work = Vec::with_capacity(batch.len());
    let mut decoded = Vec::with_capacity(batch.len());
    for (m, (r, _)) in batch.into_iter().zip(resolved) {
        match r {
            Ok((i, d)) => {
                messages.push(m);
                work.push(i);
                decoded.push(d);
            }
            Err(e) => {
                warn!(subject = %m.subject, error = %e, "cannot read a result's object now; NAKing it");
                counter!(names::INGEST_MESSAGES, "outcome" => "retried").increment(1);
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
    (messages, work, decoded)
}

/// A message read and decoded: what ingest decodes of it, and the result or its rejection.
type Resolved = (Incoming, Result<ResultMessage, Rejection>);

/// Reads one message (see [`incoming`]) and decodes it at once; also returns the time spent
/// decoding.
async fn resolve_one(
    m: &jetstream::Message,
    objects: &results_stream::Objects,
    decoder: &Decoder,
) -> (Result<Resolved, String>, Duration) {
    match incoming(m, objects, decoder.max_bytes()).await {
        Ok(i) => {
            let decoding = Instant::now();
            // CPU only: off the async threads, while the objects already asked for keep
            // arriving on the connection's own task.
            let decoded = tokio::task::block_in_place(|| decoder.decode_one(&i));
            (Ok((i, decoded)), decoding.elapsed())
        }
        Err(e) => (Err(e), Duration::ZERO),
    }
}

/// Turns a message into what ingest decodes: a claim check is resolved to its object's bytes,
/// a gateway refusal to its rejection. `Err` means the object could not be read now (NAK).
async fn incoming(
    m: &jetstream::Message,
    objects: &results_stream::Objects,
    max_bytes: usize,
) -> Result<Incoming, String> {
    let info = m.info().ok();
    let mut payload = m.payload.clone();
    let mut preset = None;
    let headers = m.headers.as_ref();
    if let Some(name) = results_stream::object_of(headers) {
        match results_stream::fetch_object(objects, &name, max_bytes).await {
            Ok(bytes) => {
                counter!(names::RESULT_OBJECTS, "side" => "fetched").increment(1);
                payload = bytes;
            }
            Err(FetchError::Missing(name)) => {
                preset = Some(Rejection::new(
                    RejectReason::ObjectMissing,
                    format!("the result's object {name} does not exist (deleted or expired before ingest read it)"),
                ))
            }
            Err(FetchError::TooLarge { size, limit, .. }) => {
                // The object stays until the message is terminated; its bytes are not kept.
                preset = Some(Rejection::new(
                    RejectReason::Oversized,
                    format!(
                        "body of {size} bytes is over the limit of {limit} bytes (carried by object {name}, not kept)"
                    ),
                ))
            }
            Err(e @ FetchError::Transient { .. }) => return Err(e.to_string()),
        }
    }
    if let Some(code) = headers.and_then(|h| h.get(results_stream::REFUSED_HEADER)) {
        let reason = headers
            .and_then(|h| h.get(results_stream::REFUSED_REASON_HEADER))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let code = RejectReason::from_code(code.as_str()).unwrap_or(RejectReason::WrongShape);
        preset = Some(Rejection::new(code, format!("refused by the gateway: {reason}")));
    }
    Ok(Incoming {
        subject: m.subject.to_string(),
        payload,
        headers: headers.map(headers_json),
        stream_sequence: info.as_ref().map(|i| i.stream_sequence as i64),
        delivered: info.as_ref().map(|i| i.delivered),
        preset,
    })
}

/// How often a prepared batch that is waiting for the commit of the batch before it checks
/// whether that commit waits for one of its locks (`pg_blocking_pids`). No lock ingest takes
/// should make it, but if one does, the prepared batch rolls back (releasing its locks), the
/// commit finishes, and the batch is saved again on its own.
const PIPELINE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Ingest's pipeline: at most one batch committing (and then acking) in the background while
/// the loop decodes, reads, saves and applies the next one.
#[derive(Default)]
struct Pipeline {
    /// The batch committing: what the next batch must not read before it commits, and the
    /// rows it committed (`None` if it did not).
    committing: Option<Committed>,
    /// Acks of committed batches still being sent.
    acks: JoinSet<()>,
}

impl Pipeline {
    fn is_busy(&self) -> bool {
        self.committing.is_some()
    }

    /// Waits for the committing batch's outcome (forever when there is none).
    async fn committed(&mut self) -> Option<RowCounts> {
        let Some(c) = self.committing.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = (&mut c.outcome).await.unwrap_or(None);
        self.committing = None;
        outcome
    }

    /// Waits for the committing batch, if any, and settles it with the ingestor.
    async fn finish(&mut self, ingestor: &mut Ingestor) {
        if self.is_busy() {
            let committed = self.committed().await;
            ingestor.settle(committed.as_ref());
        }
        while self.acks.try_join_next().is_some() {}
    }

    /// Waits until every committed batch's acks are sent.
    async fn acks_sent(&mut self) {
        while self.acks.join_next().await.is_some() {}
    }

    /// Commits `prepared` in the background, then acks its messages (or NAKs them if the
    /// commit fails).
    fn commit(&mut self, prepared: Box<Prepared>, batch: Committing, ctx: &Arc<Context>, store: &Store) {
        let (tx, rx) = oneshot::channel();
        self.committing = Some(Committed {
            footprint: prepared.footprint().clone(),
            backend_pid: prepared.backend_pid(),
            outcome: rx,
        });
        let (ctx, store) = (Arc::clone(ctx), store.clone());
        self.acks.spawn(async move {
            match prepared.commit().await {
                Ok(report) => {
                    let _ = tx.send(Some(report.rows));
                    acknowledge(&store, &ctx, batch, report).await;
                }
                Err(e) => {
                    let _ = tx.send(None);
                    nak_all(&ctx, &batch.messages, &e).await;
                }
            }
        });
    }
}

/// The batch committing in the background.
struct Committed {
    /// What the next batch must not read before it commits.
    footprint: save::Footprint,
    /// The Postgres server process committing it.
    backend_pid: i32,
    /// Its rows once committed, `None` if the commit failed.
    outcome: oneshot::Receiver<Option<RowCounts>>,
}

/// A batch's messages, between its save and its acks.
struct Committing {
    messages: Vec<jetstream::Message>,
    work: Vec<Incoming>,
    started: Instant,
    oldest: Option<SystemTime>,
}

/// Processes one batch and acks it, whatever happens: no error escapes, a failure NAKs.
///
/// The batch is saved while the batch before it commits, unless what it reads meets what
/// that one wrote (then it waits for it and reads again); it commits only after the batch
/// before it has, and is then acked in the background. A failure of the batch before it
/// rolls it back, and it is saved again on its own.
async fn handle_batch(ingestor: &mut Ingestor, ctx: &Arc<Context>, batch: Collected, pipeline: &mut Pipeline) {
    if ctx.args.no_pipeline {
        pipeline.finish(ingestor).await;
        pipeline.acks_sent().await;
    }
    let Collected { messages, work, decoded, started, oldest } = batch;
    let batch = Committing { messages, work, started, oldest };

    // Saved beside the batch committing, if its reads allow.
    if let Some(c) = &pipeline.committing {
        let (busy, committing_pid) = (c.footprint.clone(), c.backend_pid);
        if !ingestor.is_dirty() {
            match ingestor.prepare(&batch.work, &decoded, Some(&busy)).await {
                Ok(Prepare::Ready(prepared)) => {
                    counter!(names::INGEST_PIPELINE, "event" => "overlapped").increment(1);
                    debug!(messages = batch.work.len(), "batch saved while the batch before it committed");
                    let before = loop {
                        match tokio::time::timeout(PIPELINE_CHECK_EVERY, pipeline.committed()).await {
                            Ok(outcome) => break Some(outcome),
                            Err(_) if waits_for(ingestor.store(), committing_pid, prepared.backend_pid()).await => {
                                break None
                            }
                            Err(_) => continue,
                        }
                    };
                    match before {
                        Some(Some(rows)) => {
                            ingestor.settle(Some(&rows));
                            pipeline.commit(prepared, batch, ctx, ingestor.store());
                            return;
                        }
                        Some(None) => {
                            // The batch before failed: the engine holds rows that were never
                            // committed, so this one starts again from a rebuilt engine.
                            ingestor.settle(None);
                            ingestor.abandon(prepared).await;
                        }
                        None => {
                            warn!("the commit of the batch before waits for a lock of this one; rolling this one back and saving it again after that commit");
                            ingestor.abandon(prepared).await;
                            let committed = pipeline.committed().await;
                            ingestor.settle(committed.as_ref());
                        }
                    }
                }
                Ok(Prepare::Conflict) => debug!("batch reads what the batch committing wrote; waiting for that commit"),
                Err(e) => {
                    debug!(error = %e, "saving beside the batch committing failed; saving again after that commit")
                }
            }
        }
        pipeline.finish(ingestor).await;
    }

    // Nothing else uncommitted: saved on its own.
    match ingestor.prepare(&batch.work, &decoded, None).await {
        Ok(Prepare::Ready(prepared)) => pipeline.commit(prepared, batch, ctx, ingestor.store()),
        Ok(Prepare::Conflict) => unreachable_conflict(ctx, &batch.messages).await,
        Err(e) if e.is_transient() => nak_all(ctx, &batch.messages, &e).await,
        Err(e) => {
            warn!(error = %e, messages = batch.work.len(), "batch failed permanently; saving its messages one by one");
            match ingestor.process_one_by_one(&batch.work, &decoded).await {
                Ok(report) => acknowledge(ingestor.store(), ctx, batch, report).await,
                Err(e) => nak_all(ctx, &batch.messages, &e).await,
            }
        }
    }
}

/// A conflict with no batch committing cannot happen; NAKed if it ever does.
async fn unreachable_conflict(ctx: &Context, messages: &[jetstream::Message]) {
    let e = IngestError::Internal("a batch conflicted with no batch committing".into());
    nak_all(ctx, messages, &e).await;
}

/// NAKs every message of a batch that was not saved (redelivered after `--nak-delay`).
async fn nak_all(ctx: &Context, messages: &[jetstream::Message], e: &IngestError) {
    warn!(error = %e, messages = messages.len(), transient = e.is_transient(), "batch not saved; NAKing for redelivery");
    ctx.health.set_not_ready(format!("batch failed: {e}"));
    counter!(names::INGEST_MESSAGES, "outcome" => "retried").increment(messages.len() as u64);
    let delay = ctx.args.nak_delay;
    futures_util::future::join_all(messages.iter().map(|m| m.ack_with(AckKind::Nak(Some(delay))))).await;
}

/// Acks a committed batch: tasks first, then results.
async fn acknowledge(store: &Store, ctx: &Context, batch: Committing, report: BatchReport) {
    let Committing { messages, work, started, oldest } = batch;
    let Context { objects, args, health, hooks, .. } = ctx;
    health.set_ready();
    if let Some(oldest) = oldest {
        if let Ok(lag) = SystemTime::now().duration_since(oldest) {
            gauge!(names::DATAFLOW_LAG_SECONDS).set(lag.as_secs_f64());
        }
    }
    let ack_started = Instant::now();
    let saved: Vec<usize> = report
        .outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Outcome::Saved { .. }))
        .map(|(i, _)| i)
        .collect();
    let (tasks, settlements, deferred_stored) = settle_tasks(store, ctx, &report.outcomes, &saved, &work).await;
    let verdicts = ack::verdicts(&report.outcomes, &settlements, deferred_stored);
    let results = ack_results(&messages, &verdicts, objects, args.nak_delay).await;
    let unacked = results.iter().filter(|r| r.is_err()).count();
    if unacked > 0 {
        warn!(unacked, "result acks failed; those results will be redelivered and found already saved");
    }
    let now = SystemTime::now();
    for m in &messages {
        if let Ok(i) = m.info() {
            if let Ok(d) = now.duration_since(published_at(&i)) {
                histogram!(names::PUBLISH_TO_ACK_SECONDS).record(d.as_secs_f64());
            }
        }
    }
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "ack").record(ack_started.elapsed().as_secs_f64());
    histogram!(names::INGEST_BATCH_SECONDS, "stage" => "total").record(started.elapsed().as_secs_f64());

    let dead = record_outcomes(&report, messages.len(), started);
    if let Some(tx) = &hooks.acked {
        let acked = tasks
            .into_iter()
            .zip(&settlements)
            .filter(|(_, s)| !matches!(s, Settlement::Deferred(_)) || deferred_stored)
            .map(|(t, _)| t)
            .collect();
        let _ = tx.send(Acked { at: Instant::now(), reply_subjects: acked, dead_lettered: dead });
    }
}

fn published_at(info: &async_nats::jetstream::message::Info<'_>) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(info.published.unix_timestamp_nanos().max(0) as u64)
}

fn headers_json(h: &async_nats::HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, values) in h.iter() {
        let values: Vec<serde_json::Value> = values.iter().map(|v| serde_json::Value::from(v.as_str())).collect();
        map.insert(name.to_string(), serde_json::Value::from(values));
    }
    serde_json::Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::pull_bytes;

    #[test]
    fn pull_requests_stay_under_the_slow_consumer_limit_and_fit_a_message() {
        assert_eq!(pull_bytes(64 << 20, 1 << 20), 16 << 20);
        assert_eq!(pull_bytes(4 << 20, 1 << 20), 4 << 20);
        assert_eq!(pull_bytes(1000, 1 << 20), (1 << 20) + 65536);
        assert_eq!(pull_bytes(64 << 20, 32 << 20), (32 << 20) + 65536);
    }
}
