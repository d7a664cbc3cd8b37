//! The Postgres store against a real server: migrations on empty and Antenna databases, the
//! SQL recompute against the oracle, rebuild → verify, corruption found and fixed, the sink's
//! untouched rows, and the errors operators see. Every test uses its own database.

use crate::common;

use std::collections::BTreeMap;

use common::{seed, Flavor, TestDb};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tally::config::DbArgs;
use tally::store::{self, verify::Scope, Store, StoreError};
use tally_dataflows::oracle::recompute;
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{
    Deployment, Detection, Engine, Event, FilterTaxon, Image, InputBatch, Occurrence, Project, Score, Tables,
};

fn taxonomy() -> Taxonomy {
    tally::taxa_file::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/taxa-quebec-vermont-2022.json"
    )))
    .expect("taxonomy fixture")
}

/// A referentially consistent random database: projects with include + exclude, exclude-only
/// and no filters; a deployment without project; events and images with and without their own
/// project; images whose event belongs to another deployment; occurrences with NULL event,
/// determination or score; detections without occurrence; null markers.
fn random_tables(seed: u64, taxonomy: &Taxonomy, scale: i64) -> Tables {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = Tables::default();
    for (id, taxon) in &taxonomy.taxa {
        t.taxa.insert(*id, taxon.clone());
    }
    let species = taxonomy.of_rank(Rank::Species);
    let genera = taxonomy.of_rank(Rank::Genus);
    let families = taxonomy.of_rank(Rank::Family);
    let thresholds = [0.0, 0.3, 0.5, 0.8];
    for p in 1..=3 {
        t.projects.insert(p, Project { threshold: Score::new(thresholds[rng.random_range(0..4)]) });
    }
    let mut filter_row = 0;
    let mut filter = |project, taxon| {
        filter_row += 1;
        (filter_row, FilterTaxon { project, taxon })
    };
    for f in families.iter().take(30) {
        let (id, row) = filter(1, *f);
        t.include_taxa.insert(id, row);
    }
    let (id, row) = filter(1, genera[rng.random_range(0..genera.len())]);
    t.exclude_taxa.insert(id, row);
    let (id, row) = filter(2, families[rng.random_range(0..families.len())]);
    t.exclude_taxa.insert(id, row);
    let deployment_projects = [Some(1), Some(2), None, Some(3)];
    for (i, p) in deployment_projects.iter().enumerate() {
        t.deployments.insert(i as i64 + 1, Deployment { project: *p });
    }
    let pick = |rng: &mut SmallRng, n: i64, null: f64| (!rng.random_bool(null)).then(|| rng.random_range(1..=n));
    let events = 2 * scale;
    for e in 1..=events {
        let deployment = pick(&mut rng, 4, 0.05);
        let project = pick(&mut rng, 3, 0.7);
        t.events.insert(e, Event { deployment, project });
    }
    for i in 1..=20 * scale {
        let event = pick(&mut rng, events, 0.1);
        // Usually the event's deployment; sometimes another (detection counts follow the image).
        let deployment = match event.and_then(|e| t.events[&e].deployment) {
            Some(d) if rng.random_bool(0.9) => Some(d),
            _ => pick(&mut rng, 4, 0.1),
        };
        let image = Image {
            event,
            deployment,
            project: pick(&mut rng, 3, 0.6),
            timestamp: (!rng.random_bool(0.1)).then(|| 1_780_000_000_000_000 + rng.random_range(0..10_000_000_000i64)),
            size: (!rng.random_bool(0.1)).then(|| rng.random_range(0..5_000_000)),
        };
        t.images.insert(i, image);
    }
    let images = 20 * scale;
    for o in 1..=60 * scale {
        let determination = if rng.random_bool(0.05) {
            None
        } else if rng.random_bool(0.1) {
            Some(genera[rng.random_range(0..genera.len())])
        } else {
            Some(species[rng.random_range(0..species.len())])
        };
        let score = match rng.random_range(0..10) {
            0 => None,
            1 => Some(Score::new(0.5)),
            _ => Some(Score::new(rng.random::<f64>())),
        };
        let event = pick(&mut rng, events, 0.1);
        let deployment = match event.and_then(|e| t.events[&e].deployment) {
            Some(d) if rng.random_bool(0.9) => Some(d),
            _ => pick(&mut rng, 4, 0.1),
        };
        t.occurrences.insert(o, Occurrence { event, deployment, determination, score });
    }
    let occurrences = 60 * scale;
    for d in 1..=80 * scale {
        let valid = !rng.random_bool(0.1);
        let occurrence = if valid { pick(&mut rng, occurrences, 0.1) } else { None };
        t.detections.insert(d, Detection { image: rng.random_range(1..=images), occurrence, valid });
    }
    t
}

async fn agree_with_oracle(flavor: Flavor) {
    let taxonomy = taxonomy();
    for seed_value in 0..3 {
        let (_db, store) = TestDb::new("agree", flavor).await;
        let tables = random_tables(seed_value, &taxonomy, 5);
        seed(&store, &tables).await;
        let sql = store::verify::verify(&store, Scope::default()).await.expect("verify");
        let oracle = recompute(&tables);
        assert_eq!(sql.expected.images, oracle.images, "images, seed {seed_value}");
        assert_eq!(sql.expected.events, oracle.events, "events, seed {seed_value}");
        assert_eq!(sql.expected.deployments, oracle.deployments, "deployments, seed {seed_value}");
        // Bootstrapping the dataflow from the same database gives the same counts again.
        let mut engine = Engine::new(1).expect("engine");
        store::bootstrap::bootstrap(&store, &mut engine).await.expect("bootstrap");
        assert_eq!(engine.snapshot(), oracle, "dataflow after bootstrap, seed {seed_value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_recompute_agrees_with_oracle_and_dataflow() {
    agree_with_oracle(Flavor::Empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_recompute_agrees_with_oracle_on_antenna_schema() {
    agree_with_oracle(Flavor::Antenna).await;
}

async fn rebuild(store: &Store) -> Engine {
    store::check::check_schema(store).await.expect("schema");
    let mut engine = Engine::new(1).expect("engine");
    store::bootstrap::bootstrap(store, &mut engine).await.expect("bootstrap");
    store::sink::write_all(store, &engine.snapshot()).await.expect("sink");
    engine
}

const MUTATIONS: &str = "
UPDATE main_occurrence SET determination_id = (SELECT min(id) FROM main_taxon WHERE jsonb_array_length(parents_json) = 3)
 WHERE id % 7 = 0;
UPDATE main_occurrence SET determination_score = 0.5 WHERE id % 11 = 0;
UPDATE main_occurrence SET determination_id = NULL WHERE id % 17 = 0;
UPDATE main_occurrence SET event_id = NULL WHERE id % 19 = 0;
UPDATE main_sourceimage SET event_id = 1 WHERE id % 9 = 0;
UPDATE main_sourceimage SET \"timestamp\" = NULL WHERE id % 23 = 0;
DELETE FROM main_detection WHERE id % 13 = 0;
UPDATE main_detection SET bbox = NULL, occurrence_id = NULL WHERE id % 29 = 0;
UPDATE main_project SET default_filters_score_threshold = 0.6 WHERE id = 2;
INSERT INTO main_project_default_filters_include_taxa (id, project_id, taxon_id)
  SELECT 9999, 3, min(id) FROM main_taxon WHERE jsonb_array_length(parents_json) = 1;
DELETE FROM main_project_default_filters_exclude_taxa WHERE project_id = 1;
UPDATE main_event SET project_id = NULL WHERE id % 3 = 0;
UPDATE main_deployment SET project_id = 2 WHERE id = 3;
UPDATE main_taxon SET parents_json = '[]' WHERE id IN (SELECT id FROM main_taxon WHERE jsonb_array_length(parents_json) = 2 LIMIT 5);
";

async fn rebuild_verify_corrupt_fix(flavor: Flavor) {
    let (_db, store) = TestDb::new("rebuild", flavor).await;
    seed(&store, &random_tables(42, &taxonomy(), 10)).await;
    let before = store::verify::verify(&store, Scope::default()).await.expect("verify");
    assert!(!before.differences.is_empty(), "seeded counts are NULL: verify must report them");

    store.client().await.expect("client").batch_execute(MUTATIONS).await.expect("mutations");
    rebuild(&store).await;
    let clean = store::verify::verify(&store, Scope::default()).await.expect("verify");
    assert_eq!(clean.differences, vec![], "rebuild left differences");

    store
        .client()
        .await
        .expect("client")
        .batch_execute(
            "UPDATE main_event SET captures_count = captures_count + 1 WHERE id = 1;
             UPDATE main_deployment SET taxa_count = NULL WHERE id = 2;
             UPDATE main_sourceimage SET detections_count = 999 WHERE id = 5;",
        )
        .await
        .expect("corrupt");
    let found = store::verify::verify(&store, Scope::default()).await.expect("verify");
    let mut where_: Vec<(&str, i64, &str)> = found.differences.iter().map(|d| (d.table, d.id, d.column)).collect();
    where_.sort();
    assert_eq!(
        where_,
        vec![
            ("main_deployment", 2, "taxa_count"),
            ("main_event", 1, "captures_count"),
            ("main_sourceimage", 5, "detections_count")
        ]
    );
    let fixed = store::verify::fix(&store, &found).await.expect("fix");
    assert_eq!(fixed.total(), 3, "fix writes exactly the three corrupted rows");
    let after = store::verify::verify(&store, Scope::default()).await.expect("verify");
    assert_eq!(after.differences, vec![]);

    // Scoped verify sees only its deployment's owners.
    let scoped = store::verify::verify(&store, Scope { project: None, deployment: Some(2) }).await.expect("verify");
    assert_eq!(scoped.expected.deployments.keys().copied().collect::<Vec<_>>(), vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_then_verify_is_clean_and_corruption_is_found_and_fixed() {
    rebuild_verify_corrupt_fix(Flavor::Empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_then_verify_on_antenna_schema() {
    rebuild_verify_corrupt_fix(Flavor::Antenna).await;
}

async fn row_versions(store: &Store) -> BTreeMap<(String, i64), String> {
    let client = store.client().await.expect("client");
    let mut out = BTreeMap::new();
    for table in ["main_sourceimage", "main_event", "main_deployment"] {
        for r in client.query(&format!("SELECT id, xmin::text FROM {table}"), &[]).await.expect("xmin") {
            out.insert((table.to_string(), r.get(0)), r.get(1));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_touches_only_rows_whose_counts_changed() {
    let (_db, store) = TestDb::new("sink", Flavor::Empty).await;
    let tables = random_tables(7, &taxonomy(), 4);
    seed(&store, &tables).await;
    let mut engine = rebuild(&store).await;
    let versions = row_versions(&store).await;

    // Writing the same counts again touches nothing.
    let again = store::sink::write_all(&store, &engine.snapshot()).await.expect("sink");
    assert_eq!(again.total(), 0);
    assert_eq!(row_versions(&store).await, versions, "an unchanged row got a new version");

    // One occurrence loses its score: only the owners whose counts change are written.
    let (id, occurrence) = tables
        .occurrences
        .iter()
        .find(|(_, o)| o.score.is_some() && o.event.is_some() && o.deployment == Some(3))
        .map(|(id, o)| (*id, o.clone()))
        .expect("an occurrence of deployment 3 (no project: every occurrence counts)");
    let mut batch = InputBatch::default();
    batch.occurrences.push((id, Some(Occurrence { determination: None, ..occurrence })));
    let changes = engine.apply(&batch).expect("apply");
    let written = store::sink::write_changes(&store, &changes).await.expect("sink");
    assert_eq!(written.total() as usize, changes.len(), "every reported owner differs from what is stored");
    let after = row_versions(&store).await;
    let touched: Vec<_> = versions.iter().filter(|(k, v)| after.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
    let reported: Vec<(String, i64)> = changes
        .images
        .iter()
        .map(|(id, _)| ("main_sourceimage".to_string(), (*id)))
        .chain(changes.events.iter().map(|(id, _)| ("main_event".to_string(), (*id))))
        .chain(changes.deployments.iter().map(|(id, _)| ("main_deployment".to_string(), (*id))))
        .collect();
    let mut reported = reported;
    reported.sort();
    assert_eq!(touched, reported);
    assert!(!touched.is_empty(), "the change moved deployment 3's taxa count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tables_name_tally_migrate() {
    let (_db, store) = TestDb::unmigrated("bare", Flavor::Empty).await;
    let err = store::check::check_schema(&store).await.expect_err("no tables");
    assert!(matches!(err, StoreError::NotMigrated(_)), "{err}");
    assert!(err.to_string().contains("run `tally migrate` first"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_column_is_named_before_any_write() {
    let (_db, store) = TestDb::new("column", Flavor::Antenna).await;
    store
        .client()
        .await
        .expect("client")
        .batch_execute("ALTER TABLE main_occurrence DROP COLUMN determination_score")
        .await
        .expect("drop column");
    let err = store::check::check_schema(&store).await.expect_err("column missing");
    assert_eq!(
        err.to_string(),
        "table main_occurrence has no column determination_score, which tally needs; is this an Antenna database?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_leaves_antenna_tables_alone() {
    let (_db, store) = TestDb::new("idempotent", Flavor::Antenna).await;
    let again = store::migrate::migrate(&store).await.expect("migrate again");
    assert!(again.antenna_tables_existed);
    assert!(again.applied.is_empty(), "second run applied {:?}", again.applied);
    let tables: i64 = store
        .client()
        .await
        .expect("client")
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(tables, 60, "Antenna's 60 tables, none added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_fails_after_bounded_retries() {
    let mut args = DbArgs::for_url("postgres://postgres@127.0.0.1:1/nothing");
    args.connect_attempts = 3;
    args.connect_backoff = std::time::Duration::from_millis(10);
    let err = store::connect(&args).await.err().expect("nothing listens on port 1");
    assert!(matches!(err, StoreError::Unreachable { attempts: 3, .. }), "{err}");
}

/// Every session of the pool compresses the large values it writes as `--toast-compression`
/// says (lz4 by default: pglz spends milliseconds of the server's CPU on each 29,176-class
/// score array and then stores it uncompressed), and `server` leaves the server's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_compress_large_values_as_configured() {
    let (db, store) = TestDb::new("toast", Flavor::Empty).await;
    let setting = |store: Store| async move {
        let c = store.client().await.expect("session");
        let row = c.query_one("SHOW default_toast_compression", &[]).await.expect("show");
        row.get::<_, String>(0)
    };
    assert_eq!(setting(store).await, "lz4", "the default");
    let server: String = {
        let (c, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        c.query_one("SHOW default_toast_compression", &[]).await.expect("show").get(0)
    };
    for (flag, expected) in [("pglz", "pglz"), ("lz4", "lz4"), ("server", server.as_str())] {
        let args: DbArgs =
            tally::config::from_flags(&[&format!("--database-url={}", db.url), "--toast-compression", flag]);
        let store = store::connect(&args).await.expect("connect");
        assert_eq!(setting(store.clone()).await, expected, "--toast-compression {flag}");
        // The setting is the session's, not a transaction's: a pooled session keeps it.
        assert_eq!(setting(store).await, expected, "--toast-compression {flag}, again");
    }
    // Large scores written through a session are stored and read back whole.
    let c = store::connect(&DbArgs::for_url(&db.url)).await.expect("connect").client().await.expect("session");
    c.batch_execute("CREATE TABLE big (scores double precision[])").await.expect("table");
    let scores: Vec<f64> = (0..29_176).map(|i| ((i * 7919) % 10007) as f64 / 1e7).collect();
    c.execute("INSERT INTO big VALUES ($1)", &[&scores]).await.expect("insert");
    let back: Vec<f64> = c.query_one("SELECT scores FROM big", &[]).await.expect("select").get(0);
    assert_eq!(back, scores);
}
