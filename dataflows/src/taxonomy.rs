//! Antenna's taxonomy fixtures (`ami/main/fixtures/*-taxa-*.json`) as taxon rows.
//!
//! Loading a fixture with `manage.py import_taxa` creates one root (`Arthropoda`, PHYLUM), then
//! FAMILY → GENUS → SPECIES, and — the quirk of `import_taxa.py:424-437` — a row
//! `{species: S, synonym_of: A}` creates the accepted species A, if it does not exist yet, with
//! the synonym S as its parent, so A's `parents_json` holds four entries: root, family, genus,
//! S. Excluding a synonym therefore also excludes its accepted species. This module reproduces
//! that result without JSON (the caller parses).

use std::collections::BTreeMap;

use crate::model::{Id, Taxon};

/// One row of a fixture file (other keys, such as `gbif_taxon_key`, are ignored).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct FixtureRow {
    /// Species name.
    pub species: String,
    /// Genus name.
    pub genus: String,
    /// Family name.
    pub family: String,
    /// The accepted species this one is a synonym of, if any.
    #[serde(default)]
    pub synonym_of: Option<String>,
}

/// Taxonomic rank, in Antenna's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// The auto-created root.
    Phylum,
    /// Family.
    Family,
    /// Genus.
    Genus,
    /// Species.
    Species,
}

/// A loaded taxonomy: ids, names, ranks and ancestor lists.
#[derive(Clone, Debug, Default)]
pub struct Taxonomy {
    /// Taxon rows by id (ancestors as in `parents_json`).
    pub taxa: BTreeMap<Id, Taxon>,
    /// Name of each taxon.
    pub names: BTreeMap<Id, String>,
    /// Rank of each taxon.
    pub ranks: BTreeMap<Id, Rank>,
    /// Id by name.
    pub ids: BTreeMap<String, Id>,
}

impl Taxonomy {
    /// Builds the taxonomy `import_taxa` would create, with ids from `first_id` upward in
    /// creation order (root, then per row: family, genus, species, accepted species as first
    /// seen). Duplicate names keep their first row.
    pub fn from_fixture(rows: &[FixtureRow], first_id: Id) -> Self {
        let mut t = Taxonomy::default();
        let root = t.add("Arthropoda", Rank::Phylum, Vec::new(), first_id);
        let mut next = root + 1;
        for row in rows {
            let family = t.get_or_add(&row.family, Rank::Family, vec![root], &mut next);
            let genus = t.get_or_add(&row.genus, Rank::Genus, vec![root, family], &mut next);
            let species = t.get_or_add(&row.species, Rank::Species, vec![root, family, genus], &mut next);
            // `species` is a synonym of the accepted species `synonym_of`. If that one does not
            // exist yet, `import_taxa` creates it with the synonym as parent, and it keeps that
            // parent when its own row comes later; if it exists already, nothing changes.
            if let Some(accepted) = &row.synonym_of {
                if !t.ids.contains_key(accepted) {
                    let mut ancestors = t.taxa[&species].ancestors.clone();
                    ancestors.push(species);
                    t.get_or_add(accepted, Rank::Species, ancestors, &mut next);
                }
            }
        }
        t
    }

    fn add(&mut self, name: &str, rank: Rank, ancestors: Vec<Id>, id: Id) -> Id {
        self.taxa.insert(id, Taxon { ancestors });
        self.names.insert(id, name.to_string());
        self.ranks.insert(id, rank);
        self.ids.insert(name.to_string(), id);
        id
    }

    fn get_or_add(&mut self, name: &str, rank: Rank, ancestors: Vec<Id>, next: &mut Id) -> Id {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = *next;
        *next += 1;
        self.add(name, rank, ancestors, id)
    }

    /// Ids of every taxon of `rank`.
    pub fn of_rank(&self, rank: Rank) -> Vec<Id> {
        self.ranks.iter().filter(|(_, r)| **r == rank).map(|(id, _)| *id).collect()
    }

    /// A synthetic taxonomy: `families` families of `genera` genera of `species` species.
    pub fn synthetic(families: usize, genera: usize, species: usize) -> Self {
        let mut rows = Vec::new();
        for f in 0..families {
            for g in 0..genera {
                for s in 0..species {
                    rows.push(FixtureRow {
                        species: format!("Genus{f}x{g} species{s}"),
                        genus: format!("Genus{f}x{g}"),
                        family: format!("Family{f}"),
                        synonym_of: None,
                    });
                }
            }
        }
        Taxonomy::from_fixture(&rows, 1)
    }
}
