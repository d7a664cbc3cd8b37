//! Seeding Antenna's tables from a [`Tables`] value: for tests, demos and benchmarks.
//!
//! One `INSERT … SELECT FROM UNNEST(…)` per table, in one transaction, supplying every NOT
//! NULL column as Django would (no database defaults exist).

use std::collections::BTreeMap;

use tally_dataflows::{Id, Tables};

use crate::store::{Store, StoreError};

/// Inserts every row of `tables` into Antenna's tables, supplying every NOT NULL column as
/// Django would (no database defaults exist). Rows must be referentially consistent: the
/// foreign keys are checked at commit.
pub async fn seed(store: &Store, tables: &Tables) -> Result<(), StoreError> {
    seed_named(store, tables, &BTreeMap::new()).await
}

/// As [`seed`], naming taxa from `names` (taxa without a name are called `taxon {id}`).
pub async fn seed_named(store: &Store, tables: &Tables, names: &BTreeMap<Id, String>) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let sorted = |ids: Vec<Id>| {
        let mut v = ids;
        v.sort();
        v
    };

    let ids = sorted(tables.taxa.keys().copied().collect());
    let parents: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::Value::Array(
                tables.taxa[id]
                    .ancestors
                    .iter()
                    .map(|a| serde_json::json!({"id": a, "name": format!("taxon {a}"), "rank": "GENUS"}))
                    .collect(),
            )
        })
        .collect();
    let taxon_names: Vec<String> =
        ids.iter().map(|id| names.get(id).cloned().unwrap_or_else(|| format!("taxon {id}"))).collect();
    tx.execute(
        "INSERT INTO main_taxon (id, created_at, updated_at, name, rank, active, author, notes, parents_json)
         SELECT id, now(), now(), n, 'SPECIES', true, '', '', p
         FROM UNNEST($1::int8[], $2::jsonb[], $3::text[]) AS u(id, p, n)",
        &[&ids, &parents, &taxon_names],
    )
    .await?;

    let ids = sorted(tables.projects.keys().copied().collect());
    let thresholds: Vec<f64> = ids.iter().map(|id| tables.projects[id].threshold.get()).collect();
    tx.execute(
        "INSERT INTO main_project (id, created_at, updated_at, name, description, active, priority, feature_flags,
                                   default_filters_score_threshold, session_time_gap_seconds, draft)
         SELECT id, now(), now(), 'project ' || id, '', true, 1, '{}', t, 7200, false
         FROM UNNEST($1::int8[], $2::float8[]) AS u(id, t)",
        &[&ids, &thresholds],
    )
    .await?;

    for (table, rows) in [
        ("main_project_default_filters_include_taxa", &tables.include_taxa),
        ("main_project_default_filters_exclude_taxa", &tables.exclude_taxa),
    ] {
        let ids = sorted(rows.keys().copied().collect());
        let projects: Vec<i64> = ids.iter().map(|id| rows[id].project).collect();
        let taxa: Vec<i64> = ids.iter().map(|id| rows[id].taxon).collect();
        tx.execute(
            &format!("INSERT INTO {table} (id, project_id, taxon_id) SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[])"),
            &[&ids, &projects, &taxa],
        )
        .await?;
    }

    let ids = sorted(tables.deployments.keys().copied().collect());
    let projects: Vec<Option<i64>> = ids.iter().map(|id| tables.deployments[id].project).collect();
    tx.execute(
        "INSERT INTO main_deployment (id, created_at, updated_at, name, description, project_id)
         SELECT id, now(), now(), 'deployment ' || id, '', p FROM UNNEST($1::int8[], $2::int8[]) AS u(id, p)",
        &[&ids, &projects],
    )
    .await?;

    let ids = sorted(tables.events.keys().copied().collect());
    let deployments: Vec<Option<i64>> = ids.iter().map(|id| tables.events[id].deployment).collect();
    let projects: Vec<Option<i64>> = ids.iter().map(|id| tables.events[id].project).collect();
    tx.execute(
        "INSERT INTO main_event (id, created_at, updated_at, group_by, start, deployment_id, project_id)
         SELECT id, now(), now(), 'group ' || id, timestamptz '2000-01-01', d, p
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS u(id, d, p)",
        &[&ids, &deployments, &projects],
    )
    .await?;

    let ids = sorted(tables.images.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.images[id]).collect();
    let events: Vec<Option<i64>> = rows.iter().map(|r| r.event).collect();
    let deployments: Vec<Option<i64>> = rows.iter().map(|r| r.deployment).collect();
    let projects: Vec<Option<i64>> = rows.iter().map(|r| r.project).collect();
    let timestamps: Vec<Option<i64>> = rows.iter().map(|r| r.timestamp).collect();
    let sizes: Vec<Option<i64>> = rows.iter().map(|r| r.size).collect();
    tx.execute(
        "INSERT INTO main_sourceimage (id, created_at, updated_at, path, test_image, event_id, deployment_id, project_id,
                                       \"timestamp\", size)
         SELECT id, now(), now(), 'image/' || id || '.jpg', false, e, d, p,
                timestamptz 'epoch' + ts * interval '1 microsecond', s
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) AS u(id, e, d, p, ts, s)",
        &[&ids, &events, &deployments, &projects, &timestamps, &sizes],
    )
    .await?;

    let ids = sorted(tables.occurrences.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.occurrences[id]).collect();
    let events: Vec<Option<i64>> = rows.iter().map(|r| r.event).collect();
    let deployments: Vec<Option<i64>> = rows.iter().map(|r| r.deployment).collect();
    let determinations: Vec<Option<i64>> = rows.iter().map(|r| r.determination).collect();
    let scores: Vec<Option<f64>> = rows.iter().map(|r| r.score.map(|s| s.get())).collect();
    tx.execute(
        "INSERT INTO main_occurrence (id, created_at, updated_at, event_id, deployment_id, determination_id, determination_score)
         SELECT id, now(), now(), e, d, t, s FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::float8[]) AS u(id, e, d, t, s)",
        &[&ids, &events, &deployments, &determinations, &scores],
    )
    .await?;

    let ids = sorted(tables.detections.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.detections[id]).collect();
    let images: Vec<i64> = rows.iter().map(|r| r.image).collect();
    let occurrences: Vec<Option<i64>> = rows.iter().map(|r| r.occurrence).collect();
    let valid: Vec<bool> = rows.iter().map(|r| r.valid).collect();
    tx.execute(
        "INSERT INTO main_detection (id, created_at, updated_at, source_image_id, occurrence_id, bbox)
         SELECT id, now(), now(), i, o, CASE WHEN v THEN jsonb_build_array(0.0, 0.0, 10.0, 10.0) END
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bool[]) AS u(id, i, o, v)",
        &[&ids, &images, &occurrences, &valid],
    )
    .await?;
    // Rows were inserted with explicit ids: move each identity past them, as a restore would,
    // so that later inserts (Django's, or ingest's) do not collide.
    for table in SEQUENCED {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), greatest((SELECT max(id) FROM {table}), 1))"
            ),
            &[],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Tables whose ids [`seed`] supplies.
const SEQUENCED: &[&str] = &[
    "main_taxon",
    "main_project",
    "main_project_default_filters_include_taxa",
    "main_project_default_filters_exclude_taxa",
    "main_deployment",
    "main_event",
    "main_sourceimage",
    "main_occurrence",
    "main_detection",
];

/// An ML pipeline as Antenna registers it: a slug and its algorithms, each with its task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineSpec {
    /// `ml_pipeline.slug`.
    pub slug: String,
    /// `(key, task_type)` of each algorithm linked to it.
    pub algorithms: Vec<(String, String)>,
}

impl PipelineSpec {
    /// A detector, a moth / non-moth binary classifier and a species classifier, with the keys
    /// of Antenna's test fixtures (`ami/tests/fixtures/ml.py`).
    pub fn antenna_test(slug: &str) -> Self {
        PipelineSpec {
            slug: slug.into(),
            algorithms: vec![
                ("random-detector".into(), "detection".into()),
                ("random-binary-classifier".into(), "classification".into()),
                ("random-species-classifier".into(), "classification".into()),
            ],
        }
    }
}

/// Registers `pipeline` (creating algorithms that do not exist by key) and links its
/// algorithms; returns the pipeline's id. Idempotent.
pub async fn seed_pipeline(store: &Store, pipeline: &PipelineSpec) -> Result<i64, StoreError> {
    let client = store.client().await?;
    let keys: Vec<&str> = pipeline.algorithms.iter().map(|(k, _)| k.as_str()).collect();
    let tasks: Vec<&str> = pipeline.algorithms.iter().map(|(_, t)| t.as_str()).collect();
    client
        .execute(
            "INSERT INTO ml_algorithm (created_at, updated_at, name, key, description, version, task_type)
             SELECT now(), now(), k, k, '', 1, t FROM UNNEST($1::text[], $2::text[]) AS u(k, t)
             ON CONFLICT (key) DO NOTHING",
            &[&keys, &tasks],
        )
        .await?;
    let id: i64 = client
        .query_one(
            "INSERT INTO ml_pipeline (created_at, updated_at, name, slug, description, version, version_name,
                                      stages, default_config)
             VALUES (now(), now(), $1, $1, '', 1, '', '[]', '{}')
             ON CONFLICT (slug) DO UPDATE SET updated_at = ml_pipeline.updated_at
             RETURNING id",
            &[&pipeline.slug],
        )
        .await?
        .get(0);
    client
        .execute(
            "INSERT INTO ml_pipeline_algorithms (pipeline_id, algorithm_id)
             SELECT $1, a.id FROM ml_algorithm a WHERE a.key = ANY($2::text[])
             ON CONFLICT DO NOTHING",
            &[&id, &keys],
        )
        .await?;
    Ok(id)
}
