//! The operations endpoints served in-process on `127.0.0.1:0`, spoken to with plain HTTP/1.1
//! over a TCP stream: status codes and bodies, readiness flipping, metrics exposition, and
//! shutdown on the token.

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

/// Sends `GET path` with `Connection: close` and reads the whole response.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Response { status, headers, body }
}

/// Decodes a chunked body.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).expect("hex chunk size");
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
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
    ::metrics::counter!(names::NATS_PULL_ERRORS).increment(3);
    ::metrics::counter!(names::INGEST_MESSAGES, "outcome" => "dead_lettered").increment(1);
    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(r.body.contains("# TYPE tally_nats_pull_errors_total counter"), "{}", r.body);
    assert!(r.body.contains("tally_nats_pull_errors_total 3"), "{}", r.body);
    assert!(r.body.contains("tally_ingest_messages_total{outcome=\"dead_lettered\"} 1"), "{}", r.body);
    assert!(r.body.contains("# HELP tally_nats_pull_errors_total Failed pulls from the results stream."), "{}", r.body);
    server.stop().await;
}

#[tokio::test]
async fn serve_returns_after_cancel_even_with_an_idle_keep_alive_connection() {
    let server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    // A scraper's kept-alive connection must not hold shutdown up.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await.expect("reply").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    server.stop().await;
    drop(idle);
}
