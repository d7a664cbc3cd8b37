//! The read phase of a batch save: every SELECT, producing the [`Snapshot`] the plan is made
//! from (pipelines, images and their owners, jobs, the detections and classifications stored
//! on the batch's images, their occurrences' determination state, and taxa by label).

use std::collections::{HashMap, HashSet};

use tally_dataflows::{Id, InputBatch, Known, Occurrence, Score};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::ingest::decode::{ResultBody, ResultMessage};
use crate::ingest::determination::{Candidate, Identification};
use crate::ingest::plan::{self, distinct, Algorithm, Pipeline, Snapshot, StoredDetection, StoredOccurrence};
use crate::store::bootstrap::read_rows;
use crate::store::StoreError;

/// Reads everything the plan of `messages` needs. The rows of the messages rejected by rules
/// 1 and 2 (checked here as the plan will) are not kept.
///
/// The reads go in three rounds, each one round trip (tokio-postgres pipelines the queries of
/// one connection that are awaited together): what the messages name (pipelines, images,
/// jobs, the detections on their images, taxa by name); what those rows name (owners the
/// engine has not seen, classifications, occurrences, taxa by search name); and the taxa rows
/// the engine lacks. The first round reads for every message, before rules 1 and 2 are
/// checked, and its rows of rejected messages are dropped after it, so the snapshot is the
/// one a read of the accepted messages alone would make.
pub(super) async fn snapshot(tx: &Client, known: &Known, messages: &[&ResultMessage]) -> Result<Snapshot, StoreError> {
    let mut s = Snapshot::default();
    let responses_of = |messages: &[&ResultMessage]| -> Vec<i64> {
        distinct(messages.iter().filter(|m| matches!(m.body, ResultBody::Response(_))).flat_map(|m| m.image_ids()))
    };
    let labels_of = |messages: &[&ResultMessage]| -> Vec<String> {
        distinct(messages.iter().flat_map(|m| match &m.body {
            ResultBody::Response(r) => {
                r.detections.iter().flat_map(|d| d.classifications.iter().map(|c| c.label.clone())).collect()
            }
            ResultBody::Error { .. } => Vec::new(),
        }))
    };
    let slugs: Vec<String> = distinct(messages.iter().filter_map(|m| match &m.body {
        ResultBody::Response(r) => Some(r.pipeline.clone()),
        ResultBody::Error { .. } => None,
    }));
    let image_ids: Vec<i64> = distinct(messages.iter().flat_map(|m| m.image_ids()));
    let (job_ids, response_images, mut labels) =
        (distinct(messages.iter().map(|m| m.job_id)), responses_of(messages), labels_of(messages));
    let mut images = InputBatch::default();
    let (pipelines, _, mut jobs, mut detections, mut named) = futures_util::try_join!(
        load_pipelines(tx, &slugs),
        read_rows(tx, "main_sourceimage", "id", &image_ids, &mut images),
        load_jobs(tx, &job_ids),
        read_detections(tx, &response_images),
        taxa_by_name(tx, &labels),
    )?;
    s.pipelines = pipelines;
    s.input = images;
    s.images = s.input.images.iter().filter_map(|(id, row)| row.clone().map(|r| ((*id), r))).collect();
    let accepted: Vec<&ResultMessage> =
        messages.iter().copied().filter(|m| plan::check(m, &s.pipelines, &s.images).is_ok()).collect();
    if accepted.len() < messages.len() {
        // Drop what was read for the rejected messages.
        let accepted_jobs: HashSet<i64> = accepted.iter().map(|m| m.job_id).collect();
        jobs.retain(|id, _| accepted_jobs.contains(id));
        let response_images: HashSet<i64> = responses_of(&accepted).into_iter().collect();
        detections.retain(|d| response_images.contains(&d.image));
        labels = labels_of(&accepted);
        let wanted: HashSet<&String> = labels.iter().collect();
        named.retain(|label, _| wanted.contains(label));
    }
    s.jobs = jobs;
    s.detections = detections;
    let unmatched: Vec<&String> = labels.iter().filter(|l| !named.contains_key(*l)).collect();

    let detection_ids: Vec<i64> = s.detections.iter().map(|d| d.id).collect();
    let occurrence_ids: Vec<i64> = distinct(s.detections.iter().filter_map(|d| d.occurrence));
    let (_, classifications, occurrences, searched) = futures_util::try_join!(
        read_owners(tx, known, &mut s.input),
        read_classifications(tx, &detection_ids),
        read_occurrences(tx, &occurrence_ids),
        taxa_by_search_name(tx, &unmatched),
    )?;
    s.classifications = classifications;
    s.occurrences = occurrences;
    s.taxa = named;
    for (label, id) in searched {
        s.taxa.entry(label).or_insert(id);
    }
    let missing: Vec<i64> = distinct(s.taxa.values().copied().filter(|id| !known.taxa.contains(id)));
    read_rows(tx, "main_taxon", "id", &missing, &mut s.input).await?;
    Ok(s)
}

/// The detections stored on `images`, in the order read.
async fn read_detections(tx: &Client, images: &[i64]) -> Result<Vec<StoredDetection>, StoreError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let mut detections = Vec::new();
    for row in tx
        .query_typed(
            "SELECT id, source_image_id, bbox, detection_algorithm_id, occurrence_id, coalesce(path, '') = ''
             FROM main_detection WHERE source_image_id = ANY($1::int8[])",
            &[(&images, Type::INT8_ARRAY)],
        )
        .await?
    {
        let bbox: Option<serde_json::Value> = row.try_get(2)?;
        detections.push(StoredDetection {
            id: row.try_get(0)?,
            image: row.try_get(1)?,
            valid: bbox.is_some(),
            bbox: bbox.as_ref().and_then(stored_box),
            algorithm: row.try_get(3)?,
            occurrence: row.try_get(4)?,
            empty_path: row.try_get(5)?,
        });
    }
    Ok(detections)
}

/// The classifications of the detections `ids`, by detection.
async fn read_classifications(tx: &Client, ids: &[i64]) -> Result<HashMap<i64, Vec<Candidate>>, StoreError> {
    let mut classifications: HashMap<i64, Vec<Candidate>> = HashMap::new();
    if ids.is_empty() {
        return Ok(classifications);
    }
    for row in tx
        .query_typed(
            "SELECT id, detection_id, taxon_id, algorithm_id, score, terminal FROM main_classification
             WHERE detection_id = ANY($1::int8[])",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?
    {
        classifications.entry(row.try_get(1)?).or_default().push(candidate(&row)?);
    }
    Ok(classifications)
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

/// The taxon of every label that has one is an active taxon with that name, else one with it
/// among its search names (the lowest id).
///
/// Names are looked up first, by their index ([`taxa_by_name`]); only the labels no name
/// matched are looked up among search names ([`taxa_by_search_name`]), which no index serves
/// (a scan of `main_taxon`: 2–5 ms a batch with Antenna's 3,108-species fixture, when every
/// label was looked up both ways).
async fn taxa_by_name(tx: &Client, labels: &[String]) -> Result<HashMap<String, i64>, StoreError> {
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
    Ok(found)
}

/// The active taxon with each of `labels` among its search names, the lowest id (see
/// [`taxa_by_name`]).
async fn taxa_by_search_name(tx: &Client, labels: &[&String]) -> Result<HashMap<String, i64>, StoreError> {
    let mut found: HashMap<String, i64> = HashMap::new();
    if labels.is_empty() {
        return Ok(found);
    }
    for row in tx
        .query_typed(
            "SELECT id, search_names::text[] FROM main_taxon
             WHERE active AND search_names::text[] && $1::text[] ORDER BY id",
            &[(&labels, Type::TEXT_ARRAY)],
        )
        .await?
    {
        let id: i64 = row.try_get(0)?;
        for name in row.try_get::<_, Vec<String>>(1)? {
            if labels.contains(&&name) {
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

/// The stored occurrences `ids` (those of the snapshot's detections), with what rule 5
/// needs: the row, every classification of their detections, and the latest human
/// identification. The three queries go in one round trip.
async fn read_occurrences(tx: &Client, ids: &[i64]) -> Result<HashMap<i64, StoredOccurrence>, StoreError> {
    let mut occurrences: HashMap<i64, StoredOccurrence> = HashMap::new();
    if ids.is_empty() {
        return Ok(occurrences);
    }
    let params: [(&(dyn ToSql + Sync), Type); 1] = [(&ids, Type::INT8_ARRAY)];
    let (rows, candidates, humans) = futures_util::try_join!(
        tx.query_typed(
            "SELECT id, event_id, deployment_id, determination_id, determination_score FROM main_occurrence
             WHERE id = ANY($1::int8[])",
            &params,
        ),
        tx.query_typed(
            "SELECT c.id, d.id, c.taxon_id, c.algorithm_id, c.score, c.terminal, d.occurrence_id
             FROM main_detection d JOIN main_classification c ON c.detection_id = d.id
             WHERE d.occurrence_id = ANY($1::int8[])",
            &params,
        ),
        tx.query_typed(
            "SELECT DISTINCT ON (occurrence_id) occurrence_id, taxon_id FROM main_identification
             WHERE occurrence_id = ANY($1::int8[]) AND NOT withdrawn
             ORDER BY occurrence_id, created_at DESC, id DESC",
            &params,
        ),
    )?;
    for r in rows {
        let row = Occurrence {
            event: r.try_get::<_, Option<i64>>(1)?,
            deployment: r.try_get::<_, Option<i64>>(2)?,
            determination: r.try_get::<_, Option<i64>>(3)?,
            score: r.try_get::<_, Option<f64>>(4)?.map(Score::new),
        };
        occurrences.insert(r.try_get(0)?, StoredOccurrence { row, candidates: Vec::new(), human: None });
    }
    for r in candidates {
        if let Some(o) = occurrences.get_mut(&r.try_get::<_, i64>(6)?) {
            o.candidates.push(candidate(&r)?);
        }
    }
    for r in humans {
        if let Some(o) = occurrences.get_mut(&r.try_get::<_, i64>(0)?) {
            o.human = Some(Identification { taxon: r.try_get(1)? });
        }
    }
    Ok(occurrences)
}
