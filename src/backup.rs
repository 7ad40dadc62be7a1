//! Backups: export a running daemon's jobs as JSON lines, import them into an empty data
//! directory. Operators never need to copy a live sled directory.
//!
//! The format, one JSON object a line:
//!
//! ```text
//! {"type":"header","format":"progressd-export","version":1,"head":<offset>}
//! {"type":"job","job":{<snapshot>,"dropped_offset":<n>}}
//! {"type":"event","event":{<event>}}          (that job's retained events, in seq order)
//! ...
//! {"type":"next","cursor":"<job id>"|null}     (the HTTP page's last line)
//! ```
//!
//! Each job is exported consistently (its snapshot and exactly the events it retains); jobs
//! are read one after another while publishing goes on, so the export is not one instant of
//! the whole store: every job is as it was at some moment during the export.

use std::io::BufRead;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::model::{to_json_line, Change, Event, JobRecord, Status};
use crate::store::{Expiry, Heads, Mutation, RunChange, Store, StoreError};
use crate::writer::{WriteError, Writer};

pub const VERSION: u64 = 1;

/// An imported run is no larger than one publish may make: `MAX_BATCH` events, and about
/// `--max-body` at most (the store reads no record over twice that).
const RUN_EVENTS: usize = crate::model::MAX_BATCH;
const RUN_BYTES: usize = crate::config::MAX_BODY_LIMIT;

/// Roughly what an event adds to a stored run: its texts and a few dozen bytes of numbers.
fn event_size(e: &Event) -> usize {
    let c = &e.change;
    64 + c.stage.as_ref().map_or(0, String::len)
        + c.message.as_ref().map_or(0, String::len)
        + c.data.as_ref().map_or(0, |d| d.get().len())
}

#[derive(Debug, Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("import: line {line}: {detail}")]
    Format { line: usize, detail: String },
    #[error("import: reading the export: {0}")]
    Read(#[from] std::io::Error),
    #[error("import: the data directory already holds {0} jobs; import only into an empty one")]
    NotEmpty(u64),
    #[error("export: {0}")]
    Write(#[from] WriteError),
}

/// One page of an export: up to `limit` jobs after `cursor`, as JSON lines; the header
/// first when `cursor` is None. Returns the text and the next cursor.
///
/// Each job is read at a quiet point of the writer, so its snapshot and its events agree.
pub async fn export_page(
    store: &Store,
    writer: &Writer,
    cursor: Option<&str>,
    limit: usize,
) -> Result<(String, Option<String>), BackupError> {
    let mut out = String::new();
    if cursor.is_none() {
        out.push_str(&to_json_line(&serde_json::json!({
            "type": "header", "format": "progressd-export", "version": VERSION,
            "head": writer.visible(),
        })));
        out.push('\n');
    }
    let (jobs, more) = store.list_jobs(cursor, "", &|_, _| true, limit)?;
    for (job, _) in &jobs {
        let (reader, name) = (store.clone(), job.clone());
        let read = writer
            .at_quiet_point(move |_| -> Result<_, StoreError> {
                match reader.job(&name)? {
                    Some(rec) => {
                        let events = reader.events_after(rec.num, 0, usize::MAX)?;
                        Ok(Some((rec, events)))
                    }
                    None => Ok(None),
                }
            })
            .await??;
        // Deleted since the listing: nothing to export.
        let Some((rec, events)) = read else { continue };
        let mut snap: serde_json::Value =
            serde_json::from_str(&rec.to_json(job)).map_err(|e| StoreError::Decode {
                what: "snapshot",
                detail: e.to_string(),
            })?;
        snap["dropped_offset"] = rec.dropped_offset.into();
        out.push_str(&to_json_line(
            &serde_json::json!({"type": "job", "job": snap}),
        ));
        out.push('\n');
        for ev in &events {
            out.push_str(r#"{"type":"event","event":"#);
            out.push_str(&ev.to_json());
            out.push_str("}\n");
        }
    }
    let next = if more {
        jobs.last().map(|(job, _)| job.clone())
    } else {
        None
    };
    out.push_str(&to_json_line(
        &serde_json::json!({"type": "next", "cursor": next}),
    ));
    out.push('\n');
    Ok((out, next))
}

/// One line, before its payload is read. (Not an internally tagged enum: serde buffers those,
/// and raw `data` cannot be read back from a buffer.)
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    version: Option<u64>,
    head: Option<u64>,
    #[serde(borrow)]
    job: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SnapshotIn {
    job: String,
    status: Status,
    percent: Option<f64>,
    current: Option<u64>,
    total: Option<u64>,
    stage: Option<String>,
    message: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    seq: u64,
    first_seq: u64,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
    #[serde(default)]
    dropped_offset: u64,
}

#[derive(Deserialize)]
struct EventIn {
    job: String,
    seq: u64,
    offset: u64,
    at: String,
    status: Option<Status>,
    percent: Option<f64>,
    current: Option<u64>,
    total: Option<u64>,
    stage: Option<String>,
    message: Option<String>,
    #[serde(default, deserialize_with = "raw_present")]
    data: Option<Box<RawValue>>,
}

fn payload(raw: Option<&RawValue>) -> &str {
    raw.map_or("null", RawValue::get)
}

/// `"data": null` is a value: keep it as the raw `null`.
fn raw_present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn millis(text: &str) -> Result<u64, String> {
    humantime::parse_rfc3339(text)
        .map_err(|e| format!("time {text:?}: {e}"))
        .and_then(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| e.to_string())
        })
}

/// Imports an export into `store`, which must hold no job. `finished_ttl` schedules the
/// expiry of finished jobs. Returns (jobs, events) imported.
pub fn import(
    store: &Store,
    input: impl BufRead,
    finished_ttl: Duration,
) -> Result<(u64, u64), BackupError> {
    let existing = store.heads()?.jobs;
    if existing > 0 || store.list_jobs(None, "", &|_, _| true, 1)?.0.len() == 1 {
        return Err(BackupError::NotEmpty(existing.max(1)));
    }
    let ttl = finished_ttl.as_millis() as u64;
    let mut heads = Heads::default();
    let mut batch = Mutation::default();
    // The job being read, its last seq so far, and its run of events so far (consecutive
    // seqs and offsets, no larger than a publish could make: see `RUN_EVENTS`, `RUN_BYTES`).
    let mut current: Option<(String, JobRecord)> = None;
    let mut last_seq = 0u64;
    let mut run: Vec<Event> = Vec::new();
    let mut run_bytes = 0usize;
    let mut batched = 0usize;
    let end_run = |batch: &mut Mutation, run: &mut Vec<Event>, num: u64| {
        if let Some(first) = run.first() {
            let key = (num, first.seq);
            batch.runs.push((key, RunChange::Put(std::mem::take(run))));
        }
    };
    let flush_job = |batch: &mut Mutation, current: &mut Option<(String, JobRecord)>| {
        if let Some((job, rec)) = current.take() {
            if let Some(f) = rec.finished_ms {
                batch
                    .expiry
                    .push(((f + ttl, Expiry::Job(job.clone())), true));
            }
            batch.jobs.push((job, Some(rec)));
        }
    };
    let mut header_seen = false;
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail: String| BackupError::Format {
            line: line_no,
            detail,
        };
        let parsed: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        match parsed.kind {
            "header" => {
                let (version, head) = (parsed.version.unwrap_or(0), parsed.head.unwrap_or(0));
                if version != VERSION {
                    return Err(bad(format!(
                        "export version {version}, this progressd reads {VERSION}"
                    )));
                }
                header_seen = true;
                // Multi-job streams cannot resume across a restore: whatever was deleted
                // before the export is not in it.
                heads.log_floor = heads.log_floor.max(head);
                heads.offset = heads.offset.max(head);
            }
            "job" => {
                let s: SnapshotIn =
                    serde_json::from_str(payload(parsed.job)).map_err(|e| bad(e.to_string()))?;
                if !header_seen {
                    return Err(bad("no header line before the first job".into()));
                }
                if let Some((_, rec)) = &current {
                    end_run(&mut batch, &mut run, rec.num);
                }
                flush_job(&mut batch, &mut current);
                last_seq = 0;
                heads.num += 1;
                heads.jobs += 1;
                let rec = JobRecord {
                    num: heads.num,
                    status: s.status,
                    percent: s.percent,
                    current: s.current,
                    total: s.total,
                    stage: s.stage,
                    message: s.message,
                    data: s.data,
                    seq: s.seq,
                    first_seq: s.first_seq,
                    created_ms: millis(&s.created_at).map_err(bad)?,
                    updated_ms: millis(&s.updated_at).map_err(bad)?,
                    finished_ms: s
                        .finished_at
                        .as_deref()
                        .map(millis)
                        .transpose()
                        .map_err(bad)?,
                    last_offset: 0,
                    dropped_offset: s.dropped_offset,
                };
                current = Some((s.job, rec));
            }
            "event" => {
                let e: EventIn =
                    serde_json::from_str(payload(parsed.event)).map_err(|e| bad(e.to_string()))?;
                let Some((job, rec)) = current.as_mut() else {
                    return Err(bad("an event before any job".into()));
                };
                if e.job != *job || e.seq < rec.first_seq || e.seq > rec.seq || e.seq <= last_seq {
                    return Err(bad(format!(
                        "event {} of {} does not belong to job {job}, or is out of order",
                        e.seq, e.job
                    )));
                }
                rec.last_offset = rec.last_offset.max(e.offset);
                heads.offset = heads.offset.max(e.offset);
                heads.events += 1;
                let event = Event {
                    job: e.job,
                    seq: e.seq,
                    offset: e.offset,
                    at_ms: millis(&e.at).map_err(bad)?,
                    change: Change {
                        status: e.status,
                        percent: e.percent,
                        current: e.current,
                        total: e.total,
                        stage: e.stage,
                        message: e.message,
                        data: e.data,
                    },
                };
                last_seq = event.seq;
                // A run holds consecutive seqs and offsets; anything else starts a new one,
                // and so does a run as large as one publish may be.
                let size = event_size(&event);
                let continues = run.last().is_some_and(|l| {
                    l.seq + 1 == event.seq
                        && l.offset + 1 == event.offset
                        && run.len() < RUN_EVENTS
                        && run_bytes + size <= RUN_BYTES
                });
                if !continues {
                    end_run(&mut batch, &mut run, rec.num);
                    run_bytes = 0;
                }
                run_bytes += size;
                run.push(event);
                batched += 1;
            }
            "next" => {}
            other => return Err(bad(format!("unknown line type {other:?}"))),
        }
        if batched >= 10_000 {
            if let Some((_, rec)) = &current {
                end_run(&mut batch, &mut run, rec.num);
            }
            store.commit(&std::mem::take(&mut batch))?;
            batched = 0;
        }
    }
    if let Some((_, rec)) = &current {
        end_run(&mut batch, &mut run, rec.num);
    }
    flush_job(&mut batch, &mut current);
    batch.heads = Some(heads);
    store.commit(&batch)?;
    store.flush_now()?;
    Ok((heads.jobs, heads.events))
}
