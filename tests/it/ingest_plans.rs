//! Ingest into tables that start empty keeps Antenna's deferred foreign-key checks on index
//! scans. Those checks run at COMMIT with plans each backend caches; a plan cached while
//! `main_detection` was empty scans the whole table for every classification checked, until
//! the table's statistics change (`tally-tools bench jobs` measured a 7-minute COMMIT before
//! `src/ingest/analyze.rs`). Ingest analyzes what it has doubled, so after it has grown the
//! tables, a batch's checks no longer scan them.
//!
//! Sequential scans are read from `pg_stat_user_tables`, which a backend updates when it goes
//! idle, at the latest 10 s later (Postgres 15's `PGSTAT_IDLE_INTERVAL`): the test waits that
//! long before each reading.

use crate::common;

use std::time::{Duration, Instant};

use common::ingest::{assert_counts_exact, expected, rows, world, Fixture};
use common::Flavor;
use tally::ingest::daemon::IngestArgs;

/// Longest a backend may keep its table statistics before reporting them.
const STATS_FLUSH: Duration = Duration::from_secs(11);

async fn seq_scans(f: &Fixture, table: &str) -> i64 {
    let c = f.store.client().await.expect("client");
    c.query_one("SELECT coalesce(seq_scan, 0) FROM pg_stat_user_tables WHERE relname = $1", &[&table])
        .await
        .expect("pg_stat_user_tables")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_key_checks_stop_scanning_once_ingest_has_grown_the_tables() {
    // 1 project × 2 deployments × 2 nights × 150 captures, and no detection yet.
    let mut f = Fixture::new("ingest_plans", Flavor::Antenna, world(1, 150)).await;
    f.factory.mean_detections = 8.0;
    let images = f.world.images.clone();
    let (grow, later) = images.split_at(450);
    let c = f.store.client().await.expect("client");
    c.batch_execute("ANALYZE main_detection, main_classification, main_occurrence").await.expect("analyze");
    let analyzed_at: f64 = c
        .query_one(
            "SELECT extract(epoch FROM last_analyze)::float8 FROM pg_stat_user_tables WHERE relname = 'main_detection'",
            &[],
        )
        .await
        .expect("last_analyze")
        .get(0);

    // Grow the tables from empty in batches of 50 results.
    let (job, tasks) = f.job(grow).await;
    let args = IngestArgs { batch_size: 50, ..IngestArgs::default() };
    let mut running = f.start(args.clone()).await;
    for (image, reply) in &tasks {
        assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
    }
    running.wait_for(tasks.len(), 0, Duration::from_secs(120)).await;
    let grown = expected(&f, grow);
    assert!(grown.detections >= 2_000, "the first phase must double main_detection past 1,000 rows: {grown:?}");

    // Ingest analyzed main_detection after its inserts doubled it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last: f64 = c
            .query_one(
                "SELECT coalesce(extract(epoch FROM last_analyze)::float8, 0) FROM pg_stat_user_tables
                 WHERE relname = 'main_detection'",
                &[],
            )
            .await
            .expect("last_analyze")
            .get(0);
        if last > analyzed_at {
            break;
        }
        assert!(Instant::now() < deadline, "ingest did not analyze main_detection after growing it from empty");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ... and main_classification without its score and logit arrays (whose statistics cost
    // seconds of CPU with real vectors and no plan uses), its key columns included.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = |column: &'static str| {
        let c = &c;
        async move {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stats WHERE tablename = 'main_classification' AND attname = $1",
                    &[&column],
                )
                .await
                .expect("pg_stats")
                .get(0);
            n
        }
    };
    while stats("detection_id").await == 0 {
        assert!(Instant::now() < deadline, "ingest did not analyze main_classification after growing it from empty");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stats("scores").await + stats("logits").await, 0, "the arrays were not analyzed");

    // One more batch: its foreign-key checks (one per classification on main_detection) use
    // the primary key, not a scan of the table.
    tokio::time::sleep(STATS_FLUSH).await;
    let before = seq_scans(&f, "main_detection").await;
    let (job2, tasks2) = f.job(later).await;
    for (image, reply) in &tasks2 {
        assert!(f.publish(job2, reply, f.factory.task_result(reply, *image)).await);
    }
    running.wait_for(tasks.len() + tasks2.len(), 0, Duration::from_secs(120)).await;
    tokio::time::sleep(STATS_FLUSH).await;
    let scans = seq_scans(&f, "main_detection").await - before;
    let checked = expected(&f, later).classifications;
    println!("{scans} sequential scans of main_detection for {checked} classifications checked");
    assert!(checked >= 500, "the last phase checks many classifications: {checked}");
    assert!(
        scans * 20 < checked,
        "{scans} sequential scans of main_detection while {checked} classifications were checked at COMMIT"
    );
    running.stop().await;

    assert_eq!(rows(&f.store).await, expected(&f, &images));
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}
