//! Request bodies: the size limit (413 before reading when `Content-Length` says so, else once
//! the limit is crossed), the media type (415 unless JSON, as DRF), the nesting depth (400
//! beyond [`MAX_DEPTH`], found by a linear scan before any parser recurses) and JSON parsing
//! with errors that say what is wrong.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::Deserialize;

use super::{Gateway, GatewayError};

/// Deepest nesting of arrays and objects a body may have. A real result is about 6 levels
/// deep (`results[].result.detections[].classifications[].scores[]`); serde_json's own
/// recursion limit (128) is a second guard, not the first.
pub const MAX_DEPTH: usize = 64;

/// The whole body, within the configured limit, sent as JSON (or empty).
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
        let content_type =
            req.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let json = content_type.as_deref().is_some_and(is_json);
        if !json && declared.is_some_and(|n| n > 0) {
            return Err(GatewayError::UnsupportedMediaType(content_type.unwrap_or_default()));
        }
        // The router's `DefaultBodyLimit` bounds the read when no length was declared.
        match Bytes::from_request(req, state).await {
            // DRF picks a parser only for a body that has content: an empty one parses as `{}`
            // whatever its media type (and then fails as a body missing its fields).
            Ok(bytes) if !json && !bytes.is_empty() => {
                Err(GatewayError::UnsupportedMediaType(content_type.unwrap_or_default()))
            }
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

/// Whether a `Content-Type` value names JSON: `application/json` or any `…/…+json` type,
/// with any parameters (`; charset=utf-8`), in any case. DRF's `JSONParser` takes only
/// `application/json`; `+json` types (`application/vnd.api+json`, …) are accepted as well.
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    let token = |s: &str| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '/');
    token(kind) && token(subtype) && (essence == "application/json" || subtype.ends_with("+json"))
}

/// Refuses (400) a body whose arrays and objects nest deeper than [`MAX_DEPTH`]. One linear
/// pass, no recursion and no allocation: brackets inside strings (escapes included) do not
/// count. Whether the body is valid JSON is left to the parser.
pub fn check_depth(bytes: &[u8]) -> Result<(), GatewayError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(GatewayError::BadRequest(format!("JSON nested deeper than {MAX_DEPTH} levels")));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses `bytes` as a `T` (a JSON object), telling malformed JSON from JSON of the wrong
/// shape; a body nested deeper than [`MAX_DEPTH`] is refused before it is parsed.
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, GatewayError> {
    check_depth(bytes)?;
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

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ",
            "application/vnd.api+json",
            "application/problem+json; q=1",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for refused in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "json",
            "application/jsonx",
            "text/json+",
            "application/",
            "/json",
            "application/ json",
            "+json",
            "application/json/x",
        ] {
            assert!(!is_json(refused), "{refused}");
        }
    }

    #[test]
    fn depth_is_counted_outside_strings() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_depth(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert!(check_depth(nested(MAX_DEPTH + 1).as_bytes()).is_err());
        // Brackets in strings, escaped quotes and escaped backslashes.
        let s = format!("{{\"a\": \"{}\\\"{}\\\\\", \"b\": [1]}}", "[".repeat(500), "{".repeat(500));
        assert!(check_depth(s.as_bytes()).is_ok(), "{s}");
        let s = format!("[\"\\\\\"{}", "[".repeat(MAX_DEPTH));
        assert!(check_depth(s.as_bytes()).is_err(), "an escaped backslash does not escape the closing quote: {s}");
        // Depth is the current nesting, not the number of brackets.
        assert!(check_depth("[[]]".repeat(10_000).as_bytes()).is_ok());
    }

    #[test]
    fn five_thousand_levels_are_refused_before_serde() {
        for body in [
            format!("{{\"batch_size\": {}{}}}", "[".repeat(5000), "]".repeat(5000)),
            format!("{{\"a\":{}1{}}}", "{\"a\":".repeat(5000), "}".repeat(5000)),
            "[".repeat(5000),
        ] {
            let d = detail(parse::<Tasks>(body.as_bytes()).unwrap_err());
            assert!(d.contains("nested deeper than 64"), "{d}");
        }
    }
}
