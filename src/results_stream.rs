//! The results stream (SPEC §4): how a result travels from whoever publishes it (the gateway,
//! a worker speaking NATS, `tally dead-letters replay`) to ingest, whatever its size.
//!
//! A result that fits in one NATS message (the server's `max_payload`, 1 MiB by default) is
//! published as is to `<prefix>.{job}`. A larger one (ADC's global model sends ~1.2 MB of
//! scores and logits per classification) travels by **claim check**: its bytes are put in the
//! JetStream object store bucket `TALLY_RESULT_OBJECTS` in chunks as large as one message
//! allows ([`object_chunk_size`]), and the message carries only the header [`OBJECT_HEADER`]
//! naming the object. Ingest reads the object back before decoding ([`fetch_object`]), so
//! everything after that sees the whole result: its dead letter keeps the whole payload.
//! Operators never raise `max_payload`.
//!
//! Guarantees are those of a plain message: the message is published after its object is
//! stored, with the same `Nats-Msg-Id`, so a duplicate publish is dropped by JetStream (and its
//! object deleted at once); ingest deletes an object only after the result is acked and the ack
//! confirmed ([`delete_object`]); an object orphaned by a crash in between expires with the
//! bucket's `max_age`, which is the results stream's.
//!
//! A result the gateway refused (not a valid `PipelineTaskResult` envelope) is still published,
//! with [`REFUSED_HEADER`] and [`REFUSED_REASON_HEADER`], so that ingest stores it as a dead
//! letter with that reason, in the job log and metrics like any other rejection, and the
//! gateway itself writes nothing to the database.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, object_store, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

/// Header of a claim-check message: the name of the object holding the result.
pub const OBJECT_HEADER: &str = "Tally-Result-Object";
/// Header of a claim-check message: the object's size in bytes.
pub const OBJECT_SIZE_HEADER: &str = "Tally-Result-Size";
/// Header of a result the gateway refused: the reason code.
pub const REFUSED_HEADER: &str = "Tally-Refused";
/// Header of a result the gateway refused: the reason, as a JSON string (so it never holds a
/// raw control character).
pub const REFUSED_REASON_HEADER: &str = "Tally-Refused-Reason";
/// The object store bucket of large results unless `--results-object-bucket` says otherwise.
pub const DEFAULT_BUCKET: &str = "TALLY_RESULT_OBJECTS";
/// JetStream's de-duplication header.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Bytes kept free of a message's `max_payload` for headers and framing, beside the payload.
const HEADER_ROOM: usize = 1024;

/// The smallest chunk an object is cut into, whatever the server's `max_payload` says.
const MIN_CHUNK: usize = 4096;

/// The chunk size of a result's object: as much of one message as headers leave free.
///
/// The object store's default, 128 KiB, cuts a 9 MB result of ADC's 29,176-class model into
/// 69 messages, each stored, acked and later delivered on its own; near 1 MiB (the default
/// `max_payload`) it is 9. `cargo run --release --example object_chunks` measures both. A
/// server whose `max_payload` is under 128 KiB could not take the default chunks at all.
pub fn object_chunk_size(max_payload: usize) -> usize {
    max_payload.saturating_sub(HEADER_ROOM).max(MIN_CHUNK)
}

/// A result to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `<prefix>.{job}`.
    pub subject: String,
    /// Other headers (`Nats-Msg-Id`, refusal, replay).
    pub headers: Vec<(&'static str, String)>,
    /// The result's bytes, as the worker sent them.
    pub payload: Bytes,
}

/// A publish that JetStream acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in the results stream.
    pub sequence: u64,
    /// JetStream had it already (same `Nats-Msg-Id` inside the duplicate window).
    pub duplicate: bool,
    /// It travelled by claim check.
    pub by_reference: bool,
}

/// A publish that failed.
#[derive(Debug, Error)]
pub enum PublishError {
    /// A header value NATS cannot carry (never for values checked by the caller).
    #[error("header {0} cannot carry this value")]
    Header(&'static str),
    /// Storing the object of a large result failed.
    #[error("storing a {size}-byte result in object store {bucket}: {source}")]
    Object {
        /// The bucket.
        bucket: String,
        /// The result's size.
        size: usize,
        /// What failed.
        #[source]
        source: object_store::PutError,
    },
    /// The publish failed.
    #[error("publishing to {subject}: {source}")]
    Publish {
        /// Where.
        subject: String,
        /// What failed.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// JetStream did not acknowledge the publish (whether it stored the message is unknown).
    #[error("acknowledgement of a publish: {0}")]
    Ack(#[source] jetstream::context::PublishError),
}

/// Whether a header value can be sent: visible ASCII and spaces only (async-nats panics on a
/// CR or LF in a value).
pub fn header_safe(value: &str) -> bool {
    value.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

fn header_map(headers: &[(&'static str, String)]) -> Result<HeaderMap, PublishError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if !header_safe(value) {
            return Err(PublishError::Header(name));
        }
        map.insert(*name, value.as_str());
    }
    Ok(map)
}

/// The object store bucket of large results.
#[derive(Clone)]
pub struct Objects {
    /// The bucket's name.
    pub name: String,
    /// The bucket.
    pub store: object_store::ObjectStore,
}

/// The object store bucket of large results could neither be created nor bound.
#[derive(Debug, thiserror::Error)]
#[error("object store {name}: {source}")]
pub struct BucketError {
    /// The bucket.
    pub name: String,
    /// Why creating it failed.
    #[source]
    pub source: jetstream::context::CreateObjectStoreError,
}

/// Creates the object store bucket of large results, or binds to it.
pub async fn ensure_bucket(js: &jetstream::Context, name: &str, max_age: Duration) -> Result<Objects, BucketError> {
    let name = name.to_string();
    if let Ok(store) = js.get_object_store(&name).await {
        return Ok(Objects { name, store });
    }
    let config = object_store::Config {
        bucket: name.clone(),
        description: Some("tally: results larger than one NATS message (claim check)".into()),
        max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match js.create_object_store(config).await {
        Ok(store) => Ok(Objects { name, store }),
        // Created meanwhile by another process (the gateway and ingest both make sure of it).
        Err(create) => match js.get_object_store(&name).await {
            Ok(store) => Ok(Objects { name, store }),
            Err(_) => Err(BucketError { name, source: create }),
        },
    }
}

/// Publishes the results of `items`, each as a message or by claim check when it does not fit
/// in `max_payload`: the objects first, then every message back to back, then the acks awaited
/// together (one round trip for a whole POST, not one per result). One answer per item, in
/// order; a failed item does not stop the others.
pub async fn publish_all(
    js: &jetstream::Context,
    bucket: &Objects,
    max_payload: usize,
    items: Vec<Outgoing>,
) -> Vec<Result<Published, PublishError>> {
    let mut pending: Vec<Result<(PublishAckFuture, Option<String>), PublishError>> = Vec::with_capacity(items.len());
    for item in items {
        pending.push(send(js, bucket, max_payload, item).await);
    }
    let mut answers = Vec::with_capacity(pending.len());
    for sent in pending {
        answers.push(match sent {
            Err(e) => Err(e),
            Ok((ack, object)) => match ack.into_future().await {
                Ok(ack) => {
                    if ack.duplicate {
                        // JetStream kept the first copy (and its object): this one's is garbage.
                        if let Some(name) = &object {
                            delete_object(bucket, name).await;
                        }
                    }
                    Ok(Published {
                        stream: ack.stream,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                        by_reference: object.is_some(),
                    })
                }
                Err(e) => {
                    // Whether JetStream stored the message is unknown: keep the object (a
                    // stored message needs it; an orphan expires with the bucket).
                    Err(PublishError::Ack(e))
                }
            },
        });
    }
    answers
}

/// Sends one result (storing its object first when it does not fit in `max_payload`) without
/// waiting for the ack; returns the ack to await and the object's name, if any.
pub async fn send(
    js: &jetstream::Context,
    bucket: &Objects,
    max_payload: usize,
    item: Outgoing,
) -> Result<(PublishAckFuture, Option<String>), PublishError> {
    let mut headers = header_map(&item.headers)?;
    let fits = item.payload.len() + HEADER_ROOM <= max_payload;
    let (payload, object) = if fits {
        (item.payload, None)
    } else {
        let name = format!("result-{}", nuid::next());
        let size = item.payload.len();
        let mut reader: &[u8] = &item.payload;
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            chunk_size: Some(object_chunk_size(max_payload)),
            ..Default::default()
        };
        bucket.store.put(meta, &mut reader).await.map_err(|e| PublishError::Object {
            bucket: bucket.name.clone(),
            size,
            source: e,
        })?;
        headers.insert(OBJECT_HEADER, name.as_str());
        headers.insert(OBJECT_SIZE_HEADER, size.to_string().as_str());
        debug!(object = %name, bytes = size, "result stored by claim check");
        (Bytes::new(), Some(name))
    };
    match js.publish_with_headers(item.subject.clone(), headers, payload).await {
        Ok(ack) => Ok((ack, object)),
        Err(e) => {
            if let Some(name) = &object {
                delete_object(bucket, name).await;
            }
            Err(PublishError::Publish { subject: item.subject, source: e })
        }
    }
}

/// The object a message refers to, if it is a claim check.
pub fn object_of(headers: Option<&HeaderMap>) -> Option<String> {
    headers?.get(OBJECT_HEADER).map(|v| v.as_str().to_string()).filter(|v| !v.is_empty())
}

/// How many bytes of result a message brings: for a claim check, its object's size as its
/// size header states it (0 when the header is missing or unreadable: the object is read
/// anyway), else its payload's length.
pub fn result_bytes(headers: Option<&HeaderMap>, payload: usize) -> usize {
    if object_of(headers).is_none() {
        return payload;
    }
    headers.and_then(|h| h.get(OBJECT_SIZE_HEADER)).and_then(|v| v.as_str().trim().parse().ok()).unwrap_or(0)
}

/// Why an object could not be read.
#[derive(Debug, Error)]
pub enum FetchError {
    /// It does not exist (deleted or expired): retrying cannot help.
    #[error("object {0} of a claim-check message does not exist (deleted or expired)")]
    Missing(String),
    /// It is larger than ingest accepts (its size is known before it is read).
    #[error("object {name} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The object.
        name: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// NATS failed; retry later.
    #[error("reading object {name}: {source}")]
    Transient {
        /// The object.
        name: String,
        /// What failed.
        #[source]
        source: crate::BoxError,
    },
}

/// Reads object `name` whole, refusing one over `limit` bytes before reading it.
pub async fn fetch_object(bucket: &Objects, name: &str, limit: usize) -> Result<Bytes, FetchError> {
    let transient = |e: crate::BoxError| FetchError::Transient { name: name.to_string(), source: e };
    let mut object = match bucket.store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Err(FetchError::Missing(name.into())),
        Err(e) => return Err(transient(e.into())),
    };
    let size = object.info().size as u64;
    if size > limit as u64 {
        return Err(FetchError::TooLarge { name: name.into(), size, limit });
    }
    let mut buffer = Vec::with_capacity(size as usize);
    object.read_to_end(&mut buffer).await.map_err(|e| transient(e.into()))?;
    Ok(Bytes::from(buffer))
}

/// Deletes object `name`; a failure only leaves it to expire with the bucket's `max_age`.
pub async fn delete_object(bucket: &Objects, name: &str) {
    if let Err(e) = bucket.store.delete(name).await {
        warn!(object = %name, error = %e, "cannot delete a result object; it expires with the bucket's max_age");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_check_counts_at_its_object_s_size() {
        assert_eq!(result_bytes(None, 10), 10);
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, "x");
        assert_eq!(result_bytes(Some(&headers), 10), 10, "not a claim check");
        headers.insert(OBJECT_HEADER, "result-x");
        assert_eq!(result_bytes(Some(&headers), 0), 0, "no size header: unknown");
        headers.insert(OBJECT_SIZE_HEADER, "5000");
        assert_eq!(result_bytes(Some(&headers), 0), 5000);
    }

    #[test]
    fn header_values_with_line_breaks_are_refused_not_sent() {
        assert!(header_safe("$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3"));
        assert!(header_safe("a b"));
        assert!(!header_safe("a\r\nb"));
        assert!(!header_safe("a\0"));
        assert!(!header_safe("é"));
        assert!(matches!(header_map(&[(MSG_ID_HEADER, "x\ny".into())]), Err(PublishError::Header(_))));
    }

    #[test]
    fn fetch_errors_keep_their_source() {
        use std::error::Error as _;
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = FetchError::Transient { name: "result-1".into(), source: cause.into() };
        assert_eq!(e.to_string(), "reading object result-1: connection reset");
        let source = e.source().expect("the cause is kept");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionReset)
        );
    }
}
