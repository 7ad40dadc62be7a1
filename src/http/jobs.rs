//! Handlers of the job resources: publish, snapshot, list, history, delete; and the probes.
//!
//! They validate input into model types, then hand writes to the writer and read the store
//! through the visible watermark, so a reader never sees what a crash could take back.

use std::pin::pin;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::IgnoredAny;
use warp::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::{Reply, Response};

use super::error::ApiError;
use super::{job_from_path, json_response, parse_u64, query_pairs, query_value, AppState};
use crate::auth::Grant;
use crate::metrics::{Limit, StoreGauges};
use crate::model::{to_json_line, Change, Status, Update};

/// Default page of `GET /v1/jobs` and of history (the largest is `--max-list`).
const DEFAULT_LIMIT: usize = 100;

/// POST /v1/jobs/{job}/events
pub async fn publish<S, B>(
    job: String,
    grant: Grant,
    headers: PublishHeaders,
    body: S,
    state: AppState,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let job = job_from_path(&job)?;
    if !grant.can_publish(job.as_str()) {
        return Err(forbidden("publish to", job.as_str()));
    }
    if !is_json(headers.content_type.as_ref().and_then(|v| v.to_str().ok())) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let key = headers
        .idempotency_key
        .as_ref()
        .map(idempotency_key)
        .transpose()?;
    let max = state.config.max_body;
    let declared = match &headers.content_length {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(parse_u64).ok_or_else(|| {
            ApiError::InvalidBody("Content-Length must be a non-negative integer".into())
        })?),
    };
    let metrics = &state.src.metrics;
    if declared.is_some_and(|n| n > max as u64) {
        metrics.limit_hit(Limit::Body);
        return Err(ApiError::PayloadTooLarge(max));
    }
    let body = read_body(body, max).await.inspect_err(|e| {
        if matches!(e, ApiError::PayloadTooLarge(_)) {
            metrics.limit_hit(Limit::Body);
        }
    })?;
    let changes =
        parse_updates(&body, state.config.max_data, state.config.max_batch).inspect_err(|e| {
            if matches!(e, ApiError::BatchTooLarge(..)) {
                metrics.limit_hit(Limit::Batch);
            }
        })?;
    let appended = state.src.writer.append(job.clone(), changes, key).await?;
    Ok(json_response(
        // A repeat of an idempotency key: the first answer, nothing new created.
        if appended.replayed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        to_json_line(&serde_json::json!({
            "job": job.as_str(),
            "seq": appended.seq,
            "offset": appended.offset,
        })),
    ))
}

/// The headers a publish reads, as bytes.
pub struct PublishHeaders {
    pub content_type: Option<HeaderValue>,
    pub content_length: Option<HeaderValue>,
    pub idempotency_key: Option<HeaderValue>,
}

impl From<HeaderMap> for PublishHeaders {
    fn from(mut h: HeaderMap) -> PublishHeaders {
        PublishHeaders {
            content_type: h.remove(CONTENT_TYPE),
            content_length: h.remove(CONTENT_LENGTH),
            idempotency_key: h.remove("idempotency-key"),
        }
    }
}

/// An `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(raw: &HeaderValue) -> Result<String, ApiError> {
    let bytes = raw.as_bytes();
    if !bytes.is_empty() && bytes.len() <= 255 && bytes.iter().all(u8::is_ascii_graphic) {
        Ok(String::from_utf8_lossy(bytes).into_owned())
    } else {
        Err(ApiError::InvalidBody(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    }
}

/// 403 for `what` on `job`.
pub fn forbidden(what: &str, job: &str) -> ApiError {
    ApiError::Forbidden(format!("the token may not {what} {job:?}"))
}

/// `application/json`, any case, parameters allowed.
fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads the body, counting every byte: a chunked body has no Content-Length to check.
async fn read_body<S, B>(body: S, max: usize) -> Result<BytesMut, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidJson(format!("reading the body: {e}")))?;
        if buf.len() + chunk.remaining() > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
        buf.put(chunk);
    }
    Ok(buf)
}

/// One update (object) or a batch (array of 1 to 1000 updates), validated.
pub fn parse_updates(
    body: &[u8],
    max_data: usize,
    max_batch: usize,
) -> Result<Vec<Change>, ApiError> {
    // First: is it JSON at all? (Also refuses bodies that are not UTF-8.)
    serde_json::from_slice::<IgnoredAny>(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let invalid = |e: serde_json::Error| ApiError::InvalidBody(e.to_string());
    let updates = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => vec![serde_json::from_slice::<Update>(body).map_err(invalid)?],
        Some(b'[') => {
            let batch: Vec<Update> = serde_json::from_slice(body).map_err(invalid)?;
            if batch.is_empty() {
                return Err(ApiError::InvalidBody(
                    "a batch must hold at least one update".into(),
                ));
            }
            if batch.len() > max_batch {
                return Err(ApiError::BatchTooLarge(batch.len(), max_batch));
            }
            batch
        }
        _ => {
            return Err(ApiError::InvalidBody(
                "expected an update (JSON object) or a batch (JSON array of updates)".into(),
            ))
        }
    };
    updates
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            u.validate(max_data).map_err(|e| match body.first() {
                Some(b'[') => ApiError::InvalidBody(format!("update {i}: {e}")),
                _ => e.into(),
            })
        })
        .collect()
}

/// GET /v1/jobs/{job}
pub async fn snapshot(job: String, grant: Grant, state: AppState) -> Result<Response, ApiError> {
    let job = job_from_path(&job)?;
    if !grant.can_subscribe(job.as_str()) {
        return Err(forbidden("read", job.as_str()));
    }
    match state.src.visible_job(job.as_str()).await? {
        Some(rec) => Ok(json_response(StatusCode::OK, rec.to_json(job.as_str()))),
        None => Err(ApiError::JobNotFound(job.to_string())),
    }
}

/// DELETE /v1/jobs/{job}
pub async fn delete(job: String, grant: Grant, state: AppState) -> Result<Response, ApiError> {
    let job = job_from_path(&job)?;
    if !grant.is_admin() {
        return Err(ApiError::Forbidden(
            "deleting a job needs an admin token".into(),
        ));
    }
    if state.src.writer.delete(job.clone()).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::JobNotFound(job.to_string()))
    }
}

/// GET /v1/jobs?status=&prefix=&limit=&cursor=
pub async fn list(grant: Grant, query: String, state: AppState) -> Result<Response, ApiError> {
    let pairs = query_pairs(&query);
    let status = match query_value(&pairs, "status") {
        None | Some("") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::InvalidBody(format!(
                "status {s:?} is not one of queued, running, succeeded, failed, cancelled"
            ))
        })?),
    };
    let prefix = query_value(&pairs, "prefix").unwrap_or("");
    if !grant.can_subscribe_under(prefix) {
        return Err(forbidden("list jobs under", prefix));
    }
    let limit = limit(query_value(&pairs, "limit"), &state)?;
    let cursor = cursor(query_value(&pairs, "cursor"))?;
    let keep = |job: &str, rec: &crate::model::JobRecord| {
        status.is_none_or(|s| s == rec.status) && grant.can_subscribe(job)
    };
    let (jobs, more) =
        state
            .src
            .store
            .list_jobs(cursor.as_ref().map(|c| c.as_str()), prefix, &keep, limit)?;
    let newest = jobs.iter().map(|(_, r)| r.last_offset).max().unwrap_or(0);
    state.src.writer.wait_visible(newest).await?;
    let next_cursor = if more {
        jobs.last().map(|(job, _)| job.as_str())
    } else {
        None
    };
    #[derive(serde::Serialize)]
    struct Page<'a> {
        jobs: Vec<crate::model::SnapshotView<'a>>,
        next_cursor: Option<&'a str>,
    }
    let page = Page {
        jobs: jobs.iter().map(|(job, rec)| rec.view(job)).collect(),
        next_cursor,
    };
    Ok(json_response(StatusCode::OK, to_json_line(&page)))
}

/// `cursor`: the last job id of the previous page, if any.
fn cursor(raw: Option<&str>) -> Result<Option<crate::model::JobId>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(c) => crate::model::JobId::parse(c)
            .map(Some)
            .map_err(|_| ApiError::InvalidCursor(c.chars().take(140).collect())),
    }
}

/// `limit`: 1 and up, default 100; more than `--max-list` reads as `--max-list`.
fn limit(raw: Option<&str>, state: &AppState) -> Result<usize, ApiError> {
    let max = state.config.max_list;
    match raw {
        None | Some("") => Ok(DEFAULT_LIMIT.min(max)),
        Some(s) => match parse_u64(s) {
            Some(n) if n > max as u64 => {
                state.src.metrics.limit_hit(Limit::ListLimit);
                Ok(max)
            }
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(ApiError::InvalidBody(format!(
                "limit {s:?} must be an integer from 1 to {max}"
            ))),
        },
    }
}

/// GET /v1/jobs/{job}/events?after=N&limit=L
pub async fn history(
    job: String,
    grant: Grant,
    query: String,
    state: AppState,
) -> Result<Response, ApiError> {
    let job = job_from_path(&job)?;
    if !grant.can_subscribe(job.as_str()) {
        return Err(forbidden("read", job.as_str()));
    }
    let pairs = query_pairs(&query);
    let after = match query_value(&pairs, "after") {
        None | Some("") => 0,
        Some(s) => parse_u64(s)
            .ok_or_else(|| ApiError::InvalidLastEventId(s.chars().take(64).collect()))?,
    };
    let limit = limit(query_value(&pairs, "limit"), &state)?;
    let Some(rec) = state.src.visible_job(job.as_str()).await? else {
        return Err(ApiError::JobNotFound(job.to_string()));
    };
    let events = state.src.store.events_after(rec.num, after, limit)?;
    let mut body = String::with_capacity(64 + events.len() * 128);
    body.push_str(r#"{"events":["#);
    // Events newer than the snapshot we waited for may not be visible yet.
    for (i, ev) in events.iter().filter(|e| e.seq <= rec.seq).enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&ev.to_json());
    }
    body.push_str(&format!(
        r#"],"first_seq":{},"last_seq":{}}}"#,
        rec.first_seq, rec.seq
    ));
    Ok(json_response(StatusCode::OK, body))
}

/// GET /v1/admin/export?cursor=&limit=
pub async fn export(grant: Grant, query: String, state: AppState) -> Result<Response, ApiError> {
    if !grant.is_admin() {
        return Err(ApiError::Forbidden("export needs an admin token".into()));
    }
    let pairs = query_pairs(&query);
    let limit = limit(query_value(&pairs, "limit"), &state)?;
    let cursor = cursor(query_value(&pairs, "cursor"))?;
    let (page, _) = crate::backup::export_page(
        &state.src.store,
        &state.src.writer,
        cursor.as_ref().map(|c| c.as_str()),
        limit,
    )
    .await?;
    Ok(warp::reply::with_header(page, "content-type", "application/x-ndjson").into_response())
}

/// GET /metrics
pub fn metrics(state: &AppState) -> Response {
    let gauges = StoreGauges {
        jobs: state.src.store.job_count(),
        events: state.src.store.event_count(),
        watched_jobs: state.src.hub.watched_jobs(),
        head_offset: state.src.writer.visible(),
        disk_bytes: state.src.store.size_on_disk(),
        ready: state.supervisor.health().is_ready(),
    };
    warp::reply::with_header(
        state.src.metrics.render(&gauges),
        "content-type",
        "text/plain; version=0.0.4",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(Some("application/jsonx")));
        assert!(!is_json(None));
    }

    #[test]
    fn bodies_are_classified() {
        let code = |b: &str| {
            parse_updates(b.as_bytes(), 100, 1000)
                .map(|v| v.len())
                .map_err(|e| e.code())
        };
        assert_eq!(code(r#"{"percent":1}"#), Ok(1));
        assert_eq!(code(r#"[{"percent":1},{"stage":"x"}]"#), Ok(2));
        assert_eq!(code("{"), Err("invalid_json"));
        assert_eq!(code("\u{0}"), Err("invalid_json"));
        for body in [
            "42",
            "null",
            "{}",
            "[]",
            r#"{"nope":1}"#,
            r#"[{"percent":1}, 3]"#,
        ] {
            assert_eq!(code(body), Err("invalid_body"), "{body}");
        }
        let batch = format!("[{}]", vec![r#"{"percent":1}"#; 1001].join(","));
        assert_eq!(code(&batch), Err("invalid_body"));
        assert_eq!(
            parse_updates(b"\xff\xfe", 100, 1000).unwrap_err().code(),
            "invalid_json"
        );
    }
}
