//! What the database holds for a batch, as the read phase found it: the input of the plan.

use std::collections::HashMap;

use tally_dataflows::{Image, InputBatch, Occurrence};

use crate::ingest::determination::{Candidate, Identification};

/// An algorithm linked to a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithm {
    /// `ml_algorithm.id`.
    pub id: i64,
    /// Its category map, copied onto its classifications.
    pub category_map: Option<i64>,
}

/// A pipeline as rule 1 checks it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pipeline {
    /// Its algorithms, by key.
    pub algorithms: HashMap<String, Algorithm>,
    /// Its detection algorithms (exactly one is required).
    pub detectors: Vec<i64>,
}

/// A stored detection on one of the batch's images.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDetection {
    /// Its id.
    pub id: i64,
    /// Its image.
    pub image: i64,
    /// Whether its bbox is not NULL (a valid detection, not a null marker).
    pub valid: bool,
    /// Its bbox, when it is an array of four numbers.
    pub bbox: Option<[f64; 4]>,
    /// Its detection algorithm.
    pub algorithm: Option<i64>,
    /// Its occurrence.
    pub occurrence: Option<i64>,
    /// Whether its crop path is NULL or empty (a replay fills it in).
    pub empty_path: bool,
}

/// A stored occurrence of a stored detection, with what rule 5 needs to redetermine it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredOccurrence {
    /// The row as the dataflow mirrors it.
    pub row: Occurrence,
    /// Every stored classification of its detections (`order`: the classification id).
    pub candidates: Vec<Candidate>,
    /// Its latest non-withdrawn human identification.
    pub human: Option<Identification>,
}

/// What the database holds for a batch: everything the plan reads, nothing else.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The pipelines the messages name, by slug (absent: unknown).
    pub pipelines: HashMap<String, Pipeline>,
    /// The images the messages name (absent: unknown).
    pub images: HashMap<i64, Image>,
    /// The status of the messages' jobs (absent: no such job).
    pub jobs: HashMap<i64, String>,
    /// The detections stored on the images of the responses, in the order read (the first of
    /// equal keys is the one reused, as Antenna's lookup takes the first match).
    pub detections: Vec<StoredDetection>,
    /// The classifications of those detections, by detection (`order`: the id).
    pub classifications: HashMap<i64, Vec<Candidate>>,
    /// The occurrences of those detections, by id.
    pub occurrences: HashMap<i64, StoredOccurrence>,
    /// Labels found among active taxa (by name, else by search name).
    pub taxa: HashMap<String, i64>,
    /// Read-through copies of the images, owners and taxa the batch refers to.
    pub input: InputBatch,
}
