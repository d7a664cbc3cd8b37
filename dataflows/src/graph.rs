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
//! detections ─(occurrence)─▶ ⋈ occurrences ─(image)─▶ ⋈ image demand ─┐
//! occurrences ─(event)─────▶ ⋈ event P ──────────────────────────────┼─▶ items keyed (t, P)
//! occurrences ─(deployment)▶ ⋈ deployment P ─────────────────────────┘        │
//!                                 filter::verdicts(demanded (t, P)) ─────────▶ ⋈ score ≥ T
//! ```
//!
//! Detection counts are computed per `(image, P)` and summed per owner, so an image whose
//! image, event and deployment share one project (the usual case) is filtered once.

pub mod filter;
pub mod owners;

use differential_dataflow::input::InputSession;
use differential_dataflow::operators::{CountTotal, ThresholdTotal};
use serde::{Deserialize, Serialize};
use timely::dataflow::Scope;

use crate::model::{Deployment, Detection, Event, Id, Image, Micros, Occurrence, Project, Taxon};
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

/// What an item keyed by `(determination, P)` counts toward once it passes `P`'s filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum Item {
    /// A valid detection on this image, evaluated for one of the image's owners' projects.
    Detection(Id),
    /// An occurrence of this event.
    EventOccurrence(Id),
    /// An occurrence of this deployment with a non-NULL event.
    DeploymentOccurrence(Id),
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
pub fn build<'s>(scope: Scope<'s, Time>, inputs: &mut Inputs) -> Coll<'s, Output> {
    let images = inputs.images.to_collection(scope);
    let detections = inputs.detections.to_collection(scope);
    let occurrences = inputs.occurrences.to_collection(scope);
    let taxa = inputs.taxa.to_collection(scope);
    let projects = inputs.projects.to_collection(scope);
    let include = inputs.include_taxa.to_collection(scope);
    let exclude = inputs.exclude_taxa.to_collection(scope);
    let events = inputs.events.to_collection(scope);
    let deployments = inputs.deployments.to_collection(scope);

    // P of every owner row.
    let deployment_projects = deployments
        .clone()
        .map(|(d, row)| (d, row.project))
        .arrange_by_key_named("Arrange: deployment projects");
    let deployment_ids = deployments.clone().map(|(d, _)| d);
    let event_projects = owners::resolve(
        events.clone().map(|(e, row)| (e, (row.project, row.deployment))),
        deployment_projects.clone(),
        deployment_ids.clone(),
    )
    .arrange_by_key_named("Arrange: event projects");
    let image_projects = owners::resolve(
        images.clone().map(|(i, row)| (i, (row.project, row.deployment))),
        deployment_projects.clone(),
        deployment_ids,
    );

    // ((image, P of owner), owner): which project each of an image's owners filters it by.
    let image_owners = image_projects
        .map(|(i, p)| ((i, p), Owner::Image(i)))
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.event.map(|e| (e, i)))
                .join_core(event_projects.clone(), |e, i, p| Some(((*i, *p), Owner::Event(*e)))),
        )
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.deployment.map(|d| (d, i)))
                .join_core(deployment_projects.clone(), |d, i, p| Some(((*i, *p), Owner::Deployment(*d)))),
        );
    let image_demand = image_owners
        .clone()
        .flat_map(|((i, p), _owner)| p.map(|p| (i, p)))
        .distinct_total()
        .arrange_by_key_named("Arrange: image demand");

    // Valid detections as a multiset of (image, occurrence): detection ids are never needed.
    let valid = detections.flat_map(|d| if d.valid { Some((d.image, d.occurrence)) } else { None });
    let determinations = occurrences
        .clone()
        .map(|(o, row)| (o, (row.determination, row.score)))
        .arrange_by_key_named("Arrange: occurrence determinations");
    let detection_items = valid
        .clone()
        .flat_map(|(i, o)| o.map(|o| (o, i)))
        .join_core(determinations, |_o, i, (t, s)| Some((*i, (*t, *s))))
        .join_core(image_demand, |i, (t, s), p| Some(((*t, *p), (Item::Detection(*i), *s))));

    // Occurrences toward their own event and deployment.
    let event_occurrences = occurrences
        .clone()
        .flat_map(|(_o, row)| row.event.map(|e| (e, (row.determination, row.score))))
        .join_core(event_projects, |e, (t, s), p| Some((*e, *t, *s, *p)));
    let deployment_occurrences = occurrences
        .flat_map(|(_o, row)| match (row.event, row.deployment) {
            (Some(_), Some(d)) => Some((d, (row.determination, row.score))),
            _ => None,
        })
        .join_core(deployment_projects, |d, (t, s), p| Some((*d, *t, *s, *p)));
    let occurrence_items = event_occurrences
        .clone()
        .flat_map(|(e, t, s, p)| p.map(|p| ((t, p), (Item::EventOccurrence(e), s))))
        .concat(
            deployment_occurrences
                .clone()
                .flat_map(|(d, t, s, p)| p.map(|p| ((t, p), (Item::DeploymentOccurrence(d), s)))),
        );

    // Filter every item under its P.
    let items = detection_items.concat(occurrence_items);
    let verdicts = filter::verdicts(
        items.clone().map(|(key, _)| key),
        filter::FilterInputs {
            taxa,
            projects,
            include: include.clone(),
            exclude,
        },
    );
    let passed = items.join_core(verdicts, |(t, p), (item, score), threshold| match score {
        Some(score) if score.passes(*threshold) => Some((*t, *p, *item)),
        _ => None,
    });

    // Detections per (image, P): filtered ones for each demanded P, all valid ones for P NULL.
    let image_detections = passed
        .clone()
        .flat_map(|(_t, p, item)| match item {
            Item::Detection(i) => Some((i, Some(p))),
            _ => None,
        })
        .concat(valid.map(|(i, _o)| (i, None)))
        .map(|key| (key, ()))
        .arrange_by_key_named("Arrange: image detections by project");
    let detection_counts = image_owners.join_core(image_detections, |_key, owner, ()| Some((*owner, Field::Detections)));

    // Occurrence counts and the (deployment, determination) pairs behind taxa_count.
    let occurrence_counts = passed
        .clone()
        .flat_map(|(_t, _p, item)| match item {
            Item::EventOccurrence(e) => Some((Owner::Event(e), Field::Occurrences)),
            Item::DeploymentOccurrence(d) => Some((Owner::Deployment(d), Field::Occurrences)),
            Item::Detection(_) => None,
        })
        .concat(
            event_occurrences
                .flat_map(|(e, _t, _s, p)| if p.is_none() { Some((Owner::Event(e), Field::Occurrences)) } else { None }),
        )
        .concat(
            deployment_occurrences
                .clone()
                .flat_map(|(d, _t, _s, p)| if p.is_none() { Some((Owner::Deployment(d), Field::Occurrences)) } else { None }),
        );
    let taxa_counts = passed
        .flat_map(|(t, _p, item)| match item {
            Item::DeploymentOccurrence(d) => Some((d, t)),
            _ => None,
        })
        .concat(deployment_occurrences.flat_map(|(d, t, _s, p)| if p.is_none() { Some((d, t)) } else { None }))
        .distinct_total()
        .map(|(d, _t)| (Owner::Deployment(d), Field::Taxa));

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
fn capture_extremes<'s>(images: Coll<'s, (Id, Image)>) -> Coll<'s, Output> {
    images
        .flat_map(|(_i, row)| {
            let ts = row.timestamp;
            let event = row.event.zip(ts).map(|(e, t)| (Owner::Event(e), t));
            let deployment = row.deployment.zip(ts).map(|(d, t)| (Owner::Deployment(d), t));
            event.into_iter().chain(deployment)
        })
        .reduce_named("Reduce: capture extremes", |_owner, input: &[(&Micros, isize)], output| {
            // Values arrive sorted, and only with positive multiplicity.
            if let (Some(first), Some(last)) = (input.first(), input.last()) {
                output.push(((Field::FirstCapture, *first.0), 1isize));
                output.push(((Field::LastCapture, *last.0), 1isize));
            }
        })
        .map(|(owner, (field, value))| ((owner, field), value))
}
