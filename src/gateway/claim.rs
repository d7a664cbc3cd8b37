//! Claims: `GET /api/v2/jobs?ids_only=1&incomplete_only=1&pipeline__slug__in=a,b&dispatch_mode=async_api`
//! (what ADC sends) and `GET /api/v2/jobs/next?pipeline__slug__in=a,b` (antenna#1265, not in
//! Antenna yet: same answer). Each returns one job to work on (`limit` asks for more), in
//! DRF's `LimitOffsetPagination` shape: `{count, next, previous, results: [{id,
//! pipeline_slug, user_permissions}], user_permissions}`; ADC reads `results[].id` and
//! `results[].pipeline_slug`. `count` is the number of claimable jobs; `next` and `previous`
//! are null (a claim is not a page).
//!
//! **Claimable**: `async_api`, status STARTED or RETRY (the only states `/tasks` serves; Antenna
//! also hands out PENDING jobs, whose tasks come back empty), results stage not final, pipeline
//! among the requested ones.
//!
//! **Fairness**: jobs NATS says have no deliverable task ([`super::queue`]) go after all the
//! others (those with tasks, and those NATS said nothing about in time: ranking "unknown"
//! below "yes" would let one slow NATS answer hand a job a run of claims, since each poller
//! learns deliverability on its own); among equals, the job whose `turn` is lowest. A serve
//! sets the job's turn to the next number of one global sequence, so the served job goes behind
//! every other: the jobs rotate, none is served twice while another has waited a whole
//! rotation, and a job that sat out (not deliverable for a while) or is new (turn 0) is served
//! next but once, never a run of claims. A per-job counter ("served n times, +1") would
//! give a job that sat out a run until it caught up, and a turn computed from the statement's
//! snapshot (max + 1) can be stale under concurrency; the sequence is neither.
//!
//! The choice and the serve are one statement on `tally.job_dispatch` (`FOR UPDATE SKIP
//! LOCKED`, with a `served_count` guard against rows changed since the statement's snapshot),
//! and claims take turns on a transaction-level advisory lock taken before that statement.
//! Without the lock, a claim whose snapshot predates another's serve skipped the row that
//! serve changed and went on down its stale order: 8 pollers over 4 jobs then gave one job 3
//! serves in a round and another 1, in about half the runs of
//! `eight_pollers_over_four_jobs_get_each_job_twice_per_round`. With it, each claim's snapshot
//! holds every earlier serve, and the test holds every time. A claim holds the lock for one
//! short statement and a commit that does not wait for the disk (`synchronous_commit = off`:
//! a serve lost to a crash only costs fairness bookkeeping), all sent in one pipelined round
//! trip, so pollers queue for well under a millisecond each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::auth::Worker;
use super::heartbeat::Beat;
use super::queue::Deliverable;
use super::{Gateway, GatewayError};
use crate::metrics::names;
use crate::retry::{self, BackoffBuilder};

/// Jobs one claim may return (DRF's `limit`), at most.
const MAX_LIMIT: i64 = 100;

/// The advisory lock claims take turns on ("tally claim" in ASCII).
const CLAIM_LOCK: i64 = 0x7461_6c6c_7963_6c6d;

/// How long a claim keeps retrying while every claimable job is locked.
const CLAIM_BUDGET: Duration = Duration::from_millis(100);

/// Claimable jobs for the requested pipelines (all pipelines when none is named).
const CANDIDATES: &str = "
    SELECT j.id, p.slug, d.job_id IS NOT NULL AS known
    FROM jobs_job j
    JOIN ml_pipeline p ON p.id = j.pipeline_id
    LEFT JOIN tally.job_dispatch d ON d.job_id = j.id
    WHERE j.dispatch_mode = 'async_api'
      AND j.status IN ('STARTED', 'RETRY')
      AND (cardinality($1::text[]) = 0 OR p.slug = ANY($1::text[]))
      AND NOT coalesce(j.progress -> 'stages' @> '[{\"key\": \"results\", \"status\": \"SUCCESS\"}]'
                    OR j.progress -> 'stages' @> '[{\"key\": \"results\", \"status\": \"FAILURE\"}]'
                    OR j.progress -> 'stages' @> '[{\"key\": \"results\", \"status\": \"REVOKED\"}]', false)";

/// Bookkeeping rows for jobs claimable for the first time.
const REGISTER: &str = "
    INSERT INTO tally.job_dispatch (job_id) SELECT unnest($1::bigint[]) ON CONFLICT DO NOTHING";

/// Takes up to $3 of the jobs $1 (those in $2 are known to have no deliverable task and go
/// last), the one whose last serve is oldest first (never served: turn 0), and records the
/// serve: the job's turn becomes the next number of one global sequence, which puts it behind
/// every job served before. See the module documentation for the `served_count` guard.
const CLAIM: &str = "
    WITH seen AS MATERIALIZED (
        SELECT job_id, served_count FROM tally.job_dispatch WHERE job_id = ANY($1::bigint[])
    ), pick AS (
        SELECT d.job_id
        FROM tally.job_dispatch d
        JOIN seen ON seen.job_id = d.job_id
        WHERE d.served_count = seen.served_count
        ORDER BY d.job_id = ANY($2::bigint[]), d.turn, d.job_id
        LIMIT $3
        FOR UPDATE OF d SKIP LOCKED
    )
    UPDATE tally.job_dispatch d
    SET turn = nextval('tally.job_dispatch_turn'),
        served_count = d.served_count + 1,
        last_served_at = clock_timestamp()
    FROM pick
    WHERE d.job_id = pick.job_id
    RETURNING d.job_id";

/// Which pipelines a claim names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pipelines {
    /// No `pipeline__slug__in`, or only empty ones: jobs of every pipeline.
    Any,
    /// The slugs named, sorted and deduplicated. Empty when every entry was empty
    /// (`pipeline__slug__in=,,,`): then no job matches.
    Among(Vec<String>),
}

/// What a claim asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimQuery {
    /// `pipeline__slug__in` (comma-separated, may repeat).
    pub pipelines: Pipelines,
    /// `ids_only`: the worker form of the list call.
    pub ids_only: bool,
    /// `dispatch_mode`: only `async_api` jobs are ever claimable.
    pub dispatch_mode: Option<String>,
    /// `limit`: jobs to return (default 1, as Antenna's claim paginator).
    pub limit: i64,
}

impl ClaimQuery {
    /// Reads the query string's pairs; unknown parameters are ignored, as DRF does.
    ///
    /// `pipeline__slug__in` is read as django-filter's `BaseInFilter` over a `CharField`, which
    /// Antenna uses: an empty value is no filter at all; otherwise the value is split on `,`
    /// and each entry stripped, and the filter is `slug IN (entries)`. An empty entry matches
    /// no pipeline (no pipeline has an empty slug), so empty entries among real slugs change
    /// nothing, and a value of only empty entries (`,,,`) matches no job: Antenna answers that
    /// claim with an empty page, and so does tally. A control character (NUL included: Postgres
    /// refuses NUL in text, which made this a 503) is a 400. Repeated parameters are united.
    ///
    /// `limit` must be a positive integer (larger than [`MAX_LIMIT`] means [`MAX_LIMIT`], as
    /// DRF's cutoff), and `offset`, which a claim ignores, a non-negative one: otherwise 400.
    /// DRF's paginator would quietly use its default instead; a claim whose query is malformed
    /// is refused rather than guessed at.
    pub fn parse(pairs: &[(String, String)]) -> Result<ClaimQuery, GatewayError> {
        let mut q = ClaimQuery { pipelines: Pipelines::Any, ids_only: false, dispatch_mode: None, limit: 1 };
        for (key, value) in pairs {
            match key.as_str() {
                "pipeline__slug__in" => {
                    if value.chars().any(char::is_control) {
                        return Err(GatewayError::BadRequest(
                            "pipeline__slug__in must not contain control characters".into(),
                        ));
                    }
                    if value.is_empty() {
                        continue;
                    }
                    let entries = value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from);
                    match &mut q.pipelines {
                        Pipelines::Among(slugs) => slugs.extend(entries),
                        any => *any = Pipelines::Among(entries.collect()),
                    }
                }
                "ids_only" => q.ids_only = truthy(value),
                "dispatch_mode" => q.dispatch_mode = Some(value.clone()),
                "limit" => match integer(value) {
                    Some(n) if n > 0 => q.limit = n.min(MAX_LIMIT),
                    _ => {
                        return Err(GatewayError::BadRequest(format!(
                            "limit must be a positive integer, not {value:?}"
                        )))
                    }
                },
                "offset" if integer(value).is_none_or(|n| n < 0) => {
                    return Err(GatewayError::BadRequest(format!(
                        "offset must be a non-negative integer, not {value:?}"
                    )));
                }
                _ => {}
            }
        }
        if let Pipelines::Among(slugs) = &mut q.pipelines {
            slugs.sort();
            slugs.dedup();
        }
        Ok(q)
    }

    /// The slugs to filter on (empty: every pipeline), or `None` when no pipeline can match.
    fn slugs(&self) -> Option<&[String]> {
        match &self.pipelines {
            Pipelines::Any => Some(&[]),
            Pipelines::Among(slugs) if slugs.is_empty() => None,
            Pipelines::Among(slugs) => Some(slugs),
        }
    }
}

/// A decimal integer as DRF's `int()` reads it (surrounding whitespace allowed); larger than
/// `i64` saturates, so that a huge limit is a large one rather than an error.
fn integer(value: &str) -> Option<i64> {
    let t = value.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(t.parse::<i64>().unwrap_or(if t.starts_with('-') { i64::MIN } else { i64::MAX }))
}

/// Antenna's query booleans: present and empty, or 1/true/yes.
fn truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "" | "1" | "true" | "yes")
}

/// The jobs a claim returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Claimable jobs matching the query.
    pub count: usize,
    /// `(id, pipeline slug)` of the jobs handed out.
    pub jobs: Vec<(i64, String)>,
}

/// `GET /api/v2/jobs`: only its worker form (`ids_only=1`) is served by tally.
pub async fn list(
    _worker: Worker,
    State(gateway): State<Arc<Gateway>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, GatewayError> {
    let q = query_of(query)?;
    if !q.ids_only {
        return Err(GatewayError::BadRequest(
            "tally serves only the worker claim: GET /api/v2/jobs?ids_only=1&pipeline__slug__in=…".into(),
        ));
    }
    Ok(Json(page(&claim(&gateway, &q).await?)))
}

/// `GET /api/v2/jobs/next`.
pub async fn next(
    _worker: Worker,
    State(gateway): State<Arc<Gateway>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, GatewayError> {
    let q = query_of(query)?;
    Ok(Json(page(&claim(&gateway, &q).await?)))
}

fn query_of(query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<ClaimQuery, GatewayError> {
    let Query(pairs) = query.map_err(|e| GatewayError::BadRequest(format!("bad query string: {}", e.body_text())))?;
    ClaimQuery::parse(&pairs)
}

/// DRF's paginated shape.
fn page(claimed: &Claimed) -> Value {
    let results: Vec<Value> = claimed
        .jobs
        .iter()
        .map(|(id, slug)| json!({"id": id, "pipeline_slug": slug, "user_permissions": []}))
        .collect();
    json!({"count": claimed.count, "next": null, "previous": null, "results": results, "user_permissions": []})
}

/// Claims up to `q.limit` jobs (see the module documentation).
pub async fn claim(gateway: &Gateway, q: &ClaimQuery) -> Result<Claimed, GatewayError> {
    let none = Claimed { count: 0, jobs: Vec::new() };
    // Only empty slugs (`,,,`): no pipeline matches (see `ClaimQuery::parse`).
    let Some(pipelines) = q.slugs() else {
        metrics::counter!(names::GATEWAY_CLAIMS, "outcome" => "none").increment(1);
        return Ok(none);
    };
    if !pipelines.is_empty() {
        gateway.heartbeats.beat(Beat::Pipelines(pipelines.to_vec()));
    }
    if q.dispatch_mode.as_deref().is_some_and(|mode| mode != "async_api") {
        return Ok(none);
    }
    let client = gateway.store()?.client().await.map_err(GatewayError::db)?;
    let statement = client.prepare_cached(CANDIDATES).await.map_err(GatewayError::db)?;
    let rows = client.query(&statement, &[&pipelines]).await.map_err(GatewayError::db)?;
    let mut slugs: HashMap<i64, String> = HashMap::with_capacity(rows.len());
    let mut unknown = Vec::new();
    for row in &rows {
        let id: i64 = row.try_get(0).map_err(GatewayError::db)?;
        slugs.insert(id, row.try_get(1).map_err(GatewayError::db)?);
        if !row.try_get::<_, bool>(2).map_err(GatewayError::db)? {
            unknown.push(id);
        }
    }
    if slugs.is_empty() {
        metrics::counter!(names::GATEWAY_CLAIMS, "outcome" => "none").increment(1);
        return Ok(none);
    }
    if !unknown.is_empty() {
        let statement = client.prepare_cached(REGISTER).await.map_err(GatewayError::db)?;
        client.execute(&statement, &[&unknown]).await.map_err(GatewayError::db)?;
    }
    let ids: Vec<i64> = slugs.keys().copied().collect();
    let deliverability = gateway.queues.deliverability(gateway.nats(), &ids).await;
    let of = |wanted: Deliverable| -> Vec<i64> {
        deliverability.iter().filter(|(_, d)| **d == wanted).map(|(id, _)| *id).collect()
    };
    let no = of(Deliverable::No);

    let statement = client.prepare_cached(CLAIM).await.map_err(GatewayError::db)?;
    let begin = format!("BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock({CLAIM_LOCK})");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&ids, &no, &q.limit];
    let deadline = Instant::now() + CLAIM_BUDGET;
    let mut backoff = retry::claim_contention().build();
    let claimed = loop {
        // Claims take turns (see the module documentation): the lock is held from before the
        // claim statement's snapshot to the commit, so every claim sees every earlier serve.
        // Losing a serve to a crash only costs fairness bookkeeping, so the commit does not
        // wait for the disk.
        // One round trip: the three requests are pipelined (tokio-postgres sends each when
        // first polled, and `join!` polls them in order), so the lock is held only while the
        // server runs the claim, never across a network wait. If the claim fails, COMMIT ends
        // the aborted transaction as a rollback and the connection goes back to the pool clean.
        let (begun, rows, committed) = tokio::join!(
            client.batch_execute(&begin),
            client.query(&statement, &params),
            client.batch_execute("COMMIT"),
        );
        begun.map_err(GatewayError::db)?;
        let rows = rows.map_err(GatewayError::db)?;
        committed.map_err(GatewayError::db)?;
        if !rows.is_empty() || Instant::now() >= deadline {
            break rows;
        }
        // Every claimable row is locked by something else than a claim (an operator's
        // statement, say); try again shortly.
        tokio::time::sleep(retry::pause(&mut backoff)).await;
    };
    let mut jobs = Vec::with_capacity(claimed.len());
    for row in claimed {
        let id: i64 = row.try_get(0).map_err(GatewayError::db)?;
        jobs.push((id, slugs.remove(&id).unwrap_or_default()));
    }
    jobs.sort_by_key(|(id, _)| deliverability.get(id) == Some(&Deliverable::No));
    let outcome = if jobs.is_empty() { "none" } else { "claimed" };
    metrics::counter!(names::GATEWAY_CLAIMS, "outcome" => outcome).increment(1);
    Ok(Claimed { count: ids.len(), jobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(query: &[(&str, &str)]) -> ClaimQuery {
        ClaimQuery::parse(&pairs(query)).unwrap_or_else(|e| panic!("{query:?}: {e}"))
    }

    fn refused(query: &[(&str, &str)]) -> String {
        match ClaimQuery::parse(&pairs(query)) {
            Err(GatewayError::BadRequest(detail)) => detail,
            other => panic!("{query:?}: not a 400: {other:?}"),
        }
    }

    fn among(slugs: &[&str]) -> Pipelines {
        Pipelines::Among(slugs.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn reads_adc_claim_query() {
        let q = parse(&[
            ("pipeline__slug__in", "b, a,,a"),
            ("ids_only", "1"),
            ("incomplete_only", "1"),
            ("dispatch_mode", "async_api"),
        ]);
        assert_eq!(q.pipelines, among(&["a", "b"]));
        assert!(q.ids_only);
        assert_eq!(q.dispatch_mode.as_deref(), Some("async_api"));
        assert_eq!(q.limit, 1);
    }

    #[test]
    fn booleans_and_limits() {
        assert!(parse(&[("ids_only", "")]).ids_only);
        assert!(parse(&[("ids_only", "True")]).ids_only);
        assert!(!parse(&[("ids_only", "0")]).ids_only);
        assert_eq!(parse(&[("limit", "3")]).limit, 3);
        assert_eq!(parse(&[("limit", " 3 ")]).limit, 3);
        assert_eq!(parse(&[("limit", "100000")]).limit, MAX_LIMIT);
        assert_eq!(parse(&[("limit", "99999999999999999999999")]).limit, MAX_LIMIT);
        assert_eq!(parse(&[("offset", "0"), ("limit", "2")]).limit, 2);
        for bad in ["x", "abc", "-2", "0", "", "1.5", "3x", "+", "٣"] {
            assert!(refused(&[("limit", bad)]).contains("limit must be a positive integer"), "{bad:?}");
        }
        assert!(refused(&[("offset", "abc")]).contains("offset"));
        assert!(refused(&[("offset", "-1")]).contains("offset"));
    }

    #[test]
    fn slugs_as_django_filter_reads_them() {
        assert_eq!(parse(&[]).pipelines, Pipelines::Any);
        assert_eq!(parse(&[("pipeline__slug__in", "")]).pipelines, Pipelines::Any);
        assert_eq!(parse(&[("pipeline__slug__in", ",,,")]).pipelines, among(&[]));
        assert_eq!(parse(&[("pipeline__slug__in", ",,,")]).slugs(), None);
        assert_eq!(parse(&[("pipeline__slug__in", " , ")]).slugs(), None);
        assert_eq!(parse(&[]).slugs(), Some(&[][..]));
        assert_eq!(parse(&[("pipeline__slug__in", ",moths,")]).pipelines, among(&["moths"]));
        let repeated = parse(&[("pipeline__slug__in", "x"), ("pipeline__slug__in", "y")]);
        assert_eq!(repeated.pipelines, among(&["x", "y"]));
        let with_empty = parse(&[("pipeline__slug__in", ""), ("pipeline__slug__in", "y")]);
        assert_eq!(with_empty.pipelines, among(&["y"]));
    }

    #[test]
    fn control_characters_in_slugs_are_refused() {
        for bad in ["\0", "moths\0", "a,\u{7}", "a\nb", "\t", "\u{7f}", "x\u{85}"] {
            assert!(refused(&[("pipeline__slug__in", bad)]).contains("control characters"), "{bad:?}");
        }
        assert_eq!(parse(&[("pipeline__slug__in", "papillons-é,ñ")]).pipelines, among(&["papillons-é", "ñ"]));
    }

    #[test]
    fn page_has_drf_shape() {
        let v = page(&Claimed { count: 3, jobs: vec![(9, "moths".into())] });
        assert_eq!(
            v,
            json!({"count": 3, "next": null, "previous": null,
                   "results": [{"id": 9, "pipeline_slug": "moths", "user_permissions": []}],
                   "user_permissions": []})
        );
    }
}
