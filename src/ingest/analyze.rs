//! Fresh planner statistics for the tables ingest grows.
//!
//! Antenna's foreign keys are `DEFERRABLE INITIALLY DEFERRED`, so every row ingest inserts is
//! checked at COMMIT by a query Postgres plans once per connection and keeps
//! (`SELECT 1 FROM ONLY main_detection x WHERE id = $1 FOR KEY SHARE OF x`). A plan made while
//! the table was empty is a sequential scan, and it stays cached until the table's statistics
//! change. On a database that starts empty, with autovacuum off or not yet round, every batch
//! then scans the whole referenced tables once per inserted row: measured with `tally-tools bench
//! jobs` on this machine (autovacuum off), a COMMIT of 576 results ran for over 7 minutes, with
//! 167,671 sequential scans of `main_detection` reading 7 billion tuples.
//!
//! So ingest analyzes a table itself each time its own inserts have doubled it since the last
//! analyze (and at least [`MIN_GROWTH`] rows): an `ANALYZE` updates the statistics, which makes
//! every backend re-plan its cached queries on that table. That is a logarithmic number of
//! analyzes (15 while a table grows from empty to 100 million rows in batches of 4,000), each sampling at most 30,000
//! rows, run after the commit on a connection of its own, never while a batch waits. Where
//! autovacuum runs, this only does early what autovacuum would do later. The analyzes leave out
//! array columns ([`analyze_statement`]): statistics of the score and logit vectors cost
//! seconds of CPU per analyze with ADC's models, and no plan uses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::save::RowCounts;
use crate::metrics::names;
use crate::store::Store;

/// Rows a table must have gained before ingest analyzes it, however small it was.
pub const MIN_GROWTH: f64 = 1_000.0;

/// The tables ingest inserts into, as named in Postgres.
const TABLES: [&str; 4] = ["main_detection", "main_classification", "main_occurrence", "main_taxon"];

/// Per table: the rows it had at its last analyze (Postgres's `reltuples`), and the rows
/// ingest has inserted since.
pub struct Analyzer {
    store: Store,
    tables: HashMap<&'static str, (f64, u64)>,
    running: Arc<AtomicBool>,
}

impl Analyzer {
    /// Reads each table's row estimate (a never-analyzed table counts as empty).
    pub async fn new(store: Store) -> Analyzer {
        let mut tables: HashMap<&'static str, (f64, u64)> = TABLES.iter().map(|t| (*t, (0.0, 0))).collect();
        let estimates = async {
            let client = store.client().await.ok()?;
            client
                .query(
                    "SELECT c.relname::text, greatest(c.reltuples, 0)::float8 FROM pg_class c
                     WHERE c.relname = ANY($1) AND c.relnamespace = to_regnamespace(current_schema())::oid",
                    &[&TABLES.to_vec()],
                )
                .await
                .ok()
        };
        for row in estimates.await.unwrap_or_default() {
            if let (Ok(name), Ok(tuples)) = (row.try_get::<_, String>(0), row.try_get::<_, f64>(1)) {
                if let Some(entry) = TABLES.iter().find(|t| **t == name).and_then(|t| tables.get_mut(t)) {
                    entry.0 = tuples;
                }
            }
        }
        Analyzer { store, tables, running: Arc::new(AtomicBool::new(false)) }
    }

    /// Counts a committed batch's rows, and analyzes (in the background) the tables that have
    /// doubled since their last analyze. One analyze runs at a time; a table whose turn comes
    /// while one runs is analyzed after a later batch.
    pub fn committed(&mut self, rows: &RowCounts) {
        for (table, n) in [
            ("main_detection", rows.detections + rows.null_markers),
            ("main_classification", rows.classifications),
            ("main_occurrence", rows.occurrences),
            ("main_taxon", rows.taxa),
        ] {
            if let Some(entry) = self.tables.get_mut(table) {
                entry.1 += n;
            }
        }
        let due: Vec<&'static str> = self
            .tables
            .iter()
            .filter(|(_, (tuples, inserted))| due(*tuples, *inserted))
            .map(|(table, _)| *table)
            .collect();
        if due.is_empty() || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        for table in &due {
            if let Some(entry) = self.tables.get_mut(table) {
                *entry = (entry.0 + entry.1 as f64, 0);
            }
        }
        let (store, running) = (self.store.clone(), Arc::clone(&self.running));
        tokio::spawn(async move {
            let started = Instant::now();
            let list = due.join(", ");
            let result = async {
                let client = store.client().await.map_err(|e| e.to_string())?;
                match analyze_statement(&client, &due).await.map_err(|e| e.to_string())? {
                    Some(statement) => client.batch_execute(&statement).await.map_err(|e| e.to_string()),
                    None => Err("none of the tables is in the current schema".to_string()),
                }
            };
            match result.await {
                Ok(()) => {
                    info!(tables = %list, seconds = started.elapsed().as_secs_f64(), "analyzed tables ingest has doubled");
                    metrics::counter!(names::INGEST_ANALYZES).increment(due.len() as u64);
                }
                Err(e) => warn!(tables = %list, error = %e, "could not analyze tables ingest has grown"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// `ANALYZE` of `tables`, each limited to its columns that are not arrays (`None` when none of
/// them exists: a bare `ANALYZE` would analyze the whole database).
///
/// The row count and the statistics of the key columns are what the plans of the foreign-key
/// checks and of ingest's reads need. The score and logit arrays of `main_classification`
/// (2,497 to 29,176 numbers each with ADC's models) are what made a full `ANALYZE` expensive:
/// it detoasts and tallies the elements of every sampled array. On 4,000 rows of 2,497-class
/// vectors a full `ANALYZE` took 1.4–3.2 s of a core, the key columns alone 3 ms (psql,
/// this machine); with 30,000 sampled rows the full one would run for seconds while ingest
/// competes for the same two cores. Autovacuum and Django's own `ANALYZE`s are unaffected.
async fn analyze_statement(
    client: &tokio_postgres::Client,
    tables: &[&str],
) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT format('%I (%s)', c.relname, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum))
             FROM pg_class c
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             JOIN pg_type t ON t.oid = a.atttypid
             WHERE c.relname = ANY($1) AND c.relnamespace = to_regnamespace(current_schema())::oid
               AND t.typcategory <> 'A'
             GROUP BY c.relname ORDER BY c.relname",
            &[&tables],
        )
        .await?;
    let targets = rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<Vec<_>, _>>()?;
    Ok((!targets.is_empty()).then(|| format!("ANALYZE {}", targets.join(", "))))
}

/// Whether a table that had `tuples` rows at its last analyze and has gained `inserted` since
/// is due: it has doubled, and grown by at least [`MIN_GROWTH`] rows.
fn due(tuples: f64, inserted: u64) -> bool {
    inserted as f64 >= tuples.max(MIN_GROWTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_analyzed_each_time_it_doubles() {
        assert!(!due(0.0, 999));
        assert!(due(0.0, 1_000));
        assert!(!due(50_000.0, 49_999));
        assert!(due(50_000.0, 50_000));
        // Growing from empty to 100 million rows in batches of 4,000: 15 analyzes.
        let (mut tuples, mut inserted, mut analyzes) = (0.0, 0u64, 0);
        for _ in 0..25_000 {
            inserted += 4_000;
            if due(tuples, inserted) {
                tuples += inserted as f64;
                inserted = 0;
                analyzes += 1;
            }
        }
        assert_eq!(analyzes, 15);
    }
}
