//! Input rows: the columns of Antenna's tables that the counts of SPEC §2 depend on.
//!
//! Every row is keyed by its table's primary key. Nullable columns are `Option`s; nothing is
//! defaulted. A change to any table is an upsert or a delete of a whole row (see
//! [`InputBatch`]); the [`crate::engine::Engine`] turns those into differential updates.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A primary key: `bigint` in Antenna, so `i64` here, and rows go between Postgres and the
/// engine without a cast (every id Postgres can hold, even a negative one written by hand, is
/// an `Id`).
pub type Id = i64;

/// A `timestamp with time zone` as an instant: microseconds since 1970-01-01 00:00 UTC.
///
/// The dataflow only orders these (as SQL's `min`/`max` on `timestamptz` do) and the store
/// writes them back unchanged. Django's convention (naive wall-clock in its TIME_ZONE) matters
/// only where times are shown or `now()` is written, and the store's session time zone takes
/// care of both.
pub type Micros = i64;

/// A `double precision` value that compares exactly as Postgres compares `float8`.
///
/// Postgres orders NaN above every other value and equal to itself, and `-0.0 = 0.0`; Rust's
/// `f64` has neither property, so scores and thresholds are wrapped. Equality, hashing and the
/// derived `Ord` are on the bit pattern (they only identify a row's value inside the dataflow);
/// the filter uses [`Score::pg_cmp`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Score(u64);

impl Score {
    /// Wraps an `f64` as stored in a `double precision` column.
    pub fn new(value: f64) -> Self {
        Score(value.to_bits())
    }

    /// The wrapped value.
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }

    /// Postgres' `float8` comparison (`float8_cmp_internal`).
    pub fn pg_cmp(self, other: Score) -> Ordering {
        let (a, b) = (self.get(), other.get());
        match (a.is_nan(), b.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
        }
    }

    /// `self >= threshold` as Postgres evaluates it.
    pub fn passes(self, threshold: Score) -> bool {
        self.pg_cmp(threshold) != Ordering::Less
    }
}

impl fmt::Debug for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl From<f64> for Score {
    fn from(value: f64) -> Self {
        Score::new(value)
    }
}

/// `main_sourceimage`: a capture.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Image {
    /// `event_id`: detection counts follow the image's event.
    pub event: Option<Id>,
    /// `deployment_id`: detection and capture counts follow the image's deployment.
    pub deployment: Option<Id>,
    /// `project_id`: the project whose filter applies to this image's `detections_count`.
    pub project: Option<Id>,
    /// `timestamp`: event start/end and deployment first/last capture.
    pub timestamp: Option<Micros>,
    /// `size` in bytes: `data_source_total_size`.
    pub size: Option<i64>,
}

/// `main_detection`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Detection {
    /// `source_image_id` (NOT NULL).
    pub image: Id,
    /// `occurrence_id`.
    pub occurrence: Option<Id>,
    /// `bbox IS NOT NULL`: rows with a SQL NULL bbox are "nothing found" markers and never count.
    pub valid: bool,
}

/// `main_occurrence`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Occurrence {
    /// `event_id`: occurrence counts follow the occurrence's own event, not its detections'.
    pub event: Option<Id>,
    /// `deployment_id`.
    pub deployment: Option<Id>,
    /// `determination_id`.
    pub determination: Option<Id>,
    /// `determination_score`.
    pub score: Option<Score>,
}

/// `main_taxon`, reduced to what the include/exclude filters read.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Taxon {
    /// The `id`s listed in `parents_json`: every ancestor, not the taxon itself.
    pub ancestors: Vec<Id>,
}

/// `main_project`, reduced to its filter threshold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Project {
    /// `default_filters_score_threshold` (NOT NULL).
    pub threshold: Score,
}

/// A row of `main_project_default_filters_include_taxa` or `…_exclude_taxa`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FilterTaxon {
    /// `project_id`.
    pub project: Id,
    /// `taxon_id`: matches the taxon and every taxon listing it in `parents_json`.
    pub taxon: Id,
}

/// `main_event`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Event {
    /// `deployment_id`: `events_count`, and the fallback project.
    pub deployment: Option<Id>,
    /// `project_id`: the project whose filter applies to this event's counts.
    pub project: Option<Id>,
}

/// `main_deployment`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Deployment {
    /// `project_id`.
    pub project: Option<Id>,
}

/// One table's changes: `(id, Some(row))` inserts or replaces the row, `(id, None)` deletes it.
/// Later entries for the same id win.
pub type TableChanges<R> = Vec<(Id, Option<R>)>;

/// Changes to every input table, applied together at one dataflow time.
///
/// Batching many changes into one time is what makes differential dataflow fast: the engine
/// does one round of progress tracking per batch, not per row.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InputBatch {
    /// `main_sourceimage`.
    pub images: TableChanges<Image>,
    /// `main_detection`.
    pub detections: TableChanges<Detection>,
    /// `main_occurrence`.
    pub occurrences: TableChanges<Occurrence>,
    /// `main_taxon`.
    pub taxa: TableChanges<Taxon>,
    /// `main_project`.
    pub projects: TableChanges<Project>,
    /// `main_project_default_filters_include_taxa`.
    pub include_taxa: TableChanges<FilterTaxon>,
    /// `main_project_default_filters_exclude_taxa`.
    pub exclude_taxa: TableChanges<FilterTaxon>,
    /// `main_event`.
    pub events: TableChanges<Event>,
    /// `main_deployment`.
    pub deployments: TableChanges<Deployment>,
}

impl InputBatch {
    /// The number of row changes in the batch.
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

    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
