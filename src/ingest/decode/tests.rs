//! Decoding and validation of result messages: the example payload, both result shapes and
//! every rejection that needs no database.

use super::*;

const SUBJECT: &str = "tally.results.1234";
const REPLY: &str = "$JS.ACK.job_1234.job-1234-consumer.1.17.17.1717290003120000000.483";

fn envelope() -> Envelope<'static> {
    Envelope { subject: SUBJECT, prefix: "tally.results", max_bytes: 1 << 20 }
}

fn example() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/antenna/example-result.json"))
        .expect("../shared/antenna/example-result.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("example is JSON");
    doc["results"][0].clone()
}

fn decode_value(v: &serde_json::Value) -> Result<ResultMessage, Rejection> {
    decode(&envelope(), &serde_json::to_vec(v).expect("serialize"))
}

fn code(v: &serde_json::Value) -> RejectReason {
    decode_value(v).expect_err("should be rejected").code
}

#[test]
fn the_example_result_decodes() {
    let m = decode_value(&example()).expect("example decodes");
    assert_eq!(m.job_id, 1234);
    assert_eq!(m.reply_subject, REPLY);
    let ResultBody::Response(r) = &m.body else { panic!("a response") };
    assert_eq!(r.pipeline, "quebec_vermont_moths_2023");
    assert_eq!(r.source_images, vec![501, 502]);
    assert_eq!(r.detections.len(), 1);
    let d = &r.detections[0];
    assert_eq!(d.image_id, 501);
    assert_eq!(d.bbox, Some([1204.0, 833.0, 1391.0, 1010.0]));
    assert_eq!(d.algorithm, "fasterrcnn_for_ami_moth_traps_2021");
    assert_eq!(d.crop_image_url, None);
    assert_eq!(d.classifications.len(), 2);
    assert_eq!(d.classifications[0].label, "Moth");
    assert!(!d.classifications[0].terminal);
    assert_eq!(d.classifications[1].score(), 0.81);
    assert!(d.classifications[1].terminal);
    assert_eq!(m.image_ids(), vec![501, 502]);
}

#[test]
fn error_results_decode_with_and_without_an_image() {
    let v = serde_json::json!({"reply_subject": REPLY, "result": {"error": "download failed", "image_id": "77"}});
    let m = decode_value(&v).expect("decodes");
    assert_eq!(m.body, ResultBody::Error { error: "download failed".into(), image_id: Some(77) });
    let v = serde_json::json!({"reply_subject": REPLY, "result": {"error": "boom", "image_id": null}});
    assert_eq!(decode_value(&v).expect("decodes").image_ids(), Vec::<i64>::new());
}

#[test]
fn unknown_fields_are_ignored_and_terminal_defaults_to_true() {
    let mut v = example();
    v["result"]["config"] = serde_json::json!({"anything": 1});
    v["extra"] = serde_json::json!(true);
    let c = &mut v["result"]["detections"][0]["classifications"][1];
    c.as_object_mut().expect("object").remove("terminal");
    let m = decode_value(&v).expect("decodes");
    let ResultBody::Response(r) = m.body else { panic!() };
    assert!(r.detections[0].classifications[1].terminal);
}

#[test]
fn invalid_json_and_wrong_shapes_are_told_apart() {
    assert_eq!(decode(&envelope(), b"{not json").expect_err("rejected").code, RejectReason::InvalidJson);
    assert_eq!(decode(&envelope(), b"").expect_err("rejected").code, RejectReason::InvalidJson);
    assert_eq!(code(&serde_json::json!([1, 2])), RejectReason::WrongShape);
    assert_eq!(code(&serde_json::json!({"reply_subject": REPLY})), RejectReason::WrongShape);
    assert_eq!(code(&serde_json::json!({"reply_subject": REPLY, "result": {}})), RejectReason::WrongShape);
    let mut v = example();
    v["result"]["source_images"][0]["id"] = serde_json::json!("five hundred");
    assert_eq!(code(&v), RejectReason::WrongShape);
    let mut v = example();
    v["result"]["detections"][0]["bbox"] = serde_json::json!({"x1": 1});
    assert_eq!(code(&v), RejectReason::WrongShape);
}

#[test]
fn bad_boxes_are_rejected() {
    for bbox in [
        serde_json::json!({"x1": 10.0, "y1": 0.0, "x2": 5.0, "y2": 10.0}),
        serde_json::json!({"x1": 0.0, "y1": 10.0, "x2": 5.0, "y2": 1.0}),
    ] {
        let mut v = example();
        v["result"]["detections"][0]["bbox"] = bbox;
        assert_eq!(code(&v), RejectReason::BadBbox);
    }
    // JSON has no NaN literal; Python's json module writes one anyway.
    let text = serde_json::to_string(&example()).expect("ser").replace("1204.0", "NaN");
    assert_eq!(decode(&envelope(), text.as_bytes()).expect_err("rejected").code, RejectReason::InvalidJson);
    let text = serde_json::to_string(&example()).expect("ser").replace("1204.0", "1e999");
    assert!(decode(&envelope(), text.as_bytes()).is_err(), "an overflowing coordinate is rejected");
    // A zero-size box is a box.
    let mut v = example();
    v["result"]["detections"][0]["bbox"] = serde_json::json!({"x1": 3, "y1": 3, "x2": 3, "y2": 3});
    assert!(decode_value(&v).is_ok());
}

#[test]
fn bad_scores_are_rejected() {
    let mut v = example();
    v["result"]["detections"][0]["classifications"][0]["scores"] = serde_json::json!([]);
    assert_eq!(code(&v), RejectReason::BadScores);
    let mut v = example();
    v["result"]["detections"][0]["classifications"][0]["scores"] = serde_json::json!([0.5, null]);
    assert_eq!(code(&v), RejectReason::BadScores);
    let mut v = example();
    v["result"]["detections"][0]["classifications"][0]["logits"] = serde_json::json!([null]);
    assert_eq!(code(&v), RejectReason::BadScores);
}

#[test]
fn vectors_with_spaces_exponents_and_negative_zero_decode() {
    let mut v = example();
    let text = serde_json::to_string(&v)
        .expect("ser")
        .replace("\"scores\":[0.01,0.81,0.18]", "\"scores\" : [ 1E-2 ,\n\t8.1e-1,1.8e+1 , -0.0 ,0 ]");
    let m = decode(&envelope(), text.as_bytes()).expect("decodes");
    let ResultBody::Response(r) = &m.body else { panic!("a response") };
    assert_eq!(r.detections[0].classifications[1].scores, vec![0.01, 0.81, 18.0, -0.0, 0.0]);
    v["result"]["detections"][0]["classifications"][1]["scores"] = serde_json::json!([12345.5, 1.0]);
    let text = serde_json::to_string(&v).expect("ser");
    assert!(decode(&envelope(), text.replace("12345.5", "1e308").as_bytes()).is_ok());
    let text = text.replace("12345.5", "1e309");
    assert_eq!(decode(&envelope(), text.as_bytes()).expect_err("overflow").code, RejectReason::BadScores);
}

#[test]
fn vectors_that_are_not_arrays_of_numbers_are_the_wrong_shape() {
    for bad in [
        serde_json::json!("0.5"),
        serde_json::json!({"0": 0.5}),
        serde_json::json!([0.5, "0.5"]),
        serde_json::json!([[0.5]]),
        serde_json::json!([true]),
        serde_json::json!(null),
    ] {
        let mut v = example();
        v["result"]["detections"][0]["classifications"][1]["scores"] = bad.clone();
        assert_eq!(code(&v), RejectReason::WrongShape, "{bad}");
    }
}

proptest::proptest! {
    /// Score and logit vectors of a real model's length decode to exactly the numbers sent
    /// (written as `serde_json` and Python write them: the shortest text that reads back the
    /// same), subnormal and extreme ones included.
    #[test]
    fn vectors_decode_to_the_numbers_sent(
        scores in proptest::collection::vec(0.0f64..1.0, 1..3_000),
        logits in proptest::collection::vec(-1e6f64..1e6, 1..3_000),
        tiny in proptest::collection::vec(proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL, 1..50),
    ) {
        let mut v = example();
        v["result"]["detections"][0]["classifications"][1]["scores"] = serde_json::json!(scores);
        v["result"]["detections"][0]["classifications"][1]["logits"] = serde_json::json!(logits);
        v["result"]["detections"][0]["classifications"][0]["scores"] = serde_json::json!(tiny);
        let m = decode_value(&v).expect("decodes");
        let ResultBody::Response(r) = &m.body else { panic!("a response") };
        let c = &r.detections[0].classifications;
        proptest::prop_assert_eq!(&c[1].scores, &scores);
        proptest::prop_assert_eq!(c[1].logits.as_ref(), Some(&logits));
        proptest::prop_assert_eq!(&c[0].scores, &tiny);
    }
}

#[test]
fn long_labels_are_rejected_and_255_characters_are_fine() {
    let mut v = example();
    v["result"]["detections"][0]["classifications"][1]["classification"] = serde_json::json!("é".repeat(255));
    assert!(decode_value(&v).is_ok());
    v["result"]["detections"][0]["classifications"][1]["classification"] = serde_json::json!("x".repeat(256));
    assert_eq!(code(&v), RejectReason::TextTooLong);
}

#[test]
fn reply_subjects_must_belong_to_the_subject_s_job() {
    let mut v = example();
    v["reply_subject"] = serde_json::json!("$JS.ACK.job_99.job-99-consumer.1.17.17.1717290003120000000.483");
    assert_eq!(code(&v), RejectReason::ForeignReplySubject);
    v["reply_subject"] = serde_json::json!("job.1234.reply.abc123");
    assert_eq!(code(&v), RejectReason::ForeignReplySubject);
    v["reply_subject"] = serde_json::json!("$JS.ACK.job_1234.job-99-consumer.1.17.17.1717290003120000000.483");
    assert_eq!(code(&v), RejectReason::ForeignReplySubject);
    // The v2 form with domain and account hash.
    v["reply_subject"] =
        serde_json::json!("$JS.ACK.hub.ACCHASH.job_1234.job-1234-consumer.1.17.17.1717290003120000000.483.xyz");
    assert!(decode_value(&v).is_ok());
}

#[test]
fn subjects_must_name_a_job_and_bodies_must_fit() {
    let body = serde_json::to_vec(&example()).expect("ser");
    let e = Envelope { subject: "tally.results.abc", ..envelope() };
    assert_eq!(decode(&e, &body).expect_err("rejected").code, RejectReason::BadSubject);
    let e = Envelope { max_bytes: 100, ..envelope() };
    assert_eq!(decode(&e, &body).expect_err("rejected").code, RejectReason::Oversized);
}

#[test]
fn timestamps_are_checked() {
    for ok in [
        "2024-06-02T01:00:03.120000",
        "2024-06-02T01:00:03",
        "2024-06-02 01:00",
        "2024-06-02T01:00:03Z",
        "2024-06-02T01:00:03.5+02:00",
        "2024-06-02T01:00:03-0500",
    ] {
        assert!(is_iso_datetime(ok), "{ok}");
    }
    for bad in [
        "yesterday",
        "2024-13-02T01:00:03",
        "2024-06-02",
        "2024-06-02T25:00",
        "2024-06-02T01:00:03.",
        "2024-06-02T01:00:03 UTC",
    ] {
        assert!(!is_iso_datetime(bad), "{bad}");
    }
    let mut v = example();
    v["result"]["detections"][0]["timestamp"] = serde_json::json!("soon");
    assert_eq!(code(&v), RejectReason::BadTimestamp);
}

#[test]
fn ack_subjects_are_parsed_exactly() {
    let ok = parse_ack_subject("$JS.ACK.job_7.job-7-consumer.2.5.5.1700000000000000000.3").expect("v1");
    assert_eq!(ok, AckSubject { job: 7, stream_sequence: 5, delivered: 2 });
    let v2 = parse_ack_subject("$JS.ACK._.ABCD123.job_7.job-7-consumer.1.5.5.1700000000000000000.3.Xy9z");
    assert_eq!(v2.map(|a| a.job), Ok(7));
    for bad in [
        // a trailing token, one missing, an empty one
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3.extra",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000",
        "$JS.ACK.job_7.job-7-consumer.1..5.1700000000000000000.3",
        // whitespace and control characters anywhere
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3 ",
        " $JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.17000\r\nX: y.3",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.3\0",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.\t3",
        // wildcards
        "$JS.ACK.job_7.job-7-consumer.>",
        "$JS.ACK.job_7.job-7-consumer.*.5.5.1700000000000000000.3",
        // numbers that are not plain digits
        "$JS.ACK.job_7.job-7-consumer.+1.5.5.1700000000000000000.3",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.1700000000000000000.-3",
        "$JS.ACK.job_7.job-7-consumer.1.5.5.99999999999999999999999.3",
        // names that are not Antenna's, or disagree
        "$JS.ACK.job_07.job-07-consumer.1.5.5.1700000000000000000.3",
        "$JS.ACK.job_+7.job-+7-consumer.1.5.5.1700000000000000000.3",
        "$JS.ACK.job_7.job-8-consumer.1.5.5.1700000000000000000.3",
        "$JS.ACK.job_7.other.1.5.5.1700000000000000000.3",
        "$JS.NAK.job_7.job-7-consumer.1.5.5.1700000000000000000.3",
        // the domain form with an 11th or 13th token, or odd characters in its free tokens
        "$JS.ACK._.ABCD.job_7.job-7-consumer.1.5.5.1700000000000000000.3",
        "$JS.ACK._.ABCD.job_7.job-7-consumer.1.5.5.1700000000000000000.3.x.y",
        "$JS.ACK._.AB$D.job_7.job-7-consumer.1.5.5.1700000000000000000.3.x",
        "",
    ] {
        assert!(parse_ack_subject(bad).is_err(), "accepted {bad:?}");
    }
    let long = format!("$JS.ACK.job_7.job-7-consumer.1.5.5.{}.3", "1".repeat(300));
    assert!(parse_ack_subject(&long).is_err());
}

#[test]
fn ids_are_canonical_decimals() {
    assert_eq!(canonical_id("1001"), Some(1001));
    for bad in ["+1001", "01001", " 1001", "1001 ", "0", "-1", "", "1e3", "99999999999999999999"] {
        assert_eq!(canonical_id(bad), None, "{bad:?}");
    }
    assert_eq!(job_of_subject("tally.results.+12", "tally.results"), None);
    assert_eq!(job_of_subject("tally.results.12", "tally.results"), Some(12));
}

#[test]
fn reason_codes_are_the_stored_strings() {
    let codes: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        codes,
        [
            "oversized",
            "invalid_json",
            "wrong_shape",
            "bad_subject",
            "foreign_reply_subject",
            "bad_bbox",
            "bad_scores",
            "text_too_long",
            "bad_timestamp",
            "unknown_pipeline",
            "pipeline_not_configured",
            "unknown_image",
            "save_failed",
            "object_missing",
            "task_ack_failed",
        ]
    );
    for r in RejectReason::ALL {
        assert_eq!(RejectReason::from_code(r.as_str()), Some(r));
        assert_eq!(r.to_string(), r.as_str());
    }
    assert_eq!(RejectReason::from_code("invalid_subject"), None);
}
