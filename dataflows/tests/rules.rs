//! One hand-computed test per count rule and quirk of SPEC §2, each also checked against the oracle.

use tally_dataflows::oracle::recompute;
use tally_dataflows::{
    AllCounts, CountChanges, Deployment, DeploymentCounts, Detection, Engine, Event, EventCounts, FilterTaxon, Id,
    Image, ImageCounts, InputBatch, Micros, Occurrence, Project, Score, Tables, Taxon,
};

// The taxonomy every test loads: root → family → genus → species, two branches.
const ROOT: Id = 1;
const FAMILY_A: Id = 10;
const FAMILY_B: Id = 11;
const GENUS_A: Id = 20;
const GENUS_B: Id = 21;
const SPECIES_A1: Id = 30;
const SPECIES_A2: Id = 31;
const SPECIES_B: Id = 32;
const TAXONOMY: &[(Id, &[Id])] = &[
    (ROOT, &[]),
    (FAMILY_A, &[ROOT]),
    (FAMILY_B, &[ROOT]),
    (GENUS_A, &[ROOT, FAMILY_A]),
    (GENUS_B, &[ROOT, FAMILY_B]),
    (SPECIES_A1, &[ROOT, FAMILY_A, GENUS_A]),
    (SPECIES_A2, &[ROOT, FAMILY_A, GENUS_A]),
    (SPECIES_B, &[ROOT, FAMILY_B, GENUS_B]),
];

/// An [`InputBatch`] built row by row.
#[derive(Clone, Debug, Default)]
struct Batch(InputBatch);

fn batch() -> Batch {
    Batch::default()
}

impl Batch {
    fn taxonomy(mut self) -> Self {
        for (id, ancestors) in TAXONOMY {
            self = self.taxon(*id, ancestors);
        }
        self
    }

    fn taxon(mut self, id: Id, ancestors: &[Id]) -> Self {
        self.0.taxa.push((id, Some(Taxon { ancestors: ancestors.to_vec() })));
        self
    }

    fn delete_taxon(mut self, id: Id) -> Self {
        self.0.taxa.push((id, None));
        self
    }

    fn project(mut self, id: Id, threshold: f64) -> Self {
        self.0.projects.push((id, Some(Project { threshold: Score::new(threshold) })));
        self
    }

    fn include(mut self, row: Id, project: Id, taxon: Id) -> Self {
        self.0.include_taxa.push((row, Some(FilterTaxon { project, taxon })));
        self
    }

    fn delete_include(mut self, row: Id) -> Self {
        self.0.include_taxa.push((row, None));
        self
    }

    fn exclude(mut self, row: Id, project: Id, taxon: Id) -> Self {
        self.0.exclude_taxa.push((row, Some(FilterTaxon { project, taxon })));
        self
    }

    fn delete_exclude(mut self, row: Id) -> Self {
        self.0.exclude_taxa.push((row, None));
        self
    }

    fn deployment(mut self, id: Id, project: Option<Id>) -> Self {
        self.0.deployments.push((id, Some(Deployment { project })));
        self
    }

    fn delete_deployment(mut self, id: Id) -> Self {
        self.0.deployments.push((id, None));
        self
    }

    fn event(mut self, id: Id, deployment: Option<Id>, project: Option<Id>) -> Self {
        self.0.events.push((id, Some(Event { deployment, project })));
        self
    }

    fn delete_event(mut self, id: Id) -> Self {
        self.0.events.push((id, None));
        self
    }

    /// An image without timestamp or size.
    fn image(self, id: Id, event: Option<Id>, deployment: Option<Id>, project: Option<Id>) -> Self {
        self.image_row(id, Image { event, deployment, project, timestamp: None, size: None })
    }

    fn image_row(mut self, id: Id, image: Image) -> Self {
        self.0.images.push((id, Some(image)));
        self
    }

    fn delete_image(mut self, id: Id) -> Self {
        self.0.images.push((id, None));
        self
    }

    /// A valid detection (`bbox IS NOT NULL`).
    fn detection(mut self, id: Id, image: Id, occurrence: Option<Id>) -> Self {
        self.0.detections.push((id, Some(Detection { image, occurrence, valid: true })));
        self
    }

    /// A "processed, nothing found" marker (`bbox IS NULL`).
    fn null_marker(mut self, id: Id, image: Id, occurrence: Option<Id>) -> Self {
        self.0.detections.push((id, Some(Detection { image, occurrence, valid: false })));
        self
    }

    fn delete_detection(mut self, id: Id) -> Self {
        self.0.detections.push((id, None));
        self
    }

    fn occurrence(
        mut self,
        id: Id,
        event: Option<Id>,
        deployment: Option<Id>,
        determination: Option<Id>,
        score: Option<f64>,
    ) -> Self {
        let score = score.map(Score::new);
        self.0.occurrences.push((id, Some(Occurrence { event, deployment, determination, score })));
        self
    }

    fn delete_occurrence(mut self, id: Id) -> Self {
        self.0.occurrences.push((id, None));
        self
    }
}

/// An engine plus the counts it has reported so far. Every batch is checked: the engine's
/// snapshot equals the oracle's recompute, the accumulated reports equal the snapshot, and
/// no owner is reported with the value it already had.
struct Db {
    engine: Engine,
    /// The rows applied so far: the oracle's input.
    tables: Tables,
    reported: AllCounts,
}

impl Db {
    fn new() -> Self {
        Db::with_workers(1)
    }

    fn with_workers(workers: usize) -> Self {
        Db {
            engine: Engine::new(workers).expect("engine starts"),
            tables: Tables::default(),
            reported: AllCounts::default(),
        }
    }

    fn apply(&mut self, batch: Batch) -> CountChanges {
        let changes = self.engine.apply(&batch.0).expect("batch applies");
        self.tables.apply(&batch.0);
        for (id, new) in &changes.images {
            assert_ne!(self.reported.images.get(id), new.as_ref(), "image {id} reported without a change");
        }
        for (id, new) in &changes.events {
            assert_ne!(self.reported.events.get(id), new.as_ref(), "event {id} reported without a change");
        }
        for (id, new) in &changes.deployments {
            assert_ne!(self.reported.deployments.get(id), new.as_ref(), "deployment {id} reported without a change");
        }
        changes.apply_to(&mut self.reported);
        let snapshot = self.engine.snapshot();
        assert_eq!(snapshot, recompute(&self.tables), "engine differs from the oracle");
        assert_eq!(self.reported, snapshot, "accumulated reported changes differ from the engine's snapshot");
        changes
    }

    fn image(&self, id: Id) -> i64 {
        self.engine.snapshot().images.get(&id).unwrap_or_else(|| panic!("image {id} has no counts")).detections
    }

    fn event(&self, id: Id) -> EventCounts {
        *self.engine.snapshot().events.get(&id).unwrap_or_else(|| panic!("event {id} has no counts"))
    }

    fn deployment(&self, id: Id) -> DeploymentCounts {
        *self.engine.snapshot().deployments.get(&id).unwrap_or_else(|| panic!("deployment {id} has no counts"))
    }
}

fn event_counts(captures: i64, detections: i64, occurrences: i64) -> EventCounts {
    EventCounts { captures, detections, occurrences, start: None, end: None }
}

/// The common scene: the taxonomy, project 1 (with `threshold`), deployment 1 (with
/// `project`), event 1 on deployment 1 and image 1 in both, neither with a project of its own.
fn scene(project: Option<Id>, threshold: f64) -> Batch {
    batch().taxonomy().project(1, threshold).deployment(1, project).event(1, Some(1), None).image(
        1,
        Some(1),
        Some(1),
        None,
    )
}

/// Occurrence `n` (from 1) of event 1 / deployment 1 with the given determination and score,
/// and valid detection `n` on image 1 pointing at it.
fn with_occurrences(mut b: Batch, occurrences: &[(Option<Id>, Option<f64>)]) -> Batch {
    for (n, (determination, score)) in occurrences.iter().enumerate() {
        let id = n as Id + 1;
        b = b.occurrence(id, Some(1), Some(1), *determination, *score).detection(id, 1, Some(id));
    }
    b
}

/// The scene under project 1 with the given filter and occurrences, applied.
fn filtered(threshold: f64, include: &[Id], exclude: &[Id], occurrences: &[(Option<Id>, Option<f64>)]) -> Db {
    let mut b = with_occurrences(scene(Some(1), threshold), occurrences);
    for (row, taxon) in include.iter().enumerate() {
        b = b.include(row as Id + 1, 1, *taxon);
    }
    for (row, taxon) in exclude.iter().enumerate() {
        b = b.exclude(row as Id + 1, 1, *taxon);
    }
    let mut db = Db::new();
    db.apply(b);
    db
}

/// Every occurrence of the scene has one detection on image 1, so each filtered count of
/// image 1, event 1 and deployment 1 is the number of passing occurrences.
fn assert_counted(db: &Db, n: i64, why: &str) {
    assert_eq!(db.image(1), n, "{why}: image 1 detections_count");
    let e = db.event(1);
    assert_eq!((e.detections, e.occurrences), (n, n), "{why}: event 1 (detections, occurrences)");
    let d = db.deployment(1);
    assert_eq!((d.detections, d.occurrences), (n, n), "{why}: deployment 1 (detections, occurrences)");
}

fn scored(taxon: Id, score: f64) -> (Option<Id>, Option<f64>) {
    (Some(taxon), Some(score))
}

// ---- Which project is P ----

#[test]
fn event_and_image_without_project_use_deployment_project() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .project(2, 0.0)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .occurrence(2, Some(1), Some(1), Some(SPECIES_A1), Some(0.2))
            .detection(1, 1, Some(1))
            .detection(2, 1, Some(2)),
    );
    // P = project 1 (threshold 0.5) everywhere: only occurrence 1 passes.
    assert_eq!(db.image(1), 1);
    assert_eq!(db.event(1), event_counts(1, 1, 1));
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 1, detections: 1, occurrences: 1, taxa: 1, ..Default::default() }
    );
}

#[test]
fn own_project_wins_over_deployment_project() {
    let mut db = Db::new();
    db.apply(
        batch()
            .taxonomy()
            .project(1, 0.5)
            .project(2, 0.0)
            .deployment(1, Some(1))
            .event(1, Some(1), Some(2))
            .image(1, Some(1), Some(1), Some(2))
            .image(2, Some(1), Some(1), None)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .occurrence(2, Some(1), Some(1), Some(SPECIES_A1), Some(0.2))
            .detection(1, 1, Some(1))
            .detection(2, 1, Some(2))
            .detection(3, 2, Some(2)),
    );
    // Image 1 and event 1 filter by project 2 (everything with a score passes); image 2 falls
    // back to the deployment's project 1, as does the deployment itself.
    assert_eq!(db.image(1), 2);
    assert_eq!(db.image(2), 0);
    assert_eq!(db.event(1), event_counts(2, 3, 2));
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 2, detections: 1, occurrences: 1, taxa: 1, ..Default::default() }
    );
}

/// `main_occurrence` carries no project of its own here: an occurrence counts toward its event
/// and its (different) deployment, and each owner filters it by the owner's own P.
#[test]
fn occurrence_is_filtered_by_each_owner_project() {
    let mut db = Db::new();
    db.apply(
        batch()
            .taxonomy()
            .project(1, 0.5)
            .project(2, 0.0)
            .deployment(1, Some(1))
            .deployment(2, Some(2))
            .event(1, Some(1), None)
            .image(1, Some(1), Some(1), None)
            .image(2, None, Some(2), None)
            .occurrence(1, Some(1), Some(2), Some(SPECIES_A1), Some(0.3))
            .detection(1, 1, Some(1))
            .detection(2, 2, Some(1)),
    );
    assert_eq!(db.image(1), 0, "image 1 filters by project 1");
    assert_eq!(db.image(2), 1, "image 2 filters by project 2");
    assert_eq!(db.event(1), event_counts(1, 0, 0));
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 1, ..Default::default() },
        "deployment 1 (project 1)"
    );
    assert_eq!(
        db.deployment(2),
        DeploymentCounts { captures: 1, detections: 1, occurrences: 1, taxa: 1, ..Default::default() },
        "deployment 2 (project 2)"
    );
}

#[test]
fn null_project_counts_everything() {
    let mut db = Db::new();
    db.apply(
        scene(None, 0.9)
            // A filter that would reject most of what follows, on a project nobody uses.
            .include(1, 1, FAMILY_A)
            .event(2, None, None)
            .occurrence(1, Some(1), Some(1), None, None)
            .occurrence(2, Some(1), Some(1), Some(SPECIES_B), Some(0.0))
            .occurrence(3, Some(1), Some(1), None, Some(0.1))
            .occurrence(4, Some(2), None, Some(SPECIES_A1), None)
            .detection(1, 1, Some(1))
            .detection(2, 1, Some(2))
            .detection(3, 1, None)
            .null_marker(4, 1, Some(3))
            .detection(5, 1, Some(4)),
    );
    // Every valid detection (1, 2, 3, 5), every occurrence; NULL score and determination count.
    assert_eq!(db.image(1), 4);
    assert_eq!(db.event(1), event_counts(1, 4, 3));
    assert_eq!(db.event(2), event_counts(0, 0, 1), "an event with neither project nor deployment");
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 1, detections: 4, occurrences: 3, taxa: 2, ..Default::default() },
        "taxa: NULL and SPECIES_B"
    );
}

/// A project id with no `main_project` row has a NULL threshold: `score >= NULL` never holds.
#[test]
fn project_without_row_passes_nothing() {
    let mut db = Db::new();
    db.apply(
        batch()
            .taxonomy()
            .deployment(1, Some(7))
            .event(1, Some(1), None)
            .image(1, Some(1), Some(1), None)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .detection(1, 1, Some(1)),
    );
    assert_counted(&db, 0, "project 7 has no row");
    db.apply(batch().project(7, 0.5));
    assert_counted(&db, 1, "project 7 created");
}

// ---- Score threshold ----

#[test]
fn score_equal_to_threshold_passes() {
    let db = filtered(0.5, &[], &[], &[scored(SPECIES_A1, 0.5)]);
    assert_counted(&db, 1, "0.5 >= 0.5");
}

#[test]
fn score_below_threshold_fails() {
    let db = filtered(0.5, &[], &[], &[scored(SPECIES_A1, 0.499_999_9), scored(SPECIES_A2, 0.0)]);
    assert_counted(&db, 0, "scores below 0.5");
}

#[test]
fn null_score_never_passes_when_project_set() {
    let db = filtered(0.0, &[], &[], &[(Some(SPECIES_A1), None), (None, None)]);
    assert_counted(&db, 0, "NULL scores under threshold 0");
    let db = filtered(f64::NEG_INFINITY, &[], &[], &[(Some(SPECIES_A1), None), scored(SPECIES_A2, f64::MIN)]);
    assert_counted(&db, 1, "only the non-NULL score passes -Infinity");
}

#[test]
fn nan_score_passes_any_non_nan_threshold() {
    for threshold in [0.5, 1.0, f64::MAX, f64::INFINITY] {
        let db = filtered(threshold, &[], &[], &[scored(SPECIES_A1, f64::NAN)]);
        assert_counted(&db, 1, &format!("NaN >= {threshold}"));
    }
}

#[test]
fn nan_threshold_passes_only_nan_scores() {
    let db = filtered(
        f64::NAN,
        &[],
        &[],
        &[scored(SPECIES_A1, f64::NAN), scored(SPECIES_A2, f64::INFINITY), scored(SPECIES_B, 1.0)],
    );
    assert_counted(&db, 1, "only NaN >= NaN");
}

#[test]
fn negative_zero_score_passes_zero_threshold() {
    let db = filtered(0.0, &[], &[], &[scored(SPECIES_A1, -0.0)]);
    assert_counted(&db, 1, "-0.0 >= 0.0");
    let db = filtered(-0.0, &[], &[], &[scored(SPECIES_A1, 0.0)]);
    assert_counted(&db, 1, "0.0 >= -0.0");
}

// ---- Include set ----

#[test]
fn include_counts_taxon_and_descendants() {
    let occurrences = [
        scored(GENUS_A, 0.9),
        scored(SPECIES_A1, 0.9),
        scored(SPECIES_A2, 0.9),
        scored(SPECIES_B, 0.9),
        scored(FAMILY_A, 0.9),
    ];
    let db = filtered(0.5, &[GENUS_A], &[], &occurrences);
    assert_counted(&db, 3, "include genus A: the genus and its two species");
    assert_eq!(db.deployment(1).taxa, 3);
    let db = filtered(0.5, &[FAMILY_A], &[], &occurrences);
    assert_counted(&db, 4, "include family A: family, genus and two species");
    assert_eq!(db.deployment(1).taxa, 4);
}

#[test]
fn include_species_does_not_count_its_genus() {
    let occurrences = [
        scored(SPECIES_A1, 0.9),
        scored(SPECIES_A2, 0.9),
        scored(GENUS_A, 0.9),
        scored(FAMILY_A, 0.9),
        scored(ROOT, 0.9),
    ];
    let db = filtered(0.5, &[SPECIES_A1], &[], &occurrences);
    assert_counted(&db, 1, "include species A1: nothing above or beside it");
    assert_eq!(db.deployment(1).taxa, 1);
}

#[test]
fn null_determination_fails_include_filter() {
    let db = filtered(0.5, &[FAMILY_A], &[], &[(None, Some(0.9)), scored(SPECIES_A1, 0.9)]);
    assert_counted(&db, 1, "NULL determination under an include set");
    assert_eq!(db.deployment(1).taxa, 1, "the NULL determination is not a counted taxon");
    let db = filtered(0.5, &[FAMILY_A], &[SPECIES_B], &[(None, Some(0.9))]);
    assert_counted(&db, 0, "NULL determination under include and exclude sets");
}

/// A determination whose taxon row is missing has `A(t) = {t}`.
#[test]
fn determination_without_taxon_row_matches_only_itself() {
    let db = filtered(0.5, &[99, FAMILY_A], &[], &[scored(99, 0.9), scored(98, 0.9), scored(SPECIES_A1, 0.9)]);
    assert_counted(&db, 2, "taxon 99 by id, species A1 through family A");
}

// ---- Exclude set ----

#[test]
fn exclude_removes_taxon_and_descendants() {
    let occurrences = [
        scored(GENUS_A, 0.9),
        scored(SPECIES_A1, 0.9),
        scored(SPECIES_A2, 0.9),
        scored(FAMILY_A, 0.9),
        scored(SPECIES_B, 0.9),
        scored(ROOT, 0.9),
    ];
    let db = filtered(0.5, &[], &[GENUS_A], &occurrences);
    assert_counted(&db, 3, "exclude genus A: family A, species B and the root remain");
    assert_eq!(db.deployment(1).taxa, 3);
}

#[test]
fn null_determination_passes_exclude_only_filter() {
    let occurrences = [(None, Some(0.9)), (None, None), (None, Some(0.2)), scored(SPECIES_A1, 0.9)];
    let db = filtered(0.5, &[], &[GENUS_A], &occurrences);
    assert_counted(&db, 1, "only the NULL determination with a passing score");
}

#[test]
fn exclude_wins_over_include() {
    let occurrences = [
        scored(SPECIES_A1, 0.9),
        scored(SPECIES_A2, 0.9),
        scored(GENUS_A, 0.9),
        scored(FAMILY_A, 0.9),
        scored(SPECIES_B, 0.9),
    ];
    let db = filtered(0.5, &[FAMILY_A], &[GENUS_A], &occurrences);
    assert_counted(&db, 1, "include family A minus genus A: only the family itself");
    let db = filtered(0.5, &[SPECIES_A1], &[SPECIES_A1], &occurrences);
    assert_counted(&db, 0, "the same taxon included and excluded");
}

// ---- taxa_count ----

#[test]
fn taxa_count_counts_null_determination_once_under_exclude_only_filter() {
    let occurrences = [
        (None, Some(0.9)),
        (None, Some(0.7)),
        scored(SPECIES_A1, 0.9),
        scored(SPECIES_A1, 0.6),
        scored(SPECIES_A2, 0.4),
        scored(SPECIES_B, 0.9),
    ];
    let db = filtered(0.5, &[], &[GENUS_B], &occurrences);
    assert_counted(&db, 4, "two NULL determinations and two of species A1");
    assert_eq!(db.deployment(1).taxa, 2, "NULL and species A1");
}

#[test]
fn taxa_count_counts_null_determination_without_project() {
    let occurrences = [(None, None), (Some(SPECIES_A1), None), scored(SPECIES_A2, 0.1), (None, Some(0.9))];
    let mut db = Db::new();
    db.apply(with_occurrences(scene(None, 0.5), &occurrences));
    assert_counted(&db, 4, "P NULL: everything");
    assert_eq!(db.deployment(1).taxa, 3, "NULL, species A1 and species A2");
}

// ---- Detection counts vs occurrence counts ----

#[test]
fn detection_counts_follow_image_and_occurrence_counts_follow_occurrence() {
    let mut db = Db::new();
    db.apply(
        batch()
            .taxonomy()
            .project(1, 0.5)
            .deployment(1, Some(1))
            .deployment(2, Some(1))
            .event(1, Some(1), None)
            .event(2, Some(2), None)
            .image(1, Some(1), Some(1), None)
            .occurrence(1, Some(2), Some(2), Some(SPECIES_A1), Some(0.9))
            .detection(1, 1, Some(1)),
    );
    assert_eq!(db.image(1), 1);
    assert_eq!(db.event(1), event_counts(1, 1, 0), "event 1 has the image and its detection");
    assert_eq!(db.event(2), event_counts(0, 0, 1), "event 2 has the occurrence");
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 1, detections: 1, ..Default::default() },
        "deployment 1 has the image and its detection"
    );
    assert_eq!(
        db.deployment(2),
        DeploymentCounts { events: 1, occurrences: 1, taxa: 1, ..Default::default() },
        "deployment 2 has the occurrence"
    );

    // The detection still reads the occurrence's score, wherever the occurrence counts.
    db.apply(batch().occurrence(1, Some(2), Some(2), Some(SPECIES_A1), Some(0.2)));
    assert_eq!(db.image(1), 0);
    assert_eq!(db.event(1), event_counts(1, 0, 0));
    assert_eq!(db.event(2), event_counts(0, 0, 0));
    assert_eq!(db.deployment(1), DeploymentCounts { events: 1, captures: 1, ..Default::default() });
    assert_eq!(db.deployment(2), DeploymentCounts { events: 1, ..Default::default() });
}

#[test]
fn deployment_occurrences_require_an_event() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .deployment(2, None)
            .occurrence(1, None, Some(1), Some(SPECIES_A1), Some(0.9))
            .occurrence(2, Some(1), Some(1), Some(SPECIES_A2), Some(0.9))
            .occurrence(3, None, Some(2), None, None),
    );
    assert_eq!((db.deployment(1).occurrences, db.deployment(1).taxa), (1, 1), "occurrence 1 has no event");
    assert_eq!(db.event(1).occurrences, 1);
    assert_eq!((db.deployment(2).occurrences, db.deployment(2).taxa), (0, 0), "occurrence 3 has no event");

    db.apply(batch().occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9)));
    assert_eq!((db.deployment(1).occurrences, db.deployment(1).taxa), (2, 2));
    assert_eq!(db.event(1).occurrences, 2);

    // Occurrence 3 gets event 1 (of deployment 1) but stays in deployment 2 (no project).
    db.apply(batch().occurrence(3, Some(1), Some(2), None, None));
    assert_eq!((db.deployment(2).occurrences, db.deployment(2).taxa), (1, 1), "NULL determination, P NULL");
    assert_eq!(db.event(1).occurrences, 2, "NULL score fails event 1's project 1");
    assert_eq!((db.deployment(1).occurrences, db.deployment(1).taxa), (2, 2));
}

// ---- Detections ----

#[test]
fn null_bbox_markers_never_count() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .deployment(2, None)
            .event(2, Some(2), None)
            .image(2, Some(2), Some(2), None)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .null_marker(1, 1, Some(1))
            .null_marker(2, 2, None)
            .null_marker(3, 2, Some(1)),
    );
    assert_eq!((db.image(1), db.image(2)), (0, 0));
    assert_eq!(db.event(1), event_counts(1, 0, 1), "the occurrence still counts");
    assert_eq!(db.event(2), event_counts(1, 0, 0));
    assert_eq!((db.deployment(1).detections, db.deployment(2).detections), (0, 0));

    db.apply(batch().detection(1, 1, Some(1)).detection(2, 2, None));
    assert_eq!((db.image(1), db.image(2)), (1, 1), "the same rows with a bbox");
    assert_eq!((db.event(1).detections, db.event(2).detections), (1, 1));
    assert_eq!((db.deployment(1).detections, db.deployment(2).detections), (1, 1));
}

#[test]
fn detection_without_occurrence_counts_only_without_project() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.0)
            .deployment(2, None)
            .event(2, Some(2), None)
            .image(2, Some(2), Some(2), None)
            .detection(1, 1, None)
            .detection(2, 2, None)
            // Occurrence 9 has no row yet.
            .detection(3, 1, Some(9))
            .detection(4, 2, Some(9)),
    );
    assert_eq!((db.image(1), db.image(2)), (0, 2));
    assert_eq!((db.event(1).detections, db.event(2).detections), (0, 2));
    assert_eq!((db.deployment(1).detections, db.deployment(2).detections), (0, 2));

    db.apply(batch().occurrence(9, Some(1), Some(1), Some(SPECIES_A1), Some(0.9)));
    assert_eq!((db.image(1), db.image(2)), (1, 2));
    assert_eq!(db.event(1), event_counts(1, 1, 1));
    assert_eq!(
        db.deployment(1),
        DeploymentCounts { events: 1, captures: 1, detections: 1, occurrences: 1, taxa: 1, ..Default::default() }
    );
    assert_eq!(db.deployment(2).detections, 2);
}

#[test]
fn detection_of_failing_occurrence_is_not_counted() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.3))
            .occurrence(2, Some(1), Some(1), Some(SPECIES_A2), Some(0.8))
            .detection(1, 1, Some(1))
            .detection(2, 1, Some(1))
            .detection(3, 1, Some(2)),
    );
    assert_counted(&db, 1, "only detection 3's occurrence passes");
    assert_eq!(db.deployment(1).taxa, 1);
}

// ---- Unfiltered counts ----

fn image_at(event: Option<Id>, deployment: Option<Id>, timestamp: Option<Micros>, size: Option<i64>) -> Image {
    Image { event, deployment, project: None, timestamp, size }
}

#[test]
fn captures_events_sizes_and_timestamps() {
    let mut db = Db::new();
    db.apply(
        batch()
            .project(1, 0.99)
            .deployment(1, Some(1))
            .deployment(2, Some(1))
            .event(1, Some(1), None)
            .event(2, Some(1), None)
            .event(3, Some(2), None)
            .event(4, None, None)
            .image_row(1, image_at(Some(1), Some(1), Some(1_000), Some(100)))
            .image_row(2, image_at(Some(1), Some(1), None, None))
            .image_row(3, image_at(Some(2), Some(1), Some(500), Some(50)))
            .image_row(4, image_at(None, Some(1), Some(3_000), Some(7)))
            .image_row(5, image_at(Some(3), None, Some(10), Some(9))),
    );
    let timed =
        |captures, start, end| EventCounts { start: Some(start), end: Some(end), ..event_counts(captures, 0, 0) };
    assert_eq!(db.event(1), timed(2, 1_000, 1_000), "image 2 has no timestamp");
    assert_eq!(db.event(2), timed(1, 500, 500));
    assert_eq!(db.event(3), timed(1, 10, 10), "image 5 has no deployment");
    assert_eq!(db.event(4), event_counts(0, 0, 0));
    assert_eq!(
        db.deployment(1),
        DeploymentCounts {
            events: 2,
            captures: 4,
            total_size: Some(157),
            first_capture: Some(500),
            last_capture: Some(3_000),
            ..Default::default()
        }
    );
    assert_eq!(
        db.deployment(2),
        DeploymentCounts { events: 1, ..Default::default() },
        "no images: no size, no timestamps"
    );

    db.apply(batch().image_row(6, image_at(Some(1), Some(1), Some(2_000), Some(0))));
    assert_eq!(db.event(1), timed(3, 1_000, 2_000));
    let d = db.deployment(1);
    assert_eq!((d.captures, d.total_size, d.first_capture, d.last_capture), (5, Some(157), Some(500), Some(3_000)));

    db.apply(batch().delete_image(4).delete_event(2));
    let d = db.deployment(1);
    assert_eq!(
        (d.events, d.captures, d.total_size, d.first_capture, d.last_capture),
        (1, 4, Some(150), Some(500), Some(2_000)),
        "image 3 keeps its deployment after its event is deleted"
    );
}

#[test]
fn total_size_is_null_without_sizes_and_zero_with_zero_sizes() {
    let mut db = Db::new();
    db.apply(
        batch()
            .deployment(1, None)
            .image_row(1, image_at(None, Some(1), None, None))
            .image_row(2, image_at(None, Some(1), None, None)),
    );
    assert_eq!((db.deployment(1).captures, db.deployment(1).total_size), (2, None));
    db.apply(batch().image_row(3, image_at(None, Some(1), None, Some(0))));
    assert_eq!((db.deployment(1).captures, db.deployment(1).total_size), (3, Some(0)));
    db.apply(batch().image_row(4, image_at(None, Some(1), None, Some(0))));
    assert_eq!((db.deployment(1).captures, db.deployment(1).total_size), (4, Some(0)));
    db.apply(batch().delete_image(3).delete_image(4));
    assert_eq!((db.deployment(1).captures, db.deployment(1).total_size), (2, None));
    db.apply(batch().image_row(1, image_at(None, Some(1), None, Some(5))));
    assert_eq!((db.deployment(1).captures, db.deployment(1).total_size), (2, Some(5)));
}

#[test]
fn event_start_and_end_ignore_null_timestamps() {
    let mut db = Db::new();
    db.apply(batch().deployment(1, None).event(1, Some(1), None).image_row(1, image_at(Some(1), Some(1), None, None)));
    let span =
        |db: &Db| (db.event(1).start, db.event(1).end, db.deployment(1).first_capture, db.deployment(1).last_capture);
    assert_eq!(span(&db), (None, None, None, None), "no timestamp yet");
    db.apply(batch().image_row(2, image_at(Some(1), Some(1), Some(7), None)));
    assert_eq!(span(&db), (Some(7), Some(7), Some(7), Some(7)));
    db.apply(batch().image_row(3, image_at(Some(1), Some(1), Some(3), None)));
    assert_eq!(span(&db), (Some(3), Some(7), Some(3), Some(7)));
    db.apply(batch().image_row(2, image_at(Some(1), Some(1), None, None)));
    assert_eq!(span(&db), (Some(3), Some(3), Some(3), Some(3)), "image 2 lost its timestamp");
    db.apply(batch().delete_image(3));
    assert_eq!(span(&db), (None, None, None, None));
    assert_eq!(db.event(1).captures, 2);
}

// ---- What apply reports ----

#[test]
fn count_dropping_to_zero_is_reported_as_zero() {
    let mut db = Db::new();
    db.apply(scene(None, 0.5).detection(1, 1, None));
    assert_eq!(db.image(1), 1);
    let changes = db.apply(batch().delete_detection(1));
    assert_eq!(changes.images, vec![(1, Some(ImageCounts { detections: 0 }))]);
    assert_eq!(changes.events, vec![(1, Some(event_counts(1, 0, 0)))]);
    assert_eq!(changes.deployments, vec![(1, Some(DeploymentCounts { events: 1, captures: 1, ..Default::default() }))]);
}

#[test]
fn deleted_owner_is_reported_as_none() {
    let mut db = Db::new();
    db.apply(scene(None, 0.5));
    let changes = db.apply(batch().delete_image(1));
    assert_eq!(changes.images, vec![(1, None)]);
    assert_eq!(changes.events, vec![(1, Some(event_counts(0, 0, 0)))]);
    assert_eq!(changes.deployments, vec![(1, Some(DeploymentCounts { events: 1, ..Default::default() }))]);

    let changes = db.apply(batch().delete_event(1));
    assert!(changes.images.is_empty());
    assert_eq!(changes.events, vec![(1, None)]);
    assert_eq!(changes.deployments, vec![(1, Some(DeploymentCounts::default()))]);

    let changes = db.apply(batch().delete_deployment(1));
    assert_eq!(changes, CountChanges { deployments: vec![(1, None)], ..Default::default() });
}

#[test]
fn unchanged_owners_are_not_reported() {
    let mut db = Db::new();
    db.apply(scene(Some(1), 0.5).image(2, Some(1), Some(1), None).deployment(2, Some(1)).occurrence(
        1,
        Some(1),
        Some(1),
        Some(SPECIES_A1),
        Some(0.9),
    ));
    let changes = db.apply(batch().detection(1, 1, Some(1)));
    assert_eq!(changes.images, vec![(1, Some(ImageCounts { detections: 1 }))], "image 2 is not reported");
    assert_eq!(changes.events, vec![(1, Some(event_counts(2, 1, 1)))]);
    assert_eq!(
        changes.deployments,
        vec![(
            1,
            Some(DeploymentCounts {
                events: 1,
                captures: 2,
                detections: 1,
                occurrences: 1,
                taxa: 1,
                ..Default::default()
            })
        )],
        "deployment 2 is not reported"
    );

    let changes = db.apply(batch().occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.8)));
    assert!(changes.is_empty(), "a score change that keeps the occurrence passing: {changes:?}");
    let changes = db.apply(batch().occurrence(1, Some(1), Some(1), Some(SPECIES_A2), Some(0.8)));
    assert!(changes.is_empty(), "a determination change that keeps every count: {changes:?}");
}

#[test]
fn replayed_batch_reports_nothing() {
    let b = with_occurrences(scene(Some(1), 0.5).exclude(1, 1, GENUS_B), &[scored(SPECIES_A1, 0.9), (None, None)]);
    let mut db = Db::new();
    let first = db.apply(b.clone());
    assert_eq!(first.len(), 3, "image 1, event 1 and deployment 1 appear");
    let second = db.apply(b);
    assert!(second.is_empty(), "replay reported {second:?}");
    assert_counted(&db, 1, "after the replay");
}

// ---- Filter edits ----

/// The scene with five occurrences: A1 0.9, A2 0.6, B 0.4, genus A 0.8, NULL 0.7.
fn edit_scene(threshold: f64) -> Batch {
    with_occurrences(
        scene(Some(1), threshold),
        &[
            scored(SPECIES_A1, 0.9),
            scored(SPECIES_A2, 0.6),
            scored(SPECIES_B, 0.4),
            scored(GENUS_A, 0.8),
            (None, Some(0.7)),
        ],
    )
}

fn assert_counted_taxa(db: &Db, n: i64, taxa: i64, why: &str) {
    assert_counted(db, n, why);
    assert_eq!(db.deployment(1).taxa, taxa, "{why}: deployment 1 taxa_count");
}

#[test]
fn threshold_edit_recounts() {
    let mut db = Db::new();
    db.apply(edit_scene(0.5));
    assert_counted_taxa(&db, 4, 4, "threshold 0.5");
    db.apply(batch().project(1, 0.7));
    assert_counted_taxa(&db, 3, 3, "threshold 0.7: A1, genus A, NULL");
    db.apply(batch().project(1, 0.3));
    assert_counted_taxa(&db, 5, 5, "threshold 0.3: all");
    db.apply(batch().project(1, 0.95));
    assert_counted_taxa(&db, 0, 0, "threshold 0.95: none");
}

#[test]
fn include_rows_added_and_removed() {
    let mut db = Db::new();
    db.apply(edit_scene(0.3));
    assert_counted_taxa(&db, 5, 5, "no include set");
    db.apply(batch().include(1, 1, GENUS_A));
    assert_counted_taxa(&db, 3, 3, "include genus A: A1, A2, genus A");
    db.apply(batch().include(2, 1, GENUS_B));
    assert_counted_taxa(&db, 4, 4, "include genus A and genus B");
    db.apply(batch().delete_include(1));
    assert_counted_taxa(&db, 1, 1, "include genus B only");
    db.apply(batch().delete_include(2));
    assert_counted_taxa(&db, 5, 5, "include set emptied: NULL passes again");
}

#[test]
fn exclude_rows_added_and_removed() {
    let mut db = Db::new();
    db.apply(edit_scene(0.3));
    db.apply(batch().exclude(1, 1, SPECIES_A2));
    assert_counted_taxa(&db, 4, 4, "exclude A2");
    db.apply(batch().exclude(2, 1, FAMILY_A));
    assert_counted_taxa(&db, 2, 2, "exclude A2 and family A: B and NULL");
    db.apply(batch().delete_exclude(1));
    assert_counted_taxa(&db, 2, 2, "exclude family A");
    db.apply(batch().include(1, 1, ROOT));
    assert_counted_taxa(&db, 1, 1, "include the root, exclude family A: B only");
    db.apply(batch().delete_exclude(2).delete_include(1));
    assert_counted_taxa(&db, 5, 5, "no filter");
}

/// Only the edited taxon's `parents_json` changes: descendants keep their stale lists.
#[test]
fn reparented_taxon_moves_in_and_out_of_filters() {
    let mut db = Db::new();
    db.apply(edit_scene(0.3).include(1, 1, FAMILY_B));
    assert_counted_taxa(&db, 1, 1, "include family B: species B");
    db.apply(batch().taxon(SPECIES_A1, &[ROOT, FAMILY_B, GENUS_B]));
    assert_counted_taxa(&db, 2, 2, "species A1 moved under genus B");
    db.apply(batch().taxon(GENUS_A, &[ROOT, FAMILY_B]));
    assert_counted_taxa(&db, 3, 3, "genus A moved under family B; species A2 still lists family A");
    db.apply(batch().delete_taxon(SPECIES_A1));
    assert_counted_taxa(&db, 2, 2, "species A1's row deleted: A(t) = {t}");
    db.apply(batch().delete_include(1).exclude(1, 1, FAMILY_A));
    assert_counted_taxa(&db, 4, 4, "exclude family A: only species A2 still lists it");
}

// ---- Membership changes ----

#[test]
fn event_changing_project_refilters_its_counts() {
    let mut db = Db::new();
    db.apply(with_occurrences(
        scene(Some(1), 0.5).project(2, 0.0),
        &[scored(SPECIES_A1, 0.9), scored(SPECIES_A2, 0.2)],
    ));
    assert_eq!(db.event(1), event_counts(1, 1, 1));

    let changes = db.apply(batch().event(1, Some(1), Some(2)));
    assert_eq!(changes.events, vec![(1, Some(event_counts(1, 2, 2)))]);
    assert!(changes.images.is_empty() && changes.deployments.is_empty(), "only the event changes: {changes:?}");

    db.apply(batch().event(1, Some(1), None));
    assert_eq!(db.event(1), event_counts(1, 1, 1), "back to the deployment's project");

    let changes = db.apply(batch().event(1, None, None));
    assert_eq!(db.event(1), event_counts(1, 2, 2), "no project, no deployment: unfiltered");
    assert_eq!(db.deployment(1).events, 0);
    assert!(changes.images.is_empty(), "image 1 still falls back to deployment 1");
}

#[test]
fn deployment_changing_project_refilters_fallback_owners() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .project(2, 0.0)
            .event(2, Some(1), Some(1))
            .image(2, Some(2), Some(1), Some(1))
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .occurrence(2, Some(1), Some(1), Some(SPECIES_A2), Some(0.2))
            .occurrence(3, Some(2), Some(1), None, None)
            .detection(1, 1, Some(1))
            .detection(2, 1, Some(2))
            .detection(3, 2, Some(2))
            .detection(4, 2, Some(3)),
    );
    let deployment = |detections, occurrences, taxa| DeploymentCounts {
        events: 2,
        captures: 2,
        detections,
        occurrences,
        taxa,
        ..Default::default()
    };
    assert_eq!((db.image(1), db.image(2)), (1, 0));
    assert_eq!((db.event(1), db.event(2)), (event_counts(1, 1, 1), event_counts(1, 0, 0)));
    assert_eq!(db.deployment(1), deployment(1, 1, 1));

    db.apply(batch().deployment(1, Some(2)));
    assert_eq!((db.image(1), db.image(2)), (2, 0), "image 2 keeps its own project 1");
    assert_eq!((db.event(1), db.event(2)), (event_counts(1, 2, 2), event_counts(1, 0, 0)));
    assert_eq!(db.deployment(1), deployment(3, 2, 2), "detection 4's occurrence has a NULL score");

    db.apply(batch().deployment(1, None));
    assert_eq!((db.image(1), db.image(2)), (2, 0));
    assert_eq!((db.event(1), db.event(2)), (event_counts(1, 2, 2), event_counts(1, 0, 0)));
    assert_eq!(db.deployment(1), deployment(4, 3, 3), "P NULL: A1, A2 and NULL");
}

#[test]
fn image_moving_to_another_event_moves_detections_and_captures() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .event(2, Some(1), None)
            .image_row(1, image_at(Some(1), Some(1), Some(100), None))
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .detection(1, 1, Some(1)),
    );
    let timed = |counts: EventCounts| EventCounts { start: Some(100), end: Some(100), ..counts };
    assert_eq!((db.event(1), db.event(2)), (timed(event_counts(1, 1, 1)), event_counts(0, 0, 0)));

    let changes = db.apply(batch().image_row(1, image_at(Some(2), Some(1), Some(100), None)));
    assert_eq!(
        changes.events,
        vec![(1, Some(event_counts(0, 0, 1))), (2, Some(timed(event_counts(1, 1, 0))))],
        "the occurrence stays with event 1"
    );
    assert!(changes.images.is_empty() && changes.deployments.is_empty(), "{changes:?}");
}

#[test]
fn occurrence_changing_event_moves_occurrence_counts_only() {
    let mut db = Db::new();
    db.apply(
        scene(Some(1), 0.5)
            .event(2, Some(1), None)
            .occurrence(1, Some(1), Some(1), Some(SPECIES_A1), Some(0.9))
            .detection(1, 1, Some(1)),
    );
    let changes = db.apply(batch().occurrence(1, Some(2), Some(1), Some(SPECIES_A1), Some(0.9)));
    assert_eq!(changes.events, vec![(1, Some(event_counts(1, 1, 0))), (2, Some(event_counts(0, 0, 1)))]);
    assert!(changes.images.is_empty() && changes.deployments.is_empty(), "{changes:?}");

    let changes = db.apply(batch().occurrence(1, None, Some(1), Some(SPECIES_A1), Some(0.9)));
    assert_eq!(changes.events, vec![(2, Some(event_counts(0, 0, 0)))]);
    assert!(changes.images.is_empty(), "the detection still counts on image 1");
    assert_eq!(
        changes.deployments,
        vec![(1, Some(DeploymentCounts { events: 2, captures: 1, detections: 1, ..Default::default() }))],
        "no event: no deployment occurrence"
    );
}

// ---- Workers ----

/// A script exercising every table: the same reports and states on one and two workers.
fn script() -> Vec<Batch> {
    vec![
        edit_scene(0.5)
            .project(2, 0.0)
            .deployment(2, None)
            .event(2, Some(2), None)
            .event(3, Some(1), Some(2))
            .image_row(2, image_at(Some(2), Some(2), Some(5), Some(10)))
            .image_row(3, image_at(Some(3), Some(1), Some(9), Some(20)))
            .occurrence(6, Some(3), Some(1), Some(SPECIES_B), Some(0.1))
            .detection(6, 2, None)
            .detection(7, 3, Some(6))
            .null_marker(8, 3, Some(1)),
        batch().include(1, 1, FAMILY_A).exclude(1, 2, SPECIES_B),
        batch().project(1, 0.65).taxon(SPECIES_B, &[ROOT, FAMILY_A]),
        batch().image_row(3, image_at(Some(1), Some(2), None, Some(20))).occurrence(2, Some(3), None, None, Some(1.0)),
        batch().deployment(1, Some(2)).delete_detection(1).delete_include(1),
        batch().delete_event(3).delete_image(2).exclude(2, 2, ROOT),
        batch().delete_deployment(2).delete_occurrence(6),
    ]
}

#[test]
fn two_workers_report_the_same_as_one() {
    let mut one = Db::new();
    let mut two = Db::with_workers(2);
    assert_eq!(two.engine.workers(), 2);
    for (step, b) in script().into_iter().enumerate() {
        let a = one.apply(b.clone());
        let b = two.apply(b);
        assert_eq!(a, b, "step {step}: reported changes differ between one and two workers");
        assert_eq!(one.engine.snapshot(), two.engine.snapshot(), "step {step}: states differ");
    }
    // Hand-checked end state of the script's event 1 and deployment 1 (project 2, threshold 0,
    // exclude the root): only the NULL determination (occurrence 5, score 0.7) passes.
    assert_eq!(one.event(1).occurrences, 1);
    assert_eq!((one.deployment(1).occurrences, one.deployment(1).taxa), (1, 1));
}
