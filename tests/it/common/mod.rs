//! Shared by the Postgres integration tests: a scratch database per test, and seeding of
//! Antenna's tables from a `Tables` value. [`services`] starts private Postgres and NATS
//! servers for tests that restart or crash them.
//!
//! The server comes from `TALLY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). When it does not answer, tests fail with a
//! message saying so: they never skip.

pub mod gateway;
pub mod ingest;
pub mod services;

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
        let url = store::sibling_database_url(&server_url(), &name)
            .unwrap_or_else(|| panic!("TALLY_TEST_DATABASE_URL must end with /<database>"));
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

/// Inserts every row of `tables` into Antenna's tables (see `tally::store::seed`).
pub async fn seed(store: &Store, tables: &Tables) {
    store::seed::seed(store, tables).await.expect("seed");
}

/// The worker user (id 100) and its DRF token `key`, as Antenna's ADC workers authenticate.
pub async fn insert_worker_token(store: &Store, key: &str) {
    let c = store.client().await.expect("client");
    c.execute(
        "INSERT INTO users_user (id, password, is_superuser, email, is_staff, is_active, date_joined, name)
         VALUES (100, '', true, 'worker@example.org', true, true, now(), 'worker')",
        &[],
    )
    .await
    .expect("worker user");
    c.execute("INSERT INTO authtoken_token (key, created, user_id) VALUES ($1, now(), 100)", &[&key])
        .await
        .expect("worker token");
}

/// Links processing service `id` to the pipeline `slug` and to `projects`.
pub async fn link_service(store: &Store, id: i64, slug: &str, projects: &[i64]) {
    let c = store.client().await.expect("client");
    c.execute(
        "INSERT INTO ml_processingservice_pipelines (processingservice_id, pipeline_id)
         SELECT $1, id FROM ml_pipeline WHERE slug = $2",
        &[&id, &slug],
    )
    .await
    .expect("link pipeline");
    c.execute(
        "INSERT INTO ml_processingservice_projects (processingservice_id, project_id) SELECT $1, unnest($2::bigint[])",
        &[&id, &projects],
    )
    .await
    .expect("link projects");
}

/// The `tally-tools` binary (worker-sim, bench, demo), built beside `tally` by
/// `cargo test --workspace`: integration tests see only their own package's binaries.
pub fn tools_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tally")).with_file_name("tally-tools");
    assert!(bin.exists(), "{} is missing: run the tests with `cargo test --workspace`", bin.display());
    bin
}
