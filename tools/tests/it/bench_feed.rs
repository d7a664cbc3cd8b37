//! `tally-tools bench feed` end to end through the binary on tiny sizes, against the shared Postgres
//! and NATS: every phase runs, the markdown report has its tables and goals, the JSON says
//! every edit's counts were announced (none timed out) and every count is exact, and the
//! scratch databases and streams are gone afterwards. No timing is asserted.

use std::process::Command;

use futures_util::StreamExt;
use tokio_postgres::NoTls;

fn database_url() -> String {
    std::env::var("TALLY_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn nats_url() -> String {
    std::env::var("TALLY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

#[test]
fn bench_feed_measures_every_phase_and_every_edit_is_counted() {
    let dir = std::env::temp_dir().join(format!("tally-bench-feed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let markdown = dir.join("bench-feed.md");
    let child = Command::new(env!("CARGO_BIN_EXE_tally-tools"))
        .args(["bench", "feed", "--bulk-rows", "2000", "--save-transactions", "10", "--count-updates", "10"])
        .args(["--repeats", "2", "--edits", "20", "--edit-interval", "20ms", "--ingest-rate", "50"])
        .args(["--projects", "2", "--project-detections", "2000", "--large-detections", "20000"])
        .args(["--large-repeats", "2", "--score-len", "8", "--json", "--output"])
        .arg(&markdown)
        .env("DATABASE_URL", database_url())
        .env("NATS_URL", nats_url())
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tally runs");
    let pid = child.id();
    let out = child.wait_with_output().expect("tally finishes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));

    let md = std::fs::read_to_string(&markdown).expect("markdown written");
    for needle in [
        "### 1. Trigger overhead on Django's statements",
        "| Django statement | transactions per mode | with triggers | without | ratio | outbox per transaction |",
        "| (a) `Deployment.update_children`: `UPDATE main_sourceimage SET project_id = … WHERE deployment_id = …` over 2,000 captures (median) | 4 |",
        "| (b) `save_results` for one capture: 20 detections",
        "| (c) `update_calculated_fields_for_events`: `bulk_update` of 100 events' counts",
        "### 2. Single-row edit → counts committed",
        "| series | edit | edits | counted | p50 | p95 | p99 | max | feed step p50 / p99 |",
        "| alone | all | 20 | 20 |",
        "| under ingest (50 results/s) | all | 20 | 20 |",
        "| alone | identification (occurrence determination, score 1.0) |",
        "| alone | project score threshold 0.5 ↔ 0.6 |",
        "| alone | capture moved to another event |",
        "### 3. Filter edits on a project of 20,000 detections",
        "| project score threshold 0.5 ↔ 0.6 | 2 | 2 |",
        "| include taxon added (one more family) | 2 | 2 |",
        "| include taxon removed again | 2 | 2 |",
        "### Goals (issue 10)",
        "| single-row edit → counts committed, p99 ≤ 1 s, alone |",
        "| single-row edit → counts committed, p99 ≤ 1 s, under ingest |",
        "| trigger overhead (a) bulk UPDATE: with / without |",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
    assert!(!md.contains("not counted"), "an edit timed out:\n{md}");

    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON: {e}\n{stdout}"));
    let summaries = [&json["edits"]["alone"], &json["edits"]["under_ingest"], &json["large"]["edits"]];
    for list in summaries {
        let list = list.as_array().unwrap_or_else(|| panic!("summaries: {json}"));
        assert!(!list.is_empty(), "{json}");
        for s in list {
            assert!(s["edits"].as_u64().unwrap_or(0) > 0, "{s}");
            assert_eq!(s["counted"], s["edits"], "every edit's counts must be announced: {s}");
            assert!(s["p99_ms"].is_number(), "{s}");
        }
    }
    assert_eq!(json["edits"]["alone"][0]["edits"], 20, "{json}");
    assert_eq!(json["edits"]["under_ingest"][0]["edits"], 20, "{json}");
    assert_eq!(json["edits"]["outbox_left"], 0, "{json}");
    assert_eq!(json["edits"]["counts_exact"], true, "{json}");
    assert_eq!(json["large"]["counts_exact"], true, "{json}");
    assert!(json["edits"]["results"].as_u64().unwrap_or(0) > 0, "results were published under ingest: {json}");
    for kind in ["bulk_update", "save_results", "count_update"] {
        let o = &json["triggers"][kind];
        assert!(o["with_ms"].as_f64().unwrap_or(0.0) > 0.0 && o["without_ms"].as_f64().unwrap_or(0.0) > 0.0, "{o}");
    }
    // The bulk UPDATE appends one entry naming every capture it moved; the count-only UPDATE none.
    assert_eq!(json["triggers"]["bulk_update"]["entries_per_transaction"], 1.0, "{json}");
    assert_eq!(json["triggers"]["bulk_update"]["ids_per_transaction"], 2000.0, "{json}");
    assert_eq!(json["triggers"]["count_update"]["entries_per_transaction"], 0.0, "{json}");
    std::fs::remove_dir_all(&dir).ok();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&database_url(), NoTls).await.expect("Postgres");
        tokio::spawn(connection);
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname LIKE $1",
                &[&format!("tally_bench_feed_{pid}_%")],
            )
            .await
            .expect("pg_database")
            .get(0);
        assert_eq!(left, 0, "scratch databases left behind");

        let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.expect("NATS"));
        let prefix = format!("TALLY_BENCH_FEED_{pid}_");
        let names: Vec<String> = js.stream_names().filter_map(|n| async move { n.ok() }).collect().await;
        let left: Vec<&String> = names.iter().filter(|n| n.starts_with(&prefix)).collect();
        assert!(left.is_empty(), "results streams left behind: {left:?}");
        // Job ids of the run: 1e9 + (pid mod 100000) × 1000 + n.
        let first = 1_000_000_000 + i64::from(pid % 100_000) * 1_000;
        let jobs: Vec<&String> = names
            .iter()
            .filter(|n| {
                n.strip_prefix("job_")
                    .and_then(|id| id.parse::<i64>().ok())
                    .is_some_and(|id| (first..first + 1_000).contains(&id))
            })
            .collect();
        assert!(jobs.is_empty(), "job streams left behind: {jobs:?}");
    });
}
