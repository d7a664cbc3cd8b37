//! What a simulated worker run did: counters, HTTP errors by status, latency histograms per
//! call, why it stopped; merged across the worker loops and rendered as a table or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::stats::human_us;
use tally::table::{thousands, Table};

/// A worker API call, for latencies and refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    /// `GET /api/v2/jobs?ids_only=1…`.
    Claim,
    /// `POST /api/v2/jobs/{id}/tasks/`.
    Tasks,
    /// `POST /api/v2/jobs/{id}/result/`.
    Result,
}

impl Call {
    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Call::Claim => "claim",
            Call::Tasks => "tasks",
            Call::Result => "result",
        }
    }
}

/// A call the gateway refused (4xx): what was asked, and what it said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The call.
    pub call: Call,
    /// The HTTP status.
    pub status: u16,
    /// The body's `detail` (or the body, shortened), for the operator.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} answered {}: {}", self.call.name(), self.status, self.detail)
    }
}

/// Why a run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    /// No loop fetched, processed or posted anything for this long.
    Idle(Duration),
    /// The task limit was reached (every task taken was processed and posted).
    TaskLimit(u64),
    /// The caller cancelled (Ctrl-C); results already computed were posted.
    #[default]
    Cancelled,
    /// A refusal no retry can fix (bad token, wrong URL): every loop stopped at once.
    Refused(Refusal),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Idle(d) => write!(f, "idle for {:.1} s", d.as_secs_f64()),
            StopReason::TaskLimit(n) => write!(f, "task limit of {n} reached"),
            StopReason::Cancelled => write!(f, "cancelled"),
            StopReason::Refused(r) => write!(f, "refused: {r}"),
        }
    }
}

/// Latencies of the three calls, in microseconds, one sample per HTTP exchange (retries
/// included, whatever the status).
#[derive(Clone, Debug)]
pub struct Latencies {
    /// Claims.
    pub claim: Histogram<u64>,
    /// Task fetches.
    pub tasks: Histogram<u64>,
    /// Result posts.
    pub result: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        // 1 µs to 10 min at 3 significant digits: every timeout fits.
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid");
        Latencies { claim: h(), tasks: h(), result: h() }
    }
}

impl Latencies {
    /// The histogram of `call`.
    pub fn of(&self, call: Call) -> &Histogram<u64> {
        match call {
            Call::Claim => &self.claim,
            Call::Tasks => &self.tasks,
            Call::Result => &self.result,
        }
    }

    fn of_mut(&mut self, call: Call) -> &mut Histogram<u64> {
        match call {
            Call::Claim => &mut self.claim,
            Call::Tasks => &mut self.tasks,
            Call::Result => &mut self.result,
        }
    }

    /// Records one exchange.
    pub fn record(&mut self, call: Call, took: Duration) {
        self.of_mut(call).saturating_record(took.as_micros().clamp(1, u128::from(u64::MAX)) as u64);
    }
}

/// What a run (or one of its loops) did.
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    /// Wall time of the run.
    pub elapsed: Duration,
    /// From the start to the last task fetched, processed or posted: the run without its idle
    /// tail, which rates are computed over.
    pub busy: Duration,
    /// Worker loops that ran.
    pub loops: usize,
    /// Claims answered with a job.
    pub claims: u64,
    /// Claims answered with no job.
    pub empty_claims: u64,
    /// Tasks received from `/tasks`.
    pub tasks_fetched: u64,
    /// `/tasks` calls answered with no task (the job is drained, for now).
    pub empty_fetches: u64,
    /// Tasks whose image id was not a number: answered with an error result, as ADC answers a
    /// failed download.
    pub error_results: u64,
    /// Tasks received but never processed because the run was cancelled (NATS redelivers
    /// them after the ack wait).
    pub tasks_abandoned: u64,
    /// Results in POSTs the gateway accepted (2xx).
    pub results_posted: u64,
    /// POSTs the gateway accepted.
    pub result_posts: u64,
    /// Results in POSTs the gateway refused (4xx): not retried.
    pub results_refused: u64,
    /// Results given up after transient errors on every attempt (NATS redelivers their tasks
    /// after the ack wait).
    pub results_dropped: u64,
    /// Non-2xx answers by status, retried ones included.
    pub http_errors: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (connect error, timeout, broken body).
    pub transport_errors: u64,
    /// 2xx answers whose body was not the expected JSON shape.
    pub bad_responses: u64,
    /// Attempts repeated after a transient error.
    pub retries: u64,
    /// Latency of each call.
    pub latency: Latencies,
    /// Why the run ended.
    pub stopped: StopReason,
}

impl WorkerReport {
    /// Adds the counts and latencies of `other` (a loop's) into this one.
    pub fn merge(&mut self, other: &WorkerReport) {
        self.claims += other.claims;
        self.empty_claims += other.empty_claims;
        self.tasks_fetched += other.tasks_fetched;
        self.empty_fetches += other.empty_fetches;
        self.error_results += other.error_results;
        self.tasks_abandoned += other.tasks_abandoned;
        self.results_posted += other.results_posted;
        self.result_posts += other.result_posts;
        self.results_refused += other.results_refused;
        self.results_dropped += other.results_dropped;
        for (status, n) in &other.http_errors {
            *self.http_errors.entry(*status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.bad_responses += other.bad_responses;
        self.retries += other.retries;
        for call in [Call::Claim, Call::Tasks, Call::Result] {
            let _ = self.latency.of_mut(call).add(other.latency.of(call));
        }
    }

    /// Results posted per second of busy time.
    pub fn results_per_second(&self) -> f64 {
        let secs = if self.busy.is_zero() { self.elapsed } else { self.busy }.as_secs_f64();
        self.results_posted as f64 / secs.max(1e-9)
    }

    /// True when the run lost or was refused anything: a refusal stopped it, or results were
    /// refused or dropped.
    pub fn failed(&self) -> bool {
        matches!(self.stopped, StopReason::Refused(_)) || self.results_refused > 0 || self.results_dropped > 0
    }

    /// The report as one JSON document (latencies in milliseconds).
    pub fn to_json(&self) -> Value {
        let mut latency = serde_json::Map::new();
        for call in [Call::Claim, Call::Tasks, Call::Result] {
            let h = self.latency.of(call);
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
            latency.insert(
                call.name().into(),
                json!({"requests": h.len(), "mean_ms": h.mean() / 1e3, "p50_ms": ms(0.5), "p90_ms": ms(0.9),
                       "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1e3}),
            );
        }
        let refusal = match &self.stopped {
            StopReason::Refused(r) => json!({"call": r.call.name(), "status": r.status, "detail": r.detail}),
            _ => Value::Null,
        };
        json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "busy_s": self.busy.as_secs_f64(),
            "loops": self.loops,
            "stopped": self.stopped.to_string(),
            "refusal": refusal,
            "claims": self.claims,
            "empty_claims": self.empty_claims,
            "tasks_fetched": self.tasks_fetched,
            "empty_fetches": self.empty_fetches,
            "error_results": self.error_results,
            "tasks_abandoned": self.tasks_abandoned,
            "results_posted": self.results_posted,
            "result_posts": self.result_posts,
            "results_refused": self.results_refused,
            "results_dropped": self.results_dropped,
            "results_per_second": self.results_per_second(),
            "http_errors": self.http_errors.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "transport_errors": self.transport_errors,
            "bad_responses": self.bad_responses,
            "retries": self.retries,
            "latency": latency,
        })
    }

    /// The summary printed at the end of `tally-tools worker-sim`: counters, then latencies.
    pub fn render(&self) -> String {
        let mut counts = Table::new(&["", ">count", "note"]);
        let mut row = |name: &str, n: u64, note: String| counts.row(vec![name.into(), thousands(n), note]);
        row("claims", self.claims + self.empty_claims, format!("{} empty", thousands(self.empty_claims)));
        row("tasks fetched", self.tasks_fetched, format!("{} empty fetches", thousands(self.empty_fetches)));
        row(
            "results posted",
            self.results_posted,
            format!("in {} POSTs, {:.1} results/s", thousands(self.result_posts), self.results_per_second()),
        );
        row("results refused (4xx)", self.results_refused, "not retried".into());
        row("results dropped", self.results_dropped, "transient errors on every attempt".into());
        row("error results", self.error_results, "tasks without a numeric image id".into());
        row("tasks abandoned", self.tasks_abandoned, "cancelled before processing".into());
        let statuses: Vec<String> = self.http_errors.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
        row("HTTP errors", self.http_errors.values().sum(), statuses.join(", "));
        row("transport errors", self.transport_errors, "no HTTP answer".into());
        row("bad responses", self.bad_responses, "2xx with an unexpected body".into());
        row("retries", self.retries, String::new());

        let mut latency = Table::new(&["call", ">requests", ">mean", ">p50", ">p90", ">p99", ">max"]);
        for call in [Call::Claim, Call::Tasks, Call::Result] {
            let h = self.latency.of(call);
            let at = |q: f64| human_us(h.value_at_quantile(q) as f64);
            let cells = if h.is_empty() {
                vec![call.name().into(), "0".into()]
            } else {
                vec![
                    call.name().into(),
                    thousands(h.len()),
                    human_us(h.mean()),
                    at(0.5),
                    at(0.9),
                    at(0.99),
                    human_us(h.max() as f64),
                ]
            };
            latency.row(cells);
        }
        format!(
            "worker-sim: {} loop(s), {:.1} s ({:.1} s busy), stopped: {}\n\n{}\n{}",
            self.loops,
            self.elapsed.as_secs_f64(),
            self.busy.as_secs_f64(),
            self.stopped,
            counts.render(),
            latency.render()
        )
    }
}
