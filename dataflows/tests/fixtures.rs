//! Antenna's real taxonomy fixtures: the loader against data-model.md §5, and the engine against the oracle on them.

use std::collections::BTreeMap;

use tally_dataflows::oracle::recompute;
use tally_dataflows::taxonomy::{FixtureRow, Rank, Taxonomy};
use tally_dataflows::{
    AllCounts, CountChanges, Deployment, DeploymentCounts, Detection, Engine, Event, FilterTaxon, Id, Image,
    InputBatch, Occurrence, Project, Score, Tables, Taxon,
};

const QUEBEC_VERMONT_2022: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/taxa-quebec-vermont-2022.json");
const QC_VT_UK_DK_2023: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/taxa-qc-vt-uk-dk-2023.json");

fn rows(path: &str) -> Vec<FixtureRow> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {path}: {e}"))
}

fn load(path: &str) -> Taxonomy {
    Taxonomy::from_fixture(&rows(path), 1)
}

/// Taxa per rank, in rank order: (phylum, family, genus, species).
fn rank_counts(t: &Taxonomy) -> (usize, usize, usize, usize) {
    (
        t.of_rank(Rank::Phylum).len(),
        t.of_rank(Rank::Family).len(),
        t.of_rank(Rank::Genus).len(),
        t.of_rank(Rank::Species).len(),
    )
}

/// Number of taxa by length of their ancestor list (`parents_json`).
fn ancestor_lengths(t: &Taxonomy) -> BTreeMap<usize, usize> {
    let mut histogram = BTreeMap::new();
    for taxon in t.taxa.values() {
        *histogram.entry(taxon.ancestors.len()).or_insert(0) += 1;
    }
    histogram
}

fn id(t: &Taxonomy, name: &str) -> Id {
    *t.ids.get(name).unwrap_or_else(|| panic!("{name} is not in the taxonomy"))
}

#[test]
fn quebec_vermont_2022_loads_documented_taxa() {
    let t = load(QUEBEC_VERMONT_2022);
    assert_eq!(t.taxa.len(), 4_120, "taxa");
    assert_eq!(rank_counts(&t), (1, 69, 942, 3_108), "(phylum, family, genus, species)");
    assert_eq!(ancestor_lengths(&t), BTreeMap::from([(0, 1), (1, 69), (2, 942), (3, 3_108)]), "parents_json lengths");
}

#[test]
fn qc_vt_uk_dk_2023_loads_documented_taxa() {
    let t = load(QC_VT_UK_DK_2023);
    assert_eq!(t.taxa.len(), 7_721, "taxa");
    assert_eq!(rank_counts(&t), (1, 73, 1_501, 6_146), "(phylum, family, genus, species)");
    assert_eq!(
        ancestor_lengths(&t),
        BTreeMap::from([(0, 1), (1, 73), (2, 1_501), (3, 5_902), (4, 244)]),
        "parents_json lengths"
    );
}

/// data-model.md §5: `Eriocrania sparrmannella → [Arthropoda, Eriocraniidae, Eriocrania,
/// Eriocrania cicatricella]` (the fixture row is `cicatricella`, `synonym_of: sparrmannella`).
#[test]
fn accepted_species_lists_its_synonym_species_as_ancestor() {
    let t = load(QC_VT_UK_DK_2023);
    let accepted = id(&t, "Eriocrania sparrmannella");
    let expected =
        vec![id(&t, "Arthropoda"), id(&t, "Eriocraniidae"), id(&t, "Eriocrania"), id(&t, "Eriocrania cicatricella")];
    assert_eq!(t.taxa[&accepted].ancestors, expected, "parents_json of Eriocrania sparrmannella");
    let synonym = id(&t, "Eriocrania cicatricella");
    assert_eq!(
        t.taxa[&synonym].ancestors,
        expected[..3].to_vec(),
        "parents_json of Eriocrania cicatricella (a plain species)"
    );
}

/// Runs batches, checking after each that the accumulated reports, the engine's snapshot and
/// the oracle agree, and that no owner is reported without a changed value.
struct Checked {
    engine: Engine,
    /// The rows applied so far: the oracle's input.
    tables: Tables,
    reported: AllCounts,
}

impl Checked {
    fn new() -> Self {
        Checked {
            engine: Engine::new(1).expect("engine starts"),
            tables: Tables::default(),
            reported: AllCounts::default(),
        }
    }

    fn apply(&mut self, batch: &InputBatch, step: &str) -> CountChanges {
        let changes = self.engine.apply(batch).expect("batch applies");
        self.tables.apply(batch);
        for (id, new) in &changes.images {
            assert_ne!(self.reported.images.get(id), new.as_ref(), "{step}: image {id} reported unchanged");
        }
        for (id, new) in &changes.events {
            assert_ne!(self.reported.events.get(id), new.as_ref(), "{step}: event {id} reported unchanged");
        }
        for (id, new) in &changes.deployments {
            assert_ne!(self.reported.deployments.get(id), new.as_ref(), "{step}: deployment {id} reported unchanged");
        }
        changes.apply_to(&mut self.reported);
        let expected = recompute(&self.tables);
        assert_eq!(self.engine.snapshot(), expected, "{step}: engine snapshot differs from the oracle");
        assert_eq!(self.reported, expected, "{step}: accumulated changes differ from the oracle");
        changes
    }

    fn deployment(&self, id: Id) -> DeploymentCounts {
        self.engine.snapshot().deployments[&id]
    }
}

fn taxa_batch(t: &Taxonomy) -> InputBatch {
    InputBatch { taxa: t.taxa.iter().map(|(id, taxon)| (*id, Some(taxon.clone()))).collect(), ..InputBatch::default() }
}

/// One project, deployment, event and image; one valid detection per occurrence.
fn one_deployment_with_occurrences(t: &Taxonomy, threshold: f64, determinations: &[Id]) -> InputBatch {
    let mut b = taxa_batch(t);
    b.projects.push((1, Some(Project { threshold: Score::new(threshold) })));
    b.deployments.push((1, Some(Deployment { project: Some(1) })));
    b.events.push((1, Some(Event { deployment: Some(1), project: None })));
    b.images.push((1, Some(Image { event: Some(1), deployment: Some(1), project: None, timestamp: None, size: None })));
    for (n, taxon) in determinations.iter().enumerate() {
        let o = n as Id + 1;
        b.occurrences.push((
            o,
            Some(Occurrence {
                event: Some(1),
                deployment: Some(1),
                determination: Some(*taxon),
                score: Some(Score::new(0.9)),
            }),
        ));
        b.detections.push((o, Some(Detection { image: 1, occurrence: Some(o), valid: true })));
    }
    b
}

/// data-model.md §5 quirk: excluding the synonym species also excludes its accepted species,
/// since the accepted species lists the synonym in `parents_json`; not the other way round.
#[test]
fn excluding_synonym_species_excludes_its_accepted_species() {
    let t = load(QC_VT_UK_DK_2023);
    let accepted = id(&t, "Eriocrania sparrmannella");
    let synonym = id(&t, "Eriocrania cicatricella");
    let sibling = id(&t, "Eriocrania salopiella");
    let genus = id(&t, "Eriocrania");
    let mut db = Checked::new();

    let mut b = one_deployment_with_occurrences(&t, 0.5, &[accepted, synonym, sibling, genus]);
    b.exclude_taxa.push((1, Some(FilterTaxon { project: 1, taxon: synonym })));
    db.apply(&b, "exclude the synonym");
    let d = db.deployment(1);
    // sparrmannella (ancestor cicatricella) and cicatricella are excluded; salopiella and the
    // genus-level determination pass.
    assert_eq!((d.occurrences, d.taxa, d.detections), (2, 2, 2), "excluding Eriocrania cicatricella");
    assert_eq!(db.engine.snapshot().events[&1].occurrences, 2);
    assert_eq!(db.engine.snapshot().images[&1].detections, 2);

    let swap = InputBatch {
        exclude_taxa: vec![(1, None), (2, Some(FilterTaxon { project: 1, taxon: accepted }))],
        ..InputBatch::default()
    };
    db.apply(&swap, "exclude the accepted species instead");
    let d = db.deployment(1);
    // Only sparrmannella itself is excluded: cicatricella does not list it as an ancestor.
    assert_eq!((d.occurrences, d.taxa, d.detections), (3, 3, 3), "excluding Eriocrania sparrmannella");
}

/// xorshift64*: a tiny deterministic generator, enough to scatter rows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    fn below(&mut self, n: i64) -> i64 {
        (self.next() % n.unsigned_abs()) as i64
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: i64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as i64) as usize]
    }
}

const DEPLOYMENTS: Id = 4;
const EVENTS: Id = 16;
const IMAGES: Id = 400;
const OCCURRENCES: Id = 1_200;
const DETECTIONS: Id = 3_000;

/// A random deployment database over a real taxonomy, with filters naming real taxa.
fn random_database(t: &Taxonomy, rng: &mut Rng) -> InputBatch {
    let species = t.of_rank(Rank::Species);
    let genera = t.of_rank(Rank::Genus);
    let mut b = taxa_batch(t);
    for (p, threshold) in [(1, 0.5), (2, 0.3), (3, 0.0)] {
        b.projects.push((p, Some(Project { threshold: Score::new(threshold) })));
    }
    let filter = |project, name| Some(FilterTaxon { project, taxon: id(t, name) });
    // Project 1: two families, minus one genus and one species.
    b.include_taxa.push((1, filter(1, "Noctuidae")));
    b.include_taxa.push((2, filter(1, "Erebidae")));
    b.exclude_taxa.push((1, filter(1, "Catocala")));
    b.exclude_taxa.push((2, filter(1, "Acronicta americana")));
    // Project 2: exclude-only (NULL determinations pass).
    b.exclude_taxa.push((3, filter(2, "Geometridae")));
    b.exclude_taxa.push((4, filter(2, "Noctua pronuba")));
    // Project 3: a genus and a species of another family.
    b.include_taxa.push((3, filter(3, "Catocala")));
    b.include_taxa.push((4, filter(3, "Hypena scabra")));

    // Deployment 3 has no project: nothing filtered there.
    for d in 1..=DEPLOYMENTS {
        let project = match d {
            1 => Some(1),
            2 => Some(2),
            3 => None,
            _ => Some(3),
        };
        b.deployments.push((d, Some(Deployment { project })));
    }
    let event_deployment = |e: Id| (e - 1) % DEPLOYMENTS + 1;
    for e in 1..=EVENTS {
        // Every third event has its own project, different from its deployment's.
        let project = (e % 3 == 0).then_some(event_deployment(e) % 3 + 1);
        b.events.push((e, Some(Event { deployment: Some(event_deployment(e)), project })));
    }
    for i in 1..=IMAGES {
        let event = rng.chance(95).then(|| rng.below(EVENTS) + 1);
        let deployment = match event {
            Some(e) if rng.chance(90) => Some(event_deployment(e)),
            _ => Some(rng.below(DEPLOYMENTS) + 1),
        };
        let project = rng.chance(20).then(|| rng.below(3) + 1);
        let timestamp = rng.chance(90).then(|| rng.below(1_000_000));
        let size = rng.chance(80).then(|| rng.below(5_000_000));
        b.images.push((i, Some(Image { event, deployment, project, timestamp, size })));
    }
    for o in 1..=OCCURRENCES {
        let event = rng.chance(90).then(|| rng.below(EVENTS) + 1);
        let deployment = match event {
            Some(e) if rng.chance(90) => Some(event_deployment(e)),
            _ => Some(rng.below(DEPLOYMENTS) + 1),
        };
        let determination = match rng.below(20) {
            0 => None,
            1 => Some(rng.pick(&genera)),
            _ => Some(rng.pick(&species)),
        };
        let score = rng.chance(95).then(|| Score::new(rng.below(1_000) as f64 / 1_000.0));
        b.occurrences.push((o, Some(Occurrence { event, deployment, determination, score })));
    }
    for d in 1..=DETECTIONS {
        let image = rng.below(IMAGES) + 1;
        let occurrence = rng.chance(90).then(|| rng.below(OCCURRENCES) + 1);
        let valid = rng.chance(92);
        b.detections.push((d, Some(Detection { image, occurrence, valid })));
    }
    b
}

fn filter_edit(t: &Taxonomy) -> InputBatch {
    let filter = |project, name| Some(FilterTaxon { project, taxon: id(t, name) });
    let mut b = InputBatch::default();
    b.projects.push((1, Some(Project { threshold: Score::new(0.25) })));
    b.projects.push((3, Some(Project { threshold: Score::new(0.6) })));
    b.include_taxa.push((2, None));
    b.include_taxa.push((5, filter(2, "Tortricidae")));
    b.exclude_taxa.push((1, None));
    b.exclude_taxa.push((5, filter(3, "Catocala relicta")));
    // Re-parent a Noctuidae genus under Geometridae (its species keep their stale lists).
    let genus = id(t, "Acronicta");
    b.taxa.push((genus, Some(Taxon { ancestors: vec![id(t, "Arthropoda"), id(t, "Geometridae")] })));
    b
}

fn delete_some_detections(rng: &mut Rng) -> InputBatch {
    let mut b = InputBatch::default();
    for d in 1..=DETECTIONS {
        if rng.chance(30) {
            b.detections.push((d, None));
        }
    }
    b
}

fn random_database_matches_oracle(path: &str, seed: u64) {
    let t = load(path);
    let mut rng = Rng(seed);
    let mut db = Checked::new();
    let loaded = db.apply(&random_database(&t, &mut rng), "load");
    assert_eq!(loaded.deployments.len(), DEPLOYMENTS as usize, "every deployment is reported on load");
    assert_eq!(loaded.events.len(), EVENTS as usize, "every event is reported on load");
    assert_eq!(loaded.images.len(), IMAGES as usize, "every image is reported on load");
    let before = db.engine.snapshot();
    db.apply(&filter_edit(&t), "filter edit");
    assert_ne!(db.engine.snapshot(), before, "the filter edit changed no count");
    let before = db.engine.snapshot();
    db.apply(&delete_some_detections(&mut rng), "delete detections");
    assert_ne!(db.engine.snapshot(), before, "deleting detections changed no count");
}

#[test]
fn random_database_on_quebec_vermont_2022_matches_oracle() {
    random_database_matches_oracle(QUEBEC_VERMONT_2022, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn random_database_on_qc_vt_uk_dk_2023_matches_oracle() {
    random_database_matches_oracle(QC_VT_UK_DK_2023, 0xd1b5_4a32_d192_ed03);
}
