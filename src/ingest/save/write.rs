//! The write phase of a batch save: executes a [`Plan`] with one bulk statement per table,
//! after creating its taxa and allocating the ids of its new rows, with every NOT NULL column
//! supplied as Django would. New occurrences, detections and classifications go in by binary
//! `COPY` ([`super::copy`]) or by `INSERT … SELECT FROM UNNEST` (here), as [`WriteMethod`]
//! says; the other statements are the same either way.

use std::collections::HashMap;

use tally_dataflows::{InputBatch, Known};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::{JobLogLine, WriteMethod};
use crate::ingest::plan::{
    distinct, Ids, JobImage, NewClassification, NewDetection, NewOccurrence, OccurrenceUpdate, Plan, Snapshot,
};
use crate::store::bootstrap::read_rows;
use crate::store::StoreError;

/// Creates the taxa of `plan` (made from `snapshot`) and allocates the ids of its new rows in
/// `tx`: returns the ids, the batch's dataflow input, and how many taxa were created (a
/// concurrent insert of the same name, or an inactive taxon of that name, is reused, not
/// created). The three statements go in one round trip (tokio-postgres pipelines the queries
/// of one connection that are awaited together).
pub(super) async fn stage(
    tx: &Client,
    known: &Known,
    snapshot: &Snapshot,
    plan: &Plan,
) -> Result<(Ids, InputBatch, u64), StoreError> {
    let ((taxa, created), detections, occurrences) = futures_util::try_join!(
        insert_taxa(tx, &plan.taxa),
        allocate(tx, "main_detection", plan.detections.len()),
        allocate(tx, "main_occurrence", plan.occurrences.len()),
    )?;
    let ids = Ids { detections, occurrences, taxa };
    let mut input = plan.input(snapshot, &ids);
    let missing: Vec<i64> = distinct(ids.taxa.iter().copied().filter(|id| !known.taxa.contains(id)));
    read_rows(tx, "main_taxon", "id", &missing, &mut input).await?;
    Ok((ids, input, created))
}

/// Writes the rows of `plan` (made from `snapshot`, its ids allocated by [`stage`]) in `tx`.
pub(super) async fn write(
    tx: &Client,
    snapshot: &Snapshot,
    plan: &Plan,
    ids: &Ids,
    method: WriteMethod,
) -> Result<(), StoreError> {
    match method {
        WriteMethod::Copy => {
            super::copy::insert(tx, snapshot, &plan.occurrences, &plan.detections, &plan.classifications, ids).await?
        }
        WriteMethod::Unnest => {
            insert_occurrences(tx, &plan.occurrences, ids).await?;
            insert_detections(tx, &plan.detections, ids).await?;
            insert_classifications(tx, &plan.classifications, ids).await?;
        }
    }
    attach_occurrences(tx, &plan.attach, ids).await?;
    fill_paths(tx, &plan.fill_path).await?;
    write_determinations(tx, &plan.determinations, ids).await?;
    write_job_images(tx, &plan.job_images).await?;
    Ok(())
}

/// Creates a taxon (rank UNKNOWN, no parents) for each label; returns their ids in order and
/// how many were created.
async fn insert_taxa(tx: &Client, labels: &[String]) -> Result<(Vec<i64>, u64), StoreError> {
    if labels.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut ids: HashMap<String, i64> = HashMap::new();
    let mut created = 0;
    // A concurrent insert of the same name, or an inactive taxon of that name, resolves to the
    // existing row. The no-op update names no key column, so it locks the row `NO KEY
    // UPDATE`: never in the way of the foreign-key checks (`KEY SHARE`) of a batch committing
    // meanwhile (naming `name`, a unique key, would lock it exclusively).
    for row in tx
        .query_typed(
            "INSERT INTO main_taxon (created_at, updated_at, name, rank, active, author, notes, parents_json)
             SELECT now(), now(), n, 'UNKNOWN', true, '', '', '[]'::jsonb FROM UNNEST($1::text[]) AS n
             ON CONFLICT (name) DO UPDATE SET updated_at = main_taxon.updated_at
             RETURNING id, name, (xmax = 0)",
            &[(&labels, Type::TEXT_ARRAY)],
        )
        .await?
    {
        ids.insert(row.try_get(1)?, row.try_get(0)?);
        if row.try_get::<_, bool>(2)? {
            created += 1;
        }
    }
    // ON CONFLICT … DO UPDATE returns a row for every label.
    Ok((labels.iter().map(|l| ids[l]).collect(), created))
}

/// Many float vectors as one: the values end to end (sent as one binary `float8[]`, which
/// Postgres reads without parsing text) and, per vector, its 1-based bounds in them, so that
/// `flat[lo:hi]` is the vector again (`hi = lo - 1` for an empty one, both NULL for none).
#[derive(Debug, Default, PartialEq)]
pub(super) struct FlatVectors {
    pub(super) values: Vec<f64>,
    pub(super) lo: Vec<Option<i32>>,
    pub(super) hi: Vec<Option<i32>>,
}

impl FlatVectors {
    pub(super) fn push(&mut self, vector: Option<&[f64]>) {
        match vector {
            Some(v) => {
                self.lo.push(Some(self.values.len() as i32 + 1));
                self.values.extend_from_slice(v);
                self.hi.push(Some(self.values.len() as i32));
            }
            None => {
                self.lo.push(None);
                self.hi.push(None);
            }
        }
    }
}

pub(super) fn bbox_json(b: [f64; 4]) -> String {
    serde_json::Value::from(b.to_vec()).to_string()
}

async fn allocate(tx: &Client, table: &str, n: usize) -> Result<Vec<i64>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let rows = tx
        .query_typed(
            // The sequence is looked up once, not per row: `pg_get_serial_sequence` is a
            // catalog lookup that made each id cost ~10 µs instead of ~1.5 µs.
            "WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence($1, 'id')::regclass AS seq)
             SELECT nextval(s.seq) FROM s, generate_series(1, $2::int8)",
            &[(&table, Type::TEXT), (&(n as i64), Type::INT8)],
        )
        .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

async fn insert_occurrences(tx: &Client, new: &[NewOccurrence], ids: &Ids) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let events: Vec<Option<i64>> = new.iter().map(|o| o.event).collect();
    let deployments: Vec<Option<i64>> = new.iter().map(|o| o.deployment).collect();
    let projects: Vec<Option<i64>> = new.iter().map(|o| o.project).collect();
    let taxa: Vec<Option<i64>> = new.iter().map(|o| o.determination.and_then(|d| d.0).map(|t| ids.taxon(t))).collect();
    let scores: Vec<Option<f64>> = new.iter().map(|o| o.determination.and_then(|d| d.1)).collect();
    tx.execute_typed(
        "INSERT INTO main_occurrence (id, created_at, updated_at, event_id, deployment_id, project_id,
                                      determination_id, determination_score)
         SELECT u.id, now(), now(), u.event, u.deployment, u.project, u.taxon, u.score
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::float8[])
              AS u(id, event, deployment, project, taxon, score)",
        &[
            (&ids.occurrences, Type::INT8_ARRAY),
            (&events, Type::INT8_ARRAY),
            (&deployments, Type::INT8_ARRAY),
            (&projects, Type::INT8_ARRAY),
            (&taxa, Type::INT8_ARRAY),
            (&scores, Type::FLOAT8_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_detections(tx: &Client, new: &[NewDetection], ids: &Ids) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let bboxes: Vec<Option<String>> = new.iter().map(|d| d.bbox.map(bbox_json)).collect();
    let paths: Vec<Option<&str>> = new.iter().map(|d| d.path.as_deref()).collect();
    let times: Vec<Option<&str>> = new.iter().map(|d| d.time.as_deref()).collect();
    let occurrences: Vec<Option<i64>> = new.iter().map(|d| d.occurrence.map(|n| ids.occurrences[n])).collect();
    let images: Vec<i64> = new.iter().map(|d| d.image).collect();
    let algorithms: Vec<i64> = new.iter().map(|d| d.algorithm).collect();
    tx.execute_typed(
        "INSERT INTO main_detection (id, created_at, updated_at, bbox, \"timestamp\", path, detection_time,
                                     occurrence_id, source_image_id, detection_algorithm_id)
         SELECT u.id, now(), now(), u.bbox::jsonb,
                (SELECT s.\"timestamp\" FROM main_sourceimage s WHERE s.id = u.image),
                u.path, u.time::timestamptz, u.occ, u.image, u.alg
         FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[])
              AS u(id, bbox, path, time, occ, image, alg)",
        &[
            (&ids.detections, Type::INT8_ARRAY),
            (&bboxes, Type::TEXT_ARRAY),
            (&paths, Type::TEXT_ARRAY),
            (&times, Type::TEXT_ARRAY),
            (&occurrences, Type::INT8_ARRAY),
            (&images, Type::INT8_ARRAY),
            (&algorithms, Type::INT8_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// Gives stored valid detections without an occurrence their new one.
async fn attach_occurrences(tx: &Client, attach: &[(i64, usize)], ids: &Ids) -> Result<(), StoreError> {
    if attach.is_empty() {
        return Ok(());
    }
    let detections: Vec<i64> = attach.iter().map(|(d, _)| *d).collect();
    let occurrences: Vec<i64> = attach.iter().map(|(_, n)| ids.occurrences[*n]).collect();
    tx.execute_typed(
        "UPDATE main_detection d SET occurrence_id = u.occ, updated_at = now()
         FROM UNNEST($1::int8[], $2::int8[]) AS u(id, occ) WHERE d.id = u.id",
        &[(&detections, Type::INT8_ARRAY), (&occurrences, Type::INT8_ARRAY)],
    )
    .await?;
    Ok(())
}

/// Fills in the crop path of stored detections that have none.
async fn fill_paths(tx: &Client, fill: &[(i64, String)]) -> Result<(), StoreError> {
    if fill.is_empty() {
        return Ok(());
    }
    let (ids, paths): (Vec<i64>, Vec<&str>) = fill.iter().map(|(id, p)| (*id, p.as_str())).unzip();
    tx.execute_typed(
        "UPDATE main_detection d SET path = u.path FROM UNNEST($1::int8[], $2::text[]) AS u(id, path)
         WHERE d.id = u.id AND coalesce(d.path, '') = ''",
        &[(&ids, Type::INT8_ARRAY), (&paths, Type::TEXT_ARRAY)],
    )
    .await?;
    Ok(())
}

async fn insert_classifications(tx: &Client, new: &[NewClassification], ids: &Ids) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let detections: Vec<i64> = new.iter().map(|c| ids.detection(c.detection)).collect();
    let scores: Vec<f64> = new.iter().map(|c| c.score).collect();
    let times: Vec<Option<&str>> = new.iter().map(|c| c.time.as_deref()).collect();
    let algorithms: Vec<i64> = new.iter().map(|c| c.algorithm.id).collect();
    let taxa: Vec<i64> = new.iter().map(|c| ids.taxon(c.taxon)).collect();
    let maps: Vec<Option<i64>> = new.iter().map(|c| c.algorithm.category_map).collect();
    let mut vectors = FlatVectors::default();
    let mut logits = FlatVectors::default();
    for c in new {
        vectors.push(Some(&c.scores));
        logits.push(c.logits.as_deref());
    }
    let terminal: Vec<bool> = new.iter().map(|c| c.terminal).collect();
    // Score vectors travel as one binary array each (see FlatVectors): as text they cost
    // Postgres a float parse per element, which dominated the save of long vectors.
    tx.execute_typed(
        "INSERT INTO main_classification (created_at, updated_at, score, \"timestamp\", algorithm_id, detection_id,
                                          taxon_id, category_map_id, logits, scores, terminal)
         SELECT now(), now(), u.score, coalesce(u.time::timestamptz, now()), u.alg, u.det, u.taxon, u.cmap,
                ($12::float8[])[u.logits_lo:u.logits_hi], ($9::float8[])[u.scores_lo:u.scores_hi], u.terminal
         FROM UNNEST($1::float8[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int4[],
                     $8::int4[], $10::int4[], $11::int4[], $13::bool[])
              AS u(score, time, alg, det, taxon, cmap, scores_lo, scores_hi, logits_lo, logits_hi, terminal)",
        &[
            (&scores, Type::FLOAT8_ARRAY),
            (&times, Type::TEXT_ARRAY),
            (&algorithms, Type::INT8_ARRAY),
            (&detections, Type::INT8_ARRAY),
            (&taxa, Type::INT8_ARRAY),
            (&maps, Type::INT8_ARRAY),
            (&vectors.lo, Type::INT4_ARRAY),
            (&vectors.hi, Type::INT4_ARRAY),
            (&vectors.values, Type::FLOAT8_ARRAY),
            (&logits.lo, Type::INT4_ARRAY),
            (&logits.hi, Type::INT4_ARRAY),
            (&logits.values, Type::FLOAT8_ARRAY),
            (&terminal, Type::BOOL_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

async fn write_determinations(tx: &Client, updates: &[OccurrenceUpdate], new: &Ids) -> Result<(), StoreError> {
    if updates.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = updates.iter().map(|u| u.id).collect();
    let taxa: Vec<Option<i64>> = updates.iter().map(|u| u.taxon.map(|t| new.taxon(t))).collect();
    let scores: Vec<Option<f64>> = updates.iter().map(|u| u.score).collect();
    // Antenna's bulk_update of determination fields does not bump updated_at.
    tx.execute_typed(
        "UPDATE main_occurrence o SET determination_id = u.taxon,
                determination_score = coalesce(u.score, o.determination_score)
         FROM UNNEST($1::int8[], $2::int8[], $3::float8[]) AS u(id, taxon, score) WHERE o.id = u.id",
        &[(&ids, Type::INT8_ARRAY), (&taxa, Type::INT8_ARRAY), (&scores, Type::FLOAT8_ARRAY)],
    )
    .await?;
    Ok(())
}

async fn write_job_images(tx: &Client, rows: &HashMap<(i64, i64), JobImage>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut jobs = Vec::new();
    let mut images = Vec::new();
    let mut failed = Vec::new();
    let mut errors = Vec::new();
    let mut detections = Vec::new();
    let mut classifications = Vec::new();
    for ((job, image), row) in rows {
        jobs.push(*job);
        images.push(*image);
        failed.push(row.failed);
        errors.push(row.error.as_deref());
        detections.push(row.detections as i64);
        classifications.push(row.classifications as i64);
    }
    tx.execute_typed(
        "INSERT INTO tally.job_image (job_id, image_id, failed, error, detections, classifications)
         SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::bool[], $4::text[], $5::int8[], $6::int8[])
         ON CONFLICT (job_id, image_id) DO UPDATE SET
             failed = tally.job_image.failed OR EXCLUDED.failed,
             error = coalesce(tally.job_image.error, EXCLUDED.error),
             detections = tally.job_image.detections + EXCLUDED.detections,
             classifications = tally.job_image.classifications + EXCLUDED.classifications,
             last_seen = now()",
        &[
            (&jobs, Type::INT8_ARRAY),
            (&images, Type::INT8_ARRAY),
            (&failed, Type::BOOL_ARRAY),
            (&errors, Type::TEXT_ARRAY),
            (&detections, Type::INT8_ARRAY),
            (&classifications, Type::INT8_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// Writes job log lines for the jobs that exist (`jobs_joblog.job_id` is NOT NULL and a
/// foreign key), inside the batch transaction, with the one INSERT for `jobs_joblog`
/// ([`crate::jobs::logs::insert`]).
pub async fn write_job_logs(tx: &Client, lines: &[JobLogLine]) -> Result<u64, StoreError> {
    let mut rows = crate::jobs::logs::Rows::default();
    for l in lines {
        rows.push(l.job_id, l.level, &l.message, &l.context, None);
    }
    crate::jobs::logs::insert(tx, &rows).await
}

#[cfg(test)]
mod tests {
    use super::FlatVectors;

    #[test]
    fn flat_vectors_slice_back_to_each_vector() {
        let mut flat = FlatVectors::default();
        flat.push(Some(&[0.25, 0.75]));
        flat.push(None);
        flat.push(Some(&[]));
        flat.push(Some(&[1.0]));
        assert_eq!(flat.values, vec![0.25, 0.75, 1.0]);
        assert_eq!(flat.lo, vec![Some(1), None, Some(3), Some(3)]);
        assert_eq!(flat.hi, vec![Some(2), None, Some(2), Some(3)]);
    }
}
