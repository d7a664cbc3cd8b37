//! The pure parts of a batch commit: which messages are rejected, their dead letters and job
//! log lines, and the outcome of every message.

use super::*;
use crate::ingest::decode::ResultBody;

const PREFIX: &str = "tally.results";

fn incoming(subject: &str, payload: &str) -> Incoming {
    Incoming {
        subject: subject.into(),
        payload: bytes::Bytes::from(payload.to_string()),
        headers: None,
        stream_sequence: Some(11),
        delivered: Some(1),
        preset: None,
    }
}

fn decoded_ok(reply_subject: &str) -> Result<ResultMessage, Rejection> {
    Ok(ResultMessage {
        job_id: 7,
        reply_subject: reply_subject.into(),
        body: ResultBody::Error { error: "x".into(), image_id: Some(1) },
    })
}

/// Four messages: 0 saved, 1 undecodable, 2 rejected by the save (the 2nd of the valid ones),
/// 3 saved.
fn batch() -> (Vec<Incoming>, Vec<Result<ResultMessage, Rejection>>) {
    let batch = vec![
        incoming("tally.results.7", "{}"),
        incoming("tally.results.7", r#"{"reply_subject": "r1", "result": 3}"#),
        incoming("tally.results.8", "{}"),
        incoming("tally.results.7", "{}"),
    ];
    let decoded = vec![
        decoded_ok("r0"),
        Err(Rejection::new(RejectReason::WrongShape, "result is not an object")),
        decoded_ok("r2"),
        decoded_ok("r3"),
    ];
    (batch, decoded)
}

#[test]
fn rejections_map_save_indices_back_to_the_batch() {
    let (_, decoded) = batch();
    let valid = [0, 2, 3];
    let saved = [(1, Rejection::new(RejectReason::UnknownImage, "image 9"))];
    let rejected = rejections(&decoded, &[0, 1, 2, 3], &valid, &saved);
    let codes: Vec<(usize, RejectReason)> = rejected.iter().map(|(i, r)| (*i, r.code)).collect();
    assert_eq!(codes, vec![(1, RejectReason::WrongShape), (2, RejectReason::UnknownImage)]);
}

#[test]
fn outcomes_follow_which_with_inserted_rows_of_the_valid_messages() {
    let (_, decoded) = batch();
    let valid = [0, 2, 3];
    let rejected = rejections(&decoded, &[0, 1, 2, 3], &valid, &[(1, Rejection::new(RejectReason::UnknownImage, ""))]);
    let got = outcomes(&decoded, &[0, 1, 2, 3], &valid, &rejected, &[5, 0, 7]);
    assert_eq!(
        got,
        vec![
            Outcome::Saved { reply_subject: "r0".into(), inserted: 5 },
            Outcome::DeadLettered { code: RejectReason::WrongShape },
            Outcome::DeadLettered { code: RejectReason::UnknownImage },
            Outcome::Saved { reply_subject: "r3".into(), inserted: 7 },
        ]
    );
    // One message on its own (the one-by-one retry of a failed batch).
    let one = outcomes(&decoded, &[3], &[3], &BTreeMap::new(), &[0]);
    assert_eq!(one, vec![Outcome::Saved { reply_subject: "r3".into(), inserted: 0 }], "a replay");
    // A message saved alone as `save_failed`.
    let failed = vec![Err(Rejection::new(RejectReason::SaveFailed, "constraint"))];
    let rejected = rejections(&failed, &[0], &[], &[]);
    assert_eq!(
        outcomes(&failed, &[0], &[], &rejected, &[]),
        vec![Outcome::DeadLettered { code: RejectReason::SaveFailed }]
    );
}

#[test]
fn dead_letters_keep_the_message_and_log_to_its_job() {
    let (mut batch, decoded) = batch();
    batch[2].subject = "elsewhere.8".into();
    let rejected =
        rejections(&decoded, &[0, 1, 2, 3], &[0, 2, 3], &[(1, Rejection::new(RejectReason::UnknownImage, "image 9"))]);
    let (letters, logs) = dead_letters_of(&batch, &decoded, &rejected, PREFIX);

    let summary: Vec<(&str, Option<i64>, Option<&str>, &str)> = letters
        .iter()
        .map(|l| (l.subject.as_str(), l.job_id, l.reply_subject.as_deref(), l.reason_code.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("tally.results.7", Some(7), Some("r1"), "wrong_shape"),
            ("elsewhere.8", None, Some("r2"), "unknown_image"),
        ],
        "the reply subject is read back from an undecodable body, and a subject naming no job gives none"
    );
    assert_eq!(letters[0].payload, batch[1].payload.to_vec());
    assert_eq!((letters[0].stream_sequence, letters[0].delivered), (Some(11), Some(1)));

    assert_eq!(logs.len(), 1, "only the letter whose subject names a job is logged to it");
    assert_eq!((logs[0].job_id, logs[0].level), (7, Level::Error));
    assert_eq!(logs[0].message, "result rejected (wrong_shape): result is not an object");
    assert_eq!(logs[0].context["reply_subject"], "r1");
    assert_eq!(logs[0].context["stream_sequence"], 11);
}
