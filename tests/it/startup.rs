//! `tally serve` at start-up, through the binary: Postgres and NATS are waited for the same
//! way (retried with backoff, `/readyz` 503 saying what is missing, `/healthz` 200) until
//! `--startup-deadline`, past which serve exits non-zero naming the service; SIGTERM while
//! waiting exits 0. NATS comes late from a private `nats-server` on a free port; Postgres is
//! the test server (`TALLY_TEST_DATABASE_URL`).

use crate::common;
use crate::gateway::client;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Flavor, TestDb};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// A loopback port nothing listens on (now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("address").port()
}

/// `GET path` → (status, body); `None` while nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    let r = client::get(addr, path).await;
    Some((r.status, r.body))
}

/// `tally serve` with `args`, its HTTP side on a free port.
fn start_serve(args: &[&str], database_url: &str, nats_url: &str) -> (Child, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("serve")
        .args(["--listen", &listen.to_string(), "--database-url", database_url, "--nats-url", nats_url])
        .args(["--nats-connect-timeout", "2"])
        .args(args)
        .env("TALLY_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tally serve");
    (child, listen)
}

/// Waits until `/readyz` answers `status` with a body containing `needle`.
async fn until_readyz(addr: SocketAddr, status: u16, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some((s, body)) = get(addr, "/readyz").await {
            if s == status && body.contains(needle) {
                return body;
            }
            last = Some((s, body));
        }
        assert!(Instant::now() < deadline, "/readyz not {status} with {needle:?} within {within:?}; last: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGTERM and returns the exit status (within `within`).
async fn terminate(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    tokio::time::timeout(within, child.wait()).await.expect("exits promptly on SIGTERM").expect("wait")
}

/// Everything the child wrote on stderr (after it exited).
async fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text).await;
    }
    text
}

/// A private JetStream server on `port`, storing under a fresh directory.
struct NatsServer {
    child: Child,
    dir: std::path::PathBuf,
}

impl NatsServer {
    fn start(port: u16) -> NatsServer {
        let dir = std::env::temp_dir().join(format!("tally-startup-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("store directory");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("nats-server is required for this test and could not be started: {e}"));
        NatsServer { child, dir }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_nats_not_ready_meanwhile_and_becomes_ready_when_it_comes() {
    let (db, _store) = TestDb::new("startup_late_nats", Flavor::Empty).await;
    let port = free_port();
    let nats_url = format!("nats://127.0.0.1:{port}");
    let (mut serve, addr) = start_serve(&[], &db.url, &nats_url);

    // Not ready, saying why, for a few seconds, and alive all along.
    let why = format!("waiting for NATS at {nats_url}: ");
    let body = until_readyz(addr, 503, &why, Duration::from_secs(20)).await;
    assert!(!body.contains("Postgres"), "Postgres answers at once: {body}");
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(3) {
        assert!(serve.try_wait().expect("try_wait").is_none(), "tally serve exited while waiting for NATS");
        assert_eq!(get(addr, "/healthz").await.map(|(s, _)| s), Some(200));
        let (status, body) = get(addr, "/readyz").await.expect("answers");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(&why), "{body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // NATS comes: serve connects, creates its stream and consumer, and is ready.
    let nats = NatsServer::start(port);
    until_readyz(addr, 200, "ready", Duration::from_secs(30)).await;
    let status = terminate(&mut serve, Duration::from_secs(20)).await;
    assert!(status.success(), "{status}: {}", stderr_of(&mut serve).await);
    nats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_non_zero_past_the_startup_deadline_naming_what_is_missing() {
    let (db, _store) = TestDb::new("startup_deadline", Flavor::Empty).await;

    // NATS absent.
    let nats_url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let (mut serve, addr) = start_serve(&["--startup-deadline", "2"], &db.url, &nats_url);
    until_readyz(addr, 503, "waiting for NATS", Duration::from_secs(5)).await;
    let status = tokio::time::timeout(Duration::from_secs(10), serve.wait()).await.expect("exits within 10 s");
    let status = status.expect("wait");
    assert!(!status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = stderr_of(&mut serve).await;
    assert!(err.contains(&format!("NATS at {nats_url} not reachable within the start-up deadline of 2 s")), "{err}");

    // Postgres absent (NATS there); the password never shows.
    let pg_port = free_port();
    let database_url = format!("postgres://postgres:secret@127.0.0.1:{pg_port}/antenna");
    let started = Instant::now();
    let (mut serve, addr) = start_serve(&["--startup-deadline", "2"], &database_url, &common::ingest::nats_url());
    let body = until_readyz(addr, 503, "waiting for Postgres", Duration::from_secs(5)).await;
    assert!(body.contains(&format!("127.0.0.1:{pg_port}/antenna")) && !body.contains("secret"), "{body}");
    let status = tokio::time::timeout(Duration::from_secs(10), serve.wait()).await.expect("exits within 10 s");
    assert!(!status.expect("wait").success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = stderr_of(&mut serve).await;
    assert!(err.contains("Postgres at 127.0.0.1:") && err.contains("start-up deadline"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_exits_0_promptly() {
    let (db, _store) = TestDb::new("startup_sigterm", Flavor::Empty).await;
    let nats_url = format!("nats://127.0.0.1:{}", free_port());
    // Both halves: ingest (waits in serve itself) and the gateway alone (--no-ingest).
    for args in [&[][..], &["--no-ingest"][..]] {
        let (mut serve, addr) = start_serve(args, &db.url, &nats_url);
        until_readyz(addr, 503, &format!("waiting for NATS at {nats_url}: "), Duration::from_secs(20)).await;
        let started = Instant::now();
        let status = terminate(&mut serve, Duration::from_secs(5)).await;
        assert!(status.success(), "{args:?}: {status}: {}", stderr_of(&mut serve).await);
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_exist_fails_at_once_without_a_deadline() {
    // Make sure the server answers, so that the error is the database's absence.
    let (_db, _store) = TestDb::new("startup_no_db", Flavor::Empty).await;
    let server = std::env::var("TALLY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let url = tally::store::sibling_database_url(&server, "tally_startup_no_such_database").expect("server URL");
    for args in [&[][..], &["--no-ingest"][..]] {
        let (mut serve, _addr) = start_serve(args, &url, &common::ingest::nats_url());
        let status = tokio::time::timeout(Duration::from_secs(15), serve.wait()).await.expect("exits, no retry");
        assert!(!status.expect("wait").success(), "{args:?}");
        let err = stderr_of(&mut serve).await;
        assert!(err.contains("tally_startup_no_such_database") && err.contains("does not exist"), "{args:?}: {err}");
    }
}
