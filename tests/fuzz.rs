//! Property-based fuzzing of everything that reads untrusted input: update and batch bodies,
//! job ids, resume points, `/v1/ws` client messages, and the store's key/value decoding.
//!
//! cargo-fuzz needs a nightly toolchain, which this project does not have; proptest runs on
//! stable, shrinks what it finds, and keeps regressions. Each target runs `PROPTEST_CASES`
//! cases (proptest's default, 256, in CI); the longer runs recorded in README used 100,000:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use progressd::http::jobs::parse_updates;
use progressd::http::resume_point;
use progressd::model::{Change, Event, JobId, Status};
use progressd::store::codec;
use progressd::ws::{parse_client_message, ClientRequest};
use proptest::prelude::*;

/// JSON-ish text: mostly well-formed fragments of updates, sometimes garbage.
fn jsonish() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("status".to_owned()),
        Just("percent".to_owned()),
        Just("current".to_owned()),
        Just("total".to_owned()),
        Just("stage".to_owned()),
        Just("message".to_owned()),
        Just("data".to_owned()),
        "[a-z]{1,8}",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f}")),
        "\"[^\"\\\\]{0,300}\"",
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("\"succeeded\"".to_owned()),
        Just("{\"nested\":[1,2,{}]}".to_owned()),
    ];
    let object = proptest::collection::vec((field, value), 0..6).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    });
    prop_oneof![
        3 => object.clone(),
        2 => proptest::collection::vec(object, 0..20).prop_map(|o| format!("[{}]", o.join(","))),
        1 => ".{0,200}",
    ]
}

fn job_id_rule(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn change() -> impl Strategy<Value = Change> {
    (
        proptest::option::of(prop_oneof![
            Just(Status::Queued),
            Just(Status::Running),
            Just(Status::Succeeded),
            Just(Status::Failed),
            Just(Status::Cancelled),
        ]),
        proptest::option::of(0.0f64..=100.0),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(".{0,40}"),
        proptest::option::of(".{0,80}"),
        proptest::option::of(any::<i32>()),
    )
        .prop_map(
            |(status, percent, current, total, stage, message, data)| Change {
                status,
                percent,
                current,
                total,
                stage,
                message,
                data: data.map(|n| serde_json::value::to_raw_value(&n).unwrap()),
            },
        )
}

proptest! {
    /// Any body: a clear answer, never a panic; what is accepted is within the contract.
    #[test]
    fn update_bodies(body in jsonish(), raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        for input in [body.as_bytes(), raw.as_slice()] {
            match parse_updates(input, 16 * 1024, 1000) {
                Ok(changes) => {
                    prop_assert!(!changes.is_empty() && changes.len() <= 1000);
                    for c in changes {
                        prop_assert!(c.percent.is_none_or(|p| (0.0..=100.0).contains(&p)));
                        prop_assert!(c.stage.as_ref().is_none_or(|s| s.len() <= 256));
                        prop_assert!(c.message.as_ref().is_none_or(|m| m.len() <= 4096));
                    }
                }
                Err(e) => prop_assert!(["invalid_json", "invalid_body"].contains(&e.code())),
            }
        }
    }

    #[test]
    fn job_ids(s in ".{0,140}", t in "[A-Za-z0-9_.:-]{0,140}") {
        for input in [&s, &t] {
            prop_assert_eq!(JobId::parse(input).is_ok(), job_id_rule(input));
        }
    }

    /// Resume points: digits only, and within u64.
    #[test]
    fn resume_points(s in ".{0,30}", n in any::<u64>()) {
        let parsed = resume_point(Some(&s), None);
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match parsed {
            Ok(Some(v)) => prop_assert!(digits && v.to_string().trim_start_matches('0') == s.trim_start_matches('0')),
            Ok(None) => prop_assert!(false, "a header was given"),
            Err(e) => {
                prop_assert_eq!(e.code(), "invalid_last_event_id");
                prop_assert!(!digits || s.trim_start_matches('0').len() >= 20);
            }
        }
        prop_assert_eq!(resume_point(None, Some(&n.to_string())).unwrap(), Some(n));
    }

    #[test]
    fn ws_client_messages(job in ".{0,20}", after in any::<i64>(), junk in ".{0,120}", kind in "subscribe|unsubscribe|[a-z]{0,10}") {
        let built = format!(r#"{{"type":"{}","job":{},"after":{after}}}"#, kind, serde_json::json!(job));
        for text in [built.as_str(), junk.as_str()] {
            match parse_client_message(text) {
                Ok(ClientRequest::Subscribe { job, after: a }) => {
                    prop_assert!(job_id_rule(job.as_str()));
                    prop_assert!(a.is_none_or(|a| a as i64 == after && after >= 0));
                }
                Ok(ClientRequest::Unsubscribe { .. }) => {}
                Err(e) => prop_assert!(
                    ["invalid_json", "invalid_body", "invalid_job_id", "invalid_last_event_id"].contains(&e.code())
                ),
            }
        }
    }

    /// The store never panics on bytes it did not write, and reads back what it wrote.
    /// (Found: a damaged length prefix made bincode try to allocate exabytes; decoding is now
    /// limited to 1 MiB a record. And a damaged `at` past year 9999 panicked when rendered.)
    #[test]
    fn store_decoding(bytes in proptest::collection::vec(any::<u8>(), 0..200), change in change(), seq in any::<u64>(), offset in any::<u64>()) {
        let _ = codec::decode::<Event>("event", &bytes);
        let _ = codec::decode::<progressd::model::JobRecord>("job", &bytes);
        let _ = codec::decode::<progressd::store::LogRecord>("log record", &bytes);
        let _ = codec::expiry_from(&bytes);
        let _ = codec::decode_run(&bytes);
        let _ = codec::run_head(&bytes);
        let event = Event { job: "j".into(), seq, offset, at_ms: seq ^ offset, change };
        let encoded = codec::encode("event", &event).unwrap();
        let back: Event = codec::decode("event", &encoded).unwrap();
        prop_assert_eq!(back.to_json(), event.to_json());
        // A run of it reads back the same, and its head agrees with the full decode.
        let next = Event { seq: seq.wrapping_add(1), offset: offset.wrapping_add(1), ..back };
        let run = codec::encode_run(&[event.clone(), next.clone()]).unwrap();
        let events = codec::decode_run(&run).unwrap();
        prop_assert_eq!(events.len(), 2);
        prop_assert_eq!(events[0].to_json(), event.to_json());
        prop_assert_eq!(events[1].to_json(), next.to_json());
        let head = codec::run_head(&run).unwrap();
        prop_assert_eq!((head.first_seq, head.first_offset, head.count), (seq, offset, 2));
    }
}
