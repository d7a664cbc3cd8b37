//! `POST /api/v2/jobs/{id}/tasks/ {"batch_size": n}`: up to n tasks of the job, each with the
//! reply subject of its delivery, which the worker sends back with the result and which acks
//! the task once the result is saved.
//!
//! As Antenna's view: 404 for an unknown job, 400 unless the job is `async_api` or when it has
//! no pipeline, `{"tasks": []}` unless it is STARTED or RETRY, 503 `{"error": "Task queue
//! temporarily unavailable"}` when NATS fails. Unlike Antenna, the pull goes over the one
//! persistent connection, and tasks pulled for a worker that hung up before the answer are
//! NAKed (handed to the next worker) instead of waiting out the ack wait.

use std::sync::Arc;

use async_nats::jetstream::{AckKind, Message};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::auth::Worker;
use super::body::{self, Body};
use super::heartbeat::Beat;
use super::queue::QueueError;
use super::{job, Gateway, GatewayError};
use crate::metrics::names;

/// The request body (`client_info` is accepted and ignored, as by Antenna).
#[derive(Debug, Deserialize)]
struct TasksRequest {
    batch_size: i64,
}

/// The job id of a path, 404 when it is not one. Only the canonical form of a positive
/// decimal is a job id: ASCII digits, no sign, no leading zero, no whitespace, within `i64`.
/// (Rust's `i64::from_str` and Python's `int()` both take `+1001`; a path that spells a job
/// another way names no job here.)
pub fn job_id(raw: &str) -> Result<i64, GatewayError> {
    let canonical = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) && !raw.starts_with('0');
    if !canonical {
        return Err(GatewayError::NotFound);
    }
    raw.parse::<i64>().map_err(|_| GatewayError::NotFound)
}

/// The `{id}` of a job path, as an extractor: 404 (JSON) when it is not a job id, including a
/// segment that is not UTF-8 once percent-decoded (axum's own rejection would be plain text).
pub struct JobId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, GatewayError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| GatewayError::NotFound)?;
        job_id(&raw).map(JobId)
    }
}

/// Serves the tasks call.
pub async fn post(
    _worker: Worker,
    State(gateway): State<Arc<Gateway>>,
    JobId(id): JobId,
    Body(bytes): Body,
) -> Result<Json<Value>, GatewayError> {
    let request: TasksRequest = body::parse(&bytes)?;
    let max = gateway.args.gateway_max_batch_size.max(1);
    let n = usize::try_from(request.batch_size)
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| GatewayError::BadRequest(format!("batch_size must be an integer from 1 to {max}")))?;
    let job = {
        let client = gateway.store()?.client().await.map_err(GatewayError::db)?;
        job::load(&client, id).await?.ok_or(GatewayError::NotFound)?
    };
    gateway.jobs.put(id, job.facts);
    if !job.is_async() {
        return Err(GatewayError::BadRequest(format!(
            "job {id} is not an async_api job (dispatch_mode {:?}): it has no task queue",
            job.dispatch_mode
        )));
    }
    if !job.is_active() {
        gateway.queues.forget(id);
        return Ok(Json(json!({"tasks": []})));
    }
    let Some(pipeline) = job.facts.pipeline_id else {
        return Err(GatewayError::BadRequest(format!("job {id} has no pipeline")));
    };
    gateway.heartbeats.beat(Beat::PipelineProject { pipeline, project: job.facts.project_id });
    let messages = pull(&gateway, id, n).await.map_err(|e| GatewayError::TaskQueue(e.into()))?;
    let mut tasks = Vec::with_capacity(messages.len());
    for message in messages {
        if let Some(task) = task_of(id, message).await {
            tasks.push(task);
        }
    }
    metrics::counter!(names::GATEWAY_TASKS).increment(tasks.len() as u64);
    Ok(Json(json!({"tasks": tasks})))
}

/// Pulls in a task of its own: if the worker hangs up meanwhile (the handler is dropped), the
/// pulled tasks are NAKed so that another worker gets them now rather than after the ack wait.
async fn pull(gateway: &Arc<Gateway>, job: i64, n: usize) -> Result<Vec<Message>, QueueError> {
    let Some(nats) = gateway.nats().cloned() else {
        return Err(QueueError("NATS is not connected yet".into()));
    };
    let (tx, rx) = oneshot::channel();
    let g = Arc::clone(gateway);
    tokio::spawn(async move {
        let pulled = g.queues.pull(&nats, job, n, g.args.gateway_fetch_wait).await;
        if let Err(Ok(abandoned)) = tx.send(pulled) {
            warn!(job_id = job, tasks = abandoned.len(), "worker hung up before its tasks were sent; NAKing them");
            for m in abandoned {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
        }
    });
    rx.await.unwrap_or_else(|_| Err(QueueError("the pull task stopped".into())))
}

/// The task a message carries, with its delivery's reply subject. A message that is not a
/// JSON object cannot be processed by any worker: it is terminated (no redelivery) and logged.
async fn task_of(job: i64, message: Message) -> Option<Value> {
    let Some(reply) = message.reply.as_ref().map(|r| r.to_string()) else {
        error!(job_id = job, "task message without a reply subject; skipped");
        return None;
    };
    match serde_json::from_slice::<Value>(&message.payload) {
        Ok(Value::Object(mut task)) => {
            task.insert("reply_subject".into(), Value::String(reply));
            Some(Value::Object(task))
        }
        _ => {
            error!(job_id = job, reply_subject = %reply, "task message is not a JSON object; terminated");
            metrics::counter!(names::GATEWAY_BAD_TASKS).increment(1);
            let _ = message.ack_with(AckKind::Term).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::job_id;

    #[test]
    fn job_ids_are_positive_integers() {
        assert_eq!(job_id("42").ok(), Some(42));
        assert_eq!(job_id("1001").ok(), Some(1001));
        assert_eq!(job_id("9223372036854775807").ok(), Some(i64::MAX));
        assert!(job_id("0").is_err());
        assert!(job_id("-3").is_err());
        assert!(job_id("abc").is_err());
        assert!(job_id("99999999999999999999").is_err());
        assert!(job_id("9223372036854775808").is_err());
    }

    #[test]
    fn only_the_canonical_form_is_a_job_id() {
        for raw in [
            "+1001", "01001", "00", "", " 1001", "1001 ", "1001\n", "\t7", "1_001", "1,001", "1e3", "0x10", "١٢",
            "１２", "7\0", "+0", "-0",
        ] {
            assert!(job_id(raw).is_err(), "{raw:?}");
        }
    }
}
