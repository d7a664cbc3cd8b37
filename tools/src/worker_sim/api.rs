//! The worker API as ADC calls it, over one keep-alive HTTP client shared by every loop:
//! claim, fetch tasks, post results, each with `Authorization: Token <key>` and ADC's timeouts.
//!
//! Transient failures (no answer, 5xx, the gateway's 503 while it connects) are retried with
//! doubling, jittered backoff, a bounded number of times; a 4xx is never retried: it is
//! counted and handed back as a [`Refusal`]. Every answer is read as untrusted JSON: a body of
//! the wrong shape is counted, never a panic.

use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, RequestBuilder, Url};
use serde_json::{json, Value};
use tally::retry::{self, BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use super::report::{Call, Refusal, WorkerReport};
use super::task::{self, ClaimedJob, Task};
use super::WorkerSimError;

/// ADC's timeout of a claim and of a task fetch.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// ADC's timeout of a result post.
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Characters of a non-JSON error body kept for the report.
const DETAIL_CHARS: usize = 200;

/// How transient failures are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts per call, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubles after each, with ±25 % jitter.
    pub first_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Retry {
    /// The pauses between attempts, before jitter: `first_backoff`, doubling, up to
    /// `max_backoff`, `attempts - 1` of them.
    pub fn policy(&self) -> ExponentialBuilder {
        retry::exponential(self.first_backoff, self.max_backoff)
            .with_max_times(self.attempts.max(1).saturating_sub(1) as usize)
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 8, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }
}

/// How a call ended (already counted in the loop's report).
#[derive(Debug)]
pub enum Outcome<T> {
    /// A 2xx answer of the expected shape.
    Done(T),
    /// No usable answer after every attempt, a 2xx answer of the wrong shape, or cancelled.
    Failed,
    /// A 4xx answer.
    Refused(Refusal),
}

/// The gateway as the loops see it.
#[derive(Clone, Debug)]
pub struct Api {
    /// One client: its pool keeps connections alive across calls and loops.
    client: Client,
    /// `…/api/v2/jobs`.
    jobs_url: Url,
    /// `Token <key>`, marked sensitive.
    authorization: HeaderValue,
    /// `pipeline__slug__in`.
    pipelines: String,
    /// Retry policy.
    retry: Retry,
}

impl Api {
    /// Checks the base URL (`http://host:port`, any path prefix kept) and the token.
    pub fn new(base_url: &str, token: &str, pipelines: &[String], retry: Retry) -> Result<Api, WorkerSimError> {
        let url_error = |reason: String| WorkerSimError::Url { url: base_url.to_string(), reason };
        let base = Url::parse(base_url).map_err(|e| url_error(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(url_error("not an http:// URL".into()));
        }
        let jobs_url = Url::parse(&format!("{}/api/v2/jobs", base.as_str().trim_end_matches('/')))
            .map_err(|e| url_error(e.to_string()))?;
        let mut authorization =
            HeaderValue::from_str(&format!("Token {}", token.trim())).map_err(|_| WorkerSimError::Token)?;
        authorization.set_sensitive(true);
        // No proxy: the simulator talks to a gateway directly, whatever HTTP_PROXY says.
        let client = Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| WorkerSimError::Client(e.to_string()))?;
        Ok(Api { client, jobs_url, authorization, pipelines: pipelines.join(","), retry })
    }

    /// ADC's claim: `GET /api/v2/jobs?pipeline__slug__in=…&ids_only=1&incomplete_only=1&dispatch_mode=async_api`.
    pub async fn claim(&self, report: &mut WorkerReport, cancel: &CancellationToken) -> Outcome<Option<ClaimedJob>> {
        let query = [
            ("pipeline__slug__in", self.pipelines.as_str()),
            ("ids_only", "1"),
            ("incomplete_only", "1"),
            ("dispatch_mode", "async_api"),
        ];
        let request = || self.client.get(self.jobs_url.clone()).query(&query).timeout(CALL_TIMEOUT);
        match self.exchange(Call::Claim, request, report, Some(cancel)).await {
            Outcome::Done(body) => match task::parse_claim(&body) {
                Ok(job) => Outcome::Done(job),
                Err(why) => bad_response(report, Call::Claim, why),
            },
            Outcome::Failed => Outcome::Failed,
            Outcome::Refused(r) => Outcome::Refused(r),
        }
    }

    /// `POST /api/v2/jobs/{job}/tasks/ {"batch_size": n}`.
    pub async fn tasks(
        &self,
        job: i64,
        n: usize,
        report: &mut WorkerReport,
        cancel: &CancellationToken,
    ) -> Outcome<Vec<Task>> {
        let url = self.job_url(job, "tasks");
        let body = bytes::Bytes::from(json!({"batch_size": n}).to_string());
        let request = || self.post(&url, body.clone(), CALL_TIMEOUT);
        match self.exchange(Call::Tasks, request, report, Some(cancel)).await {
            Outcome::Done(body) => match task::parse_tasks(&body) {
                Ok((tasks, unusable)) => {
                    report.bad_responses += unusable;
                    Outcome::Done(tasks)
                }
                Err(why) => bad_response(report, Call::Tasks, why),
            },
            Outcome::Failed => Outcome::Failed,
            Outcome::Refused(r) => Outcome::Refused(r),
        }
    }

    /// `POST /api/v2/jobs/{job}/result/ {"results": [...]}`; `Done` carries `results_queued`.
    /// Retrying is safe: the gateway publishes each result with its reply subject as
    /// `Nats-Msg-Id`, so JetStream drops a repeat. Backoff waits are not cut short by a
    /// cancellation: results already computed are worth their bounded retries.
    pub async fn post_results(&self, job: i64, results: &[Value], report: &mut WorkerReport) -> Outcome<u64> {
        let url = self.job_url(job, "result");
        let body = match serde_json::to_vec(&json!({"results": results})) {
            Ok(b) => bytes::Bytes::from(b),
            Err(_) => return Outcome::Failed,
        };
        let request = || self.post(&url, body.clone(), RESULT_TIMEOUT);
        match self.exchange(Call::Result, request, report, None).await {
            Outcome::Done(answer) => match answer.get("results_queued").and_then(Value::as_u64) {
                Some(n) => Outcome::Done(n),
                None => {
                    // Accepted (2xx) all the same: the results are in JetStream.
                    report.bad_responses += 1;
                    Outcome::Done(results.len() as u64)
                }
            },
            Outcome::Failed => Outcome::Failed,
            Outcome::Refused(r) => Outcome::Refused(r),
        }
    }

    fn job_url(&self, job: i64, call: &str) -> Url {
        let mut url = self.jobs_url.clone();
        url.set_path(&format!("{}/{job}/{call}/", self.jobs_url.path()));
        url
    }

    fn post(&self, url: &Url, body: bytes::Bytes, timeout: Duration) -> RequestBuilder {
        self.client.post(url.clone()).header(CONTENT_TYPE, "application/json").body(body).timeout(timeout)
    }

    /// Sends `request()` until an answer that is not transient, recording each exchange.
    async fn exchange(
        &self,
        call: Call,
        request: impl Fn() -> RequestBuilder,
        report: &mut WorkerReport,
        cancel: Option<&CancellationToken>,
    ) -> Outcome<Value> {
        let mut backoff = self.retry.policy().build();
        for attempt in 1..=self.retry.attempts.max(1) {
            if attempt > 1 {
                report.retries += 1;
                let wait = jitter(retry::pause(&mut backoff));
                match cancel {
                    Some(cancel) => tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return Outcome::Failed,
                    },
                    None => tokio::time::sleep(wait).await,
                }
            }
            let started = Instant::now();
            let sent = request().header(AUTHORIZATION, self.authorization.clone()).send().await;
            let answer = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response.bytes().await.map(|body| (status, body))
                }
                Err(e) => Err(e),
            };
            let (status, body) = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    report.transport_errors += 1;
                    tracing::debug!(call = call.name(), attempt, error = %e, "no answer; retrying");
                    continue;
                }
            };
            report.latency.record(call, started.elapsed());
            if (200..300).contains(&status) {
                return match serde_json::from_slice(&body) {
                    Ok(value) => Outcome::Done(value),
                    Err(_) => bad_response(report, call, "body is not JSON"),
                };
            }
            *report.http_errors.entry(status).or_default() += 1;
            if (400..500).contains(&status) {
                let refusal = Refusal { call, status, detail: detail(&body) };
                tracing::warn!(call = call.name(), status, detail = %refusal.detail, "refused");
                return Outcome::Refused(refusal);
            }
            tracing::debug!(call = call.name(), attempt, status, "transient answer; retrying");
        }
        tracing::warn!(call = call.name(), attempts = self.retry.attempts, "giving up after transient errors");
        Outcome::Failed
    }
}

/// Counts a 2xx answer of the wrong shape.
fn bad_response<T>(report: &mut WorkerReport, call: Call, why: &str) -> Outcome<T> {
    report.bad_responses += 1;
    tracing::warn!(call = call.name(), why, "unexpected answer");
    Outcome::Failed
}

/// `d` ± 25 % (backon's own jitter only lengthens a pause, by up to itself; ADC's workers
/// spread both ways).
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.75..1.25))
}

/// What an error body says: DRF's `detail`, Antenna's `error`, else the body, shortened.
pub fn detail(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        for key in ["detail", "error"] {
            if let Some(s) = value.get(key).and_then(Value::as_str) {
                return s.to_string();
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "(empty body)".into(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_come_from_drf_antenna_or_the_raw_body() {
        assert_eq!(detail(br#"{"detail": "Invalid token."}"#), "Invalid token.");
        assert_eq!(detail(br#"{"error": "Task queue temporarily unavailable"}"#), "Task queue temporarily unavailable");
        assert_eq!(detail(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
        assert_eq!(detail(b""), "(empty body)");
        assert_eq!(detail("é".repeat(300).as_bytes()).chars().count(), DETAIL_CHARS + 1);
    }

    #[test]
    fn urls_keep_a_path_prefix_and_refuse_non_http() {
        let api =
            Api::new("http://127.0.0.1:8000/antenna/", "k", &["a".into(), "b".into()], Retry::default()).expect("api");
        assert_eq!(api.jobs_url.as_str(), "http://127.0.0.1:8000/antenna/api/v2/jobs");
        assert_eq!(api.job_url(7, "tasks").as_str(), "http://127.0.0.1:8000/antenna/api/v2/jobs/7/tasks/");
        assert_eq!(api.pipelines, "a,b");
        assert!(Api::new("127.0.0.1:8000", "k", &[], Retry::default()).is_err());
        assert!(Api::new("nats://127.0.0.1:4222", "k", &[], Retry::default()).is_err());
        assert!(matches!(Api::new("http://h", "bad\ntoken", &[], Retry::default()), Err(WorkerSimError::Token)));
    }
}
