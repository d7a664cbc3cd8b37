//! The read phase of a batch save: every SELECT, producing the [`Snapshot`] the plan is made
//! from (pipelines, images and their owners, jobs, the detections and classifications stored
//! on the batch's images, their occurrences' determination state, and taxa by label).

use std::collections::HashMap;

use tally_dataflows::{Id, InputBatch, Known, Occurrence, Score};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::ingest::decode::{ResultBody, ResultMessage};
use crate::ingest::determination::{Candidate, Identification};
use crate::ingest::plan::{self, distinct, Algorithm, Pipeline, Snapshot, StoredDetection, StoredOccurrence};
use crate::store::bootstrap::read_rows;
use crate::store::StoreError;

/// Reads everything the plan of `messages` needs. The rows of the messages rejected by rules
/// 1 and 2 (checked here as the plan will) are not read.
pub(super) async fn snapshot(tx: &Client, known: &Known, messages: &[&ResultMessage]) -> Result<Snapshot, StoreError> {
    let mut s = Snapshot::default();
    let slugs: Vec<String> = distinct(messages.iter().filter_map(|m| match &m.body {
        ResultBody::Response(r) => Some(r.pipeline.clone()),
        ResultBody::Error { .. } => None,
    }));
    s.pipelines = load_pipelines(tx, &slugs).await?;
    let image_ids: Vec<i64> = distinct(messages.iter().flat_map(|m| m.image_ids()));
    read_rows(tx, "main_sourceimage", "id", &image_ids, &mut s.input).await?;
    s.images = s.input.images.iter().filter_map(|(id, row)| row.clone().map(|r| ((*id), r))).collect();
    let accepted: Vec<&ResultMessage> =
        messages.iter().copied().filter(|m| plan::check(m, &s.pipelines, &s.images).is_ok()).collect();
    read_owners(tx, known, &mut s.input).await?;
    s.jobs = load_jobs(tx, &distinct(accepted.iter().map(|m| m.job_id))).await?;
    let responses: Vec<&crate::ingest::decode::PipelineResults> = accepted
        .iter()
        .filter_map(|m| match &m.body {
            ResultBody::Response(r) => Some(r),
            ResultBody::Error { .. } => None,
        })
        .collect();
    let response_images: Vec<i64> =
        distinct(accepted.iter().filter(|m| matches!(m.body, ResultBody::Response(_))).flat_map(|m| m.image_ids()));
    read_detections(tx, &response_images, &mut s).await?;
    read_occurrences(tx, &mut s).await?;
    let labels: Vec<String> = distinct(
        responses
            .iter()
            .flat_map(|r| r.detections.iter().flat_map(|d| d.classifications.iter().map(|c| c.label.clone()))),
    );
    s.taxa = find_taxa(tx, &labels).await?;
    let missing: Vec<i64> = distinct(s.taxa.values().copied().filter(|id| !known.taxa.contains(id)));
    read_rows(tx, "main_taxon", "id", &missing, &mut s.input).await?;
    Ok(s)
}

/// The detections stored on `images` and their classifications.
async fn read_detections(tx: &Client, images: &[i64], s: &mut Snapshot) -> Result<(), StoreError> {
    for row in tx
        .query_typed(
            "SELECT id, source_image_id, bbox, detection_algorithm_id, occurrence_id, coalesce(path, '') = ''
             FROM main_detection WHERE source_image_id = ANY($1::int8[])",
            &[(&images, Type::INT8_ARRAY)],
        )
        .await?
    {
        let bbox: Option<serde_json::Value> = row.try_get(2)?;
        s.detections.push(StoredDetection {
            id: row.try_get(0)?,
            image: row.try_get(1)?,
            valid: bbox.is_some(),
            bbox: bbox.as_ref().and_then(stored_box),
            algorithm: row.try_get(3)?,
            occurrence: row.try_get(4)?,
            empty_path: row.try_get(5)?,
        });
    }
    let ids: Vec<i64> = s.detections.iter().map(|d| d.id).collect();
    for row in tx
        .query_typed(
            "SELECT id, detection_id, taxon_id, algorithm_id, score, terminal FROM main_classification
             WHERE detection_id = ANY($1::int8[])",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        s.classifications.entry(row.try_get(1)?).or_default().push(candidate(&row)?);
    }
    Ok(())
}

async fn load_pipelines(tx: &Client, slugs: &[String]) -> Result<HashMap<String, Pipeline>, StoreError> {
    let mut pipelines: HashMap<String, Pipeline> = HashMap::new();
    for row in tx
        .query_typed(
            "SELECT p.slug, a.id, a.key, a.task_type, a.category_map_id
             FROM ml_pipeline p
             LEFT JOIN ml_pipeline_algorithms pa ON pa.pipeline_id = p.id
             LEFT JOIN ml_algorithm a ON a.id = pa.algorithm_id
             WHERE p.slug = ANY($1::text[])",
            &[(&slugs, Type::TEXT_ARRAY)],
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

async fn load_jobs(tx: &Client, ids: &[i64]) -> Result<HashMap<i64, String>, StoreError> {
    let rows = tx
        .query_typed("SELECT id, status FROM jobs_job WHERE id = ANY($1::int8[])", &[(&ids, Type::INT8_ARRAY)])
        .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Reads the events, deployments and projects (with their filters) that the batch's images
/// refer to and the engine has not seen.
async fn read_owners(tx: &Client, known: &Known, input: &mut InputBatch) -> Result<(), StoreError> {
    let missing = |ids: Vec<Option<Id>>, known: &dyn Fn(Id) -> bool| -> Vec<i64> {
        distinct(ids.into_iter().flatten().filter(|id| !known(*id)))
    };
    let images: Vec<_> = input.images.iter().filter_map(|(_, r)| r.clone()).collect();
    let events = missing(images.iter().map(|i| i.event).collect(), &|id| known.events.contains(&id));
    read_rows(tx, "main_event", "id", &events, input).await?;
    let mut deployment_refs: Vec<Option<Id>> = images.iter().map(|i| i.deployment).collect();
    deployment_refs.extend(input.events.iter().filter_map(|(_, e)| e.as_ref().map(|e| e.deployment)));
    let deployments = missing(deployment_refs, &|id| known.deployments.contains(&id));
    read_rows(tx, "main_deployment", "id", &deployments, input).await?;
    let mut project_refs: Vec<Option<Id>> = images.iter().map(|i| i.project).collect();
    project_refs.extend(input.events.iter().filter_map(|(_, e)| e.as_ref().map(|e| e.project)));
    project_refs.extend(input.deployments.iter().filter_map(|(_, d)| d.as_ref().map(|d| d.project)));
    let projects = missing(project_refs, &|id| known.projects.contains(&id));
    read_rows(tx, "main_project", "id", &projects, input).await?;
    read_rows(tx, "main_project_default_filters_include_taxa", "project_id", &projects, input).await?;
    read_rows(tx, "main_project_default_filters_exclude_taxa", "project_id", &projects, input).await?;
    Ok(())
}

/// The taxon of every label that has one: an active taxon with that name, else one with it
/// among its search names (the lowest id).
///
/// Names are looked up first, by their index; only the labels no name matched are looked up
/// among search names, which no index serves (a scan of `main_taxon`: 2–5 ms a batch with
/// Antenna's 3,108-species fixture, when every label was looked up both ways).
async fn find_taxa(tx: &Client, labels: &[String]) -> Result<HashMap<String, i64>, StoreError> {
    let mut found: HashMap<String, i64> = HashMap::new();
    if labels.is_empty() {
        return Ok(found);
    }
    for row in tx
        .query_typed(
            "SELECT id, name FROM main_taxon WHERE active AND name = ANY($1::text[])",
            &[(&labels, Type::TEXT_ARRAY)],
        )
        .await?
    {
        found.insert(row.try_get(1)?, row.try_get(0)?);
    }
    let unmatched: Vec<&String> = labels.iter().filter(|l| !found.contains_key(*l)).collect();
    if unmatched.is_empty() {
        return Ok(found);
    }
    for row in tx
        .query_typed(
            "SELECT id, search_names::text[] FROM main_taxon
             WHERE active AND search_names::text[] && $1::text[] ORDER BY id",
            &[(&unmatched, Type::TEXT_ARRAY)],
        )
        .await?
    {
        let id: i64 = row.try_get(0)?;
        for name in row.try_get::<_, Vec<String>>(1)? {
            if unmatched.contains(&&name) {
                found.entry(name).or_insert(id);
            }
        }
    }
    Ok(found)
}

fn candidate(row: &tokio_postgres::Row) -> Result<Candidate, StoreError> {
    Ok(Candidate {
        order: row.try_get(0)?,
        taxon: row.try_get(2)?,
        algorithm: row.try_get(3)?,
        score: row.try_get(4)?,
        terminal: row.try_get(5)?,
    })
}

/// A stored bbox as `[x1, y1, x2, y2]` when it is an array of four numbers.
fn stored_box(v: &serde_json::Value) -> Option<[f64; 4]> {
    let a = v.as_array()?;
    if a.len() != 4 {
        return None;
    }
    Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?, a[3].as_f64()?])
}

/// The stored occurrences of the snapshot's detections, with what rule 5 needs: the row,
/// every classification of their detections, and the latest human identification.
async fn read_occurrences(tx: &Client, s: &mut Snapshot) -> Result<(), StoreError> {
    let ids: Vec<i64> = distinct(s.detections.iter().filter_map(|d| d.occurrence));
    if ids.is_empty() {
        return Ok(());
    }
    for r in tx
        .query_typed(
            "SELECT id, event_id, deployment_id, determination_id, determination_score FROM main_occurrence
             WHERE id = ANY($1::int8[])",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        let row = Occurrence {
            event: r.try_get::<_, Option<i64>>(1)?,
            deployment: r.try_get::<_, Option<i64>>(2)?,
            determination: r.try_get::<_, Option<i64>>(3)?,
            score: r.try_get::<_, Option<f64>>(4)?.map(Score::new),
        };
        s.occurrences.insert(r.try_get(0)?, StoredOccurrence { row, candidates: Vec::new(), human: None });
    }
    for r in tx
        .query_typed(
            "SELECT c.id, d.id, c.taxon_id, c.algorithm_id, c.score, c.terminal, d.occurrence_id
             FROM main_detection d JOIN main_classification c ON c.detection_id = d.id
             WHERE d.occurrence_id = ANY($1::int8[])",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        if let Some(o) = s.occurrences.get_mut(&r.try_get::<_, i64>(6)?) {
            o.candidates.push(candidate(&r)?);
        }
    }
    for r in tx
        .query_typed(
            "SELECT DISTINCT ON (occurrence_id) occurrence_id, taxon_id FROM main_identification
             WHERE occurrence_id = ANY($1::int8[]) AND NOT withdrawn
             ORDER BY occurrence_id, created_at DESC, id DESC",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        if let Some(o) = s.occurrences.get_mut(&r.try_get::<_, i64>(0)?) {
            o.human = Some(Identification { taxon: r.try_get(1)? });
        }
    }
    Ok(())
}
