//! Tasks as `/tasks` hands them out, and the result a simulated model gives for each: a
//! deterministic function of the image (via [`ResultFactory`]), so a task processed twice,
//! by any loop or any run, yields byte-identical result JSON, as a deterministic model would.

use serde_json::{json, Value};
use tally_dataflows::Id;

use crate::synth::results::ResultFactory;

/// One task of a `/tasks` answer (`{id, image_id, image_url, reply_subject}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// `image_id` as sent (Antenna sends `str(SourceImage.pk)`).
    pub image_id: String,
    /// The delivery's ack subject, sent back with the result.
    pub reply_subject: String,
}

/// A claimed job (`results[0]` of a claim).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedJob {
    /// `jobs_job.id`.
    pub id: i64,
    /// The job's pipeline, written into each result.
    pub pipeline_slug: String,
}

/// The first job of a claim answer, `None` when there is none, `Err` when the body is not a
/// claim answer.
pub fn parse_claim(body: &Value) -> Result<Option<ClaimedJob>, &'static str> {
    let results = body.get("results").and_then(Value::as_array).ok_or("no `results` array")?;
    let Some(first) = results.first() else { return Ok(None) };
    let id = first.get("id").and_then(Value::as_i64).ok_or("results[0].id is not an integer")?;
    let pipeline_slug =
        first.get("pipeline_slug").and_then(Value::as_str).ok_or("results[0].pipeline_slug is not a string")?;
    Ok(Some(ClaimedJob { id, pipeline_slug: pipeline_slug.to_string() }))
}

/// The tasks of a `/tasks` answer, and how many entries could not be used (no reply subject:
/// nothing could acknowledge them). `Err` when the body is not a `/tasks` answer.
pub fn parse_tasks(body: &Value) -> Result<(Vec<Task>, u64), &'static str> {
    let tasks = body.get("tasks").and_then(Value::as_array).ok_or("no `tasks` array")?;
    let mut out = Vec::with_capacity(tasks.len());
    let mut unusable = 0;
    for t in tasks {
        let reply = t.get("reply_subject").and_then(Value::as_str);
        let image = t.get("image_id").or_else(|| t.get("id"));
        let image = match image {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        match (image, reply) {
            (Some(image_id), Some(reply)) => out.push(Task { image_id, reply_subject: reply.to_string() }),
            _ => unusable += 1,
        }
    }
    Ok((out, unusable))
}

/// The `result` of `task` for `factory`'s pipeline: a `PipelineResultsResponse` seeded from the
/// image id, or, for an image id that is not a number, a `PipelineResultsError` (what ADC
/// sends when it cannot download an image). The flag says which.
pub fn result_of(factory: &ResultFactory, task: &Task) -> (Value, bool) {
    match task.image_id.trim().parse::<Id>() {
        Ok(image) => (factory.response(image), true),
        Err(_) => (
            json!({"error": format!("image id {:?} is not a number", task.image_id), "image_id": task.image_id}),
            false,
        ),
    }
}

/// One `PipelineTaskResult` (`{reply_subject, result}`) answering `task`; the flag is false for
/// an error result.
pub fn task_result(factory: &ResultFactory, task: &Task) -> (Value, bool) {
    let (result, ok) = result_of(factory, task);
    (json!({"reply_subject": task.reply_subject, "result": result}), ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::results::ResultKeys;

    fn factory() -> ResultFactory {
        ResultFactory {
            species: (0..20).map(|i| format!("Species {i}")).collect(),
            keys: ResultKeys::antenna_test("sim-pipeline"),
            mean_detections: 6.0,
            score_len: 12,
            seed: 7,
        }
    }

    fn task(image: &str, reply: &str) -> Task {
        Task { image_id: image.into(), reply_subject: reply.into() }
    }

    #[test]
    fn the_same_task_yields_byte_identical_result_json() {
        let (f, g) = (factory(), factory());
        let t = task("501", "$JS.ACK.job_1.job-1-consumer.1.2.2.1.3");
        let a = serde_json::to_vec(&task_result(&f, &t).0).expect("json");
        let b = serde_json::to_vec(&task_result(&g, &t.clone()).0).expect("json");
        assert_eq!(a, b);
        // A redelivery (another reply subject) carries the same result.
        let again = task("501", "$JS.ACK.job_1.job-1-consumer.2.9.9.1.3");
        let r1 = serde_json::to_vec(&result_of(&f, &t).0).expect("json");
        let r2 = serde_json::to_vec(&result_of(&f, &again).0).expect("json");
        assert_eq!(r1, r2);
        // Another image gets another result, naming its own image.
        let other = result_of(&f, &task("502", "x")).0;
        assert_ne!(serde_json::to_vec(&other).expect("json"), r1);
        assert_eq!(other["source_images"][0]["id"], "502");
        assert_eq!(other["pipeline"], "sim-pipeline");
    }

    #[test]
    fn a_task_without_a_numeric_image_gets_an_error_result() {
        let (item, ok) = task_result(&factory(), &task("abc", "r"));
        assert!(!ok);
        assert_eq!(item["reply_subject"], "r");
        assert_eq!(item["result"]["image_id"], "abc");
        assert!(item["result"]["error"].as_str().is_some_and(|e| e.contains("not a number")));
    }

    #[test]
    fn claims_and_tasks_are_read_without_trusting_the_body() {
        let claim = json!({"count": 1, "results": [{"id": 42, "pipeline_slug": "p", "user_permissions": []}]});
        assert_eq!(parse_claim(&claim), Ok(Some(ClaimedJob { id: 42, pipeline_slug: "p".into() })));
        assert_eq!(parse_claim(&json!({"count": 0, "results": []})), Ok(None));
        assert!(parse_claim(&json!({"detail": "x"})).is_err());
        assert!(parse_claim(&json!({"results": [{"id": "42"}]})).is_err());
        assert!(parse_claim(&json!([1, 2])).is_err());

        let tasks = json!({"tasks": [
            {"id": "1", "image_id": "1", "image_url": "u", "reply_subject": "r1"},
            {"id": "2", "image_id": "2", "image_url": "u", "reply_subject": null},
            {"id": 3, "reply_subject": "r3"},
        ]});
        let (got, unusable) = parse_tasks(&tasks).expect("tasks");
        assert_eq!(got, vec![task("1", "r1"), task("3", "r3")]);
        assert_eq!(unusable, 1);
        assert!(parse_tasks(&json!({"error": "Task queue temporarily unavailable"})).is_err());
    }
}
