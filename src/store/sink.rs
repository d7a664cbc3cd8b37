//! The changed-count sink: writes counts to Antenna's count columns, one `UPDATE … FROM
//! UNNEST(…)` per table, in one transaction.
//!
//! Values are absolute (a retried or replayed write is harmless) and each statement is guarded
//! with `IS DISTINCT FROM`, so a row whose stored counts already equal the new ones is not
//! touched: no new row version, no `updated`-style side effects, no WAL. Only count columns
//! are written, never an input column. `main_event.calculated_fields_updated_at` is set to
//! `now()` on every event row written, as Django does when it recomputes.

use tally_dataflows::{AllCounts, CountChanges, Micros};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::store::{Store, StoreError};

/// Rows written per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkReport {
    /// `main_sourceimage` rows updated.
    pub images: u64,
    /// `main_event` rows updated.
    pub events: u64,
    /// `main_deployment` rows updated.
    pub deployments: u64,
}

impl SinkReport {
    /// The Antenna tables it wrote.
    pub fn tables(&self) -> Vec<&'static str> {
        [(self.images, "main_sourceimage"), (self.events, "main_event"), (self.deployments, "main_deployment")]
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .map(|(_, t)| t)
            .collect()
    }

    /// Rows updated, all tables.
    pub fn total(&self) -> u64 {
        self.images + self.events + self.deployments
    }
}

const UPDATE_IMAGES: &str = "
UPDATE main_sourceimage s SET detections_count = u.detections
FROM UNNEST($1::int8[], $2::int4[]) AS u(id, detections)
WHERE s.id = u.id AND s.detections_count IS DISTINCT FROM u.detections";

const UPDATE_EVENTS: &str = "
UPDATE main_event e SET
    captures_count = u.captures,
    detections_count = u.detections,
    occurrences_count = u.occurrences,
    start = coalesce(u.first, e.start),
    \"end\" = CASE WHEN u.first IS NULL THEN e.\"end\" ELSE u.last END,
    calculated_fields_updated_at = now()
FROM (
    SELECT id, captures, detections, occurrences,
           timestamptz 'epoch' + first_us * interval '1 microsecond' AS first,
           timestamptz 'epoch' + last_us * interval '1 microsecond' AS last
    FROM UNNEST($1::int8[], $2::int4[], $3::int4[], $4::int4[], $5::int8[], $6::int8[])
         AS v(id, captures, detections, occurrences, first_us, last_us)
) u
WHERE e.id = u.id
  AND (e.captures_count IS DISTINCT FROM u.captures
       OR e.detections_count IS DISTINCT FROM u.detections
       OR e.occurrences_count IS DISTINCT FROM u.occurrences
       OR (u.first IS NOT NULL AND (e.start IS DISTINCT FROM u.first OR e.\"end\" IS DISTINCT FROM u.last)))";

const UPDATE_DEPLOYMENTS: &str = "
UPDATE main_deployment d SET
    events_count = u.events,
    captures_count = u.captures,
    data_source_total_files = u.captures,
    data_source_total_size = u.total_size,
    detections_count = u.detections,
    occurrences_count = u.occurrences,
    taxa_count = u.taxa,
    first_capture_timestamp = u.first,
    last_capture_timestamp = u.last
FROM (
    SELECT id, events, captures, total_size, detections, occurrences, taxa,
           timestamptz 'epoch' + first_us * interval '1 microsecond' AS first,
           timestamptz 'epoch' + last_us * interval '1 microsecond' AS last
    FROM UNNEST($1::int8[], $2::int4[], $3::int4[], $4::int8[], $5::int4[], $6::int4[], $7::int4[], $8::int8[], $9::int8[])
         AS v(id, events, captures, total_size, detections, occurrences, taxa, first_us, last_us)
) u
WHERE d.id = u.id
  AND (d.events_count IS DISTINCT FROM u.events
       OR d.captures_count IS DISTINCT FROM u.captures
       OR d.data_source_total_files IS DISTINCT FROM u.captures
       OR d.data_source_total_size IS DISTINCT FROM u.total_size
       OR d.detections_count IS DISTINCT FROM u.detections
       OR d.occurrences_count IS DISTINCT FROM u.occurrences
       OR d.taxa_count IS DISTINCT FROM u.taxa
       OR d.first_capture_timestamp IS DISTINCT FROM u.first
       OR d.last_capture_timestamp IS DISTINCT FROM u.last)";

/// A count as the `integer` column stores it (counts beyond 2^31 saturate).
fn int4(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(if n < 0 { i32::MIN } else { i32::MAX })
}

/// Writes the new values of the changed owners (deleted owners, `None`, need no write).
pub async fn write_changes(store: &Store, changes: &CountChanges) -> Result<SinkReport, StoreError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let report = write_changes_in(&*tx, changes).await?;
    tx.commit().await?;
    Ok(report)
}

/// As [`write_changes`], inside the caller's transaction (ingest commits rows and the counts
/// that reflect them together).
pub async fn write_changes_in(tx: &impl GenericClient, changes: &CountChanges) -> Result<SinkReport, StoreError> {
    let mut report = SinkReport::default();

    let images: Vec<_> = changes.images.iter().filter_map(|(id, c)| c.map(|c| ((*id), int4(c.detections)))).collect();
    if !images.is_empty() {
        let (ids, detections): (Vec<i64>, Vec<i32>) = images.into_iter().unzip();
        report.images =
            tx.execute_typed(UPDATE_IMAGES, &[(&ids, Type::INT8_ARRAY), (&detections, Type::INT4_ARRAY)]).await?;
    }

    let events: Vec<_> = changes.events.iter().filter_map(|(id, c)| c.map(|c| ((*id), c))).collect();
    if !events.is_empty() {
        let ids: Vec<i64> = events.iter().map(|(id, _)| *id).collect();
        let captures: Vec<i32> = events.iter().map(|(_, c)| int4(c.captures)).collect();
        let detections: Vec<i32> = events.iter().map(|(_, c)| int4(c.detections)).collect();
        let occurrences: Vec<i32> = events.iter().map(|(_, c)| int4(c.occurrences)).collect();
        let first: Vec<Option<Micros>> = events.iter().map(|(_, c)| c.start).collect();
        let last: Vec<Option<Micros>> = events.iter().map(|(_, c)| c.end).collect();
        report.events = tx
            .execute_typed(
                UPDATE_EVENTS,
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&captures, Type::INT4_ARRAY),
                    (&detections, Type::INT4_ARRAY),
                    (&occurrences, Type::INT4_ARRAY),
                    (&first, Type::INT8_ARRAY),
                    (&last, Type::INT8_ARRAY),
                ],
            )
            .await?;
    }

    let deployments: Vec<_> = changes.deployments.iter().filter_map(|(id, c)| c.map(|c| ((*id), c))).collect();
    if !deployments.is_empty() {
        let ids: Vec<i64> = deployments.iter().map(|(id, _)| *id).collect();
        let events: Vec<i32> = deployments.iter().map(|(_, c)| int4(c.events)).collect();
        let captures: Vec<i32> = deployments.iter().map(|(_, c)| int4(c.captures)).collect();
        let size: Vec<Option<i64>> = deployments.iter().map(|(_, c)| c.total_size).collect();
        let detections: Vec<i32> = deployments.iter().map(|(_, c)| int4(c.detections)).collect();
        let occurrences: Vec<i32> = deployments.iter().map(|(_, c)| int4(c.occurrences)).collect();
        let taxa: Vec<i32> = deployments.iter().map(|(_, c)| int4(c.taxa)).collect();
        let first: Vec<Option<Micros>> = deployments.iter().map(|(_, c)| c.first_capture).collect();
        let last: Vec<Option<Micros>> = deployments.iter().map(|(_, c)| c.last_capture).collect();
        report.deployments = tx
            .execute_typed(
                UPDATE_DEPLOYMENTS,
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&events, Type::INT4_ARRAY),
                    (&captures, Type::INT4_ARRAY),
                    (&size, Type::INT8_ARRAY),
                    (&detections, Type::INT4_ARRAY),
                    (&occurrences, Type::INT4_ARRAY),
                    (&taxa, Type::INT4_ARRAY),
                    (&first, Type::INT8_ARRAY),
                    (&last, Type::INT8_ARRAY),
                ],
            )
            .await?;
    }
    Ok(report)
}

/// Writes every owner's counts (only rows that differ are touched).
pub async fn write_all(store: &Store, all: &AllCounts) -> Result<SinkReport, StoreError> {
    let changes = CountChanges {
        images: all.images.iter().map(|(id, c)| (*id, Some(*c))).collect(),
        events: all.events.iter().map(|(id, c)| (*id, Some(*c))).collect(),
        deployments: all.deployments.iter().map(|(id, c)| (*id, Some(*c))).collect(),
    };
    write_changes(store, &changes).await
}
