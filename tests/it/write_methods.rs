//! The two ways ingest sends new rows to Postgres (`--write-method copy`, binary `COPY`, and
//! `--write-method unnest`, `INSERT … SELECT FROM UNNEST`) store the same rows: the same
//! batches, with ADC's smallest real score vectors (2,497 classes) and every optional field
//! both present and absent, are saved into two databases seeded alike, one per method, and
//! every column of every new occurrence, detection and classification is compared, save the
//! wall-clock `created_at`/`updated_at` (which must still be each transaction's `now()`).

use crate::common;

use common::ingest::{assert_counts_exact, world, Fixture};
use common::Flavor;
use serde_json::{json, Value};
use tally::ingest::batch::Incoming;
use tally::ingest::save::WriteMethod;

/// ADC's smallest real species model.
const SCORE_LEN: usize = 2_497;

/// The batches: results for images 0–7, each with one variation, then replays and more.
fn batches(f: &Fixture, job: i64, tasks: &[(i64, String)]) -> Vec<Vec<Incoming>> {
    let result = |k: usize, edit: &dyn Fn(&mut Value)| {
        let (image, reply) = &tasks[k];
        let mut v: Value = serde_json::from_slice(&f.factory.task_result(reply, *image)).expect("json");
        edit(&mut v["result"]);
        Incoming {
            subject: f.subject(job),
            payload: serde_json::to_vec(&v).expect("json").into(),
            headers: None,
            stream_sequence: None,
            delivered: None,
            preset: None,
        }
    };
    let each_detection = |r: &mut Value, edit: &dyn Fn(&mut Value)| {
        r["detections"].as_array_mut().expect("detections").iter_mut().for_each(edit)
    };
    let first = vec![
        // As generated: naive timestamps (the session's zone), logits, no crop.
        result(0, &|_| {}),
        // Timestamps with offsets, and one in UTC.
        result(1, &|r| {
            each_detection(r, &|d| {
                d["timestamp"] = json!("2024-06-02T03:00:03.5+02:00");
                d["classifications"][1]["timestamp"] = json!("2024-06-02T01:00:04Z");
            })
        }),
        // No timestamps: the classification's is the transaction's now(), the detection's NULL.
        result(2, &|r| {
            each_detection(r, &|d| {
                d.as_object_mut().expect("detection").remove("timestamp");
                for c in d["classifications"].as_array_mut().expect("classifications") {
                    c["timestamp"] = Value::Null;
                }
            })
        }),
        // No logits, and a crop path.
        result(3, &|r| {
            each_detection(r, &|d| {
                d["crop_image_url"] = json!("https://example.org/crops/c.jpg");
                for c in d["classifications"].as_array_mut().expect("classifications") {
                    c["logits"] = Value::Null;
                }
            })
        }),
        // A label no taxon has: a new taxon, the occurrence determined by it.
        result(4, &|r| each_detection(r, &|d| d["classifications"][1]["classification"] = json!("Genus novum"))),
        // Nothing found: a null marker.
        result(5, &|r| r["detections"] = json!([])),
        // The service's own null marker (no bbox).
        result(6, &|r| {
            each_detection(r, &|d| d["bbox"] = Value::Null);
        }),
    ];
    // Replays (found by value, nothing new), a new image, and a second detector run on image
    // 0 with new boxes.
    let second = vec![
        result(0, &|_| {}),
        result(3, &|_| {}),
        result(7, &|_| {}),
        result(0, &|r| {
            each_detection(r, &|d| {
                d["bbox"]["x1"] = json!(d["bbox"]["x1"].as_f64().unwrap_or(0.0) + 1.0);
            })
        }),
    ];
    vec![first, second]
}

/// Saves the batches into a fresh database with `method`; returns the fixture.
async fn saved_with(method: WriteMethod, label: &str) -> Fixture {
    let mut f = Fixture::new(label, Flavor::Antenna, world(1, 2)).await;
    f.factory.score_len = SCORE_LEN;
    f.factory.mean_detections = 6.0;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let mut ingestor = f.ingestor().await;
    ingestor.set_write_method(method);
    for batch in batches(&f, job, &tasks) {
        let report = ingestor.process(&batch).await.expect("batch saved");
        assert!(report.rows.detections + report.rows.null_markers > 0, "{method:?}: the batch inserted rows");
    }
    assert_counts_exact(&f.store).await;
    f
}

/// Every row of `table`, each column as JSON, without `created_at` and `updated_at`, and a
/// classification's `timestamp` shown as `now()` where it is its transaction's.
async fn table(f: &Fixture, table: &str) -> Vec<Value> {
    let c = f.store.client().await.expect("client");
    let now = if table == "main_classification" {
        r#"|| CASE WHEN t."timestamp" = t.created_at THEN '{"timestamp": "now()"}'::jsonb ELSE '{}' END"#
    } else {
        ""
    };
    c.query(&format!("SELECT (to_jsonb(t) - 'created_at' - 'updated_at') {now} FROM {table} t ORDER BY id"), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One number.
async fn one(f: &Fixture, sql: &str) -> i64 {
    f.store.client().await.expect("client").query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_unnest_store_the_same_rows() {
    let copy = saved_with(WriteMethod::Copy, "write_copy").await;
    let unnest = saved_with(WriteMethod::Unnest, "write_unnest").await;
    for name in ["main_occurrence", "main_detection", "main_classification", "main_taxon"] {
        let (a, b) = (table(&copy, name).await, table(&unnest, name).await);
        assert!(!a.is_empty(), "{name} has rows");
        assert_eq!(a.len(), b.len(), "{name}: as many rows either way");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "{name}: the same row either way");
        }
    }
    for f in [&copy, &unnest] {
        // The variations all made it in.
        assert!(one(f, "SELECT count(*) FROM main_classification WHERE cardinality(scores) = 2497").await > 0);
        assert!(one(f, "SELECT count(*) FROM main_classification WHERE logits IS NULL").await > 0);
        assert!(one(f, "SELECT count(*) FROM main_detection WHERE bbox IS NULL").await >= 2);
        assert!(one(f, "SELECT count(*) FROM main_detection WHERE path LIKE 'https://%'").await > 0);
        assert!(
            one(f, "SELECT count(*) FROM main_detection WHERE detection_time IS NULL AND bbox IS NOT NULL").await > 0
        );
        assert!(one(f, "SELECT count(*) FROM main_taxon WHERE name = 'Genus novum'").await == 1);
        // Detections carry their image's timestamp.
        assert_eq!(
            one(
                f,
                "SELECT count(*) FROM main_detection d JOIN main_sourceimage s ON s.id = d.source_image_id
                 WHERE d.\"timestamp\" IS DISTINCT FROM s.\"timestamp\""
            )
            .await,
            0
        );
        // created_at = updated_at = the transaction's now(), one per batch; a classification
        // sent without a timestamp has that one.
        for t in ["main_occurrence", "main_detection", "main_classification"] {
            assert_eq!(one(f, &format!("SELECT count(*) FROM {t} WHERE created_at <> updated_at")).await, 0);
            assert_eq!(one(f, &format!("SELECT count(DISTINCT created_at) FROM {t}")).await, 2, "{t}");
        }
        assert!(one(f, "SELECT count(*) FROM main_classification WHERE \"timestamp\" = created_at").await > 0);
        // The offset was honoured (03:00:03.5+02 is 01:00:03.5 UTC).
        assert!(
            one(f, "SELECT count(*) FROM main_detection WHERE detection_time = '2024-06-02T01:00:03.5Z'::timestamptz")
                .await
                > 0
        );
    }
    copy.cleanup().await;
    unnest.cleanup().await;
}

/// Every score and logit is stored bit for bit as sent, with either method: ADC's vectors
/// are 17-digit numbers, which `serde_json`'s own number parsing read one unit in the last
/// place off about a third of the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_are_stored_bit_for_bit() {
    for method in [WriteMethod::Copy, WriteMethod::Unnest] {
        let mut f = Fixture::new("write_exact", Flavor::Antenna, world(1, 1)).await;
        f.factory.score_len = SCORE_LEN;
        f.factory.mean_detections = 4.0;
        let images = f.world.images.clone();
        let (job, tasks) = f.job(&images).await;
        let mut ingestor = f.ingestor().await;
        ingestor.set_write_method(method);
        // Exactly the numbers the factory made (never parsed), as bits.
        let mut sent: Vec<Vec<u64>> = Vec::new();
        let mut batch = Vec::new();
        for (image, reply) in &tasks {
            let response = f.factory.response(*image);
            for d in response["detections"].as_array().expect("detections") {
                for c in d["classifications"].as_array().expect("classifications") {
                    for vector in [&c["scores"], &c["logits"]] {
                        let v = vector.as_array().expect("numbers");
                        sent.push(v.iter().map(|x| x.as_f64().expect("a number").to_bits()).collect());
                    }
                }
            }
            batch.push(Incoming {
                subject: f.subject(job),
                payload: f.factory.task_result(reply, *image).into(),
                headers: None,
                stream_sequence: None,
                delivered: None,
                preset: None,
            });
        }
        assert!(sent.iter().any(|v| v.len() == SCORE_LEN), "the world's results have detections");
        ingestor.process(&batch).await.expect("batch saved");
        let c = f.store.client().await.expect("client");
        let mut stored: Vec<Vec<u64>> = Vec::new();
        for r in c.query("SELECT scores, logits FROM main_classification", &[]).await.expect("rows") {
            for i in 0..2 {
                let v: Vec<f64> = r.get(i);
                stored.push(v.iter().map(|x| x.to_bits()).collect());
            }
        }
        sent.sort_unstable();
        stored.sort_unstable();
        assert_eq!(stored.len(), sent.len(), "{method:?}: a row per classification sent");
        assert!(stored == sent, "{method:?}: every score and logit stored as sent, bit for bit");
        f.cleanup().await;
    }
}
