//! Random sequences of every kind of input change, checked after every step against the
//! from-scratch oracle: the accumulated reported changes must equal the recompute, and no
//! owner may be reported without a changed value.
//!
//! Id spaces are tiny on purpose so that rows collide, move, dangle and come back.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tally_dataflows::engine;
use tally_dataflows::oracle::recompute;
use tally_dataflows::{
    AllCounts, CountChanges, Deployment, Detection, Engine, Event, FilterTaxon, Id, Image, InputBatch, Occurrence,
    Project, Score, Tables, Taxon,
};

/// Scores and thresholds where Postgres and naive `f64` comparison disagree, plus ordinary ones.
fn score() -> impl Strategy<Value = Score> {
    prop_oneof![Just(0.0), Just(-0.0), Just(0.3), Just(0.5), Just(0.7), Just(1.0), Just(f64::NAN), Just(f64::INFINITY),]
        .prop_map(Score::new)
}

fn id(max: Id) -> impl Strategy<Value = Id> {
    1..=max
}

fn opt(max: Id) -> impl Strategy<Value = Option<Id>> {
    proptest::option::weighted(0.8, id(max))
}

/// One change to one table: `None` deletes the row.
#[derive(Clone, Debug)]
enum Change {
    Image(Id, Option<Image>),
    Detection(Id, Option<Detection>),
    Occurrence(Id, Option<Occurrence>),
    Taxon(Id, Option<Taxon>),
    Project(Id, Option<Project>),
    Include(Id, Option<FilterTaxon>),
    Exclude(Id, Option<FilterTaxon>),
    Event(Id, Option<Event>),
    Deployment(Id, Option<Deployment>),
}

const PROJECTS: Id = 3;
const DEPLOYMENTS: Id = 3;
const EVENTS: Id = 4;
const IMAGES: Id = 8;
const OCCURRENCES: Id = 10;
const DETECTIONS: Id = 16;
const TAXA: Id = 8;

fn row<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::weighted(0.85, s)
}

fn change() -> impl Strategy<Value = Change> {
    let image =
        (opt(EVENTS), opt(DEPLOYMENTS), opt(PROJECTS), proptest::option::of(0i64..5), proptest::option::of(0i64..100))
            .prop_map(|(event, deployment, project, timestamp, size)| Image {
                event,
                deployment,
                project,
                timestamp,
                size,
            });
    let detection = (id(IMAGES), opt(OCCURRENCES), proptest::bool::weighted(0.8))
        .prop_map(|(image, occurrence, valid)| Detection { image, occurrence, valid });
    let occurrence = (opt(EVENTS), opt(DEPLOYMENTS), opt(TAXA), proptest::option::weighted(0.85, score()))
        .prop_map(|(event, deployment, determination, score)| Occurrence { event, deployment, determination, score });
    let taxon = proptest::collection::vec(id(TAXA), 0..3).prop_map(|ancestors| Taxon { ancestors });
    let project = score().prop_map(|threshold| Project { threshold });
    let filter = || (id(PROJECTS), id(TAXA)).prop_map(|(project, taxon)| FilterTaxon { project, taxon });
    let event = (opt(DEPLOYMENTS), opt(PROJECTS)).prop_map(|(deployment, project)| Event { deployment, project });
    let deployment = opt(PROJECTS).prop_map(|project| Deployment { project });
    prop_oneof![
        3 => (id(IMAGES), row(image)).prop_map(|(i, r)| Change::Image(i, r)),
        5 => (id(DETECTIONS), row(detection)).prop_map(|(i, r)| Change::Detection(i, r)),
        5 => (id(OCCURRENCES), row(occurrence)).prop_map(|(i, r)| Change::Occurrence(i, r)),
        2 => (id(TAXA), row(taxon)).prop_map(|(i, r)| Change::Taxon(i, r)),
        2 => (id(PROJECTS), row(project)).prop_map(|(i, r)| Change::Project(i, r)),
        2 => (id(6), row(filter())).prop_map(|(i, r)| Change::Include(i, r)),
        2 => (id(6), row(filter())).prop_map(|(i, r)| Change::Exclude(i, r)),
        2 => (id(EVENTS), row(event)).prop_map(|(i, r)| Change::Event(i, r)),
        1 => (id(DEPLOYMENTS), row(deployment)).prop_map(|(i, r)| Change::Deployment(i, r)),
    ]
}

fn batch(changes: &[Change]) -> InputBatch {
    let mut b = InputBatch::default();
    for c in changes.iter().cloned() {
        match c {
            Change::Image(i, r) => b.images.push((i, r)),
            Change::Detection(i, r) => b.detections.push((i, r)),
            Change::Occurrence(i, r) => b.occurrences.push((i, r)),
            Change::Taxon(i, r) => b.taxa.push((i, r)),
            Change::Project(i, r) => b.projects.push((i, r)),
            Change::Include(i, r) => b.include_taxa.push((i, r)),
            Change::Exclude(i, r) => b.exclude_taxa.push((i, r)),
            Change::Event(i, r) => b.events.push((i, r)),
            Change::Deployment(i, r) => b.deployments.push((i, r)),
        }
    }
    b
}

/// Every reported owner must differ from what was reported for it before.
fn assert_only_changed(previous: &AllCounts, changes: &CountChanges) {
    for (id, new) in &changes.images {
        assert_ne!(previous.images.get(id), new.as_ref(), "image {id} reported without a change");
    }
    for (id, new) in &changes.events {
        assert_ne!(previous.events.get(id), new.as_ref(), "event {id} reported without a change");
    }
    for (id, new) in &changes.deployments {
        assert_ne!(previous.deployments.get(id), new.as_ref(), "deployment {id} reported without a change");
    }
}

fn run(steps: &[Vec<Change>], workers: usize) {
    check(Engine::new(workers).expect("engine starts"), steps);
}

/// The same on a timely cluster of `processes` × `threads` over loopback TCP.
fn run_cluster(steps: &[Vec<Change>], processes: usize, threads: usize) {
    let (engine, peers) = engine::loopback(processes, threads).expect("cluster starts");
    assert_eq!(engine.topology().total_workers(), processes * threads);
    check(engine, steps);
    peers.join().expect("every peer process ends cleanly once the engine is dropped");
}

/// Applies `steps`, comparing after each the reported changes and the engine's snapshot with
/// the oracle's recompute of the rows applied so far.
fn check(mut engine: Engine, steps: &[Vec<Change>]) {
    let mut tables = Tables::default();
    let mut reported = AllCounts::default();
    for (n, step) in steps.iter().enumerate() {
        let batch = batch(step);
        let changes = engine.apply(&batch).expect("batch applies");
        tables.apply(&batch);
        assert_only_changed(&reported, &changes);
        changes.apply_to(&mut reported);
        let expected = recompute(&tables);
        assert_eq!(reported, expected, "accumulated changes differ from the oracle after step {n}: {step:?}");
        assert_eq!(engine.snapshot(), expected, "engine snapshot differs from the oracle after step {n}");
    }
}

fn steps(max_steps: usize) -> impl Strategy<Value = Vec<Vec<Change>>> {
    proptest::collection::vec(proptest::collection::vec(change(), 1..12), 1..max_steps)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// About 256 × 20 = 5,000 random steps on one worker.
    #[test]
    fn one_worker_matches_oracle(steps in steps(40)) {
        run(&steps, 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The same on two workers: rows are partitioned between them, outputs must be identical.
    #[test]
    fn two_workers_match_oracle(steps in steps(30)) {
        run(&steps, 2);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// One process, four workers.
    #[test]
    fn four_workers_match_oracle(steps in steps(30)) {
        run(&steps, 4);
    }
}

proptest! {
    // Forming a cluster takes about a second (timely polls for connections once a second).
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Two timely processes × two workers each over loopback TCP: the rows are partitioned
    /// over both processes, only process 0 feeds and reads, and the counts are the same.
    #[test]
    fn two_processes_of_two_workers_match_oracle(steps in steps(30)) {
        run_cluster(&steps, 2, 2);
    }
}

/// Large batches: a whole random database in a few times, then random churn.
#[test]
fn bulk_then_churn_matches_oracle() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let many = proptest::collection::vec(change(), 200..400);
    for _ in 0..8 {
        let steps: Vec<Vec<Change>> = (0..4).map(|_| many.new_tree(&mut runner).expect("strategy").current()).collect();
        run(&steps, 1);
    }
}

/// How a step hands its batch to the engine.
#[derive(Clone, Copy, Debug)]
enum Handover {
    /// `apply`.
    Apply,
    /// `submit`, then `collect` (ingest: the batch's rows are written in between).
    Split,
    /// `submit` and never `collect` (an ingest batch whose write failed): the next step folds
    /// it in, and collecting it late returns nothing.
    Abandon,
}

fn handovers(max_steps: usize) -> impl Strategy<Value = Vec<(Vec<Change>, Handover)>> {
    let handover = prop_oneof![Just(Handover::Apply), Just(Handover::Split), Just(Handover::Abandon)];
    proptest::collection::vec((proptest::collection::vec(change(), 1..12), handover), 1..max_steps)
}

/// Applies `steps` through `apply`, `submit` + `collect`, or `submit` alone: every collected
/// batch must report exactly the changes that take the oracle's counts before it (abandoned
/// batches included) to those after it, a late `collect` of an abandoned batch must report
/// nothing, and the engine's counts must equal the oracle's.
fn check_handovers(mut engine: Engine, steps: &[(Vec<Change>, Handover)]) {
    let mut tables = Tables::default();
    let mut abandoned = None;
    for (n, (step, handover)) in steps.iter().enumerate() {
        let batch = batch(step);
        let before = recompute(&tables);
        tables.apply(&batch);
        let changes = match handover {
            Handover::Apply => Some(engine.apply(&batch).expect("batch applies")),
            Handover::Split => {
                let submitted = engine.submit(&batch).expect("batch submitted");
                Some(engine.collect(submitted).expect("batch collected"))
            }
            Handover::Abandon => {
                let submitted = engine.submit(&batch).expect("batch submitted");
                if let Some(late) = abandoned.replace(submitted) {
                    let late = engine.collect(late).expect("late collect");
                    assert!(late.is_empty(), "an abandoned batch collected late reported changes at step {n}");
                }
                None
            }
        };
        if let Some(late) = abandoned.take_if(|_| changes.is_some()) {
            let late = engine.collect(late).expect("late collect");
            assert!(late.is_empty(), "a batch collected after a later one reported changes at step {n}: {late:?}");
        }
        let expected = recompute(&tables);
        if let Some(changes) = changes {
            assert_only_changed(&before, &changes);
            let mut reported = before;
            changes.apply_to(&mut reported);
            assert_eq!(reported, expected, "reported changes differ from the oracle's at step {n}: {step:?}");
            assert_eq!(engine.snapshot(), expected, "engine differs from the oracle after step {n}");
        }
    }
    engine.settle().expect("settles");
    assert_eq!(engine.snapshot(), recompute(&tables), "engine differs from the oracle at the end");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Batches handed over whole, in two halves, or abandoned after the first half, on one
    /// worker and on two.
    #[test]
    fn submitted_batches_match_oracle(steps in handovers(30), workers in 1usize..=2) {
        check_handovers(Engine::new(workers).expect("engine starts"), &steps);
    }
}
