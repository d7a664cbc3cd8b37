//! A from-scratch implementation of SPEC §2, written as literally as possible and independently
//! of the dataflow: the definition the dataflow is tested against.
//!
//! Each count is a loop over the rows its SQL reads. Secondary indexes (image → detections,
//! event → images, …) play the part of Postgres' indexes so that recomputing one owner costs
//! what Antenna's recompute costs: a scan of that owner's rows, not of the whole database.
//!
//! Dangling references follow SQL's outer-join semantics: a missing deployment gives no
//! fallback project (P NULL, nothing filtered); a project id without a `main_project` row has
//! a NULL threshold, and `score >= NULL` is never true, so nothing passes; a detection whose
//! occurrence row is missing has no occurrence.

use std::collections::BTreeSet;

use crate::counts::{AllCounts, DeploymentCounts, EventCounts, ImageCounts};
use crate::hashing::{IdMap, IdSet};
use crate::model::{Id, Occurrence};
use crate::tables::Tables;

/// Indexes over a [`Tables`] snapshot, and the count definitions evaluated over them.
pub struct Oracle<'a> {
    tables: &'a Tables,
    detections_by_image: IdMap<Id, Vec<Id>>,
    images_by_event: IdMap<Id, Vec<Id>>,
    images_by_deployment: IdMap<Id, Vec<Id>>,
    occurrences_by_event: IdMap<Id, Vec<Id>>,
    occurrences_by_deployment: IdMap<Id, Vec<Id>>,
    events_by_deployment: IdMap<Id, Vec<Id>>,
    include: IdMap<Id, IdSet<Id>>,
    exclude: IdMap<Id, IdSet<Id>>,
}

impl<'a> Oracle<'a> {
    /// Builds the indexes (one pass over every table).
    pub fn new(tables: &'a Tables) -> Self {
        fn index<R>(rows: &IdMap<Id, R>, key: impl Fn(&R) -> Option<Id>) -> IdMap<Id, Vec<Id>> {
            let mut index: IdMap<Id, Vec<Id>> = IdMap::default();
            for (id, row) in rows {
                if let Some(k) = key(row) {
                    index.entry(k).or_default().push(*id);
                }
            }
            index
        }
        let mut include: IdMap<Id, IdSet<Id>> = IdMap::default();
        for row in tables.include_taxa.values() {
            include.entry(row.project).or_default().insert(row.taxon);
        }
        let mut exclude: IdMap<Id, IdSet<Id>> = IdMap::default();
        for row in tables.exclude_taxa.values() {
            exclude.entry(row.project).or_default().insert(row.taxon);
        }
        Oracle {
            tables,
            detections_by_image: index(&tables.detections, |d| Some(d.image)),
            images_by_event: index(&tables.images, |i| i.event),
            images_by_deployment: index(&tables.images, |i| i.deployment),
            occurrences_by_event: index(&tables.occurrences, |o| o.event),
            occurrences_by_deployment: index(&tables.occurrences, |o| o.deployment),
            events_by_deployment: index(&tables.events, |e| e.deployment),
            include,
            exclude,
        }
    }

    /// `P`: the owner's own project, else its deployment's (a missing deployment gives none).
    fn project(&self, own: Option<Id>, deployment: Option<Id>) -> Option<Id> {
        own.or_else(|| deployment.and_then(|d| self.tables.deployments.get(&d)).and_then(|d| d.project))
    }

    /// `passes(o)` under project `p` (SPEC §2).
    pub fn passes(&self, p: Option<Id>, o: &Occurrence) -> bool {
        let Some(p) = p else {
            return true;
        };
        let Some(project) = self.tables.projects.get(&p) else {
            return false;
        };
        let score_ok = match o.score {
            Some(score) => score.passes(project.threshold),
            None => false,
        };
        let ancestors: Vec<Id> = match o.determination {
            Some(t) => {
                let mut a = vec![t];
                if let Some(taxon) = self.tables.taxa.get(&t) {
                    a.extend(taxon.ancestors.iter().copied());
                }
                a
            }
            None => Vec::new(),
        };
        let empty = IdSet::default();
        let include = self.include.get(&p).unwrap_or(&empty);
        let exclude = self.exclude.get(&p).unwrap_or(&empty);
        let incl_ok =
            include.is_empty() || (o.determination.is_some() && ancestors.iter().any(|a| include.contains(a)));
        let excl_ok = exclude.is_empty() || o.determination.is_none() || !ancestors.iter().any(|a| exclude.contains(a));
        score_ok && incl_ok && excl_ok
    }

    /// Valid detections on `images` that count under `p`.
    fn detections_on(&self, images: &[Id], p: Option<Id>) -> i64 {
        let mut n = 0;
        for image in images {
            for d in self.detections_by_image.get(image).map(Vec::as_slice).unwrap_or(&[]) {
                let det = &self.tables.detections[d];
                if !det.valid {
                    continue;
                }
                let counts = match p {
                    None => true,
                    Some(_) => match det.occurrence.and_then(|o| self.tables.occurrences.get(&o)) {
                        Some(occ) => self.passes(p, occ),
                        None => false,
                    },
                };
                if counts {
                    n += 1;
                }
            }
        }
        n
    }

    /// `main_sourceimage.detections_count`, or `None` if the image does not exist.
    pub fn image(&self, id: Id) -> Option<ImageCounts> {
        let image = self.tables.images.get(&id)?;
        let p = self.project(image.project, image.deployment);
        Some(ImageCounts { detections: self.detections_on(&[id], p) })
    }

    /// `main_event`'s counts, or `None` if the event does not exist.
    pub fn event(&self, id: Id) -> Option<EventCounts> {
        let event = self.tables.events.get(&id)?;
        let p = self.project(event.project, event.deployment);
        let images = self.images_by_event.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let timestamps: Vec<i64> = images.iter().filter_map(|i| self.tables.images[i].timestamp).collect();
        let occurrences = self.occurrences_by_event.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        Some(EventCounts {
            captures: images.len() as i64,
            detections: self.detections_on(images, p),
            occurrences: occurrences.iter().filter(|o| self.passes(p, &self.tables.occurrences[o])).count() as i64,
            start: timestamps.iter().copied().min(),
            end: timestamps.iter().copied().max(),
        })
    }

    /// `main_deployment`'s counts, or `None` if the deployment does not exist.
    pub fn deployment(&self, id: Id) -> Option<DeploymentCounts> {
        let deployment = self.tables.deployments.get(&id)?;
        let p = deployment.project;
        let images = self.images_by_deployment.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let sizes: Vec<i64> = images.iter().filter_map(|i| self.tables.images[i].size).collect();
        let timestamps: Vec<i64> = images.iter().filter_map(|i| self.tables.images[i].timestamp).collect();
        let passing: Vec<&Occurrence> = self
            .occurrences_by_deployment
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|o| &self.tables.occurrences[o])
            .filter(|o| o.event.is_some() && self.passes(p, o))
            .collect();
        let taxa: BTreeSet<Option<Id>> = passing.iter().map(|o| o.determination).collect();
        Some(DeploymentCounts {
            events: self.events_by_deployment.get(&id).map_or(0, Vec::len) as i64,
            captures: images.len() as i64,
            total_size: if sizes.is_empty() { None } else { Some(sizes.iter().sum()) },
            detections: self.detections_on(images, p),
            occurrences: passing.len() as i64,
            taxa: taxa.len() as i64,
            first_capture: timestamps.iter().copied().min(),
            last_capture: timestamps.iter().copied().max(),
        })
    }

    /// What Antenna recomputes after saving one result: the image's counts, and those of the
    /// image's event and deployment (`None` for an owner that does not exist).
    pub fn recompute_for_image(&self, id: Id) -> (Option<ImageCounts>, Option<EventCounts>, Option<DeploymentCounts>) {
        let image = self.tables.images.get(&id);
        (
            self.image(id),
            image.and_then(|i| i.event).and_then(|e| self.event(e)),
            image.and_then(|i| i.deployment).and_then(|d| self.deployment(d)),
        )
    }

    /// Every owner's counts.
    pub fn all(&self) -> AllCounts {
        let mut all = AllCounts::default();
        for id in self.tables.images.keys() {
            all.images.extend(self.image(*id).map(|c| (*id, c)));
        }
        for id in self.tables.events.keys() {
            all.events.extend(self.event(*id).map(|c| (*id, c)));
        }
        for id in self.tables.deployments.keys() {
            all.deployments.extend(self.deployment(*id).map(|c| (*id, c)));
        }
        all
    }
}

/// Recomputes every count of `tables` from scratch.
pub fn recompute(tables: &Tables) -> AllCounts {
    Oracle::new(tables).all()
}
