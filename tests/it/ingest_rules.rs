//! Ingest rules of SPEC §3 on real NATS and Postgres: Antenna's own bugs stay fixed
//! (misaligned classifications, phantom occurrences, duplicate boxes), taxa are found by name
//! or search name or created, human identifications win, error results mark images failed,
//! and every kind of bad input is dead-lettered without holding up the rest of its batch.

use crate::common;

use std::time::Duration;

use common::ingest::{world, Fixture, PIPELINE};
use common::Flavor;
use serde_json::{json, Value};
use tally::ingest::daemon::IngestArgs;
use tally::store::verify::{self, Scope};

fn detection(image: i64, bbox: Option<[f64; 4]>, classifications: Vec<Value>) -> Value {
    json!({
        "source_image_id": image.to_string(),
        "bbox": bbox.map(|b| json!({"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]})),
        "inference_time": 0.3,
        "algorithm": {"name": "detector", "key": "random-detector"},
        "timestamp": "2024-06-02T01:00:03.120000",
        "crop_image_url": null,
        "classifications": classifications,
    })
}

fn species(label: &str, score: f64) -> Value {
    json!({"classification": label, "labels": null, "scores": [score, 1.0 - score], "logits": null,
           "algorithm": {"name": "species", "key": "random-species-classifier"}, "terminal": true,
           "timestamp": "2024-06-02T01:00:03.260000"})
}

fn result(reply: &str, images: &[i64], detections: Vec<Value>) -> Vec<u8> {
    let images: Vec<Value> =
        images.iter().map(|i| json!({"id": i.to_string(), "url": "https://example.org/x.jpg"})).collect();
    serde_json::to_vec(&json!({"reply_subject": reply, "result": {
        "pipeline": PIPELINE, "algorithms": {}, "total_time": 1.0, "source_images": images,
        "detections": detections, "errors": null}}))
    .expect("json")
}

async fn query_i64(f: &Fixture, sql: &str) -> i64 {
    let c = f.store.client().await.expect("client");
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn assert_exact(f: &Fixture) {
    let v = verify::verify(&f.store, Scope::default()).await.expect("verify");
    assert!(v.differences.is_empty(), "counts differ: {:?}", v.differences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn antenna_s_bugs_stay_fixed() {
    let mut f = Fixture::new("ingest_bugs", Flavor::Empty, world(1, 3)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..4]).await;
    let names = f.world.species.clone();
    let (a, b, c) = (names[0].clone(), names[1].clone(), names[2].clone());
    let (x, y, z) = (tasks[0].0, tasks[1].0, tasks[2].0);
    let mut running = f.start(IngestArgs::default()).await;

    // Misalignment: A first; then a message listing new B before existing A, each with its
    // own classification. Antenna zips reordered detections and swaps them.
    f.publish(
        job,
        "m1",
        result(&tasks[0].1, &[x], vec![detection(x, Some([1.0, 1.0, 5.0, 5.0]), vec![species(&a, 0.9)])]),
    )
    .await;
    running.wait_for(1, 0, Duration::from_secs(30)).await;
    f.publish(
        job,
        "m2",
        result(
            &tasks[0].1,
            &[x],
            vec![
                detection(x, Some([10.0, 10.0, 20.0, 20.0]), vec![species(&b, 0.8)]),
                detection(x, Some([1.0, 1.0, 5.0, 5.0]), vec![species(&c, 0.7)]),
            ],
        ),
    )
    .await;

    // Phantom occurrence: a service-sent null bbox gets no occurrence.
    f.publish(job, "m3", result(&tasks[1].1, &[y], vec![detection(y, None, vec![species(&a, 0.6)])])).await;

    // Duplicate identical boxes inside one message: one detection, one occurrence, and
    // 10 = 10.0 by value.
    let dup = serde_json::to_vec(&json!({"reply_subject": tasks[2].1, "result": {
        "pipeline": PIPELINE, "algorithms": {}, "total_time": 1.0,
        "source_images": [{"id": z.to_string(), "url": "u"}],
        "detections": [
            detection(z, Some([10.0, 20.0, 30.0, 40.0]), vec![species(&a, 0.55)]),
            {"source_image_id": z.to_string(), "bbox": {"x1": 10, "y1": 20, "x2": 30, "y2": 40},
             "algorithm": {"name": "d", "key": "random-detector"}, "classifications": [species(&b, 0.65)]}
        ], "errors": null}}))
    .expect("json");
    f.publish(job, "m4", dup).await;
    running.wait_for(4, 0, Duration::from_secs(30)).await;
    running.stop().await;

    let c_ = f.store.client().await.expect("client");
    let label_of_box = |bbox: &'static str| {
        let c_ = &c_;
        async move {
            let rows = c_
                .query(
                    "SELECT t.name FROM main_detection d JOIN main_classification c ON c.detection_id = d.id
                     JOIN main_taxon t ON t.id = c.taxon_id WHERE d.source_image_id = $1 AND d.bbox = $2::text::jsonb
                     ORDER BY t.name",
                    &[&{ x }, &bbox],
                )
                .await
                .expect("labels");
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
        }
    };
    let mut ac = vec![a.clone(), c.clone()];
    ac.sort();
    assert_eq!(label_of_box("[1.0, 1.0, 5.0, 5.0]").await, ac, "A keeps its own classifications");
    assert_eq!(label_of_box("[10.0, 10.0, 20.0, 20.0]").await, vec![b.clone()], "B gets B's");

    let null_occ = query_i64(
        &f,
        &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {y} AND bbox IS NULL AND occurrence_id IS NULL"),
    )
    .await;
    assert_eq!(null_occ, 1, "the service's null marker has no occurrence");
    assert_eq!(query_i64(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {y}")).await, 1);
    assert_eq!(
        query_i64(&f, &format!("SELECT count(*) FROM main_occurrence o WHERE EXISTS (SELECT 1 FROM main_detection d WHERE d.occurrence_id = o.id AND d.source_image_id = {y})")).await,
        0
    );

    assert_eq!(
        query_i64(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {z}")).await,
        1,
        "one detection for two identical boxes"
    );
    assert_eq!(
        query_i64(&f, &format!("SELECT count(*) FROM main_classification c JOIN main_detection d ON d.id = c.detection_id WHERE d.source_image_id = {z}")).await,
        2,
        "both classifications on the one detection"
    );
    assert_eq!(query_i64(&f, "SELECT count(*) FROM main_occurrence").await, 3, "A, B and the one box of z");
    // Image x's A: terminal c 0.7 vs a 0.9 (both terminal, one algorithm): the top score of the
    // algorithm (a 0.9) stays the determination.
    let det: String = c_
        .query_one(
            "SELECT t.name FROM main_detection d JOIN main_occurrence o ON o.id = d.occurrence_id
             JOIN main_taxon t ON t.id = o.determination_id WHERE d.bbox = '[1.0, 1.0, 5.0, 5.0]'::jsonb",
            &[],
        )
        .await
        .expect("determination")
        .get(0);
    assert_eq!(det, a);
    assert_exact(&f).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taxa_identifications_and_error_results() {
    let mut f = Fixture::new("ingest_taxa", Flavor::Antenna, world(1, 3)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..4]).await;
    let c = f.store.client().await.expect("client");
    c.execute(
        "UPDATE main_taxon SET search_names = ARRAY['Old name']::varchar[] WHERE name = $1",
        &[&f.world.species[3]],
    )
    .await
    .expect("search name");
    let mut running = f.start(IngestArgs::default()).await;
    let (w, x, y) = (tasks[0].0, tasks[1].0, tasks[2].0);
    f.publish(
        job,
        "t1",
        result(
            &tasks[0].1,
            &[w],
            vec![
                detection(w, Some([0.0, 0.0, 9.0, 9.0]), vec![species("Brand new label", 0.9)]),
                detection(w, Some([0.0, 0.0, 8.0, 8.0]), vec![species("Old name", 0.9)]),
            ],
        ),
    )
    .await;
    // An error result: the image is failed for the job, and nothing is written for it.
    let error = serde_json::to_vec(
        &json!({"reply_subject": tasks[1].1, "result": {"error": "download failed", "image_id": x.to_string()}}),
    )
    .expect("json");
    f.publish(job, "t2", error).await;
    running.wait_for(2, 0, Duration::from_secs(30)).await;

    let rank: String =
        c.query_one("SELECT rank FROM main_taxon WHERE name = 'Brand new label'", &[]).await.expect("new taxon").get(0);
    assert_eq!(rank, "UNKNOWN");
    let by_search: i64 = c
        .query_one(
            "SELECT count(*) FROM main_classification cl JOIN main_taxon t ON t.id = cl.taxon_id WHERE t.name = $1",
            &[&f.world.species[3]],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(by_search, 1, "a label found among search_names");
    assert_eq!(query_i64(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {x}")).await, 0);
    let failed: bool = c
        .query_one("SELECT failed FROM tally.job_image WHERE job_id = $1 AND image_id = $2", &[&job, &{ x }])
        .await
        .expect("job image")
        .get(0);
    assert!(failed);

    // A human identification overrides the machine with score 1.0 when a new classification
    // makes Antenna re-run the determination.
    let occ: i64 = c
        .query_one(
            "SELECT occurrence_id FROM main_detection WHERE source_image_id = $1 AND bbox = '[0.0, 0.0, 9.0, 9.0]'::jsonb",
            &[&{ w }],
        )
        .await
        .expect("occ")
        .get(0);
    let human = f.world.species[5].clone();
    c.execute(
        "INSERT INTO main_identification (created_at, updated_at, occurrence_id, taxon_id, withdrawn, comment)
         SELECT now(), now(), $1, id, false, '' FROM main_taxon WHERE name = $2",
        &[&occ, &human],
    )
    .await
    .expect("identification");
    f.publish(
        job,
        "t3",
        result(
            &tasks[0].1,
            &[w],
            vec![detection(w, Some([0.0, 0.0, 9.0, 9.0]), vec![species(&f.world.species[6], 0.99)])],
        ),
    )
    .await;
    running.wait_for(3, 0, Duration::from_secs(30)).await;
    let (name, score): (String, f64) = c
        .query_one(
            "SELECT t.name, o.determination_score FROM main_occurrence o JOIN main_taxon t ON t.id = o.determination_id WHERE o.id = $1",
            &[&occ],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("determination");
    assert_eq!((name, score), (human, 1.0));
    // Image y got no result yet: a result with no detections gives it a null marker only.
    f.publish(job, "t4", result(&tasks[2].1, &[y], vec![])).await;
    running.wait_for(4, 0, Duration::from_secs(30)).await;
    running.stop().await;
    assert_eq!(
        query_i64(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {y} AND bbox IS NULL AND occurrence_id IS NULL")).await,
        1
    );
    assert_exact(&f).await;
    f.cleanup().await;
}

/// Rule 4's lookup: an active taxon's name wins over any search name; among search names, the
/// lowest id; an inactive taxon's search names are passed over, and its name reaches its row
/// only through the unknown-label insert (names are unique). Labels of both kinds share one
/// batch, so the name lookup and the search-name lookup of the unmatched labels run together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_find_names_before_search_names() {
    let mut f = Fixture::new("ingest_taxa_order", Flavor::Antenna, world(1, 3)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..1]).await;
    let sp = f.world.species.clone();
    let c = f.store.client().await.expect("client");
    let id_of = |name: String| {
        let c = &c;
        async move {
            c.query_one("SELECT id FROM main_taxon WHERE name = $1", &[&name]).await.expect("taxon").get::<_, i64>(0)
        }
    };
    let (named, shadow, low, high, inactive) = (
        id_of(sp[1].clone()).await,
        id_of(sp[2].clone()).await,
        id_of(sp[3].clone()).await,
        id_of(sp[4].clone()).await,
        id_of(sp[0].clone()).await,
    );
    assert!(inactive < low && low < high, "the world's species are created in order");
    // sp[1] is also a search name of sp[2]: the name must win.
    // "Shared alias" is a search name of sp[3] and sp[4]: the lower id must win.
    // sp[0] is inactive, with "Dormant alias" among its search names; sp[3], a higher id, has
    // it too and must win.
    for (id, names) in [
        (shadow, vec![sp[1].clone()]),
        (low, vec!["Shared alias".into(), "Dormant alias".into()]),
        (high, vec!["Shared alias".into()]),
        (inactive, vec!["Dormant alias".into()]),
    ] {
        c.execute("UPDATE main_taxon SET search_names = $2::text[]::varchar[] WHERE id = $1", &[&id, &names])
            .await
            .expect("search names");
    }
    c.execute("UPDATE main_taxon SET active = false WHERE id = $1", &[&inactive]).await.expect("inactive");
    let mut running = f.start(IngestArgs::default()).await;
    let w = tasks[0].0;
    let labels = [sp[1].clone(), "Shared alias".to_string(), sp[0].clone(), "Dormant alias".to_string()];
    let detections = labels
        .iter()
        .enumerate()
        .map(|(i, l)| detection(w, Some([0.0, 0.0, 10.0 + i as f64, 10.0]), vec![species(l, 0.9)]))
        .collect();
    f.publish(job, "t1", result(&tasks[0].1, &[w], detections)).await;
    running.wait_for(1, 0, Duration::from_secs(30)).await;
    running.stop().await;
    let taxon_of_box = |x2: f64| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT cl.taxon_id FROM main_classification cl JOIN main_detection d ON d.id = cl.detection_id
                 WHERE d.source_image_id = $1 AND d.bbox = jsonb_build_array(0.0, 0.0, $2::float8, 10.0)",
                &[&w, &x2],
            )
            .await
            .expect("classification")
            .get::<_, i64>(0)
        }
    };
    assert_eq!(taxon_of_box(10.0).await, named, "a name wins over another taxon's search name");
    assert_eq!(taxon_of_box(11.0).await, low, "among search names, the lowest id");
    // Not found among active taxa, the label is created as a new taxon; names are unique, so
    // that insert resolves to the inactive row, which stays as it was.
    assert_eq!(taxon_of_box(12.0).await, inactive, "an inactive taxon's name: the unknown-label insert finds its row");
    let (rank, active): (String, bool) = c
        .query_one("SELECT rank, active FROM main_taxon WHERE id = $1", &[&inactive])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("rank");
    assert!(rank != "UNKNOWN" && !active, "the inactive taxon is left as it was");
    assert_eq!(taxon_of_box(13.0).await, low, "an inactive taxon's search name is not a match");
    assert_exact(&f).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_the_rest_of_the_batch_is_saved() {
    let mut f = Fixture::new("ingest_bad", Flavor::Empty, world(1, 10)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..16]).await;
    let (other_job, other_tasks) = f.job(&images[16..17]).await;
    let c = f.store.client().await.expect("client");
    c.execute("INSERT INTO ml_algorithm (created_at, updated_at, name, key, description, version, task_type) VALUES (now(), now(), 'stray', 'stray', '', 1, 'classification')", &[])
        .await
        .expect("stray algorithm");

    let good = |k: usize| f.factory.task_result(&tasks[k].1, tasks[k].0);
    let with = |k: usize, edit: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&good(k)).expect("json");
        edit(&mut v);
        serde_json::to_vec(&v).expect("json")
    };
    let one_detection = |v: &mut Value| {
        let img = v["result"]["source_images"][0]["id"].clone();
        v["result"]["detections"] = json!([detection(
            img.as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
            Some([1.0, 1.0, 2.0, 2.0]),
            vec![species("Moth", 0.9)]
        )]);
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{\"reply_subject\": ".to_vec()),
        (
            "invalid_json",
            String::from_utf8_lossy(&good(1)).replacen("\"total_time\":2.4", "\"total_time\":NaN", 1).into_bytes(),
        ),
        ("wrong_shape", with(2, &|v| v["result"] = json!({"something": "else"}))),
        ("unknown_pipeline", with(3, &|v| v["result"]["pipeline"] = json!("no-such-pipeline"))),
        (
            "pipeline_not_configured",
            with(4, &|v| {
                one_detection(v);
                v["result"]["detections"][0]["classifications"][0]["algorithm"]["key"] = json!("stray");
            }),
        ),
        ("unknown_image", with(5, &|v| v["result"]["source_images"][0]["id"] = json!("987654321"))),
        (
            "bad_bbox",
            with(6, &|v| {
                one_detection(v);
                v["result"]["detections"][0]["bbox"] = json!({"x1": 9, "y1": 1, "x2": 2, "y2": 5});
            }),
        ),
        (
            "bad_scores",
            with(7, &|v| {
                one_detection(v);
                v["result"]["detections"][0]["classifications"][0]["scores"] = json!([]);
            }),
        ),
        (
            "bad_scores",
            with(8, &|v| {
                one_detection(v);
                v["result"]["detections"][0]["classifications"][0]["scores"] = json!([0.5, null]);
            }),
        ),
        (
            "text_too_long",
            with(9, &|v| {
                one_detection(v);
                v["result"]["detections"][0]["classifications"][0]["classification"] = json!("x".repeat(256));
            }),
        ),
        ("foreign_reply_subject", with(10, &|v| v["reply_subject"] = json!(other_tasks[0].1.clone()))),
        ("oversized", with(11, &|v| v["padding"] = json!("p".repeat(300_000)))),
    ];
    // Bad and good messages interleaved, all published before ingest starts so that they share
    // batches.
    let mut goods = 0;
    for (n, (_, payload)) in cases.iter().enumerate() {
        f.publish(job, &format!("bad-{n}"), payload.clone()).await;
        f.publish(job, &format!("good-{n}"), good(12 + n % 4)).await;
        goods += 1;
    }
    let args = IngestArgs { max_result_bytes: 200_000, ..IngestArgs::default() };
    let mut running = f.start(args).await;
    running.wait_for(goods, cases.len(), Duration::from_secs(60)).await;
    // Nothing is redelivered: wait past a redelivery chance and look again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;

    let rows = c
        .query("SELECT reason_code, payload, job_id, reply_subject FROM tally.dead_letter ORDER BY id", &[])
        .await
        .expect("dead letters");
    let mut got: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let mut want: Vec<String> = cases.iter().map(|(c, _)| c.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "one dead letter per bad message, with the right reason");
    for r in &rows {
        let payload: Vec<u8> = r.get(1);
        assert!(cases.iter().any(|(_, p)| *p == payload), "payload stored whole");
        assert_eq!(r.get::<_, Option<i64>>(2), Some(job));
    }
    let logs =
        query_i64(&f, &format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND level = 'ERROR'")).await;
    assert_eq!(logs, cases.len() as i64, "each rejection is in the job log");
    assert_eq!(f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await, (0, 0), "all acked or terminated");
    // The good ones were saved.
    for (image, _) in &tasks[12..16] {
        let sql = format!("SELECT count(*) FROM main_detection WHERE source_image_id = {image}");
        assert!(query_i64(&f, &sql).await > 0);
    }
    // The foreign reply subject's task (another job's) was not acked by the rejected result.
    assert_eq!(f.consumer_state(&format!("job_{other_job}"), &format!("job-{other_job}-consumer")).await.1, 1);
    assert_exact(&f).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_finished_jobs_are_saved_and_progress_is_untouched() {
    let mut f = Fixture::new("ingest_finished", Flavor::Empty, world(1, 2)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images[0..2]).await;
    let c = f.store.client().await.expect("client");
    c.execute("UPDATE jobs_job SET status = 'REVOKED' WHERE id = $1", &[&job]).await.expect("cancel");
    let mut running = f.start(IngestArgs::default()).await;
    f.publish(job, "late", f.factory.task_result(&tasks[0].1, tasks[0].0)).await;
    running.wait_for(1, 0, Duration::from_secs(30)).await;
    running.stop().await;
    assert!(
        query_i64(&f, &format!("SELECT count(*) FROM main_detection WHERE source_image_id = {}", tasks[0].0)).await > 0
    );
    assert_eq!(query_i64(&f, "SELECT count(*) FROM tally.job_image").await, 0, "progress untouched");
    let status: String = c.query_one("SELECT status FROM jobs_job WHERE id = $1", &[&job]).await.expect("job").get(0);
    assert_eq!(status, "REVOKED", "never resurrected");
    assert_eq!(
        query_i64(&f, &format!("SELECT count(*) FROM jobs_joblog WHERE job_id = {job} AND level = 'WARNING'")).await,
        1
    );
    assert_exact(&f).await;
    f.cleanup().await;
}
