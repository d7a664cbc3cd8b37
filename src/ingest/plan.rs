//! The pure middle of a batch save (SPEC §3 rules 1–8): from what the database holds for the
//! batch ([`Snapshot`], read by [`crate::ingest::save`]) and the batch's messages, decide
//! everything to write ([`Plan`]) without any I/O.
//!
//! Detections are keyed by `(image, bbox by value)` (null markers by `(image, detector)`)
//! across the whole batch, so a duplicate box inside a message, a replay in the same batch, or
//! a replay of an acked message all reuse the same row; classifications are keyed by
//! `(detection, taxon, algorithm, score)` and stay attached to the detection they were sent
//! under.
//!
//! Rows that do not exist yet have no id when the plan is made: new detections and
//! occurrences are referred to by their index in [`Plan::detections`] and
//! [`Plan::occurrences`], and a new taxon by a negative placeholder ([`new_taxon`]). The write
//! phase allocates the ids and hands them back as [`Ids`], from which [`Plan::input`] builds
//! the dataflow input of the batch.

use std::collections::{HashMap, HashSet};

use tally_dataflows::{Detection, Id, Image, InputBatch, Occurrence, Score};

use crate::ingest::decode::{RejectReason, Rejection, ResultBody, ResultMessage};
use crate::ingest::determination::{determine, Candidate};
use crate::ingest::save::{JobLogLine, RowCounts, CLOSED_STATUSES};
use crate::jobs::logs::Level;

mod snapshot;
#[cfg(test)]
mod tests;

pub use snapshot::{Algorithm, Pipeline, Snapshot, StoredDetection, StoredOccurrence};

/// The placeholder of the `n`th new taxon ([`Plan::taxa`]) where a taxon id is expected:
/// `-1 - n` (ids are positive). [`Ids::taxon`] maps it to the id.
pub fn new_taxon(n: usize) -> i64 {
    -1 - n as i64
}

/// A detection a classification or an occurrence refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetRef {
    /// A stored one, by id.
    Old(i64),
    /// A new one, by index in [`Plan::detections`].
    New(usize),
}

/// A detection to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDetection {
    /// Its image.
    pub image: i64,
    /// Its bbox (`None`: a null marker).
    pub bbox: Option<[f64; 4]>,
    /// Its detection algorithm.
    pub algorithm: i64,
    /// `detection_time` as sent.
    pub time: Option<String>,
    /// The crop URL.
    pub path: Option<String>,
    /// Its occurrence, by index in [`Plan::occurrences`].
    pub occurrence: Option<usize>,
}

/// An occurrence to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOccurrence {
    /// The image of its detection.
    pub image: i64,
    /// Copied from the image.
    pub event: Option<i64>,
    /// Copied from the image.
    pub deployment: Option<i64>,
    /// Copied from the image.
    pub project: Option<i64>,
    /// Its determination (taxon, possibly [`new_taxon`], and score), when rule 5 gives one.
    pub determination: Option<(Option<i64>, Option<f64>)>,
}

/// A classification to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewClassification {
    /// Its detection.
    pub detection: DetRef,
    /// Its taxon (possibly [`new_taxon`]).
    pub taxon: i64,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// `max(scores)`.
    pub score: f64,
    /// The score vector.
    pub scores: Vec<f64>,
    /// The logits.
    pub logits: Option<Vec<f64>>,
    /// Whether it is terminal.
    pub terminal: bool,
    /// `timestamp` as sent.
    pub time: Option<String>,
    /// The image of its detection.
    pub image: i64,
}

/// A stored occurrence whose determination changes (rule 5).
#[derive(Debug, Clone, PartialEq)]
pub struct OccurrenceUpdate {
    /// The occurrence.
    pub id: i64,
    /// The new determination (possibly [`new_taxon`]).
    pub taxon: Option<i64>,
    /// The new score (`None`: keep the stored one).
    pub score: Option<f64>,
    /// The row after the change, for the dataflow.
    pub row: Occurrence,
}

/// One row of `tally.job_image` to upsert: whether the image failed, the worker's error, and
/// the detections and classifications the result inserted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JobImage {
    /// The worker reported an error for the image.
    pub failed: bool,
    /// The worker's error.
    pub error: Option<String>,
    /// Detections (with a box) inserted for the image.
    pub detections: u64,
    /// Classifications inserted for the image.
    pub classifications: u64,
}

/// Everything a batch save writes, decided without I/O.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Messages (by index in the input) rejected against the database (rules 1, 2).
    pub rejected: Vec<(usize, Rejection)>,
    /// Rows each message inserts (all zero: a replay). New taxa are not counted.
    pub inserted: Vec<u64>,
    /// Labels to create taxa for, the `n`th referred to as [`new_taxon`]`(n)`.
    pub taxa: Vec<String>,
    /// Detections to insert.
    pub detections: Vec<NewDetection>,
    /// Occurrences to insert.
    pub occurrences: Vec<NewOccurrence>,
    /// Classifications to insert.
    pub classifications: Vec<NewClassification>,
    /// Stored valid detections without an occurrence that get a new one (by index).
    pub attach: Vec<(i64, usize)>,
    /// Stored detections with an empty crop path, and the path a replay sent.
    pub fill_path: Vec<(i64, String)>,
    /// Stored occurrences whose determination changes.
    pub determinations: Vec<OccurrenceUpdate>,
    /// `tally.job_image` rows to upsert, by `(job, image)`.
    pub job_images: HashMap<(i64, i64), JobImage>,
    /// Job log lines to write.
    pub job_logs: Vec<JobLogLine>,
    /// Jobs whose image set changed (their progress is due).
    pub progress_jobs: Vec<i64>,
    /// Rows the plan inserts or changes (`taxa` is left to the write, which knows which of
    /// [`Plan::taxa`] a concurrent insert created first).
    pub rows: RowCounts,
}

/// The ids the write phase allocated for a plan's new rows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ids {
    /// Of [`Plan::detections`], in order.
    pub detections: Vec<i64>,
    /// Of [`Plan::occurrences`], in order.
    pub occurrences: Vec<i64>,
    /// Of [`Plan::taxa`], in order.
    pub taxa: Vec<i64>,
}

impl Ids {
    /// The id of a taxon or of a [`new_taxon`] placeholder.
    pub fn taxon(&self, taxon: i64) -> i64 {
        if taxon < 0 {
            self.taxa[(-1 - taxon) as usize]
        } else {
            taxon
        }
    }

    /// The id of a detection.
    pub fn detection(&self, d: DetRef) -> i64 {
        match d {
            DetRef::Old(id) => id,
            DetRef::New(n) => self.detections[n],
        }
    }
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
enum OccRef {
    Old(i64),
    New(usize),
}

/// Items in order of first appearance, each once.
pub(crate) fn distinct<T: Eq + std::hash::Hash + Clone>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

/// The plan of saving `messages` (each decoded and validated) given what `snapshot` read.
pub fn plan(snapshot: &Snapshot, messages: &[&ResultMessage]) -> Plan {
    let mut plan = Plan { inserted: vec![0; messages.len()], ..Plan::default() };
    let mut accepted: Vec<usize> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match check(m, &snapshot.pipelines, &snapshot.images) {
            Ok(()) => accepted.push(i),
            Err(r) => plan.rejected.push((i, r)),
        }
    }
    let responses: Vec<(usize, &crate::ingest::decode::PipelineResults)> = accepted
        .iter()
        .filter_map(|&i| match &messages[i].body {
            ResultBody::Response(r) => Some((i, r)),
            ResultBody::Error { .. } => None,
        })
        .collect();
    let taxa = plan_taxa(snapshot, &responses, &mut plan);
    let mut rows = Rows::new(snapshot);
    for (i, r) in &responses {
        rows.response(snapshot, &taxa, r, &mut plan.inserted[*i]);
    }
    plan.determinations = rows.redetermine(snapshot);
    rows.finish(&mut plan);
    plan_job_images(snapshot, messages, &accepted, &mut plan);
    plan
}

/// The taxon of every label of the responses: a found one, else a [`new_taxon`] added to
/// [`Plan::taxa`].
fn plan_taxa(
    snapshot: &Snapshot,
    responses: &[(usize, &crate::ingest::decode::PipelineResults)],
    plan: &mut Plan,
) -> HashMap<String, i64> {
    let labels = distinct(
        responses
            .iter()
            .flat_map(|(_, r)| r.detections.iter().flat_map(|d| d.classifications.iter().map(|c| &c.label))),
    );
    let mut taxa = HashMap::with_capacity(labels.len());
    for label in labels {
        let id = match snapshot.taxa.get(label) {
            Some(id) => *id,
            None => {
                plan.taxa.push(label.clone());
                new_taxon(plan.taxa.len() - 1)
            }
        };
        taxa.insert(label.clone(), id);
    }
    taxa
}

/// The rows of the responses as they are planned (rules 3–6).
struct Rows<'s> {
    keys: HashMap<DetKey, DetRef>,
    old: HashMap<i64, &'s StoredDetection>,
    old_classifications: HashSet<(i64, i64, i64, u64)>,
    planned_classifications: HashSet<(DetRef, i64, i64, u64)>,
    detections: Vec<NewDetection>,
    occurrences: Vec<NewOccurrence>,
    candidates: Vec<Vec<Candidate>>,
    classifications: Vec<NewClassification>,
    attach: HashMap<i64, usize>,
    attach_order: Vec<i64>,
    fill_path: HashMap<i64, String>,
    touched: HashSet<i64>,
}

impl<'s> Rows<'s> {
    fn new(snapshot: &'s Snapshot) -> Self {
        let mut keys = HashMap::new();
        let mut old = HashMap::new();
        for d in &snapshot.detections {
            let key = match (d.valid, d.bbox) {
                (false, _) => d.algorithm.map(|a| DetKey::Null(d.image, a)),
                (true, b) => b.map(|b| box_key(d.image, b)),
            };
            if let Some(key) = key {
                keys.entry(key).or_insert(DetRef::Old(d.id));
            }
            old.insert(d.id, d);
        }
        let mut old_classifications = HashSet::new();
        for (detection, candidates) in &snapshot.classifications {
            for c in candidates {
                if let (Some(t), Some(a), Some(s)) = (c.taxon, c.algorithm, c.score) {
                    old_classifications.insert((*detection, t, a, s.to_bits()));
                }
            }
        }
        Rows {
            keys,
            old,
            old_classifications,
            planned_classifications: HashSet::new(),
            detections: Vec::new(),
            occurrences: Vec::new(),
            candidates: Vec::new(),
            classifications: Vec::new(),
            attach: HashMap::new(),
            attach_order: Vec::new(),
            fill_path: HashMap::new(),
            touched: HashSet::new(),
        }
    }

    fn new_occurrence(&mut self, snapshot: &Snapshot, image: i64, candidates: Vec<Candidate>) -> usize {
        let owner = snapshot.images.get(&image);
        let id = |f: fn(&Image) -> Option<Id>| owner.and_then(f);
        self.occurrences.push(NewOccurrence {
            image,
            event: id(|i| i.event),
            deployment: id(|i| i.deployment),
            project: id(|i| i.project),
            determination: None,
        });
        self.candidates.push(candidates);
        self.occurrences.len() - 1
    }

    fn new_detection(&mut self, d: NewDetection, inserted: &mut u64) -> DetRef {
        self.detections.push(d);
        *inserted += 1;
        DetRef::New(self.detections.len() - 1)
    }

    /// Rules 3, 4 and 6 for one response; `inserted` counts its new rows.
    fn response(
        &mut self,
        snapshot: &Snapshot,
        taxa: &HashMap<String, i64>,
        r: &crate::ingest::decode::PipelineResults,
        inserted: &mut u64,
    ) {
        let pipeline = &snapshot.pipelines[&r.pipeline];
        let mut seen_images: HashSet<i64> = HashSet::new();
        for d in &r.detections {
            seen_images.insert(d.image_id);
            let algorithm = pipeline.algorithms[&d.algorithm];
            let key = match d.bbox {
                Some(b) => box_key(d.image_id, b),
                None => DetKey::Null(d.image_id, algorithm.id),
            };
            let detection = match self.keys.get(&key) {
                Some(found) => *found,
                None => {
                    // Rule 3: a null marker, even one the service sent, gets no occurrence.
                    let occurrence = d.bbox.map(|_| self.new_occurrence(snapshot, d.image_id, Vec::new()));
                    let new = NewDetection {
                        image: d.image_id,
                        bbox: d.bbox,
                        algorithm: algorithm.id,
                        time: d.timestamp.clone(),
                        path: d.crop_image_url.clone(),
                        occurrence,
                    };
                    let found = self.new_detection(new, inserted);
                    self.keys.insert(key, found);
                    found
                }
            };
            let occurrence = self.occurrence_of(snapshot, detection, d.crop_image_url.as_ref(), inserted);
            if let Some(OccRef::Old(occ)) = occurrence {
                self.touched.insert(occ);
            }
            for c in &d.classifications {
                self.classification(
                    pipeline.algorithms[&c.algorithm],
                    taxa[&c.label],
                    c,
                    d.image_id,
                    detection,
                    occurrence,
                    inserted,
                );
            }
        }
        // Rule 6: images that received no detection get the detector's null marker.
        let detector = pipeline.detectors[0];
        for &image in &r.source_images {
            if seen_images.insert(image) && !self.keys.contains_key(&DetKey::Null(image, detector)) {
                let new =
                    NewDetection { image, bbox: None, algorithm: detector, time: None, path: None, occurrence: None };
                let found = self.new_detection(new, inserted);
                self.keys.insert(DetKey::Null(image, detector), found);
            }
        }
    }

    /// The occurrence of a detection: its new one, its stored one, or (a stored valid
    /// detection without one) a new one, planned once.
    fn occurrence_of(
        &mut self,
        snapshot: &Snapshot,
        detection: DetRef,
        crop: Option<&String>,
        inserted: &mut u64,
    ) -> Option<OccRef> {
        let id = match detection {
            DetRef::New(n) => return self.detections[n].occurrence.map(OccRef::New),
            DetRef::Old(id) => id,
        };
        let o = self.old[&id];
        if let (true, Some(url)) = (o.empty_path, crop) {
            self.fill_path.entry(id).or_insert_with(|| url.clone());
        }
        match (o.occurrence, o.valid) {
            (Some(occ), _) => Some(OccRef::Old(occ)),
            (None, true) => {
                if let Some(n) = self.attach.get(&id) {
                    return Some(OccRef::New(*n));
                }
                let candidates = snapshot.classifications.get(&id).cloned().unwrap_or_default();
                let n = self.new_occurrence(snapshot, o.image, candidates);
                self.attach.insert(id, n);
                self.attach_order.push(id);
                *inserted += 1;
                Some(OccRef::New(n))
            }
            (None, false) => None,
        }
    }

    /// Rule 4 for one classification sent under `detection`.
    #[allow(clippy::too_many_arguments)]
    fn classification(
        &mut self,
        algorithm: Algorithm,
        taxon: i64,
        c: &crate::ingest::decode::ClassificationResult,
        image: i64,
        detection: DetRef,
        occurrence: Option<OccRef>,
        inserted: &mut u64,
    ) {
        let score = c.score();
        let bits = score.to_bits();
        let exists = match detection {
            DetRef::Old(id) => self.old_classifications.contains(&(id, taxon, algorithm.id, bits)),
            DetRef::New(_) => false,
        };
        if exists || !self.planned_classifications.insert((detection, taxon, algorithm.id, bits)) {
            return;
        }
        let order = i64::MAX / 2 + self.classifications.len() as i64;
        if let Some(OccRef::New(n)) = occurrence {
            self.candidates[n].push(Candidate {
                order,
                taxon: Some(taxon),
                algorithm: Some(algorithm.id),
                score: Some(score),
                terminal: c.terminal,
            });
        }
        self.classifications.push(NewClassification {
            detection,
            taxon,
            algorithm,
            score,
            scores: c.scores.clone(),
            logits: c.logits.clone(),
            terminal: c.terminal,
            time: c.timestamp.clone(),
            image,
        });
        *inserted += 1;
    }

    /// Rule 5 for the stored occurrences of reused detections: their stored state and every
    /// classification of their detections, stored and new.
    fn redetermine(&self, snapshot: &Snapshot) -> Vec<OccurrenceUpdate> {
        let mut added: HashMap<i64, Vec<Candidate>> = HashMap::new();
        for (n, c) in self.classifications.iter().enumerate() {
            let DetRef::Old(det) = c.detection else { continue };
            let Some(occ) = self.old.get(&det).and_then(|d| d.occurrence) else { continue };
            added.entry(occ).or_default().push(Candidate {
                order: i64::MAX / 2 + n as i64,
                taxon: Some(c.taxon),
                algorithm: Some(c.algorithm.id),
                score: Some(c.score),
                terminal: c.terminal,
            });
        }
        let mut updates = Vec::new();
        for id in &self.touched {
            let Some(stored) = snapshot.occurrences.get(id) else { continue };
            let mut candidates = stored.candidates.clone();
            candidates.extend(added.remove(id).unwrap_or_default());
            let current = stored.row.determination;
            let Some(d) = determine(current, stored.human, &candidates) else { continue };
            let mut row = stored.row.clone();
            row.determination = d.taxon;
            if let Some(s) = d.score {
                row.score = Some(Score::new(s));
            }
            updates.push(OccurrenceUpdate { id: *id, taxon: d.taxon, score: d.score, row });
        }
        updates
    }

    /// Determines the new occurrences and moves the rows into `plan`.
    fn finish(mut self, plan: &mut Plan) {
        for (o, candidates) in self.occurrences.iter_mut().zip(&self.candidates) {
            o.determination = determine(None, None, candidates).map(|d| (d.taxon, d.score));
        }
        plan.rows = RowCounts {
            detections: self.detections.iter().filter(|d| d.bbox.is_some()).count() as u64,
            null_markers: self.detections.iter().filter(|d| d.bbox.is_none()).count() as u64,
            classifications: self.classifications.len() as u64,
            occurrences: self.occurrences.len() as u64,
            taxa: 0,
            determinations: (plan.determinations.len()
                + self.occurrences.iter().filter(|o| o.determination.is_some()).count())
                as u64,
        };
        plan.attach = self.attach_order.iter().map(|id| (*id, self.attach[id])).collect();
        let mut fill: Vec<(i64, String)> = self.fill_path.into_iter().collect();
        fill.sort_unstable();
        plan.fill_path = fill;
        plan.detections = self.detections;
        plan.occurrences = self.occurrences;
        plan.classifications = self.classifications;
    }
}

/// The job image set (SPEC §5) and the lines for results of closed jobs.
fn plan_job_images(snapshot: &Snapshot, messages: &[&ResultMessage], accepted: &[usize], plan: &mut Plan) {
    let mut per_image: HashMap<i64, (u64, u64)> = HashMap::new();
    for d in plan.detections.iter().filter(|d| d.bbox.is_some()) {
        per_image.entry(d.image).or_default().0 += 1;
    }
    for c in &plan.classifications {
        per_image.entry(c.image).or_default().1 += 1;
    }
    for &i in accepted {
        let m = messages[i];
        match snapshot.jobs.get(&m.job_id) {
            Some(status) if CLOSED_STATUSES.contains(&status.as_str()) => {
                plan.job_logs.push(JobLogLine {
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
            let e = plan.job_images.entry((m.job_id, image)).or_insert_with(|| JobImage {
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
    plan.progress_jobs = distinct(plan.job_images.keys().map(|(job, _)| *job));
}

impl Plan {
    /// The dataflow input of the batch once `ids` are allocated: the snapshot's read-through
    /// copies, the changed determinations, the new occurrences and detections, and the stored
    /// detections given an occurrence.
    pub fn input(&self, snapshot: &Snapshot, ids: &Ids) -> InputBatch {
        let mut input = snapshot.input.clone();
        let taxon = |t: Option<i64>| t.map(|t| ids.taxon(t));
        for u in &self.determinations {
            let row = Occurrence { determination: taxon(u.taxon), ..u.row.clone() };
            input.occurrences.push((u.id, Some(row)));
        }
        for (o, id) in self.occurrences.iter().zip(&ids.occurrences) {
            let row = Occurrence {
                event: o.event,
                deployment: o.deployment,
                determination: taxon(o.determination.and_then(|d| d.0)),
                score: o.determination.and_then(|d| d.1).map(Score::new),
            };
            input.occurrences.push((*id, Some(row)));
        }
        for (d, id) in self.detections.iter().zip(&ids.detections) {
            let occurrence = d.occurrence.map(|n| ids.occurrences[n]);
            input.detections.push((*id, Some(Detection { image: d.image, occurrence, valid: d.bbox.is_some() })));
        }
        let images: HashMap<i64, i64> = snapshot.detections.iter().map(|d| (d.id, d.image)).collect();
        for (id, n) in &self.attach {
            let occurrence = Some(ids.occurrences[*n]);
            input.detections.push((*id, Some(Detection { image: images[id], occurrence, valid: true })));
        }
        input
    }
}

/// Rules 1 and 2 for one message.
pub(crate) fn check(
    m: &ResultMessage,
    pipelines: &HashMap<String, Pipeline>,
    images: &HashMap<i64, Image>,
) -> Result<(), Rejection> {
    for id in m.image_ids() {
        if !images.contains_key(&id) {
            return Err(Rejection::new(RejectReason::UnknownImage, format!("image {id} is not in main_sourceimage")));
        }
    }
    let ResultBody::Response(r) = &m.body else { return Ok(()) };
    let Some(p) = pipelines.get(&r.pipeline) else {
        return Err(Rejection::new(
            RejectReason::UnknownPipeline,
            format!("pipeline {:?} is not in ml_pipeline", r.pipeline),
        ));
    };
    if p.detectors.len() != 1 {
        return Err(Rejection::new(
            RejectReason::PipelineNotConfigured,
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
                RejectReason::PipelineNotConfigured,
                format!("algorithm {key:?} is not linked to pipeline {:?}", r.pipeline),
            ));
        }
    }
    Ok(())
}
