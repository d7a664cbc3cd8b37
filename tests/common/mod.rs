//! Shared by the Postgres integration tests: a scratch database per test, and seeding of
//! Antenna's tables from a `Tables` value.
//!
//! The server comes from `TALLY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). When it does not answer, tests fail with a
//! message saying so: they never skip.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use tally::config::DbArgs;
use tally::store::{self, Store};
use tally_dataflows::Tables;
use tokio_postgres::NoTls;

/// Which kind of database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Empty: `tally migrate` creates Antenna's tables.
    Empty,
    /// Antenna's real schema (`../shared/antenna/schema.sql`) loaded first.
    Antenna,
}

fn server_url() -> String {
    std::env::var("TALLY_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database created for one test and dropped when the value is dropped.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

async fn admin() -> tokio_postgres::Client {
    let url = server_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|e| {
        panic!("Postgres is required for this test and is not reachable at {url}: {e} (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)")
    });
    tokio::spawn(connection);
    client
}

impl TestDb {
    /// Creates `tally_test_<pid>_<n>_<label>`, loads Antenna's schema for [`Flavor::Antenna`],
    /// and runs `tally migrate`.
    pub async fn new(label: &str, flavor: Flavor) -> (TestDb, Store) {
        let (db, store) = TestDb::unmigrated(label, flavor).await;
        store::migrate::migrate(&store).await.expect("migrate");
        (db, store)
    }

    /// As [`TestDb::new`] without `tally migrate`.
    pub async fn unmigrated(label: &str, flavor: Flavor) -> (TestDb, Store) {
        let name = format!("tally_test_{}_{}_{label}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let admin = admin().await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await.expect("drop old db");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create db");
        let base = server_url();
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => panic!("TALLY_TEST_DATABASE_URL must end with /<database>"),
        };
        let db = TestDb { name, url };
        if flavor == Flavor::Antenna {
            // schema.sql clears search_path for its session: load it on a connection of its own.
            let schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/antenna/schema.sql"))
                .expect("../shared/antenna/schema.sql");
            // Lines starting with a backslash are psql meta-commands (`\restrict`), not SQL.
            let schema: String = schema.lines().filter(|l| !l.starts_with('\\')).map(|l| format!("{l}\n")).collect();
            let (client, connection) = tokio_postgres::connect(&db.url, NoTls).await.expect("connect");
            tokio::spawn(connection);
            client.batch_execute(&schema).await.expect("load Antenna's schema.sql");
        }
        let store = store::connect(&DbArgs::for_url(&db.url)).await.expect("connect");
        (db, store)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: use a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let admin = admin().await;
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

/// Inserts every row of `tables` into Antenna's tables, supplying every NOT NULL column as
/// Django would (no database defaults exist). Rows must be referentially consistent: the
/// foreign keys are checked at commit.
pub async fn seed(store: &Store, tables: &Tables) {
    let mut client = store.client().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    let sorted = |ids: Vec<u64>| {
        let mut v: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
        v.sort();
        v
    };
    let opt = |v: Option<u64>| v.map(|v| v as i64);

    let ids = sorted(tables.taxa.keys().copied().collect());
    let parents: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::Value::Array(
                tables.taxa[&(*id as u64)]
                    .ancestors
                    .iter()
                    .map(|a| serde_json::json!({"id": a, "name": format!("taxon {a}"), "rank": "GENUS"}))
                    .collect(),
            )
        })
        .collect();
    tx.execute(
        "INSERT INTO main_taxon (id, created_at, updated_at, name, rank, active, author, notes, parents_json)
         SELECT id, now(), now(), 'taxon ' || id, 'SPECIES', true, '', '', p
         FROM UNNEST($1::int8[], $2::jsonb[]) AS u(id, p)",
        &[&ids, &parents],
    )
    .await
    .expect("taxa");

    let ids = sorted(tables.projects.keys().copied().collect());
    let thresholds: Vec<f64> = ids.iter().map(|id| tables.projects[&(*id as u64)].threshold.get()).collect();
    tx.execute(
        "INSERT INTO main_project (id, created_at, updated_at, name, description, active, priority, feature_flags,
                                   default_filters_score_threshold, session_time_gap_seconds, draft)
         SELECT id, now(), now(), 'project ' || id, '', true, 1, '{}', t, 7200, false
         FROM UNNEST($1::int8[], $2::float8[]) AS u(id, t)",
        &[&ids, &thresholds],
    )
    .await
    .expect("projects");

    for (table, rows) in [
        ("main_project_default_filters_include_taxa", &tables.include_taxa),
        ("main_project_default_filters_exclude_taxa", &tables.exclude_taxa),
    ] {
        let ids = sorted(rows.keys().copied().collect());
        let projects: Vec<i64> = ids.iter().map(|id| rows[&(*id as u64)].project as i64).collect();
        let taxa: Vec<i64> = ids.iter().map(|id| rows[&(*id as u64)].taxon as i64).collect();
        tx.execute(
            &format!("INSERT INTO {table} (id, project_id, taxon_id) SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[])"),
            &[&ids, &projects, &taxa],
        )
        .await
        .expect("filters");
    }

    let ids = sorted(tables.deployments.keys().copied().collect());
    let projects: Vec<Option<i64>> = ids.iter().map(|id| opt(tables.deployments[&(*id as u64)].project)).collect();
    tx.execute(
        "INSERT INTO main_deployment (id, created_at, updated_at, name, description, project_id)
         SELECT id, now(), now(), 'deployment ' || id, '', p FROM UNNEST($1::int8[], $2::int8[]) AS u(id, p)",
        &[&ids, &projects],
    )
    .await
    .expect("deployments");

    let ids = sorted(tables.events.keys().copied().collect());
    let deployments: Vec<Option<i64>> = ids.iter().map(|id| opt(tables.events[&(*id as u64)].deployment)).collect();
    let projects: Vec<Option<i64>> = ids.iter().map(|id| opt(tables.events[&(*id as u64)].project)).collect();
    tx.execute(
        "INSERT INTO main_event (id, created_at, updated_at, group_by, start, deployment_id, project_id)
         SELECT id, now(), now(), 'group ' || id, timestamptz '2000-01-01', d, p
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS u(id, d, p)",
        &[&ids, &deployments, &projects],
    )
    .await
    .expect("events");

    let ids = sorted(tables.images.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.images[&(*id as u64)]).collect();
    let events: Vec<Option<i64>> = rows.iter().map(|r| opt(r.event)).collect();
    let deployments: Vec<Option<i64>> = rows.iter().map(|r| opt(r.deployment)).collect();
    let projects: Vec<Option<i64>> = rows.iter().map(|r| opt(r.project)).collect();
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
    .await
    .expect("images");

    let ids = sorted(tables.occurrences.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.occurrences[&(*id as u64)]).collect();
    let events: Vec<Option<i64>> = rows.iter().map(|r| opt(r.event)).collect();
    let deployments: Vec<Option<i64>> = rows.iter().map(|r| opt(r.deployment)).collect();
    let determinations: Vec<Option<i64>> = rows.iter().map(|r| opt(r.determination)).collect();
    let scores: Vec<Option<f64>> = rows.iter().map(|r| r.score.map(|s| s.get())).collect();
    tx.execute(
        "INSERT INTO main_occurrence (id, created_at, updated_at, event_id, deployment_id, determination_id, determination_score)
         SELECT id, now(), now(), e, d, t, s FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::float8[]) AS u(id, e, d, t, s)",
        &[&ids, &events, &deployments, &determinations, &scores],
    )
    .await
    .expect("occurrences");

    let ids = sorted(tables.detections.keys().copied().collect());
    let rows: Vec<_> = ids.iter().map(|id| &tables.detections[&(*id as u64)]).collect();
    let images: Vec<i64> = rows.iter().map(|r| r.image as i64).collect();
    let occurrences: Vec<Option<i64>> = rows.iter().map(|r| opt(r.occurrence)).collect();
    let valid: Vec<bool> = rows.iter().map(|r| r.valid).collect();
    tx.execute(
        "INSERT INTO main_detection (id, created_at, updated_at, source_image_id, occurrence_id, bbox)
         SELECT id, now(), now(), i, o, CASE WHEN v THEN jsonb_build_array(0.0, 0.0, 10.0, 10.0) END
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bool[]) AS u(id, i, o, v)",
        &[&ids, &images, &occurrences, &valid],
    )
    .await
    .expect("detections");
    tx.commit().await.expect("commit seed");
}
