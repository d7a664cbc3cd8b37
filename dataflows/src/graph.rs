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
mod rows;
pub mod spines;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::operators::{CountTotal, ThresholdTotal};
use serde::{Deserialize, Serialize};
use timely::dataflow::{InputHandleVec, Scope as TimelyScope};

use crate::hashing::{IdMap, IdSet};
use crate::model::{Deployment, Event, FilterTaxon, Id, InputBatch, Micros, Project, Score, Taxon};
pub use owners::{ByKey, Coll, Time};
use rows::{DetectionRow, ImageRow, OccurrenceRow, OptI64, OptScore};
use spines::ArrangeCompact;

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
fn passes_threshold(score: OptScore, threshold: Score) -> bool {
    score.get().is_some_and(|s| s.passes(threshold))
}

/// The [`FilterScope`] of every owner given as `(owner, P)`, with the project rows by id.
fn scopes<'s, K>(projects: Coll<'s, (K, Option<Id>)>, rows: ByKey<'s, Id, Project>) -> Coll<'s, (K, FilterScope)>
where
    K: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
{
    let unfiltered = projects.clone().flat_map(|(k, p)| match p {
        None => Some((k, FilterScope::Unfiltered)),
        Some(_) => None,
    });
    let filtered = projects
        .flat_map(|(k, p)| p.map(|p| (p, k)))
        .arrange_by_key_named_compact("Arrange: owners by project")
        .join_core(rows, |p, k, row| Some((k.clone(), FilterScope::Filtered(*p, row.threshold))));
    unfiltered.concat(filtered)
}

/// One table's input: upserts `(id, Some(row))` and deletes `(id, None)` at a time.
pub type Upserts<R> = InputHandleVec<Time, (Id, Option<R>, Time)>;

/// The input handles of the graph, one per table. Only worker 0 of process 0 feeds them; every
/// other worker drops its handles at once.
pub struct Inputs {
    /// `main_sourceimage`, compacted.
    images: Upserts<ImageRow>,
    /// `main_detection`'s valid rows, compacted.
    detections: Upserts<DetectionRow>,
    /// `main_occurrence`, compacted.
    occurrences: Upserts<OccurrenceRow>,
    /// `main_taxon`.
    taxa: Upserts<Taxon>,
    /// `main_project`.
    projects: Upserts<Project>,
    /// Include filter rows.
    include_taxa: Upserts<FilterTaxon>,
    /// Exclude filter rows.
    exclude_taxa: Upserts<FilterTaxon>,
    /// `main_event`.
    events: Upserts<Event>,
    /// `main_deployment`.
    deployments: Upserts<Deployment>,
}

impl Inputs {
    /// Fresh, unconnected input handles.
    pub fn new() -> Self {
        Inputs {
            images: Upserts::new(),
            detections: Upserts::new(),
            occurrences: Upserts::new(),
            taxa: Upserts::new(),
            projects: Upserts::new(),
            include_taxa: Upserts::new(),
            exclude_taxa: Upserts::new(),
            events: Upserts::new(),
            deployments: Upserts::new(),
        }
    }

    /// Sends `batch` as upserts at `time`. Within one time the upsert operator keeps the
    /// greatest value of an id, not the last, so each table's changes are first folded to the
    /// last change per id (the batch's contract). Images, detections and occurrences are sent
    /// in their compact forms (see [`rows`]).
    pub fn send(&mut self, batch: &InputBatch, time: Time) {
        fn table<R: Clone + 'static, S: Clone + 'static>(
            input: &mut Upserts<S>,
            changes: &[(Id, Option<R>)],
            time: Time,
            compact: impl Fn(&R) -> Option<S>,
        ) {
            let repeated = {
                let mut seen = IdSet::default();
                changes.iter().any(|(id, _)| !seen.insert(*id))
            };
            if repeated {
                let mut last: IdMap<Id, usize> = IdMap::default();
                for (at, (id, _)) in changes.iter().enumerate() {
                    last.insert(*id, at);
                }
                for (at, (id, row)) in changes.iter().enumerate() {
                    if last.get(id) == Some(&at) {
                        input.send((*id, row.as_ref().and_then(&compact), time));
                    }
                }
            } else {
                for (id, row) in changes {
                    input.send((*id, row.as_ref().and_then(&compact), time));
                }
            }
        }
        table(&mut self.images, &batch.images, time, |r| Some(ImageRow::from(r)));
        table(&mut self.detections, &batch.detections, time, DetectionRow::of);
        table(&mut self.occurrences, &batch.occurrences, time, |r| Some(OccurrenceRow::from(r)));
        table(&mut self.taxa, &batch.taxa, time, |r| Some(r.clone()));
        table(&mut self.projects, &batch.projects, time, |r| Some(r.clone()));
        table(&mut self.include_taxa, &batch.include_taxa, time, |r| Some(r.clone()));
        table(&mut self.exclude_taxa, &batch.exclude_taxa, time, |r| Some(r.clone()));
        table(&mut self.events, &batch.events, time, |r| Some(r.clone()));
        table(&mut self.deployments, &batch.deployments, time, |r| Some(r.clone()));
    }

    /// Moves every input to `time` and makes what was sent visible to the dataflow.
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

/// The current rows of one table, arranged by id on the worker that owns the id: built from
/// the table's upserts, this arrangement is the only copy of the rows the engine keeps. Also
/// returns the rows as a collection, whose changes count toward `rows` (+1 for a row inserted,
/// -1 for one deleted, nothing for one replaced).
fn table<'s, R>(
    scope: TimelyScope<'s, Time>,
    input: &mut Upserts<R>,
    name: &str,
    rows: &Arc<AtomicI64>,
) -> (ByKey<'s, Id, R>, Coll<'s, (Id, R)>)
where
    R: differential_dataflow::ExchangeData + std::hash::Hash,
{
    let arranged =
        arrange_from_upsert::<spines::Builder<Id, R>, spines::Spine<Id, R>, Id, R>(input.to_stream(scope), name);
    let rows = Arc::clone(rows);
    let collection =
        arranged.clone().as_collection(|id, row| (*id, row.clone())).inspect_batch(move |_time, updates| {
            let net: isize = updates.iter().map(|(_row, _time, diff)| *diff).sum();
            rows.fetch_add(net as i64, Ordering::Relaxed);
        });
    (arranged, collection)
}

/// Wires the count graph in `scope`, reading from `inputs`; returns the output collection.
pub fn build<'s>(scope: TimelyScope<'s, Time>, inputs: &mut Inputs, rows: Arc<AtomicI64>) -> Coll<'s, Output> {
    let (_, images) = table(scope, &mut inputs.images, "Upsert: images", &rows);
    let (_, valid) = table(scope, &mut inputs.detections, "Upsert: detections", &rows);
    let (occurrences_by_id, occurrences) = table(scope, &mut inputs.occurrences, "Upsert: occurrences", &rows);
    let (taxa, _) = table(scope, &mut inputs.taxa, "Upsert: taxa", &rows);
    let (projects, _) = table(scope, &mut inputs.projects, "Upsert: projects", &rows);
    let (_, include) = table(scope, &mut inputs.include_taxa, "Upsert: include taxa", &rows);
    let (_, exclude) = table(scope, &mut inputs.exclude_taxa, "Upsert: exclude taxa", &rows);
    let (_, events) = table(scope, &mut inputs.events, "Upsert: events", &rows);
    let (deployments_by_id, deployments) = table(scope, &mut inputs.deployments, "Upsert: deployments", &rows);
    let include = include.map(|(_id, row)| (row.project, row.taxon));
    let exclude = exclude.map(|(_id, row)| (row.project, row.taxon));

    // P of every owner row, and the scope its counts are filtered under.
    let deployment_ids = deployments.clone().map(|(d, _)| d);
    let deployment_scopes = scopes(deployments.clone().map(|(d, row)| (d, row.project)), projects.clone())
        .arrange_by_key_named_compact("Arrange: deployment scopes");
    let event_projects = owners::resolve(
        events.clone().map(|(e, row)| (e, (row.project, row.deployment))),
        deployments_by_id.clone(),
        deployment_ids.clone(),
    );
    let event_scopes = scopes(event_projects, projects.clone()).arrange_by_key_named_compact("Arrange: event scopes");
    let image_projects = owners::resolve(
        images.clone().map(|(i, row)| (i, (row.project(), row.deployment()))),
        deployments_by_id,
        deployment_ids,
    );

    // ((image, scope), owner): the scope each of an image's owners counts its detections under.
    let image_owners = scopes(image_projects, projects)
        .map(|(i, scope)| ((i, scope), Owner::Image(i)))
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.event().map(|e| (e, i)))
                .arrange_by_key_named_compact("Arrange: images by event")
                .join_core(event_scopes.clone(), |e, i, scope| Some(((*i, *scope), Owner::Event(*e)))),
        )
        .concat(
            images
                .clone()
                .flat_map(|(i, row)| row.deployment().map(|d| (d, i)))
                .arrange_by_key_named_compact("Arrange: images by deployment")
                .join_core(deployment_scopes.clone(), |d, i, scope| Some(((*i, *scope), Owner::Deployment(*d)))),
        );
    let image_demand = spines::arrange_keys(
        image_owners.clone().flat_map(|((i, scope), _owner)| match scope {
            FilterScope::Filtered(p, threshold) => Some((i, (p, threshold))),
            FilterScope::Unfiltered => None,
        }),
        "Arrange: image demand, distinct",
    )
    .distinct_total()
    .arrange_by_key_named_compact("Arrange: image demand");

    // Valid detections (the only ones the dataflow holds) as a multiset of (image, occurrence):
    // detection ids are never needed. Each is checked against the threshold of every project
    // its image's owners demand; what remains waits for the taxon verdict, keyed by
    // (determination, project).
    let valid = valid.map(|(_id, d)| (d.image, d.occurrence));
    let detection_items = valid
        .clone()
        .flat_map(|(i, o)| o.get().map(|o| (o, i)))
        .arrange_by_key_named_compact("Arrange: detections by occurrence")
        .join_core(occurrences_by_id, |_o, i, row| Some((*i, (row.determination, row.score))))
        .arrange_by_key_named_compact("Arrange: detection determinations by image")
        .join_core(image_demand, |i, (t, s), (p, threshold)| {
            passes_threshold(*s, *threshold).then_some(((*t, *p), Owner::Image(*i)))
        });

    // Occurrences toward their own event and, when the event is set, their own deployment:
    // one arrangement by event, joined with each event's targets (the event itself, and every
    // deployment its occurrences name).
    let by_event = occurrences
        .clone()
        .flat_map(|(_o, row)| row.event.get().map(|e| (e, (row.deployment, row.determination, row.score))));
    let event_deployments = occurrences
        .flat_map(|(_o, row)| match (row.event.get(), row.deployment.get()) {
            (Some(e), Some(d)) => Some((d, e)),
            _ => None,
        })
        .distinct_total();
    let targets = event_scopes
        .as_collection(|e, scope| (*e, Target::Event(*scope)))
        .concat(
            event_deployments.join_core(deployment_scopes, |d, e, scope| Some((*e, Target::Deployment(*d, *scope)))),
        )
        .arrange_by_key_named_compact("Arrange: occurrence targets");
    let occurrence_hits = by_event.arrange_by_key_named_compact("Arrange: occurrences by event").join_core(
        targets,
        |e, (d, t, s), target| {
            let (owner, scope) = match target {
                Target::Event(scope) => (Owner::Event(*e), scope),
                Target::Deployment(td, scope) if d.get() == Some(*td) => (Owner::Deployment(*td), scope),
                Target::Deployment(..) => return None,
            };
            match scope {
                FilterScope::Unfiltered => Some((owner, *t, None)),
                FilterScope::Filtered(p, threshold) => {
                    passes_threshold(*s, *threshold).then_some((owner, *t, Some(*p)))
                }
            }
        },
    );
    let direct_hits =
        occurrence_hits.clone().flat_map(|(owner, t, p)| if p.is_none() { Some((owner, t)) } else { None });
    let occurrence_items = occurrence_hits.flat_map(|(owner, t, p)| p.map(|p| ((t, p), owner)));

    // The taxon part of the filter, for the (determination, project) pairs in demand.
    // Items are ((determination, P), owner), their score already past P's threshold; each
    // counts once its taxon passes P's filter. `Owner::Image(i)` is a valid detection on image
    // `i` (for one of the image's owners' projects); `Owner::Event(e)` and
    // `Owner::Deployment(d)` are an occurrence of that event or deployment. Occurrences never
    // count toward images, so the owner alone says which it is, in 16 bytes.
    let items = detection_items.concat(occurrence_items);
    let verdicts = filter::verdicts(
        items.clone().map(|(key, _)| key),
        filter::FilterInputs { taxa, include: include.clone(), exclude },
    );
    let passed = items
        .arrange_by_key_named_compact("Arrange: items by taxon and project")
        .join_core(verdicts, |(t, p), item, ()| Some((*t, *p, *item)));

    // Detections per (image, scope): filtered ones per demanded project, all valid ones when
    // unfiltered; summed into each owner of the image under that owner's scope.
    let image_detections = passed
        .clone()
        .flat_map(|(_t, p, item)| match item {
            Owner::Image(i) => Some((i, OptI64::from(Some(p)))),
            Owner::Event(_) | Owner::Deployment(_) => None,
        })
        .concat(valid.map(|(i, _o)| (i, OptI64::from(None))))
        .map(|key| (key, ()))
        .arrange_by_key_named_compact("Arrange: image detections by project");
    let detection_counts = image_owners
        .map(|((i, scope), owner)| ((i, OptI64::from(scope.project())), owner))
        .arrange_by_key_named_compact("Arrange: image owners by project")
        .join_core(image_detections, |_key, owner, ()| Some((*owner, Field::Detections)));

    // Occurrence counts and the (deployment, determination) pairs behind taxa_count.
    let occurrence_hits = passed
        .flat_map(|(t, _p, item)| match item {
            Owner::Image(_) => None,
            owner => Some((owner, t)),
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
        let event = row.event().map(|e| (Owner::Event(e), Field::Captures));
        let deployment = row.deployment().map(|d| (Owner::Deployment(d), Field::Captures));
        let sized =
            row.deployment().filter(|_| row.size().is_some()).map(|d| (Owner::Deployment(d), Field::SizedImages));
        event.into_iter().chain(deployment).chain(sized)
    });
    let sizes = images.clone().explode(|(_i, row)| match (row.deployment(), row.size()) {
        (Some(d), Some(size)) => Some(((Owner::Deployment(d), Field::TotalSize), size as isize)),
        _ => None,
    });
    let event_counts = events.flat_map(|(_e, row)| row.deployment.map(|d| (Owner::Deployment(d), Field::Events)));

    let counted = existing
        .concat(captures)
        .concat(sizes)
        .concat(event_counts)
        .concat(detection_counts)
        .concat(occurrence_counts)
        .concat(taxa_counts);
    let counts = spines::arrange_keys(counted, "Arrange: counted").count_total().map(|(key, n)| (key, n as i64));

    counts.concat(capture_extremes(images))
}

/// Earliest and latest non-NULL image timestamp per event and per deployment.
///
/// A plain `reduce` per owner rescans the owner's whole group on every change (125k images of
/// a 1M-detection deployment for each new capture). Instead the candidates are reduced in a
/// tree, as Materialize renders hierarchical min/max: images are hashed into 1,024 buckets per
/// owner, each bucket keeps only its min and max, those fold into 32 buckets, then into one.
/// A change rescans one leaf bucket and two small candidate lists. (With 4,096 leaf buckets,
/// the candidates, 2 per bucket in two arrangements, were 241,000 records at 1M detections,
/// a quarter of a record per detection; with 1,024 they are 57,000, and a result costs the
/// same within the benchmark's noise.)
fn capture_extremes<'s>(images: Coll<'s, (Id, ImageRow)>) -> Coll<'s, Output> {
    let leaves = images.flat_map(|(i, row)| {
        let ts = row.timestamp();
        let bucket = bucket_of(i);
        let event = row.event().zip(ts).map(|(e, t)| ((Owner::Event(e), bucket), t));
        let deployment = row.deployment().zip(ts).map(|(d, t)| ((Owner::Deployment(d), bucket), t));
        event.into_iter().chain(deployment)
    });
    let level = |candidates: Coll<'s, ((Owner, u64), Micros)>, name: &str, shift: u32| {
        reduce(candidates, name, |_key, input, output| {
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
    let middle = level(leaves, "capture extremes, 1024 buckets", 5);
    let top = level(middle, "capture extremes, 32 buckets", 5);
    reduce(top.map(|((owner, _bucket), ts)| (owner, ts)), "capture extremes", |_owner, input, output| {
        if let (Some(first), Some(last)) = (input.first(), input.last()) {
            output.push(((Field::FirstCapture, *first.0), 1isize));
            output.push(((Field::LastCapture, *last.0), 1isize));
        }
    })
    .map(|(owner, (field, value))| ((owner, field), value))
}

/// Differential's `reduce_named`, with its input and output arranged in [`spines`]' layout.
fn reduce<'s, K, V, V2>(
    input: Coll<'s, (K, V)>,
    name: &str,
    logic: impl FnMut(&K, &[(&V, isize)], &mut Vec<(V2, isize)>) + 'static,
) -> Coll<'s, (K, V2)>
where
    K: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
    V: differential_dataflow::ExchangeData,
    V2: differential_dataflow::ExchangeData,
{
    input
        .arrange_by_key_named_compact(&format!("Arrange: {name}"))
        .reduce_abelian::<_, spines::Builder<K, V2>, spines::Spine<K, V2>, _, _>(
            &format!("Reduce: {name}"),
            logic,
            |updates, key, changes| {
                updates.clear();
                updates.extend(changes.drain(..).map(|(v, t, r)| ((key.clone(), v), t, r)));
            },
        )
        .as_collection(|key, value| (key.clone(), value.clone()))
}

/// A 10-bit bucket of an image id (Fibonacci hashing spreads sequential ids evenly). The id's
/// bits are read as unsigned so that the shift is logical and every bucket is in `0..1024`.
fn bucket_of(image: Id) -> u64 {
    (image as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54
}
