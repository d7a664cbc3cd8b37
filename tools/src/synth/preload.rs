//! Detections that a [`World`]'s deployments already hold before results arrive, so that a
//! benchmark can measure ingest against big deployments (Antenna's recompute pays for every
//! detection a deployment holds).
//!
//! Each deployment gets captures of its own, spread over its nights, with Poisson(8)
//! detections each and one occurrence per detection, determined to a random species with a
//! uniform score; a capture without detections gets a null marker, as ingest would write.
//! Classifications are not generated: no count reads them.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tally_dataflows::{Detection, Id, Image, InputBatch, Occurrence, Score};

use crate::synth::poisson;
use crate::synth::results::World;

/// Seconds between two preloaded captures of a night.
const CAPTURE_INTERVAL_US: i64 = 20_000_000;

/// Mean detections per preloaded capture.
const MEAN_DETECTIONS: f64 = 8.0;

/// Rows giving each of `world`'s deployments `per_deployment` valid detections, with ids above
/// every id the world uses. `species` are the taxon ids determinations are drawn from.
pub fn preload(world: &World, species: &[Id], per_deployment: u64, seed: u64) -> InputBatch {
    let mut batch = InputBatch::default();
    if per_deployment == 0 || species.is_empty() {
        return batch;
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    let tables = &world.tables;
    let mut next_image = tables.images.keys().max().copied().unwrap_or(0) + 1;
    let mut next_detection = tables.detections.keys().max().copied().unwrap_or(0) + 1;
    let mut next_occurrence = tables.occurrences.keys().max().copied().unwrap_or(0) + 1;

    // Each event's first capture time and project, by deployment.
    let mut nights: BTreeMap<Id, Vec<(Id, Option<Id>, i64)>> = BTreeMap::new();
    let mut first: BTreeMap<Id, i64> = BTreeMap::new();
    for image in tables.images.values() {
        if let (Some(event), Some(ts)) = (image.event, image.timestamp) {
            let t = first.entry(event).or_insert(ts);
            *t = (*t).min(ts);
        }
    }
    let mut events: Vec<_> = tables.events.iter().collect();
    events.sort_by_key(|(id, _)| **id);
    for (id, event) in events {
        if let (Some(deployment), Some(start)) = (event.deployment, first.get(id)) {
            nights.entry(deployment).or_default().push((*id, event.project, *start));
        }
    }

    for (deployment, nights) in nights {
        let mut detections = 0u64;
        let mut n = 0usize;
        while detections < per_deployment {
            let (event, project, start) = nights[n % nights.len()];
            let image = next_image;
            next_image += 1;
            batch.images.push((
                image,
                Some(Image {
                    event: Some(event),
                    deployment: Some(deployment),
                    project,
                    timestamp: Some(start + 30_000_000 + (n / nights.len()) as i64 * CAPTURE_INTERVAL_US),
                    size: Some(rng.random_range(200_000..2_000_000)),
                }),
            ));
            n += 1;
            let count = poisson(&mut rng, MEAN_DETECTIONS).min((per_deployment - detections) as usize);
            if count == 0 {
                batch.detections.push((next_detection, Some(Detection { image, occurrence: None, valid: false })));
                next_detection += 1;
            }
            for _ in 0..count {
                let occurrence = next_occurrence;
                next_occurrence += 1;
                batch.occurrences.push((
                    occurrence,
                    Some(Occurrence {
                        event: Some(event),
                        deployment: Some(deployment),
                        determination: Some(species[rng.random_range(0..species.len())]),
                        score: Some(Score::new(rng.random::<f64>())),
                    }),
                ));
                batch
                    .detections
                    .push((next_detection, Some(Detection { image, occurrence: Some(occurrence), valid: true })));
                next_detection += 1;
            }
            detections += count as u64;
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use tally_dataflows::taxonomy::{Rank, Taxonomy};

    use super::*;
    use crate::synth::results::WorldConfig;

    #[test]
    fn every_deployment_gets_its_detections_above_the_world_s_ids() {
        let taxonomy = Taxonomy::synthetic(2, 2, 3);
        let config =
            WorldConfig { projects: 2, deployments_per_project: 1, events_per_deployment: 3, images_per_event: 4 };
        let world = World::new(&taxonomy, &config);
        let batch = preload(&world, &taxonomy.of_rank(Rank::Species), 500, 1);
        let mut tables = world.tables.clone();
        tables.apply(&batch);
        let mut per_deployment: BTreeMap<Id, u64> = BTreeMap::new();
        for d in tables.detections.values().filter(|d| d.valid) {
            let image = &tables.images[&d.image];
            *per_deployment.entry(image.deployment.unwrap_or(0)).or_default() += 1;
            assert!(d.image > *world.images.iter().max().unwrap_or(&0), "preloaded on a capture of its own");
        }
        assert_eq!(per_deployment.into_values().collect::<Vec<_>>(), vec![500, 500]);
        assert_eq!(tables.occurrences.len(), 1000);
    }
}
