//! Job log lines in `jobs_joblog`, Antenna's `JobLog` table (jobs-protocol.md §3): the one
//! INSERT statement for that table, reading lines back, and [`JobLogs`], a cheap-to-clone
//! handle that buffers lines and writes them in batches from a background task, so that no
//! caller waits on the database for a log line and no line ever updates `jobs_job`.
//!
//! Ingest writes its own lines inside its batch transaction (they commit with the results they
//! describe) through [`insert`]; everything else (job create and cancel, the gateway) uses
//! [`JobLogs`]. A full buffer drops the line and counts it (`tally_job_log_lines_total{outcome="dropped"}`)
//! rather than block the caller.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::counter;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::names;
use crate::retry::{self, BackoffBuilder};
use crate::store::{Store, StoreError};

/// Python's logging level names, as Antenna's `JobLogHandler` stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Level {
    /// `DEBUG` (Antenna does not persist these by default).
    Debug,
    /// `INFO`.
    Info,
    /// `WARNING`.
    Warning,
    /// `ERROR`.
    Error,
    /// `CRITICAL`.
    Critical,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 5] = [Level::Debug, Level::Info, Level::Warning, Level::Error, Level::Critical];

    /// The name stored in `jobs_joblog.level`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }

    /// The names of this level and every level above it.
    pub fn and_above(self) -> Vec<&'static str> {
        Level::ALL.iter().filter(|l| **l >= self).map(|l| l.as_str()).collect()
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(Level::Debug),
            "INFO" => Ok(Level::Info),
            "WARNING" | "WARN" => Ok(Level::Warning),
            "ERROR" => Ok(Level::Error),
            "CRITICAL" | "FATAL" => Ok(Level::Critical),
            other => Err(format!("unknown level {other:?} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")),
        }
    }
}

/// Rows for `jobs_joblog`, column by column (one entry per line).
#[derive(Debug, Default)]
pub struct Rows<'a> {
    jobs: Vec<i64>,
    levels: Vec<&'a str>,
    messages: Vec<&'a str>,
    contexts: Vec<&'a Value>,
    at: Vec<Option<SystemTime>>,
}

impl<'a> Rows<'a> {
    /// Adds a line; `at` is when it was logged (`None`: the statement's `now()`, i.e. the start
    /// of the caller's transaction).
    pub fn push(&mut self, job: i64, level: Level, message: &'a str, context: &'a Value, at: Option<SystemTime>) {
        self.jobs.push(job);
        self.levels.push(level.as_str());
        self.messages.push(message);
        self.contexts.push(context);
        self.at.push(at);
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

/// Inserts `rows` in their order, with every NOT NULL column supplied as Django would
/// (`created_at`, `updated_at`, `context`; Antenna's columns have no database defaults). Lines
/// of jobs that do not exist are skipped (`job_id` is a foreign key). Returns the rows
/// inserted. Works inside a transaction or on a plain session.
pub async fn insert(client: &impl GenericClient, rows: &Rows<'_>) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    Ok(client
        .execute(
            "INSERT INTO jobs_joblog (created_at, updated_at, level, message, context, job_id)
             SELECT coalesce(u.at, now()), coalesce(u.at, now()), u.level, u.message, u.context, u.job
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])
                  WITH ORDINALITY AS u(job, level, message, context, at, n)
             WHERE EXISTS (SELECT 1 FROM jobs_job j WHERE j.id = u.job)
             ORDER BY u.n",
            &[&rows.jobs, &rows.levels, &rows.messages, &rows.contexts, &rows.at],
        )
        .await?)
}

/// A stored line, as `tally job logs` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogRow {
    /// `jobs_joblog.id`.
    pub id: i64,
    /// `created_at` in the session's time zone (Antenna's wall-clock time).
    pub created_at: String,
    /// The level name.
    pub level: String,
    /// The message.
    pub message: String,
}

impl fmt::Display for LogRow {
    /// Antenna's `stdout` format: `[YYYY-MM-DD HH:MM:SS] LEVEL message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {} {}", self.created_at, self.level, self.message)
    }
}

/// Lines of `job` at `min_level` or above with an id above `after`: the newest `limit` of
/// them (all when `None`), oldest first (Antenna's order, `created_at` then id, reversed).
pub async fn read(
    store: &Store,
    job: i64,
    min_level: Level,
    after: i64,
    limit: Option<i64>,
) -> Result<Vec<LogRow>, StoreError> {
    let levels: Option<Vec<&str>> = (min_level > Level::Debug).then(|| min_level.and_above());
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT id, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS'), level, message FROM (
                 SELECT * FROM jobs_joblog
                 WHERE job_id = $1 AND id > $2 AND ($3::text[] IS NULL OR level = ANY($3))
                 ORDER BY created_at DESC, id DESC LIMIT $4) newest
             ORDER BY created_at, id",
            &[&job, &after, &levels, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(LogRow { id: r.try_get(0)?, created_at: r.try_get(1)?, level: r.try_get(2)?, message: r.try_get(3)? })
        })
        .collect()
}

/// A line waiting in the buffer.
#[derive(Debug)]
struct Pending {
    job_id: i64,
    level: Level,
    message: String,
    context: Value,
    at: SystemTime,
}

/// How [`JobLogs`] buffers.
#[derive(Clone, Debug)]
pub struct JobLogsConfig {
    /// Lines the channel holds; more are dropped (and counted) rather than block a caller.
    pub capacity: usize,
    /// Lines per INSERT; a full batch is written at once.
    pub max_rows: usize,
    /// The longest a line waits before its batch is written.
    pub interval: Duration,
    /// Attempts per batch before its lines are given up (and counted as failed).
    pub attempts: u32,
}

impl Default for JobLogsConfig {
    fn default() -> Self {
        JobLogsConfig { capacity: 10_000, max_rows: 500, interval: Duration::from_millis(500), attempts: 3 }
    }
}

/// What the background writer did, returned by [`JobLogWriter::shutdown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlushStats {
    /// Lines inserted.
    pub written: u64,
    /// INSERT statements that succeeded.
    pub batches: u64,
    /// Lines dropped because the buffer was full or already shut down.
    pub dropped: u64,
    /// Lines given up after the database refused their batch `attempts` times.
    pub failed: u64,
    /// Lines skipped because their job does not exist.
    pub no_job: u64,
}

/// The handle callers log through: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct JobLogs {
    tx: mpsc::Sender<Pending>,
    dropped: Arc<AtomicU64>,
}

/// The background writer; [`JobLogWriter::shutdown`] drains it.
#[derive(Debug)]
pub struct JobLogWriter {
    close: CancellationToken,
    task: JoinHandle<FlushStats>,
}

impl JobLogs {
    /// Starts the background writer on the current tokio runtime.
    pub fn start(store: Store, config: JobLogsConfig) -> (JobLogs, JobLogWriter) {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let close = CancellationToken::new();
        let task = tokio::spawn(run(store, rx, close.clone(), config, Arc::clone(&dropped)));
        (JobLogs { tx, dropped }, JobLogWriter { close, task })
    }

    /// Queues a line with context `{"source": "tally"}`; `false` when it was dropped.
    pub fn log(&self, job_id: i64, level: Level, message: impl Into<String>) -> bool {
        self.log_with(job_id, level, message, serde_json::json!({"source": "tally"}))
    }

    /// Queues a line with its own context; `false` when it was dropped.
    pub fn log_with(&self, job_id: i64, level: Level, message: impl Into<String>, context: Value) -> bool {
        let line = Pending { job_id, level, message: message.into(), context, at: SystemTime::now() };
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                counter!(names::JOB_LOG_LINES, "outcome" => "dropped").increment(1);
                false
            }
        }
    }

    /// Queues an `INFO` line.
    pub fn info(&self, job_id: i64, message: impl Into<String>) -> bool {
        self.log(job_id, Level::Info, message)
    }

    /// Queues a `WARNING` line.
    pub fn warning(&self, job_id: i64, message: impl Into<String>) -> bool {
        self.log(job_id, Level::Warning, message)
    }

    /// Queues an `ERROR` line.
    pub fn error(&self, job_id: i64, message: impl Into<String>) -> bool {
        self.log(job_id, Level::Error, message)
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl JobLogWriter {
    /// Stops accepting lines, writes every line already accepted, and returns the totals.
    pub async fn shutdown(self) -> FlushStats {
        self.close.cancel();
        match self.task.await {
            Ok(stats) => stats,
            Err(e) => {
                warn!(error = %e, "the job log writer stopped abnormally; lines may be lost");
                FlushStats::default()
            }
        }
    }
}

async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    close: CancellationToken,
    config: JobLogsConfig,
    dropped: Arc<AtomicU64>,
) -> FlushStats {
    let mut stats = FlushStats::default();
    let max_rows = config.max_rows.max(1);
    let mut buf: Vec<Pending> = Vec::with_capacity(max_rows);
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = close.cancelled() => break,
            line = rx.recv() => {
                let Some(line) = line else { break };
                if buf.is_empty() {
                    deadline = Some(Instant::now() + config.interval);
                }
                buf.push(line);
                while buf.len() < max_rows {
                    match rx.try_recv() {
                        Ok(line) => buf.push(line),
                        Err(_) => break,
                    }
                }
                if buf.len() >= max_rows {
                    flush(&store, &mut buf, &config, &mut stats).await;
                    deadline = None;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                flush(&store, &mut buf, &config, &mut stats).await;
                deadline = None;
            }
        }
    }
    // Shutting down: refuse new lines, then write every line already accepted.
    rx.close();
    while let Some(line) = rx.recv().await {
        buf.push(line);
        if buf.len() >= max_rows {
            flush(&store, &mut buf, &config, &mut stats).await;
        }
    }
    flush(&store, &mut buf, &config, &mut stats).await;
    stats.dropped = dropped.load(Ordering::Relaxed);
    stats
}

/// Writes `buf` as one INSERT, retrying a failed batch with a short backoff.
async fn flush(store: &Store, buf: &mut Vec<Pending>, config: &JobLogsConfig, stats: &mut FlushStats) {
    if buf.is_empty() {
        return;
    }
    let lines = std::mem::take(buf);
    let mut rows = Rows::default();
    for l in &lines {
        rows.push(l.job_id, l.level, &l.message, &l.context, Some(l.at));
    }
    let n = lines.len() as u64;
    let attempts = config.attempts.max(1);
    let mut backoff = retry::job_log_batch(attempts).build();
    for attempt in 1..=attempts {
        match write(store, &rows).await {
            Ok(inserted) => {
                stats.written += inserted;
                stats.batches += 1;
                stats.no_job += n.saturating_sub(inserted);
                counter!(names::JOB_LOG_LINES, "outcome" => "written").increment(inserted);
                counter!(names::JOB_LOG_LINES, "outcome" => "no_job").increment(n.saturating_sub(inserted));
                return;
            }
            Err(e) if attempt < attempts => {
                warn!(lines = n, attempt, error = %e, "job log batch failed; retrying");
                tokio::time::sleep(retry::pause(&mut backoff)).await;
            }
            Err(e) => {
                warn!(lines = n, attempts, error = %e, "job log lines lost: the database refused their batch");
                stats.failed += n;
                counter!(names::JOB_LOG_LINES, "outcome" => "failed").increment(n);
            }
        }
    }
}

async fn write(store: &Store, rows: &Rows<'_>) -> Result<u64, StoreError> {
    let client = store.client().await?;
    let client: &tokio_postgres::Client = &client;
    insert(client, rows).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_filter() {
        assert_eq!("warn".parse::<Level>(), Ok(Level::Warning));
        assert_eq!(" Error ".parse::<Level>(), Ok(Level::Error));
        assert!("loud".parse::<Level>().is_err());
        assert_eq!(Level::Warning.and_above(), vec!["WARNING", "ERROR", "CRITICAL"]);
        assert_eq!(Level::Debug.and_above().len(), 5);
        for l in Level::ALL {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
        }
    }

    #[test]
    fn rows_print_as_antenna_stdout() {
        let row =
            LogRow { id: 1, created_at: "2026-06-01 21:00:00".into(), level: "INFO".into(), message: "hi".into() };
        assert_eq!(row.to_string(), "[2026-06-01 21:00:00] INFO hi");
    }
}
