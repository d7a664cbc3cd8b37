//! A minimal HTTP/1.1 client for the gateway tests: one request per connection
//! (`Connection: close`), over a plain TCP stream, so the tests need no HTTP client crate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}), status {}: {:?}", self.status, self.body))
    }

    /// The `detail` of a JSON error.
    pub fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_else(|| panic!("no detail in {}", self.body)).to_string()
    }
}

/// A worker's view of the gateway: its address and token.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Client {
    pub async fn get(&self, path: &str) -> Response {
        self.send("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Response {
        self.send("POST", path, Some(&serde_json::to_vec(body).expect("json"))).await
    }

    pub async fn post_raw(&self, path: &str, body: &[u8]) -> Response {
        self.send("POST", path, Some(body)).await
    }

    /// ADC's claim.
    pub async fn claim(&self, pipelines: &str) -> Response {
        self.get(&format!(
            "/api/v2/jobs?pipeline__slug__in={pipelines}&ids_only=1&incomplete_only=1&dispatch_mode=async_api"
        ))
        .await
    }

    /// ADC's task fetch.
    pub async fn tasks(&self, job: i64, batch_size: usize) -> Response {
        self.post(&format!("/api/v2/jobs/{job}/tasks/"), &serde_json::json!({"batch_size": batch_size})).await
    }

    fn head(&self, method: &str, path: &str, length: Option<usize>) -> String {
        self.head_typed(method, path, length.map(|n| (Some("application/json"), n)))
    }

    /// A request head; a body of `n` bytes is announced with its `Content-Type` (`None`: no
    /// such header).
    fn head_typed(&self, method: &str, path: &str, body: Option<(Option<&str>, usize)>) -> String {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Token {token}\r\n"));
        }
        if let Some((content_type, n)) = body {
            if let Some(content_type) = content_type {
                head.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let mut request = self.head(method, path, body.map(|b| b.len())).into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        exchange(self.addr, &request).await
    }

    /// A POST whose body is sent with `content_type` (`None`: without a `Content-Type`).
    pub async fn post_typed(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
        let mut request = self.head_typed("POST", path, Some((content_type, body.len()))).into_bytes();
        request.extend_from_slice(body);
        exchange(self.addr, &request).await
    }

    /// Sends only the head of a POST declaring a body of `length` bytes (for a server that
    /// must refuse it without reading it).
    pub async fn post_declaring(&self, path: &str, length: usize) -> Response {
        exchange(self.addr, self.head("POST", path, Some(length)).as_bytes()).await
    }
}

/// Writes `request`, reads the whole response.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .expect("read response");
    parse(&raw)
}

fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
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
