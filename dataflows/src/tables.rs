//! The current contents of every input table, and the translation of upserts and deletes into
//! the `+1` / `-1` updates differential dataflow consumes.
//!
//! The dataflow needs the old version of a row to retract it; callers (the Postgres outbox,
//! NATS ingest) only know the new version. [`Tables`] is that memory. It is also the state the
//! [`crate::oracle`] recomputes from, so the oracle and the dataflow always see the same input.

use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::hashing::IdMap;
use crate::model::{
    Deployment, Detection, Event, FilterTaxon, Id, Image, InputBatch, Occurrence, Project, TableChanges, Taxon,
};

/// Differential updates for one table: `(id, row)` with `+1` (insert) or `-1` (retract).
pub type TableUpdates<R> = Vec<((Id, R), isize)>;

/// The differential updates produced by applying one [`InputBatch`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Updates {
    /// `main_sourceimage`.
    pub images: TableUpdates<Image>,
    /// `main_detection`.
    pub detections: TableUpdates<Detection>,
    /// `main_occurrence`.
    pub occurrences: TableUpdates<Occurrence>,
    /// `main_taxon`.
    pub taxa: TableUpdates<Taxon>,
    /// `main_project`.
    pub projects: TableUpdates<Project>,
    /// Include filter rows.
    pub include_taxa: TableUpdates<FilterTaxon>,
    /// Exclude filter rows.
    pub exclude_taxa: TableUpdates<FilterTaxon>,
    /// `main_event`.
    pub events: TableUpdates<Event>,
    /// `main_deployment`.
    pub deployments: TableUpdates<Deployment>,
}

impl Updates {
    /// The number of `±1` updates.
    pub fn len(&self) -> usize {
        self.images.len()
            + self.detections.len()
            + self.occurrences.len()
            + self.taxa.len()
            + self.projects.len()
            + self.include_taxa.len()
            + self.exclude_taxa.len()
            + self.events.len()
            + self.deployments.len()
    }

    /// True when applying the batch changed no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every input table, by primary key.
///
/// Memory: one hash-map entry per row (about 50 bytes for a detection). Assumes the rows of
/// one process fit in memory, which holds for a full Antenna deployment (tens of millions of
/// detections) on the 24 GiB machines tally targets.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    /// `main_sourceimage`.
    pub images: IdMap<Id, Image>,
    /// `main_detection`.
    pub detections: IdMap<Id, Detection>,
    /// `main_occurrence`.
    pub occurrences: IdMap<Id, Occurrence>,
    /// `main_taxon`.
    pub taxa: IdMap<Id, Taxon>,
    /// `main_project`.
    pub projects: IdMap<Id, Project>,
    /// Include filter rows.
    pub include_taxa: IdMap<Id, FilterTaxon>,
    /// Exclude filter rows.
    pub exclude_taxa: IdMap<Id, FilterTaxon>,
    /// `main_event`.
    pub events: IdMap<Id, Event>,
    /// `main_deployment`.
    pub deployments: IdMap<Id, Deployment>,
}

impl Tables {
    /// Applies `batch` and returns the updates that take the old contents to the new ones.
    ///
    /// An upsert of an identical row, or a delete of a missing one, produces nothing: replays
    /// are free and cannot move a count.
    pub fn apply(&mut self, batch: &InputBatch) -> Updates {
        Updates {
            images: apply_table(&mut self.images, &batch.images),
            detections: apply_table(&mut self.detections, &batch.detections),
            occurrences: apply_table(&mut self.occurrences, &batch.occurrences),
            taxa: apply_table(&mut self.taxa, &batch.taxa),
            projects: apply_table(&mut self.projects, &batch.projects),
            include_taxa: apply_table(&mut self.include_taxa, &batch.include_taxa),
            exclude_taxa: apply_table(&mut self.exclude_taxa, &batch.exclude_taxa),
            events: apply_table(&mut self.events, &batch.events),
            deployments: apply_table(&mut self.deployments, &batch.deployments),
        }
    }

    /// The total number of rows held.
    pub fn len(&self) -> usize {
        self.images.len()
            + self.detections.len()
            + self.occurrences.len()
            + self.taxa.len()
            + self.projects.len()
            + self.include_taxa.len()
            + self.exclude_taxa.len()
            + self.events.len()
            + self.deployments.len()
    }

    /// An estimate of the heap bytes the tables hold: hashbrown's bucket arrays (one control
    /// byte plus one `(id, row)` slot per bucket) plus each taxon's ancestor list.
    pub fn approx_heap_bytes(&self) -> usize {
        fn table<R>(t: &IdMap<Id, R>) -> usize {
            let buckets = if t.capacity() == 0 { 0 } else { (t.capacity() * 8 / 7).next_power_of_two() };
            buckets * (std::mem::size_of::<(Id, R)>() + 1)
        }
        table(&self.images)
            + table(&self.detections)
            + table(&self.occurrences)
            + table(&self.taxa)
            + self.taxa.values().map(|t| t.ancestors.capacity() * std::mem::size_of::<Id>()).sum::<usize>()
            + table(&self.projects)
            + table(&self.include_taxa)
            + table(&self.exclude_taxa)
            + table(&self.events)
            + table(&self.deployments)
    }

    /// True when no table holds a row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Applies one table's changes in order, folding repeated ids so that the updates are the
/// difference between the table before and after the whole list.
fn apply_table<R: Clone + Eq + Hash>(table: &mut IdMap<Id, R>, changes: &TableChanges<R>) -> TableUpdates<R> {
    // The version of each touched row before this batch, recorded on first touch.
    let mut before: IdMap<Id, Option<R>> = IdMap::default();
    for (id, row) in changes {
        let old = match row {
            Some(row) => table.insert(*id, row.clone()),
            None => table.remove(id),
        };
        before.entry(*id).or_insert(old);
    }
    let mut updates = Vec::new();
    for (id, old) in before {
        let new = table.get(&id);
        if old.as_ref() == new {
            continue;
        }
        if let Some(old) = old {
            updates.push(((id, old), -1));
        }
        if let Some(new) = new {
            updates.push(((id, new.clone()), 1));
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Deployment;

    #[test]
    fn identical_upsert_and_missing_delete_produce_nothing() {
        let mut tables = Tables::default();
        let mut batch = InputBatch::default();
        batch.deployments.push((1, Some(Deployment { project: Some(7) })));
        assert_eq!(tables.apply(&batch).len(), 1);
        assert!(tables.apply(&batch).is_empty(), "replay of the same row moved something");
        let mut delete = InputBatch::default();
        delete.deployments.push((2, None));
        assert!(tables.apply(&delete).is_empty());
    }

    #[test]
    fn repeated_ids_fold_to_one_retraction_and_one_insertion() {
        let mut tables = Tables::default();
        let mut batch = InputBatch::default();
        batch.deployments.push((1, Some(Deployment { project: Some(7) })));
        tables.apply(&batch);
        let mut batch = InputBatch::default();
        batch.deployments.push((1, Some(Deployment { project: Some(8) })));
        batch.deployments.push((1, None));
        batch.deployments.push((1, Some(Deployment { project: Some(9) })));
        let updates = tables.apply(&batch);
        let mut got = updates.deployments.clone();
        got.sort();
        assert_eq!(got, vec![((1, Deployment { project: Some(7) }), -1), ((1, Deployment { project: Some(9) }), 1)]);
    }
}
