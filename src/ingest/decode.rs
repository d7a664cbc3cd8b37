//! Decoding and validation of one result message (`PipelineTaskResult`, SPEC §3) without any
//! database: everything that can be rejected from the bytes alone is rejected here, with a
//! stable reason code for the dead-letter table and metrics.
//!
//! Shapes follow Antenna's pydantic (v1) models: unknown fields are ignored, image ids are
//! strings of digits (numbers are accepted too), and a result is a `PipelineResultsResponse`
//! when it carries `pipeline`, else a `PipelineResultsError` when it carries `error`.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Longest label, algorithm key or URL that fits Antenna's `varchar(255)` columns.
pub const MAX_TEXT: usize = 255;

/// Why a message is rejected. The code is stable (dead letters, metrics labels); the detail
/// says what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason.
    pub code: RejectReason,
    /// Human-readable detail.
    pub detail: String,
}

impl Rejection {
    /// A rejection with `code` and `detail`.
    pub fn new(code: RejectReason, detail: impl Into<String>) -> Self {
        Rejection { code, detail: detail.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// The reason a message is dead-lettered; [`RejectReason::as_str`] is the code stored in
/// `tally.dead_letter.reason_code` and used as the `reason` metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// `oversized`: the body is larger than the configured limit.
    Oversized,
    /// `invalid_json`: the body is not JSON.
    InvalidJson,
    /// `wrong_shape`: JSON, but not a `PipelineTaskResult`.
    WrongShape,
    /// `bad_subject`: the NATS subject does not name a job (`<prefix>.{job_id}`).
    BadSubject,
    /// `foreign_reply_subject`: the reply subject is not an ack subject of this job's task
    /// consumer.
    ForeignReplySubject,
    /// `bad_bbox`: a bounding box with a non-finite coordinate or `x2 < x1` / `y2 < y1`.
    BadBbox,
    /// `bad_scores`: a classification with no scores, or a non-finite score or logit.
    BadScores,
    /// `text_too_long`: a label, key or URL longer than 255 characters.
    TextTooLong,
    /// `bad_timestamp`: a timestamp that is not an ISO 8601 date-time.
    BadTimestamp,
    /// `unknown_pipeline`: the pipeline slug is not in `ml_pipeline`.
    UnknownPipeline,
    /// `pipeline_not_configured`: an algorithm key that is not linked to the pipeline, or a
    /// pipeline without exactly one detector.
    PipelineNotConfigured,
    /// `unknown_image`: an image id that is not in `main_sourceimage`.
    UnknownImage,
    /// `save_failed`: saving failed for a reason that retrying will not fix (found by saving
    /// alone).
    SaveFailed,
    /// `object_missing`: a claim-check message whose object does not exist (deleted or
    /// expired).
    ObjectMissing,
    /// `task_ack_failed`: a saved result whose task ack JetStream never confirmed (after every
    /// retry).
    TaskAckFailed,
}

impl RejectReason {
    /// Every reason, for documentation and metrics.
    pub const ALL: [RejectReason; 15] = [
        RejectReason::Oversized,
        RejectReason::InvalidJson,
        RejectReason::WrongShape,
        RejectReason::BadSubject,
        RejectReason::ForeignReplySubject,
        RejectReason::BadBbox,
        RejectReason::BadScores,
        RejectReason::TextTooLong,
        RejectReason::BadTimestamp,
        RejectReason::UnknownPipeline,
        RejectReason::PipelineNotConfigured,
        RejectReason::UnknownImage,
        RejectReason::SaveFailed,
        RejectReason::ObjectMissing,
        RejectReason::TaskAckFailed,
    ];

    /// The stable code (dead letters, metrics labels, the gateway's refusals).
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::Oversized => "oversized",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::WrongShape => "wrong_shape",
            RejectReason::BadSubject => "bad_subject",
            RejectReason::ForeignReplySubject => "foreign_reply_subject",
            RejectReason::BadBbox => "bad_bbox",
            RejectReason::BadScores => "bad_scores",
            RejectReason::TextTooLong => "text_too_long",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::UnknownPipeline => "unknown_pipeline",
            RejectReason::PipelineNotConfigured => "pipeline_not_configured",
            RejectReason::UnknownImage => "unknown_image",
            RejectReason::SaveFailed => "save_failed",
            RejectReason::ObjectMissing => "object_missing",
            RejectReason::TaskAckFailed => "task_ack_failed",
        }
    }

    /// The reason whose code is `code`, if it is one (a refusal's header names one).
    pub fn from_code(code: &str) -> Option<Self> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated result message.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultMessage {
    /// The job named by the NATS subject.
    pub job_id: i64,
    /// The task's ack subject (`$JS.ACK.job_{id}.job-{id}-consumer.…`).
    pub reply_subject: String,
    /// What the worker sent.
    pub body: ResultBody,
}

/// A `PipelineResultsResponse` or a `PipelineResultsError`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultBody {
    /// Detections and classifications for some images.
    Response(PipelineResults),
    /// The worker could not process an image.
    Error {
        /// What went wrong, as the worker said it.
        error: String,
        /// The image, when the worker knew it.
        image_id: Option<i64>,
    },
}

/// The parts of a `PipelineResultsResponse` that `save_results` uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineResults {
    /// The pipeline slug.
    pub pipeline: String,
    /// `source_images[].id`, in message order.
    pub source_images: Vec<i64>,
    /// The detections, in message order.
    pub detections: Vec<DetectionResult>,
}

/// One detection of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionResult {
    /// The image it was found on.
    pub image_id: i64,
    /// `[x1, y1, x2, y2]`, or `None` for a null marker.
    pub bbox: Option<[f64; 4]>,
    /// The detector's key.
    pub algorithm: String,
    /// When the detector ran (ISO 8601, naive means the configured time zone).
    pub timestamp: Option<String>,
    /// The crop's URL, if any.
    pub crop_image_url: Option<String>,
    /// The classifications made of this detection, in message order.
    pub classifications: Vec<ClassificationResult>,
}

/// One classification of a detection.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationResult {
    /// The label, resolved to a taxon by name or search name.
    pub label: String,
    /// Calibrated scores (non-empty, finite).
    pub scores: Vec<f64>,
    /// Raw logits, if sent.
    pub logits: Option<Vec<f64>>,
    /// The classifier's key.
    pub algorithm: String,
    /// Whether this is a pipeline's final classification.
    pub terminal: bool,
    /// When the classifier ran.
    pub timestamp: Option<String>,
}

impl ClassificationResult {
    /// `max(scores)`, the stored `score` (scores are non-empty and finite once validated).
    pub fn score(&self) -> f64 {
        self.scores.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

impl ResultMessage {
    /// The images this result is about (processed or failed), deduplicated, in order.
    pub fn image_ids(&self) -> Vec<i64> {
        let mut ids = Vec::new();
        match &self.body {
            ResultBody::Response(r) => {
                for id in r.source_images.iter().chain(r.detections.iter().map(|d| &d.image_id)) {
                    if !ids.contains(id) {
                        ids.push(*id);
                    }
                }
            }
            ResultBody::Error { image_id, .. } => ids.extend(image_id),
        }
        ids
    }
}

// ---- wire shapes -------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireTask {
    reply_subject: String,
    result: WireResult,
}

#[derive(Deserialize)]
struct WireResult {
    pipeline: Option<String>,
    #[serde(default)]
    source_images: Option<Vec<WireImage>>,
    #[serde(default)]
    detections: Option<Vec<WireDetection>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Option<String>>,
    #[serde(default, deserialize_with = "opt_image_id")]
    image_id: Option<i64>,
}

#[derive(Deserialize)]
struct WireImage {
    #[serde(deserialize_with = "image_id")]
    id: i64,
}

#[derive(Deserialize)]
struct WireBbox {
    x1: f64,
    y1: f64,
    x2: f64,
    y2: f64,
}

#[derive(Deserialize)]
struct WireAlgorithm {
    key: String,
}

#[derive(Deserialize)]
struct WireDetection {
    #[serde(deserialize_with = "image_id")]
    source_image_id: i64,
    bbox: Option<WireBbox>,
    algorithm: WireAlgorithm,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    crop_image_url: Option<String>,
    #[serde(default)]
    classifications: Vec<WireClassification>,
}

#[derive(Deserialize)]
struct WireClassification {
    classification: String,
    scores: WireVector,
    #[serde(default)]
    logits: Option<WireVector>,
    algorithm: WireAlgorithm,
    #[serde(default = "yes")]
    terminal: bool,
    #[serde(default)]
    timestamp: Option<String>,
}

fn yes() -> bool {
    true
}

/// A score or logit vector as sent, each number exactly the `f64` its text denotes (a `null`
/// entry read as NaN, so that validation rejects it as it rejects any other non-finite
/// value).
///
/// With ADC's models these are 2,497 to 29,176 numbers each, most of a message's bytes, and
/// Python writes them with up to 17 digits. `serde_json`'s own number parsing is fast but
/// not correctly rounded: about one number in three of those came out one unit in the last
/// place off what was sent (and what Django, reading it with Python, would store); its
/// `float_roundtrip` feature is exact but made decoding ~1.4× slower. So `serde_json` only
/// checks the array's JSON and hands over its text, and [`fast_float2`] (Eisel–Lemire,
/// correctly rounded) reads the numbers in one pass: exact, and faster than either
/// (`cargo bench -p tally-tools --bench decode`).
struct WireVector(Vec<f64>);

impl<'de> Deserialize<'de> for WireVector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de serde_json::value::RawValue>::deserialize(d)?;
        parse_vector(raw.get()).map(WireVector).map_err(de::Error::custom)
    }
}

/// The numbers of a JSON array's text (valid JSON: `serde_json` checked it), `null` as NaN;
/// an error for anything else (a string, an object, a nested array, not an array).
fn parse_vector(text: &str) -> Result<Vec<f64>, String> {
    let bytes = text.as_bytes();
    let skip_space = |mut i: usize| {
        while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    };
    let mut i = skip_space(0);
    if bytes.get(i) != Some(&b'[') {
        return Err(format!("invalid type: {}, expected an array of numbers", kind(bytes.get(i))));
    }
    // Python writes a model's scores with ~20 bytes per number and its comma (shorter
    // vectors grow as needed).
    let mut values = Vec::with_capacity(text.len() / 20 + 1);
    i = skip_space(i + 1);
    if bytes.get(i) == Some(&b']') {
        return Ok(values);
    }
    loop {
        match bytes.get(i) {
            Some(b'-' | b'0'..=b'9') => {
                // JSON's number grammar is a subset of what fast_float2 reads.
                let (v, n) = fast_float2::parse_partial::<f64, _>(&bytes[i..])
                    .map_err(|e| format!("a number at byte {i} of a vector: {e}"))?;
                values.push(v);
                i += n;
            }
            Some(b'n') if bytes[i..].starts_with(b"null") => {
                values.push(f64::NAN);
                i += 4;
            }
            other => return Err(format!("invalid type: {}, expected a number", kind(other))),
        }
        i = skip_space(i);
        match bytes.get(i) {
            Some(b',') => i = skip_space(i + 1),
            Some(b']') => return Ok(values),
            other => return Err(format!("invalid type: {}, expected `,` or `]`", kind(other))),
        }
    }
}

/// What a JSON value starting with `first` is, for an error message.
fn kind(first: Option<&u8>) -> &'static str {
    match first {
        Some(b'"') => "string",
        Some(b'{') => "map",
        Some(b'[') => "sequence",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        Some(b'-' | b'0'..=b'9') => "number",
        _ => "end of input",
    }
}

/// A field that may be present with a `null` value (`Some(None)`) or absent (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::<String>::deserialize(d)?))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WireId {
    Int(i64),
    Text(String),
}

fn parse_id<E: de::Error>(id: WireId) -> Result<i64, E> {
    match id {
        WireId::Int(n) => Ok(n),
        WireId::Text(s) => s.trim().parse::<i64>().map_err(|_| E::custom(format!("image id {s:?} is not a number"))),
    }
}

fn image_id<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    parse_id(WireId::deserialize(d)?)
}

fn opt_image_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<WireId>::deserialize(d)?.map(parse_id).transpose()
}

// ---- decoding ----------------------------------------------------------------------------

/// Where a message came from, as far as validation needs it.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The NATS subject (`<prefix>.{job_id}`).
    pub subject: &'a str,
    /// The results subject prefix (`tally.results`).
    pub prefix: &'a str,
    /// The largest body accepted, in bytes.
    pub max_bytes: usize,
}

/// The job named by `subject` (`<prefix>.{job_id}`), the id in canonical decimal.
pub fn job_of_subject(subject: &str, prefix: &str) -> Option<i64> {
    canonical_id(subject.strip_prefix(prefix)?.strip_prefix('.')?)
}

/// A positive id written as NATS and Antenna write one: ASCII digits, no sign, no leading
/// zero, fitting in an `i64` (`"+7"`, `"07"`, `" 7"` are not ids).
pub fn canonical_id(text: &str) -> Option<i64> {
    let digits = text.as_bytes();
    if digits.is_empty() || digits.len() > 19 || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.parse().ok()
}

/// Longest reply subject accepted (real ones are under 100 bytes).
pub const MAX_REPLY_SUBJECT: usize = 256;

/// A JetStream ack subject of one of Antenna's job task consumers, checked token by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSubject {
    /// The job whose stream (`job_{id}`) and consumer (`job-{id}-consumer`) it names.
    pub job: i64,
    /// The message's sequence in the job's stream.
    pub stream_sequence: u64,
    /// How many times the task had been delivered.
    pub delivered: u64,
}

/// Parses `subject` as an ack subject that JetStream issues, in either of its two forms:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`
/// (9 tokens) or `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream
/// seq>.<consumer seq>.<timestamp>.<pending>.<token>` (12 tokens), with stream `job_{id}` and
/// consumer `job-{id}-consumer` (Antenna's names). Everything is checked: the token count, the
/// numbers (digits only), the names, and the characters (no whitespace, control character or
/// wildcard anywhere, so the subject is also a valid NATS subject and header value).
pub fn parse_ack_subject(subject: &str) -> Result<AckSubject, String> {
    if subject.len() > MAX_REPLY_SUBJECT {
        return Err(format!("is {} bytes long, over {MAX_REPLY_SUBJECT}", subject.len()));
    }
    if let Some(c) = subject.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '*' | '>')) {
        return Err(format!("contains {c:?}, which no ack subject contains"));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err("has an empty token".into());
    }
    let (names, numbers) = match tokens.as_slice() {
        ["$JS", "ACK", stream, consumer, rest @ ..] if rest.len() == 5 => ((*stream, *consumer), rest),
        ["$JS", "ACK", domain, account, stream, consumer, rest @ ..] if rest.len() == 6 => {
            let plain = |t: &str| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !plain(domain) || !plain(account) || !plain(rest[5]) {
                return Err("is not a JetStream ack subject (bad domain, account or token)".into());
            }
            ((*stream, *consumer), &rest[..5])
        }
        _ => {
            return Err(format!(
                "is not a JetStream ack subject ($JS.ACK.<stream>.<consumer> and 5 numbers, or the 12-token \
                 domain form; it has {} tokens)",
                tokens.len()
            ))
        }
    };
    let job = names.0.strip_prefix("job_").and_then(canonical_id).ok_or("does not name a stream job_<id>")?;
    if names.1 != format!("job-{job}-consumer") {
        return Err(format!("names consumer {:?}, not job-{job}-consumer", names.1));
    }
    let mut parsed = [0u64; 5];
    for (slot, token) in parsed.iter_mut().zip(numbers) {
        if !token.bytes().all(|b| b.is_ascii_digit()) || token.len() > 20 {
            return Err(format!("has {token:?} where a number belongs"));
        }
        *slot = token.parse().map_err(|_| format!("has {token:?} where a number belongs"))?;
    }
    Ok(AckSubject { job, stream_sequence: parsed[1], delivered: parsed[0] })
}

/// The job whose task consumer issued `reply_subject`, when it is a well-formed ack subject
/// ([`parse_ack_subject`]).
pub fn job_of_reply_subject(reply_subject: &str) -> Option<i64> {
    parse_ack_subject(reply_subject).ok().map(|a| a.job)
}

/// Decodes and validates one message body.
pub fn decode(envelope: &Envelope<'_>, payload: &[u8]) -> Result<ResultMessage, Rejection> {
    if payload.len() > envelope.max_bytes {
        return Err(Rejection::new(
            RejectReason::Oversized,
            format!("body of {} bytes is over the limit of {} bytes", payload.len(), envelope.max_bytes),
        ));
    }
    let job_id = job_of_subject(envelope.subject, envelope.prefix).ok_or_else(|| {
        Rejection::new(
            RejectReason::BadSubject,
            format!("subject {:?} is not {}.<job id>", envelope.subject, envelope.prefix),
        )
    })?;
    let wire: WireTask = serde_json::from_slice(payload).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Rejection::new(RejectReason::InvalidJson, e.to_string())
        } else {
            Rejection::new(RejectReason::WrongShape, format!("not a PipelineTaskResult: {e}"))
        }
    })?;
    match parse_ack_subject(&wire.reply_subject) {
        Ok(ack) if ack.job == job_id => {}
        Ok(ack) => {
            return Err(Rejection::new(
                RejectReason::ForeignReplySubject,
                format!("reply_subject {:?} is a task of job {}, not of job {job_id}", wire.reply_subject, ack.job),
            ))
        }
        Err(why) => {
            return Err(Rejection::new(
                RejectReason::ForeignReplySubject,
                format!("reply_subject {:?} {why}", wire.reply_subject),
            ))
        }
    }
    let body = body(wire.result)?;
    Ok(ResultMessage { job_id, reply_subject: wire.reply_subject, body })
}

fn body(result: WireResult) -> Result<ResultBody, Rejection> {
    let Some(pipeline) = result.pipeline else {
        return match result.error {
            Some(error) => Ok(ResultBody::Error { error: error.unwrap_or_default(), image_id: result.image_id }),
            None => Err(Rejection::new(RejectReason::WrongShape, "result has neither `pipeline` nor `error`")),
        };
    };
    let source_images = result
        .source_images
        .ok_or_else(|| Rejection::new(RejectReason::WrongShape, "result has no `source_images`"))?
        .into_iter()
        .map(|i| i.id)
        .collect();
    let detections = result
        .detections
        .ok_or_else(|| Rejection::new(RejectReason::WrongShape, "result has no `detections`"))?
        .into_iter()
        .enumerate()
        .map(|(i, d)| detection(i, d))
        .collect::<Result<_, _>>()?;
    check_text("pipeline", &pipeline)?;
    Ok(ResultBody::Response(PipelineResults { pipeline, source_images, detections }))
}

fn check_text(what: &str, text: &str) -> Result<(), Rejection> {
    if text.chars().count() > MAX_TEXT {
        return Err(Rejection::new(
            RejectReason::TextTooLong,
            format!("{what} of {} characters is over {MAX_TEXT}", text.chars().count()),
        ));
    }
    Ok(())
}

fn detection(index: usize, d: WireDetection) -> Result<DetectionResult, Rejection> {
    let bbox = match d.bbox {
        None => None,
        Some(b) => {
            let coords = [b.x1, b.y1, b.x2, b.y2];
            if coords.iter().any(|c| !c.is_finite()) {
                return Err(Rejection::new(
                    RejectReason::BadBbox,
                    format!("detection {index}: bbox {coords:?} is not finite"),
                ));
            }
            if b.x2 < b.x1 || b.y2 < b.y1 {
                return Err(Rejection::new(
                    RejectReason::BadBbox,
                    format!("detection {index}: bbox {coords:?} has x2 < x1 or y2 < y1"),
                ));
            }
            Some(coords)
        }
    };
    check_text("detection algorithm key", &d.algorithm.key)?;
    let crop_image_url = d.crop_image_url.filter(|u| !u.is_empty());
    if let Some(url) = &crop_image_url {
        check_text("crop_image_url", url)?;
    }
    check_timestamp(&d.timestamp, || format!("detection {index}"))?;
    let classifications = d
        .classifications
        .into_iter()
        .enumerate()
        .map(|(j, c)| classification(index, j, c))
        .collect::<Result<_, _>>()?;
    Ok(DetectionResult {
        image_id: d.source_image_id,
        bbox,
        algorithm: d.algorithm.key,
        timestamp: d.timestamp,
        crop_image_url,
        classifications,
    })
}

/// The values, if every one is finite (a `null` was read as NaN).
fn finite(values: WireVector) -> Option<Vec<f64>> {
    values.0.iter().all(|v| v.is_finite()).then_some(values.0)
}

fn classification(d: usize, j: usize, c: WireClassification) -> Result<ClassificationResult, Rejection> {
    let at = || format!("detection {d}, classification {j}");
    check_text("label", &c.classification).map_err(|r| Rejection::new(r.code, format!("{}: {}", at(), r.detail)))?;
    check_text("classification algorithm key", &c.algorithm.key)?;
    if c.scores.0.is_empty() {
        return Err(Rejection::new(RejectReason::BadScores, format!("{}: scores are empty", at())));
    }
    let scores = finite(c.scores).ok_or_else(|| {
        Rejection::new(RejectReason::BadScores, format!("{}: a score is NaN, infinite or null", at()))
    })?;
    let logits = match c.logits {
        None => None,
        Some(l) => Some(finite(l).ok_or_else(|| {
            Rejection::new(RejectReason::BadScores, format!("{}: a logit is NaN, infinite or null", at()))
        })?),
    };
    check_timestamp(&c.timestamp, at)?;
    Ok(ClassificationResult {
        label: c.classification,
        scores,
        logits,
        algorithm: c.algorithm.key,
        terminal: c.terminal,
        timestamp: c.timestamp,
    })
}

fn check_timestamp(ts: &Option<String>, at: impl Fn() -> String) -> Result<(), Rejection> {
    match ts {
        Some(t) if !is_iso_datetime(t) => {
            Err(Rejection::new(RejectReason::BadTimestamp, format!("{}: timestamp {t:?} is not ISO 8601", at())))
        }
        _ => Ok(()),
    }
}

/// `YYYY-MM-DD[T ]HH:MM[:SS[.f…]][Z|±HH[:MM]]`, which Postgres reads as `timestamptz` (a naive
/// value in the session's time zone, as Django writes them).
pub fn is_iso_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| -> u32 { s.get(r).and_then(|x| x.parse().ok()).unwrap_or(99) };
    if b.len() < 16 || !digits(0..4) || b[4] != b'-' || !digits(5..7) || b[7] != b'-' || !digits(8..10) {
        return false;
    }
    if !(b[10] == b'T' || b[10] == b' ') || !digits(11..13) || b[13] != b':' || !digits(14..16) {
        return false;
    }
    if !(1..=12).contains(&num(5..7)) || !(1..=31).contains(&num(8..10)) || num(11..13) > 23 || num(14..16) > 59 {
        return false;
    }
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        if !digits(i + 1..i + 3) || num(i + 1..i + 3) > 60 {
            return false;
        }
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return false;
            }
        }
    }
    match b.get(i) {
        None => true,
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            let rest = &s[i + 1..];
            let ok_hh = |h: &str| h.len() == 2 && h.bytes().all(|c| c.is_ascii_digit());
            match rest.split_once(':') {
                Some((h, m)) => ok_hh(h) && ok_hh(m),
                None => ok_hh(rest) || (rest.len() == 4 && rest.bytes().all(|c| c.is_ascii_digit())),
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
