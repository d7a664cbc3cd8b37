//! The change feed (SPEC §2, migration V7): edits made by Django while `tally serve` runs reach
//! the counts. Every write path of `data-model.md` §4 is performed as the SQL Django emits (a
//! full-row `UPDATE` for `save()`, the Collector's order for deletes) on a session of its own,
//! as Django's; once the outbox has drained, every stored count must equal its SQL definition
//! (`verify`). Each step also checks that the edit changed what the SQL computes, so a feed
//! that applied nothing would fail it.

use crate::common;

use std::time::{Duration, Instant};

use common::ingest::{assert_counts_exact, world, Fixture, Running};
use common::Flavor;
use tally::ingest::daemon::IngestArgs;
use tally::store::verify::{verify, Scope};
use tally::store::Store;
use tally_dataflows::AllCounts;
use tokio_postgres::NoTls;

/// A session like Django's: no `tally.origin`, so the triggers see its writes.
async fn django(f: &Fixture) -> tokio_postgres::Client {
    let url = &f.db.as_ref().expect("a database on the shared server").url;
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect as Django");
    tokio::spawn(connection);
    client
}

/// Outbox entries waiting.
async fn backlog(store: &Store) -> i64 {
    let c = store.client().await.expect("client");
    c.query_one("SELECT count(*) FROM tally.change_outbox", &[]).await.expect("outbox").get(0)
}

/// Waits until serve has applied every outbox entry (the entries are deleted in the
/// transaction that writes their counts).
async fn drained(store: &Store) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while backlog(store).await > 0 {
        assert!(Instant::now() < deadline, "the change feed did not drain within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the SQL of SPEC §2 computes now.
async fn computed(store: &Store) -> AllCounts {
    verify(store, Scope::default()).await.expect("verify").expected
}

/// A fixture with results for every image saved by a running ingest (with the feed).
async fn running(label: &str) -> (Fixture, Running) {
    let mut f = Fixture::new(label, Flavor::Empty, world(2, 6)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let mut r = f.start(IngestArgs::default()).await;
    for (image, reply) in &tasks {
        f.publish(job, reply, f.factory.task_result(reply, *image)).await;
    }
    r.wait_for(tasks.len(), 0, Duration::from_secs(60)).await;
    drained(&f.store).await;
    assert_counts_exact(&f.store).await;
    (f, r)
}

/// Runs one Django edit: the counts it changes must reach the stored columns.
async fn step(f: &Fixture, django: &tokio_postgres::Client, name: &str, sql: &str) {
    let before = computed(&f.store).await;
    django.batch_execute(sql).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    drained(&f.store).await;
    let after = computed(&f.store).await;
    assert_ne!(before, after, "{name}: the edit should change some count (the test would prove nothing)");
    let v = verify(&f.store, Scope::default()).await.expect("verify");
    assert!(
        v.differences.is_empty(),
        "{name}: stored counts differ from their SQL definition after the feed drained: {:?}",
        &v.differences[..v.differences.len().min(10)]
    );
}

/// Runs `sql` in Django's session inside a transaction that is rolled back, and returns the
/// outbox entries it added (visible to its own transaction only).
async fn entries_of(django: &tokio_postgres::Client, sql: &str) -> i64 {
    django.batch_execute("BEGIN").await.expect("begin");
    let before = one(django, "SELECT count(*) FROM tally.change_outbox").await;
    django.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let after = one(django, "SELECT count(*) FROM tally.change_outbox").await;
    django.batch_execute("ROLLBACK").await.expect("rollback");
    after - before
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_and_determination_edits_reach_the_counts() {
    let (f, r) = running("feed_filters").await;
    let dj = django(&f).await;

    step(
        &f,
        &dj,
        "Project.save() with a new score threshold",
        "UPDATE main_project SET created_at = created_at, updated_at = now(), name = name, description = description,
                active = active, priority = priority, feature_flags = feature_flags, draft = draft,
                session_time_gap_seconds = session_time_gap_seconds, default_filters_score_threshold = 0.8
         WHERE id = 1",
    )
    .await;
    // Project 2 has no include filter: including one family drops every other family.
    // Seeded taxa list their ancestors as [root, family, genus].
    let family = one(
        &dj,
        "SELECT min((s.parents_json->1->>'id')::int8) FROM main_occurrence o JOIN main_taxon s ON s.id = o.determination_id
         WHERE o.project_id = 2 AND o.determination_score >= 0.5",
    )
    .await;
    step(
        &f,
        &dj,
        "m2m add to default_filters_include_taxa",
        &format!("INSERT INTO main_project_default_filters_include_taxa (project_id, taxon_id) VALUES (2, {family})"),
    )
    .await;
    let genus = one(
        &dj,
        &format!(
            "SELECT min((s.parents_json->2->>'id')::int8) FROM main_occurrence o
             JOIN main_taxon s ON s.id = o.determination_id
             WHERE o.project_id = 2 AND o.determination_score >= 0.5 AND (s.parents_json->1->>'id')::int8 = {family}"
        ),
    )
    .await;
    step(
        &f,
        &dj,
        "m2m add to default_filters_exclude_taxa",
        &format!("INSERT INTO main_project_default_filters_exclude_taxa (project_id, taxon_id) VALUES (2, {genus})"),
    )
    .await;
    step(
        &f,
        &dj,
        "m2m remove from default_filters_include_taxa",
        &format!(
            "DELETE FROM main_project_default_filters_include_taxa WHERE project_id = 2 AND taxon_id IN ({family})"
        ),
    )
    .await;

    // A human identification: the occurrence's determination becomes its taxon, score 1.0.
    let occurrence = one(
        &dj,
        "SELECT min(o.id) FROM main_occurrence o JOIN main_sourceimage s ON s.event_id = o.event_id
         WHERE o.project_id = 1 AND o.determination_score < 0.8",
    )
    .await;
    let other = one(
        &dj,
        &format!(
            "SELECT min(t.id) FROM main_taxon t WHERE jsonb_array_length(t.parents_json) = 3
               AND t.id <> (SELECT determination_id FROM main_occurrence WHERE id = {occurrence})"
        ),
    )
    .await;
    step(
        &f,
        &dj,
        "Identification.save() then update_occurrence_determination",
        &format!(
            "BEGIN;
             INSERT INTO main_identification (created_at, updated_at, occurrence_id, taxon_id, withdrawn, comment)
             VALUES (now(), now(), {occurrence}, {other}, false, '');
             UPDATE main_occurrence SET created_at = created_at, updated_at = now(), event_id = event_id,
                    deployment_id = deployment_id, project_id = project_id, determination_id = {other},
                    determination_score = 1.0
             WHERE id = {occurrence};
             COMMIT;"
        ),
    )
    .await;

    // Class masking: the original terminal classification is demoted, a re-normalised one is
    // added, and the occurrence is re-saved with a lower score.
    let masked = one(
        &dj,
        "SELECT min(o.id) FROM main_occurrence o WHERE o.project_id = 1 AND o.determination_score >= 0.8
           AND EXISTS (SELECT 1 FROM main_detection d WHERE d.occurrence_id = o.id)",
    )
    .await;
    step(
        &f,
        &dj,
        "class masking (run_class_masking) and Occurrence.save()",
        &format!(
            "BEGIN;
             UPDATE main_classification SET terminal = false
             WHERE detection_id IN (SELECT id FROM main_detection WHERE occurrence_id = {masked});
             INSERT INTO main_classification (created_at, updated_at, \"timestamp\", terminal, detection_id, taxon_id, score)
             SELECT now(), now(), now(), true, d.id, o.determination_id, 0.42
             FROM main_detection d JOIN main_occurrence o ON o.id = d.occurrence_id WHERE o.id = {masked};
             UPDATE main_occurrence SET updated_at = now(), determination_score = 0.42 WHERE id = {masked};
             COMMIT;"
        ),
    )
    .await;

    // Django's own recompute writes count columns only, and a save() that rewrites a row with
    // the same input values changes nothing: neither enters the feed.
    assert_eq!(
        entries_of(
            &dj,
            "UPDATE main_event SET captures_count = captures_count + 1, calculated_fields_updated_at = now()"
        )
        .await,
        0,
        "a count-only UPDATE (update_calculated_fields) entered the feed"
    );
    assert_eq!(
        entries_of(&dj, "UPDATE main_occurrence SET updated_at = now(), determination_score = determination_score")
            .await,
        0,
        "an UPDATE that changes no input value entered the feed"
    );
    // The same kind of statement changing an input does enter it (the checks above can fail).
    assert_eq!(entries_of(&dj, "UPDATE main_occurrence SET determination_score = 0.11").await, 1);

    // tally's own sessions never enter the feed (their writes reach the dataflow directly).
    let mut c = f.store.client().await.expect("client");
    let tx = c.transaction().await.expect("tx");
    tx.execute("UPDATE main_occurrence SET determination_score = 0.11", &[]).await.expect("update");
    let n: i64 = tx.query_one("SELECT count(*) FROM tally.change_outbox", &[]).await.expect("outbox").get(0);
    assert_eq!(n, 0, "tally's own write entered the feed");
    tx.rollback().await.expect("rollback");

    r.stop().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_edits_and_deletions_reach_the_counts() {
    let (f, r) = running("feed_membership").await;
    let dj = django(&f).await;

    // Deployment.save() with a new project, then update_children's three QuerySet UPDATEs.
    step(
        &f,
        &dj,
        "Deployment.save() with a new project and update_children()",
        "BEGIN;
         UPDATE main_deployment SET updated_at = now(), name = name, description = description, project_id = 2 WHERE id = 1;
         UPDATE main_event SET project_id = 2 WHERE deployment_id = 1;
         UPDATE main_occurrence SET project_id = 2 WHERE deployment_id = 1;
         UPDATE main_sourceimage SET project_id = 2 WHERE deployment_id = 1;
         COMMIT;",
    )
    .await;

    // group_images_into_events: a new event for the last three captures of event 3, then the
    // occurrences' realignment and delete_empty_events.
    step(
        &f,
        &dj,
        "group_images_into_events (regroup) with occurrence realignment",
        "BEGIN;
         INSERT INTO main_event (id, created_at, updated_at, group_by, start, deployment_id, project_id)
         OVERRIDING SYSTEM VALUE
         SELECT 1000, now(), now(), '2030-01-01', now(), deployment_id, project_id FROM main_event WHERE id = 3;
         UPDATE main_sourceimage SET event_id = 1000
         WHERE id IN (SELECT id FROM main_sourceimage WHERE event_id = 3 ORDER BY \"timestamp\" DESC LIMIT 3);
         UPDATE main_occurrence o SET event_id = (
             SELECT s.event_id FROM main_detection d JOIN main_sourceimage s ON s.id = d.source_image_id
             WHERE d.occurrence_id = o.id ORDER BY s.\"timestamp\", s.id, d.id LIMIT 1)
         WHERE o.deployment_id = (SELECT deployment_id FROM main_event WHERE id = 3);
         DELETE FROM main_event e WHERE e.deployment_id = (SELECT deployment_id FROM main_event WHERE id = 3)
           AND NOT EXISTS (SELECT 1 FROM main_sourceimage s WHERE s.event_id = e.id)
           AND NOT EXISTS (SELECT 1 FROM main_occurrence o WHERE o.event_id = e.id);
         COMMIT;",
    )
    .await;

    // Deleting a capture: its detections go, classifications lose their detection, occurrences stay.
    let image = one(&dj, "SELECT min(source_image_id) FROM main_detection WHERE bbox IS NOT NULL").await;
    step(
        &f,
        &dj,
        "SourceImage.delete() (Collector)",
        &format!(
            "BEGIN;
             UPDATE main_classification SET detection_id = NULL
             WHERE detection_id IN (SELECT id FROM main_detection WHERE source_image_id = {image});
             DELETE FROM main_detection WHERE source_image_id = {image};
             DELETE FROM main_sourceimage WHERE id = {image};
             COMMIT;"
        ),
    )
    .await;

    let occurrence = one(
        &dj,
        "SELECT min(occurrence_id) FROM main_detection d JOIN main_occurrence o ON o.id = d.occurrence_id
         WHERE o.event_id IS NOT NULL",
    )
    .await;
    step(
        &f,
        &dj,
        "Occurrence.delete() (Collector)",
        &format!(
            "BEGIN;
             UPDATE main_detection SET occurrence_id = NULL WHERE occurrence_id = {occurrence};
             DELETE FROM main_identification WHERE occurrence_id = {occurrence};
             DELETE FROM main_occurrence WHERE id = {occurrence};
             COMMIT;"
        ),
    )
    .await;

    step(
        &f,
        &dj,
        "Event.delete() (Collector)",
        "BEGIN;
         UPDATE main_sourceimage SET event_id = NULL WHERE event_id = 5;
         UPDATE main_occurrence SET event_id = NULL WHERE event_id = 5;
         DELETE FROM main_event WHERE id = 5;
         COMMIT;",
    )
    .await;

    step(
        &f,
        &dj,
        "Deployment.delete() (Collector)",
        "BEGIN;
         UPDATE main_sourceimage SET deployment_id = NULL WHERE deployment_id = 4;
         UPDATE main_event SET deployment_id = NULL WHERE deployment_id = 4;
         UPDATE main_occurrence SET deployment_id = NULL WHERE deployment_id = 4;
         DELETE FROM main_deployment WHERE id = 4;
         COMMIT;",
    )
    .await;

    r.stop().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taxonomy_imports_and_new_captures_reach_the_counts() {
    let (f, r) = running("feed_taxonomy").await;
    let dj = django(&f).await;

    // import_taxa: a new genus, and a species moved under it (Taxon.save() rewrites its own
    // parents_json); project 2 includes only the new genus, so the move decides what counts.
    let species = one(
        &dj,
        "SELECT min(determination_id) FROM main_occurrence WHERE project_id = 2 AND determination_score >= 0.5",
    )
    .await;
    step(
        &f,
        &dj,
        "include filter on a genus",
        "BEGIN;
         INSERT INTO main_taxon (id, created_at, updated_at, name, rank, active, author, notes, parents_json)
         OVERRIDING SYSTEM VALUE VALUES (5000, now(), now(), 'Newgenus', 'GENUS', true, '', '', '[]');
         INSERT INTO main_project_default_filters_include_taxa (project_id, taxon_id) VALUES (2, 5000);
         COMMIT;",
    )
    .await;
    step(
        &f,
        &dj,
        "import_taxa reparents a species (Taxon.save())",
        &format!(
            "UPDATE main_taxon SET updated_at = now(), name = name, parent_id = 5000,
                    parents_json = '[{{\"id\": 5000, \"name\": \"Newgenus\", \"rank\": \"GENUS\"}}]'
             WHERE id = {species}"
        ),
    )
    .await;

    // Deactivating a taxon changes no count input: nothing enters the feed.
    assert_eq!(
        entries_of(&dj, "UPDATE main_taxon SET active = false, updated_at = now() WHERE id = 5000").await,
        0,
        "deactivating a taxon entered the feed"
    );

    // sync_captures: a new night of captures in deployment 2 (bulk_create), its event.
    step(
        &f,
        &dj,
        "sync_captures: new images and their event",
        "BEGIN;
         INSERT INTO main_event (id, created_at, updated_at, group_by, start, deployment_id, project_id)
         OVERRIDING SYSTEM VALUE VALUES (2000, now(), now(), '2031-01-01', '2031-01-01 22:00+00', 2, 1);
         INSERT INTO main_sourceimage (created_at, updated_at, path, test_image, event_id, deployment_id, project_id,
                                       \"timestamp\", size)
         SELECT now(), now(), 'sync/' || g || '.jpg', false, 2000, 2, 1,
                timestamptz '2031-01-01 22:00+00' + g * interval '10 minutes', 1000 + g
         FROM generate_series(1, 20) g;
         COMMIT;",
    )
    .await;

    // A TRUNCATE has no transition tables: serve rebuilds from the tables.
    step(
        &f,
        &dj,
        "TRUNCATE main_project_default_filters_include_taxa",
        "TRUNCATE main_project_default_filters_include_taxa",
    )
    .await;

    r.stop().await;
    f.cleanup().await;
}

/// `tally serve` (the binary) on the fixture's database and streams, logging to `log`.
fn serve(f: &Fixture, log: &std::path::Path, extra: &[&str]) -> std::process::Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-gateway", "--feed-poll", "1s"])
        .args(["--database-url", &f.db.as_ref().expect("db").url])
        .args(["--nats-url", &f.nats_args.nats_url])
        .args(["--results-stream", &f.nats_args.results_stream])
        .args(["--results-subject-prefix", &f.nats_args.results_subject_prefix])
        .args(extra)
        .env("TALLY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(out)
        .spawn()
        .expect("start tally serve")
}

/// Waits until `log` has a line containing `text` `times` times in all.
async fn logged(log: &std::path::Path, text: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = std::fs::read_to_string(log).unwrap_or_default().matches(text).count();
        if seen >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{text}` not logged {times} times within 60 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL between reading the outbox and committing: nothing is applied, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_reading_the_outbox_and_committing_loses_nothing() {
    let (f, r) = running("feed_crash").await;
    r.stop().await;
    let dj = django(&f).await;
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("feed-crash-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);

    let mut daemon = serve(&f, &log, &["--debug-feed-pause", "120s"]);
    logged(&log, "change feed: listening", 1).await;
    let before = computed(&f.store).await;
    dj.batch_execute("UPDATE main_project SET updated_at = now(), default_filters_score_threshold = 0.9 WHERE id = 1")
        .await
        .expect("threshold edit");
    logged(&log, "change feed: pausing before applying", 1).await;
    daemon.kill().expect("SIGKILL");
    daemon.wait().expect("reaped");

    // Killed after the read: the entry is still there and the stored counts are the old ones.
    assert_eq!(backlog(&f.store).await, 1, "the outbox entry must survive the crash");
    let after = computed(&f.store).await;
    assert_ne!(before, after, "the edit must change some count");
    let stale = verify(&f.store, Scope::default()).await.expect("verify");
    assert!(!stale.differences.is_empty(), "nothing may be applied before the commit");

    // Restarted: the rebuild (or the feed) covers the entry, once.
    let mut daemon = serve(&f, &log, &[]);
    logged(&log, "change feed: listening", 2).await;
    drained(&f.store).await;
    assert_counts_exact(&f.store).await;
    // And it keeps applying edits.
    step(
        &f,
        &dj,
        "threshold edit after the restart",
        "UPDATE main_project SET default_filters_score_threshold = 0.6 WHERE id = 1",
    )
    .await;
    let pid = daemon.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let status = daemon.wait().expect("serve exits");
    assert!(status.success(), "serve did not stop cleanly on SIGTERM: {status}");
    f.cleanup().await;
}

/// One Django edit of the property test; indices pick among the rows that exist then.
#[derive(Debug, Clone)]
enum Edit {
    Threshold { project: i64, value: f64 },
    ToggleInclude { project: i64, pick: usize },
    ToggleExclude { project: i64, pick: usize },
    Identify { occurrence: usize, species: usize },
    MoveImage { image: usize, event: usize },
    ImageTimestamp { image: usize, hours: i32 },
    DeleteOccurrence { occurrence: usize },
    DeleteImage { image: usize },
    Reparent { species: usize, genus: usize },
    DeploymentProject { deployment: i64, project: i64 },
}

fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
    use proptest::prelude::*;
    prop_oneof![
        (1..=2i64, prop::sample::select(vec![0.0, 0.3, 0.5, 0.7, 0.95]))
            .prop_map(|(project, value)| Edit::Threshold { project, value }),
        (1..=2i64, any::<usize>()).prop_map(|(project, pick)| Edit::ToggleInclude { project, pick }),
        (1..=2i64, any::<usize>()).prop_map(|(project, pick)| Edit::ToggleExclude { project, pick }),
        (any::<usize>(), any::<usize>()).prop_map(|(occurrence, species)| Edit::Identify { occurrence, species }),
        (any::<usize>(), any::<usize>()).prop_map(|(image, event)| Edit::MoveImage { image, event }),
        (any::<usize>(), -48..48i32).prop_map(|(image, hours)| Edit::ImageTimestamp { image, hours }),
        any::<usize>().prop_map(|occurrence| Edit::DeleteOccurrence { occurrence }),
        any::<usize>().prop_map(|image| Edit::DeleteImage { image }),
        (any::<usize>(), any::<usize>()).prop_map(|(species, genus)| Edit::Reparent { species, genus }),
        (1..=4i64, 1..=2i64).prop_map(|(deployment, project)| Edit::DeploymentProject { deployment, project }),
    ]
}

/// The `pick`-th (modulo) id `sql` returns, if any.
async fn pick(c: &tokio_postgres::Client, sql: &str, pick: usize) -> Option<i64> {
    let ids: Vec<i64> =
        c.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect();
    (!ids.is_empty()).then(|| ids[pick % ids.len()])
}

const SPECIES: &str = "SELECT id FROM main_taxon WHERE jsonb_array_length(parents_json) = 3 ORDER BY id";
const GENERA: &str = "SELECT id FROM main_taxon WHERE jsonb_array_length(parents_json) = 2 ORDER BY id";
const FAMILIES: &str = "SELECT id FROM main_taxon WHERE jsonb_array_length(parents_json) = 1 ORDER BY id";

/// The SQL Django emits for `edit` (empty when there is nothing to pick).
async fn django_sql(c: &tokio_postgres::Client, edit: &Edit) -> String {
    match *edit {
        Edit::Threshold { project, value } => {
            format!("UPDATE main_project SET updated_at = now(), default_filters_score_threshold = {value} WHERE id = {project}")
        }
        Edit::ToggleInclude { project, pick: p } | Edit::ToggleExclude { project, pick: p } => {
            let (table, taxa) = match edit {
                Edit::ToggleInclude { .. } => ("main_project_default_filters_include_taxa", FAMILIES),
                _ => ("main_project_default_filters_exclude_taxa", GENERA),
            };
            let Some(taxon) = pick(c, taxa, p).await else { return String::new() };
            let linked =
                one(c, &format!("SELECT count(*) FROM {table} WHERE project_id = {project} AND taxon_id = {taxon}"))
                    .await;
            if linked > 0 {
                format!("DELETE FROM {table} WHERE project_id = {project} AND taxon_id IN ({taxon})")
            } else {
                format!("INSERT INTO {table} (project_id, taxon_id) VALUES ({project}, {taxon})")
            }
        }
        Edit::Identify { occurrence, species } => {
            let (Some(o), Some(t)) = (
                pick(c, "SELECT id FROM main_occurrence ORDER BY id", occurrence).await,
                pick(c, SPECIES, species).await,
            ) else {
                return String::new();
            };
            format!(
                "BEGIN;
                 INSERT INTO main_identification (created_at, updated_at, occurrence_id, taxon_id, withdrawn, comment)
                 VALUES (now(), now(), {o}, {t}, false, '');
                 UPDATE main_occurrence SET updated_at = now(), event_id = event_id, determination_id = {t},
                        determination_score = 1.0 WHERE id = {o};
                 COMMIT;"
            )
        }
        Edit::MoveImage { image, event } => {
            let (Some(i), Some(e)) = (
                pick(c, "SELECT id FROM main_sourceimage ORDER BY id", image).await,
                pick(c, "SELECT id FROM main_event ORDER BY id", event).await,
            ) else {
                return String::new();
            };
            format!("UPDATE main_sourceimage SET event_id = {e} WHERE id = {i}")
        }
        Edit::ImageTimestamp { image, hours } => {
            let Some(i) = pick(c, "SELECT id FROM main_sourceimage ORDER BY id", image).await else {
                return String::new();
            };
            format!(
                "UPDATE main_sourceimage SET \"timestamp\" = \"timestamp\" + interval '{hours} hours' WHERE id = {i}"
            )
        }
        Edit::DeleteOccurrence { occurrence } => {
            let Some(o) = pick(c, "SELECT id FROM main_occurrence ORDER BY id", occurrence).await else {
                return String::new();
            };
            format!(
                "BEGIN;
                 UPDATE main_detection SET occurrence_id = NULL WHERE occurrence_id = {o};
                 DELETE FROM main_identification WHERE occurrence_id = {o};
                 DELETE FROM main_occurrence WHERE id = {o};
                 COMMIT;"
            )
        }
        Edit::DeleteImage { image } => {
            let Some(i) = pick(c, "SELECT id FROM main_sourceimage ORDER BY id", image).await else {
                return String::new();
            };
            format!(
                "BEGIN;
                 UPDATE main_classification SET detection_id = NULL
                 WHERE detection_id IN (SELECT id FROM main_detection WHERE source_image_id = {i});
                 DELETE FROM main_detection WHERE source_image_id = {i};
                 UPDATE jobs_job SET source_image_single_id = NULL WHERE source_image_single_id = {i};
                 DELETE FROM main_sourceimage WHERE id = {i};
                 COMMIT;"
            )
        }
        Edit::Reparent { species, genus } => {
            let (Some(s), Some(g)) = (pick(c, SPECIES, species).await, pick(c, GENERA, genus).await) else {
                return String::new();
            };
            format!(
                "UPDATE main_taxon s SET updated_at = now(),
                        parents_json = g.parents_json || jsonb_build_array(jsonb_build_object('id', g.id, 'rank', 'GENUS'))
                 FROM main_taxon g WHERE s.id = {s} AND g.id = {g}"
            )
        }
        Edit::DeploymentProject { deployment, project } => format!(
            "BEGIN;
             UPDATE main_deployment SET updated_at = now(), project_id = {project} WHERE id = {deployment};
             UPDATE main_event SET project_id = {project} WHERE deployment_id = {deployment};
             UPDATE main_occurrence SET project_id = {project} WHERE deployment_id = {deployment};
             UPDATE main_sourceimage SET project_id = {project} WHERE deployment_id = {deployment};
             COMMIT;"
        ),
    }
}

/// Random ingest batches interleaved with random Django edits (published and committed at
/// the same time): after every step, once both have settled, every count equals `verify`.
#[test]
fn random_ingest_and_django_edits_interleaved_keep_every_count_exact() {
    use proptest::prelude::*;
    let cases: u32 = std::env::var("TALLY_FEED_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let config = ProptestConfig { cases, max_shrink_iters: 16, failure_persistence: None, ..ProptestConfig::default() };
    let steps = prop::collection::vec((0..8usize, edit()), 3..10);
    proptest!(config, |(steps in steps)| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(interleave(steps));
    });
}

async fn interleave(steps: Vec<(usize, Edit)>) {
    let mut f = Fixture::new("feed_prop", Flavor::Empty, world(2, 4)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let mut r = f.start(IngestArgs::default()).await;
    let dj = django(&f).await;
    let mut published = 0usize;
    let mut settled = 0usize;
    for (n, edit) in &steps {
        let batch: Vec<(i64, String)> = tasks.iter().skip(published).take(*n).cloned().collect();
        published += batch.len();
        let sql = django_sql(&dj, edit).await;
        let publish = async {
            for (image, reply) in &batch {
                f.publish(job, reply, f.factory.task_result(reply, *image)).await;
            }
        };
        let edit_now = async {
            if !sql.is_empty() {
                dj.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{edit:?}: {sql}: {e}"));
            }
        };
        tokio::join!(publish, edit_now);
        let deadline = Instant::now() + Duration::from_secs(60);
        while settled < published {
            let left = deadline.saturating_duration_since(Instant::now());
            let acked =
                tokio::time::timeout(left, r.acked.recv()).await.expect("results settled").expect("ingest running");
            settled += acked.reply_subjects.len() + acked.dead_lettered;
        }
        drained(&f.store).await;
        let v = verify(&f.store, Scope::default()).await.expect("verify");
        assert!(
            v.differences.is_empty(),
            "after {edit:?} with {} results: {:?}",
            batch.len(),
            &v.differences[..v.differences.len().min(8)]
        );
    }
    r.stop().await;
    f.cleanup().await;
}
