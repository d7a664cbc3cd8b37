//! One batch of result messages end to end: decode and validate each, then in **one**
//! Postgres transaction save the valid ones, store the rejected ones as dead letters, feed the
//! rows to the dataflow and write the counts that changed; commit; and only then tell the
//! caller what to ack.
//!
//! Why this is crash-safe (SPEC §6): rows, dead letters and the counts that reflect them
//! commit together or not at all, and nothing is acked before that commit. A crash before the
//! commit loses nothing (the messages are redelivered and saved then); a crash after it and
//! before the acks makes JetStream redeliver messages whose rows exist, and saving them again
//! is a no-op (detections, classifications and null markers are found by value, rule 8). The
//! engine is applied before the commit so that the counts can be written inside it; if
//! anything fails after that point, the engine may hold rows the database does not (or, if a
//! commit's outcome is unknown, the reverse), so it is marked dirty and rebuilt from Postgres
//! before the next batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use metrics::{counter, histogram};
use tally_dataflows::{CountChanges, Engine, Id, InputBatch, Known, Submitted, Topology};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::dead_letters::{self, NewDeadLetter};
use crate::django_cache::DjangoCache;
use crate::ingest::analyze::Analyzer;
use crate::ingest::decode::{self, Envelope, RejectReason, Rejection, ResultMessage};
use crate::ingest::feed;
use crate::ingest::save::{self, Footprint, JobLogLine, RowCounts, WriteMethod};
use crate::ingest::IngestError;
use crate::jobs::logs::Level;
use crate::metrics::names;
use crate::store::transaction::OwnedTransaction;
use crate::store::{self, sink::SinkReport, Store};

/// One message as it came off the stream.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Its subject (`tally.results.{job_id}`).
    pub subject: String,
    /// Its body.
    pub payload: bytes::Bytes,
    /// Its headers, as JSON, for dead letters.
    pub headers: Option<serde_json::Value>,
    /// Its sequence in the results stream.
    pub stream_sequence: Option<i64>,
    /// Delivery attempts so far.
    pub delivered: Option<i64>,
    /// Already known to be rejected (a refusal the gateway published, a claim check whose
    /// object is missing): dead-lettered with this reason, not decoded.
    pub preset: Option<Rejection>,
}

/// What to do with one message after the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Saved (rows and counts committed): ack it and its task.
    Saved {
        /// The task's ack subject.
        reply_subject: String,
        /// Rows it inserted (0: a replay).
        inserted: u64,
    },
    /// Stored as a dead letter: terminate it (no redelivery); its task is left for NATS to
    /// redeliver to a worker.
    DeadLettered {
        /// The reason code.
        code: RejectReason,
    },
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Per message, in input order.
    pub outcomes: Vec<Outcome>,
    /// Rows inserted.
    pub rows: RowCounts,
    /// Count rows written.
    pub sink: SinkReport,
    /// Owners whose counts changed.
    pub changed_owners: usize,
    /// The Antenna tables the batch wrote (whose django-cachalot keys it invalidated).
    pub tables: std::collections::BTreeSet<&'static str>,
}

/// What one change-feed step did.
#[derive(Debug, Default)]
pub struct FeedReport {
    /// Outbox entries applied (0: the outbox was empty).
    pub entries: usize,
    /// Distinct rows re-read, by table.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// Count rows written.
    pub sink: SinkReport,
    /// Owners whose counts changed.
    pub changed_owners: usize,
    /// A TRUNCATE made the step rebuild the engine from Postgres.
    pub rebuilt: bool,
}

/// Work run after each batch commits and before its messages are acked, given the store and
/// the deployments of the batch's images (`tally-tools bench ingest` recomputes their counts
/// there, as Antenna does after every result).
pub type AfterCommit =
    std::sync::Arc<dyn Fn(Store, Vec<Id>) -> BoxFuture<'static, Result<(), IngestError>> + Send + Sync>;

/// What [`Ingestor::prepare`] made of a batch.
#[derive(Debug)]
pub enum Prepare {
    /// Written, waiting for its commit.
    Ready(Box<Prepared>),
    /// Its plan depends on what the batch still committing wrote: nothing was written.
    Conflict,
}

/// A batch written in an open transaction of its own, its counts included: commit it (on
/// any task) once every batch before it has committed, then hand the outcome to
/// [`Ingestor::settle`].
pub struct Prepared {
    tx: OwnedTransaction,
    footprint: Footprint,
    report: BatchReport,
    django: DjangoCache,
    after: Option<BoxFuture<'static, Result<(), IngestError>>>,
    dataflow_rows: i64,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("footprint", &self.footprint).field("report", &self.report).finish()
    }
}

impl Prepared {
    /// What a batch prepared while this one commits must not depend on.
    pub fn footprint(&self) -> &Footprint {
        &self.footprint
    }

    /// The Postgres server process of its transaction.
    pub fn backend_pid(&self) -> i32 {
        self.tx.backend_pid()
    }

    /// Commits; then invalidates Django's query cache for the tables written and runs the
    /// after-commit work. `Err`: the outcome of the commit is unknown or the work failed (the
    /// messages go back to the stream, and their replay is a no-op if the commit happened).
    pub async fn commit(self) -> Result<BatchReport, IngestError> {
        let Prepared { tx, report, django, after, dataflow_rows, .. } = self;
        let started = Instant::now();
        tx.commit().await?;
        django.invalidate(report.tables.iter().copied()).await;
        if let Some(work) = after {
            work.await?;
        }
        histogram!(names::INGEST_BATCH_SECONDS, "stage" => "commit").record(started.elapsed().as_secs_f64());
        record_metrics(&report.rows, &report.sink, dataflow_rows);
        Ok(report)
    }

    /// Rolls back (the ingestor must then be told: [`Ingestor::settle`] with `None`).
    pub async fn rollback(self) {
        self.tx.rollback().await;
    }
}

/// Decodes result messages: the subject prefix they are published under and the largest body
/// accepted.
#[derive(Debug, Clone)]
pub struct Decoder {
    prefix: String,
    max_bytes: usize,
}

impl Decoder {
    /// The largest result body accepted, in bytes (a claim-checked object over it is not read).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Decodes and validates each message of a batch (rejections for the bad ones), off the
    /// async threads: parsing a batch's JSON is milliseconds of CPU (a second and more for
    /// ADC's largest models), and the gateway sharing the runtime keeps answering meanwhile.
    pub fn decode(&self, batch: &[Incoming]) -> Vec<Result<ResultMessage, Rejection>> {
        let started = Instant::now();
        let decoded = tokio::task::block_in_place(|| batch.iter().map(|m| self.decode_one(m)).collect());
        histogram!(names::INGEST_BATCH_SECONDS, "stage" => "decode").record(started.elapsed().as_secs_f64());
        decoded
    }

    /// Decodes and validates one message, on the calling thread (CPU only: the caller keeps
    /// it off the async threads, as [`Decoder::decode`] does).
    pub fn decode_one(&self, m: &Incoming) -> Result<ResultMessage, Rejection> {
        if let Some(r) = &m.preset {
            return Err(r.clone());
        }
        let envelope = Envelope { subject: &m.subject, prefix: &self.prefix, max_bytes: self.max_bytes };
        decode::decode(&envelope, &m.payload)
    }
}

/// The ingest state: the store, the dataflow engine mirroring it, and the validation limits.
pub struct Ingestor {
    store: Store,
    /// `None` before the first rebuild, while a cluster's engine is started again, and
    /// without counts.
    engine: Option<Engine>,
    /// Where the dataflow's workers run.
    topology: Topology,
    prefix: String,
    max_bytes: usize,
    dirty: bool,
    counts: bool,
    after_commit: Option<AfterCommit>,
    analyzer: Analyzer,
    django: DjangoCache,
    /// Cancelled at shutdown: a rebuild waiting for a cluster's lost process gives up.
    stop: CancellationToken,
    /// Batches prepared and not settled yet (at most two: one committing, one prepared).
    pending: usize,
    /// How new rows are sent to Postgres.
    write_method: WriteMethod,
}

impl Ingestor {
    /// An ingestor over `store` whose engine is bootstrapped from it (and every count that
    /// differs corrected), its timely workers placed as `topology` says (process 0 of a
    /// cluster waits here until every other process has connected, or `stop` is cancelled:
    /// then [`IngestError::Stopped`]).
    pub async fn start(
        store: Store,
        topology: Topology,
        prefix: String,
        max_bytes: usize,
        stop: CancellationToken,
    ) -> Result<Self, IngestError> {
        let analyzer = Analyzer::new(store.clone()).await;
        let mut ingestor = Ingestor {
            store,
            engine: None,
            topology,
            prefix,
            max_bytes,
            dirty: true,
            counts: true,
            after_commit: None,
            analyzer,
            django: DjangoCache::disabled(),
            stop,
            pending: 0,
            write_method: WriteMethod::default(),
        };
        ingestor.rebuild().await?;
        Ok(ingestor)
    }

    /// An ingestor that saves rows without keeping counts (for benchmarks, which keep them by
    /// other means, see [`Ingestor::set_after_commit`]): no bootstrap, and batches neither
    /// feed the dataflow nor write counts.
    pub async fn without_counts(store: Store, prefix: String, max_bytes: usize) -> Result<Self, IngestError> {
        let analyzer = Analyzer::new(store.clone()).await;
        Ok(Ingestor {
            store,
            engine: None,
            topology: Topology::local(1),
            prefix,
            max_bytes,
            dirty: false,
            counts: false,
            after_commit: None,
            analyzer,
            django: DjangoCache::disabled(),
            stop: CancellationToken::new(),
            pending: 0,
            write_method: WriteMethod::default(),
        })
    }

    /// Sends new rows to Postgres by `method` (binary `COPY` unless told otherwise).
    pub fn set_write_method(&mut self, method: WriteMethod) {
        self.write_method = method;
    }

    /// Runs `hook` after each batch commits, before its messages are acked.
    pub fn set_after_commit(&mut self, hook: AfterCommit) {
        self.after_commit = Some(hook);
    }

    /// Invalidates Django's query cache (django-cachalot) after each commit, and invalidates
    /// every count table now (the bootstrap may have corrected counts before it was set).
    pub async fn set_django_cache(&mut self, django: DjangoCache) {
        django.invalidate(["main_sourceimage", "main_event", "main_deployment"]).await;
        self.django = django;
    }

    /// Django's query cache it invalidates.
    pub fn django_cache(&self) -> DjangoCache {
        self.django.clone()
    }

    /// The store it writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The largest result body it accepts, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The engine, once built (none without counts).
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    /// The rows held by this process's dataflow workers.
    fn dataflow_rows(&self) -> i64 {
        self.engine.as_ref().map_or(0, Engine::rows)
    }

    /// The engine to apply a batch to; an error (leaving the ingestor dirty) if there is none.
    fn engine_mut(&mut self) -> Result<&mut Engine, IngestError> {
        self.engine.as_mut().ok_or_else(|| store::StoreError::from(tally_dataflows::EngineError::WorkerStopped).into())
    }

    /// Whether the engine must be rebuilt before the next batch.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether the dataflow runs over several processes (one of which may be lost).
    pub fn is_clustered(&self) -> bool {
        self.counts && self.topology.processes() > 1
    }

    /// Checks that every process of the dataflow cluster still takes part (one empty dataflow
    /// time); a lost one leaves the ingestor dirty and returns the error. Nothing to check
    /// when the engine is already dirty or runs in this process alone.
    pub fn check_cluster(&mut self) -> Result<(), IngestError> {
        if self.dirty || !self.is_clustered() {
            return Ok(());
        }
        let engine = self.engine_mut()?;
        let checked = tokio::task::block_in_place(|| engine.check());
        if let Err(e) = checked {
            self.dirty = true;
            return Err(store::StoreError::from(e).into());
        }
        Ok(())
    }

    /// Reloads the engine from Postgres and writes every count that differs (SPEC §6: on
    /// start, and after a batch failed with the engine applied).
    /// Change-feed entries visible when it starts are covered by what it reads, and deleted.
    pub async fn rebuild(&mut self) -> Result<(), IngestError> {
        if self.pending > 0 {
            return Err(IngestError::Internal(format!(
                "cannot rebuild the dataflow with {} prepared batch(es) not settled",
                self.pending
            )));
        }
        // The old engine goes first: a cluster's other processes join the next engine only
        // once the previous one has ended (and process 0's port is free again).
        self.dirty = true;
        if let Some(old) = self.engine.take() {
            tokio::task::spawn_blocking(move || drop(old)).await.map_err(|e| IngestError::Internal(e.to_string()))?;
        }
        let topology = self.topology.clone();
        if topology.processes() > 1 {
            info!(%topology, "starting the dataflow cluster: waiting for every process to connect");
        }
        // A cluster's process 0 waits here for every other process (timely retries forever);
        // at shutdown the waiting thread is left behind (the CLI does not join it).
        let starting = tokio::task::spawn_blocking(move || Engine::start(topology));
        let started = tokio::select! {
            started = starting => started,
            _ = self.stop.cancelled() => return Err(IngestError::Stopped),
        };
        let mut engine = started.map_err(|e| IngestError::Internal(e.to_string()))?.map_err(store::StoreError::from)?;
        let covered = feed::visible(&self.store.client().await?).await?;
        let loaded = store::bootstrap::bootstrap(&self.store, &mut engine).await?;
        let corrected = store::sink::write_all(&self.store, &engine.snapshot()).await?;
        feed::forget(&self.store.client().await?, &covered).await?;
        self.django.invalidate(corrected.tables()).await;
        info!(
            rows = loaded.rows,
            detections = loaded.detections,
            seconds = loaded.seconds,
            corrected = corrected.total(),
            feed_entries_covered = covered.len(),
            "dataflow state rebuilt from Postgres"
        );
        self.engine = Some(engine);
        self.dirty = false;
        metrics::gauge!(names::DATAFLOW_ROWS).set(self.dataflow_rows() as f64);
        Ok(())
    }

    /// Applies up to `limit` change-feed entries (Django's edits) as one dataflow time: their
    /// rows re-read, the counts that changed written, and the entries deleted, in one
    /// transaction. `pause` (tests only) sleeps between the read and the rest.
    pub async fn apply_feed(&mut self, limit: i64, pause: Option<Duration>) -> Result<FeedReport, IngestError> {
        if self.dirty {
            self.rebuild().await?;
        }
        let started = Instant::now();
        let mut client = self.store.client().await?;
        let tx = client.transaction().await.map_err(store::StoreError::from)?;
        let read = feed::read(&tx, limit).await?;
        if read.seqs.is_empty() {
            return Ok(FeedReport::default());
        }
        info!(entries = read.seqs.len(), rows = ?read.rows, truncate = read.truncate, "change feed: read");
        if let Some(pause) = pause {
            warn!(?pause, "change feed: pausing before applying (--debug-feed-pause)");
            tokio::time::sleep(pause).await;
        }
        if read.truncate {
            // No transition tables for a TRUNCATE: read everything again.
            drop(tx);
            warn!("change feed: a table was truncated; rebuilding the dataflow from Postgres");
            self.dirty = true;
            self.rebuild().await?;
            return Ok(FeedReport { entries: read.seqs.len(), rebuilt: true, ..FeedReport::default() });
        }
        self.dirty = true;
        let engine = self.engine_mut()?;
        let changes = tokio::task::block_in_place(|| engine.apply(&read.input)).map_err(store::StoreError::from)?;
        let sink = store::sink::write_changes_in(&*tx, &changes).await?;
        feed::consume(&tx, &read.seqs).await?;
        tx.commit().await.map_err(store::StoreError::from)?;
        self.dirty = false;
        self.django.invalidate(sink.tables()).await;
        let seconds = started.elapsed().as_secs_f64();
        histogram!(names::FEED_STEP_SECONDS).record(seconds);
        histogram!(names::FEED_LAG_SECONDS).record(read.oldest_age + seconds);
        for (table, n) in &read.rows {
            counter!(names::FEED_ROWS, "table" => table.clone()).increment(*n);
        }
        counter!(names::COUNT_WRITES, "table" => "main_sourceimage").increment(sink.images);
        counter!(names::COUNT_WRITES, "table" => "main_event").increment(sink.events);
        counter!(names::COUNT_WRITES, "table" => "main_deployment").increment(sink.deployments);
        metrics::gauge!(names::DATAFLOW_ROWS).set(self.dataflow_rows() as f64);
        info!(
            entries = read.seqs.len(),
            changed_owners = changes.len(),
            counts_written = sink.total(),
            ms = (seconds * 1000.0) as u64,
            "change feed: applied"
        );
        Ok(FeedReport {
            entries: read.seqs.len(),
            rows: read.rows,
            sink,
            changed_owners: changes.len(),
            rebuilt: false,
        })
    }

    /// Processes one batch. `Err` means a transient failure of the whole batch: nothing was
    /// committed, and every message should be retried later.
    pub async fn process(&mut self, batch: &[Incoming]) -> Result<BatchReport, IngestError> {
        let decoded = self.decode(batch);
        self.process_decoded(batch, &decoded).await
    }

    /// Decodes and validates each message of a batch (rejections for the bad ones); see
    /// [`Decoder::decode`].
    pub fn decode(&self, batch: &[Incoming]) -> Vec<Result<ResultMessage, Rejection>> {
        self.decoder().decode(batch)
    }

    /// What decoding needs, for a task of its own (the daemon decodes the next batch while
    /// this one is saved).
    pub fn decoder(&self) -> Decoder {
        Decoder { prefix: self.prefix.clone(), max_bytes: self.max_bytes }
    }

    /// Processes a decoded batch on its own (nothing else uncommitted): one transaction, or,
    /// when that fails for good, one per message, so that one bad message never fails the
    /// others. `Err` means a transient failure of the whole batch.
    pub async fn process_decoded(
        &mut self,
        batch: &[Incoming],
        decoded: &[Result<ResultMessage, Rejection>],
    ) -> Result<BatchReport, IngestError> {
        if self.dirty {
            self.rebuild().await?;
        }
        let all: Vec<usize> = (0..batch.len()).collect();
        match self.commit(batch, decoded, &all).await {
            Ok(report) => Ok(report),
            Err(e) if e.is_transient() || batch.len() == 1 && decoded[0].is_err() => Err(e),
            Err(e) => {
                warn!(error = %e, messages = batch.len(), "batch failed permanently; saving its messages one by one");
                self.process_one_by_one(batch, decoded).await
            }
        }
    }

    /// Saves each message of a batch that failed for good in a transaction of its own (a
    /// value Postgres refuses, a constraint), so that one bad message never fails the others;
    /// a message that still fails for good is dead-lettered (`save_failed`). `Err` means a
    /// transient failure.
    pub async fn process_one_by_one(
        &mut self,
        batch: &[Incoming],
        decoded: &[Result<ResultMessage, Rejection>],
    ) -> Result<BatchReport, IngestError> {
        let mut report = BatchReport { outcomes: Vec::with_capacity(batch.len()), ..BatchReport::default() };
        for i in 0..batch.len() {
            if self.dirty {
                self.rebuild().await?;
            }
            let one = match self.commit(batch, decoded, &[i]).await {
                Ok(one) => one,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    let failed: Vec<Result<ResultMessage, Rejection>> = vec![Err(Rejection::new(
                        RejectReason::SaveFailed,
                        format!("saving failed and retrying cannot help: {e}"),
                    ))];
                    if self.dirty {
                        self.rebuild().await?;
                    }
                    self.commit(&batch[i..=i], &failed, &[0]).await?
                }
            };
            report.rows = add(report.rows, one.rows);
            report.tables.extend(one.tables);
            report.changed_owners += one.changed_owners;
            report.outcomes.extend(one.outcomes);
        }
        Ok(report)
    }

    /// Saves `decoded[i]` for `i` in `which` in one transaction, and commits it.
    async fn commit(
        &mut self,
        batch: &[Incoming],
        decoded: &[Result<ResultMessage, Rejection>],
        which: &[usize],
    ) -> Result<BatchReport, IngestError> {
        let Prepare::Ready(prepared) = self.prepare_which(batch, decoded, which, None).await? else {
            return Err(IngestError::Internal("a batch conflicted with no batch in flight".into()));
        };
        let committed = prepared.commit().await;
        self.settle(committed.as_ref().ok().map(|r| &r.rows));
        committed
    }

    /// Writes a decoded batch in a transaction of its own, up to (not including) its commit,
    /// while the batch with footprint `busy` may still be committing (ingest's pipeline):
    /// rows, dead letters, job logs and progress, the dataflow step and the counts that
    /// changed. Its plan must not depend on what the busy batch wrote: when what it read meets
    /// `busy` ([`Footprint::meets`]), it rolls back at once and answers
    /// [`Prepare::Conflict`] (wait for the busy batch, then prepare again).
    ///
    /// Every [`Prepared`] must be committed in order and its outcome handed to
    /// [`Ingestor::settle`], or be given back to [`Ingestor::abandon`]. An error leaves the
    /// ingestor dirty (rebuilt before the next batch) when the dataflow had been applied.
    pub async fn prepare(
        &mut self,
        batch: &[Incoming],
        decoded: &[Result<ResultMessage, Rejection>],
        busy: Option<&Footprint>,
    ) -> Result<Prepare, IngestError> {
        if self.dirty && self.pending == 0 {
            self.rebuild().await?;
        }
        let all: Vec<usize> = (0..batch.len()).collect();
        self.prepare_which(batch, decoded, &all, busy).await
    }

    async fn prepare_which(
        &mut self,
        batch: &[Incoming],
        decoded: &[Result<ResultMessage, Rejection>],
        which: &[usize],
        busy: Option<&Footprint>,
    ) -> Result<Prepare, IngestError> {
        if self.dirty {
            return Err(IngestError::Internal("the dataflow must be rebuilt before the next batch".into()));
        }
        let save_started = Instant::now();
        let tx = OwnedTransaction::begin(&self.store).await?;
        let valid: Vec<usize> = which.iter().copied().filter(|&i| decoded[i].is_ok()).collect();
        let messages: Vec<&ResultMessage> = valid.iter().filter_map(|&i| decoded[i].as_ref().ok()).collect();
        let none = Known::default();
        let known = self.engine.as_ref().map_or(&none, Engine::known);
        let snapshot = save::read(tx.client(), known, &messages).await?;
        let mut footprint = Footprint::of(&snapshot);
        if busy.is_some_and(|busy| footprint.meets(busy)) {
            tx.rollback().await;
            counter!(names::INGEST_PIPELINE, "event" => "conflict").increment(1);
            return Ok(Prepare::Conflict);
        }
        let staged = save::stage(tx.client(), known, &snapshot, &messages).await?;
        // The count workers compute the batch while Postgres takes its rows.
        let submitted = self.submit_dataflow(&staged.input)?;
        let saved = save::write(tx.client(), &snapshot, staged, self.write_method).await?;
        let rejected = rejections(decoded, which, &valid, &saved.rejected);
        log_dead_letters(batch, &rejected, &self.prefix);
        let (letters, letter_logs) = dead_letters_of(batch, decoded, &rejected, &self.prefix);
        dead_letters::insert_in(tx.client(), &letters).await?;
        let mut logs: Vec<JobLogLine> = saved.job_logs.clone();
        logs.extend(letter_logs);
        let (progress_logs, finished) = update_progress(tx.client(), &saved.progress_jobs).await?;
        logs.extend(progress_logs);
        save::write_job_logs(tx.client(), &logs).await?;
        // What a later batch must not plan against before this one commits: the images and
        // occurrences read here, and the jobs this batch finishes.
        footprint.jobs = finished;
        histogram!(names::INGEST_BATCH_SECONDS, "stage" => "save").record(save_started.elapsed().as_secs_f64());

        let changes = self.collect_dataflow(submitted)?;
        let session: &tokio_postgres::Client = tx.client();
        let sink = store::sink::write_changes_in(session, &changes).await?;
        // The engine now holds the batch; it is consistent with Postgres once the batch
        // commits (settle), and dirty if it never does (settle with an error, or abandon).
        if self.counts {
            self.dirty = false;
        }
        self.pending += 1;
        let tables = written_tables(&saved.rows, &sink, !saved.progress_jobs.is_empty(), !logs.is_empty());
        let outcomes = outcomes(decoded, which, &valid, &rejected, &saved.inserted);
        let after = self.after_commit_work(&saved.input);
        Ok(Prepare::Ready(Box::new(Prepared {
            tx,
            footprint,
            report: BatchReport { outcomes, rows: saved.rows, sink, changed_owners: changes.len(), tables },
            django: self.django.clone(),
            after,
            dataflow_rows: self.dataflow_rows(),
        })))
    }

    /// Takes note of a prepared batch's commit: on success its rows count toward `ANALYZE`;
    /// on failure the engine holds rows Postgres does not and is rebuilt before the next
    /// batch.
    /// `committed`: the rows of the batch if it committed, `None` if it did not.
    pub fn settle(&mut self, committed: Option<&RowCounts>) {
        self.pending = self.pending.saturating_sub(1);
        match committed {
            Some(rows) => self.analyzer.committed(rows),
            None if self.counts => self.dirty = true,
            None => {}
        }
    }

    /// Rolls back a prepared batch that will not be committed (the batch before it failed,
    /// or it had to make way for it); the engine, which holds its rows, is rebuilt before the
    /// next batch.
    pub async fn abandon(&mut self, prepared: Box<Prepared>) {
        prepared.rollback().await;
        self.pending = self.pending.saturating_sub(1);
        if self.counts {
            self.dirty = true;
        }
        counter!(names::INGEST_PIPELINE, "event" => "abandoned").increment(1);
    }

    /// Hands the batch's rows to the engine (marking it dirty until the commit), whose workers
    /// compute its counts while the caller writes the batch; [`Ingestor::collect_dataflow`]
    /// returns them. Nothing without counts.
    fn submit_dataflow(&mut self, input: &InputBatch) -> Result<Option<Submitted>, IngestError> {
        if !self.counts {
            return Ok(None);
        }
        self.dirty = true;
        let engine = self.engine_mut()?;
        Ok(Some(engine.submit(input).map_err(store::StoreError::from)?))
    }

    /// The counts that the batch [`Ingestor::submit_dataflow`] handed over changed, once the
    /// workers have them. `stage="dataflow"` records the time spent waiting for them: the part
    /// of the dataflow's time that the batch's writes did not hide.
    fn collect_dataflow(&mut self, submitted: Option<Submitted>) -> Result<CountChanges, IngestError> {
        let Some(submitted) = submitted else { return Ok(CountChanges::default()) };
        let started = Instant::now();
        let engine = self.engine_mut()?;
        let changes = tokio::task::block_in_place(|| engine.collect(submitted)).map_err(store::StoreError::from)?;
        histogram!(names::INGEST_BATCH_SECONDS, "stage" => "dataflow").record(started.elapsed().as_secs_f64());
        Ok(changes)
    }

    /// The after-commit hook's work, if there is a hook, for the deployments of the batch's
    /// images (a future that holds no borrow of the ingestor, which is not `Sync`).
    fn after_commit_work(&self, input: &InputBatch) -> Option<BoxFuture<'static, Result<(), IngestError>>> {
        let hook = self.after_commit.as_ref()?;
        let mut deployments: Vec<Id> =
            input.images.iter().filter_map(|(_, i)| i.as_ref().and_then(|i| i.deployment)).collect();
        deployments.sort_unstable();
        deployments.dedup();
        Some(hook(self.store.clone(), deployments))
    }
}

/// Every rejected message of `which`, by index in the batch: those that failed to decode, and
/// those the save rejected (`saved[k]` is about the `k`th of `valid`).
fn rejections(
    decoded: &[Result<ResultMessage, Rejection>],
    which: &[usize],
    valid: &[usize],
    saved: &[(usize, Rejection)],
) -> BTreeMap<usize, Rejection> {
    let mut rejected: BTreeMap<usize, Rejection> = saved.iter().map(|(k, r)| (valid[*k], r.clone())).collect();
    for &i in which {
        if let Err(r) = &decoded[i] {
            rejected.insert(i, r.clone());
        }
    }
    rejected
}

/// Logs and counts each rejected message.
fn log_dead_letters(batch: &[Incoming], rejected: &BTreeMap<usize, Rejection>, prefix: &str) {
    for (&i, r) in rejected {
        let m = &batch[i];
        error!(
            subject = %m.subject,
            job_id = decode::job_of_subject(&m.subject, prefix),
            reason = r.code.as_str(),
            detail = %r.detail,
            bytes = m.payload.len(),
            "result dead-lettered"
        );
        counter!(names::INGEST_DEAD_LETTERS, "reason" => r.code.as_str()).increment(1);
    }
}

/// The dead letters of the rejected messages, in batch order, and an `ERROR` line for the job
/// of each that names one.
fn dead_letters_of(
    batch: &[Incoming],
    decoded: &[Result<ResultMessage, Rejection>],
    rejected: &BTreeMap<usize, Rejection>,
    prefix: &str,
) -> (Vec<NewDeadLetter>, Vec<JobLogLine>) {
    let mut letters = Vec::with_capacity(rejected.len());
    let mut logs = Vec::new();
    for (&i, r) in rejected {
        let m = &batch[i];
        let job_id = decode::job_of_subject(&m.subject, prefix);
        let reply_subject = decoded[i].as_ref().ok().map(|d| d.reply_subject.clone()).or_else(|| reply_of(&m.payload));
        if let Some(job_id) = job_id {
            logs.push(JobLogLine {
                job_id,
                level: Level::Error,
                message: format!("result rejected ({}): {}", r.code, r.detail),
                context: serde_json::json!({"source": "tally", "reply_subject": reply_subject, "stream_sequence": m.stream_sequence}),
            });
        }
        letters.push(NewDeadLetter {
            subject: m.subject.clone(),
            job_id,
            reply_subject,
            stream_sequence: m.stream_sequence,
            delivered: m.delivered,
            reason_code: r.code.as_str().to_string(),
            reason: r.detail.clone(),
            headers: m.headers.clone(),
            payload: m.payload.to_vec(),
        });
    }
    (letters, logs)
}

/// Updates the progress of `jobs` (SPEC §5); an `INFO` line for each job that it finished.
/// Also returns the jobs it finished.
async fn update_progress(tx: &Client, jobs: &[i64]) -> Result<(Vec<JobLogLine>, HashSet<i64>), IngestError> {
    let mut logs = Vec::new();
    let mut finished = HashSet::new();
    for p in crate::jobs::progress::update(tx, jobs).await? {
        let Some(status) = p.finished else { continue };
        finished.insert(p.job_id);
        let f = &p.figures;
        info!(job_id = p.job_id, status, processed = f.processed, failed = f.failed, "job finished");
        logs.push(JobLogLine {
            job_id: p.job_id,
            level: Level::Info,
            message: format!(
                "job finished: {status} ({} images processed, {} failed, {} detections, {} classifications)",
                f.processed, f.failed, f.detections, f.classifications
            ),
            context: serde_json::json!({"source": "tally"}),
        });
    }
    Ok((logs, finished))
}

/// The metrics of a committed batch: rows inserted, counts written, rows the engine holds.
fn record_metrics(rows: &RowCounts, sink: &SinkReport, dataflow_rows: i64) {
    counter!(names::INGEST_ROWS, "table" => "detection").increment(rows.detections);
    counter!(names::INGEST_ROWS, "table" => "null_marker").increment(rows.null_markers);
    counter!(names::INGEST_ROWS, "table" => "classification").increment(rows.classifications);
    counter!(names::INGEST_ROWS, "table" => "occurrence").increment(rows.occurrences);
    counter!(names::INGEST_ROWS, "table" => "taxon").increment(rows.taxa);
    counter!(names::COUNT_WRITES, "table" => "main_sourceimage").increment(sink.images);
    counter!(names::COUNT_WRITES, "table" => "main_event").increment(sink.events);
    counter!(names::COUNT_WRITES, "table" => "main_deployment").increment(sink.deployments);
    metrics::gauge!(names::DATAFLOW_ROWS).set(dataflow_rows as f64);
}

/// What became of each message of `which`, in order: dead-lettered with its reason, or saved
/// with its reply subject and the rows it inserted (`inserted[k]` for the `k`th of `valid`).
fn outcomes(
    decoded: &[Result<ResultMessage, Rejection>],
    which: &[usize],
    valid: &[usize],
    rejected: &BTreeMap<usize, Rejection>,
    inserted: &[u64],
) -> Vec<Outcome> {
    let inserted: HashMap<usize, u64> = valid.iter().copied().zip(inserted.iter().copied()).collect();
    which
        .iter()
        .map(|i| match (rejected.get(i), &decoded[*i]) {
            (Some(r), _) => Outcome::DeadLettered { code: r.code },
            (None, d) => Outcome::Saved {
                reply_subject: d.as_ref().map(|d| d.reply_subject.clone()).unwrap_or_default(),
                inserted: inserted.get(i).copied().unwrap_or(0),
            },
        })
        .collect()
}

/// The Antenna tables a committed batch wrote: rows, counts, job progress, job log lines.
fn written_tables(
    rows: &RowCounts,
    sink: &SinkReport,
    progress: bool,
    logs: bool,
) -> std::collections::BTreeSet<&'static str> {
    let mut tables: std::collections::BTreeSet<&'static str> = sink.tables().into_iter().collect();
    for (n, table) in [
        (rows.detections + rows.null_markers, "main_detection"),
        (rows.classifications, "main_classification"),
        (rows.occurrences + rows.determinations, "main_occurrence"),
        (rows.taxa, "main_taxon"),
    ] {
        if n > 0 {
            tables.insert(table);
        }
    }
    if progress {
        tables.insert("jobs_job");
    }
    if logs {
        tables.insert("jobs_joblog");
    }
    tables
}

fn add(a: RowCounts, b: RowCounts) -> RowCounts {
    RowCounts {
        detections: a.detections + b.detections,
        null_markers: a.null_markers + b.null_markers,
        classifications: a.classifications + b.classifications,
        occurrences: a.occurrences + b.occurrences,
        taxa: a.taxa + b.taxa,
        determinations: a.determinations + b.determinations,
    }
}

/// The `reply_subject` of a body that failed validation, if it can still be read.
fn reply_of(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        reply_subject: String,
    }
    serde_json::from_slice::<Reply>(payload).ok().map(|r| r.reply_subject)
}

#[cfg(test)]
mod tests;
