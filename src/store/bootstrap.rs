//! Bootstrap: every dataflow input read from Postgres with binary `COPY … TO STDOUT`, fed to
//! the engine in bounded chunks.
//!
//! Memory: one chunk of rows (`CHUNK` rows) in flight besides what the engine holds.
//! Timestamps are read as microseconds since the Unix epoch of the stored instant; the
//! dataflow only orders them and the sink writes them back unchanged.

use std::pin::pin;
use std::time::Instant;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tally_dataflows::{
    Deployment, Detection, Engine, Event, FilterTaxon, Id, Image, InputBatch, Occurrence, Project, Score, Taxon,
};
use tokio_postgres::binary_copy::{BinaryCopyOutRow, BinaryCopyOutStream};
use tokio_postgres::types::Type;
use tracing::info;

use crate::store::{Store, StoreError};

/// Rows per engine batch during bootstrap.
const CHUNK: usize = 200_000;

/// What a bootstrap read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct BootstrapReport {
    /// Rows read, all tables.
    pub rows: u64,
    /// Detections read.
    pub detections: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// A table's rows as one dataflow input.
struct Source {
    name: &'static str,
    sql: &'static str,
    types: &'static [Type],
    push: fn(&BinaryCopyOutRow, &mut InputBatch) -> Result<(), tokio_postgres::Error>,
    /// Records that the row with this id is gone.
    remove: fn(&mut InputBatch, Id),
}

fn id(row: &BinaryCopyOutRow, i: usize) -> Result<Id, tokio_postgres::Error> {
    row.try_get::<Id>(i)
}

fn opt_id(row: &BinaryCopyOutRow, i: usize) -> Result<Option<Id>, tokio_postgres::Error> {
    row.try_get::<Option<Id>>(i)
}

const SOURCES: &[Source] = &[
    Source {
        name: "main_taxon",
        sql: "SELECT t.id, coalesce((SELECT array_agg((e->>'id')::numeric::int8)
                FROM jsonb_array_elements(CASE jsonb_typeof(t.parents_json) WHEN 'array' THEN t.parents_json ELSE '[]'::jsonb END) e
                WHERE jsonb_typeof(e) = 'object' AND e ? 'id'), '{}')
              FROM main_taxon t",
        types: &[Type::INT8, Type::INT8_ARRAY],
        push: |r, b| {
            let ancestors = r.try_get::<Vec<Id>>(1)?;
            b.taxa.push((id(r, 0)?, Some(Taxon { ancestors })));
            Ok(())
        },
        remove: |b, id| b.taxa.push((id, None)),
    },
    Source {
        name: "main_project",
        sql: "SELECT id, default_filters_score_threshold FROM main_project",
        types: &[Type::INT8, Type::FLOAT8],
        push: |r, b| {
            b.projects.push((id(r, 0)?, Some(Project { threshold: Score::new(r.try_get(1)?) })));
            Ok(())
        },
        remove: |b, id| b.projects.push((id, None)),
    },
    Source {
        name: "main_project_default_filters_include_taxa",
        sql: "SELECT id, project_id, taxon_id FROM main_project_default_filters_include_taxa",
        types: &[Type::INT8, Type::INT8, Type::INT8],
        push: |r, b| {
            b.include_taxa.push((id(r, 0)?, Some(FilterTaxon { project: id(r, 1)?, taxon: id(r, 2)? })));
            Ok(())
        },
        remove: |b, id| b.include_taxa.push((id, None)),
    },
    Source {
        name: "main_project_default_filters_exclude_taxa",
        sql: "SELECT id, project_id, taxon_id FROM main_project_default_filters_exclude_taxa",
        types: &[Type::INT8, Type::INT8, Type::INT8],
        push: |r, b| {
            b.exclude_taxa.push((id(r, 0)?, Some(FilterTaxon { project: id(r, 1)?, taxon: id(r, 2)? })));
            Ok(())
        },
        remove: |b, id| b.exclude_taxa.push((id, None)),
    },
    Source {
        name: "main_deployment",
        sql: "SELECT id, project_id FROM main_deployment",
        types: &[Type::INT8, Type::INT8],
        push: |r, b| {
            b.deployments.push((id(r, 0)?, Some(Deployment { project: opt_id(r, 1)? })));
            Ok(())
        },
        remove: |b, id| b.deployments.push((id, None)),
    },
    Source {
        name: "main_event",
        sql: "SELECT id, deployment_id, project_id FROM main_event",
        types: &[Type::INT8, Type::INT8, Type::INT8],
        push: |r, b| {
            b.events.push((id(r, 0)?, Some(Event { deployment: opt_id(r, 1)?, project: opt_id(r, 2)? })));
            Ok(())
        },
        remove: |b, id| b.events.push((id, None)),
    },
    Source {
        name: "main_sourceimage",
        sql: "SELECT id, event_id, deployment_id, project_id,
                (extract(epoch FROM \"timestamp\") * 1000000)::int8, size
              FROM main_sourceimage",
        types: &[Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::INT8],
        push: |r, b| {
            b.images.push((
                id(r, 0)?,
                Some(Image {
                    event: opt_id(r, 1)?,
                    deployment: opt_id(r, 2)?,
                    project: opt_id(r, 3)?,
                    timestamp: r.try_get(4)?,
                    size: r.try_get(5)?,
                }),
            ));
            Ok(())
        },
        remove: |b, id| b.images.push((id, None)),
    },
    Source {
        name: "main_occurrence",
        sql: "SELECT id, event_id, deployment_id, determination_id, determination_score FROM main_occurrence",
        types: &[Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::FLOAT8],
        push: |r, b| {
            b.occurrences.push((
                id(r, 0)?,
                Some(Occurrence {
                    event: opt_id(r, 1)?,
                    deployment: opt_id(r, 2)?,
                    determination: opt_id(r, 3)?,
                    score: r.try_get::<Option<f64>>(4)?.map(Score::new),
                }),
            ));
            Ok(())
        },
        remove: |b, id| b.occurrences.push((id, None)),
    },
    Source {
        name: "main_detection",
        sql: "SELECT id, source_image_id, occurrence_id, bbox IS NOT NULL FROM main_detection",
        types: &[Type::INT8, Type::INT8, Type::INT8, Type::BOOL],
        push: |r, b| {
            b.detections.push((
                id(r, 0)?,
                Some(Detection { image: id(r, 1)?, occurrence: opt_id(r, 2)?, valid: r.try_get(3)? }),
            ));
            Ok(())
        },
        remove: |b, id| b.detections.push((id, None)),
    },
];

/// Reads every input table into `engine`.
pub async fn bootstrap(store: &Store, engine: &mut Engine) -> Result<BootstrapReport, StoreError> {
    let client = store.client().await?;
    let start = Instant::now();
    let estimate: i64 = client
        .query_one(
            "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::int8 FROM pg_class
             WHERE oid = ANY(ARRAY['main_taxon','main_project','main_deployment','main_event','main_sourceimage',
                                   'main_occurrence','main_detection']::regclass[])",
            &[],
        )
        .await?
        .get(0);
    let bar = ProgressBar::new(estimate.max(1) as u64).with_style(
        ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/~{len} rows  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut report = BootstrapReport::default();
    for source in SOURCES {
        bar.set_message(source.name);
        let copy = client.copy_out(&format!("COPY ({}) TO STDOUT (FORMAT binary)", source.sql)).await?;
        let mut rows = pin!(BinaryCopyOutStream::new(copy, source.types));
        let mut batch = InputBatch::default();
        let mut read = 0u64;
        while let Some(row) = rows.next().await {
            (source.push)(&row?, &mut batch)?;
            read += 1;
            if batch.len() >= CHUNK {
                apply(engine, &batch)?;
                batch = InputBatch::default();
                bar.inc(CHUNK as u64);
                if bar.is_hidden() {
                    info!(table = source.name, rows = read, "bootstrap progress");
                }
            }
        }
        apply(engine, &batch)?;
        bar.inc(batch.len() as u64);
        if source.name == "main_detection" {
            report.detections = read;
        }
        report.rows += read;
        info!(table = source.name, rows = read, "bootstrap read table");
    }
    bar.finish_and_clear();
    report.seconds = start.elapsed().as_secs_f64();
    info!(rows = report.rows, seconds = report.seconds, "bootstrap done");
    // The load freed many blocks inside the heap; give them back.
    crate::memory::trim();
    Ok(report)
}

fn apply(engine: &mut Engine, batch: &InputBatch) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    tokio::task::block_in_place(|| engine.apply(batch))?;
    Ok(())
}

/// Reads the current rows of input table `table` with these primary keys into `batch`: an
/// upsert for each row found, a delete for each id that no longer exists. The change feed
/// turns its outbox entries into exact input differences this way (the engine diffs them
/// against the rows it holds, so an unchanged row changes nothing).
pub async fn read_by_id(
    tx: &tokio_postgres::Client,
    table: &str,
    ids: &[i64],
    batch: &mut InputBatch,
) -> Result<(), StoreError> {
    let found = read_rows(tx, table, "id", ids, batch).await?;
    let Some(source) = SOURCES.iter().find(|s| s.name == table) else {
        return Err(StoreError::NotMigrated(format!("{table} (not a dataflow input)")));
    };
    let found: std::collections::HashSet<i64> = found.into_iter().collect();
    for &id in ids {
        if !found.contains(&id) {
            (source.remove)(batch, id);
        }
    }
    Ok(())
}

/// Whether `table` is an input of the counts (one the change feed watches).
pub fn is_input(table: &str) -> bool {
    SOURCES.iter().any(|s| s.name == table)
}

/// Reads the rows of input table `table` whose `column` is in `ids` into `batch`, as upserts,
/// and returns the ids of the rows read.
/// Ingest uses this to bring the engine the rows that Django may have created since the
/// bootstrap (a new image, event or taxon) before it counts anything that refers to them.
pub async fn read_rows(
    tx: &tokio_postgres::Client,
    table: &str,
    column: &str,
    ids: &[i64],
    batch: &mut InputBatch,
) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let Some(source) = SOURCES.iter().find(|s| s.name == table) else {
        return Err(StoreError::NotMigrated(format!("{table} (not a dataflow input)")));
    };
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let sql = format!(
        "COPY (SELECT * FROM ({}) s WHERE s.{column} = ANY('{{{}}}'::int8[])) TO STDOUT (FORMAT binary)",
        source.sql,
        list.join(",")
    );
    let copy = tx.copy_out(&sql).await?;
    let mut rows = pin!(BinaryCopyOutStream::new(copy, source.types));
    let mut read = Vec::new();
    while let Some(row) = rows.next().await {
        let row = row?;
        read.push(row.try_get::<i64>(0)?);
        (source.push)(&row, batch)?;
    }
    Ok(read)
}
