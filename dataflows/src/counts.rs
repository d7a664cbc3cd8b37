//! The maintained counts (SPEC §2), per owner row, and the changes reported after each batch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Id, Micros};

/// The counts stored on a `main_sourceimage` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCounts {
    /// `detections_count`.
    pub detections: i64,
}

/// The counts stored on a `main_event` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCounts {
    /// `captures_count`: images of the event, unfiltered.
    pub captures: i64,
    /// `detections_count`: valid, passing detections on the event's images.
    pub detections: i64,
    /// `occurrences_count`: passing occurrences whose `event_id` is the event.
    pub occurrences: i64,
    /// `start`: earliest non-NULL image timestamp. `None` means "leave the column as it is"
    /// (no image of the event has a timestamp; the column is NOT NULL).
    pub start: Option<Micros>,
    /// `end`: latest non-NULL image timestamp; `None` as for `start`.
    pub end: Option<Micros>,
}

/// The counts stored on a `main_deployment` row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentCounts {
    /// `events_count`.
    pub events: i64,
    /// `captures_count` and `data_source_total_files`.
    pub captures: i64,
    /// `data_source_total_size`: `sum(size)`, NULL when no image has a size.
    pub total_size: Option<i64>,
    /// `detections_count`.
    pub detections: i64,
    /// `occurrences_count`: passing occurrences of the deployment with a non-NULL event.
    pub occurrences: i64,
    /// `taxa_count`: distinct determinations of those occurrences, NULL counting as one.
    pub taxa: i64,
    /// `first_capture_timestamp`: NULL without timestamped images.
    pub first_capture: Option<Micros>,
    /// `last_capture_timestamp`.
    pub last_capture: Option<Micros>,
}

/// Every owner's counts: the full state, as the oracle computes it and as the engine holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllCounts {
    /// By image id.
    pub images: BTreeMap<Id, ImageCounts>,
    /// By event id.
    pub events: BTreeMap<Id, EventCounts>,
    /// By deployment id.
    pub deployments: BTreeMap<Id, DeploymentCounts>,
}

/// The owners whose counts changed at one time, with their new values.
///
/// `Some(counts)` is the owner's complete new state (a count that dropped to zero is reported
/// as 0); `None` means the owner row itself was deleted. Owners whose values did not change are
/// absent. Each list is sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountChanges {
    /// Changed images.
    pub images: Vec<(Id, Option<ImageCounts>)>,
    /// Changed events.
    pub events: Vec<(Id, Option<EventCounts>)>,
    /// Changed deployments.
    pub deployments: Vec<(Id, Option<DeploymentCounts>)>,
}

impl CountChanges {
    /// The number of owners reported.
    pub fn len(&self) -> usize {
        self.images.len() + self.events.len() + self.deployments.len()
    }

    /// True when no owner changed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies these changes to a full state.
    pub fn apply_to(&self, all: &mut AllCounts) {
        apply(&mut all.images, &self.images);
        apply(&mut all.events, &self.events);
        apply(&mut all.deployments, &self.deployments);
    }
}

fn apply<V: Copy>(map: &mut BTreeMap<Id, V>, changes: &[(Id, Option<V>)]) {
    for (id, value) in changes {
        match value {
            Some(value) => map.insert(*id, *value),
            None => map.remove(id),
        };
    }
}
