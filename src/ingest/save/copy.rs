//! The big inserts of the write phase as binary `COPY … FROM STDIN` straight into Antenna's
//! tables ([`crate::ingest::save::WriteMethod::Copy`]): occurrences, detections and
//! classifications, the same rows and values as the `INSERT … SELECT FROM UNNEST` statements
//! of [`super::write`] (an integration test compares the two row by row).
//!
//! `COPY` inserts rows in multi-row batches and has no query to plan or arrays to slice,
//! which is where `INSERT … FROM UNNEST` spent Postgres's time. What the `INSERT` computed in
//! SQL is computed here beforehand: `now()` (the transaction's timestamp) and the sent
//! timestamps as `timestamptz`, both read from the server in one query so that they are
//! exactly what the `INSERT` would have stored (the session's time zone applies to naive
//! ones), and each detection's `timestamp` from its image as the read phase found it.

use std::collections::HashMap;
use std::error::Error;

use bytes::{BufMut, BytesMut};
use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::ingest::plan::{distinct, Ids, NewClassification, NewDetection, NewOccurrence, Snapshot};
use crate::store::StoreError;

use super::write::bbox_json;

/// Microseconds between the Unix epoch and Postgres's (2000-01-01 00:00 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A `timestamptz` in Postgres's binary form: microseconds since 2000-01-01 UTC, exactly as
/// the server sent or will store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timestamptz(i64);

impl Timestamptz {
    /// From microseconds since the Unix epoch (how the dataflow keeps image timestamps).
    fn from_unix_micros(micros: i64) -> Timestamptz {
        Timestamptz(micros - POSTGRES_EPOCH_MICROS)
    }
}

impl<'a> FromSql<'a> for Timestamptz {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| format!("timestamptz of {} bytes", raw.len()))?;
        Ok(Timestamptz(i64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

impl ToSql for Timestamptz {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

/// JSON text sent as `jsonb` (binary format version 1: the text, which the server parses as
/// it parses `'…'::jsonb`).
#[derive(Debug)]
struct Jsonb(String);

impl ToSql for Jsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// The transaction's `now()` and every timestamp the batch sent, as the server reads them.
struct Times {
    now: Timestamptz,
    sent: HashMap<String, Timestamptz>,
}

impl Times {
    async fn read(
        tx: &Client,
        detections: &[NewDetection],
        classifications: &[NewClassification],
    ) -> Result<Times, StoreError> {
        let texts: Vec<String> = distinct(
            detections
                .iter()
                .filter_map(|d| d.time.clone())
                .chain(classifications.iter().filter_map(|c| c.time.clone())),
        );
        let row = tx
            .query_typed_one(
                "SELECT now(), ARRAY(SELECT t::timestamptz FROM UNNEST($1::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n)",
                &[(&texts, Type::TEXT_ARRAY)],
            )
            .await?;
        let values: Vec<Timestamptz> = row.try_get(1)?;
        Ok(Times { now: row.try_get(0)?, sent: texts.into_iter().zip(values).collect() })
    }

    fn of(&self, text: &Option<String>) -> Option<Timestamptz> {
        text.as_ref().and_then(|t| self.sent.get(t)).copied()
    }
}

/// The columns each table's `COPY` fills, in the order of its rows' values.
const OCCURRENCE_COLUMNS: &str =
    "id, created_at, updated_at, event_id, deployment_id, project_id, determination_id, determination_score";
const DETECTION_COLUMNS: &str =
    "id, created_at, updated_at, bbox, \"timestamp\", path, detection_time, occurrence_id, \
     source_image_id, detection_algorithm_id";
const CLASSIFICATION_COLUMNS: &str =
    "created_at, updated_at, score, \"timestamp\", algorithm_id, detection_id, taxon_id, \
     category_map_id, logits, scores, terminal";

/// The `COPY` statement of `table`'s `columns`, prepared (for this batch only: a statement
/// kept could go stale under a Django migration) when there are rows for it.
async fn prepare_copy(tx: &Client, table: &str, columns: &str, rows: usize) -> Result<Option<Statement>, StoreError> {
    if rows == 0 {
        return Ok(None);
    }
    Ok(Some(tx.prepare(&format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)")).await?))
}

/// Copies `rows` into the columns of `statement` (of `types`) in binary.
async fn copy<'a, const N: usize>(
    tx: &Client,
    statement: &Statement,
    types: &[Type; N],
    rows: impl Iterator<Item = [&'a (dyn ToSql + Sync); N]>,
) -> Result<u64, StoreError> {
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    pin_mut!(writer);
    for row in rows {
        writer.as_mut().write(&row).await?;
    }
    Ok(writer.finish().await?)
}

/// Inserts the plan's new occurrences, detections and classifications.
pub(super) async fn insert(
    tx: &Client,
    snapshot: &Snapshot,
    occurrences: &[NewOccurrence],
    detections: &[NewDetection],
    classifications: &[NewClassification],
    ids: &Ids,
) -> Result<(), StoreError> {
    if occurrences.is_empty() && detections.is_empty() && classifications.is_empty() {
        return Ok(());
    }
    // One round trip for the timestamps and the three statements (tokio-postgres pipelines
    // the requests of one connection that are awaited together), instead of one each.
    let (times, occurrence_copy, detection_copy, classification_copy) = futures_util::try_join!(
        Times::read(tx, detections, classifications),
        prepare_copy(tx, "main_occurrence", OCCURRENCE_COLUMNS, occurrences.len()),
        prepare_copy(tx, "main_detection", DETECTION_COLUMNS, detections.len()),
        prepare_copy(tx, "main_classification", CLASSIFICATION_COLUMNS, classifications.len()),
    )?;
    let now = &times.now;

    if let Some(statement) = &occurrence_copy {
        let values: Vec<(Option<i64>, Option<f64>)> = occurrences
            .iter()
            .map(|o| (o.determination.and_then(|d| d.0).map(|t| ids.taxon(t)), o.determination.and_then(|d| d.1)))
            .collect();
        copy(
            tx,
            statement,
            &[
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::FLOAT8,
            ],
            occurrences.iter().zip(&ids.occurrences).zip(&values).map(|((o, id), (taxon, score))| {
                [id as &(dyn ToSql + Sync), now, now, &o.event, &o.deployment, &o.project, taxon, score]
            }),
        )
        .await?;
    }

    if let Some(statement) = &detection_copy {
        type DetectionValues = (Option<Jsonb>, Option<Timestamptz>, Option<Timestamptz>, Option<i64>);
        let values: Vec<DetectionValues> = detections
            .iter()
            .map(|d| {
                (
                    d.bbox.map(|b| Jsonb(bbox_json(b))),
                    snapshot.images.get(&d.image).and_then(|i| i.timestamp).map(Timestamptz::from_unix_micros),
                    times.of(&d.time),
                    d.occurrence.map(|n| ids.occurrences[n]),
                )
            })
            .collect();
        copy(
            tx,
            statement,
            &[
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::JSONB,
                Type::TIMESTAMPTZ,
                Type::VARCHAR,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::INT8,
                Type::INT8,
            ],
            detections.iter().zip(&ids.detections).zip(&values).map(
                |((d, id), (bbox, image_time, time, occurrence))| {
                    [
                        id as &(dyn ToSql + Sync),
                        now,
                        now,
                        bbox,
                        image_time,
                        &d.path,
                        time,
                        occurrence,
                        &d.image,
                        &d.algorithm,
                    ]
                },
            ),
        )
        .await?;
    }

    if let Some(statement) = &classification_copy {
        let values: Vec<(Timestamptz, i64, i64)> = classifications
            .iter()
            .map(|c| (times.of(&c.time).unwrap_or(*now), ids.detection(c.detection), ids.taxon(c.taxon)))
            .collect();
        copy(
            tx,
            statement,
            &[
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::FLOAT8,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::FLOAT8_ARRAY,
                Type::FLOAT8_ARRAY,
                Type::BOOL,
            ],
            classifications.iter().zip(&values).map(|(c, (time, detection, taxon))| {
                [
                    now as &(dyn ToSql + Sync),
                    now,
                    &c.score,
                    time,
                    &c.algorithm.id,
                    detection,
                    taxon,
                    &c.algorithm.category_map,
                    &c.logits,
                    &c.scores,
                    &c.terminal,
                ]
            }),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_from_postgres_epoch() {
        assert_eq!(Timestamptz::from_unix_micros(POSTGRES_EPOCH_MICROS), Timestamptz(0));
        // 2026-06-01 00:00:00 UTC
        assert_eq!(Timestamptz::from_unix_micros(1_780_272_000_000_000), Timestamptz(833_587_200_000_000));
        let mut out = BytesMut::new();
        Timestamptz(-1).to_sql(&Type::TIMESTAMPTZ, &mut out).unwrap();
        assert_eq!(&out[..], &[0xff; 8]);
        assert_eq!(Timestamptz::from_sql(&Type::TIMESTAMPTZ, &out).unwrap(), Timestamptz(-1));
        assert!(Timestamptz::from_sql(&Type::TIMESTAMPTZ, &[0; 4]).is_err());
    }

    #[test]
    fn jsonb_is_version_one_then_the_text() {
        let mut out = BytesMut::new();
        Jsonb("[1,2]".into()).to_sql(&Type::JSONB, &mut out).unwrap();
        assert_eq!(&out[..], b"\x01[1,2]");
    }
}
