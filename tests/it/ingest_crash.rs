//! Crash safety (SPEC §6) with the real daemon binary on private Postgres and NATS servers:
//! `tally serve` is killed with SIGKILL at random points while results are being published
//! (five times), Postgres and NATS are restarted mid-stream, while batches of 4 are saved
//! beside the commit of the batch before (the pipeline) and replays meet their originals'
//! batches still committing; and in the end no result is lost,
//! no row is duplicated, every count equals its SQL definition, every result and task is
//! acked, and SIGTERM stops the daemon cleanly.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ingest::{assert_counts_exact, expected, job_progress, rows, Fixture};
use common::services::{PrivateNats, PrivatePostgres};
use rand::{Rng, SeedableRng};
use tally::config::DbArgs;
use tally_tools::synth::results::WorldConfig;

struct Daemon {
    child: Child,
}

fn serve(f: &Fixture, db_url: &str, log: &std::path::Path) -> Daemon {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--ack-wait", "2", "--batch-size", "4", "--nak-delay", "1"])
        .args(["--database-url", db_url])
        .args(["--nats-url", &f.nats_args.nats_url])
        .args(["--results-stream", &f.nats_args.results_stream])
        .args(["--results-subject-prefix", &f.nats_args.results_subject_prefix])
        .args(["--connect-attempts", "60", "--connect-backoff-ms", "100"])
        .env("TALLY_LOG", "info,tally=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tally serve");
    Daemon { child }
}

impl Daemon {
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "tally serve did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_result_is_lost_or_duplicated_across_crashes_and_restarts() {
    let pg = Arc::new(tokio::task::block_in_place(PrivatePostgres::start));
    let nats = Arc::new(tokio::task::block_in_place(PrivateNats::start));
    tokio::task::block_in_place(|| pg.create_database("crash"));
    let db_url = pg.url("crash");
    let store = tally::store::connect(&DbArgs::for_url(&db_url)).await.expect("connect");
    tally::store::migrate::migrate(&store).await.expect("migrate");
    let config =
        WorldConfig { projects: 2, deployments_per_project: 2, events_per_deployment: 2, images_per_event: 40 };
    let mut f = Fixture::on(None, store, &nats.url(), config).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let log = pg.dir().join("tally-serve.log");

    // Publish in the background in bursts (8 results, then replays of half the previous
    // burst's, under new message ids), retrying while NATS is down. With batches of 4, each
    // burst is several batches, each saved while the one before it commits (the pipeline),
    // and a replay often meets its original's batch still committing.
    let publisher = {
        let js = f.js.clone();
        let subject = f.subject(job);
        let payloads: Vec<(String, Vec<u8>)> =
            tasks.iter().map(|(image, reply)| (reply.clone(), f.factory.task_result(reply, *image))).collect();
        tokio::spawn(async move {
            let bursts: Vec<&[(String, Vec<u8>)]> = payloads.chunks(8).collect();
            for (k, burst) in bursts.iter().enumerate() {
                let replays = k.checked_sub(1).map(|p| bursts[p]).unwrap_or_default();
                let sends = burst
                    .iter()
                    .map(|(reply, payload)| (reply.clone(), payload))
                    .chain(replays.iter().step_by(2).map(|(reply, payload)| (format!("replay-{reply}"), payload)));
                for (msg_id, payload) in sends {
                    loop {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", msg_id.as_str());
                        let sent = match js.publish_with_headers(subject.clone(), headers, payload.clone().into()).await
                        {
                            Ok(ack) => tokio::time::timeout(Duration::from_secs(2), ack).await.is_ok_and(|a| a.is_ok()),
                            Err(_) => false,
                        };
                        if sent {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };

    // Seven disruptions while the publisher runs (~7 s): five SIGKILLs of the daemon, a crash
    // restart of Postgres and a restart of NATS, in between.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let mut daemon = serve(&f, &db_url, &log);
    for step in 0..7 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1100))).await;
        match step {
            2 => {
                eprintln!("crash-restarting Postgres mid-stream");
                let p = Arc::clone(&pg);
                tokio::task::spawn_blocking(move || p.crash_restart()).await.expect("postgres restart");
            }
            4 => {
                eprintln!("restarting NATS mid-stream");
                let n = Arc::clone(&nats);
                tokio::task::spawn_blocking(move || n.restart()).await.expect("nats restart");
            }
            _ => {
                daemon.kill9();
                eprintln!("step {step}: killed tally serve with SIGKILL");
                daemon = serve(&f, &db_url, &log);
            }
        }
    }
    publisher.await.expect("publisher");

    // Everything is eventually saved and acked.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await;
        let saved: i64 = match f.store.client().await {
            Ok(c) => c.query_one("SELECT count(*) FROM tally.job_image", &[]).await.map(|r| r.get(0)).unwrap_or(-1),
            Err(_) => -1,
        };
        if state == (0, 0) && saved == images.len() as i64 {
            break;
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String =
                tail.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!(
                "not drained: consumer {state:?}, {saved} of {} images saved\n--- tally serve log ---\n{tail}",
                images.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = tokio::task::block_in_place(|| daemon.terminate());
    assert!(status.success(), "SIGTERM ends tally serve with success, got {status}");

    assert_eq!(rows(&f.store).await, expected(&f, &images), "no lost result, no duplicate row");
    assert_counts_exact(&f.store).await;
    let e = expected(&f, &images);
    assert_eq!(
        job_progress(&f.store, job).await,
        ("SUCCESS".to_string(), images.len() as i64, 0, e.detections, e.classifications),
        "job progress exact across crashes and redeliveries"
    );
    assert_eq!(
        f.consumer_state(&format!("job_{job}"), &format!("job-{job}-consumer")).await,
        (0, 0),
        "every task acked"
    );
    let dead: i64 = f
        .store
        .client()
        .await
        .expect("client")
        .query_one("SELECT count(*) FROM tally.dead_letter", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(dead, 0);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    eprintln!(
        "daemon log: {} starts, {} committed batches, {} batches NAKed, {} pull-stream rebuilds, {} dataflow rebuilds",
        lines("rebuilding") + lines("dataflow state rebuilt"),
        lines("committed batch"),
        lines("batch not saved"),
        lines("rebuilding it"),
        lines("dataflow state rebuilt"),
    );
    eprintln!(
        "daemon log: {} batches saved while the batch before committed",
        lines("batch saved while the batch before")
    );
    assert!(lines("committed batch") > 6, "the daemon committed batches between crashes");
    assert!(lines("batch saved while the batch before") > 0, "the pipelined path ran between the crashes");
    assert!(log.contains("ingest stopped"), "graceful shutdown logged");
    f.cleanup().await;
}
