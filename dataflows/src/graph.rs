//! The count dataflow: every stored count of SPEC §2 as one differential-dataflow graph.
//!
//! [`build`] only wires operators; the [`crate::engine`] feeds the inputs and steps the worker.
//! The output is a collection of `((owner, field), value)`: one record per non-zero field of
//! every owner, plus an [`Field::Exists`] marker per owner row. A changed count appears as a
//! retraction of the old record and an insertion of the new one at the same time.
//!
//! The shape, for the counts that depend on the project filter:
//!
//! ```text
//! detections ─(occurrence)─▶ ⋈ determinations ─(image)─▶ ⋈ image scopes, score ≥ T ─┐
//! occurrences ─(event)─────▶ ⋈ event targets (event / deployment scopes), score ≥ T ─┴─▶ items (t, P)
//!                                   filter::verdicts(demanded (t, P)) ───────────────────▶ ⋈ taxon ok
//! ```
//!
//! Detection counts are computed per `(image, P)` and summed per owner, so an image whose
//! image, event and deployment share one project (the usual case) is filtered once.

pub mod filter;
pub mod owners;

use differential_dataflow::input::InputSession;
use differential_dataflow::operators::{CountTotal, ThresholdTotal};
use serde::{Deserialize, Serialize};
use timely::dataflow::Scope as TimelyScope;

use crate::model::{Deployment, Detection, Event, Id, Image, Micros, Occurrence, Project, Score, Taxon};
pub use owners::{ByKey, Coll, Time};

/// A row that owns stored counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Owner {
    /// `main_sourceimage`.
    Image(Id),
    /// `main_event`.
    Event(Id),
    /// `main_deployment`.
    Deployment(Id),
}

/// One stored value of an owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Field {
    /// 1 while the owner row exists (so that an owner with nothing to count still reports 0s).
    Exists,
    /// Images of an event or deployment.
    Captures,
    /// Valid, passing detections.
    Detections,
    /// Passing occurrences.
    Occurrences,
    /// Events of a deployment.
    Events,
    /// Images of a deployment with a non-NULL size (`sum(size)` is NULL without any).
    SizedImages,
    /// `sum(size)` of a deployment's images.
    TotalSize,
    /// Distinct determinations of a deployment's passing occurrences.
    Taxa,
    /// Earliest image timestamp (event `start`, deployment `first_capture_timestamp`).
    FirstCapture,
    /// Latest image timestamp (event `end`, deployment `last_capture_timestamp`).
    LastCapture,
}

/// An output record: `((owner, field), value)`.
pub type Output = ((Owner, Field), i64);

/// What an item keyed by `(determination, P)` counts toward once its taxon passes `P`'s filter
/// (its score has already passed `P`'s threshold).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum Item {
    /// A valid detection on this image, for one of the image's owners' projects.
    Detection(Id),
    /// An occurrence of this event, or of this deployment (with a non-NULL event).
    Occurrence(Owner),
}

/// How an owner's counts are filtered: `P` NULL counts everything; otherwise `P`'s filter
/// with its threshold. An owner whose `P` has no project row gets no scope at all: its
/// threshold is NULL and `score >= NULL` never holds, so nothing counts under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum FilterScope {
    /// `P` is NULL.
    Unfiltered,
    /// `P` and its `default_filters_score_threshold`.
    Filtered(Id, Score),
}

impl FilterScope {
    fn project(self) -> Option<Id> {
        match self {
            FilterScope::Unfiltered => None,
            FilterScope::Filtered(p, _) => Some(p),
        }
    }
}

/// An owner an occurrence may count toward, as seen from the occurrence's event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum Target {
    /// The event itself.
    Event(FilterScope),
    /// A deployment named by some occurrence of the event.
    Deployment(Id, FilterScope),
}

/// `score_ok` of SPEC §2: a NULL score never passes.
fn passes_threshold(score: Option<Score>, threshold: Score) -> bool {
    score.is_some_and(|s| s.passes(threshold))
}

/// The [`FilterScope`] of every owner given as `(owner, P)`.
fn scopes<'s, K>(projects: Coll<'s, (K, Option<Id>)>, thresholds: ByKey<'s, Id, Score>) -> Coll<'s, (K, FilterScope)>
where
    K: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
{
    let unfiltered = projects.clone().flat_map(|(k, p)| match p {
        None => Some((k, FilterScope::Unfiltered)),
        Some(_) => None,
    });
    let filtered = projects
        .flat_map(|(k, p)| p.map(|p| (p, k)))
        .join_core(thresholds, |p, k, threshold| Some((k.clone(), FilterScope::Filtered(*p, *threshold))));
    unfiltered.concat(filtered)
}

/// The input handles of the graph, one per table.
pub struct Inputs {
    /// `(id, row)` of `main_sourceimage`.
    pub images: InputSession<Time, (Id, Image), isize>,
    /// `(id, row)` of `main_detection`; the id is dropped at once (counts never need it).
    pub detections: InputSession<Time, Detection, isize>,
    /// `(id, row)` of `main_occurrence`.
    pub occurrences: InputSession<Time, (Id, Occurrence), isize>,
    /// `(id, row)` of `main_taxon`.
    pub taxa: InputSession<Time, (Id, Taxon), isize>,
    /// `(id, row)` of `main_project`.
    pub projects: InputSession<Time, (Id, Project), isize>,
    /// `(project, taxon)` include rows.
    pub include_taxa: InputSession<Time, (Id, Id), isize>,
    /// `(project, taxon)` exclude rows.
    pub exclude_taxa: InputSession<Time, (Id, Id), isize>,
    /// `(id, row)` of `main_event`.
    pub events: InputSession<Time, (Id, Event), isize>,
    /// `(id, row)` of `main_deployment`.
    pub deployments: InputSession<Time, (Id, Deployment), isize>,
}

impl Inputs {
    /// Fresh, unconnected input sessions.
    pub fn new() -> Self {
        Inputs {
            images: InputSession::new(),
            detections: InputSession::new(),
            occurrences: InputSession::new(),
            taxa: InputSession::new(),
            projects: InputSession::new(),
            include_taxa: InputSession::new(),
            exclude_taxa: InputSession::new(),
            events: InputSession::new(),
            deployments: InputSession::new(),
        }
    }

    /// Moves every input to `time` and makes its buffered updates visible to the dataflow.
    pub fn advance_to(&mut self, time: Time) {
        self.images.advance_to(time);
        self.detections.advance_to(time);
        self.occurrences.advance_to(time);
        self.taxa.advance_to(time);
        self.projects.advance_to(time);
        self.include_taxa.advance_to(time);
        self.exclude_taxa.advance_to(time);
        self.events.advance_to(time);
        self.deployments.advance_to(time);
        self.images.flush();
        self.detections.flush();
        self.occurrences.flush();
        self.taxa.flush();
        self.projects.flush();
        self.include_taxa.flush();
        self.exclude_taxa.flush();
        self.events.flush();
        self.deployments.flush();
    }
}

impl Default for Inputs {
    fn default() -> Self {
        Self::new()
    }
}

/// Wires the count graph in `scope`, reading from `inputs`; returns the output collection.
pub fn build<'s>(scope: TimelyScope<'s, Time>, inputs: &mut Inputs) -> Coll<'s, Output> {
    let images = inputs.images.to_collection(scope);
    let detections = inputs.detections.to_collection(scope);
    let occurrences = inputs.occurrences.to_collection(scope);
    let taxa = inputs.taxa.to_collection(scope);
    let projects = inputs.projects.to_collection(scope);
    let include = inputs.include_taxa.to_collection(scope);
    let exclude = inputs.exclude_taxa.to_collection(scope);
    let events = inputs.events.to_collection(scope);
    let deployments = inputs.deployments.to_collection(scope);

    // P of every owner row, and the scope its counts are filtered under.
    let deployment_projects = deployments.clone().map(|(d, row)| (d, row.project));
    let deployment_ids = deployments.clone().map(|(d, _)| d);
    let thresholds = projects.map(|(p, row)| (p, row.threshold)).arrange_by_key_named("Arrange: project thresholds");
    let deployment_scopes =
        scopes(deployment_projects.clone(), thresholds.clone()).arrange_by_key_named("Arrange: deployment scopes");
    let deployment_projects = deployment_projects.arrange_by_key_named("Arrange: deployment projects");
    let event_projects = owners::resolve(
        events.clone().map(|(e, row)| (e, (row.project, row.deployment))),
        deployment_projects.clone(),
        deployment_ids.clone(),
    );
    let event_scopes = scopes(event_projects, thresholds.clone()).arrange_by_key_named("Arrange: event scopes");
    let image_projects = owners::resolve(
        images.clone().map(|(i, row)| (i, (row.project, row.deployment))),
        deployment_projects,
        deployment_ids,
    );

    // ((image, scope), owner): the scope each of an image's owners counts its detections under.
    let image_owners = scopes(image_projects, thresholds)
        .map(|(i, scope)| ((i, scope), Owner::Image(i)))
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.event.map(|e| (e, i)))
                .join_core(event_scopes.clone(), |e, i, scope| Some(((*i, *scope), Owner::Event(*e)))),
        )
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.deployment.map(|d| (d, i)))
                .join_core(deployment_scopes.clone(), |d, i, scope| Some(((*i, *scope), Owner::Deployment(*d)))),
        );
    let image_demand = image_owners
        .clone()
        .flat_map(|((i, scope), _owner)| match scope {
            FilterScope::Filtered(p, threshold) => Some((i, (p, threshold))),
            FilterScope::Unfiltered => None,
        })
        .distinct_total()
        .arrange_by_key_named("Arrange: image demand");

    // Valid detections as a multiset of (image, occurrence): detection ids are never needed.
    // Each is checked against the threshold of every project its image's owners demand; what
    // remains waits for the taxon verdict, keyed by (determination, project).
    let valid = detections.flat_map(|d| if d.valid { Some((d.image, d.occurrence)) } else { None });
    let determinations = occurrences
        .clone()
        .map(|(o, row)| (o, (row.determination, row.score)))
        .arrange_by_key_named("Arrange: occurrence determinations");
    let detection_items = valid
        .clone()
        .flat_map(|(i, o)| o.map(|o| (o, i)))
        .join_core(determinations, |_o, i, (t, s)| Some((*i, (*t, *s))))
        .join_core(image_demand, |i, (t, s), (p, threshold)| {
            passes_threshold(*s, *threshold).then_some(((*t, *p), Item::Detection(*i)))
        });

    // Occurrences toward their own event and, when the event is set, their own deployment:
    // one arrangement by event, joined with each event's targets (the event itself, and every
    // deployment its occurrences name).
    let by_event = occurrences
        .clone()
        .flat_map(|(_o, row)| row.event.map(|e| (e, (row.deployment, row.determination, row.score))));
    let event_deployments = occurrences
        .flat_map(|(_o, row)| match (row.event, row.deployment) {
            (Some(e), Some(d)) => Some((d, e)),
            _ => None,
        })
        .distinct_total();
    let targets = event_scopes
        .as_collection(|e, scope| (*e, Target::Event(*scope)))
        .concat(
            event_deployments.join_core(deployment_scopes, |d, e, scope| Some((*e, Target::Deployment(*d, *scope)))),
        )
        .arrange_by_key_named("Arrange: occurrence targets");
    let occurrence_hits = by_event.join_core(targets, |e, (d, t, s), target| {
        let (owner, scope) = match target {
            Target::Event(scope) => (Owner::Event(*e), scope),
            Target::Deployment(td, scope) if *d == Some(*td) => (Owner::Deployment(*td), scope),
            Target::Deployment(..) => return None,
        };
        match scope {
            FilterScope::Unfiltered => Some((owner, *t, None)),
            FilterScope::Filtered(p, threshold) => passes_threshold(*s, *threshold).then_some((owner, *t, Some(*p))),
        }
    });
    let direct_hits =
        occurrence_hits.clone().flat_map(|(owner, t, p)| if p.is_none() { Some((owner, t)) } else { None });
    let occurrence_items = occurrence_hits.flat_map(|(owner, t, p)| p.map(|p| ((t, p), Item::Occurrence(owner))));

    // The taxon part of the filter, for the (determination, project) pairs in demand.
    let items = detection_items.concat(occurrence_items);
    let verdicts = filter::verdicts(
        items.clone().map(|(key, _)| key),
        filter::FilterInputs { taxa, include: include.clone(), exclude },
    );
    let passed = items.join_core(verdicts, |(t, p), item, ()| Some((*t, *p, *item)));

    // Detections per (image, scope): filtered ones per demanded project, all valid ones when
    // unfiltered; summed into each owner of the image under that owner's scope.
    let image_detections = passed
        .clone()
        .flat_map(|(_t, p, item)| match item {
            Item::Detection(i) => Some((i, Some(p))),
            Item::Occurrence(_) => None,
        })
        .concat(valid.map(|(i, _o)| (i, None)))
        .map(|key| (key, ()))
        .arrange_by_key_named("Arrange: image detections by project");
    let detection_counts = image_owners
        .map(|((i, scope), owner)| ((i, scope.project()), owner))
        .join_core(image_detections, |_key, owner, ()| Some((*owner, Field::Detections)));

    // Occurrence counts and the (deployment, determination) pairs behind taxa_count.
    let occurrence_hits = passed
        .flat_map(|(t, _p, item)| match item {
            Item::Occurrence(owner) => Some((owner, t)),
            Item::Detection(_) => None,
        })
        .concat(direct_hits);
    let taxa_counts = occurrence_hits
        .clone()
        .flat_map(|(owner, t)| match owner {
            Owner::Deployment(d) => Some((d, t)),
            _ => None,
        })
        .distinct_total()
        .map(|(d, _t)| (Owner::Deployment(d), Field::Taxa));
    let occurrence_counts = occurrence_hits.map(|(owner, _t)| (owner, Field::Occurrences));

    // Unfiltered counts.
    let existing = images
        .clone()
        .map(|(i, _)| (Owner::Image(i), Field::Exists))
        .concat(events.clone().map(|(e, _)| (Owner::Event(e), Field::Exists)))
        .concat(deployments.map(|(d, _)| (Owner::Deployment(d), Field::Exists)));
    let captures = images.clone().flat_map(|(_i, row)| {
        let event = row.event.map(|e| (Owner::Event(e), Field::Captures));
        let deployment = row.deployment.map(|d| (Owner::Deployment(d), Field::Captures));
        let sized = row.deployment.filter(|_| row.size.is_some()).map(|d| (Owner::Deployment(d), Field::SizedImages));
        event.into_iter().chain(deployment).chain(sized)
    });
    let sizes = images.clone().explode(|(_i, row)| match (row.deployment, row.size) {
        (Some(d), Some(size)) => Some(((Owner::Deployment(d), Field::TotalSize), size as isize)),
        _ => None,
    });
    let event_counts = events.flat_map(|(_e, row)| row.deployment.map(|d| (Owner::Deployment(d), Field::Events)));

    let counts = existing
        .concat(captures)
        .concat(sizes)
        .concat(event_counts)
        .concat(detection_counts)
        .concat(occurrence_counts)
        .concat(taxa_counts)
        .count_total()
        .map(|(key, n)| (key, n as i64));

    counts.concat(capture_extremes(images))
}

/// Earliest and latest non-NULL image timestamp per event and per deployment.
///
/// A plain `reduce` per owner rescans the owner's whole group on every change (125k images of
/// a 1M-detection deployment for each new capture). Instead the candidates are reduced in a
/// tree, as Materialize renders hierarchical min/max: images are hashed into 4,096 buckets per
/// owner, each bucket keeps only its min and max, those fold into 64 buckets, then into one.
/// A change rescans one leaf bucket and two small candidate lists.
fn capture_extremes<'s>(images: Coll<'s, (Id, Image)>) -> Coll<'s, Output> {
    let leaves = images.flat_map(|(i, row)| {
        let ts = row.timestamp;
        let bucket = bucket_of(i);
        let event = row.event.zip(ts).map(|(e, t)| ((Owner::Event(e), bucket), t));
        let deployment = row.deployment.zip(ts).map(|(d, t)| ((Owner::Deployment(d), bucket), t));
        event.into_iter().chain(deployment)
    });
    let level = |candidates: Coll<'s, ((Owner, u64), Micros)>, name: &str, shift: u32| {
        candidates
            .reduce_named(name, |_key, input: &[(&Micros, isize)], output| {
                // Values arrive sorted, with positive multiplicity.
                if let (Some(first), Some(last)) = (input.first(), input.last()) {
                    output.push((*first.0, 1isize));
                    if last.0 != first.0 {
                        output.push((*last.0, 1isize));
                    }
                }
            })
            .map(move |((owner, bucket), ts)| ((owner, bucket >> shift), ts))
    };
    let middle = level(leaves, "Reduce: capture extremes, 4096 buckets", 6);
    let top = level(middle, "Reduce: capture extremes, 64 buckets", 6);
    top.map(|((owner, _bucket), ts)| (owner, ts))
        .reduce_named("Reduce: capture extremes", |_owner, input: &[(&Micros, isize)], output| {
            if let (Some(first), Some(last)) = (input.first(), input.last()) {
                output.push(((Field::FirstCapture, *first.0), 1isize));
                output.push(((Field::LastCapture, *last.0), 1isize));
            }
        })
        .map(|(owner, (field, value))| ((owner, field), value))
}

/// A 12-bit bucket of an image id (Fibonacci hashing spreads sequential ids evenly). The id's
/// bits are read as unsigned so that the shift is logical and every bucket is in `0..4096`.
fn bucket_of(image: Id) -> u64 {
    (image as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52
}
