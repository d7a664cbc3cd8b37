//! Reads Antenna's taxonomy fixture files (`[{species, genus, family, synonym_of?}, …]`).

use std::path::Path;

use anyhow::Context;
use tally_dataflows::taxonomy::{FixtureRow, Taxonomy};

/// Loads a fixture file as the taxonomy `import_taxa` would create, ids from 1.
pub fn load(path: &Path) -> anyhow::Result<Taxonomy> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read taxonomy file {}", path.display()))?;
    let rows: Vec<FixtureRow> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an Antenna taxonomy fixture", path.display()))?;
    Ok(Taxonomy::from_fixture(&rows, 1))
}
