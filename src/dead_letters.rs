//! Dead letters: result messages that could not be saved, kept whole in `tally.dead_letter`
//! with why and where they came from (SPEC §3), so bad input is never silently dropped and can
//! be re-published once the cause is fixed.
//!
//! Ingest writes them with [`insert_in`] inside its own transaction, so a message is either
//! saved or dead-lettered, never both and never neither. `tally dead-letters` reads them with
//! [`list`], [`get`] and [`counts_by_reason`], and [`replay`] re-publishes them to JetStream
//! for ingest to try again; a replay that fails again becomes a new dead letter.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::Row;

use crate::store::{Store, StoreError};

/// A dead letter to store: the message whole, the NATS delivery metadata, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDeadLetter {
    /// The subject the message arrived on; replay publishes back to it.
    pub subject: String,
    /// The job named by the subject, when it names one: the usual way to find a job's letters.
    pub job_id: Option<i64>,
    /// The result's `reply_subject` (the task's ack subject), when it could be read: ties the
    /// letter to the task a worker thinks it completed.
    pub reply_subject: Option<String>,
    /// The message's sequence in the results stream, to find it with NATS tools.
    pub stream_sequence: Option<i64>,
    /// How many times NATS had delivered it: above 1 means earlier attempts failed transiently.
    pub delivered: Option<i64>,
    /// A stable machine-readable reason (`invalid_json`, `unknown_pipeline`, …) to filter and
    /// count by.
    pub reason_code: String,
    /// The human-readable reason, with the detail needed to fix the cause.
    pub reason: String,
    /// The message's NATS headers as a JSON object, for diagnosis.
    pub headers: Option<serde_json::Value>,
    /// The body exactly as received (it may not be JSON, or not UTF-8): replay sends these bytes.
    pub payload: Vec<u8>,
}

/// A stored dead letter without its payload and headers: what a listing shows. Times are text
/// rendered by Postgres in the session's time zone (`2026-06-01 17:00:00 -04`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetterSummary {
    /// Its id, for `show` and `replay`.
    pub id: i64,
    /// When ingest stored it.
    pub received_at: String,
    /// The subject it arrived on.
    pub subject: String,
    /// The job named by the subject.
    pub job_id: Option<i64>,
    /// The result's reply subject.
    pub reply_subject: Option<String>,
    /// Its sequence in the results stream.
    pub stream_sequence: Option<i64>,
    /// NATS delivery count when it was dead-lettered.
    pub delivered: Option<i64>,
    /// The machine-readable reason.
    pub reason_code: String,
    /// The human-readable reason.
    pub reason: String,
    /// Payload size in bytes.
    pub size: i64,
    /// When it was last replayed, if ever.
    pub replayed_at: Option<String>,
    /// How many times it was replayed; part of the next replay's `Nats-Msg-Id`.
    pub replay_count: i32,
}

/// A stored dead letter in full.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Everything but the headers and the payload.
    pub summary: DeadLetterSummary,
    /// The NATS headers as stored.
    pub headers: Option<serde_json::Value>,
    /// The body exactly as received.
    pub payload: Vec<u8>,
}

/// Which dead letters [`list`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this job's.
    pub job: Option<i64>,
    /// Only those with this reason code.
    pub reason_code: Option<String>,
    /// Also those already replayed. Off by default: a replayed letter was either saved or
    /// became a new dead letter, so the old row is history rather than work.
    pub include_replayed: bool,
    /// At most this many, newest first (`None`: all).
    pub limit: Option<i64>,
}

/// Dead letters per reason code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    /// The reason code.
    pub reason_code: String,
    /// Never replayed.
    pub pending: i64,
    /// Replayed at least once.
    pub replayed: i64,
}

/// What [`replay`] did, per dead letter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Published, acknowledged by JetStream, and marked replayed.
    pub published: Vec<Replayed>,
    /// Not published or not acknowledged; left unmarked, so replaying again is safe.
    pub failed: Vec<ReplayFailure>,
    /// Ids that name no dead letter.
    pub missing: Vec<i64>,
}

/// A dead letter re-published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// The dead letter.
    pub id: i64,
    /// Where it was published.
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// Payload size in bytes.
    pub size: usize,
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// JetStream had already stored this `Nats-Msg-Id` (an earlier replay whose marking did not
    /// happen) and did not store it again; the message is in the stream either way.
    pub duplicate: bool,
}

/// A dead letter that could not be re-published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayFailure {
    /// The dead letter.
    pub id: i64,
    /// Where it was to be published.
    pub subject: String,
    /// Why it failed.
    pub error: String,
}

/// Header naming the dead letter a replayed message came from, so ingest and operators can
/// tell replays from originals.
pub const REPLAY_OF_HEADER: &str = "Tally-Replay-Of";

/// The `Nats-Msg-Id` of replay number `attempt` of dead letter `id`. A new id per attempt, so
/// JetStream's duplicate window does not drop a second replay; the same id for the same
/// attempt, so two operators replaying at once publish the message once.
pub fn replay_msg_id(id: i64, attempt: i32) -> String {
    format!("tally-replay-{id}-{attempt}")
}

const INSERT: &str = "
WITH input AS (
    SELECT nextval(pg_get_serial_sequence('tally.dead_letter', 'id')) AS id, u.*
    FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::text[],
                $8::jsonb[], $9::bytea[])
         WITH ORDINALITY AS u(subject, job_id, reply_subject, stream_sequence, delivered, reason_code,
                              reason, headers, payload, ord)
), inserted AS (
    INSERT INTO tally.dead_letter
        (id, subject, job_id, reply_subject, stream_sequence, delivered, reason_code, reason, headers, payload)
    SELECT id, subject, job_id, reply_subject, stream_sequence, delivered, reason_code, reason, headers, payload
    FROM input
)
SELECT id FROM input ORDER BY ord";

/// Stores `letters` with one statement inside the caller's transaction and returns their ids
/// in input order.
///
/// Ids are drawn from the table's sequence in a CTE numbered `WITH ORDINALITY` and then
/// inserted explicitly, so the order of the returned ids is guaranteed by construction rather
/// than by `RETURNING` happening to follow insertion order.
pub async fn insert_in(client: &impl GenericClient, letters: &[NewDeadLetter]) -> Result<Vec<i64>, StoreError> {
    if letters.is_empty() {
        return Ok(Vec::new());
    }
    let subject: Vec<&str> = letters.iter().map(|l| l.subject.as_str()).collect();
    let job_id: Vec<Option<i64>> = letters.iter().map(|l| l.job_id).collect();
    let reply_subject: Vec<Option<&str>> = letters.iter().map(|l| l.reply_subject.as_deref()).collect();
    let stream_sequence: Vec<Option<i64>> = letters.iter().map(|l| l.stream_sequence).collect();
    let delivered: Vec<Option<i64>> = letters.iter().map(|l| l.delivered).collect();
    let reason_code: Vec<&str> = letters.iter().map(|l| l.reason_code.as_str()).collect();
    let reason: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    let headers: Vec<Option<&serde_json::Value>> = letters.iter().map(|l| l.headers.as_ref()).collect();
    let payload: Vec<&[u8]> = letters.iter().map(|l| l.payload.as_slice()).collect();
    let rows = client
        .query(
            INSERT,
            &[
                &subject,
                &job_id,
                &reply_subject,
                &stream_sequence,
                &delivered,
                &reason_code,
                &reason,
                &headers,
                &payload,
            ],
        )
        .await?;
    rows.iter().map(|r| r.try_get::<_, i64>(0).map_err(StoreError::from)).collect()
}

/// Fails with [`StoreError::NotMigrated`] unless `tally.dead_letter` exists, so the commands
/// say "run `tally migrate`" instead of "relation does not exist".
pub async fn check_table(store: &Store) -> Result<(), StoreError> {
    let exists: bool = store
        .client()
        .await?
        .query_one("SELECT to_regclass('tally.dead_letter') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::NotMigrated("tally.dead_letter".to_string()))
    }
}

/// The summary columns, in [`summary`]'s order.
const SUMMARY: &str = "
    id, to_char(received_at, 'YYYY-MM-DD HH24:MI:SS OF'), subject, job_id, reply_subject, stream_sequence,
    delivered, reason_code, reason, octet_length(payload)::int8,
    to_char(replayed_at, 'YYYY-MM-DD HH24:MI:SS OF'), replay_count";

fn summary(row: &Row) -> Result<DeadLetterSummary, StoreError> {
    Ok(DeadLetterSummary {
        id: row.try_get(0)?,
        received_at: row.try_get(1)?,
        subject: row.try_get(2)?,
        job_id: row.try_get(3)?,
        reply_subject: row.try_get(4)?,
        stream_sequence: row.try_get(5)?,
        delivered: row.try_get(6)?,
        reason_code: row.try_get(7)?,
        reason: row.try_get(8)?,
        size: row.try_get(9)?,
        replayed_at: row.try_get(10)?,
        replay_count: row.try_get(11)?,
    })
}

/// The dead letters `filter` selects, newest first (the ones an operator is looking for).
pub async fn list(store: &Store, filter: &ListFilter) -> Result<Vec<DeadLetterSummary>, StoreError> {
    let sql = format!(
        "SELECT {SUMMARY} FROM tally.dead_letter
         WHERE ($1::int8 IS NULL OR job_id = $1) AND ($2::text IS NULL OR reason_code = $2)
           AND ($3 OR replayed_at IS NULL)
         ORDER BY id DESC LIMIT $4"
    );
    let rows = store
        .client()
        .await?
        .query(&sql, &[&filter.job, &filter.reason_code, &filter.include_replayed, &filter.limit])
        .await?;
    rows.iter().map(summary).collect()
}

/// The summaries of those of `ids` that exist, in id order.
pub async fn summaries(store: &Store, ids: &[i64]) -> Result<Vec<DeadLetterSummary>, StoreError> {
    let sql = format!("SELECT {SUMMARY} FROM tally.dead_letter WHERE id = ANY($1) ORDER BY id");
    let rows = store.client().await?.query(&sql, &[&ids]).await?;
    rows.iter().map(summary).collect()
}

/// One dead letter in full, or `None` when `id` names none.
pub async fn get(store: &Store, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    let sql = format!("SELECT {SUMMARY}, headers, payload FROM tally.dead_letter WHERE id = $1");
    let Some(row) = store.client().await?.query_opt(&sql, &[&id]).await? else {
        return Ok(None);
    };
    Ok(Some(DeadLetter { summary: summary(&row)?, headers: row.try_get(12)?, payload: row.try_get(13)? }))
}

/// Dead letters per reason code (of one job, or all), most frequent first.
pub async fn counts_by_reason(store: &Store, job: Option<i64>) -> Result<Vec<ReasonCount>, StoreError> {
    let rows = store
        .client()
        .await?
        .query(
            "SELECT reason_code, count(*) FILTER (WHERE replayed_at IS NULL),
                    count(*) FILTER (WHERE replayed_at IS NOT NULL)
             FROM tally.dead_letter WHERE $1::int8 IS NULL OR job_id = $1
             GROUP BY reason_code ORDER BY count(*) DESC, reason_code",
            &[&job],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(ReasonCount { reason_code: r.try_get(0)?, pending: r.try_get(1)?, replayed: r.try_get(2)? }))
        .collect()
}

/// At most this many payloads are held in memory and in flight at once...
const REPLAY_CHUNK_MESSAGES: usize = 256;
/// ... and at most this many payload bytes (bodies can be over 100 MB).
const REPLAY_CHUNK_BYTES: i64 = 64 << 20;

/// Re-publishes each dead letter of `ids`, in that order (a repeated id once; unknown ids are
/// reported in [`ReplayReport::missing`], not as errors): its payload unchanged, to its
/// subject, with headers `Nats-Msg-Id: tally-replay-{id}-{replay_count + 1}` and
/// `Tally-Replay-Of: {id}`. The publishes of a chunk
/// go out back to back and their JetStream acks are awaited together; those acknowledged are
/// then marked (`replayed_at`, `replay_count`). A failed publish leaves its row unmarked.
///
/// `replay_count` is set to the attempt number published, not incremented, so marking twice
/// (two operators, or a retry) cannot skip a number; together with the per-attempt message id
/// this makes a repeated replay of the same attempt publish once.
pub async fn replay(
    store: &Store,
    js: &async_nats::jetstream::Context,
    ids: &[i64],
) -> Result<ReplayReport, StoreError> {
    let max_age = crate::ingest::nats::ConsumerArgs::default().max_age();
    let objects = crate::results_stream::ensure_bucket(js, crate::results_stream::DEFAULT_BUCKET, max_age)
        .await
        .map_err(StoreError::Nats)?;
    replay_with(store, js, &objects, ids).await
}

/// [`replay`] with the object store bucket of large results named by the caller: a payload
/// larger than one NATS message is published by claim check, as the gateway does.
pub async fn replay_with(
    store: &Store,
    js: &async_nats::jetstream::Context,
    objects: &crate::results_stream::Objects,
    ids: &[i64],
) -> Result<ReplayReport, StoreError> {
    let mut report = ReplayReport::default();
    let client = store.client().await?;
    let rows = client
        .query("SELECT id, octet_length(payload)::int8 FROM tally.dead_letter WHERE id = ANY($1)", &[&ids])
        .await?;
    let mut sizes = HashMap::with_capacity(rows.len());
    for row in &rows {
        sizes.insert(row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?);
    }
    let mut seen = HashSet::new();
    let mut chunks: Vec<Vec<i64>> = Vec::new();
    let mut chunk_bytes = 0;
    for &id in ids {
        if !seen.insert(id) {
            continue;
        }
        let Some(&size) = sizes.get(&id) else {
            report.missing.push(id);
            continue;
        };
        match chunks.last_mut() {
            Some(chunk) if chunk.len() < REPLAY_CHUNK_MESSAGES && chunk_bytes + size <= REPLAY_CHUNK_BYTES => {
                chunk.push(id);
                chunk_bytes += size;
            }
            _ => {
                chunks.push(vec![id]);
                chunk_bytes = size;
            }
        }
    }
    for chunk in &chunks {
        replay_chunk(&client, js, objects, chunk, &mut report).await?;
    }
    Ok(report)
}

/// The connected server's `max_payload` (1 MiB, NATS' default, before the first INFO).
fn js_max_payload(js: &async_nats::jetstream::Context) -> usize {
    match js.client().max_payload() {
        0 => 1 << 20,
        n => n,
    }
}

/// Publishes one chunk, awaits its acks together, and marks the acknowledged.
async fn replay_chunk(
    client: &impl GenericClient,
    js: &async_nats::jetstream::Context,
    objects: &crate::results_stream::Objects,
    ids: &[i64],
    report: &mut ReplayReport,
) -> Result<(), StoreError> {
    use crate::results_stream::{self, Outgoing};
    let rows = client
        .query("SELECT id, subject, payload, replay_count FROM tally.dead_letter WHERE id = ANY($1)", &[&ids])
        .await?;
    let mut by_id = HashMap::with_capacity(rows.len());
    for row in rows {
        by_id.insert(row.try_get::<_, i64>(0)?, row);
    }
    let mut planned = Vec::with_capacity(ids.len());
    let mut outgoing = Vec::with_capacity(ids.len());
    for id in ids {
        // Deleted between planning and now: nothing to publish.
        let Some(row) = by_id.remove(id) else {
            report.missing.push(*id);
            continue;
        };
        let subject: String = row.try_get(1)?;
        let payload: Vec<u8> = row.try_get(2)?;
        let attempt = row.try_get::<_, i32>(3)?.saturating_add(1);
        let msg_id = replay_msg_id(*id, attempt);
        planned.push((*id, subject.clone(), msg_id.clone(), payload.len(), attempt));
        outgoing.push(Outgoing {
            subject,
            headers: vec![(results_stream::MSG_ID_HEADER, msg_id), (REPLAY_OF_HEADER, id.to_string())],
            payload: Bytes::from(payload),
        });
    }
    let max_payload = js_max_payload(js);
    let answers = results_stream::publish_all(js, objects, max_payload, outgoing).await;
    let mut acked_ids = Vec::new();
    let mut attempts = Vec::new();
    for ((id, subject, msg_id, size, attempt), outcome) in planned.into_iter().zip(answers) {
        match outcome {
            Ok(ack) => {
                acked_ids.push(id);
                attempts.push(attempt);
                report.published.push(Replayed {
                    id,
                    subject,
                    msg_id,
                    size,
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                });
            }
            Err(e) => report.failed.push(ReplayFailure { id, subject, error: e.to_string() }),
        }
    }
    if !acked_ids.is_empty() {
        client
            .execute(
                "UPDATE tally.dead_letter d SET replayed_at = now(), replay_count = greatest(d.replay_count, u.attempt)
                 FROM UNNEST($1::int8[], $2::int4[]) AS u(id, attempt) WHERE d.id = u.id",
                &[&acked_ids, &attempts],
            )
            .await?;
    }
    Ok(())
}
