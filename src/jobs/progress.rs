//! Job progress in `jobs_job.progress`, Antenna's JSON shape, computed exactly from
//! `tally.job_image` (one row per job and image that a result was saved or failed for, with
//! the rows that result inserted) instead of accumulated per message. The sums are read from
//! `tally.job_progress`, which statement triggers on `tally.job_image` keep equal to them in
//! the same transaction (migration V8): one row per job, however many images it has done.
//!
//! - `process`: processed = images with a row, failed = rows marked failed, remaining =
//!   `total_images` (the `collect` stage's parameter, written when the job was created) −
//!   processed.
//! - `results`: captures = processed images that did not fail, detections and
//!   classifications = the sums of rows actually inserted.
//!
//! The job row is locked (`FOR NO KEY UPDATE`) in the ingest transaction, re-read, and only the
//! `process` and `results` stages are replaced, so another stage's newer value is never
//! overwritten; stage progress never decreases. When every image is processed the job moves
//! to SUCCESS, or FAILURE when more than half failed, through a guarded
//! `UPDATE … WHERE status IN (CREATED, PENDING, STARTED, RETRY)`: finished and cancelled jobs
//! are never resurrected. Replays insert no `job_image` row and no rows, so no counter drifts.
//! `NO KEY UPDATE` serializes progress writers as `FOR UPDATE` would, but never blocks the
//! foreign-key checks (`KEY SHARE`) that another batch's `COMMIT` runs on the job row: ingest's
//! pipeline has one batch committing while the next one saves.

use crate::jobs::state::JobState;
use std::collections::HashMap;

use serde_json::{json, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::store::StoreError;

/// Statuses from which a job may still finish (Antenna's `finalizable_states`).
pub const FINALIZABLE: &[&str] =
    &[JobState::Created.as_str(), JobState::Pending.as_str(), JobState::Started.as_str(), JobState::Retry.as_str()];

/// Share of failed images above which a finished job is a FAILURE (Antenna's
/// `FAILURE_THRESHOLD`).
pub const FAILURE_THRESHOLD: f64 = 0.5;

/// The figures of one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Images to process (`collect.total_images`), if known.
    pub total: Option<i64>,
    /// Images with a result.
    pub processed: i64,
    /// Images whose result was an error.
    pub failed: i64,
    /// Detections inserted.
    pub detections: i64,
    /// Classifications inserted.
    pub classifications: i64,
}

impl Figures {
    /// Share of images processed (0 when the total is unknown or zero).
    pub fn fraction(&self) -> f64 {
        match self.total {
            Some(t) if t > 0 => (self.processed as f64 / t as f64).min(1.0),
            _ => 0.0,
        }
    }

    /// Whether every image is processed.
    pub fn complete(&self) -> bool {
        matches!(self.total, Some(t) if self.processed >= t)
    }

    /// The status the job ends in once complete.
    pub fn final_status(&self) -> &'static str {
        match self.total {
            Some(t) if t > 0 && self.failed as f64 / t as f64 > FAILURE_THRESHOLD => JobState::Failure.as_str(),
            _ => JobState::Success.as_str(),
        }
    }
}

/// What happened to one job's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    /// The job.
    pub job_id: i64,
    /// Its figures.
    pub figures: Figures,
    /// The status it moved to, when this update finished it.
    pub finished: Option<&'static str>,
}

/// Recomputes and writes the progress of `jobs` (those not finished or cancelled), inside the
/// caller's transaction.
pub async fn update(tx: &Client, jobs: &[i64]) -> Result<Vec<ProgressUpdate>, StoreError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = jobs.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // Lock in id order, so two writers can never deadlock on each other's rows.
    let rows = tx
        .query_typed(
            "SELECT id, status, progress FROM jobs_job WHERE id = ANY($1::int8[]) AND status = ANY($2::text[])
             ORDER BY id FOR NO KEY UPDATE",
            &[(&ids, Type::INT8_ARRAY), (&FINALIZABLE, Type::TEXT_ARRAY)],
        )
        .await?;
    let mut sums: HashMap<i64, Figures> = HashMap::new();
    for r in tx
        .query_typed(
            "SELECT job_id, processed, failed, detections, classifications
             FROM tally.job_progress WHERE job_id = ANY($1::int8[])",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        sums.insert(
            r.try_get(0)?,
            Figures {
                total: None,
                processed: r.try_get(1)?,
                failed: r.try_get(2)?,
                detections: r.try_get(3)?,
                classifications: r.try_get(4)?,
            },
        );
    }
    let mut updates = Vec::new();
    for r in rows {
        let id: i64 = r.try_get(0)?;
        let mut progress: Value = r.try_get(2)?;
        let mut figures = sums.get(&id).copied().unwrap_or_default();
        figures.total = total_images(&progress);
        let finished = figures.complete().then(|| figures.final_status());
        apply(&mut progress, &figures, finished);
        tx.execute_typed(
            "UPDATE jobs_job SET progress = $2::jsonb, updated_at = now() WHERE id = $1::int8",
            &[(&id, Type::INT8), (&progress, Type::JSONB)],
        )
        .await?;
        let mut moved = None;
        if let Some(status) = finished {
            let n = tx
                .execute(
                    "UPDATE jobs_job SET status = $2::text, finished_at = now(),
                            progress = jsonb_set(progress, '{summary,status}', to_jsonb($2::text))
                     WHERE id = $1 AND status = ANY($3)",
                    &[&id, &status, &FINALIZABLE],
                )
                .await?;
            if n == 1 {
                moved = Some(status);
            }
        }
        updates.push(ProgressUpdate { job_id: id, figures, finished: moved });
    }
    Ok(updates)
}

/// `collect.total_images` (a number, or a string of digits; `""` until collected).
pub fn total_images(progress: &Value) -> Option<i64> {
    let value = stage(progress, "collect")?.get("params")?.as_array()?.iter().find(|p| p["key"] == "total_images")?;
    match &value["value"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn stage<'a>(progress: &'a Value, key: &str) -> Option<&'a Value> {
    progress.get("stages")?.as_array()?.iter().find(|s| s["key"] == key)
}

fn param(name: &str, value: i64) -> Value {
    json!({"name": name, "key": name.to_lowercase(), "category": "default", "value": value})
}

/// Replaces the `process` and `results` stages of `progress` with `figures` (adding them when
/// absent), never lowering a stage's progress, and recomputes the summary as Antenna does (the
/// mean of the stages' progress).
pub fn apply(progress: &mut Value, figures: &Figures, finished: Option<&'static str>) {
    if !progress.is_object() {
        *progress = json!({});
    }
    if !progress["stages"].is_array() {
        progress["stages"] = json!([]);
    }
    let fraction = figures.fraction();
    let stage_status = |old: Option<&Value>| -> Value {
        match (finished, old.and_then(|s| s["status"].as_str())) {
            (Some(status), _) => json!(status),
            (None, Some(old)) if old == JobState::Failure.as_str() => json!(JobState::Failure.as_str()),
            (None, _)
                if figures.total.is_some_and(|t| t > 0 && figures.failed as f64 / t as f64 > FAILURE_THRESHOLD) =>
            {
                json!(JobState::Failure.as_str())
            }
            (None, _) => json!(JobState::Started.as_str()),
        }
    };
    let remaining = figures.total.map(|t| (t - figures.processed).max(0)).unwrap_or(0);
    let new = [
        (
            "process",
            "Process",
            vec![param("Processed", figures.processed), param("Remaining", remaining), param("Failed", figures.failed)],
        ),
        (
            "results",
            "Results",
            vec![
                param("Captures", figures.processed - figures.failed),
                param("Detections", figures.detections),
                param("Classifications", figures.classifications),
            ],
        ),
    ];
    let Some(stages) = progress["stages"].as_array_mut() else { return };
    for (key, name, params) in new {
        let old = stages.iter().position(|s| s["key"] == key);
        let old_progress = old.and_then(|i| stages[i]["progress"].as_f64()).unwrap_or(0.0);
        let value = json!({
            "key": key,
            "name": name,
            "status": stage_status(old.map(|i| &stages[i])),
            "progress": old_progress.max(fraction),
            "params": params,
        });
        match old {
            Some(i) => stages[i] = value,
            None => stages.push(value),
        }
    }
    let n = stages.len().max(1) as f64;
    let mean = stages.iter().map(|s| s["progress"].as_f64().unwrap_or(0.0)).sum::<f64>() / n;
    let summary_status = progress["summary"]["status"].as_str().map(str::to_string);
    progress["summary"] = json!({
        "status": summary_status.unwrap_or_else(|| JobState::Started.as_str().into()),
        "progress": mean,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn antenna_progress(total: Value) -> Value {
        json!({"summary": {"status": "STARTED", "progress": 0.3},
               "stages": [
                   {"key": "collect", "name": "Collect", "status": "SUCCESS", "progress": 1.0,
                    "params": [{"name": "Total Images", "key": "total_images", "category": "default", "value": total}]},
                   {"key": "process", "name": "Process", "status": "STARTED", "progress": 0.0, "params": []},
                   {"key": "results", "name": "Results", "status": "CREATED", "progress": 0.0, "params": []}],
               "errors": [], "logs": []})
    }

    #[test]
    fn totals_are_read_as_numbers_or_strings() {
        assert_eq!(total_images(&antenna_progress(json!(500))), Some(500));
        assert_eq!(total_images(&antenna_progress(json!("12"))), Some(12));
        assert_eq!(total_images(&antenna_progress(json!(""))), None);
        assert_eq!(total_images(&json!({})), None);
    }

    #[test]
    fn only_process_and_results_change_and_progress_never_drops() {
        let mut p = antenna_progress(json!(10));
        p["errors"] = json!(["kept"]);
        let f = Figures { total: Some(10), processed: 4, failed: 1, detections: 30, classifications: 60 };
        apply(&mut p, &f, None);
        assert_eq!(p["stages"][0]["status"], "SUCCESS", "collect untouched");
        assert_eq!(p["errors"], json!(["kept"]));
        assert_eq!(p["stages"][1]["progress"], 0.4);
        assert_eq!(p["stages"][1]["params"][0]["value"], 4);
        assert_eq!(p["stages"][1]["params"][1]["value"], 6);
        assert_eq!(p["stages"][2]["params"][0]["value"], 3, "captures exclude failed images");
        assert!((p["summary"]["progress"].as_f64().unwrap_or(0.0) - 0.6).abs() < 1e-9);
        // A lower figure (impossible from job_image, but guarded) does not move progress back.
        apply(&mut p, &Figures { processed: 2, ..f }, None);
        assert_eq!(p["stages"][1]["progress"], 0.4);
    }

    #[test]
    fn completion_and_the_failure_rule() {
        let done = Figures { total: Some(4), processed: 4, failed: 2, detections: 0, classifications: 0 };
        assert!(done.complete());
        assert_eq!(done.final_status(), "SUCCESS", "exactly half failed is not more than half");
        assert_eq!(Figures { failed: 3, ..done }.final_status(), "FAILURE");
        assert!(!Figures { processed: 3, ..done }.complete());
        assert!(!Figures { total: None, ..done }.complete());
        let mut p = antenna_progress(json!(4));
        apply(&mut p, &done, Some("SUCCESS"));
        assert_eq!(p["stages"][1]["status"], "SUCCESS");
        assert_eq!(p["stages"][2]["progress"], 1.0);
    }
}
