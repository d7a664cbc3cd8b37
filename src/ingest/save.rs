//! Saving a batch of validated results in Antenna's tables (SPEC §3 rules 1–8), inside the
//! caller's transaction, with one bulk statement per table rather than one per row.
//!
//! The batch is planned in memory first, against the rows that already exist: detections are
//! keyed by `(image, bbox by value)` (null markers by `(image, detector)`) across the whole
//! batch, so a duplicate box inside a message, a replay in the same batch, or a replay of an
//! acked message all reuse the same row; classifications are keyed by
//! `(detection, taxon, algorithm, score)` and stay attached to the detection they were sent
//! under. Ids of new detections and occurrences are allocated from their sequences up front so
//! that every row, and the dataflow input that mirrors it, is known before anything is
//! written.
//!
//! Besides the rows, the result carries the dataflow input for the batch: the inserted and
//! changed detections and occurrences, new taxa, and read-through copies of the images,
//! events, deployments, projects and taxa the batch refers to (Django may have created them
//! since the bootstrap; a row already mirrored produces no update).

use crate::jobs::logs::Level;
use crate::jobs::state::JobState;
use std::collections::{HashMap, HashSet};

use tally_dataflows::{Detection, Id, InputBatch, Tables};
use tokio_postgres::Transaction;

mod read;
mod write;

pub use write::write_job_logs;

use read::{candidate, determine_existing, load_jobs, load_pipelines, read_owners, resolve_taxa, stored_box};
use write::{
    allocate, insert_classifications, insert_detections, insert_occurrences, write_determinations, write_job_images,
};

use crate::ingest::determination::{determine, Candidate};
use crate::ingest::message::{self, Rejection, ResultBody, ResultMessage};
use crate::store::bootstrap::read_rows;
use crate::store::StoreError;

/// Rows inserted by a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RowCounts {
    /// Detections with a box.
    pub detections: u64,
    /// Null markers (detections without a box).
    pub null_markers: u64,
    /// Classifications.
    pub classifications: u64,
    /// Occurrences.
    pub occurrences: u64,
    /// Taxa created for unknown labels.
    pub taxa: u64,
    /// Occurrences whose determination changed.
    pub determinations: u64,
}

/// A line for `jobs_joblog`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLogLine {
    /// The job.
    pub job_id: i64,
    /// Its level (`INFO`, `WARNING` or `ERROR`).
    pub level: Level,
    /// The message.
    pub message: String,
    /// Structured context.
    pub context: serde_json::Value,
}

/// What saving a batch did.
#[derive(Debug, Default)]
pub struct Saved {
    /// Messages (by index in the input) rejected against the database: unknown pipeline,
    /// algorithm not on the pipeline, unknown image. Nothing of them was written.
    pub rejected: Vec<(usize, Rejection)>,
    /// Rows inserted, per message index (all zero: a replay).
    pub inserted: Vec<u64>,
    /// Rows inserted, all messages.
    pub rows: RowCounts,
    /// The dataflow input of the batch.
    pub input: InputBatch,
    /// Job log lines to write with the batch.
    pub job_logs: Vec<JobLogLine>,
    /// Jobs whose image set changed (their progress is due).
    pub progress_jobs: Vec<i64>,
}

/// Job statuses after which a job is never moved again (Antenna's final states, and a cancel
/// in progress).
pub const CLOSED_STATUSES: &[&str] =
    &[JobState::Success.as_str(), JobState::Failure.as_str(), JobState::Revoked.as_str(), JobState::Canceling.as_str()];

#[derive(Debug, Clone, Copy)]
struct Algorithm {
    id: i64,
    category_map: Option<i64>,
}

#[derive(Debug, Default)]
struct Pipeline {
    algorithms: HashMap<String, Algorithm>,
    detectors: Vec<i64>,
}

/// A detection's identity: a box by value on an image, or a null marker of a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DetKey {
    Box(i64, [u64; 4]),
    Null(i64, i64),
}

fn box_key(image: i64, b: [f64; 4]) -> DetKey {
    // jsonb compares numbers by value: 10 = 10.0, and -0 = 0.
    DetKey::Box(image, b.map(|v| if v == 0.0 { 0u64 } else { v.to_bits() }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DetRef {
    Old(i64),
    New(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OccRef {
    Old(i64),
    New(usize),
}

struct OldDetection {
    image: i64,
    occurrence: Option<i64>,
    valid: bool,
    empty_path: bool,
}

struct NewDetection {
    image: i64,
    bbox: Option<[f64; 4]>,
    algorithm: i64,
    time: Option<String>,
    path: Option<String>,
    occurrence: Option<usize>,
}

struct NewOccurrence {
    image: i64,
    candidates: Vec<Candidate>,
    determination: Option<(Option<i64>, Option<f64>)>,
}

struct NewClassification {
    detection: DetRef,
    taxon: i64,
    algorithm: Algorithm,
    score: f64,
    scores: Vec<f64>,
    logits: Option<Vec<f64>>,
    terminal: bool,
    time: Option<String>,
    image: i64,
}

/// One row of `tally.job_image` to upsert: whether the image failed, the worker's error, and
/// the detections and classifications the result inserted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct JobImage {
    failed: bool,
    error: Option<String>,
    detections: u64,
    classifications: u64,
}

/// Saves `messages` (each already decoded and validated) in `tx`.
pub async fn save(tx: &Transaction<'_>, tables: &Tables, messages: &[&ResultMessage]) -> Result<Saved, StoreError> {
    let mut saved = Saved { inserted: vec![0; messages.len()], ..Saved::default() };

    // ---- read what the batch refers to ----------------------------------------------------
    let slugs: Vec<String> = distinct(messages.iter().filter_map(|m| match &m.body {
        ResultBody::Response(r) => Some(r.pipeline.clone()),
        ResultBody::Error { .. } => None,
    }));
    let pipelines = load_pipelines(tx, &slugs).await?;
    let image_ids: Vec<i64> = distinct(messages.iter().flat_map(|m| m.image_ids()));
    read_rows(tx, "main_sourceimage", "id", &image_ids, &mut saved.input).await?;
    let images: HashMap<i64, tally_dataflows::Image> =
        saved.input.images.iter().filter_map(|(id, row)| row.clone().map(|r| (*id as i64, r))).collect();

    // ---- rules 1 and 2: reject against the database ------------------------------------------
    let mut accepted: Vec<usize> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match check(m, &pipelines, &images) {
            Ok(()) => accepted.push(i),
            Err(r) => saved.rejected.push((i, r)),
        }
    }
    read_owners(tx, tables, &mut saved.input).await?;

    let jobs = load_jobs(tx, &distinct(accepted.iter().map(|&i| messages[i].job_id))).await?;

    let responses: Vec<(usize, &message::PipelineResults)> = accepted
        .iter()
        .filter_map(|&i| match &messages[i].body {
            ResultBody::Response(r) => Some((i, r)),
            ResultBody::Error { .. } => None,
        })
        .collect();

    // ---- existing rows -----------------------------------------------------------------------
    let response_images: Vec<i64> = distinct(responses.iter().flat_map(|(i, _)| messages[*i].image_ids()));
    let mut keys: HashMap<DetKey, DetRef> = HashMap::new();
    let mut old: HashMap<i64, OldDetection> = HashMap::new();
    for row in tx
        .query(
            "SELECT id, source_image_id, bbox, detection_algorithm_id, occurrence_id, coalesce(path, '') = ''
             FROM main_detection WHERE source_image_id = ANY($1)",
            &[&response_images],
        )
        .await?
    {
        let (id, image): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let bbox: Option<serde_json::Value> = row.try_get(2)?;
        let algorithm: Option<i64> = row.try_get(3)?;
        let key = match &bbox {
            None => algorithm.map(|a| DetKey::Null(image, a)),
            Some(v) => stored_box(v).map(|b| box_key(image, b)),
        };
        if let Some(key) = key {
            // Antenna's lookup takes the first match; keep the oldest row.
            keys.entry(key).or_insert(DetRef::Old(id));
        }
        old.insert(
            id,
            OldDetection { image, occurrence: row.try_get(4)?, valid: bbox.is_some(), empty_path: row.try_get(5)? },
        );
    }
    let old_ids: Vec<i64> = old.keys().copied().collect();
    let mut old_classifications: HashSet<(i64, i64, i64, u64)> = HashSet::new();
    let mut old_candidates: HashMap<i64, Vec<Candidate>> = HashMap::new();
    for row in tx
        .query(
            "SELECT id, detection_id, taxon_id, algorithm_id, score, terminal FROM main_classification
             WHERE detection_id = ANY($1)",
            &[&old_ids],
        )
        .await?
    {
        let c = candidate(&row)?;
        let detection: i64 = row.try_get(1)?;
        if let (Some(t), Some(a), Some(s)) = (c.taxon, c.algorithm, c.score) {
            old_classifications.insert((detection, t, a, s.to_bits()));
        }
        old_candidates.entry(detection).or_default().push(c);
    }

    // ---- taxa for every label --------------------------------------------------------------
    let labels: Vec<String> = distinct(
        responses
            .iter()
            .flat_map(|(_, r)| r.detections.iter().flat_map(|d| d.classifications.iter().map(|c| c.label.clone()))),
    );
    let taxa = resolve_taxa(tx, tables, &labels, &mut saved).await?;

    // ---- plan: rules 3–6 ---------------------------------------------------------------------
    let mut new_detections: Vec<NewDetection> = Vec::new();
    let mut new_occurrences: Vec<NewOccurrence> = Vec::new();
    let mut new_classifications: Vec<NewClassification> = Vec::new();
    let mut planned_classifications: HashSet<(DetRef, i64, i64, u64)> = HashSet::new();
    let mut attach: HashMap<i64, usize> = HashMap::new();
    let mut fill_path: HashMap<i64, String> = HashMap::new();
    let mut touched: HashSet<i64> = HashSet::new();
    for (i, r) in &responses {
        let pipeline = &pipelines[&r.pipeline];
        let mut seen_images: HashSet<i64> = HashSet::new();
        for d in &r.detections {
            seen_images.insert(d.image_id);
            let algorithm = pipeline.algorithms[&d.algorithm];
            let key = match d.bbox {
                Some(b) => box_key(d.image_id, b),
                None => DetKey::Null(d.image_id, algorithm.id),
            };
            let detection = *keys.entry(key).or_insert_with(|| {
                new_detections.push(NewDetection {
                    image: d.image_id,
                    bbox: d.bbox,
                    algorithm: algorithm.id,
                    time: d.timestamp.clone(),
                    path: d.crop_image_url.clone(),
                    // Rule 3: a null marker, even one the service sent, gets no occurrence.
                    occurrence: d.bbox.map(|_| {
                        new_occurrences.push(NewOccurrence {
                            image: d.image_id,
                            candidates: Vec::new(),
                            determination: None,
                        });
                        new_occurrences.len() - 1
                    }),
                });
                saved.inserted[*i] += 1;
                DetRef::New(new_detections.len() - 1)
            });
            let occurrence = match detection {
                DetRef::New(n) => new_detections[n].occurrence.map(OccRef::New),
                DetRef::Old(id) => {
                    let o = &old[&id];
                    if let (true, Some(url)) = (o.empty_path, &d.crop_image_url) {
                        fill_path.entry(id).or_insert_with(|| url.clone());
                    }
                    match (o.occurrence, o.valid) {
                        (Some(occ), _) => Some(OccRef::Old(occ)),
                        (None, true) => Some(OccRef::New(*attach.entry(id).or_insert_with(|| {
                            let candidates = old_candidates.get(&id).cloned().unwrap_or_default();
                            new_occurrences.push(NewOccurrence { image: o.image, candidates, determination: None });
                            saved.inserted[*i] += 1;
                            new_occurrences.len() - 1
                        }))),
                        (None, false) => None,
                    }
                }
            };
            if let Some(OccRef::Old(occ)) = occurrence {
                touched.insert(occ);
            }
            for c in &d.classifications {
                let algorithm = pipeline.algorithms[&c.algorithm];
                let taxon = taxa[&c.label];
                let score = c.score();
                let bits = score.to_bits();
                let exists = match detection {
                    DetRef::Old(id) => old_classifications.contains(&(id, taxon, algorithm.id, bits)),
                    DetRef::New(_) => false,
                };
                if exists || !planned_classifications.insert((detection, taxon, algorithm.id, bits)) {
                    continue;
                }
                let order = i64::MAX / 2 + new_classifications.len() as i64;
                if let Some(OccRef::New(n)) = occurrence {
                    new_occurrences[n].candidates.push(Candidate {
                        order,
                        taxon: Some(taxon),
                        algorithm: Some(algorithm.id),
                        score: Some(score),
                        terminal: c.terminal,
                    });
                }
                new_classifications.push(NewClassification {
                    detection,
                    taxon,
                    algorithm,
                    score,
                    scores: c.scores.clone(),
                    logits: c.logits.clone(),
                    terminal: c.terminal,
                    time: c.timestamp.clone(),
                    image: d.image_id,
                });
                saved.inserted[*i] += 1;
            }
        }
        // Rule 6: images that received no detection get the detector's null marker.
        let detector = pipeline.detectors[0];
        for &image in &r.source_images {
            if seen_images.insert(image) {
                keys.entry(DetKey::Null(image, detector)).or_insert_with(|| {
                    new_detections.push(NewDetection {
                        image,
                        bbox: None,
                        algorithm: detector,
                        time: None,
                        path: None,
                        occurrence: None,
                    });
                    saved.inserted[*i] += 1;
                    DetRef::New(new_detections.len() - 1)
                });
            }
        }
    }

    // ---- rule 5: determinations ----------------------------------------------------------------
    for o in &mut new_occurrences {
        o.determination = determine(None, None, &o.candidates).map(|d| (d.taxon, d.score));
    }
    let updates = determine_existing(tx, &touched, &new_classifications, &mut saved.input).await?;

    // ---- ids, then writes ----------------------------------------------------------------------
    let detection_ids = allocate(tx, "main_detection", new_detections.len()).await?;
    let occurrence_ids = allocate(tx, "main_occurrence", new_occurrences.len()).await?;
    let detection_id = |r: DetRef| match r {
        DetRef::Old(id) => id,
        DetRef::New(n) => detection_ids[n],
    };

    insert_occurrences(tx, &new_occurrences, &occurrence_ids, &images, &mut saved.input).await?;
    insert_detections(tx, &new_detections, &detection_ids, &occurrence_ids, &mut saved.input).await?;
    if !attach.is_empty() {
        let ids: Vec<i64> = attach.keys().copied().collect();
        let occs: Vec<i64> = ids.iter().map(|id| occurrence_ids[attach[id]]).collect();
        tx.execute(
            "UPDATE main_detection d SET occurrence_id = u.occ, updated_at = now()
             FROM UNNEST($1::int8[], $2::int8[]) AS u(id, occ) WHERE d.id = u.id",
            &[&ids, &occs],
        )
        .await?;
        for (id, occ) in ids.iter().zip(&occs) {
            saved.input.detections.push((
                *id as Id,
                Some(Detection { image: old[id].image as Id, occurrence: Some(*occ as Id), valid: true }),
            ));
        }
    }
    if !fill_path.is_empty() {
        let (ids, paths): (Vec<i64>, Vec<String>) = fill_path.into_iter().unzip();
        tx.execute(
            "UPDATE main_detection d SET path = u.path FROM UNNEST($1::int8[], $2::text[]) AS u(id, path)
             WHERE d.id = u.id AND coalesce(d.path, '') = ''",
            &[&ids, &paths],
        )
        .await?;
    }
    let classification_detections: Vec<i64> = new_classifications.iter().map(|c| detection_id(c.detection)).collect();
    insert_classifications(tx, &new_classifications, &classification_detections).await?;
    write_determinations(tx, &updates).await?;

    // ---- the job image set (SPEC §5) -------------------------------------------------------------
    let mut per_image: HashMap<i64, (u64, u64)> = HashMap::new();
    for d in new_detections.iter().filter(|d| d.bbox.is_some()) {
        per_image.entry(d.image).or_default().0 += 1;
    }
    for c in &new_classifications {
        per_image.entry(c.image).or_default().1 += 1;
    }
    let mut job_images: HashMap<(i64, i64), JobImage> = HashMap::new();
    for &i in &accepted {
        let m = messages[i];
        match jobs.get(&m.job_id) {
            Some(status) if CLOSED_STATUSES.contains(&status.as_str()) => {
                saved.job_logs.push(JobLogLine {
                    job_id: m.job_id,
                    level: Level::Warning,
                    message: format!(
                        "result for images {:?} arrived after the job was {status}: saved, progress untouched",
                        m.image_ids()
                    ),
                    context: serde_json::json!({"source": "tally", "reply_subject": m.reply_subject}),
                });
                continue;
            }
            Some(_) => {}
            None => continue,
        }
        let (failed, error) = match &m.body {
            ResultBody::Error { error, .. } => (true, Some(error.clone())),
            ResultBody::Response(_) => (false, None),
        };
        for image in m.image_ids() {
            let e = job_images.entry((m.job_id, image)).or_insert_with(|| JobImage {
                failed,
                error: error.clone(),
                ..JobImage::default()
            });
            e.failed |= failed;
            if let Some((d, c)) = per_image.remove(&image) {
                e.detections += d;
                e.classifications += c;
            }
        }
    }
    saved.progress_jobs = distinct(job_images.keys().map(|(job, _)| *job));
    write_job_images(tx, job_images).await?;

    saved.rows = RowCounts {
        detections: new_detections.iter().filter(|d| d.bbox.is_some()).count() as u64,
        null_markers: new_detections.iter().filter(|d| d.bbox.is_none()).count() as u64,
        classifications: new_classifications.len() as u64,
        occurrences: new_occurrences.len() as u64,
        taxa: saved.rows.taxa,
        determinations: (updates.len() + new_occurrences.iter().filter(|o| o.determination.is_some()).count()) as u64,
    };
    Ok(saved)
}

fn distinct<T: Eq + std::hash::Hash + Clone>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

/// Rules 1 and 2 for one message.
fn check(
    m: &ResultMessage,
    pipelines: &HashMap<String, Pipeline>,
    images: &HashMap<i64, tally_dataflows::Image>,
) -> Result<(), Rejection> {
    for id in m.image_ids() {
        if !images.contains_key(&id) {
            return Err(Rejection::new(
                message::RejectReason::UnknownImage,
                format!("image {id} is not in main_sourceimage"),
            ));
        }
    }
    let ResultBody::Response(r) = &m.body else { return Ok(()) };
    let Some(p) = pipelines.get(&r.pipeline) else {
        return Err(Rejection::new(
            message::RejectReason::UnknownPipeline,
            format!("pipeline {:?} is not in ml_pipeline", r.pipeline),
        ));
    };
    if p.detectors.len() != 1 {
        return Err(Rejection::new(
            message::RejectReason::PipelineNotConfigured,
            format!(
                "pipeline {:?} has {} detection algorithms; exactly one is required",
                r.pipeline,
                p.detectors.len()
            ),
        ));
    }
    let keys = r
        .detections
        .iter()
        .flat_map(|d| std::iter::once(&d.algorithm).chain(d.classifications.iter().map(|c| &c.algorithm)));
    for key in keys {
        if !p.algorithms.contains_key(key) {
            return Err(Rejection::new(
                message::RejectReason::PipelineNotConfigured,
                format!("algorithm {key:?} is not linked to pipeline {:?}", r.pipeline),
            ));
        }
    }
    Ok(())
}
