//! Dead letters against real Postgres and NATS JetStream: bulk insert order and round trip,
//! list filters, replay (exact payload and headers read back from the stream, marking, a new
//! message id per attempt), and `tally dead-letters` end to end through the binary.
//!
//! NATS comes from `TALLY_TEST_NATS_URL` (default `nats://127.0.0.1:4222`); each test makes a
//! stream of its own (`TEST_DL_<pid>_<n>` on subjects `test_dl_<pid>_<n>.>`) and deletes it
//! when done. When NATS does not answer, tests fail saying so: they never skip.

use crate::common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use common::{Flavor, TestDb};
use tally::dead_letters::{self, ListFilter, NewDeadLetter};
use tally::store::Store;

fn nats_url() -> String {
    std::env::var("TALLY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn nats() -> async_nats::Client {
    let url = nats_url();
    match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url.as_str())).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("NATS with JetStream is required for this test and is not reachable at {url}: {e} (start it: scripts/services)"),
        Err(_) => panic!("NATS with JetStream is required for this test and did not answer at {url} within 5 s (start it: scripts/services)"),
    }
}

static STREAMS: AtomicU32 = AtomicU32::new(0);

/// A JetStream stream of one test's own, deleted when dropped.
struct TestStream {
    /// `TEST_DL_<pid>_<n>`.
    name: String,
    /// Its subjects are `<prefix>.>`.
    prefix: String,
    js: jetstream::Context,
}

impl TestStream {
    async fn new() -> TestStream {
        let n = STREAMS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("TEST_DL_{pid}_{n}");
        let prefix = format!("test_dl_{pid}_{n}");
        let js = jetstream::new(nats().await);
        let _ = js.delete_stream(&name).await;
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name} (is JetStream enabled, nats-server -js?): {e}"));
        TestStream { name, prefix, js }
    }

    /// The results subject of `job` in this stream.
    fn subject(&self, job: i64) -> String {
        format!("{}.results.{job}", self.prefix)
    }

    async fn message(&self, sequence: u64) -> jetstream::message::StreamMessage {
        let stream = self.js.get_stream(&self.name).await.expect("get stream");
        stream.get_raw_message(sequence).await.unwrap_or_else(|e| panic!("message {sequence}: {e}"))
    }

    async fn messages(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.name).await.expect("get stream");
        stream.info().await.expect("stream info").state.messages
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: use a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let _ = jetstream::new(nats().await).delete_stream(&name).await;
            });
        })
        .join();
    }
}

fn letter(subject: &str, job: Option<i64>, reason_code: &str, payload: &[u8]) -> NewDeadLetter {
    NewDeadLetter {
        subject: subject.to_string(),
        job_id: job,
        reply_subject: job.map(|j| format!("$JS.ACK.job_{j}.job-{j}-consumer.1.2.3.4.5.0")),
        stream_sequence: Some(17),
        delivered: Some(1),
        reason_code: reason_code.to_string(),
        reason: format!("{reason_code}: details"),
        headers: Some(serde_json::json!({"Nats-Msg-Id": ["original"]})),
        payload: payload.to_vec(),
    }
}

async fn insert(store: &Store, letters: &[NewDeadLetter]) -> Vec<i64> {
    let mut client = store.client().await.expect("client");
    let tx = client.transaction().await.expect("begin");
    let ids = dead_letters::insert_in(&tx, letters).await.expect("insert_in");
    tx.commit().await.expect("commit");
    ids
}

async fn replay_count(store: &Store, id: i64) -> (i32, bool) {
    let row = store
        .client()
        .await
        .expect("client")
        .query_one("SELECT replay_count, replayed_at IS NOT NULL FROM tally.dead_letter WHERE id = $1", &[&id])
        .await
        .expect("row");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn insert_in_returns_ids_in_input_order_and_round_trips() {
    let (_db, store) = TestDb::new("dl_insert", Flavor::Empty).await;
    assert!(insert(&store, &[]).await.is_empty());

    // Enough rows that an order that merely happened to hold would likely break.
    let letters: Vec<NewDeadLetter> = (0..500)
        .map(|i| {
            let mut l = letter("tally.results.3", Some(3), "invalid_json", format!("payload {i}").as_bytes());
            l.reason = format!("letter {i}");
            l
        })
        .collect();
    let ids = insert(&store, &letters).await;
    assert_eq!(ids.len(), 500);
    let client = store.client().await.expect("client");
    let rows = client.query("SELECT id, reason FROM tally.dead_letter", &[]).await.expect("select");
    let by_id: std::collections::HashMap<i64, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(by_id.get(id), Some(&format!("letter {i}")), "id {id} at position {i}");
    }

    // Every field, including NULLs and bytes that are not UTF-8.
    let full = NewDeadLetter {
        subject: "tally.results.9".into(),
        job_id: Some(9),
        reply_subject: Some("$JS.ACK.job_9.job-9-consumer.1.5.9.1700000000000000000.0".into()),
        stream_sequence: Some(123),
        delivered: Some(2),
        reason_code: "unknown_image".into(),
        reason: "image 77 does not exist".into(),
        headers: Some(serde_json::json!({"Nats-Msg-Id": ["abc"], "X": ["1", "2"]})),
        payload: vec![0, 159, 146, 150, b'{', 255],
    };
    let bare = NewDeadLetter {
        subject: "elsewhere".into(),
        job_id: None,
        reply_subject: None,
        stream_sequence: None,
        delivered: None,
        reason_code: "invalid_subject".into(),
        reason: "no job in subject".into(),
        headers: None,
        payload: Vec::new(),
    };
    let ids = insert(&store, &[full.clone(), bare.clone()]).await;
    let got = dead_letters::get(&store, ids[0]).await.expect("get").expect("exists");
    let s = &got.summary;
    assert_eq!(
        (s.subject.as_str(), s.job_id, s.reply_subject.as_deref(), s.stream_sequence, s.delivered),
        (full.subject.as_str(), full.job_id, full.reply_subject.as_deref(), full.stream_sequence, full.delivered)
    );
    assert_eq!((s.reason_code.as_str(), s.reason.as_str()), (full.reason_code.as_str(), full.reason.as_str()));
    assert_eq!((s.size, s.replay_count, s.replayed_at.as_deref()), (6, 0, None));
    assert_eq!(got.headers, full.headers);
    assert_eq!(got.payload, full.payload);
    let got = dead_letters::get(&store, ids[1]).await.expect("get").expect("exists");
    assert_eq!((got.summary.job_id, got.headers, got.payload, got.summary.size), (None, None, Vec::new(), 0));
    assert!(dead_letters::get(&store, i64::MAX).await.expect("get").is_none());

    // Inside a transaction that rolls back, nothing is stored.
    let mut client = store.client().await.expect("client");
    let tx = client.transaction().await.expect("begin");
    let rolled_back = dead_letters::insert_in(&tx, &[bare]).await.expect("insert_in");
    tx.rollback().await.expect("rollback");
    assert!(dead_letters::get(&store, rolled_back[0]).await.expect("get").is_none());
}

#[tokio::test]
async fn list_filters_by_job_reason_and_replayed() {
    let (_db, store) = TestDb::new("dl_list", Flavor::Empty).await;
    let ids = insert(
        &store,
        &[
            letter("tally.results.1", Some(1), "invalid_json", b"{"),
            letter("tally.results.1", Some(1), "unknown_image", b"{}"),
            letter("tally.results.2", Some(2), "invalid_json", b"x"),
            letter("tally.results.2", Some(2), "invalid_json", b"y"),
        ],
    )
    .await;
    store
        .client()
        .await
        .expect("client")
        .execute("UPDATE tally.dead_letter SET replayed_at = now(), replay_count = 1 WHERE id = $1", &[&ids[3]])
        .await
        .expect("mark replayed");
    let list = |filter: ListFilter| {
        let store = store.clone();
        async move { dead_letters::list(&store, &filter).await.expect("list").iter().map(|l| l.id).collect::<Vec<_>>() }
    };
    // Newest first, replayed ones left out by default.
    assert_eq!(list(ListFilter::default()).await, vec![ids[2], ids[1], ids[0]]);
    assert_eq!(
        list(ListFilter { include_replayed: true, ..Default::default() }).await,
        vec![ids[3], ids[2], ids[1], ids[0]]
    );
    assert_eq!(list(ListFilter { job: Some(1), ..Default::default() }).await, vec![ids[1], ids[0]]);
    assert_eq!(
        list(ListFilter { reason_code: Some("invalid_json".into()), ..Default::default() }).await,
        vec![ids[2], ids[0]]
    );
    assert_eq!(
        list(ListFilter {
            job: Some(2),
            reason_code: Some("invalid_json".into()),
            include_replayed: true,
            limit: None
        })
        .await,
        vec![ids[3], ids[2]]
    );
    assert_eq!(list(ListFilter { limit: Some(2), ..Default::default() }).await, vec![ids[2], ids[1]]);
    assert!(list(ListFilter { job: Some(99), ..Default::default() }).await.is_empty());

    let counts = dead_letters::counts_by_reason(&store, None).await.expect("counts");
    let counts: Vec<(&str, i64, i64)> =
        counts.iter().map(|c| (c.reason_code.as_str(), c.pending, c.replayed)).collect();
    assert_eq!(counts, vec![("invalid_json", 2, 1), ("unknown_image", 1, 0)]);
    let job2 = dead_letters::counts_by_reason(&store, Some(2)).await.expect("counts");
    assert_eq!(job2.len(), 1);
    assert_eq!((job2[0].pending, job2[0].replayed), (1, 1));

    let found = dead_letters::summaries(&store, &[ids[3], 0, ids[1]]).await.expect("summaries");
    assert_eq!(found.iter().map(|l| l.id).collect::<Vec<_>>(), vec![ids[1], ids[3]]);
    assert_eq!(found[0].size, 2);
}

#[tokio::test]
async fn replay_publishes_the_exact_payload_with_a_new_message_id_per_attempt() {
    let (_db, store) = TestDb::new("dl_replay", Flavor::Empty).await;
    let stream = TestStream::new().await;
    let payload: Vec<u8> = b"{\"reply_subject\": \"r\", \"result\": {}}\n\x00\xff not UTF-8".to_vec();
    let ids = insert(&store, &[letter(&stream.subject(7), Some(7), "unknown_pipeline", &payload)]).await;
    let id = ids[0];

    let first = dead_letters::replay(&store, &stream.js, &[id, i64::MAX]).await.expect("replay");
    assert!(first.failed.is_empty(), "{:?}", first.failed);
    assert_eq!(first.missing, vec![i64::MAX]);
    assert_eq!(first.published.len(), 1);
    let p = &first.published[0];
    assert_eq!(
        (p.id, p.subject.as_str(), p.stream.as_str(), p.duplicate),
        (id, stream.subject(7).as_str(), stream.name.as_str(), false)
    );
    assert_eq!(p.msg_id, format!("tally-replay-{id}-1"));
    let message = stream.message(p.sequence).await;
    assert_eq!(message.payload.as_ref(), payload.as_slice(), "payload re-published byte for byte");
    assert_eq!(message.subject.as_str(), stream.subject(7));
    let header =
        |m: &jetstream::message::StreamMessage, name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(header(&message, "Nats-Msg-Id"), Some(format!("tally-replay-{id}-1")));
    assert_eq!(header(&message, "Tally-Replay-Of"), Some(id.to_string()));
    assert_eq!(replay_count(&store, id).await, (1, true));
    // Once replayed, it leaves the default listing.
    assert!(dead_letters::list(&store, &ListFilter::default()).await.expect("list").is_empty());

    // A second replay is a new attempt: a new message id, so the duplicate window keeps it.
    let second = dead_letters::replay(&store, &stream.js, &[id]).await.expect("replay");
    let p2 = &second.published[0];
    assert_eq!((p2.msg_id.clone(), p2.duplicate), (format!("tally-replay-{id}-2"), false));
    assert!(p2.sequence > p.sequence);
    assert_eq!(header(&stream.message(p2.sequence).await, "Nats-Msg-Id"), Some(format!("tally-replay-{id}-2")));
    assert_eq!(stream.messages().await, 2);
    assert_eq!(replay_count(&store, id).await, (2, true));

    // Marking lost after a publish (count rolled back): the same attempt again is dropped by
    // JetStream as a duplicate, reported as such, and the count is not skipped ahead.
    store
        .client()
        .await
        .expect("client")
        .execute("UPDATE tally.dead_letter SET replay_count = 1 WHERE id = $1", &[&id])
        .await
        .expect("roll back count");
    let again = dead_letters::replay(&store, &stream.js, &[id]).await.expect("replay");
    assert!(again.published[0].duplicate, "{:?}", again.published);
    assert_eq!(stream.messages().await, 2);
    assert_eq!(replay_count(&store, id).await, (2, true));
}

#[tokio::test]
async fn replay_of_many_spans_chunks_and_a_subject_without_stream_fails_unmarked() {
    let (_db, store) = TestDb::new("dl_replay_many", Flavor::Empty).await;
    let stream = TestStream::new().await;
    let letters: Vec<NewDeadLetter> = (0..600)
        .map(|i| letter(&stream.subject(i % 3), Some(i % 3), "invalid_json", format!("{i}").as_bytes()))
        .collect();
    let mut ids = insert(&store, &letters).await;
    let orphan = insert(&store, &[letter(&format!("{}_nowhere.results.1", stream.prefix), Some(1), "x", b"{}")]).await;
    ids.push(ids[0]); // a repeated id is replayed once
    ids.push(orphan[0]);
    let report = dead_letters::replay(&store, &stream.js, &ids).await.expect("replay");
    assert_eq!(report.published.len(), 600);
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].id, orphan[0]);
    assert_eq!(stream.messages().await, 600);
    let mut sequences: Vec<u64> = report.published.iter().map(|p| p.sequence).collect();
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(sequences.len(), 600);
    let last = report.published.iter().find(|p| p.id == ids[599]).expect("published");
    assert_eq!(stream.message(last.sequence).await.payload.as_ref(), b"599");
    assert_eq!(replay_count(&store, orphan[0]).await, (0, false));
    assert_eq!(replay_count(&store, ids[599]).await, (1, true));
}

// The binary, end to end.

fn tally(args: &[&str], url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("NATS_URL", nats_url())
        .env("TALLY_CONNECT_ATTEMPTS", "2")
        .output()
        .expect("tally runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_list_and_show() {
    let (db, store) = TestDb::new("dl_cli_show", Flavor::Empty).await;
    let long_reason = "x".repeat(200);
    let mut json =
        letter("tally.results.4", Some(4), "unknown_image", br#"{"reply_subject":"r","result":{"z":1,"a":[1.50]}}"#);
    json.reason = long_reason.clone();
    let binary = letter("tally.results.5", Some(5), "invalid_json", b"not json \xff\x00");
    let ids = insert(&store, &[json, binary.clone()]).await;

    let list = tally(&["dead-letters", "list"], &db.url);
    assert!(list.status.success(), "{}", stderr(&list));
    let out = stdout(&list);
    let header = out.lines().next().unwrap_or_default();
    for column in ["id", "received_at", "job", "reason_code", "reason", "delivered", "size", "replayed"] {
        assert!(header.contains(column), "{column} missing: {out}");
    }
    assert!(out.contains("unknown_image") && out.contains("invalid_json"), "{out}");
    assert!(out.contains(&format!("{}…", "x".repeat(59))) && !out.contains(&long_reason), "reason truncated: {out}");
    assert!(out.contains("2 not replayed (invalid_json 1, unknown_image 1); 0 replayed"), "{out}");

    let only = tally(&["dead-letters", "list", "--job", "5", "--format", "json"], &db.url);
    assert!(only.status.success(), "{}", stderr(&only));
    let doc: serde_json::Value = serde_json::from_slice(&only.stdout).expect("json");
    assert_eq!(doc["dead_letters"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(doc["dead_letters"][0]["id"], ids[1]);
    assert_eq!(doc["dead_letters"][0]["size"], binary.payload.len());
    assert_eq!(doc["by_reason"][0]["reason_code"], "invalid_json");

    let reason = tally(&["dead-letters", "list", "--reason", "unknown_image", "--format", "json"], &db.url);
    let doc: serde_json::Value = serde_json::from_slice(&reason.stdout).expect("json");
    assert_eq!(doc["dead_letters"][0]["reason"], long_reason.as_str(), "JSON is not truncated");

    let show = tally(&["dead-letters", "show", &ids[0].to_string()], &db.url);
    assert!(show.status.success(), "{}", stderr(&show));
    let out = stdout(&show);
    assert!(out.contains("reason_code     unknown_image"), "{out}");
    assert!(out.contains("subject         tally.results.4"), "{out}");
    assert!(out.contains("payload (JSON):\n{\n  \"reply_subject\": \"r\",\n  \"result\": {\n    \"z\": 1,"), "{out}");
    assert!(out.contains("1.50"), "numbers keep their spelling: {out}");

    let show = tally(&["dead-letters", "show", &ids[1].to_string()], &db.url);
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(stdout(&show).contains("not JSON") && stdout(&show).contains("not json \u{fffd}"), "{}", stdout(&show));

    let raw = tally(&["dead-letters", "show", &ids[1].to_string(), "--raw"], &db.url);
    assert!(raw.status.success(), "{}", stderr(&raw));
    assert_eq!(raw.stdout, binary.payload, "--raw writes the bytes unchanged");

    let missing = tally(&["dead-letters", "show", "999999"], &db.url);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no dead letter with id 999999"), "{}", stderr(&missing));

    let empty = TestDb::new("dl_cli_empty", Flavor::Empty).await.0;
    let none = tally(&["dead-letters", "list"], &empty.url);
    assert!(none.status.success());
    assert_eq!(stdout(&none), "no dead letters\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_replay() {
    let (db, store) = TestDb::new("dl_cli_replay", Flavor::Empty).await;
    let stream = TestStream::new().await;
    let ids = insert(
        &store,
        &[
            letter(&stream.subject(1), Some(1), "unknown_image", b"one"),
            letter(&stream.subject(1), Some(1), "invalid_json", b"two"),
            letter(&stream.subject(2), Some(2), "unknown_image", b"three"),
        ],
    )
    .await;

    let dry = tally(&["dead-letters", "replay", "--all", "--dry-run"], &db.url);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(stdout(&dry).contains(&format!("would publish dead letter {} to {}", ids[0], stream.subject(1))));
    assert!(stdout(&dry).contains(&format!("Nats-Msg-Id tally-replay-{}-1", ids[2])), "{}", stdout(&dry));
    assert!(stdout(&dry).contains("dry run: 3 would be published"), "{}", stdout(&dry));
    assert_eq!(stream.messages().await, 0);
    assert_eq!(replay_count(&store, ids[0]).await, (0, false));

    let one = tally(&["dead-letters", "replay", &ids[1].to_string()], &db.url);
    assert!(one.status.success(), "{}", stderr(&one));
    assert!(
        stdout(&one).contains(&format!("published dead letter {} to {}", ids[1], stream.subject(1))),
        "{}",
        stdout(&one)
    );
    assert!(stdout(&one).contains("replayed 1 dead letters; 0 failed; 0 not found"), "{}", stdout(&one));
    assert_eq!(stream.messages().await, 1);
    assert_eq!(stream.message(1).await.payload.as_ref(), b"two");

    // --all takes only the never-replayed ones, narrowed by job.
    let job1 = tally(&["dead-letters", "replay", "--all", "--job", "1"], &db.url);
    assert!(job1.status.success(), "{}", stderr(&job1));
    assert!(stdout(&job1).contains("replayed 1 dead letters"), "{}", stdout(&job1));
    assert_eq!(stream.message(2).await.payload.as_ref(), b"one");
    assert_eq!(replay_count(&store, ids[2]).await, (0, false));

    let list = tally(&["dead-letters", "list", "--all"], &db.url);
    assert!(stdout(&list).contains("1 not replayed (unknown_image 1); 2 replayed"), "{}", stdout(&list));

    let missing = tally(&["dead-letters", "replay", "999999"], &db.url);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no dead letter with id 999999"), "{}", stderr(&missing));

    let neither = tally(&["dead-letters", "replay"], &db.url);
    assert_eq!(neither.status.code(), Some(2), "clap usage error: {}", stderr(&neither));
    let job_without_all = tally(&["dead-letters", "replay", "5", "--job", "1"], &db.url);
    assert_eq!(job_without_all.status.code(), Some(2), "{}", stderr(&job_without_all));

    let help = tally(&["dead-letters", "replay", "--help"], &db.url);
    assert!(stdout(&help).contains("Nats-Msg-Id") && stdout(&help).contains("--dry-run"), "{}", stdout(&help));

    let unreachable = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["dead-letters", "replay", &ids[2].to_string()])
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("TALLY_NATS_CONNECT_TIMEOUT", "1")
        .output()
        .expect("tally runs");
    assert!(!unreachable.status.success());
    assert!(stderr(&unreachable).contains("cannot connect to NATS"), "{}", stderr(&unreachable));
    assert_eq!(replay_count(&store, ids[2]).await, (0, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_an_unmigrated_database_says_to_migrate() {
    let (db, _store) = TestDb::unmigrated("dl_cli_bare", Flavor::Empty).await;
    let out = tally(&["dead-letters", "list"], &db.url);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("run `tally migrate` first"), "{}", stderr(&out));
}
