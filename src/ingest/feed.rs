//! The change feed (SPEC §2, migration V7): what other writers (Django) change in the inputs
//! of the counts reaches the running dataflow.
//!
//! Triggers append `(table, op, ids)` to `tally.change_outbox` in the changing transaction and
//! `NOTIFY tally_changes`. [`spawn_listener`] holds a dedicated session that `LISTEN`s and wakes
//! the ingest loop, which then runs [`crate::ingest::batch::Ingestor::apply_feed`] between
//! batches: in one transaction it [`read`]s the outbox in `seq` order, re-reads those rows by
//! id (a missing row is a delete), applies the differences to the engine as their own
//! dataflow time, writes the counts that changed and [`consume`]s (deletes) exactly the
//! entries it read. A crash anywhere before that commit leaves the entries in place; applying
//! one again reads the same current rows and changes nothing, so nothing is lost or doubled.
//!
//! tally's own sessions set `tally.origin = 'tally'` and the triggers skip them: ingest's rows
//! reach the engine in the transaction that writes them, never twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use tally_dataflows::InputBatch;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::retry::{self, BackoffBuilder};
use crate::store::{bootstrap, StoreError};

/// The channel the triggers notify.
pub const CHANNEL: &str = "tally_changes";

/// The channel tally notifies after committing the counts of a feed step (payload: the
/// highest outbox `seq` consumed), for benchmarks and tools that wait for the counts.
pub const APPLIED_CHANNEL: &str = "tally_counts";

/// Settings of the change feed.
#[derive(Clone, Debug, Args)]
pub struct FeedArgs {
    /// Look at the outbox this often even without a notification (a safety net for a lost
    /// LISTEN session; the outbox is read, never the tables).
    #[arg(long, env = "TALLY_FEED_POLL", value_parser = crate::duration::parse_secs, default_value = "10s")]
    pub feed_poll: Duration,
    /// Outbox entries applied per transaction at most (each entry is one statement's rows).
    #[arg(long, env = "TALLY_FEED_BATCH", default_value_t = 1000)]
    pub feed_batch: i64,
    /// Testing only: sleep this long after reading the outbox and before applying it (the
    /// crash test kills serve there).
    #[arg(long, hide = true, value_parser = crate::duration::parse_secs)]
    pub debug_feed_pause: Option<Duration>,
}

impl Default for FeedArgs {
    /// Every flag's default, as its `#[arg]` states it.
    fn default() -> Self {
        crate::config::from_flags(&[])
    }
}

/// What one step read from the outbox.
#[derive(Debug, Default)]
pub struct Read {
    /// The entries read (to delete once applied).
    pub seqs: Vec<i64>,
    /// A table was truncated: the engine must be rebuilt from the tables.
    pub truncate: bool,
    /// The current rows (upserts) and the rows gone (deletes) of every id named.
    pub input: InputBatch,
    /// Distinct rows named, by table.
    pub rows: BTreeMap<String, u64>,
    /// Seconds since the oldest entry read was written, at the time of the read.
    pub oldest_age: f64,
}

/// Reads up to `limit` outbox entries in `seq` order and the current rows they name.
pub async fn read(tx: &tokio_postgres::Transaction<'_>, limit: i64) -> Result<Read, StoreError> {
    let entries = tx
        .query(
            "SELECT seq, table_name, op, ids, extract(epoch FROM clock_timestamp() - changed_at)::float8
             FROM tally.change_outbox ORDER BY seq LIMIT $1",
            &[&limit.max(1)],
        )
        .await?;
    let mut read = Read::default();
    let mut by_table: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for e in &entries {
        read.seqs.push(e.get(0));
        let table: String = e.get(1);
        let op: String = e.get(2);
        read.oldest_age = read.oldest_age.max(e.get::<_, f64>(4));
        if op == "TRUNCATE" {
            read.truncate = true;
            continue;
        }
        if !bootstrap::is_input(&table) {
            warn!(table, "change feed entry for a table that is not a count input; ignored");
            continue;
        }
        by_table.entry(table).or_default().extend(e.get::<_, Vec<i64>>(3));
    }
    if read.truncate {
        return Ok(read);
    }
    for (table, ids) in by_table {
        let ids: Vec<i64> = ids.into_iter().collect();
        bootstrap::read_by_id(tx.client(), &table, &ids, &mut read.input).await?;
        read.rows.insert(table, ids.len() as u64);
    }
    Ok(read)
}

/// Deletes the entries a step applied and tells listeners of [`APPLIED_CHANNEL`] (delivered
/// at commit).
pub async fn consume(tx: &tokio_postgres::Transaction<'_>, seqs: &[i64]) -> Result<(), StoreError> {
    tx.execute("DELETE FROM tally.change_outbox WHERE seq = ANY($1)", &[&seqs]).await?;
    let last = seqs.iter().max().copied().unwrap_or(0).to_string();
    tx.execute("SELECT pg_notify($1, $2)", &[&APPLIED_CHANNEL, &last]).await?;
    Ok(())
}

/// The entries visible now: a rebuild that reads the tables after this covers them all.
pub async fn visible(client: &impl deadpool_postgres::GenericClient) -> Result<Vec<i64>, StoreError> {
    let row = client.query_one("SELECT coalesce(array_agg(seq), '{}') FROM tally.change_outbox", &[]).await?;
    Ok(row.get(0))
}

/// Deletes entries a rebuild covered.
pub async fn forget(client: &impl deadpool_postgres::GenericClient, seqs: &[i64]) -> Result<(), StoreError> {
    if !seqs.is_empty() {
        client.execute("DELETE FROM tally.change_outbox WHERE seq = ANY($1)", &[&seqs]).await?;
    }
    Ok(())
}

/// Entries waiting.
pub async fn backlog(client: &impl deadpool_postgres::GenericClient) -> Result<i64, StoreError> {
    Ok(client.query_one("SELECT count(*) FROM tally.change_outbox", &[]).await?.get(0))
}

/// Holds a session that `LISTEN`s on [`CHANNEL`] and wakes `wake` on every notification, once
/// after each (re)connection (changes made while it was away are in the outbox), and every
/// `poll`. Reconnects with backoff until `stop`.
pub fn spawn_listener(
    database_url: String,
    wake: Arc<Notify>,
    poll: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = retry::reconnect().build();
        while !stop.is_cancelled() {
            match listen(&database_url, &wake, poll, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    let pause = retry::pause(&mut backoff);
                    warn!(error = %e, retry_in = ?pause, "change feed: LISTEN session lost; reconnecting");
                    tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = stop.cancelled() => return }
                }
            }
        }
    })
}

/// One LISTEN session, until it fails (`Err`) or `stop` (`Ok`).
async fn listen(database_url: &str, wake: &Notify, poll: Duration, stop: &CancellationToken) -> Result<(), String> {
    let (client, mut connection) = tokio_postgres::connect(database_url, NoTls).await.map_err(|e| e.to_string())?;
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let item = match message {
                Ok(AsyncMessage::Notification(n)) => Ok(n.payload().to_string()),
                Ok(_) => continue,
                Err(e) => Err(e.to_string()),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| e.to_string())?;
        info!(channel = CHANNEL, "change feed: listening");
        wake.notify_one();
        let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
        tick.tick().await;
        loop {
            tokio::select! {
                n = notifications.recv() => match n {
                    Some(Ok(table)) => {
                        debug!(table, "change feed: notified");
                        wake.notify_one();
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err("the LISTEN session closed".to_string()),
                },
                _ = tick.tick() => wake.notify_one(),
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    result
}
