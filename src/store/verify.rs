//! `tally verify`: every count recomputed with the SQL of SPEC §2, independently of the
//! dataflow, and compared with the stored columns.
//!
//! The queries follow the SQL Django emits (`../shared/antenna/data-model.md` §2.3): one
//! correlated `count(*)` per column, `P` as the owner's project with the deployment's as
//! fallback. The filter is SPEC §2's `passes(o)`: the taxon part, `tally.taxon_passes`
//! (migration V2), is evaluated once per (project, determination) into a temporary table at
//! the start of the run, and each occurrence probes it with its score. Evaluating
//! `tally.passes` per row instead cost 230 s per 1M detections.

use std::collections::BTreeMap;

use serde::Serialize;
use tally_dataflows::{AllCounts, DeploymentCounts, EventCounts, Id, ImageCounts, Micros};

use crate::store::{Store, StoreError};

const VERDICTS: &str = "
CREATE TEMP TABLE tally_verdicts ON COMMIT DROP AS
SELECT p.id AS project, coalesce(d.determination, 0) AS determination,
       p.default_filters_score_threshold AS threshold, tally.taxon_passes(d.determination, p.id) AS taxon_ok
FROM main_project p
CROSS JOIN (SELECT DISTINCT determination_id AS determination FROM main_occurrence) d;
CREATE INDEX ON tally_verdicts (project, determination);
ANALYZE tally_verdicts;";

const RECOMPUTE_IMAGES: &str = r#"
SELECT s.id,
       (SELECT count(*) FROM main_detection d
          LEFT JOIN main_occurrence o ON o.id = d.occurrence_id
         WHERE d.source_image_id = s.id AND d.bbox IS NOT NULL
           AND (pp.p IS NULL OR (o.id IS NOT NULL AND (pp.p IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = pp.p AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))))),
       s.detections_count::int8
FROM main_sourceimage s
LEFT JOIN main_deployment dep ON dep.id = s.deployment_id
CROSS JOIN LATERAL (SELECT coalesce(s.project_id, dep.project_id) AS p) pp
WHERE ($1::int8 IS NULL OR pp.p = $1) AND ($2::int8 IS NULL OR s.deployment_id = $2)"#;

const RECOMPUTE_EVENTS: &str = r#"
SELECT e.id,
       (SELECT count(*) FROM main_sourceimage s WHERE s.event_id = e.id),
       (SELECT count(*) FROM main_detection d
          JOIN main_sourceimage s ON s.id = d.source_image_id
          LEFT JOIN main_occurrence o ON o.id = d.occurrence_id
         WHERE s.event_id = e.id AND d.bbox IS NOT NULL
           AND (pp.p IS NULL OR (o.id IS NOT NULL AND (pp.p IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = pp.p AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))))),
       (SELECT count(*) FROM main_occurrence o
         WHERE o.event_id = e.id AND (pp.p IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = pp.p AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))),
       (SELECT (extract(epoch FROM min(s."timestamp")) * 1000000)::int8 FROM main_sourceimage s WHERE s.event_id = e.id),
       (SELECT (extract(epoch FROM max(s."timestamp")) * 1000000)::int8 FROM main_sourceimage s WHERE s.event_id = e.id),
       e.captures_count::int8, e.detections_count::int8, e.occurrences_count::int8,
       (extract(epoch FROM e.start) * 1000000)::int8, (extract(epoch FROM e."end") * 1000000)::int8
FROM main_event e
LEFT JOIN main_deployment dep ON dep.id = e.deployment_id
CROSS JOIN LATERAL (SELECT coalesce(e.project_id, dep.project_id) AS p) pp
WHERE ($1::int8 IS NULL OR pp.p = $1) AND ($2::int8 IS NULL OR e.deployment_id = $2)"#;

const RECOMPUTE_DEPLOYMENTS: &str = r#"
SELECT dep.id,
       (SELECT count(*) FROM main_event e WHERE e.deployment_id = dep.id),
       (SELECT count(*) FROM main_sourceimage s WHERE s.deployment_id = dep.id),
       (SELECT sum(s.size)::int8 FROM main_sourceimage s WHERE s.deployment_id = dep.id),
       (SELECT count(*) FROM main_detection d
          JOIN main_sourceimage s ON s.id = d.source_image_id
          LEFT JOIN main_occurrence o ON o.id = d.occurrence_id
         WHERE s.deployment_id = dep.id AND d.bbox IS NOT NULL
           AND (dep.project_id IS NULL
                OR (o.id IS NOT NULL AND (dep.project_id IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = dep.project_id AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))))),
       (SELECT count(*) FROM main_occurrence o
         WHERE o.deployment_id = dep.id AND o.event_id IS NOT NULL
           AND (dep.project_id IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = dep.project_id AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))),
       (SELECT count(*) FROM (SELECT DISTINCT o.determination_id FROM main_occurrence o
         WHERE o.deployment_id = dep.id AND o.event_id IS NOT NULL
           AND (dep.project_id IS NULL OR EXISTS (SELECT 1 FROM pg_temp.tally_verdicts v WHERE v.project = dep.project_id AND v.determination = coalesce(o.determination_id, 0) AND v.taxon_ok AND o.determination_score >= v.threshold))) taxa),
       (SELECT (extract(epoch FROM min(s."timestamp")) * 1000000)::int8 FROM main_sourceimage s WHERE s.deployment_id = dep.id),
       (SELECT (extract(epoch FROM max(s."timestamp")) * 1000000)::int8 FROM main_sourceimage s WHERE s.deployment_id = dep.id),
       dep.events_count::int8, dep.captures_count::int8, dep.data_source_total_files::int8, dep.data_source_total_size,
       dep.detections_count::int8, dep.occurrences_count::int8, dep.taxa_count::int8,
       (extract(epoch FROM dep.first_capture_timestamp) * 1000000)::int8,
       (extract(epoch FROM dep.last_capture_timestamp) * 1000000)::int8
FROM main_deployment dep
WHERE ($1::int8 IS NULL OR dep.project_id = $1) AND ($2::int8 IS NULL OR dep.id = $2)"#;

/// Which owners to check.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope {
    /// Only owners whose `P` is this project.
    pub project: Option<Id>,
    /// Only this deployment and its events and images.
    pub deployment: Option<Id>,
}

/// One stored value that differs from its definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `main_sourceimage`, `main_event` or `main_deployment`.
    pub table: &'static str,
    /// The row.
    pub id: Id,
    /// The column.
    pub column: &'static str,
    /// What is stored (`None`: NULL).
    pub stored: Option<i64>,
    /// What SPEC §2 gives.
    pub expected: Option<i64>,
}

/// The recomputed counts, and the differences from what is stored.
#[derive(Debug, Default)]
pub struct Verification {
    /// Every owner's counts as the SQL computes them.
    pub expected: AllCounts,
    /// Every stored value that differs.
    pub differences: Vec<Difference>,
}

/// Recomputes every count in `scope` and diffs it against the stored columns.
pub async fn verify(store: &Store, scope: Scope) -> Result<Verification, StoreError> {
    let mut client = store.client().await?;
    // One snapshot for every query, so a live database gives a consistent picture.
    let client =
        client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
    client.batch_execute(VERDICTS).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&scope.project, &scope.deployment];
    let mut v = Verification::default();
    let mut diff = |table, id: i64, column, stored: Option<i64>, expected: Option<i64>| {
        if stored != expected {
            v.differences.push(Difference { table, id, column, stored, expected });
        }
    };

    let mut images = BTreeMap::new();
    for r in client.query(RECOMPUTE_IMAGES, &params).await? {
        let id: i64 = r.get(0);
        let expected: i64 = r.get(1);
        diff("main_sourceimage", id, "detections_count", r.get(2), Some(expected));
        images.insert(id, ImageCounts { detections: expected });
    }

    let mut events = BTreeMap::new();
    for r in client.query(RECOMPUTE_EVENTS, &params).await? {
        let id: i64 = r.get(0);
        let c = EventCounts {
            captures: r.get(1),
            detections: r.get(2),
            occurrences: r.get(3),
            start: r.get::<_, Option<Micros>>(4),
            end: r.get::<_, Option<Micros>>(5),
        };
        diff("main_event", id, "captures_count", r.get(6), Some(c.captures));
        diff("main_event", id, "detections_count", r.get(7), Some(c.detections));
        diff("main_event", id, "occurrences_count", r.get(8), Some(c.occurrences));
        if c.start.is_some() {
            diff("main_event", id, "start", r.get(9), c.start);
            diff("main_event", id, "end", r.get(10), c.end);
        }
        events.insert(id, c);
    }

    let mut deployments = BTreeMap::new();
    for r in client.query(RECOMPUTE_DEPLOYMENTS, &params).await? {
        let id: i64 = r.get(0);
        let c = DeploymentCounts {
            events: r.get(1),
            captures: r.get(2),
            total_size: r.get(3),
            detections: r.get(4),
            occurrences: r.get(5),
            taxa: r.get(6),
            first_capture: r.get(7),
            last_capture: r.get(8),
        };
        diff("main_deployment", id, "events_count", r.get(9), Some(c.events));
        diff("main_deployment", id, "captures_count", r.get(10), Some(c.captures));
        diff("main_deployment", id, "data_source_total_files", r.get(11), Some(c.captures));
        diff("main_deployment", id, "data_source_total_size", r.get(12), c.total_size);
        diff("main_deployment", id, "detections_count", r.get(13), Some(c.detections));
        diff("main_deployment", id, "occurrences_count", r.get(14), Some(c.occurrences));
        diff("main_deployment", id, "taxa_count", r.get(15), Some(c.taxa));
        diff("main_deployment", id, "first_capture_timestamp", r.get(16), c.first_capture);
        diff("main_deployment", id, "last_capture_timestamp", r.get(17), c.last_capture);
        deployments.insert(id, c);
    }
    v.expected = AllCounts { images, events, deployments };
    client.commit().await?;
    Ok(v)
}

/// Writes the recomputed values of every owner with a difference.
pub async fn fix(store: &Store, verification: &Verification) -> Result<crate::store::sink::SinkReport, StoreError> {
    let mut changes = tally_dataflows::CountChanges::default();
    let mut seen = std::collections::BTreeSet::new();
    for d in &verification.differences {
        if !seen.insert((d.table, d.id)) {
            continue;
        }
        match d.table {
            "main_sourceimage" => changes.images.push((d.id, verification.expected.images.get(&d.id).copied())),
            "main_event" => changes.events.push((d.id, verification.expected.events.get(&d.id).copied())),
            _ => changes.deployments.push((d.id, verification.expected.deployments.get(&d.id).copied())),
        }
    }
    crate::store::sink::write_changes(store, &changes).await
}
