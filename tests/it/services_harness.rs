//! The private-service harness itself (`tests/it/common/services.rs`): both servers start, keep
//! their data across clean and crash restarts, and leave no process or directory behind.
use crate::common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use common::services::{PrivateNats, PrivatePostgres};
use tokio_postgres::NoTls;

/// Runs `f`, printing how long it took (see the numbers with `--nocapture`).
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    eprintln!("services_harness: {what} took {:?}", started.elapsed());
    value
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect to private Postgres {url}: {e}"));
    tokio::spawn(connection);
    client
}

async fn count_rows(url: &str) -> i64 {
    connect(url).await.query_one("SELECT count(*) FROM survivors", &[]).await.expect("count survivors").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_postgres_keeps_committed_rows_across_restarts() {
    let pg = timed("PrivatePostgres::start", PrivatePostgres::start);
    let dir = pg.dir().to_path_buf();
    timed("create_database", || pg.create_database("harness"));
    let url = pg.url("harness");

    let client = connect(&url).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("SELECT 1").get(0);
    assert_eq!(one, 1);
    client
        .batch_execute("CREATE TABLE survivors (id int PRIMARY KEY); INSERT INTO survivors VALUES (1)")
        .await
        .unwrap();

    // The old connection dies with the server; the row was committed, so recovery keeps it.
    tokio::task::block_in_place(|| timed("PrivatePostgres::crash_restart", || pg.crash_restart()));
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the connection should not survive a crash");
    assert_eq!(count_rows(&url).await, 1, "committed row lost in crash recovery");
    let log = std::fs::read_to_string(dir.join("postgres.log")).expect("postgres.log");
    assert!(log.contains("was not properly shut down"), "crash_restart did not make Postgres recover:\n{log}");

    connect(&url).await.batch_execute("INSERT INTO survivors VALUES (2)").await.unwrap();
    tokio::task::block_in_place(|| timed("PrivatePostgres::restart", || pg.restart()));
    assert_eq!(count_rows(&url).await, 2, "committed row lost in a clean restart");

    timed("PrivatePostgres drop", || drop(pg));
    assert_no_leftovers(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_nats_keeps_streams_across_restarts() {
    let nats = timed("PrivateNats::start", PrivateNats::start);
    let dir = nats.dir().to_path_buf();
    let client = async_nats::connect(nats.url()).await.unwrap_or_else(|e| panic!("connect to {}: {e}", nats.url()));
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("harness.one", Bytes::from_static(b"first")).await.expect("publish").await.expect("ack");

    tokio::task::block_in_place(|| timed("PrivateNats::restart", || nats.restart()));
    let reconnected = Instant::now();
    let mut stream = until_answers(|| js.get_stream("HARNESS")).await;
    eprintln!("services_harness: client back after NATS restart in {:?}", reconnected.elapsed());
    assert_eq!(stream.info().await.expect("stream info").state.messages, 1, "stream lost messages in a restart");
    let message = stream.get_raw_message(1).await.expect("message 1");
    assert_eq!(&message.payload[..], b"first");

    // A kill -9 straight after the acks: the acknowledged messages are on disk already.
    for i in 0..100 {
        js.publish("harness.many", Bytes::from(format!("m{i}"))).await.expect("publish").await.expect("ack");
    }
    tokio::task::block_in_place(|| timed("PrivateNats::crash_restart", || nats.crash_restart()));
    let mut stream = until_answers(|| js.get_stream("HARNESS")).await;
    assert_eq!(
        stream.info().await.expect("stream info").state.messages,
        101,
        "acknowledged messages lost in a kill -9"
    );

    timed("PrivateNats drop", || drop(nats));
    assert_no_leftovers(&dir);
}

/// Retries `f` until the client has reconnected and the server answers, for up to 30 s.
async fn until_answers<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(value) => return value,
            Err(e) if Instant::now() > deadline => panic!("NATS did not answer 30 s after a restart: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// No process mentions the server's directory, and the directory is gone.
fn assert_no_leftovers(dir: &std::path::Path) {
    let pgrep = std::process::Command::new("pgrep").arg("-af").arg(dir).output().expect("run pgrep");
    let procs = String::from_utf8_lossy(&pgrep.stdout);
    assert!(procs.trim().is_empty(), "processes left behind for {}:\n{procs}", dir.display());
    assert!(!dir.exists(), "{} left behind", dir.display());
}
