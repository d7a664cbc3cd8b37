//! Lost images: every job finishes (SPEC §5), as Antenna's `mark_lost_images_failed` makes it
//! (jobs-protocol.md §1.7). A task whose deliveries are used up (`max_deliver`) stays in the
//! stream, counted in `num_ack_pending`, and is never delivered again; a job whose stream or
//! consumer was deleted has no tasks left at all. Either way no result will come for those
//! images, and without this the job would stay STARTED forever.
//!
//! A job is **stalled** when it is active (STARTED or RETRY, `async_api`) and has made no
//! progress (its latest `tally.job_image` row, as `tally.job_progress` keeps it, else its
//! start) for `--lost-images-after`. A
//! stalled job is handled when its consumer has nothing left to deliver (`num_pending = 0`;
//! `num_ack_pending` is not waited for, since exhausted tasks stay counted there) or when its
//! stream or consumer is gone; a job with undelivered tasks is waiting for workers and is left
//! alone. Its images without a `tally.job_image` row are then marked failed, in one
//! transaction, through the path ingest uses: failed `job_image` rows first, then
//! [`progress::update`] (which finishes the job SUCCESS or FAILURE by the >50%-failed rule with
//! the guarded UPDATE), a job log line naming the images and why, and the diagnostic appended
//! to `progress.errors` as Antenna does.
//!
//! Which images: `tally.job_task` for jobs tally created (exact); else the task messages in
//! the job's stream (JetStream keeps acked tasks until the stream's 24 h `max_age`, so this is
//! the job's whole task set for jobs created by Antenna). When neither says (an Antenna job
//! whose stream is gone, or tasks aged out), the images `collect.total_images` counts that no
//! known id covers are counted as failed through placeholder rows with negative `image_id`s
//! (image ids are positive), so that the job still finishes with exact counts; the log line
//! says how many. Results that arrive after an image was marked lost are still saved (ingest's
//! upsert keeps `failed`), but a finished job's progress no longer moves.

use crate::jobs::state::JobState;
use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Transaction;
use tracing::{info, warn};

use super::logs::Level;
use super::progress::{self, Figures};
use super::queue::{self, ConsumerState};
use super::{consumer_name, nats_error, stream_name, tasks_subject, JobError};
use crate::store::Store;

/// Statuses in which a job's tasks are served (Antenna's `active_states`): only these can stall.
pub const ACTIVE: &[&str] = &[JobState::Started.as_str(), JobState::Retry.as_str()];

/// Ids named in a job log message; the JSON context holds them all.
const IDS_IN_MESSAGE: usize = 50;

/// How long reading a job's task stream may wait for its next batch.
const STREAM_READ_WAIT: Duration = Duration::from_secs(5);

/// Why a stalled job's remaining images are lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The consumer has nothing left to deliver: the remaining tasks used up `max_deliver`.
    MaxDeliver,
    /// The job's stream or consumer no longer exists.
    QueueGone,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::MaxDeliver => "max_deliver",
            Reason::QueueGone => "queue_gone",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Reason::MaxDeliver => "tasks exhausted max_deliver",
            Reason::QueueGone => "task queue gone",
        }
    }
}

/// Where a job's image set was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ImageSet {
    /// `tally.job_task` (jobs created by tally).
    Recorded,
    /// The task messages of the job's stream (jobs created by Antenna).
    Stream(Vec<i64>),
    /// Unknown: the stream is gone and tally did not create the job.
    Unknown,
}

/// What marking a stalled job did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Marked {
    /// The job.
    pub job_id: i64,
    /// Why its images were lost.
    pub reason: Reason,
    /// The images marked failed, by id.
    pub images: Vec<i64>,
    /// Images counted failed whose ids could not be known (placeholder rows).
    pub unknown: i64,
    /// The status the job moved to, when this finished it.
    pub finished: Option<&'static str>,
    /// The job's figures afterwards.
    #[serde(skip)]
    pub figures: Figures,
}

/// The stalled jobs: active async jobs without progress for `after`.
pub async fn stalled(store: &Store, after: Duration) -> Result<Vec<i64>, JobError> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT j.id FROM jobs_job j
             WHERE j.status = ANY($1) AND j.dispatch_mode = 'async_api'
               AND coalesce((SELECT p.last_seen FROM tally.job_progress p WHERE p.job_id = j.id),
                            j.started_at, j.created_at) < now() - make_interval(secs => $2)
             ORDER BY j.id",
            &[&ACTIVE, &after.as_secs_f64()],
        )
        .await?;
    rows.iter().map(|r| r.try_get(0).map_err(JobError::from)).collect()
}

/// Checks stalled job `id` and marks its lost images failed when its queue says none will come.
/// `None`: nothing to do (tasks still to deliver, or the job moved on meanwhile).
pub async fn check(
    store: &Store,
    js: &jetstream::Context,
    id: i64,
    after: Duration,
) -> Result<Option<Marked>, JobError> {
    let state = queue::state(js, id).await?;
    let (reason, consumer) = match &state {
        None => (Reason::QueueGone, None),
        Some(s) => match &s.consumer {
            None => (Reason::QueueGone, None),
            Some(c) if c.num_pending == 0 => (Reason::MaxDeliver, Some(c.clone())),
            Some(_) => return Ok(None),
        },
    };
    let recorded: bool = store
        .client()
        .await?
        .query_one("SELECT EXISTS (SELECT 1 FROM tally.job_task WHERE job_id = $1)", &[&id])
        .await?
        .try_get(0)?;
    let set = match (recorded, &state) {
        (true, _) => ImageSet::Recorded,
        (false, Some(_)) => match stream_images(js, id).await? {
            Some(ids) => ImageSet::Stream(ids),
            None => ImageSet::Unknown,
        },
        (false, None) => ImageSet::Unknown,
    };
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let Some(marked) = mark(&tx, id, after, reason, consumer.as_ref(), &set).await? else {
        return Ok(None);
    };
    tx.commit().await?;
    let lost = marked.images.len() as u64 + marked.unknown as u64;
    metrics::counter!(crate::metrics::names::JOB_LOST_IMAGES, "reason" => reason.label()).increment(lost);
    if lost > 0 {
        warn!(job_id = id, images = lost, reason = reason.label(), "lost images marked failed");
    }
    if let Some(status) = marked.finished {
        info!(
            job_id = id,
            status,
            processed = marked.figures.processed,
            failed = marked.figures.failed,
            "job finished"
        );
    }
    Ok(Some(marked))
}

/// Marks, in `tx`, the images of job `id` in `set` that have no `job_image` row as failed,
/// then counts the shortfall to `total_images`, then updates progress and writes the log.
async fn mark(
    tx: &Transaction<'_>,
    id: i64,
    after: Duration,
    reason: Reason,
    consumer: Option<&ConsumerState>,
    set: &ImageSet,
) -> Result<Option<Marked>, JobError> {
    // Still active and stalled now (a result may have been saved since the candidates were read).
    let Some(row) = tx
        .query_opt(
            "SELECT j.progress FROM jobs_job j
             WHERE j.id = $1 AND j.status = ANY($2) AND j.dispatch_mode = 'async_api'
               AND coalesce((SELECT p.last_seen FROM tally.job_progress p WHERE p.job_id = j.id),
                            j.started_at, j.created_at) < now() - make_interval(secs => $3)",
            &[&id, &ACTIVE, &after.as_secs_f64()],
        )
        .await?
    else {
        return Ok(None);
    };
    let Some(total) = progress::total_images(&row.try_get(0)?) else {
        warn!(job_id = id, "stalled job has no collect.total_images: its lost images cannot be counted");
        return Ok(None);
    };
    let error = format!("lost: {}", reason.text());
    // Failed rows first, then the job row (in progress::update): ingest's lock order.
    let inserted = match set {
        ImageSet::Recorded => {
            tx.query(
                "INSERT INTO tally.job_image (job_id, image_id, failed, error)
                 SELECT t.job_id, t.image_id, true, $2 FROM tally.job_task t
                 WHERE t.job_id = $1
                   AND NOT EXISTS (SELECT 1 FROM tally.job_image i WHERE i.job_id = t.job_id AND i.image_id = t.image_id)
                 ON CONFLICT DO NOTHING RETURNING image_id",
                &[&id, &error],
            )
            .await?
        }
        ImageSet::Stream(ids) => {
            tx.query(
                "INSERT INTO tally.job_image (job_id, image_id, failed, error)
                 SELECT $1, u.id, true, $2 FROM unnest($3::int8[]) AS u(id)
                 ON CONFLICT DO NOTHING RETURNING image_id",
                &[&id, &error, ids],
            )
            .await?
        }
        ImageSet::Unknown => Vec::new(),
    };
    let mut images = inserted.iter().map(|r| r.try_get(0)).collect::<Result<Vec<i64>, _>>()?;
    images.sort_unstable();
    // Images the job counts that no known id covers: placeholders below every negative id.
    let r = tx
        .query_one(
            "SELECT coalesce((SELECT processed FROM tally.job_progress WHERE job_id = $1), 0),
                    coalesce((SELECT min(image_id) FROM tally.job_image WHERE job_id = $1 AND image_id < 0), 0)",
            &[&id],
        )
        .await?;
    let (processed, lowest): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
    let unknown = (total - processed).max(0);
    if unknown > 0 {
        let unknown_error = format!("{error}; image id unknown (no record of the job's images)");
        tx.execute(
            "INSERT INTO tally.job_image (job_id, image_id, failed, error)
             SELECT $1, $2 - g, true, $3 FROM generate_series(1::int8, $4) AS g ON CONFLICT DO NOTHING",
            &[&id, &lowest, &unknown_error, &unknown],
        )
        .await?;
    }
    let update = progress::update(tx.client(), &[id]).await?.into_iter().next();
    let (figures, finished) = update.map(|u| (u.figures, u.finished)).unwrap_or_default();
    if images.is_empty() && unknown == 0 && finished.is_none() {
        return Ok(Some(Marked { job_id: id, reason, images, unknown, finished, figures }));
    }
    let message = log_message(id, after, reason, consumer, &images, unknown, set);
    let context = json!({
        "source": "tally",
        "reason": reason,
        "image_ids": images,
        "unknown_images": unknown,
        "images_from": match set {
            ImageSet::Recorded => "tally.job_task",
            ImageSet::Stream(_) => "stream",
            ImageSet::Unknown => "unknown",
        },
        "stalled_seconds": after.as_secs_f64(),
        "consumer": consumer,
    });
    let finished_line = finished.map(|status| {
        format!(
            "job finished: {status} ({} images processed, {} failed, {} detections, {} classifications)",
            figures.processed, figures.failed, figures.detections, figures.classifications
        )
    });
    let source = json!({"source": "tally"});
    let mut rows = super::logs::Rows::default();
    rows.push(id, Level::Warning, &message, &context, None);
    if let Some(line) = &finished_line {
        rows.push(id, Level::Info, line, &source, None);
    }
    super::logs::insert(tx, &rows).await?;
    // Antenna appends the diagnostic to progress.errors too; Django shows it.
    tx.execute(
        "UPDATE jobs_job SET progress = jsonb_set(progress, '{errors}',
             CASE WHEN jsonb_typeof(progress->'errors') = 'array' THEN progress->'errors' ELSE '[]'::jsonb END
             || jsonb_build_array($2::text))
         WHERE id = $1 AND jsonb_typeof(progress) = 'object'",
        &[&id, &message],
    )
    .await?;
    Ok(Some(Marked { job_id: id, reason, images, unknown, finished, figures }))
}

/// The job log line: which images, why, and the consumer's figures.
fn log_message(
    id: i64,
    after: Duration,
    reason: Reason,
    consumer: Option<&ConsumerState>,
    images: &[i64],
    unknown: i64,
    set: &ImageSet,
) -> String {
    let mut ids: Vec<String> = images.iter().take(IDS_IN_MESSAGE).map(|i| i.to_string()).collect();
    if images.len() > IDS_IN_MESSAGE {
        ids.push(format!("… and {} more", images.len() - IDS_IN_MESSAGE));
    }
    let queue = match consumer {
        Some(c) => format!(
            "NATS consumer {}: num_pending={} num_ack_pending={} num_redelivered={}",
            consumer_name(id),
            c.num_pending,
            c.num_ack_pending,
            c.num_redelivered
        ),
        None => format!("NATS stream {} or consumer {} does not exist", stream_name(id), consumer_name(id)),
    };
    let mut message = format!(
        "Marked {} lost images failed ({}; no progress for {} s; {queue})",
        images.len() as i64 + unknown,
        reason.text(),
        after.as_secs()
    );
    if !images.is_empty() {
        message.push_str(&format!(": images {}", ids.join(", ")));
    }
    if unknown > 0 {
        let why = match set {
            ImageSet::Unknown => "the job's stream is gone and tally did not create the job",
            _ => "the job's task set does not cover collect.total_images",
        };
        message.push_str(&format!("; {unknown} more images counted failed without ids ({why})"));
    }
    message
}

/// The image ids of every task in job `id`'s stream (read with an ephemeral consumer that acks
/// nothing), `None` when the stream does not exist. Tasks whose `image_id` is not an integer
/// are skipped (their images count as unknown).
async fn stream_images(js: &jetstream::Context, id: i64) -> Result<Option<Vec<i64>>, JobError> {
    let stream = match js.get_stream(stream_name(id)).await {
        Ok(s) => s,
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                return Ok(None)
            }
            _ => return Err(nats_error("stream info", e)),
        },
    };
    let last = stream.cached_info().state.last_sequence;
    if stream.cached_info().state.messages == 0 {
        return Ok(Some(Vec::new()));
    }
    let reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            filter_subject: tasks_subject(id),
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error("create stream reader", e))?;
    let mut images = BTreeSet::new();
    let read = async {
        loop {
            let mut batch = reader
                .fetch()
                .max_messages(1000)
                .expires(STREAM_READ_WAIT)
                .messages()
                .await
                .map_err(|e| nats_error("read job stream", e))?;
            let mut seen = 0;
            let mut sequence = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| nats_error("read job stream", e))?;
                seen += 1;
                sequence = m.info().map(|i| i.stream_sequence).unwrap_or(sequence);
                if let Some(image) = task_image(&m.payload) {
                    images.insert(image);
                }
            }
            if seen == 0 || sequence >= last {
                return Ok::<_, JobError>(());
            }
        }
    };
    let result = read.await;
    let name = reader.cached_info().name.clone();
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!(job_id = id, error = %e, "stream reader not deleted (it expires on its own)");
    }
    result?;
    Ok(Some(images.into_iter().collect()))
}

/// A task's `image_id` (a string of digits, as Antenna writes it, or a number).
fn task_image(payload: &[u8]) -> Option<i64> {
    let task: Value = serde_json::from_slice(payload).ok()?;
    match &task["image_id"] {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .filter(|i| *i > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_images_are_read_as_antenna_writes_them() {
        assert_eq!(task_image(br#"{"id": "7", "image_id": "7", "image_url": "x"}"#), Some(7));
        assert_eq!(task_image(br#"{"image_id": 8}"#), Some(8));
        assert_eq!(task_image(br#"{"image_id": "-3"}"#), None);
        assert_eq!(task_image(br#"{"image_id": null}"#), None);
        assert_eq!(task_image(b"not json"), None);
    }

    #[test]
    fn log_lines_name_at_most_fifty_ids_and_the_queue_figures() {
        let c = ConsumerState { num_pending: 0, num_ack_pending: 3, num_redelivered: 2, delivered: 9, ack_floor: 4 };
        let ids: Vec<i64> = (1..=60).collect();
        let m = log_message(5, Duration::from_secs(600), Reason::MaxDeliver, Some(&c), &ids, 0, &ImageSet::Recorded);
        assert!(
            m.starts_with("Marked 60 lost images failed (tasks exhausted max_deliver; no progress for 600 s;"),
            "{m}"
        );
        assert!(m.contains("num_pending=0 num_ack_pending=3 num_redelivered=2"), "{m}");
        assert!(m.contains("images 1, 2, 3,") && m.contains(", 50, … and 10 more"), "{m}");
        assert!(!m.contains(" 51,"), "{m}");
        let m = log_message(5, Duration::from_secs(10), Reason::QueueGone, None, &[], 4, &ImageSet::Unknown);
        assert!(m.contains("task queue gone") && m.contains("4 more images counted failed without ids"), "{m}");
    }
}
