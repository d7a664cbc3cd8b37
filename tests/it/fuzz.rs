//! Property-based fuzzing of everything that reads a worker's or a message's bytes before any
//! I/O: the gateway's body parsing and depth check, job ids in paths, the claim query, and
//! ingest's message decoder. Each must return, never panic, and refuse with a client error
//! (4xx) — never a 5xx, which would tell a worker to retry what can never succeed.
//!
//! A few seconds per run: the cheap targets get 2,000 cases, the decoder 500.

use std::collections::HashMap;

use axum::extract::Query;
use axum::http::Uri;
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use tally::gateway::body::{self, MAX_DEPTH};
use tally::gateway::claim::{ClaimQuery, Pipelines};
use tally::gateway::tasks::job_id;
use tally::gateway::GatewayError;
use tally::ingest::decode::{self, Envelope, RejectReason};

/// The tasks body.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Tasks {
    batch_size: i64,
}

/// The result body's envelope, as the gateway reads it.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Results<'a> {
    #[serde(borrow)]
    results: Vec<&'a serde_json::value::RawValue>,
}

fn client_error(e: &GatewayError) -> bool {
    e.status().is_client_error()
}

/// Text made of JSON's own pieces (brackets, quotes, escapes, numbers, words) and arbitrary
/// characters, so that most cases get past the first byte of the parser.
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("\\\"".to_string()),
        Just("\\u00".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just(" ".to_string()),
        Just("\"batch_size\":".to_string()),
        Just("\"results\":".to_string()),
        Just("\"reply_subject\":".to_string()),
        Just("-0.5e308".to_string()),
        Just("1e999".to_string()),
        Just("9223372036854775808".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        "[a-z0-9_]{0,4}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..120).prop_map(|pieces| pieces.concat())
}

/// Any JSON value, up to about 8 levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,6}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// How deeply `v` nests arrays and objects.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `inner` wrapped in `n` arrays or objects (chosen by the bits of `shape`).
fn nest(inner: &str, n: usize, shape: u64) -> String {
    let mut open = String::new();
    let mut close = String::new();
    for i in 0..n {
        if shape >> (i % 64) & 1 == 0 {
            open.push('[');
            close.insert(0, ']');
        } else {
            open.push_str("{\"k\":");
            close.insert(0, '}');
        }
    }
    format!("{open}{inner}{close}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn bodies_never_panic_and_errors_are_client_errors(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for e in [
            body::parse::<Tasks>(&bytes).err(),
            body::parse::<Value>(&bytes).err(),
            body::parse::<Results>(&bytes).err(),
            body::check_depth(&bytes).err(),
        ].into_iter().flatten() {
            prop_assert!(client_error(&e), "{e:?}");
        }
    }

    #[test]
    fn jsonish_bodies_never_panic_and_errors_are_client_errors(text in jsonish()) {
        for e in [
            body::parse::<Tasks>(text.as_bytes()).err(),
            body::parse::<HashMap<String, Value>>(text.as_bytes()).err(),
            body::parse::<Results>(text.as_bytes()).err(),
            body::check_depth(text.as_bytes()).err(),
        ].into_iter().flatten() {
            prop_assert!(client_error(&e), "{e:?}");
        }
    }

    #[test]
    fn depth_check_agrees_with_the_real_depth(v in json_value()) {
        let text = serde_json::to_string(&v).expect("serializes");
        prop_assert_eq!(body::check_depth(text.as_bytes()).is_ok(), depth(&v) <= MAX_DEPTH);
        let pretty = serde_json::to_string_pretty(&v).expect("serializes");
        prop_assert_eq!(body::check_depth(pretty.as_bytes()).is_ok(), depth(&v) <= MAX_DEPTH);
    }

    #[test]
    fn deep_bodies_are_refused_without_reaching_serde(n in 0usize..3000, shape in any::<u64>(), tail in jsonish()) {
        let text = nest(&format!("1{tail}"), n, shape);
        let wrapped = format!("{{\"batch_size\": {text}}}");
        let parsed = body::parse::<Value>(wrapped.as_bytes());
        if n + 1 > MAX_DEPTH && tail.is_empty() {
            prop_assert!(
                matches!(&parsed, Err(GatewayError::BadRequest(d)) if d.contains("nested deeper")),
                "{:?}",
                parsed.map(|_| ())
            );
        } else if let Err(e) = parsed {
            prop_assert!(client_error(&e), "{e:?}");
        }
    }

    #[test]
    fn job_ids_are_canonical_positive_decimals(raw in ".{0,24}") {
        match job_id(&raw) {
            Ok(id) => {
                prop_assert!(id > 0);
                prop_assert_eq!(id.to_string(), raw);
            }
            Err(e) => prop_assert!(matches!(e, GatewayError::NotFound), "{e:?}"),
        }
    }

    #[test]
    fn every_positive_i64_is_its_own_job_id(id in 1i64..=i64::MAX, sign in prop_oneof![Just(""), Just("+"), Just("0"), Just(" ")]) {
        let raw = format!("{sign}{id}");
        prop_assert_eq!(job_id(&raw).ok(), sign.is_empty().then_some(id));
    }

    #[test]
    fn claim_queries_never_panic(
        pairs in prop::collection::vec(
            (prop_oneof![
                Just("pipeline__slug__in".to_string()),
                Just("limit".to_string()),
                Just("offset".to_string()),
                Just("ids_only".to_string()),
                Just("dispatch_mode".to_string()),
                ".{0,6}",
            ], prop_oneof![".{0,12}", "[a-z,\\- 0-9]{0,12}", any::<char>().prop_map(String::from)]),
            0..6,
        )
    ) {
        match ClaimQuery::parse(&pairs) {
            Ok(q) => {
                prop_assert!((1..=100).contains(&q.limit));
                if let Pipelines::Among(slugs) = &q.pipelines {
                    prop_assert!(slugs.windows(2).all(|w| w[0] < w[1]), "sorted, deduplicated: {slugs:?}");
                    for s in slugs {
                        prop_assert!(!s.is_empty() && s.trim() == s && !s.contains(',') && !s.chars().any(char::is_control));
                    }
                }
            }
            Err(e) => prop_assert!(matches!(e, GatewayError::BadRequest(_)), "{e:?}"),
        }
    }

    #[test]
    fn raw_query_strings_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        // Any bytes, percent-encoded into a query string, as axum's Query extractor reads it.
        let mut query = String::from("pipeline__slug__in=");
        for b in &bytes {
            match b {
                b'a'..=b'z' | b'0'..=b'9' | b',' | b'&' | b'=' | b'+' | b'-' => query.push(*b as char),
                _ => query.push_str(&format!("%{b:02X}")),
            }
        }
        let uri: Uri = format!("/api/v2/jobs?{query}").parse().expect("percent-encoded query is a URI");
        if let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(&uri) {
            if let Err(e) = ClaimQuery::parse(&pairs) {
                prop_assert!(client_error(&e), "{e:?}");
            }
        }
    }
}

/// Rejections of a result message that are the database's verdict, not the message's.
fn decoder_must_not_say(code: RejectReason) -> bool {
    code == RejectReason::SaveFailed
}

fn envelope() -> Envelope<'static> {
    Envelope { subject: "tally.results.7", prefix: "tally.results", max_bytes: 1 << 20 }
}

/// A `PipelineTaskResult` around `result`.
fn result_message(result: &Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "reply_subject": "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3",
        "result": result,
    }))
    .expect("serializes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn the_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        if let Err(r) = decode::decode(&envelope(), &bytes) {
            prop_assert!(!decoder_must_not_say(r.code), "{r}");
        }
    }

    #[test]
    fn the_decoder_never_panics_on_jsonish_text(text in jsonish(), n in 0usize..300, shape in any::<u64>()) {
        for payload in [text.clone(), nest(&text, n, shape), format!("{{\"reply_subject\": \"x\", \"result\": {text}}}")] {
            if let Err(r) = decode::decode(&envelope(), payload.as_bytes()) {
                prop_assert!(!decoder_must_not_say(r.code), "{r}");
            }
        }
    }

    #[test]
    fn the_decoder_never_panics_on_results_of_any_shape(v in json_value(), pipeline in ".{0,8}", image in any::<i64>()) {
        let shaped = serde_json::json!({
            "pipeline": pipeline,
            "algorithms": {"a": v.clone()},
            "total_time": v.clone(),
            "source_images": [{"id": image.to_string(), "url": v.clone()}],
            "detections": [{"source_image_id": image, "bbox": v.clone(), "algorithm": v.clone(),
                            "timestamp": v.clone(), "classifications": [v.clone()]}],
        });
        for result in [&v, &shaped] {
            if let Err(r) = decode::decode(&envelope(), &result_message(result)) {
                prop_assert!(!decoder_must_not_say(r.code), "{r}");
            }
        }
    }
}
