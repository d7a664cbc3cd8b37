//! The gateway tests' HTTP client: reqwest, speaking to the gateway as ADC's workers do (a
//! `Token` authorization, JSON bodies), with one raw request kept for a head sent without its
//! body.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
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

    async fn read(response: reqwest::Response) -> Response {
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = response.text().await.expect("read response body");
        Response { status, headers, body }
    }
}

/// A client per request, as each request had its own connection before: a pooled connection
/// belongs to the runtime that opened it, and every test has a runtime of its own.
fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("reqwest client")
}

/// `GET path` on `addr` without credentials.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    Client { addr, token: None }.get(path).await
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

    /// `GET path` with `authorization` as the whole `Authorization` header (another scheme than
    /// `Token`, say), whatever the client's token.
    pub async fn get_authorized(&self, path: &str, authorization: &str) -> Response {
        let request = http().get(self.url(path)).header(AUTHORIZATION, authorization);
        Response::read(request.send().await.expect("request")).await
    }

    /// A request; a body is sent as `application/json`.
    async fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.request(method, path, body.map(|b| (Some("application/json"), b))).await
    }

    /// A POST whose body is sent with `content_type` (`None`: without a `Content-Type`).
    pub async fn post_typed(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
        self.request("POST", path, Some((content_type, body))).await
    }

    /// Sends only the head of a POST declaring a body of `length` bytes (for a server that
    /// must refuse it without reading it). Raw on purpose: an HTTP client always sends the
    /// body it declares, so the refusal could not be told from one made after reading it.
    pub async fn post_declaring(&self, path: &str, length: usize) -> Response {
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Token {token}\r\n"));
        }
        head.push_str(&format!("{CONTENT_TYPE}: application/json\r\n{CONTENT_LENGTH}: {length}\r\n\r\n"));
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write request head");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .expect("response within 30 s")
            .expect("read response");
        parse(&raw)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn request(&self, method: &str, path: &str, body: Option<(Option<&str>, &[u8])>) -> Response {
        let method = Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut request = http().request(method, self.url(path));
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Token {token}"));
        }
        if let Some((content_type, body)) = body {
            if let Some(content_type) = content_type {
                request = request.header(CONTENT_TYPE, content_type);
            }
            request = request.body(body.to_vec());
        }
        Response::read(request.send().await.expect("request")).await
    }
}

/// A whole `Connection: close` response with a `Content-Length` body (the gateway's refusals).
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
    assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "a chunked refusal: {text:?}");
    Response { status, headers, body: body.to_string() }
}
