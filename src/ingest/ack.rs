//! Task acks, and what happens when one cannot be confirmed: **a result's fate is always
//! decided, and no result waits on its task**.
//!
//! After a batch commits, each saved result's task is acked (`+ACK` as a request, so JetStream
//! confirms it). Then, per task ([`Settlement`]):
//! - **acked**: done;
//! - **gone**: no responder, and JetStream says the job's consumer or stream does not exist
//!   (the job finished and was cleaned up, or was cancelled): nothing is left to ack;
//! - **deferred**: no confirmation (a timeout, or no responder while the consumer exists, as
//!   right after a NATS restart): the ack is stored in `tally.task_ack_retry` and retried in the
//!   background with backoff ([`run_retries`]); after `--task-ack-attempts` it is given up and
//!   recorded as a dead letter `task_ack_failed` (the saved rows stay; replaying the letter
//!   once NATS is healthy acks the task).
//!
//! In every case the **result** is acked on the results consumer right away (only a deferral
//! that cannot be stored sends it back), so results of one job whose tasks cannot be acked
//! never fill the consumer's `max_ack_pending` and stall every other job (issue: ~20 POSTs of
//! unackable reply subjects used to stop ingest for everyone). A job's progress comes from its
//! saved images either way.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream::ConsumerErrorKind, ErrorCode};
use futures_util::stream::{self as fstream, StreamExt};
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::NatsArgs;
use crate::dead_letters::{self, NewDeadLetter};
use crate::ingest::batch::Outcome;
use crate::ingest::decode::{job_of_reply_subject, job_of_subject, RejectReason};
use crate::ingest::nats::{self as transport, ConsumerArgs, TaskAck};
use crate::ingest::save::{self, JobLogLine};
use crate::ingest::IngestError;
use crate::jobs::logs::Level;
use crate::jobs::{consumer_name, stream_name};
use crate::metrics::names;
use crate::store::{Store, StoreError};

/// How a task ack ended for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// JetStream confirmed it.
    Acked,
    /// The job's consumer or stream does not exist: nothing to ack.
    Gone,
    /// Not confirmed; to retry later, with why.
    Deferred(String),
}

impl Settlement {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Settlement::Acked => "acked",
            Settlement::Gone => "consumer_gone",
            Settlement::Deferred(_) => "deferred",
        }
    }
}

/// What to do with a result message once its batch is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Saved (and its task settled or its ack stored for retry): ack.
    Ack,
    /// Dead-lettered: terminate (no redelivery).
    Term,
    /// Try again later.
    Nak,
}

/// The ack policy, pure so that it is tested without NATS or Postgres: one [`Verdict`] per
/// outcome of a committed batch. `settlements` are the task settlements of the saved outcomes,
/// in order; `deferred_stored` says whether the deferred task acks were stored for retry.
/// A saved result is acked even when its task ack is deferred (no result waits on its task),
/// unless the deferral could not be stored: then it goes back, and its replay acks the task.
pub fn verdicts(outcomes: &[Outcome], settlements: &[Settlement], deferred_stored: bool) -> Vec<Verdict> {
    let mut settled = settlements.iter();
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Saved { .. } => match settled.next() {
                Some(Settlement::Deferred(_)) if !deferred_stored => Verdict::Nak,
                _ => Verdict::Ack,
            },
            Outcome::DeadLettered { .. } => Verdict::Term,
        })
        .collect()
}

/// Acks the tasks of `subjects` and settles each ([`Settlement`]).
pub async fn settle(client: &async_nats::Client, subjects: &[String], args: &ConsumerArgs) -> Vec<Settlement> {
    let acks = transport::ack_tasks(client, subjects.to_vec(), args).await;
    let mut unsure: Vec<i64> = subjects
        .iter()
        .zip(&acks)
        .filter(|(_, a)| **a == TaskAck::NoStream)
        .filter_map(|(s, _)| job_of_reply_subject(s))
        .collect();
    unsure.sort_unstable();
    unsure.dedup();
    let queues = if unsure.is_empty() { HashMap::new() } else { queues_exist(client, &unsure).await };
    subjects
        .iter()
        .zip(acks)
        .map(|(subject, ack)| match ack {
            TaskAck::Acked => Settlement::Acked,
            TaskAck::Failed => Settlement::Deferred("no confirmation within the task ack timeout".into()),
            TaskAck::NoStream => match job_of_reply_subject(subject).and_then(|job| queues.get(&job).copied()) {
                Some(QueueState::Gone) => Settlement::Gone,
                Some(QueueState::Exists) => {
                    Settlement::Deferred("no responder on the ack subject although the job's consumer exists".into())
                }
                _ => Settlement::Deferred("no responder, and JetStream did not say whether the consumer exists".into()),
            },
        })
        .collect()
}

/// Whether a job's task consumer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueState {
    Exists,
    Gone,
    Unknown,
}

/// Asks JetStream, for each of `jobs`, whether its task consumer exists.
async fn queues_exist(client: &async_nats::Client, jobs: &[i64]) -> HashMap<i64, QueueState> {
    let js = jetstream::new(client.clone());
    fstream::iter(jobs.iter().copied())
        .map(|job| {
            let js = js.clone();
            async move {
                let answer = js
                    .get_consumer_from_stream::<consumer::pull::Config, _, _>(consumer_name(job), stream_name(job))
                    .await;
                let state = match answer {
                    Ok(_) => QueueState::Exists,
                    Err(e) => match e.kind() {
                        ConsumerErrorKind::JetStream(j)
                            if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                                || j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                        {
                            QueueState::Gone
                        }
                        _ => QueueState::Unknown,
                    },
                };
                (job, state)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

/// A task ack to retry: the task and where its result is in the results stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    /// The task's ack subject.
    pub reply_subject: String,
    /// The result's subject (`tally.results.{job}`).
    pub results_subject: String,
    /// The result's sequence in the results stream.
    pub results_sequence: Option<i64>,
    /// Why the ack was not confirmed.
    pub error: String,
}

/// Stores `deferrals` for [`run_retries`]; the first retry is due after one backoff step.
pub async fn defer(store: &Store, deferrals: &[Deferral], args: &ConsumerArgs) -> Result<(), StoreError> {
    if deferrals.is_empty() {
        return Ok(());
    }
    let subjects: Vec<&str> = deferrals.iter().map(|d| d.reply_subject.as_str()).collect();
    let jobs: Vec<i64> = deferrals.iter().map(|d| job_of_reply_subject(&d.reply_subject).unwrap_or(0)).collect();
    let results: Vec<&str> = deferrals.iter().map(|d| d.results_subject.as_str()).collect();
    let sequences: Vec<Option<i64>> = deferrals.iter().map(|d| d.results_sequence).collect();
    let errors: Vec<&str> = deferrals.iter().map(|d| d.error.as_str()).collect();
    let delay = backoff(1, args).as_secs_f64();
    store
        .client()
        .await?
        .execute(
            "INSERT INTO tally.task_ack_retry
                 (reply_subject, job_id, results_subject, results_sequence, next_attempt_at, last_error)
             SELECT s, j, r, q, now() + make_interval(secs => $6), e
             FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[]) AS u(s, j, r, q, e)
             ON CONFLICT (reply_subject) DO UPDATE SET last_error = EXCLUDED.last_error",
            &[&subjects, &jobs, &results, &sequences, &errors, &delay],
        )
        .await?;
    counter!(names::TASK_ACKS, "outcome" => "deferred").increment(deferrals.len() as u64);
    Ok(())
}

/// The wait before attempt `attempt + 1`: 1 s, doubling, at most `--task-ack-backoff-max`.
pub fn backoff(attempt: u32, args: &ConsumerArgs) -> Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(20);
    Duration::from_secs(secs).min(args.task_ack_backoff_max)
}

/// What to do with a stored ack after another failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this long.
    RetryIn(Duration),
    /// Attempts used up: dead-letter and forget.
    GiveUp,
}

/// The policy: attempts `1..task_ack_attempts` retry with [`backoff`]; then give up.
pub fn next_step(attempts_so_far: u32, args: &ConsumerArgs) -> NextStep {
    if attempts_so_far >= args.task_ack_attempts.max(1) {
        NextStep::GiveUp
    } else {
        NextStep::RetryIn(backoff(attempts_so_far, args))
    }
}

/// One stored ack.
struct Stored {
    reply_subject: String,
    job_id: i64,
    results_subject: String,
    results_sequence: Option<i64>,
    attempts: i32,
    first_failed_at: String,
}

/// Retries stored task acks until `shutdown`: every `period`, the due ones, at most 1,000 at
/// a time. Errors are logged and retried on the next round; nothing here ends ingest.
pub async fn run_retries(
    store: Store,
    client: async_nats::Client,
    nats: NatsArgs,
    args: ConsumerArgs,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = retry_due(&store, &client, &nats, &args).await {
            warn!(error = %e, "task ack retries failed this round; trying again");
        }
    }
}

/// One round of [`run_retries`]; returns how many stored acks it settled or gave up.
pub async fn retry_due(
    store: &Store,
    client: &async_nats::Client,
    nats: &NatsArgs,
    args: &ConsumerArgs,
) -> Result<usize, IngestError> {
    let db = store.client().await?;
    let rows = db
        .query(
            "SELECT reply_subject, job_id, results_subject, results_sequence, attempts,
                    to_char(first_failed_at, 'YYYY-MM-DD HH24:MI:SS TZ')
             FROM tally.task_ack_retry WHERE next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 1000",
            &[],
        )
        .await
        .map_err(StoreError::from)?;
    let pending: i64 =
        db.query_one("SELECT count(*) FROM tally.task_ack_retry", &[]).await.map_err(StoreError::from)?.get(0);
    gauge!(names::TASK_ACK_RETRY_PENDING).set(pending as f64);
    if rows.is_empty() {
        return Ok(0);
    }
    let stored: Vec<Stored> = rows
        .iter()
        .map(|r| {
            Ok(Stored {
                reply_subject: r.try_get(0)?,
                job_id: r.try_get(1)?,
                results_subject: r.try_get(2)?,
                results_sequence: r.try_get(3)?,
                attempts: r.try_get(4)?,
                first_failed_at: r.try_get::<_, Option<String>>(5)?.unwrap_or_default(),
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(StoreError::from)?;
    let subjects: Vec<String> = stored.iter().map(|s| s.reply_subject.clone()).collect();
    let settlements = settle(client, &subjects, args).await;

    let mut done: Vec<&str> = Vec::new();
    let mut again: Vec<(&str, f64, String)> = Vec::new();
    let mut given_up: Vec<(&Stored, String)> = Vec::new();
    for (s, settlement) in stored.iter().zip(settlements) {
        match settlement {
            Settlement::Acked | Settlement::Gone => {
                counter!(names::TASK_ACKS, "outcome" => format!("retry_{}", settlement.label())).increment(1);
                done.push(&s.reply_subject);
            }
            Settlement::Deferred(why) => match next_step(s.attempts.max(0) as u32 + 1, args) {
                NextStep::RetryIn(d) => again.push((&s.reply_subject, d.as_secs_f64(), why)),
                NextStep::GiveUp => given_up.push((s, why)),
            },
        }
    }
    let settled = done.len() + given_up.len();
    let mut db = store.client().await?;
    let tx = db.transaction().await.map_err(StoreError::from)?;
    if !given_up.is_empty() {
        let letters = letters_for(client, nats, &given_up, args).await;
        dead_letters::insert_in(&tx, &letters).await?;
        let logs: Vec<JobLogLine> = given_up
            .iter()
            .map(|(s, why)| JobLogLine {
                job_id: s.job_id,
                level: Level::Error,
                message: format!(
                    "task ack given up after {} attempts since {} ({why}); the result is saved, the task may be redelivered to a worker",
                    s.attempts + 1,
                    s.first_failed_at
                ),
                context: serde_json::json!({"source": "tally", "reply_subject": s.reply_subject}),
            })
            .collect();
        save::write_job_logs(tx.client(), &logs).await?;
        for (s, why) in &given_up {
            error!(job_id = s.job_id, reply_subject = %s.reply_subject, attempts = s.attempts + 1, reason = %why, "task ack given up; dead-lettered");
        }
        counter!(names::TASK_ACKS, "outcome" => "given_up").increment(given_up.len() as u64);
        counter!(names::INGEST_DEAD_LETTERS, "reason" => RejectReason::TaskAckFailed.as_str())
            .increment(given_up.len() as u64);
        done.extend(given_up.iter().map(|(s, _)| s.reply_subject.as_str()));
    }
    tx.execute("DELETE FROM tally.task_ack_retry WHERE reply_subject = ANY($1)", &[&done])
        .await
        .map_err(StoreError::from)?;
    if !again.is_empty() {
        let subjects: Vec<&str> = again.iter().map(|a| a.0).collect();
        let delays: Vec<f64> = again.iter().map(|a| a.1).collect();
        let errors: Vec<&str> = again.iter().map(|a| a.2.as_str()).collect();
        tx.execute(
            "UPDATE tally.task_ack_retry t SET attempts = t.attempts + 1,
                    next_attempt_at = now() + make_interval(secs => u.d), last_error = u.e
             FROM unnest($1::text[], $2::float8[], $3::text[]) AS u(s, d, e) WHERE t.reply_subject = u.s",
            &[&subjects, &delays, &errors],
        )
        .await
        .map_err(StoreError::from)?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    if settled > 0 {
        info!(settled, retrying = again.len(), "stored task acks settled");
    }
    Ok(settled)
}

/// Dead letters for acks given up: the result as the results stream still holds it.
async fn letters_for(
    client: &async_nats::Client,
    nats: &NatsArgs,
    given_up: &[(&Stored, String)],
    args: &ConsumerArgs,
) -> Vec<NewDeadLetter> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&nats.results_stream).await.ok();
    let mut letters = Vec::with_capacity(given_up.len());
    let mut seen = HashSet::new();
    for (s, why) in given_up {
        if !seen.insert(&s.reply_subject) {
            continue;
        }
        let message = match (&stream, s.results_sequence) {
            (Some(stream), Some(seq)) => stream.get_raw_message(seq as u64).await.ok(),
            _ => None,
        };
        let (payload, note) = match &message {
            Some(m) if crate::results_stream::object_of(Some(&m.headers)).is_none() => (m.payload.to_vec(), ""),
            Some(_) => {
                (Vec::new(), " (the result travelled by claim check and its object is deleted: payload not kept)")
            }
            None => (Vec::new(), " (the result is no longer in the results stream: payload not kept)"),
        };
        letters.push(NewDeadLetter {
            subject: s.results_subject.clone(),
            job_id: job_of_subject(&s.results_subject, &nats.results_subject_prefix).or(Some(s.job_id)),
            reply_subject: Some(s.reply_subject.clone()),
            stream_sequence: s.results_sequence,
            delivered: None,
            reason_code: RejectReason::TaskAckFailed.as_str().to_string(),
            reason: format!(
                "the result was saved, but its task ack was not confirmed in {} attempts ({why}){note}",
                args.task_ack_attempts
            ),
            headers: None,
            payload,
        });
    }
    letters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_then_give_up() {
        let args =
            ConsumerArgs { task_ack_attempts: 5, task_ack_backoff_max: Duration::from_secs(6), ..Default::default() };
        assert_eq!(next_step(1, &args), NextStep::RetryIn(Duration::from_secs(1)));
        assert_eq!(next_step(2, &args), NextStep::RetryIn(Duration::from_secs(2)));
        assert_eq!(next_step(3, &args), NextStep::RetryIn(Duration::from_secs(4)));
        assert_eq!(next_step(4, &args), NextStep::RetryIn(Duration::from_secs(6)));
        assert_eq!(next_step(5, &args), NextStep::GiveUp);
        assert_eq!(next_step(50, &args), NextStep::GiveUp);
        let once = ConsumerArgs { task_ack_attempts: 0, ..Default::default() };
        assert_eq!(next_step(1, &once), NextStep::GiveUp);
    }

    #[test]
    fn every_settlement_has_a_label() {
        let labels: Vec<&str> = [Settlement::Acked, Settlement::Gone, Settlement::Deferred("x".into())]
            .iter()
            .map(Settlement::label)
            .collect();
        assert_eq!(labels, ["acked", "consumer_gone", "deferred"]);
    }
    fn saved(n: u64) -> Outcome {
        Outcome::Saved { reply_subject: format!("$JS.ACK.t.{n}"), inserted: n }
    }

    fn dead() -> Outcome {
        Outcome::DeadLettered { code: RejectReason::WrongShape }
    }

    #[test]
    fn saved_results_are_acked_and_dead_letters_terminated() {
        let outcomes = [saved(1), dead(), saved(0)];
        let settlements = [Settlement::Acked, Settlement::Gone];
        assert_eq!(verdicts(&outcomes, &settlements, true), [Verdict::Ack, Verdict::Term, Verdict::Ack]);
    }

    #[test]
    fn a_deferred_task_ack_holds_its_result_only_if_it_could_not_be_stored() {
        let outcomes = [saved(1), saved(2), dead()];
        let settlements = [Settlement::Deferred("timeout".into()), Settlement::Acked];
        assert_eq!(verdicts(&outcomes, &settlements, true), [Verdict::Ack, Verdict::Ack, Verdict::Term]);
        assert_eq!(verdicts(&outcomes, &settlements, false), [Verdict::Nak, Verdict::Ack, Verdict::Term]);
    }

    #[test]
    fn a_batch_of_dead_letters_needs_no_settlement() {
        assert_eq!(verdicts(&[dead(), dead()], &[], false), [Verdict::Term, Verdict::Term]);
        assert!(verdicts(&[], &[], true).is_empty());
    }
}
