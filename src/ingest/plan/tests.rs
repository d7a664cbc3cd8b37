//! The plan of a batch save against hand-built snapshots, without Postgres: new and reused
//! rows (rules 3, 4, 6, 8), rejections (rules 1, 2), determinations (rule 5), new taxa, job
//! images and log lines, and the dataflow input once ids are known.

use super::*;
use crate::ingest::decode::{ClassificationResult, DetectionResult, PipelineResults};
use crate::ingest::determination::Identification;

const PIPELINE: &str = "moths_2024";
const DETECTOR: i64 = 10;
const CLASSIFIER: i64 = 11;
const CATEGORY_MAP: i64 = 7;
const JOB: i64 = 42;
const IMAGE: i64 = 100;
const OTHER_IMAGE: i64 = 101;
const MOTH: i64 = 500;
const BUTTERFLY: i64 = 501;

fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    let algorithms = [
        ("detector".to_string(), Algorithm { id: DETECTOR, category_map: None }),
        ("classifier".to_string(), Algorithm { id: CLASSIFIER, category_map: Some(CATEGORY_MAP) }),
    ];
    s.pipelines.insert(PIPELINE.into(), Pipeline { algorithms: algorithms.into(), detectors: vec![DETECTOR] });
    for image in [IMAGE, OTHER_IMAGE] {
        let row = Image { event: Some(1), deployment: Some(2), project: Some(3), timestamp: None, size: None };
        s.images.insert(image, row);
    }
    s.jobs.insert(JOB, "STARTED".into());
    s.taxa.insert("moth".into(), MOTH);
    s.taxa.insert("butterfly".into(), BUTTERFLY);
    s
}

fn classification(label: &str, scores: Vec<f64>) -> ClassificationResult {
    ClassificationResult {
        label: label.into(),
        scores,
        logits: None,
        algorithm: "classifier".into(),
        terminal: true,
        timestamp: None,
    }
}

fn detection(image: i64, bbox: Option<[f64; 4]>, classifications: Vec<ClassificationResult>) -> DetectionResult {
    DetectionResult {
        image_id: image,
        bbox,
        algorithm: "detector".into(),
        timestamp: None,
        crop_image_url: Some(format!("https://crops/{image}.jpg")),
        classifications,
    }
}

fn response(source_images: Vec<i64>, detections: Vec<DetectionResult>) -> ResultMessage {
    ResultMessage {
        job_id: JOB,
        reply_subject: "$JS.ACK.job_42.job-42-consumer.1.1.1.1.0".into(),
        body: ResultBody::Response(PipelineResults { pipeline: PIPELINE.into(), source_images, detections }),
    }
}

const BOX: [f64; 4] = [10.0, 20.0, 110.0, 220.0];

/// The snapshot a later batch reads once `plan` (made from `s`) is written: its rows stored,
/// with ids 1000+ (detections), 2000+ (occurrences), 3000+ (taxa), 4000+ (classifications).
fn stored(s: &Snapshot, plan: &Plan) -> Snapshot {
    let mut s = s.clone();
    let ids = ids(plan);
    for (label, id) in plan.taxa.iter().zip(&ids.taxa) {
        s.taxa.insert(label.clone(), *id);
    }
    for (d, id) in plan.detections.iter().zip(&ids.detections) {
        s.detections.push(StoredDetection {
            id: *id,
            image: d.image,
            valid: d.bbox.is_some(),
            bbox: d.bbox,
            algorithm: Some(d.algorithm),
            occurrence: d.occurrence.map(|n| ids.occurrences[n]),
            empty_path: d.path.is_none(),
        });
    }
    for (o, id) in plan.occurrences.iter().zip(&ids.occurrences) {
        let row = Occurrence {
            event: o.event,
            deployment: o.deployment,
            determination: o.determination.and_then(|d| d.0).map(|t| ids.taxon(t)),
            score: o.determination.and_then(|d| d.1).map(Score::new),
        };
        s.occurrences.insert(*id, StoredOccurrence { row, candidates: Vec::new(), human: None });
    }
    for (n, c) in plan.classifications.iter().enumerate() {
        let detection = ids.detection(c.detection);
        let candidate = Candidate {
            order: 4000 + n as i64,
            taxon: Some(ids.taxon(c.taxon)),
            algorithm: Some(c.algorithm.id),
            score: Some(c.score),
            terminal: c.terminal,
        };
        s.classifications.entry(detection).or_default().push(candidate);
        let occurrence = s.detections.iter().find(|d| d.id == detection).and_then(|d| d.occurrence);
        if let Some(o) = occurrence.and_then(|o| s.occurrences.get_mut(&o)) {
            o.candidates.push(candidate);
        }
    }
    s
}

fn ids(plan: &Plan) -> Ids {
    Ids {
        detections: (0..plan.detections.len() as i64).map(|n| 1000 + n).collect(),
        occurrences: (0..plan.occurrences.len() as i64).map(|n| 2000 + n).collect(),
        taxa: (0..plan.taxa.len() as i64).map(|n| 3000 + n).collect(),
    }
}

fn nothing_written(plan: &Plan) -> bool {
    plan.taxa.is_empty()
        && plan.detections.is_empty()
        && plan.occurrences.is_empty()
        && plan.classifications.is_empty()
        && plan.attach.is_empty()
        && plan.fill_path.is_empty()
        && plan.determinations.is_empty()
        && plan.rows == RowCounts::default()
}

#[test]
fn a_new_detection_gets_an_occurrence_a_classification_and_a_determination() {
    let s = snapshot();
    let m = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("moth", vec![0.1, 0.9])])]);
    let plan = plan(&s, &[&m]);

    assert!(plan.rejected.is_empty());
    assert_eq!(plan.inserted, vec![2], "a detection and a classification (its occurrence is not counted)");
    assert_eq!(
        plan.detections,
        vec![NewDetection {
            image: IMAGE,
            bbox: Some(BOX),
            algorithm: DETECTOR,
            time: None,
            path: Some("https://crops/100.jpg".into()),
            occurrence: Some(0),
        }]
    );
    assert_eq!(
        plan.occurrences,
        vec![NewOccurrence {
            image: IMAGE,
            event: Some(1),
            deployment: Some(2),
            project: Some(3),
            determination: Some((Some(MOTH), Some(0.9))),
        }]
    );
    let c = &plan.classifications[..];
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].detection, c[0].taxon, c[0].score), (DetRef::New(0), MOTH, 0.9));
    assert_eq!(c[0].algorithm, Algorithm { id: CLASSIFIER, category_map: Some(CATEGORY_MAP) });
    assert_eq!(
        plan.rows,
        RowCounts { detections: 1, null_markers: 0, classifications: 1, occurrences: 1, taxa: 0, determinations: 1 }
    );
    assert_eq!(
        plan.job_images,
        HashMap::from([((JOB, IMAGE), JobImage { failed: false, error: None, detections: 1, classifications: 1 })])
    );
    assert_eq!(plan.progress_jobs, vec![JOB]);
    assert!(plan.job_logs.is_empty());

    let input = plan.input(&s, &ids(&plan));
    assert_eq!(input.detections, vec![(1000, Some(Detection { image: IMAGE, occurrence: Some(2000), valid: true }))]);
    let occurrence =
        Occurrence { event: Some(1), deployment: Some(2), determination: Some(MOTH), score: Some(Score::new(0.9)) };
    assert_eq!(input.occurrences, vec![(2000, Some(occurrence))]);
}

#[test]
fn a_replay_of_the_same_result_reuses_every_row() {
    let s = snapshot();
    let m = response(
        vec![IMAGE, OTHER_IMAGE],
        vec![
            detection(IMAGE, Some(BOX), vec![classification("moth", vec![0.1, 0.9])]),
            detection(IMAGE, Some([0.0, 0.0, 5.0, 5.0]), vec![classification("unheard of", vec![0.4])]),
        ],
    );
    let first = plan(&s, &[&m]);
    assert_eq!(first.inserted, vec![5], "two detections, two classifications and a null marker");

    let again = plan(&stored(&s, &first), &[&m]);
    assert_eq!(again.inserted, vec![0]);
    assert!(nothing_written(&again), "{again:#?}");
    // The image set is still upserted (a no-op in SQL) and progress is still due.
    assert_eq!(again.progress_jobs, vec![JOB]);
    assert_eq!(again.job_images[&(JOB, IMAGE)], JobImage::default());
    assert!(again.input(&s, &Ids::default()).detections.is_empty());

    // The same message twice in one batch: the second is a replay of the first.
    let both = plan(&s, &[&m, &m]);
    assert_eq!(both.inserted, vec![5, 0]);
    assert_eq!(both.detections.len(), first.detections.len());
}

#[test]
fn a_duplicate_box_inside_one_message_is_one_detection() {
    let s = snapshot();
    // 10 and 10.0 are the same JSON number, and so are 0 and -0.
    let m = response(
        vec![IMAGE],
        vec![
            detection(IMAGE, Some([0.0, 20.0, 110.0, 220.0]), vec![classification("moth", vec![0.9])]),
            detection(IMAGE, Some([-0.0, 20.0, 110.0, 220.0]), vec![classification("moth", vec![0.9])]),
            detection(IMAGE, Some([0.0, 20.0, 110.0, 220.0]), vec![classification("butterfly", vec![0.5])]),
        ],
    );
    let plan = plan(&s, &[&m]);
    assert_eq!(plan.detections.len(), 1);
    assert_eq!(plan.occurrences.len(), 1);
    let taxa: Vec<(DetRef, i64)> = plan.classifications.iter().map(|c| (c.detection, c.taxon)).collect();
    assert_eq!(taxa, vec![(DetRef::New(0), MOTH), (DetRef::New(0), BUTTERFLY)], "the repeated one is collapsed");
    assert_eq!(plan.inserted, vec![3]);
    assert_eq!(plan.occurrences[0].determination, Some((Some(MOTH), Some(0.9))));
}

#[test]
fn a_null_marker_gets_no_occurrence_and_unseen_images_get_the_detectors() {
    let s = snapshot();
    let m = response(vec![IMAGE, OTHER_IMAGE], vec![detection(IMAGE, None, vec![])]);
    let plan = plan(&s, &[&m]);
    let markers: Vec<(i64, i64)> = plan.detections.iter().map(|d| (d.image, d.algorithm)).collect();
    assert_eq!(markers, vec![(IMAGE, DETECTOR), (OTHER_IMAGE, DETECTOR)]);
    assert!(plan.detections.iter().all(|d| d.bbox.is_none() && d.occurrence.is_none()));
    assert!(plan.occurrences.is_empty());
    assert_eq!(plan.rows.null_markers, 2);
    assert_eq!(plan.rows.detections, 0);
    assert_eq!(plan.inserted, vec![2]);
    let input = plan.input(&s, &ids(&plan));
    assert!(input.detections.iter().all(|(_, d)| d.as_ref().is_some_and(|d| !d.valid && d.occurrence.is_none())));

    // A stored null marker is reused.
    let again = super::plan(&stored(&s, &plan), &[&m]);
    assert!(nothing_written(&again), "{again:#?}");
}

#[test]
fn unknown_pipeline_foreign_algorithm_and_unknown_image_are_rejected_alone() {
    let s = snapshot();
    let good = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("moth", vec![0.9])])]);
    let mut unknown_pipeline = good.clone();
    if let ResultBody::Response(r) = &mut unknown_pipeline.body {
        r.pipeline = "nope".into();
    }
    let mut foreign_algorithm = good.clone();
    if let ResultBody::Response(r) = &mut foreign_algorithm.body {
        r.detections[0].classifications[0].algorithm = "not_on_the_pipeline".into();
    }
    let unknown_image = response(vec![999], vec![]);
    let failed_unknown_image =
        ResultMessage { body: ResultBody::Error { error: "boom".into(), image_id: Some(998) }, ..good.clone() };

    let messages = [&unknown_pipeline, &good, &foreign_algorithm, &unknown_image, &failed_unknown_image];
    let plan = plan(&s, &messages);
    let rejected: Vec<(usize, RejectReason)> = plan.rejected.iter().map(|(i, r)| (*i, r.code)).collect();
    assert_eq!(
        rejected,
        vec![
            (0, RejectReason::UnknownPipeline),
            (2, RejectReason::PipelineNotConfigured),
            (3, RejectReason::UnknownImage),
            (4, RejectReason::UnknownImage),
        ]
    );
    assert!(plan.rejected[1].1.detail.contains("not_on_the_pipeline"), "{}", plan.rejected[1].1);
    assert_eq!(plan.inserted, vec![0, 2, 0, 0, 0]);
    assert_eq!(plan.detections.len(), 1);
    assert_eq!(plan.job_images.keys().collect::<Vec<_>>(), vec![&(JOB, IMAGE)]);

    // A pipeline without exactly one detector is not configured.
    let mut two_detectors = snapshot();
    two_detectors.pipelines.get_mut(PIPELINE).expect("pipeline").detectors.push(CLASSIFIER);
    let plan = super::plan(&two_detectors, &[&good]);
    assert_eq!(plan.rejected[0].1.code, RejectReason::PipelineNotConfigured);
    assert!(nothing_written(&plan));
}

#[test]
fn a_better_classification_of_a_stored_detection_changes_its_determination() {
    let s = snapshot();
    let first = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("moth", vec![0.5])])]);
    let before = stored(&s, &plan(&s, &[&first]));
    let better = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("butterfly", vec![0.8])])]);
    let plan = plan(&before, &[&better]);

    assert!(plan.detections.is_empty() && plan.occurrences.is_empty());
    assert_eq!(plan.classifications.len(), 1);
    assert_eq!(plan.classifications[0].detection, DetRef::Old(1000));
    assert_eq!(plan.determinations.len(), 1);
    let u = &plan.determinations[0];
    assert_eq!((u.id, u.taxon, u.score), (2000, Some(BUTTERFLY), Some(0.8)));
    assert_eq!(plan.rows.determinations, 1);
    assert_eq!(plan.inserted, vec![1]);
    let input = plan.input(&before, &Ids::default());
    let row = Occurrence {
        event: Some(1),
        deployment: Some(2),
        determination: Some(BUTTERFLY),
        score: Some(Score::new(0.8)),
    };
    assert_eq!(input.occurrences, vec![(2000, Some(row))]);

    // A worse one changes nothing; a human identification overrides the machine.
    let worse = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("butterfly", vec![0.2])])]);
    assert!(super::plan(&before, &[&worse]).determinations.is_empty());
    let mut identified = before.clone();
    identified.occurrences.get_mut(&2000).expect("occurrence").human = Some(Identification { taxon: Some(MOTH) });
    assert!(super::plan(&identified, &[&better]).determinations.is_empty());
}

#[test]
fn an_unknown_label_creates_a_taxon_referred_to_by_placeholder() {
    let s = snapshot();
    let m = response(
        vec![IMAGE],
        vec![
            detection(IMAGE, Some(BOX), vec![classification("Unknown moth sp.", vec![0.7])]),
            detection(IMAGE, Some([1.0, 1.0, 2.0, 2.0]), vec![classification("Unknown moth sp.", vec![0.6])]),
        ],
    );
    let plan = plan(&s, &[&m]);
    assert_eq!(plan.taxa, vec!["Unknown moth sp.".to_string()], "one taxon per distinct label");
    assert!(plan.classifications.iter().all(|c| c.taxon == new_taxon(0)));
    assert_eq!(plan.occurrences[0].determination, Some((Some(new_taxon(0)), Some(0.7))));
    assert_eq!(plan.inserted, vec![4], "taxa are not counted per message");

    let ids = Ids { taxa: vec![777], ..ids(&plan) };
    assert_eq!(ids.taxon(new_taxon(0)), 777);
    assert_eq!(ids.taxon(MOTH), MOTH);
    let input = plan.input(&s, &ids);
    assert!(input.occurrences.iter().all(|(_, o)| o.as_ref().is_some_and(|o| o.determination == Some(777))));
}

#[test]
fn a_real_size_score_vector_is_planned_and_replayed() {
    // The real pipelines classify into 29,176 taxa: one score per taxon.
    let mut scores: Vec<f64> = (0..29_176).map(|i| (i % 1000) as f64 / 100_000.0).collect();
    scores[12_345] = 0.875;
    let s = snapshot();
    let m = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("moth", scores.clone())])]);
    let plan = plan(&s, &[&m]);
    assert_eq!(plan.classifications.len(), 1);
    assert_eq!(plan.classifications[0].scores.len(), 29_176);
    assert_eq!(plan.classifications[0].score, 0.875);
    assert_eq!(plan.occurrences[0].determination, Some((Some(MOTH), Some(0.875))));
    let again = super::plan(&stored(&s, &plan), &[&m]);
    assert!(nothing_written(&again));
}

#[test]
fn results_of_closed_jobs_are_saved_without_progress_and_logged() {
    let mut s = snapshot();
    s.jobs.insert(JOB, CLOSED_STATUSES[0].into());
    let m = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![])]);
    let plan = plan(&s, &[&m]);
    assert_eq!(plan.detections.len(), 1, "saved");
    assert!(plan.job_images.is_empty() && plan.progress_jobs.is_empty(), "progress untouched");
    assert_eq!(plan.job_logs.len(), 1);
    assert_eq!((plan.job_logs[0].job_id, plan.job_logs[0].level), (JOB, Level::Warning));
}

#[test]
fn an_error_result_marks_its_image_failed_and_writes_no_rows() {
    let s = snapshot();
    let m = ResultMessage {
        body: ResultBody::Error { error: "CUDA out of memory".into(), image_id: Some(IMAGE) },
        ..response(vec![], vec![])
    };
    let plan = plan(&s, &[&m]);
    assert!(nothing_written(&plan));
    assert_eq!(
        plan.job_images,
        HashMap::from([(
            (JOB, IMAGE),
            JobImage { failed: true, error: Some("CUDA out of memory".into()), detections: 0, classifications: 0 }
        )])
    );
}

#[test]
fn a_replay_fills_an_empty_crop_path_and_gives_a_stored_detection_its_missing_occurrence() {
    let mut s = snapshot();
    s.detections.push(StoredDetection {
        id: 9,
        image: IMAGE,
        valid: true,
        bbox: Some(BOX),
        algorithm: Some(DETECTOR),
        occurrence: None,
        empty_path: true,
    });
    let m = response(vec![IMAGE], vec![detection(IMAGE, Some(BOX), vec![classification("moth", vec![0.9])])]);
    let plan = plan(&s, &[&m]);
    assert!(plan.detections.is_empty());
    assert_eq!(plan.attach, vec![(9, 0)]);
    assert_eq!(plan.fill_path, vec![(9, "https://crops/100.jpg".to_string())]);
    assert_eq!(plan.classifications[0].detection, DetRef::Old(9));
    assert_eq!(plan.occurrences[0].determination, Some((Some(MOTH), Some(0.9))));
    assert_eq!(plan.inserted, vec![2], "the occurrence and the classification");
    let input = plan.input(&s, &ids(&plan));
    assert_eq!(input.detections, vec![(9, Some(Detection { image: IMAGE, occurrence: Some(2000), valid: true }))]);
}
