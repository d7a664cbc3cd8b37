//! What Antenna recomputes after each result, as Django's SQL (`../shared/antenna/data-model.md`
//! §2.3, §2.5): the image's `detections_count` (saved twice when it has detections), its
//! event's counts, then its deployment's, each read with `count(*)` and written back; the
//! project filter inlined as Django emits it (`determination_id IN (…) OR parents_json @> …`).
//!
//! `CountStrategy::Recompute` instead runs `verify` scoped to the deployment, which recomputes
//! every image and every event of the deployment as well, after building the filter verdicts
//! over every occurrence in the database. [`compare`] times both on the same captures, so the
//! report can say how far the strategy is from Antenna's own cost.

use std::time::{Instant, SystemTime};

use tokio_postgres::Client;

use crate::stats::Samples;
use tally::store::verify::{self, Scope};
use tally::store::Store;

/// Antenna's SQL against `CountStrategy::Recompute`'s, per result.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Results (captures) timed.
    pub samples: usize,
    /// `verify` scoped to the capture's deployment, then `fix`.
    pub verify_fix: Samples,
    /// Django's recompute of the capture, its event and its deployment.
    pub antenna: Samples,
    /// Counts Antenna's SQL computed that differ from the stored ones (which the recompute
    /// strategy had made exact): 0 unless this SQL is wrong.
    pub disagreements: usize,
}

/// Times both recomputes for each capture of `images` (already ingested).
pub async fn compare(store: &Store, images: &[tally_dataflows::Id]) -> anyhow::Result<Comparison> {
    let client = store.client().await?;
    let mut c = Comparison { samples: 0, verify_fix: Samples::new(), antenna: Samples::new(), disagreements: 0 };
    for &image in images {
        let deployment: Option<i64> =
            client.query_one("SELECT deployment_id FROM main_sourceimage WHERE id = $1", &[&image]).await?.get(0);
        let started = Instant::now();
        let v = verify::verify(store, Scope { project: None, deployment }).await?;
        verify::fix(store, &v).await?;
        c.verify_fix.push(started.elapsed());

        let started = Instant::now();
        c.disagreements += recompute(&client, image).await?;
        c.antenna.push(started.elapsed());
        c.samples += 1;
    }
    Ok(c)
}

/// Django's recompute after a result for `image`; returns how many computed counts differ
/// from the stored ones.
async fn recompute(client: &Client, image: i64) -> Result<usize, tokio_postgres::Error> {
    let mut differ = 0;
    let row = client
        .query_one(
            "SELECT s.event_id, s.deployment_id, coalesce(s.project_id, dep.project_id), s.detections_count::int8
             FROM main_sourceimage s LEFT JOIN main_deployment dep ON dep.id = s.deployment_id WHERE s.id = $1",
            &[&image],
        )
        .await?;
    let (event, deployment, project, stored): (Option<i64>, Option<i64>, Option<i64>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));

    // SourceImage.save(): once per image listed, once more per image with detections.
    let filter = Filter::of(client, project).await?;
    let detections = filter.count_detections(client, "d.source_image_id = $1", image).await?;
    differ += usize::from(stored != Some(detections));
    for _ in 0..if detections > 0 { 2 } else { 1 } {
        let count = filter.count_detections(client, "d.source_image_id = $1", image).await?;
        client
            .execute(
                "UPDATE main_sourceimage SET detections_count = $2::int8, updated_at = now() WHERE id = $1",
                &[&image, &count],
            )
            .await?;
    }

    // update_calculated_fields_for_events(pks=[image.event_id]).
    if let Some(event) = event {
        let row = client
            .query_one(
                "SELECT coalesce(e.project_id, dep.project_id), e.captures_count::int8, e.detections_count::int8,
                        e.occurrences_count::int8
                 FROM main_event e LEFT JOIN main_deployment dep ON dep.id = e.deployment_id WHERE e.id = $1",
                &[&event],
            )
            .await?;
        let stored: [Option<i64>; 3] = [row.get(1), row.get(2), row.get(3)];
        let filter = Filter::of(client, row.get(0)).await?;
        let captures = count(client, "SELECT count(*) FROM main_sourceimage WHERE event_id = $1", event).await?;
        let detections = filter.count_detections(client, "s.event_id = $1", event).await?;
        let occurrences = filter.count_occurrences(client, "o.event_id = $1", event).await?;
        let span = client
            .query_one(
                "SELECT min(\"timestamp\"), max(\"timestamp\") FROM main_sourceimage WHERE event_id = $1",
                &[&event],
            )
            .await?;
        let (start, end): (Option<SystemTime>, Option<SystemTime>) = (span.get(0), span.get(1));
        differ += [captures, detections, occurrences].iter().zip(stored).filter(|(v, s)| Some(**v) != *s).count();
        client
            .execute(
                "UPDATE main_event SET captures_count = $2::int8, detections_count = $3::int8,
                        occurrences_count = $4::int8, start = coalesce($5, start), \"end\" = coalesce($6, \"end\"),
                        calculated_fields_updated_at = now()
                 WHERE id = $1",
                &[&event, &captures, &detections, &occurrences, &start, &end],
            )
            .await?;
    }

    // Deployment.update_calculated_fields(save=True).
    if let Some(deployment) = deployment {
        let row = client
            .query_one(
                "SELECT project_id, events_count::int8, data_source_total_files::int8, data_source_total_size,
                        detections_count::int8, occurrences_count::int8, taxa_count::int8
                 FROM main_deployment WHERE id = $1",
                &[&deployment],
            )
            .await?;
        let stored: [Option<i64>; 6] = [row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6)];
        let filter = Filter::of(client, row.get(0)).await?;
        let files = count(client, "SELECT count(*) FROM main_sourceimage WHERE deployment_id = $1", deployment).await?;
        let size: Option<i64> = client
            .query_one("SELECT sum(size)::int8 FROM main_sourceimage WHERE deployment_id = $1", &[&deployment])
            .await?
            .get(0);
        let events = count(client, "SELECT count(*) FROM main_event WHERE deployment_id = $1", deployment).await?;
        let detections = filter.count_detections(client, "s.deployment_id = $1", deployment).await?;
        let live = "o.deployment_id = $1 AND o.event_id IS NOT NULL";
        let occurrences = filter.count_occurrences(client, live, deployment).await?;
        let taxa = count(
            client,
            &format!(
                "SELECT count(*) FROM (SELECT DISTINCT o.determination_id FROM main_occurrence o {} WHERE {live} AND {}) t",
                filter.join, filter.predicate
            ),
            deployment,
        )
        .await?;
        let span = client
            .query_one(
                "SELECT min(\"timestamp\"), max(\"timestamp\") FROM main_sourceimage WHERE deployment_id = $1",
                &[&deployment],
            )
            .await?;
        let (first, last): (Option<SystemTime>, Option<SystemTime>) = (span.get(0), span.get(1));
        let computed = [Some(events), Some(files), size, Some(detections), Some(occurrences), Some(taxa)];
        differ += computed.iter().zip(stored).filter(|(v, s)| **v != *s).count();
        client
            .execute(
                "UPDATE main_deployment SET data_source_total_files = $2::int8, captures_count = $2::int8,
                        data_source_total_size = $3, events_count = $4::int8, detections_count = $5::int8,
                        occurrences_count = $6::int8, taxa_count = $7::int8, first_capture_timestamp = $8,
                        last_capture_timestamp = $9, updated_at = now()
                 WHERE id = $1",
                &[&deployment, &files, &size, &events, &detections, &occurrences, &taxa, &first, &last],
            )
            .await?;
    }
    Ok(differ)
}

async fn count(client: &Client, sql: &str, id: i64) -> Result<i64, tokio_postgres::Error> {
    client.query_one(sql, &[&id]).await?.try_get(0)
}

/// A project's default filters as the SQL Django emits (`filters.py:17-214`), read anew for
/// every owner as Django does. `None` filters nothing.
struct Filter {
    /// Whether a project applies (its detection counts then need the occurrence).
    filtered: bool,
    /// The join to `main_taxon t` the taxa terms need.
    join: String,
    /// The condition on `o` and `t`.
    predicate: String,
}

impl Filter {
    async fn of(client: &Client, project: Option<i64>) -> Result<Filter, tokio_postgres::Error> {
        let Some(project) = project else {
            return Ok(Filter { filtered: false, join: String::new(), predicate: "true".into() });
        };
        let threshold: Option<f64> = client
            .query_opt("SELECT default_filters_score_threshold FROM main_project WHERE id = $1", &[&project])
            .await?
            .and_then(|r| r.get(0));
        let ids = |table: &'static str| async move {
            let rows =
                client.query(&format!("SELECT taxon_id FROM {table} WHERE project_id = $1"), &[&project]).await?;
            rows.iter().map(|r| r.try_get::<_, i64>(0)).collect::<Result<Vec<i64>, _>>()
        };
        let include = ids("main_project_default_filters_include_taxa").await?;
        let exclude = ids("main_project_default_filters_exclude_taxa").await?;
        let list = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        let mut terms = vec![match threshold {
            Some(t) if t.is_finite() => format!("o.determination_score >= {t:?}"),
            _ => "false".to_string(),
        }];
        if !include.is_empty() {
            let parents: Vec<String> =
                include.iter().map(|i| format!("t.parents_json @> '[{{\"id\": {i}}}]'")).collect();
            terms.push(format!("(o.determination_id IN ({}) OR {})", list(&include), parents.join(" OR ")));
        }
        if !exclude.is_empty() {
            let parents: Vec<String> = exclude
                .iter()
                .map(|e| format!("(t.parents_json @> '[{{\"id\": {e}}}]' AND t.parents_json IS NOT NULL)"))
                .collect();
            terms.push(format!(
                "NOT ((o.determination_id IN ({}) AND o.determination_id IS NOT NULL) OR {})",
                list(&exclude),
                parents.join(" OR ")
            ));
        }
        let join = if !include.is_empty() {
            "JOIN main_taxon t ON t.id = o.determination_id"
        } else if !exclude.is_empty() {
            "LEFT JOIN main_taxon t ON t.id = o.determination_id"
        } else {
            ""
        };
        Ok(Filter { filtered: true, join: join.into(), predicate: terms.join(" AND ") })
    }

    /// Valid detections under `owner` (a condition on `d` or `s`, with `$1` its id).
    async fn count_detections(&self, client: &Client, owner: &str, id: i64) -> Result<i64, tokio_postgres::Error> {
        let sql = if self.filtered {
            format!(
                "SELECT count(*) FROM main_detection d JOIN main_sourceimage s ON s.id = d.source_image_id
                 JOIN main_occurrence o ON o.id = d.occurrence_id {} WHERE {owner} AND d.bbox IS NOT NULL AND {}",
                self.join, self.predicate
            )
        } else {
            format!(
                "SELECT count(*) FROM main_detection d JOIN main_sourceimage s ON s.id = d.source_image_id
                 WHERE {owner} AND d.bbox IS NOT NULL"
            )
        };
        count(client, &sql, id).await
    }

    /// Occurrences under `owner` (a condition on `o`, with `$1` its id) that pass.
    async fn count_occurrences(&self, client: &Client, owner: &str, id: i64) -> Result<i64, tokio_postgres::Error> {
        count(
            client,
            &format!("SELECT count(*) FROM main_occurrence o {} WHERE {owner} AND {}", self.join, self.predicate),
            id,
        )
        .await
    }
}
