//! Checks, before any write, that the database has every table and column tally uses.

use std::collections::HashSet;

use crate::store::{Store, StoreError};

/// Every `(table, columns)` the count path reads or writes.
pub const REQUIRED: &[(&str, &[&str])] = &[
    ("main_project", &["id", "default_filters_score_threshold"]),
    ("main_project_default_filters_include_taxa", &["id", "project_id", "taxon_id"]),
    ("main_project_default_filters_exclude_taxa", &["id", "project_id", "taxon_id"]),
    (
        "main_deployment",
        &[
            "id",
            "project_id",
            "events_count",
            "captures_count",
            "data_source_total_files",
            "data_source_total_size",
            "detections_count",
            "occurrences_count",
            "taxa_count",
            "first_capture_timestamp",
            "last_capture_timestamp",
        ],
    ),
    (
        "main_event",
        &[
            "id",
            "deployment_id",
            "project_id",
            "captures_count",
            "detections_count",
            "occurrences_count",
            "start",
            "end",
            "calculated_fields_updated_at",
        ],
    ),
    ("main_sourceimage", &["id", "event_id", "deployment_id", "project_id", "timestamp", "size", "detections_count"]),
    ("main_detection", &["id", "source_image_id", "occurrence_id", "bbox"]),
    ("main_occurrence", &["id", "event_id", "deployment_id", "determination_id", "determination_score"]),
    ("main_taxon", &["id", "parents_json"]),
];

/// Fails with [`StoreError::NotMigrated`] or [`StoreError::MissingColumn`] unless every
/// required table and column exists and tally's schema is migrated.
pub async fn check_schema(store: &Store) -> Result<(), StoreError> {
    let client = store.client().await?;
    let tables: Vec<&str> = REQUIRED.iter().map(|(t, _)| *t).collect();
    let rows = client
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = ANY($1)",
            &[&tables],
        )
        .await?;
    let present: HashSet<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let present_tables: HashSet<&str> = present.iter().map(|(t, _)| t.as_str()).collect();
    for (table, columns) in REQUIRED {
        if !present_tables.contains(table) {
            return Err(StoreError::NotMigrated(table.to_string()));
        }
        for column in *columns {
            if !present.contains(&(table.to_string(), column.to_string())) {
                return Err(StoreError::MissingColumn { table: table.to_string(), column: column.to_string() });
            }
        }
    }
    let migrated: bool = client
        .query_one(
            "SELECT to_regprocedure('tally.passes(bigint, double precision, bigint)') IS NOT NULL
                    AND to_regclass('tally.change_outbox') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !migrated {
        return Err(StoreError::NotMigrated("tally (schema)".to_string()));
    }
    Ok(())
}
