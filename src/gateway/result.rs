//! `POST /api/v2/jobs/{id}/result/ {"results": [...]}`: each result is published, as the
//! worker sent it, to `tally.results.{id}` with `Nats-Msg-Id` = its reply subject (JetStream
//! drops a repeat inside the duplicate window); ingest saves it and acks the task.
//!
//! The whole request is checked before anything is published, so a refused request publishes
//! nothing: each item must be an object with a string `reply_subject` that is an ack subject
//! of job `{id}`'s task consumer (Antenna does not check this) and an object `result`; each
//! must fit in a NATS message. The result itself is validated by ingest, which dead-letters
//! what it cannot save. Nothing is written to the database on this path: results are durable
//! in JetStream once the answer is sent, whatever state Postgres is in.

use std::borrow::Cow;
use std::future::IntoFuture;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tracing::warn;

use super::auth::Worker;
use super::body::{self, Body};
use super::heartbeat::Beat;
use super::tasks::job_id;
use super::{job, Gateway, GatewayError};
use crate::ingest::message::job_of_reply_subject;
use crate::metrics::names;

/// Bytes a message's headers (`Nats-Msg-Id: <reply subject>`) and framing add, at most, beside
/// the reply subject itself.
const HEADER_OVERHEAD: usize = 64;

/// The request body; `results` are kept as the exact bytes sent (`client_info` is ignored).
#[derive(Deserialize)]
struct ResultRequest<'a> {
    #[serde(borrow)]
    results: Vec<&'a RawValue>,
}

/// One `PipelineTaskResult`, as far as the gateway reads it.
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    reply_subject: Cow<'a, str>,
    #[serde(borrow)]
    result: &'a RawValue,
}

/// A checked result, ready to publish.
struct Checked {
    reply_subject: String,
    payload: Bytes,
}

/// Serves the result call.
pub async fn post(
    _worker: Worker,
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    Body(bytes): Body,
) -> Result<Json<Value>, GatewayError> {
    let id = job_id(&id)?;
    known_job(&gateway, id).await?;
    let max_payload = gateway.nats().map(|n| n.client.max_payload());
    let checked = check(id, &bytes, max_payload)?;
    let Some(nats) = gateway.nats() else {
        return Err(GatewayError::ResultQueue { job_id: id, reason: "NATS is not connected yet".into() });
    };
    let subject = gateway.nats_args.results_subject(id);
    // Send every publish first, then wait for all the acks: one round trip for the request,
    // not one per result.
    let mut pending = Vec::with_capacity(checked.len());
    for c in &checked {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", c.reply_subject.as_str());
        let sent = nats.js.publish_with_headers(subject.clone(), headers, c.payload.clone()).await;
        pending.push(sent.map_err(|e| GatewayError::ResultQueue { job_id: id, reason: e.to_string() })?);
    }
    let acks = futures_util::future::join_all(pending.into_iter().map(IntoFuture::into_future)).await;
    let mut tasks = Vec::with_capacity(checked.len());
    for (c, ack) in checked.iter().zip(acks) {
        let ack = ack.map_err(|e| GatewayError::ResultQueue { job_id: id, reason: e.to_string() })?;
        let outcome = if ack.duplicate { "duplicate" } else { "queued" };
        metrics::counter!(names::GATEWAY_RESULTS, "outcome" => outcome).increment(1);
        tasks.push(json!({"reply_subject": c.reply_subject, "status": "queued", "task_id": ack.sequence.to_string()}));
    }
    Ok(Json(json!({
        "status": "accepted",
        "job_id": id,
        "results_queued": tasks.len(),
        "tasks": tasks,
    })))
}

/// 404 for an unknown job, and the heartbeat of a known one. The job's facts are cached, so
/// this reads the database once per job; if the database is down the results are still taken
/// (they are checked against the job's stream and are durable in NATS).
async fn known_job(gateway: &Gateway, id: i64) -> Result<(), GatewayError> {
    let facts = match gateway.jobs.get(id) {
        Some(facts) => Some(facts),
        None => {
            let loaded = async {
                let client = gateway.store()?.client().await.map_err(GatewayError::db)?;
                job::load(&client, id).await
            };
            match loaded.await {
                Ok(Some(job)) => {
                    gateway.jobs.put(id, job.facts);
                    Some(job.facts)
                }
                Ok(None) => return Err(GatewayError::NotFound),
                Err(e) => {
                    warn!(job_id = id, error = %e, "cannot look the job up; taking its results anyway");
                    None
                }
            }
        }
    };
    if let Some(job::Facts { pipeline_id: Some(pipeline), project_id }) = facts {
        gateway.heartbeats.beat(Beat::PipelineProject { pipeline, project: project_id });
    }
    Ok(())
}

/// Checks the whole body: the envelope of every item, that every reply subject belongs to job
/// `job`, and that every item fits in a NATS message of `max_payload` bytes.
fn check(job: i64, bytes: &Bytes, max_payload: Option<usize>) -> Result<Vec<Checked>, GatewayError> {
    let request: ResultRequest<'_> = body::parse(bytes)?;
    let mut checked = Vec::with_capacity(request.results.len());
    for (i, raw) in request.results.iter().enumerate() {
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(GatewayError::BadRequest(format!("results[{i}] is not an object")));
        }
        let item: Item<'_> = serde_json::from_str(text)
            .map_err(|e| GatewayError::BadRequest(format!("results[{i}]: {}", strip_position(&e))))?;
        if !item.result.get().starts_with('{') {
            return Err(GatewayError::BadRequest(format!("results[{i}].result is not an object")));
        }
        if job_of_reply_subject(&item.reply_subject) != Some(job) {
            return Err(GatewayError::BadRequest(format!(
                "results[{i}].reply_subject {:?} is not a task of job {job} (expected $JS.ACK.job_{job}.job-{job}-consumer.…)",
                item.reply_subject
            )));
        }
        if let Some(max) = max_payload {
            let size = text.len() + item.reply_subject.len() + HEADER_OVERHEAD;
            if size > max {
                return Err(GatewayError::TooLarge(format!(
                    "results[{i}] is {} bytes, over the NATS server's max_payload of {max} bytes",
                    text.len()
                )));
            }
        }
        checked
            .push(Checked { reply_subject: item.reply_subject.into_owned(), payload: share(bytes, text.as_bytes()) });
    }
    Ok(checked)
}

/// `part` of `bytes` without a copy (serde borrows raw values from the body, so it is one).
fn share(bytes: &Bytes, part: &[u8]) -> Bytes {
    let (start, at) = (bytes.as_ptr() as usize, part.as_ptr() as usize);
    if at >= start && at + part.len() <= start + bytes.len() {
        bytes.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// serde's message without " at line 1 column 40" (positions inside one item mislead).
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3";

    fn refused(body: &str) -> String {
        match check(7, &Bytes::copy_from_slice(body.as_bytes()), Some(1 << 20)) {
            Err(GatewayError::BadRequest(d)) | Err(GatewayError::TooLarge(d)) => d,
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("accepted: {body}"),
        }
    }

    #[test]
    fn keeps_each_item_as_sent() {
        let item =
            format!("{{\"reply_subject\": \"{SUBJECT}\",  \"result\": {{\"error\": \"x\", \"image_id\": \"1\"}}}}");
        let body = Bytes::from(format!("{{\"results\": [ {item} ], \"client_info\": {{\"host\": \"gpu1\"}}}}"));
        let checked = check(7, &body, Some(1 << 20)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checked.len(), 1);
        assert_eq!(checked[0].reply_subject, SUBJECT);
        assert_eq!(&checked[0].payload[..], item.as_bytes());
    }

    #[test]
    fn refuses_bad_envelopes() {
        assert!(refused("{\"results\": [1]}").contains("results[0] is not an object"));
        assert!(refused("{\"results\": {}}").contains("invalid body"));
        assert!(refused("{\"result\": []}").contains("missing field `results`"));
        assert!(refused("[]").contains("invalid body"));
        assert!(refused("{\"results\": [{\"result\": {}}]}").contains("missing field `reply_subject`"));
        assert!(refused(&format!("{{\"results\": [{{\"reply_subject\": \"{SUBJECT}\"}}]}}"))
            .contains("missing field `result`"));
        assert!(refused("{\"results\": [{\"reply_subject\": 5, \"result\": {}}]}").contains("invalid type"));
        assert!(refused(&format!("{{\"results\": [{{\"reply_subject\": \"{SUBJECT}\", \"result\": []}}]}}"))
            .contains("results[0].result is not an object"));
        let other_job = SUBJECT.replace("job_7.job-7", "job_8.job-8");
        assert!(refused(&format!("{{\"results\": [{{\"reply_subject\": \"{other_job}\", \"result\": {{}}}}]}}"))
            .contains("is not a task of job 7"));
    }

    #[test]
    fn refuses_results_larger_than_a_nats_message() {
        let item = format!("{{\"reply_subject\": \"{SUBJECT}\", \"result\": {{\"pad\": \"{}\"}}}}", "x".repeat(2000));
        let body = Bytes::from(format!("{{\"results\": [{item}]}}"));
        assert!(matches!(check(7, &body, Some(1000)), Err(GatewayError::TooLarge(_))));
        assert!(check(7, &body, Some(1 << 20)).is_ok());
    }
}
