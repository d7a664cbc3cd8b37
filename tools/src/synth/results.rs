//! Synthetic ADC-like ML results for ingest tests, benchmarks and the worker simulator, and
//! the Antenna rows they refer to.
//!
//! A [`World`] is projects, deployments, nights (events) and captures (images) over a real
//! or synthetic taxonomy, ready to be seeded. A [`ResultFactory`] writes one
//! `PipelineResultsResponse` per image the way ADC does: Poisson-distributed detections, each
//! with a non-terminal moth / non-moth classification and a terminal species classification
//! carrying full score and logit vectors. Results are a deterministic function of the seed and
//! the image, as a deterministic model would be, so a reprocessed task yields the same result.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{Deployment, Event, FilterTaxon, Id, Image, InputBatch, Micros, Project, Score, Tables};

use crate::synth::poisson;

/// 2024-06-01 21:00 UTC, the first night's first capture.
const FIRST_CAPTURE: Micros = 1_717_275_600_000_000;

/// The shape of a synthetic world.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// Projects.
    pub projects: usize,
    /// Deployments per project.
    pub deployments_per_project: usize,
    /// Nights (events) per deployment.
    pub events_per_deployment: usize,
    /// Captures per night.
    pub images_per_event: usize,
}

/// Antenna rows for ingest to refer to: taxa, projects (the first with an include filter on
/// half the families and a threshold of 0.5, the others unfiltered), deployments, events and
/// images.
#[derive(Clone, Debug)]
pub struct World {
    /// The rows, for `store::seed::seed_named`.
    pub tables: Tables,
    /// Taxon names.
    pub names: BTreeMap<Id, String>,
    /// Every image id, in capture order.
    pub images: Vec<Id>,
    /// The species names results are drawn from.
    pub species: Vec<String>,
}

impl World {
    /// Builds the world (row ids start at 1 in every table).
    pub fn new(taxonomy: &Taxonomy, config: &WorldConfig) -> World {
        let mut batch = InputBatch::default();
        for (id, taxon) in &taxonomy.taxa {
            batch.taxa.push((*id, Some(taxon.clone())));
        }
        let families = taxonomy.of_rank(Rank::Family);
        let (mut deployment, mut event, mut image) = (0, 0, 0);
        let mut images = Vec::new();
        for p in 1..=config.projects as Id {
            batch.projects.push((p, Some(Project { threshold: Score::new(0.5) })));
            if p == 1 {
                for (n, f) in families.iter().take(families.len().div_ceil(2)).enumerate() {
                    batch.include_taxa.push((n as Id + 1, Some(FilterTaxon { project: p, taxon: *f })));
                }
            }
            for _ in 0..config.deployments_per_project {
                deployment += 1;
                batch.deployments.push((deployment, Some(Deployment { project: Some(p) })));
                for night in 0..config.events_per_deployment as i64 {
                    event += 1;
                    batch.events.push((event, Some(Event { deployment: Some(deployment), project: Some(p) })));
                    for i in 0..config.images_per_event as i64 {
                        image += 1;
                        let timestamp = FIRST_CAPTURE + night * 86_400_000_000 + i * 60_000_000;
                        batch.images.push((
                            image,
                            Some(Image {
                                event: Some(event),
                                deployment: Some(deployment),
                                project: Some(p),
                                timestamp: Some(timestamp),
                                size: Some(1_000_000 + image),
                            }),
                        ));
                        images.push(image);
                    }
                }
            }
        }
        let mut tables = Tables::default();
        tables.apply(&batch);
        let species = taxonomy.of_rank(Rank::Species).iter().map(|id| taxonomy.names[id].clone()).collect();
        World { tables, names: taxonomy.names.clone(), images, species }
    }
}

/// Algorithm keys of the pipeline results are produced for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultKeys {
    /// The pipeline slug.
    pub pipeline: String,
    /// The detector.
    pub detector: String,
    /// The moth / non-moth classifier (non-terminal).
    pub binary: String,
    /// The species classifier (terminal).
    pub species: String,
}

impl ResultKeys {
    /// The keys of `store::seed::PipelineSpec::antenna_test(slug)`.
    pub fn antenna_test(slug: &str) -> Self {
        ResultKeys {
            pipeline: slug.into(),
            detector: "random-detector".into(),
            binary: "random-binary-classifier".into(),
            species: "random-species-classifier".into(),
        }
    }
}

/// Writes ADC-like results.
#[derive(Clone, Debug)]
pub struct ResultFactory {
    /// The labels of the species classifier.
    pub species: Vec<String>,
    /// Algorithm keys.
    pub keys: ResultKeys,
    /// Mean detections per image (Poisson).
    pub mean_detections: f64,
    /// Length of the species classifier's score and logit vectors.
    pub score_len: usize,
    /// Seed of every result.
    pub seed: u64,
}

impl ResultFactory {
    /// One `PipelineResultsResponse` for `image`.
    pub fn response(&self, image: Id) -> serde_json::Value {
        let mut rng = SmallRng::seed_from_u64(self.seed ^ (image as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = poisson(&mut rng, self.mean_detections);
        let mut detections = Vec::with_capacity(n);
        for _ in 0..n {
            let x1 = rng.random_range(0..4000) as f64;
            let y1 = rng.random_range(0..3000) as f64;
            let (w, h) = (rng.random_range(20..300) as f64, rng.random_range(20..300) as f64);
            let moth = rng.random_range(0.5..0.999);
            let label = &self.species[rng.random_range(0..self.species.len())];
            let (scores, logits) = self.vector(&mut rng);
            detections.push(json!({
                "source_image_id": image.to_string(),
                "bbox": {"x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h},
                "inference_time": 0.3,
                "algorithm": {"name": self.keys.detector, "key": self.keys.detector},
                "timestamp": "2024-06-02T01:00:03.120000",
                "crop_image_url": null,
                "classifications": [
                    {"classification": "Moth", "labels": ["Moth", "Not a moth"], "scores": [moth, 1.0 - moth],
                     "logits": [moth * 3.0, -moth], "inference_time": 0.02,
                     "algorithm": {"name": self.keys.binary, "key": self.keys.binary},
                     "terminal": false, "timestamp": "2024-06-02T01:00:03.200000"},
                    {"classification": label, "labels": null, "scores": scores, "logits": logits,
                     "inference_time": 0.05, "algorithm": {"name": self.keys.species, "key": self.keys.species},
                     "terminal": true, "timestamp": "2024-06-02T01:00:03.260000"}
                ]
            }));
        }
        json!({
            "pipeline": self.keys.pipeline,
            "algorithms": {},
            "total_time": 2.4,
            "source_images": [{"id": image.to_string(), "url": format!("https://example.org/captures/{image}.jpg")}],
            "detections": detections,
            "errors": null
        })
    }

    /// The whole message body (`PipelineTaskResult`) for `image`, answering `reply_subject`.
    pub fn task_result(&self, reply_subject: &str, image: Id) -> Vec<u8> {
        let body = json!({"reply_subject": reply_subject, "result": self.response(image)});
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// A score vector with its maximum (0.3–0.99) at a random index, and logits.
    fn vector(&self, rng: &mut SmallRng) -> (Vec<f64>, Vec<f64>) {
        let len = self.score_len.max(1);
        let top = rng.random_range(0.3..0.99);
        let at = rng.random_range(0..len);
        let rest = if len > 1 { (1.0 - top) / (len - 1) as f64 } else { 0.0 };
        let scores: Vec<f64> = (0..len).map(|i| if i == at { top } else { rest }).collect();
        let logits = scores.iter().map(|s| (s.max(1e-9)).ln()).collect();
        (scores, logits)
    }
}
