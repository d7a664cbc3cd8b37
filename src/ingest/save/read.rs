//! Reads of a batch save: pipelines, jobs, the owners and taxa the batch refers to, and the
//! state that Antenna's determination rule needs for existing occurrences.

use std::collections::{HashMap, HashSet};

use tally_dataflows::{Id, InputBatch, Occurrence, Score, Tables};
use tokio_postgres::Transaction;

use super::{distinct, Algorithm, DetRef, NewClassification, Pipeline, Saved};
use crate::ingest::determination::{determine, Candidate, Identification};
use crate::store::bootstrap::read_rows;
use crate::store::StoreError;

pub(super) async fn load_pipelines(
    tx: &Transaction<'_>,
    slugs: &[String],
) -> Result<HashMap<String, Pipeline>, StoreError> {
    let mut pipelines: HashMap<String, Pipeline> = HashMap::new();
    for row in tx
        .query(
            "SELECT p.slug, a.id, a.key, a.task_type, a.category_map_id
             FROM ml_pipeline p
             LEFT JOIN ml_pipeline_algorithms pa ON pa.pipeline_id = p.id
             LEFT JOIN ml_algorithm a ON a.id = pa.algorithm_id
             WHERE p.slug = ANY($1)",
            &[&slugs],
        )
        .await?
    {
        let p = pipelines.entry(row.try_get(0)?).or_default();
        let Some(id) = row.try_get::<_, Option<i64>>(1)? else { continue };
        let key: String = row.try_get(2)?;
        let task: Option<String> = row.try_get(3)?;
        if matches!(task.as_deref(), Some("detection" | "localization" | "segmentation")) {
            p.detectors.push(id);
        }
        p.algorithms.insert(key, Algorithm { id, category_map: row.try_get(4)? });
    }
    Ok(pipelines)
}

pub(super) async fn load_jobs(tx: &Transaction<'_>, ids: &[i64]) -> Result<HashMap<i64, String>, StoreError> {
    let rows = tx.query("SELECT id, status FROM jobs_job WHERE id = ANY($1)", &[&ids]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Reads the events, deployments and projects (with their filters) that the batch's images
/// refer to and the engine has not seen.
pub(super) async fn read_owners(
    tx: &Transaction<'_>,
    tables: &Tables,
    input: &mut InputBatch,
) -> Result<(), StoreError> {
    let missing = |ids: Vec<Option<Id>>, known: &dyn Fn(Id) -> bool| -> Vec<i64> {
        distinct(ids.into_iter().flatten().filter(|id| !known(*id)))
    };
    let images: Vec<_> = input.images.iter().filter_map(|(_, r)| r.clone()).collect();
    let events = missing(images.iter().map(|i| i.event).collect(), &|id| tables.events.contains_key(&id));
    read_rows(tx, "main_event", "id", &events, input).await?;
    let mut deployment_refs: Vec<Option<Id>> = images.iter().map(|i| i.deployment).collect();
    deployment_refs.extend(input.events.iter().filter_map(|(_, e)| e.as_ref().map(|e| e.deployment)));
    let deployments = missing(deployment_refs, &|id| tables.deployments.contains_key(&id));
    read_rows(tx, "main_deployment", "id", &deployments, input).await?;
    let mut project_refs: Vec<Option<Id>> = images.iter().map(|i| i.project).collect();
    project_refs.extend(input.events.iter().filter_map(|(_, e)| e.as_ref().map(|e| e.project)));
    project_refs.extend(input.deployments.iter().filter_map(|(_, d)| d.as_ref().map(|d| d.project)));
    let projects = missing(project_refs, &|id| tables.projects.contains_key(&id));
    read_rows(tx, "main_project", "id", &projects, input).await?;
    read_rows(tx, "main_project_default_filters_include_taxa", "project_id", &projects, input).await?;
    read_rows(tx, "main_project_default_filters_exclude_taxa", "project_id", &projects, input).await?;
    Ok(())
}

/// The taxon of every label: an active taxon with that name, else one with it among its
/// search names, else a new taxon (rank UNKNOWN, no parents).
pub(super) async fn resolve_taxa(
    tx: &Transaction<'_>,
    tables: &Tables,
    labels: &[String],
    saved: &mut Saved,
) -> Result<HashMap<String, i64>, StoreError> {
    let mut by_name: HashMap<String, i64> = HashMap::new();
    let mut by_search: HashMap<String, i64> = HashMap::new();
    if labels.is_empty() {
        return Ok(by_name);
    }
    for row in tx
        .query(
            "SELECT id, name, coalesce(search_names::text[], '{}') FROM main_taxon
             WHERE active AND (name = ANY($1::text[]) OR search_names::text[] && $1::text[]) ORDER BY id",
            &[&labels],
        )
        .await?
    {
        let id: i64 = row.try_get(0)?;
        by_name.insert(row.try_get(1)?, id);
        for s in row.try_get::<_, Vec<String>>(2)? {
            by_search.entry(s).or_insert(id);
        }
    }
    let mut found: HashMap<String, i64> = HashMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for l in labels {
        match by_name.get(l).or_else(|| by_search.get(l)) {
            Some(id) => {
                found.insert(l.clone(), *id);
            }
            None => unknown.push(l.clone()),
        }
    }
    if !unknown.is_empty() {
        // A concurrent insert of the same name, or an inactive taxon of that name, resolves to
        // the existing row.
        for row in tx
            .query(
                "INSERT INTO main_taxon (created_at, updated_at, name, rank, active, author, notes, parents_json)
                 SELECT now(), now(), n, 'UNKNOWN', true, '', '', '[]'::jsonb FROM UNNEST($1::text[]) AS n
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
                 RETURNING id, name, (xmax = 0)",
                &[&unknown],
            )
            .await?
        {
            found.insert(row.try_get(1)?, row.try_get(0)?);
            if row.try_get::<_, bool>(2)? {
                saved.rows.taxa += 1;
            }
        }
    }
    let missing: Vec<i64> = distinct(found.values().copied().filter(|id| !tables.taxa.contains_key(id)));
    read_rows(tx, "main_taxon", "id", &missing, &mut saved.input).await?;
    Ok(found)
}

pub(super) fn candidate(row: &tokio_postgres::Row) -> Result<Candidate, StoreError> {
    Ok(Candidate {
        order: row.try_get(0)?,
        taxon: row.try_get(2)?,
        algorithm: row.try_get(3)?,
        score: row.try_get(4)?,
        terminal: row.try_get(5)?,
    })
}

/// A stored bbox as `[x1, y1, x2, y2]` when it is an array of four numbers.
pub(super) fn stored_box(v: &serde_json::Value) -> Option<[f64; 4]> {
    let a = v.as_array()?;
    if a.len() != 4 {
        return None;
    }
    Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?, a[3].as_f64()?])
}

pub(super) struct OccurrenceUpdate {
    pub(super) id: i64,
    pub(super) taxon: Option<i64>,
    pub(super) score: Option<f64>,
}

/// Rule 5 for the existing occurrences of reused detections: current determination, human
/// identifications and every classification of their detections (stored and new).
pub(super) async fn determine_existing(
    tx: &Transaction<'_>,
    touched: &HashSet<i64>,
    new: &[NewClassification],
    input: &mut InputBatch,
) -> Result<Vec<OccurrenceUpdate>, StoreError> {
    if touched.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = touched.iter().copied().collect();
    let mut rows: HashMap<i64, (Occurrence, Vec<Candidate>, Option<Identification>)> = HashMap::new();
    for r in tx
        .query(
            "SELECT id, event_id, deployment_id, determination_id, determination_score FROM main_occurrence
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        let occ = Occurrence {
            event: r.try_get::<_, Option<i64>>(1)?,
            deployment: r.try_get::<_, Option<i64>>(2)?,
            determination: r.try_get::<_, Option<i64>>(3)?,
            score: r.try_get::<_, Option<f64>>(4)?.map(Score::new),
        };
        rows.insert(r.try_get(0)?, (occ, Vec::new(), None));
    }
    let mut detection_occurrence: HashMap<i64, i64> = HashMap::new();
    for r in tx
        .query(
            "SELECT c.id, d.id, c.taxon_id, c.algorithm_id, c.score, c.terminal, d.occurrence_id
             FROM main_detection d JOIN main_classification c ON c.detection_id = d.id
             WHERE d.occurrence_id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        let occ: i64 = r.try_get(6)?;
        detection_occurrence.insert(r.try_get(1)?, occ);
        if let Some(entry) = rows.get_mut(&occ) {
            entry.1.push(candidate(&r)?);
        }
    }
    for r in tx.query("SELECT id, occurrence_id FROM main_detection WHERE occurrence_id = ANY($1)", &[&ids]).await? {
        detection_occurrence.insert(r.try_get(0)?, r.try_get(1)?);
    }
    for (n, c) in new.iter().enumerate() {
        if let DetRef::Old(det) = c.detection {
            if let Some(entry) = detection_occurrence.get(&det).and_then(|o| rows.get_mut(o)) {
                entry.1.push(Candidate {
                    order: i64::MAX / 2 + n as i64,
                    taxon: Some(c.taxon),
                    algorithm: Some(c.algorithm.id),
                    score: Some(c.score),
                    terminal: c.terminal,
                });
            }
        }
    }
    for r in tx
        .query(
            "SELECT DISTINCT ON (occurrence_id) occurrence_id, taxon_id FROM main_identification
             WHERE occurrence_id = ANY($1) AND NOT withdrawn
             ORDER BY occurrence_id, created_at DESC, id DESC",
            &[&ids],
        )
        .await?
    {
        if let Some(entry) = rows.get_mut(&r.try_get::<_, i64>(0)?) {
            entry.2 = Some(Identification { taxon: r.try_get(1)? });
        }
    }
    let mut updates = Vec::new();
    for (id, (mut occ, candidates, human)) in rows {
        let current = occ.determination;
        if let Some(d) = determine(current, human, &candidates) {
            occ.determination = d.taxon;
            if let Some(s) = d.score {
                occ.score = Some(Score::new(s));
            }
            updates.push(OccurrenceUpdate { id, taxon: d.taxon, score: d.score });
            input.occurrences.push((id, Some(occ)));
        }
    }
    Ok(updates)
}
