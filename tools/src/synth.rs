//! A synthetic, ADC-like workload for the demo and the benchmarks: one project with include
//! and exclude filters, a deployment with several nights of captures, and ML results (one image
//! each, Poisson-distributed detections, a new occurrence per detection).

pub mod jobs;
pub mod preload;
pub mod results;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{
    Deployment, Detection, Event, FilterTaxon, Id, Image, InputBatch, Micros, Occurrence, Project, Score,
};

/// Microseconds in one hour.
const HOUR: Micros = 3_600_000_000;

/// 2026-06-01 00:00 UTC, the first night of every synthetic deployment.
const FIRST_NIGHT: Micros = 20_605 * 24 * HOUR;

/// The shape of a synthetic deployment.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Nights of captures; one event per night.
    pub nights: usize,
    /// Images captured per night.
    pub images_per_night: usize,
    /// Mean detections per result message (Poisson).
    pub mean_detections: f64,
    /// Fraction of the families the project includes (the first ones by id).
    pub include_fraction: f64,
    /// Seed of every random choice, so runs are reproducible.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig { nights: 5, images_per_night: 200, mean_detections: 8.0, include_fraction: 0.5, seed: 7 }
    }
}

/// The project, deployment and filters of the workload, and the state to produce results.
pub struct Workload {
    /// The taxonomy results are classified into.
    pub taxonomy: Taxonomy,
    /// The configuration it was made with.
    pub config: WorkloadConfig,
    /// The filtered project.
    pub project: Id,
    /// The deployment all captures belong to.
    pub deployment: Id,
    /// One event per night, in order.
    pub events: Vec<Id>,
    /// Families in the include set.
    pub included_families: Vec<Id>,
    /// Families not yet included (candidates for a filter edit), in order.
    pub other_families: Vec<Id>,
    /// The genus in the exclude set.
    pub excluded_genus: Option<Id>,
    species: Vec<Id>,
    rng: SmallRng,
    next_image: Id,
    next_detection: Id,
    next_occurrence: Id,
    next_filter_row: Id,
}

impl Workload {
    /// A workload over `taxonomy` (its ids must stay below 1,000,000,000; row ids start there).
    pub fn new(taxonomy: Taxonomy, config: WorkloadConfig) -> Self {
        let species = taxonomy.of_rank(Rank::Species);
        let families = taxonomy.of_rank(Rank::Family);
        let included = ((families.len() as f64 * config.include_fraction).round() as usize).min(families.len());
        let (included_families, other_families) = (families[..included].to_vec(), families[included..].to_vec());
        // Exclude the first genus of the first included family: exclude must win over include.
        let excluded_genus = included_families
            .first()
            .and_then(|f| taxonomy.of_rank(Rank::Genus).into_iter().find(|g| taxonomy.taxa[g].ancestors.contains(f)));
        let rng = SmallRng::seed_from_u64(config.seed);
        Workload {
            taxonomy,
            config,
            project: 1,
            deployment: 1,
            events: Vec::new(),
            included_families,
            other_families,
            excluded_genus,
            species,
            rng,
            next_image: 1_000_000_000,
            next_detection: 1_000_000_000,
            next_occurrence: 1_000_000_000,
            next_filter_row: 1,
        }
    }

    /// The taxonomy, the project with its filters, the deployment and its events.
    pub fn setup(&mut self) -> InputBatch {
        let mut batch = InputBatch::default();
        for (id, taxon) in &self.taxonomy.taxa {
            batch.taxa.push((*id, Some(taxon.clone())));
        }
        batch.projects.push((self.project, Some(Project { threshold: Score::new(0.5) })));
        for family in self.included_families.clone() {
            batch.include_taxa.push((self.filter_row(), Some(FilterTaxon { project: self.project, taxon: family })));
        }
        if let Some(genus) = self.excluded_genus {
            batch.exclude_taxa.push((self.filter_row(), Some(FilterTaxon { project: self.project, taxon: genus })));
        }
        batch.deployments.push((self.deployment, Some(Deployment { project: Some(self.project) })));
        self.events = (1..=self.config.nights as Id).collect();
        for event in &self.events {
            batch.events.push((*event, Some(Event { deployment: Some(self.deployment), project: Some(self.project) })));
        }
        batch
    }

    fn filter_row(&mut self) -> Id {
        self.next_filter_row += 1;
        self.next_filter_row
    }

    /// The number of images the configuration describes.
    pub fn total_images(&self) -> usize {
        self.config.nights * self.config.images_per_night
    }

    /// One ML result: the next capture (cycling through the nights) and its detections, each
    /// with a new occurrence determined to a random species with a random score; an image with
    /// no detection gets a null marker.
    pub fn message(&mut self) -> InputBatch {
        self.messages(1)
    }

    /// The next `n` ML results in one batch (for bulk loads and batched ingest).
    pub fn messages(&mut self, n: usize) -> InputBatch {
        let mut batch = InputBatch::default();
        for _ in 0..n {
            self.add_message(&mut batch);
        }
        batch
    }

    /// Appends one ML result to `batch`.
    fn add_message(&mut self, batch: &mut InputBatch) {
        let n = (self.next_image - 1_000_000_000) as usize;
        let per_night = self.config.images_per_night.max(1);
        let night = (n / per_night) % self.config.nights.max(1);
        let event = self.events.get(night).copied();
        let image = self.next_image;
        self.next_image += 1;
        // Captures every 10 s from 21:00 UTC on night `night`.
        let timestamp =
            FIRST_NIGHT + (night as Micros) * 24 * HOUR + 21 * HOUR + ((n % per_night) as Micros) * 10_000_000;
        batch.images.push((
            image,
            Some(Image {
                event,
                deployment: Some(self.deployment),
                project: Some(self.project),
                timestamp: Some(timestamp),
                size: Some(self.rng.random_range(200_000..2_000_000)),
            }),
        ));
        let detections = poisson(&mut self.rng, self.config.mean_detections);
        if detections == 0 {
            batch.detections.push((self.detection_id(), Some(Detection { image, occurrence: None, valid: false })));
        }
        for _ in 0..detections {
            let occurrence = self.next_occurrence;
            self.next_occurrence += 1;
            let determination = if self.species.is_empty() {
                None
            } else {
                Some(self.species[self.rng.random_range(0..self.species.len())])
            };
            batch.occurrences.push((
                occurrence,
                Some(Occurrence {
                    event,
                    deployment: Some(self.deployment),
                    determination,
                    score: Some(Score::new(self.rng.random::<f64>())),
                }),
            ));
            let id = self.detection_id();
            batch.detections.push((id, Some(Detection { image, occurrence: Some(occurrence), valid: true })));
        }
    }

    fn detection_id(&mut self) -> Id {
        self.next_detection += 1;
        self.next_detection
    }

    /// A filter edit: includes the next not-yet-included family.
    pub fn include_next_family(&mut self) -> Option<InputBatch> {
        if self.other_families.is_empty() {
            return None;
        }
        let family = self.other_families.remove(0);
        self.included_families.push(family);
        let mut batch = InputBatch::default();
        batch.include_taxa.push((self.filter_row(), Some(FilterTaxon { project: self.project, taxon: family })));
        Some(batch)
    }

    /// The number of valid detections produced so far (an approximation is never used).
    pub fn detections_so_far(&self) -> u64 {
        (self.next_detection - 1_000_000_000) as u64
    }
}

/// A Poisson(`mean`) draw from `rand_distr`; a mean of zero (or below) draws 0.
pub(crate) fn poisson(rng: &mut SmallRng, mean: f64) -> usize {
    match rand_distr::Poisson::new(mean) {
        Ok(dist) => rng.sample(dist) as usize,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_mean_is_close() {
        let mut rng = SmallRng::seed_from_u64(1);
        let n = 20_000;
        let total: usize = (0..n).map(|_| poisson(&mut rng, 8.0)).sum();
        let mean = total as f64 / n as f64;
        assert!((mean - 8.0).abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn messages_cycle_through_nights() {
        let config = WorkloadConfig { nights: 3, images_per_night: 2, ..WorkloadConfig::default() };
        let mut w = Workload::new(Taxonomy::synthetic(4, 2, 3), config);
        w.setup();
        let events: Vec<Option<Id>> = (0..6).map(|_| w.message().images[0].1.as_ref().and_then(|i| i.event)).collect();
        assert_eq!(events, vec![Some(1), Some(1), Some(2), Some(2), Some(3), Some(3)]);
    }
}
