//! `tally serve` as a timely cluster of two OS processes on loopback (SPEC §7): process 0
//! ingests from NATS and writes Postgres, process 1 holds half of the dataflow's state. Then
//! process 1 is killed: idle process 0 notices within seconds (`/readyz` 503), and results
//! published meanwhile are not written; once process 1 is started again, process 0 rebuilds
//! from Postgres and ingests the rest.
//! In the end every count equals its SQL definition, nothing is lost or duplicated, and SIGTERM
//! stops both processes cleanly, and a peer or a process 0 still waiting for the other as well.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ingest::{assert_counts_exact, expected, rows, world, Fixture};
use common::Flavor;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// One `tally serve` process of the cluster, its stderr appended to `log`.
fn serve(process: usize, hostfile: &Path, extra: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "-n", "2", "-p", &process.to_string(), "-w", "2"])
        .arg("-h")
        .arg(hostfile)
        .args(extra)
        .env("TALLY_LOG", "info,tally=debug")
        // timely reports its connection attempts on stdout.
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tally serve")
}

fn terminate(mut child: Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not stop within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn saved_images(f: &Fixture) -> i64 {
    match f.store.client().await {
        Ok(c) => c.query_one("SELECT count(*) FROM tally.job_image", &[]).await.map(|r| r.get(0)).unwrap_or(-1),
        Err(_) => -1,
    }
}

async fn readyz(port: u16) -> Option<u16> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_as_two_processes_ingests_exactly_and_survives_losing_one() {
    let mut f = Fixture::new("cluster", Flavor::Empty, world(2, 6)).await;
    let images = f.world.images.clone();
    let (job, tasks) = f.job(&images).await;
    let results: Vec<(String, Vec<u8>)> =
        tasks.iter().map(|(image, reply)| (reply.clone(), f.factory.task_result(reply, *image))).collect();
    let thirds = results.len() / 3;

    let dir = std::env::temp_dir().join(format!("tally-cluster-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let hostfile = dir.join("hosts");
    let addresses = tally_dataflows::engine::loopback_addresses(2).expect("loopback ports");
    std::fs::write(&hostfile, format!("{}\n", addresses.join("\n"))).expect("hostfile");
    let log = dir.join("serve.log");
    let listen = free_port();
    let leader_args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--database-url",
        &f.db.as_ref().expect("shared server database").url,
        "--nats-url",
        &f.nats_args.nats_url,
        "--results-stream",
        &f.nats_args.results_stream,
        "--results-subject-prefix",
        &f.nats_args.results_subject_prefix,
        "--ack-wait",
        "2",
        "--nak-delay",
        "1",
        "--batch-size",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // 1. A third published before the cluster exists, a third while it runs.
    for (reply, payload) in &results[..thirds] {
        assert!(f.publish(job, reply, payload.clone()).await);
    }
    let peer = serve(1, &hostfile, &[], &log);
    let leader = serve(0, &hostfile, &leader_args, &log);
    for (reply, payload) in &results[thirds..2 * thirds] {
        assert!(f.publish(job, reply, payload.clone()).await);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while saved_images(&f).await != 2 * thirds as i64 {
        assert!(Instant::now() < deadline, "two thirds not saved by the cluster\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(listen).await, Some(200), "ready while the cluster is whole\n{}", tail(&log));
    assert_counts_exact(&f.store).await;

    // 2. Process 1 is lost: idle process 0 notices it by itself (not ready); the results
    // published meanwhile cannot be counted, so nothing of them is written.
    let mut peer = peer;
    peer.kill().expect("kill process 1");
    peer.wait().expect("reap process 1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(listen).await != Some(503) {
        assert!(Instant::now() < deadline, "/readyz never reported the lost process\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (reply, payload) in &results[2 * thirds..] {
        assert!(f.publish(job, reply, payload.clone()).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(readyz(listen).await, Some(503), "not ready while process 1 is gone\n{}", tail(&log));
    assert_eq!(saved_images(&f).await, 2 * thirds as i64, "no batch committed without its counts");
    assert_counts_exact(&f.store).await;

    // 3. Process 1 comes back: the cluster forms again, process 0 rebuilds and drains.
    let peer = serve(1, &hostfile, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let state = f.consumer_state(&f.nats_args.results_stream, "tally-ingest").await;
        if state == (0, 0) && saved_images(&f).await == images.len() as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "not drained after process 1 came back: {state:?}\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(readyz(listen).await, Some(200), "ready again\n{}", tail(&log));

    assert_eq!(rows(&f.store).await, expected(&f, &images), "no lost result, no duplicate row");
    assert_counts_exact(&f.store).await;
    let leader_status = tokio::task::block_in_place(|| terminate(leader, "process 0"));
    assert!(leader_status.success(), "SIGTERM ends process 0 with success, got {leader_status}\n{}", tail(&log));
    let peer_status = tokio::task::block_in_place(|| terminate(peer, "process 1"));
    assert!(peer_status.success(), "SIGTERM ends process 1 with success, got {peer_status}\n{}", tail(&log));
    // A peer still waiting for process 0 stops on SIGTERM too (timely would wait forever),
    // and so does a process 0 still waiting for its peer (not ready meanwhile).
    let lonely = serve(1, &hostfile, &[], &log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lonely_status = tokio::task::block_in_place(|| terminate(lonely, "a peer waiting for process 0"));
    assert!(lonely_status.success(), "SIGTERM ends a waiting peer with success, got {lonely_status}\n{}", tail(&log));
    let lonely = serve(0, &hostfile, &leader_args, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = match reqwest::get(format!("http://127.0.0.1:{listen}/readyz")).await {
            Ok(r) if r.status().as_u16() == 503 => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        if body.contains("waiting for the dataflow cluster") {
            break;
        }
        assert!(Instant::now() < deadline, "process 0 alone never said it waits for the cluster\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lonely_status = tokio::task::block_in_place(|| terminate(lonely, "a process 0 waiting for its peer"));
    assert!(
        lonely_status.success(),
        "SIGTERM ends a waiting process 0 with success, got {lonely_status}\n{}",
        tail(&log)
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("dataflow peer: holding state"), "process 1 ran as a peer");
    assert!(text.matches("dataflow state rebuilt").count() >= 2, "process 0 rebuilt after the loss\n{}", tail(&log));
    std::fs::remove_dir_all(&dir).ok();
    f.cleanup().await;
}
