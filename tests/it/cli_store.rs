//! The store commands end to end through the `tally` binary: migrate, verify (exit status,
//! JSON, --fix), rebuild and counts, against a real Postgres database of their own.

use crate::common;

use std::process::{Command, Output};

use common::{seed, Flavor, TestDb};
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::Tables;
use tally_tools::synth::{Workload, WorkloadConfig};

fn tally(args: &[&str], url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("TALLY_CONNECT_ATTEMPTS", "2")
        .output()
        .expect("tally runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn synthetic() -> Tables {
    let config = WorkloadConfig { nights: 3, images_per_night: 20, ..WorkloadConfig::default() };
    let mut w = Workload::new(Taxonomy::synthetic(4, 3, 5), config);
    let mut t = Tables::default();
    t.apply(&w.setup());
    t.apply(&w.messages(60));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_verify_rebuild_fix_and_counts() {
    let (db, store) = TestDb::new("cli", Flavor::Empty).await;
    seed(&store, &synthetic()).await;

    let again = tally(&["migrate"], &db.url);
    assert!(again.status.success());
    assert!(stdout(&again).contains("up to date"), "{}", stdout(&again));

    let before = tally(&["verify"], &db.url);
    assert_eq!(before.status.code(), Some(1), "NULL counts must fail verify:\n{}", stdout(&before));
    assert!(stdout(&before).contains("main_event"), "{}", stdout(&before));

    let rebuild = tally(&["rebuild"], &db.url);
    assert!(rebuild.status.success(), "{}", String::from_utf8_lossy(&rebuild.stderr));
    assert!(stdout(&rebuild).contains("corrected 60 images, 3 events, 1 deployments"), "{}", stdout(&rebuild));

    let clean = tally(&["verify"], &db.url);
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(stdout(&clean).contains("64 owners checked, 0 differences"), "{}", stdout(&clean));

    store
        .client()
        .await
        .expect("client")
        .batch_execute("UPDATE main_event SET occurrences_count = 0 WHERE id = 2")
        .await
        .expect("corrupt");
    let json = tally(&["verify", "--format", "json"], &db.url);
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(report["differences"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(report["differences"][0]["column"], "occurrences_count");

    let fix = tally(&["verify", "--fix"], &db.url);
    assert!(fix.status.success(), "{}", stdout(&fix));
    assert!(stdout(&fix).contains("fixed 1 rows; 0 differences remain"), "{}", stdout(&fix));

    let csv = tally(&["counts", "events", "--format", "csv"], &db.url);
    assert!(csv.status.success(), "{}", String::from_utf8_lossy(&csv.stderr));
    let lines: Vec<String> = stdout(&csv).lines().map(String::from).collect();
    assert_eq!(lines[0], "id,deployment,project,start,end,captures,detections,occurrences");
    assert_eq!(lines.len(), 4, "{lines:?}");
    // Synthetic captures start at 21:00 UTC; counts shows Antenna's wall-clock, New York time.
    assert!(lines[1].starts_with("1,1,1,2026-06-01 17:00,"), "{lines:?}");

    let dated = tally(&["counts", "events", "--from", "2026-06-02", "--to", "2026-06-02", "--format", "json"], &db.url);
    let events: serde_json::Value = serde_json::from_slice(&dated.stdout).expect("json");
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");

    let table = tally(&["counts", "deployments"], &db.url);
    assert!(stdout(&table).lines().next().is_some_and(|h| h.contains("detections")), "{}", stdout(&table));
    let projects = tally(&["counts", "projects", "--format", "json"], &db.url);
    let projects: serde_json::Value = serde_json::from_slice(&projects.stdout).expect("json");
    assert_eq!(projects[0]["deployments"], 1);

    let bad = tally(&["counts", "events", "--from", "June"], &db.url);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("YYYY-MM-DD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_an_unmigrated_database_say_to_migrate() {
    let (db, _store) = TestDb::unmigrated("cli_bare", Flavor::Empty).await;
    let out = tally(&["verify"], &db.url);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run `tally migrate` first"), "{stderr}");
}

#[test]
fn unreachable_database_is_a_clear_error() {
    let out = tally(&["verify"], "postgres://postgres@127.0.0.1:1/nothing");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect to the database after 2 attempts"), "{stderr}");
}
