//! The operations endpoints served in-process on `127.0.0.1:0`, spoken to over HTTP/1.1
//! (reqwest): status codes and bodies, readiness flipping, metrics exposition, and shutdown on
//! the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tally::http::{ops_router, serve, Health};
use tally::metrics::{self, names};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A response: status code, headers (names lower-cased) and body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends `GET path` and reads the whole response.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("reqwest client");
    let response = client.get(format!("http://{addr}{path}")).send().await.expect("response within 10 s");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().expect("ASCII header").to_string()))
        .collect();
    let body = response.text().await.expect("UTF-8 response");
    Response { status, headers, body }
}

/// A server on an ephemeral port.
struct Server {
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Server {
    let handle = metrics::install();
    let health = Arc::new(Health::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let router = ops_router(Arc::clone(&health), handle);
    let task = tokio::spawn(serve(listener, router, shutdown.clone()));
    Server { addr, health, shutdown, task }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns within 10 s of the token being cancelled")
            .expect("serve task")
            .expect("serve result");
    }
}

#[tokio::test]
async fn healthz_is_ok_while_running() {
    let server = start().await;
    let r = get(server.addr, "/healthz").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", r.headers);
    // Liveness does not depend on readiness.
    assert!(!server.health.is_ready());
    assert_eq!(get(server.addr, "/nothing").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn readyz_follows_health() {
    let server = start().await;
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), serde_json::json!({"status": "not ready", "reason": "starting"}));

    server.health.set_ready();
    assert!(server.health.is_ready());
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"status": "ready"}));

    server.health.set_not_ready("nats unreachable");
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "nats unreachable");
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text() {
    let server = start().await;
    metrics::install(); // a second call is harmless
                        // The recorder is the process's, shared with every other test of this binary: the series
                        // written here carry a label of their own, so that no other test adds to them.
    ::metrics::counter!(names::NATS_PULL_ERRORS, "test" => "http").increment(3);
    ::metrics::counter!(names::INGEST_MESSAGES, "outcome" => "dead_lettered", "test" => "http").increment(1);
    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(r.body.contains("# TYPE tally_nats_pull_errors_total counter"), "{}", r.body);
    assert!(r.body.contains("tally_nats_pull_errors_total{test=\"http\"} 3"), "{}", r.body);
    assert!(r.body.contains("tally_ingest_messages_total{outcome=\"dead_lettered\",test=\"http\"} 1"), "{}", r.body);
    assert!(r.body.contains("# HELP tally_nats_pull_errors_total Failed pulls from the results stream."), "{}", r.body);
    server.stop().await;
}

#[tokio::test]
async fn serve_returns_after_cancel_even_with_an_idle_keep_alive_connection() {
    let server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    // A scraper's kept-alive connection must not hold shutdown up. A raw socket on purpose: the
    // test needs the connection open and idle after its reply, which an HTTP client's pool
    // neither promises nor shows.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await.expect("reply").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    server.stop().await;
    drop(idle);
}
