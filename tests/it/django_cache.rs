//! Django's query cache sees what tally writes: a real Django 4.2 with django-cachalot 2.6.3
//! and django-redis (Antenna's pins, `tests/django/requirements.txt`, installed into a venv
//! this test makes) reads Antenna's tables through the ORM from a real Redis; tally writes;
//! Django's next read returns the new value. Each test first shows that Django really serves
//! a cached value (a raw SQL write it cannot see), so the tests fail without invalidation.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::ingest::{world, Fixture};
use common::Flavor;
use serde_json::Value;
use tally::django_cache::DjangoCacheArgs;
use tally::ingest::daemon::IngestArgs;

const REDIS: &str = "redis://127.0.0.1:6379/0";

static VENV: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The venv with Antenna's Django stack, made (once per target dir) with `python3 -m venv`
/// and pip from PyPI. Fails loudly when it cannot be made.
fn venv() -> PathBuf {
    let mut made = VENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = made.as_ref() {
        return v.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("django-venv");
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("tests/django/requirements.txt");
    let marker = dir.join("installed.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&dir).status().is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv {} failed: the Django cache tests need python3 with venv", dir.display());
        let ok = Command::new(dir.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install -r {} failed (PyPI must be reachable)", requirements.display());
        std::fs::write(&marker, &wanted).expect("marker");
    }
    *made = Some(dir.clone());
    dir
}

/// A Django process answering ORM reads (tests/django/cachalot_probe.py).
struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    fn start(database_url: &str, key_prefix: &str) -> Probe {
        let python = venv().join("bin/python");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django/cachalot_probe.py");
        let mut child = Command::new(python)
            .arg(script)
            .env("PROBE_DATABASE_URL", database_url)
            .env("PROBE_REDIS_URL", REDIS)
            .env("PROBE_KEY_PREFIX", key_prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Django probe");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("probe's first line");
        assert!(line.contains("ready"), "the Django probe did not start: {line:?}");
        Probe { child, stdin, stdout }
    }

    fn ask(&mut self, command: &str) -> Value {
        writeln!(self.stdin, "{command}").expect("write to the probe");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe answer");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe said {line:?}: {e}"));
        assert!(v.get("error").is_none(), "{command}: {v}");
        v
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cache_args(prefix: &str, url: &str) -> DjangoCacheArgs {
    DjangoCacheArgs {
        django_cache_url: Some(url.into()),
        django_cache_key_prefix: prefix.into(),
        ..DjangoCacheArgs::default()
    }
}

async fn scalar(fx: &Fixture, sql: &str) -> i64 {
    let v: Option<i32> = fx.store.client().await.expect("client").query_one(sql, &[]).await.expect(sql).get(0);
    v.map(i64::from).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_fix_invalidates_django_s_cached_counts() {
    let fx = Fixture::new("dj_verify", Flavor::Empty, world(1, 3)).await;
    let url = fx.db.as_ref().expect("db").url.clone();
    let bin = env!("CARGO_BIN_EXE_tally");
    let fix = |extra: &[&str]| {
        let out = Command::new(bin)
            .args(["verify", "--fix", "--database-url", &url])
            .args(extra)
            .output()
            .expect("tally verify");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    fix(&[]);
    let c = fx.store.client().await.expect("client");
    let deployment: i64 = c.query_one("SELECT min(id) FROM main_deployment", &[]).await.expect("deployment").get(0);
    let truth = scalar(&fx, &format!("SELECT captures_count FROM main_deployment WHERE id = {deployment}")).await;
    let prefix = format!("tally-test-{}", common::ingest::unique());
    let mut django = Probe::start(&url, &prefix);
    let read = |p: &mut Probe| p.ask(&format!("get deployment {deployment} captures_count"));
    c.execute("UPDATE main_deployment SET captures_count = 999 WHERE id = $1", &[&deployment]).await.expect("corrupt");
    assert_eq!(read(&mut django), 999);
    // A write Django did not make is invisible to it: the read above is cached.
    c.execute("UPDATE main_deployment SET captures_count = 998 WHERE id = $1", &[&deployment]).await.expect("corrupt");
    assert_eq!(read(&mut django), 999, "Django serves its cached read");
    fix(&["--django-cache-url", REDIS, "--django-cache-key-prefix", &prefix]);
    assert_eq!(read(&mut django), truth, "after tally's fix, Django reads the corrected count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_invalidates_the_tables_it_writes() {
    let mut fx = Fixture::new("dj_ingest", Flavor::Empty, world(1, 3)).await;
    let url = fx.db.as_ref().expect("db").url.clone();
    let image = fx.world.images[0];
    let (job, tasks) = fx.job(&[image]).await;
    let prefix = format!("tally-test-{}", common::ingest::unique());
    let mut django = Probe::start(&url, &prefix);
    let before_count = django.ask(&format!("get sourceimage {image} detections_count"));
    let before_rows = django.ask(&format!("count detection source_image_id {image}"));
    assert_eq!(before_rows, 0);
    let mut running = fx.start_with(IngestArgs::default(), cache_args(&prefix, REDIS)).await;
    let cache = running.server.django.clone();
    fx.publish(job, &tasks[0].1, fx.factory.task_result(&tasks[0].1, image)).await;
    running.wait_for(1, 0, Duration::from_secs(20)).await;
    running.stop().await;
    let rows = scalar(&fx, &format!("SELECT count(*)::int FROM main_detection WHERE source_image_id = {image}")).await;
    let count = scalar(&fx, &format!("SELECT detections_count FROM main_sourceimage WHERE id = {image}")).await;
    assert!(rows > 0 && count > 0, "the result has detections ({rows} rows, count {count})");
    assert_ne!(before_count, count);
    assert_eq!(django.ask(&format!("count detection source_image_id {image}")), rows, "Django sees the new rows");
    assert_eq!(django.ask(&format!("get sourceimage {image} detections_count")), count, "and the new count");
    assert!(cache.pending().is_empty());
    fx.cleanup().await;
}

/// A Redis that is down never stops ingest: the failure is remembered and retried once Redis
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_is_down_never_stops_ingest() {
    let mut fx = Fixture::new("dj_down", Flavor::Empty, world(1, 3)).await;
    let image = fx.world.images[1];
    let (job, tasks) = fx.job(&[image]).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let mut running =
        fx.start_with(IngestArgs::default(), cache_args("tally-down", &format!("redis://127.0.0.1:{port}/0"))).await;
    let cache = running.server.django.clone();
    fx.publish(job, &tasks[0].1, fx.factory.task_result(&tasks[0].1, image)).await;
    let started = Instant::now();
    running.wait_for(1, 0, Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    let pending = cache.pending();
    assert!(pending.contains(&"main_detection".to_string()), "{pending:?}");
    // Redis comes up: the next invalidation (or the periodic retry) clears what was pending.
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's redis-server package) must be installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.pending().is_empty() {
        assert!(Instant::now() < deadline, "still pending after Redis started: {:?}", cache.pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        cache.invalidate(std::iter::empty()).await;
    }
    let _ = redis.kill();
    let _ = redis.wait();
    running.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_commands_invalidate_the_job_tables() {
    let mut fx = Fixture::new("dj_job", Flavor::Empty, world(1, 3)).await;
    let url = fx.db.as_ref().expect("db").url.clone();
    let images: Vec<i64> = fx.world.images.iter().take(3).copied().collect();
    let (job, _) = fx.job(&images).await;
    let prefix = format!("tally-test-{}", common::ingest::unique());
    let mut django = Probe::start(&url, &prefix);
    let read = |p: &mut Probe| p.ask(&format!("get job {job} status"));
    let first = read(&mut django);
    let c = fx.store.client().await.expect("client");
    c.execute("UPDATE jobs_job SET status = 'PENDING' WHERE id = $1", &[&job]).await.expect("raw write");
    assert_eq!(read(&mut django), first, "Django serves its cached read");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["job", "cancel", &job.to_string(), "--database-url", &url])
        .args(["--nats-url", &fx.nats_args.nats_url])
        .args(["--django-cache-url", REDIS, "--django-cache-key-prefix", &prefix])
        .output()
        .expect("tally job cancel");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(&mut django), "REVOKED", "after `tally job cancel`, Django reads the new status");
    fx.cleanup().await;
}
