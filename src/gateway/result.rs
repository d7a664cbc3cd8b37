//! `POST /api/v2/jobs/{id}/result/ {"results": [...]}`: each result is published, as the
//! worker sent it, to `tally.results.{id}` with `Nats-Msg-Id` = its reply subject (JetStream
//! drops a repeat inside the duplicate window); ingest saves it and acks the task. A result
//! larger than one NATS message travels by claim check ([`crate::results_stream`]).
//!
//! The request as a whole is checked first (a JSON object with a `results` array, of a known
//! job); a request refused there publishes nothing. Then each item on its own: an object with
//! a string `reply_subject` that is exactly an ack subject of job `{id}`'s task consumer
//! ([`parse_ack_subject`]; Antenna does not check this) and an object `result`. **One bad item
//! never costs the others**: the valid ones are published, and each refused one is published
//! with its reason as a refusal, which ingest stores as a dead letter (visible in `tally
//! dead-letters` and the job log). The answer is 200 with Antenna's shape (`status`, `job_id`,
//! `results_queued`, `tasks`) plus `refused: [{index, reply_subject, reason_code, detail}]`:
//! ADC raises on any 4xx/5xx and then drops the whole batch without retrying
//! (`trapdata/antenna/client.py:100-108`), so a 4xx for a partly bad batch would lose the
//! good results. Nothing is written to the database on this path: results are durable in
//! JetStream once the answer is sent, whatever state Postgres is in.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tracing::{error, warn};

use super::auth::Worker;
use super::body::{self, Body};
use super::heartbeat::Beat;
use super::tasks::JobId;
use super::{job, Gateway, GatewayError};
use crate::ingest::decode::{parse_ack_subject, RejectReason};
use crate::metrics::names;
use crate::results_stream::{self, Outgoing};

/// Characters of a refused item's reply subject quoted back in its reason, at most.
const QUOTED_SUBJECT: usize = 200;

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

/// One item of the request, checked.
#[derive(Debug)]
enum Checked {
    /// To publish as a result.
    Valid {
        /// Its reply subject (the task's ack subject).
        reply_subject: String,
        /// The item's bytes.
        payload: Bytes,
    },
    /// To publish as a refusal (ingest dead-letters it).
    Refused {
        /// Its reply subject, when it had a string one.
        reply_subject: Option<String>,
        /// The reason (ingest's codes).
        code: RejectReason,
        /// What is wrong.
        detail: String,
        /// The item's bytes.
        payload: Bytes,
    },
}

/// Serves the result call.
pub async fn post(
    _worker: Worker,
    State(gateway): State<Arc<Gateway>>,
    JobId(id): JobId,
    Body(bytes): Body,
) -> Result<Json<Value>, GatewayError> {
    let checked = check(id, &bytes)?;
    known_job(&gateway, id).await?;
    let Some(nats) = gateway.nats() else {
        return Err(GatewayError::ResultQueue { job_id: id, source: "NATS is not connected yet".into() });
    };
    let objects = match gateway.objects() {
        Some(objects) => objects.clone(),
        None => {
            // `tally serve` creates the bucket at start; a gateway assembled elsewhere does it
            // on first use, with the results stream's default max age.
            let max_age = crate::ingest::nats::ConsumerArgs::default().max_age();
            let objects = results_stream::ensure_bucket(&nats.js, &gateway.nats_args.results_object_bucket, max_age)
                .await
                .map_err(|e| GatewayError::ResultQueue { job_id: id, source: e.into() })?;
            gateway.set_objects(objects.clone());
            objects
        }
    };
    let subject = gateway.nats_args.results_subject(id);
    let outgoing: Vec<Outgoing> = checked
        .iter()
        .map(|c| match c {
            Checked::Valid { reply_subject, payload } => Outgoing {
                subject: subject.clone(),
                headers: vec![(results_stream::MSG_ID_HEADER, reply_subject.clone())],
                payload: payload.clone(),
            },
            Checked::Refused { code, detail, payload, .. } => Outgoing {
                subject: subject.clone(),
                headers: vec![
                    (results_stream::REFUSED_HEADER, code.as_str().to_string()),
                    (results_stream::REFUSED_REASON_HEADER, header_text(detail)),
                ],
                payload: payload.clone(),
            },
        })
        .collect();
    let max_payload = nats.client.max_payload();
    let answers = results_stream::publish_all(&nats.js, &objects, max_payload, outgoing).await;
    let mut tasks = Vec::new();
    let mut refused = Vec::new();
    let mut failed = None;
    for (i, (c, answer)) in checked.iter().zip(answers).enumerate() {
        match (c, answer) {
            (Checked::Valid { reply_subject, .. }, Ok(ack)) => {
                let outcome = if ack.duplicate { "duplicate" } else { "queued" };
                metrics::counter!(names::GATEWAY_RESULTS, "outcome" => outcome).increment(1);
                tasks.push(
                    json!({"reply_subject": reply_subject, "status": "queued", "task_id": ack.sequence.to_string()}),
                );
            }
            (Checked::Valid { .. }, Err(e)) => {
                metrics::counter!(names::GATEWAY_RESULTS, "outcome" => "publish_failed").increment(1);
                failed.get_or_insert(e);
            }
            (Checked::Refused { reply_subject, code, detail, .. }, answer) => {
                metrics::counter!(names::GATEWAY_RESULTS, "outcome" => "refused").increment(1);
                let dead_lettered = match answer {
                    Ok(_) => true,
                    Err(e) => {
                        error!(job_id = id, index = i, reason = code.as_str(), error = %e, "cannot publish a refused result for its dead letter");
                        false
                    }
                };
                warn!(job_id = id, index = i, reason = code.as_str(), %detail, "result refused");
                refused.push(json!({
                    "index": i,
                    "reply_subject": reply_subject,
                    "reason_code": code.as_str(),
                    "detail": detail,
                    "dead_lettered": dead_lettered,
                }));
            }
        }
    }
    if let Some(e) = failed {
        // A valid result that JetStream did not take: the worker's batch is lost unless NATS
        // redelivers its tasks, which it does after their ack wait (as with Antenna's 503).
        return Err(GatewayError::ResultQueue { job_id: id, source: e.into() });
    }
    let status = match (tasks.is_empty(), refused.is_empty()) {
        (_, true) => "accepted",
        (false, false) => "partial",
        (true, false) => "rejected",
    };
    Ok(Json(json!({
        "status": status,
        "job_id": id,
        "results_queued": tasks.len(),
        "tasks": tasks,
        "refused": refused,
    })))
}

/// `text` as one header line: printable ASCII, anything else escaped, at most ~1 kB.
fn header_text(text: &str) -> String {
    let mut escaped: String = text.escape_default().collect();
    if escaped.len() > 1000 {
        // Escaped text is ASCII: any byte index is a char boundary.
        escaped.truncate(1000);
        escaped.push_str("...");
    }
    escaped
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

/// Checks the request as a whole (refused: nothing is published), then each item on its own.
fn check(job: i64, bytes: &Bytes) -> Result<Vec<Checked>, GatewayError> {
    let request: ResultRequest<'_> = body::parse(bytes)?;
    Ok(request.results.iter().enumerate().map(|(i, raw)| check_item(job, i, bytes, raw.get())).collect())
}

/// Checks one item: an object with an ack subject of job `job` and an object `result`.
fn check_item(job: i64, i: usize, bytes: &Bytes, text: &str) -> Checked {
    let payload = share(bytes, text.as_bytes());
    let refuse = |reply_subject: Option<String>, code: RejectReason, detail: String| Checked::Refused {
        reply_subject,
        code,
        detail: format!("results[{i}]{detail}"),
        payload: payload.clone(),
    };
    if !text.starts_with('{') {
        return refuse(None, RejectReason::WrongShape, " is not an object".into());
    }
    let item: Item<'_> = match serde_json::from_str(text) {
        Ok(item) => item,
        Err(e) => {
            let reply = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v.get("reply_subject").and_then(Value::as_str).map(quote_subject));
            return refuse(reply, RejectReason::WrongShape, format!(": {}", strip_position(&e)));
        }
    };
    let quoted = quote_subject(&item.reply_subject);
    if !item.result.get().starts_with('{') {
        return refuse(Some(quoted), RejectReason::WrongShape, ".result is not an object".into());
    }
    match parse_ack_subject(&item.reply_subject) {
        Ok(ack) if ack.job == job => Checked::Valid { reply_subject: item.reply_subject.into_owned(), payload },
        Ok(ack) => refuse(
            Some(quoted),
            RejectReason::ForeignReplySubject,
            format!(".reply_subject is a task of job {}, not of job {job}", ack.job),
        ),
        Err(why) => refuse(
            Some(quoted.clone()),
            RejectReason::ForeignReplySubject,
            format!(".reply_subject {quoted:?} {why} (expected $JS.ACK.job_{job}.job-{job}-consumer.…)"),
        ),
    }
}

/// A reply subject as quoted back: at most [`QUOTED_SUBJECT`] characters.
fn quote_subject(subject: &str) -> String {
    match subject.char_indices().nth(QUOTED_SUBJECT) {
        Some((at, _)) => format!("{}…", &subject[..at]),
        None => subject.to_string(),
    }
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

    fn checked(body: &str) -> Result<Vec<Checked>, GatewayError> {
        check(7, &Bytes::copy_from_slice(body.as_bytes()))
    }

    fn refused_whole(body: &str) -> String {
        match checked(body) {
            Err(GatewayError::BadRequest(d)) => d,
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("accepted: {body}"),
        }
    }

    fn refusal(body: &str) -> (RejectReason, String) {
        match checked(body).map(|mut c| c.remove(0)) {
            Ok(Checked::Refused { code, detail, .. }) => (code, detail),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn keeps_each_item_as_sent() {
        let item =
            format!("{{\"reply_subject\": \"{SUBJECT}\",  \"result\": {{\"error\": \"x\", \"image_id\": \"1\"}}}}");
        let body = format!("{{\"results\": [ {item} ], \"client_info\": {{\"host\": \"gpu1\"}}}}");
        match checked(&body).map(|mut c| c.remove(0)) {
            Ok(Checked::Valid { reply_subject, payload }) => {
                assert_eq!(reply_subject, SUBJECT);
                assert_eq!(&payload[..], item.as_bytes());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_requests_as_a_whole() {
        assert!(refused_whole("{\"results\": {}}").contains("invalid body"));
        assert!(refused_whole("{\"result\": []}").contains("missing field `results`"));
        assert!(refused_whole("[]").contains("invalid body"));
    }

    #[test]
    fn refuses_bad_items_one_by_one() {
        assert_eq!(refusal("{\"results\": [1]}"), (RejectReason::WrongShape, "results[0] is not an object".into()));
        assert!(refusal("{\"results\": [{\"result\": {}}]}").1.contains("missing field `reply_subject`"));
        assert!(refusal(&format!("{{\"results\": [{{\"reply_subject\": \"{SUBJECT}\"}}]}}"))
            .1
            .contains("missing field `result`"));
        assert!(refusal("{\"results\": [{\"reply_subject\": 5, \"result\": {}}]}").1.contains("invalid type"));
        assert!(refusal(&format!("{{\"results\": [{{\"reply_subject\": \"{SUBJECT}\", \"result\": []}}]}}"))
            .1
            .contains("results[0].result is not an object"));
        let other_job = SUBJECT.replace("job_7.job-7", "job_8.job-8");
        let (code, detail) =
            refusal(&format!("{{\"results\": [{{\"reply_subject\": \"{other_job}\", \"result\": {{}}}}]}}"));
        assert_eq!(code, RejectReason::ForeignReplySubject);
        assert!(detail.contains("a task of job 8, not of job 7"), "{detail}");
        for bad in [format!("{SUBJECT}.extra"), format!("{SUBJECT} "), format!("{SUBJECT}\\r\\nX-Evil: 1")] {
            let body = format!("{{\"results\": [{{\"reply_subject\": \"{bad}\", \"result\": {{}}}}]}}");
            assert_eq!(refusal(&body).0, RejectReason::ForeignReplySubject, "{bad}");
        }
    }

    #[test]
    fn a_bad_item_leaves_the_others_valid() {
        let good =
            format!("{{\"reply_subject\": \"{SUBJECT}\", \"result\": {{\"error\": \"x\", \"image_id\": \"1\"}}}}");
        let body = format!("{{\"results\": [{good}, 7, {good}]}}");
        let items = checked(&body).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(items[0], Checked::Valid { .. }));
        assert!(matches!(items[1], Checked::Refused { code: RejectReason::WrongShape, .. }));
        assert!(matches!(items[2], Checked::Valid { .. }));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any body: no panic; a refusal of the whole request is a 400; every valid item has a
        /// reply subject of job 7 that NATS headers can carry; every refused item's reason fits
        /// in a header once escaped.
        #[test]
        fn any_body_is_checked_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            subject in "[ -~\\r\\n\\t]{0,80}",
        ) {
            let _ = check(7, &Bytes::from(bytes));
            let body = serde_json::json!({"results": [{"reply_subject": subject, "result": {}}, 3, {"result": 1}]});
            match check(7, &Bytes::from(body.to_string())) {
                Ok(items) => {
                    proptest::prop_assert_eq!(items.len(), 3);
                    for item in items {
                        match item {
                            Checked::Valid { reply_subject, .. } => {
                                proptest::prop_assert!(results_stream::header_safe(&reply_subject));
                                proptest::prop_assert_eq!(parse_ack_subject(&reply_subject).map(|a| a.job), Ok(7));
                            }
                            Checked::Refused { detail, .. } => {
                                proptest::prop_assert!(results_stream::header_safe(&header_text(&detail)));
                            }
                        }
                    }
                }
                Err(e) => proptest::prop_assert!(false, "a well-formed envelope was refused whole: {e}"),
            }
        }
    }

    #[test]
    fn header_text_is_one_safe_line() {
        let text = header_text("reply_subject \"a\\r\\nb\" é \u{0}");
        assert!(results_stream::header_safe(&text), "{text}");
        assert!(header_text(&"x".repeat(5000)).len() < 1100);
    }
}
