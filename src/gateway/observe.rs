//! Request metrics: a count by route and status, and a latency histogram by route. The route
//! label is a fixed name given where the route is declared (`claim`, `next`, `tasks`,
//! `result`), never the path, so job ids do not become series.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::names;

/// Times the request and counts its status.
pub async fn observe(State(route): State<&'static str>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(names::GATEWAY_REQUESTS, "route" => route, "status" => status).increment(1);
    metrics::histogram!(names::GATEWAY_REQUEST_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
