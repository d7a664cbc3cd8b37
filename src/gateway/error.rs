//! Every way a worker request can fail, and the JSON each answers with.
//!
//! Bodies follow Django REST framework's `{"detail": …}` except where Antenna's views answer
//! with their own shapes (the two 503s of `/tasks` and `/result`), which workers may parse.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use thiserror::Error;

use crate::gateway::Gateway;

/// A request the gateway refuses or cannot serve now.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// 401: no usable `Authorization: Token <key>` (DRF's messages).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 400: the request is malformed or does not apply to the job.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such job (or route).
    #[error("not found")]
    NotFound,
    /// 415: a body that is not sent as JSON; holds the request's `Content-Type` ("" when
    /// absent), as DRF's `UnsupportedMediaType`.
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    /// 413: the body is larger than the configured limit, or one result larger than NATS takes.
    #[error("{0}")]
    TooLarge(String),
    /// 503 `{"error": "Task queue temporarily unavailable"}` (Antenna's `/tasks` answer).
    #[error("task queue unavailable: {0}")]
    TaskQueue(#[source] crate::BoxError),
    /// 503 `{"status": "error", "job_id", "detail"}` (Antenna's `/result` answer); some results
    /// of the request may have been published already (as with Antenna).
    #[error("result queue unavailable for job {job_id}: {source}")]
    ResultQueue {
        /// The job of the request.
        job_id: i64,
        /// What failed, for the log.
        #[source]
        source: crate::BoxError,
    },
    /// 503: Postgres failed; the request can be retried.
    #[error("database: {0}")]
    Database(#[source] crate::BoxError),
    /// 503: the gateway has not connected yet.
    #[error("{0}")]
    Starting(&'static str),
}

/// Marks a response whose request failed on a kept prepared statement that a schema change
/// made stale ([`crate::store::is_stale_statement`]); [`forget_stale_statements`] then has the
/// pool prepare every statement afresh.
#[derive(Clone, Copy, Debug)]
pub struct StaleStatement;

impl GatewayError {
    /// A database error (logged; the worker sees a generic 503).
    pub fn db(e: impl Into<crate::BoxError>) -> GatewayError {
        GatewayError::Database(e.into())
    }

    /// Whether this is a database error of a kept prepared statement made stale by a schema
    /// change.
    pub fn is_stale_statement(&self) -> bool {
        match self {
            GatewayError::Database(e) => {
                e.downcast_ref::<tokio_postgres::Error>().is_some_and(crate::store::is_stale_statement)
            }
            _ => false,
        }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::TaskQueue(_)
            | GatewayError::ResultQueue { .. }
            | GatewayError::Database(_)
            | GatewayError::Starting(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let stale = self.is_stale_statement();
        let mut response = self.response();
        if stale {
            response.extensions_mut().insert(StaleStatement);
        }
        response
    }
}

impl GatewayError {
    /// The response, in Antenna's shapes (logged as it is made).
    fn response(self) -> Response {
        match &self {
            GatewayError::Database(_) | GatewayError::TaskQueue(_) | GatewayError::ResultQueue { .. } => {
                tracing::warn!(error = %self, "worker request failed")
            }
            _ => tracing::debug!(error = %self, "worker request refused"),
        }
        match self {
            GatewayError::Unauthorized(detail) => {
                (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Token")], Json(json!({"detail": detail})))
                    .into_response()
            }
            GatewayError::BadRequest(detail) => {
                (StatusCode::BAD_REQUEST, Json(json!({"detail": detail}))).into_response()
            }
            GatewayError::NotFound => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response(),
            GatewayError::TooLarge(detail) => {
                (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"detail": detail}))).into_response()
            }
            GatewayError::UnsupportedMediaType(media_type) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({"detail": format!("Unsupported media type \"{media_type}\" in request.")})),
            )
                .into_response(),
            GatewayError::TaskQueue(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "Task queue temporarily unavailable"})))
                    .into_response()
            }
            GatewayError::ResultQueue { job_id, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "error", "job_id": job_id, "detail": "Task queue temporarily unavailable"})),
            )
                .into_response(),
            GatewayError::Database(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"detail": "Database temporarily unavailable"})))
                    .into_response()
            }
            GatewayError::Starting(detail) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"detail": detail}))).into_response()
            }
        }
    }
}

/// Middleware: after a request that failed on a stale prepared statement
/// ([`StaleStatement`]), every pooled session's kept statements are forgotten, so that the
/// next requests prepare them afresh: a migration costs one 503, not one per session for as
/// long as the daemon runs.
pub async fn forget_stale_statements(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.extensions().get::<StaleStatement>().is_some() {
        if let Ok(store) = gateway.store() {
            tracing::warn!("a schema change made the gateway's prepared statements stale; preparing them again");
            store.forget_statements();
        }
    }
    response
}

/// Paths the gateway does not serve.
pub async fn not_found() -> GatewayError {
    GatewayError::NotFound
}

/// Middleware: a client error answered without a JSON body (axum's own rejections are plain
/// text, e.g. a path parameter that is not UTF-8 once percent-decoded) gets DRF's shape,
/// `{"detail": <the text>}`, with its status kept. The gateway's own errors are JSON already.
pub async fn json_rejections(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    // Rejection texts are short; anything longer is cut rather than buffered whole.
    let text = match axum::body::to_bytes(response.into_body(), 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let detail = if text.is_empty() { status.canonical_reason().unwrap_or("Bad request").to_string() } else { text };
    (status, Json(json!({"detail": detail}))).into_response()
}

/// A served path with another method (DRF's message).
pub async fn method_not_allowed(method: Method) -> Response {
    let body = Json(json!({"detail": format!("Method \"{method}\" not allowed.")}));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}
