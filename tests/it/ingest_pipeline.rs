//! Ingest's pipeline: a batch is saved while the batch before it commits. These tests drive
//! `Ingestor::prepare` directly so that each interleaving is chosen rather than hoped for, on
//! real Postgres with ADC's smallest real score vectors (2,497 classes), then run the daemon
//! with small batches over replays that land in the batch after their original:
//!
//! - a batch whose reads meet the uncommitted batch (a replay of its image) answers
//!   `Conflict` and writes nothing; a disjoint one is saved beside it and commits after it;
//! - when the batch before fails, the one saved beside it is rolled back and saved again
//!   from a rebuilt engine;
//! - a new taxon created by the committing batch is found, not duplicated, by the next;
//! - in every case the rows are exactly the expected ones, counts equal their SQL
//!   definition, and job progress is exact.

use crate::common;

use std::time::Duration;

use common::ingest::{assert_counts_exact, assert_job_saved_exactly, expected, rows, world, Fixture};
use common::Flavor;
use tally::ingest::batch::{Incoming, Ingestor, Outcome, Prepare, Prepared};
use tally::ingest::daemon::IngestArgs;

/// ADC's smallest real species model.
const SCORE_LEN: usize = 2_497;

fn incoming(f: &Fixture, job: i64, payload: Vec<u8>) -> Incoming {
    Incoming {
        subject: f.subject(job),
        payload: payload.into(),
        headers: None,
        stream_sequence: None,
        delivered: None,
        preset: None,
    }
}

async fn prepare(ingestor: &mut Ingestor, batch: &[Incoming], busy: Option<&Prepared>) -> Prepare {
    let decoded = ingestor.decode(batch);
    ingestor.prepare(batch, &decoded, busy.map(Prepared::footprint)).await.expect("prepare")
}

fn ready(p: Prepare) -> Box<Prepared> {
    match p {
        Prepare::Ready(p) => p,
        Prepare::Conflict => panic!("expected the batch to be saved, got a conflict"),
    }
}

/// Commits `p` in the background a little later, as the daemon's pipeline does: a batch
/// prepared meanwhile reads while `p` is uncommitted, and may wait for its rows (a taxon
/// both create) until it commits.
fn commit_later(p: Box<Prepared>) -> tokio::task::JoinHandle<tally::ingest::save::RowCounts> {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.commit().await.expect("commit").rows
    })
}

async fn commit(ingestor: &mut Ingestor, p: Box<Prepared>) {
    let committed = p.commit().await.expect("commit");
    ingestor.settle(Some(&committed.rows));
}

/// Replaces the label of every classification of a result with `label`.
fn relabel(payload: Vec<u8>, label: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    fn walk(v: &mut serde_json::Value, label: &str) {
        match v {
            serde_json::Value::Object(map) => {
                if map.contains_key("classification") && map.contains_key("scores") {
                    map.insert("classification".into(), label.into());
                }
                map.values_mut().for_each(|v| walk(v, label));
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| walk(v, label)),
            _ => {}
        }
    }
    walk(&mut v, label);
    serde_json::to_vec(&v).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_saved_beside_a_commit_stay_exact() {
    let mut f = Fixture::new("ingest_pipeline", Flavor::Antenna, world(1, 6)).await;
    f.factory.score_len = SCORE_LEN;
    let images = f.world.images.clone();
    assert_eq!(images.len(), 24);
    let (job1, tasks1) = f.job(&images[..12]).await;
    let (job2, tasks2) = f.job(&images[12..]).await;
    let result =
        |f: &Fixture, job: i64, (image, reply): &(i64, String)| incoming(f, job, f.factory.task_result(reply, *image));
    let mut ingestor = f.ingestor().await;

    // A (job 1, images 0–3) is written and not committed.
    let a: Vec<Incoming> = tasks1[0..4].iter().map(|t| result(&f, job1, t)).collect();
    let pa = ready(prepare(&mut ingestor, &a, None).await);
    // B replays image 2 of A: it must not plan against A's uncommitted rows.
    let b: Vec<Incoming> = vec![result(&f, job2, &tasks2[0]), result(&f, job1, &tasks1[2])];
    assert!(matches!(prepare(&mut ingestor, &b, Some(&pa)).await, Prepare::Conflict), "B meets A's footprint");
    // C (job 2, other images) is saved beside A, then commits after it.
    let c: Vec<Incoming> = tasks2[1..5].iter().map(|t| result(&f, job2, t)).collect();
    let busy = pa.footprint().clone();
    let committing = commit_later(pa);
    let decoded = ingestor.decode(&c);
    let pc = ready(ingestor.prepare(&c, &decoded, Some(&busy)).await.expect("prepare C"));
    let rows_a = committing.await.expect("A commits");
    ingestor.settle(Some(&rows_a));
    commit(&mut ingestor, pc).await;
    // Now B goes through, its replay finding A's rows by value.
    let pb = ready(prepare(&mut ingestor, &b, None).await);
    commit(&mut ingestor, pb).await;
    let done: Vec<i64> = [&tasks1[0..4], &tasks2[0..5]].concat().iter().map(|(i, _)| *i).collect();
    assert_eq!(rows(&f.store).await, expected(&f, &done), "A, B (with a replay) and C saved exactly once");
    assert_counts_exact(&f.store).await;

    // D is written, E saved beside it; D's commit fails (rolled back here): E is rolled back
    // too, and both are saved again from a rebuilt engine.
    let d: Vec<Incoming> = tasks1[4..8].iter().map(|t| result(&f, job1, t)).collect();
    let e: Vec<Incoming> = tasks2[5..9].iter().map(|t| result(&f, job2, t)).collect();
    let pd = ready(prepare(&mut ingestor, &d, None).await);
    let busy = pd.footprint().clone();
    let failing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        pd.rollback().await;
    });
    let decoded = ingestor.decode(&e);
    let pe = ready(ingestor.prepare(&e, &decoded, Some(&busy)).await.expect("prepare E"));
    failing.await.expect("D rolled back");
    ingestor.settle(None);
    ingestor.abandon(pe).await;
    assert!(ingestor.is_dirty(), "the engine held D and E, which Postgres never got");
    assert_counts_exact(&f.store).await;
    for batch in [&d, &e] {
        let decoded = ingestor.decode(batch);
        ingestor.process_decoded(batch, &decoded).await.expect("saved again");
    }
    let done: Vec<i64> = [&tasks1[0..8], &tasks2[0..9]].concat().iter().map(|(i, _)| *i).collect();
    assert_eq!(rows(&f.store).await, expected(&f, &done));
    assert_counts_exact(&f.store).await;

    // G creates a taxon; H, saved while G commits, names the same new label on other images:
    // it waits for G's row and reuses it (one taxon, no duplicate key).
    let label = "Pipelinea nova";
    let g: Vec<Incoming> = vec![incoming(&f, job1, relabel(f.factory.task_result(&tasks1[8].1, tasks1[8].0), label))];
    let h: Vec<Incoming> = vec![incoming(&f, job2, relabel(f.factory.task_result(&tasks2[9].1, tasks2[9].0), label))];
    let pg = ready(prepare(&mut ingestor, &g, None).await);
    let busy = pg.footprint().clone();
    let committing = commit_later(pg);
    let decoded = ingestor.decode(&h);
    let ph = match ingestor.prepare(&h, &decoded, Some(&busy)).await.expect("prepare H") {
        Prepare::Ready(p) => p,
        Prepare::Conflict => panic!("H is disjoint from G"),
    };
    let rows_g = committing.await.expect("G");
    ingestor.settle(Some(&rows_g));
    commit(&mut ingestor, ph).await;
    let c = f.store.client().await.expect("client");
    let taxa: i64 = c.query_one("SELECT count(*) FROM main_taxon WHERE name = $1", &[&label]).await.expect("q").get(0);
    assert_eq!(taxa, 1, "one taxon for the label both batches created");
    assert_counts_exact(&f.store).await;
    assert!(!ingestor.is_dirty());
    f.cleanup().await;
}

/// The daemon with batches of 4 over results whose replays come right after their originals
/// (so most land in the batch after, while it commits), with a real-size vector model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_pipeline_saves_replays_exactly() {
    let mut f = Fixture::new("ingest_pipeline_daemon", Flavor::Empty, world(2, 4)).await;
    f.factory.score_len = SCORE_LEN;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let mut published = 0;
    for chunk in tasks.chunks(4) {
        for (image, reply) in chunk {
            assert!(f.publish(job, reply, f.factory.task_result(reply, *image)).await);
            published += 1;
        }
        for (image, reply) in chunk.iter().step_by(2) {
            assert!(f.publish(job, &format!("replay-{reply}"), f.factory.task_result(reply, *image)).await);
            published += 1;
        }
    }
    let args = IngestArgs { batch_size: 4, batch_linger: Duration::ZERO, ..IngestArgs::default() };
    let mut running = f.start(args).await;
    running.wait_for(published, 0, Duration::from_secs(120)).await;
    running.stop().await;
    assert_job_saved_exactly(&f, job, &images, "no duplicate row across pipelined batches").await;
    f.cleanup().await;
}

/// The pipeline's lock check: a transaction waiting for another's row lock is seen as
/// waiting for that one, not the other way round; an unfinished transaction that is dropped
/// releases its locks (its session is closed, not returned to the pool mid-transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waiting_for_the_next_batch_is_seen() {
    use tally::store::transaction::{waits_for, OwnedTransaction};
    let mut f = Fixture::new("ingest_pipeline_locks", Flavor::Antenna, world(1, 1)).await;
    let images = f.world.images.clone();
    let (job, _) = f.job(&images).await;
    let lock = "SELECT 1 FROM jobs_job WHERE id = $1 FOR UPDATE";
    let holder = OwnedTransaction::begin(&f.store).await.expect("begin");
    holder.client().execute(lock, &[&job]).await.expect("lock");
    let waiter = OwnedTransaction::begin(&f.store).await.expect("begin");
    let (h, w) = (holder.backend_pid(), waiter.backend_pid());
    assert!(h > 0 && w > 0 && h != w, "two sessions: {h}, {w}");
    let waiting = tokio::spawn(async move {
        waiter.client().execute(lock, &[&job]).await.expect("lock after the holder");
        waiter.commit().await.expect("commit");
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !waits_for(&f.store, w, h).await {
        assert!(std::time::Instant::now() < deadline, "the waiter never showed as waiting for the holder");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waits_for(&f.store, h, w).await, "the holder waits for nobody");
    drop(holder);
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("a dropped transaction releases its locks")
        .expect("waiter");
    f.cleanup().await;
}

/// A batch whose dead letter writes a job-log line for a job (checked by a deferred foreign
/// key at its COMMIT) commits while the next batch, saved beside it, holds that job's row
/// for its progress: the progress lock (`FOR NO KEY UPDATE`) leaves the check's `KEY SHARE`
/// alone (with `FOR UPDATE` the commit would wait for the next batch, which waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_waits_for_the_job_row_the_next_batch_holds() {
    let mut f = Fixture::new("ingest_pipeline_job_lock", Flavor::Antenna, world(1, 1)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let mut ingestor = f.ingestor().await;
    let rejected = vec![incoming(&f, job, b"not json".to_vec())];
    let (image, reply) = &tasks[0];
    let valid = vec![incoming(&f, job, f.factory.task_result(reply, *image))];
    let pn = ready(prepare(&mut ingestor, &rejected, None).await);
    let pm = ready(prepare(&mut ingestor, &valid, Some(&pn)).await);
    let committed = tokio::time::timeout(Duration::from_secs(10), pn.commit())
        .await
        .expect("the dead letter's batch commits while the next one holds the job row")
        .expect("commit");
    ingestor.settle(Some(&committed.rows));
    commit(&mut ingestor, pm).await;
    let c = f.store.client().await.expect("client");
    let letters: i64 = c.query_one("SELECT count(*) FROM tally.dead_letter", &[]).await.expect("q").get(0);
    assert_eq!(letters, 1);
    assert_eq!(rows(&f.store).await, expected(&f, &images[..1]));
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}

/// The read phase reads for every message of a batch at once, before rules 1 and 2 reject
/// some of them; what it read for the rejected ones must not stay in the snapshot, where it
/// would widen the batch's footprint and be planned against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_keeps_nothing_read_for_rejected_messages() {
    let mut f = Fixture::new("ingest_snapshot", Flavor::Antenna, world(1, 2)).await;
    let images = f.world.images.clone();
    let species = f.world.species.clone();
    let (job1, tasks1) = f.job(&images[0..1]).await;
    let (job2, tasks2) = f.job(&images[1..2]).await;
    let mut ingestor = f.ingestor().await;
    // Image 0 has stored detections, classifications and occurrences.
    let first = vec![incoming(&f, job1, f.factory.task_result(&tasks1[0].1, tasks1[0].0))];
    let decoded = ingestor.decode(&first);
    ingestor.process_decoded(&first, &decoded).await.expect("first result saved");

    // Image 0's result again on an unknown pipeline (rule 1), labelled `species[1]`, in job 1;
    // a good result for image 1, labelled `species[0]`, in job 2.
    let mut unknown: serde_json::Value =
        serde_json::from_slice(&f.factory.task_result(&tasks1[0].1, tasks1[0].0)).expect("json");
    unknown["result"]["pipeline"] = "no-such-pipeline".into();
    let rejected = relabel(serde_json::to_vec(&unknown).expect("json"), &species[1]);
    let good = relabel(f.factory.task_result(&tasks2[0].1, tasks2[0].0), &species[0]);
    let batch = vec![incoming(&f, job1, rejected), incoming(&f, job2, good)];
    let decoded = ingestor.decode(&batch);
    let messages: Vec<&tally::ingest::decode::ResultMessage> =
        decoded.iter().map(|d| d.as_ref().expect("both decode")).collect();
    let c = f.store.client().await.expect("client");
    let snapshot =
        tally::ingest::save::read(&c, &tally_dataflows::Known::default(), &messages).await.expect("read phase");

    assert!(snapshot.pipelines.contains_key(common::ingest::PIPELINE), "the good result's pipeline is read");
    assert!(snapshot.detections.is_empty(), "image 0's detections were read for the rejected result");
    assert!(snapshot.classifications.is_empty() && snapshot.occurrences.is_empty());
    assert_eq!(snapshot.jobs.keys().copied().collect::<Vec<_>>(), vec![job2], "only the accepted result's job");
    let labels: Vec<&String> = snapshot.taxa.keys().collect();
    assert_eq!(labels, vec![&species[0]], "only the accepted result's labels");
    // The same batch saves the good result and dead-letters the other.
    let report = ingestor.process_decoded(&batch, &decoded).await.expect("batch saved");
    assert_eq!(report.outcomes.iter().filter(|o| matches!(o, Outcome::DeadLettered { .. })).count(), 1);
    assert_counts_exact(&f.store).await;
    f.cleanup().await;
}
