//! Request bodies: the size limit (413 before reading when `Content-Length` says so, else once
//! the limit is crossed) and JSON parsing with errors that say what is wrong.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::Deserialize;

use super::{Gateway, GatewayError};

/// The whole body, within the configured limit.
pub struct Body(pub Bytes);

impl FromRequest<Arc<Gateway>> for Body {
    type Rejection = GatewayError;

    async fn from_request(req: Request, state: &Arc<Gateway>) -> Result<Self, GatewayError> {
        let limit = state.args.gateway_max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(length) = declared {
            if length > limit as u64 {
                return Err(too_large(Some(length), limit));
            }
        }
        // The router's `DefaultBodyLimit` bounds the read when no length was declared.
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(too_large(None, limit))
            }
            Err(rejection) => Err(GatewayError::BadRequest(format!("cannot read the body: {}", rejection.body_text()))),
        }
    }
}

fn too_large(length: Option<u64>, limit: usize) -> GatewayError {
    let size = length.map(|n| format!(" of {n} bytes")).unwrap_or_default();
    GatewayError::TooLarge(format!("request body{size} is over the limit of {limit} bytes"))
}

/// Parses `bytes` as a `T` (a JSON object), telling malformed JSON from JSON of the wrong
/// shape.
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, GatewayError> {
    let parsed = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            GatewayError::BadRequest(format!("malformed JSON: {e}"))
        } else {
            GatewayError::BadRequest(format!("invalid body: {e}"))
        }
    })?;
    // serde also fills a struct from an array of its fields in order; a body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(GatewayError::BadRequest("invalid body: expected a JSON object".into()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Tasks {
        batch_size: i64,
    }

    fn detail(e: GatewayError) -> String {
        match e {
            GatewayError::BadRequest(d) => d,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn tells_malformed_from_wrong_shape() {
        assert!(detail(parse::<Tasks>(b"{\"batch_size\": ").unwrap_err()).starts_with("malformed JSON"));
        assert!(detail(parse::<Tasks>(b"").unwrap_err()).starts_with("malformed JSON"));
        let wrong = detail(parse::<Tasks>(b"{\"batch_size\": \"24\"}").unwrap_err());
        assert!(wrong.starts_with("invalid body") && wrong.contains("invalid type"), "{wrong}");
        assert!(detail(parse::<Tasks>(b"[24]").unwrap_err()).contains("expected a JSON object"));
        let missing = detail(parse::<Tasks>(b"{}").unwrap_err());
        assert!(missing.contains("missing field `batch_size`"), "{missing}");
        assert_eq!(parse::<Tasks>(b"{\"batch_size\": 24, \"client_info\": {}}").map(|t| t.batch_size).ok(), Some(24));
    }
}
