//! The differential-dataflow graph that maintains Antenna's stored counts (SPEC §2), the
//! engine that drives it, and the from-scratch oracle it is tested against.
//!
//! # Layout
//!
//! - [`model`]: the input rows (the columns of Antenna's tables the counts read) and
//!   [`model::InputBatch`], a set of upserts and deletes applied at one time.
//! - [`tables`]: the current rows, and their diffing into differential updates.
//! - [`graph`]: the dataflow itself; wires operators only, no I/O.
//! - [`engine`]: runs the graph on timely workers; `apply(batch) -> changed counts`.
//! - [`hashing`]: id-keyed maps hashed with foldhash.
//! - [`counts`]: the per-owner counts and the change lists the engine reports.
//! - [`oracle`]: SPEC §2 computed from scratch, as plainly as possible.
//! - [`taxonomy`]: Antenna's taxonomy fixture format turned into taxon rows.
//!
//! This crate depends on timely, differential-dataflow and serde only: no tokio, no Postgres,
//! no NATS.
#![warn(missing_docs)]

pub mod counts;
pub mod engine;
pub mod graph;
pub mod hashing;
pub mod model;
pub mod oracle;
pub mod tables;
pub mod taxonomy;

pub use counts::{AllCounts, CountChanges, DeploymentCounts, EventCounts, ImageCounts};
pub use engine::{Engine, EngineError, Known, Submitted, Topology};
pub use model::{
    Deployment, Detection, Event, FilterTaxon, Id, Image, InputBatch, Micros, Occurrence, Project, Score, Taxon,
};
pub use tables::Tables;
