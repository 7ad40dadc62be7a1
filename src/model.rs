//! The vocabulary of the API: job ids, the updates publishers send, the events we store and
//! deliver, and the snapshot of a job's state.
//!
//! This module owns validation of what clients send and the JSON shape of what they receive.
//! It knows nothing of sled, channels or HTTP: the store persists these types (through its own
//! codec), the writer folds events into snapshots with [`JobRecord::apply`], and the transports
//! render them with the `*_json` functions, once per event.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

/// Longest job id, in bytes.
pub const MAX_JOB_ID: usize = 128;
/// Longest `stage`, in bytes.
pub const MAX_STAGE: usize = 256;
/// Longest `message`, in bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Most updates in one batch.
pub const MAX_BATCH: usize = 1000;

/// A validated job id: 1 to 128 bytes of `[A-Za-z0-9_.:-]`.
///
/// The alphabet has no byte below `-`, so a job id never contains the separator bytes the store
/// uses in its keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("job id must be 1 to {MAX_JOB_ID} bytes of [A-Za-z0-9_.:-], got {0:?}")]
pub struct InvalidJobId(pub String);

impl JobId {
    pub fn parse(raw: &str) -> Result<JobId, InvalidJobId> {
        let valid = !raw.is_empty()
            && raw.len() <= MAX_JOB_ID
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if valid {
            Ok(JobId(raw.to_owned()))
        } else {
            // Keep the echo short: the id may be a megabyte of garbage.
            Err(InvalidJobId(raw.chars().take(MAX_JOB_ID + 8).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    /// Succeeded, failed and cancelled end a job: nothing may be published after them.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Status> {
        [
            Status::Queued,
            Status::Running,
            Status::Succeeded,
            Status::Failed,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// One update as a publisher sends it. Unknown fields are refused by serde, whose message
/// names the field and lists the allowed ones.
/// The client commands (`progressd publish`, `exec`) serialize it: absent fields stay absent.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Some(Value::Null)` when the publisher sent `"data": null`, which is a value like any
    /// other; `None` when the field is absent.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<serde_json::Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Why an update was refused; rendered as `400 invalid_body`.
#[derive(Debug, Error, PartialEq)]
pub enum InvalidUpdate {
    #[error(
        "an update must set at least one of status, percent, current, total, stage, message, data"
    )]
    Empty,
    #[error("percent must be a number from 0 to 100, got {0}")]
    Percent(f64),
    #[error("stage is {0} bytes, the limit is {MAX_STAGE}")]
    StageTooLong(usize),
    #[error("message is {0} bytes, the limit is {MAX_MESSAGE}")]
    MessageTooLong(usize),
    #[error("data is {size} bytes once serialized, the limit is {limit}")]
    DataTooLarge { size: usize, limit: usize },
}

/// A validated update, in the form the store keeps: `percent` already derived from
/// `current`/`total` when the publisher did not give one, `data` kept as JSON text.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Change {
    pub status: Option<Status>,
    pub percent: Option<f64>,
    pub current: Option<u64>,
    pub total: Option<u64>,
    pub stage: Option<String>,
    pub message: Option<String>,
    #[serde(with = "raw_json")]
    pub data: Option<Box<RawValue>>,
}

impl Update {
    /// Checks the limits of the contract and derives `percent` from `current`/`total`.
    pub fn validate(self, max_data: usize) -> Result<Change, InvalidUpdate> {
        let Update {
            status,
            percent,
            current,
            total,
            stage,
            message,
            data,
        } = self;
        if status.is_none()
            && percent.is_none()
            && current.is_none()
            && total.is_none()
            && stage.is_none()
            && message.is_none()
            && data.is_none()
        {
            return Err(InvalidUpdate::Empty);
        }
        if let Some(p) = percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(InvalidUpdate::Percent(p));
            }
        }
        if let Some(s) = &stage {
            if s.len() > MAX_STAGE {
                return Err(InvalidUpdate::StageTooLong(s.len()));
            }
        }
        if let Some(m) = &message {
            if m.len() > MAX_MESSAGE {
                return Err(InvalidUpdate::MessageTooLong(m.len()));
            }
        }
        let data = match data {
            None => None,
            Some(value) => {
                let raw = serde_json::value::to_raw_value(&value).map_err(|_| {
                    InvalidUpdate::DataTooLarge {
                        size: usize::MAX,
                        limit: max_data,
                    }
                })?;
                let size = raw.get().len();
                if size > max_data {
                    return Err(InvalidUpdate::DataTooLarge {
                        size,
                        limit: max_data,
                    });
                }
                Some(raw)
            }
        };
        // An explicit percent wins; total 0 derives nothing; current past total reads 100.
        let percent = percent.or(match (current, total) {
            (Some(c), Some(t)) if t > 0 => Some((100.0 * c as f64 / t as f64).min(100.0)),
            _ => None,
        });
        Ok(Change {
            status,
            percent,
            current,
            total,
            stage,
            message,
            data,
        })
    }
}

/// An event as stored: one change of one job, with its place in the job (`seq`) and in the
/// global log (`offset`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub job: String,
    pub seq: u64,
    pub offset: u64,
    pub at_ms: u64,
    pub change: Change,
}

impl Event {
    /// The event's JSON, on one line (SSE `data:` must never hold a raw newline).
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            job: &'a str,
            seq: u64,
            offset: u64,
            at: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<Status>,
            #[serde(skip_serializing_if = "Option::is_none")]
            percent: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            current: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            total: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            stage: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            message: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a RawValue>,
        }
        let c = &self.change;
        to_json_line(&View {
            job: &self.job,
            seq: self.seq,
            offset: self.offset,
            at: rfc3339(self.at_ms),
            status: c.status,
            percent: c.percent,
            current: c.current,
            total: c.total,
            stage: c.stage.as_deref(),
            message: c.message.as_deref(),
            data: c.data.as_deref(),
        })
    }
}

/// What the store keeps per job: the snapshot of the contract plus the bookkeeping the writer
/// and the subscriptions need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    /// Internal number of this incarnation of the job; event keys use it, so a job deleted
    /// and published again never mixes its old and new history.
    pub num: u64,
    pub status: Status,
    pub percent: Option<f64>,
    pub current: Option<u64>,
    pub total: Option<u64>,
    pub stage: Option<String>,
    pub message: Option<String>,
    #[serde(with = "raw_json")]
    pub data: Option<Box<RawValue>>,
    /// Seq of the last event.
    pub seq: u64,
    /// Seq of the oldest event still retained.
    pub first_seq: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    /// Global offset of the last event, for durability waits.
    pub last_offset: u64,
    /// Global offset of the newest event retention has dropped (0: none), so a multi-job
    /// stream resuming before it knows it must reset.
    pub dropped_offset: u64,
}

impl JobRecord {
    pub fn new(num: u64, now_ms: u64) -> JobRecord {
        JobRecord {
            num,
            status: Status::Running,
            percent: None,
            current: None,
            total: None,
            stage: None,
            message: None,
            data: None,
            seq: 0,
            first_seq: 1,
            created_ms: now_ms,
            updated_ms: now_ms,
            finished_ms: None,
            last_offset: 0,
            dropped_offset: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.status.is_terminal()
    }

    /// Folds one event into the snapshot: every field the event sets wins.
    pub fn apply(&mut self, event: &Event) {
        let c = &event.change;
        if let Some(s) = c.status {
            self.status = s;
            if s.is_terminal() {
                self.finished_ms = Some(event.at_ms);
            }
        }
        if c.percent.is_some() {
            self.percent = c.percent;
        }
        if c.current.is_some() {
            self.current = c.current;
        }
        if c.total.is_some() {
            self.total = c.total;
        }
        if c.stage.is_some() {
            self.stage.clone_from(&c.stage);
        }
        if c.message.is_some() {
            self.message.clone_from(&c.message);
        }
        if c.data.is_some() {
            self.data.clone_from(&c.data);
        }
        if self.seq == 0 {
            self.created_ms = event.at_ms;
        }
        self.seq = event.seq;
        self.updated_ms = event.at_ms;
        self.last_offset = event.offset;
    }

    /// The snapshot of the contract, on one line.
    pub fn to_json(&self, job: &str) -> String {
        to_json_line(&self.view(job))
    }

    pub fn view<'a>(&'a self, job: &'a str) -> SnapshotView<'a> {
        SnapshotView {
            job,
            status: self.status,
            percent: self.percent,
            current: self.current,
            total: self.total,
            stage: self.stage.as_deref(),
            message: self.message.as_deref(),
            data: self.data.as_deref(),
            seq: self.seq,
            first_seq: self.first_seq,
            created_at: rfc3339(self.created_ms),
            updated_at: rfc3339(self.updated_ms),
            finished_at: self.finished_ms.map(rfc3339),
        }
    }
}

/// The JSON snapshot: every field present, `null` when unset.
#[derive(Serialize)]
pub struct SnapshotView<'a> {
    job: &'a str,
    status: Status,
    percent: Option<f64>,
    current: Option<u64>,
    total: Option<u64>,
    stage: Option<&'a str>,
    message: Option<&'a str>,
    data: Option<&'a RawValue>,
    seq: u64,
    first_seq: u64,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
}

/// Serializes a value that cannot fail to serialize (plain structs of strings and numbers).
pub fn to_json_line<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(s) => s,
        // Our views hold only strings, finite numbers and already-valid raw JSON.
        Err(e) => unreachable!("serializing a view cannot fail: {e}"),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// `2026-11-26T12:00:00.123Z`. Times past year 9999 (only a damaged record could hold one)
/// are written as the last representable instant rather than panicking.
pub fn rfc3339(ms: u64) -> String {
    let ms = ms.min(MAX_RFC3339_MS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `data` is arbitrary JSON; bincode cannot carry a `serde_json::Value` (it needs
/// self-describing input), so the store keeps its text.
mod raw_json {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(v: &Option<Box<RawValue>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(raw) => s.serialize_some(raw.get()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => RawValue::from_string(text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_follow_the_contract() {
        assert!(JobId::parse("build-42:step_1.a").is_ok());
        assert!(JobId::parse(&"a".repeat(128)).is_ok());
        assert!(JobId::parse(&"a".repeat(129)).is_err());
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse("a/b").is_err());
        assert!(JobId::parse("a b").is_err());
        assert!(JobId::parse("é").is_err());
    }

    fn update(json: &str) -> Update {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn percent_is_derived_unless_given() {
        let c = update(r#"{"current":1,"total":4}"#).validate(100).unwrap();
        assert_eq!(c.percent, Some(25.0));
        let c = update(r#"{"current":1,"total":4,"percent":90}"#)
            .validate(100)
            .unwrap();
        assert_eq!(c.percent, Some(90.0));
        let c = update(r#"{"current":1,"total":0}"#).validate(100).unwrap();
        assert_eq!(c.percent, None);
    }

    #[test]
    fn data_null_is_a_value() {
        let c = update(r#"{"data":null}"#).validate(100).unwrap();
        assert_eq!(c.data.as_deref().map(RawValue::get), Some("null"));
        assert!(matches!(
            update("{}").validate(100),
            Err(InvalidUpdate::Empty)
        ));
    }

    #[test]
    fn limits_are_enforced() {
        assert!(matches!(
            update(r#"{"percent":100.5}"#).validate(100),
            Err(InvalidUpdate::Percent(_))
        ));
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(200));
        assert!(matches!(
            update(&big).validate(100),
            Err(InvalidUpdate::DataTooLarge { .. })
        ));
        let long = format!(r#"{{"stage":"{}"}}"#, "x".repeat(MAX_STAGE + 1));
        assert!(matches!(
            update(&long).validate(100),
            Err(InvalidUpdate::StageTooLong(_))
        ));
    }

    #[test]
    fn unknown_fields_name_the_allowed_ones() {
        let err = serde_json::from_str::<Update>(r#"{"precent":5}"#).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("precent") && text.contains("percent"),
            "{text}"
        );
    }

    #[test]
    fn times_have_milliseconds() {
        assert_eq!(rfc3339(1_764_158_400_123), "2025-11-26T12:00:00.123Z");
    }

    /// Found by the store-decoding fuzz target: a huge `at` in a decoded record panicked.
    #[test]
    fn regression_times_past_year_9999_do_not_panic() {
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
