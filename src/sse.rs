//! Server-Sent Events: the two stream endpoints and the framing of subscription frames.
//!
//! A stream is a supervised subscription task feeding a small bounded channel, and a response
//! body that reads it: `retry:` first, then frames, with `: keepalive` comments in the quiet.
//! The body ends when the subscription does: after `end`/`deleted`, when the client leaves
//! (the task sees its channel close), or at shutdown (the task sees the token), which is what
//! lets warp's graceful shutdown finish instead of waiting on an endless stream.

use std::convert::Infallible;

use futures_util::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::{Reply, Response};
use warp::sse::Event;

use crate::auth::Grant;
use crate::http::error::ApiError;
use crate::http::jobs::forbidden;
use crate::http::{job_from_path, query_pairs, query_value, resume_point, AppState};
use crate::metrics::Transport;
use crate::model::to_json_line;
use crate::subscription::{Filter, Frame, Start};

/// Frames buffered per stream beyond what the socket holds.
const BUFFER: usize = 16;

/// Which id a stream's events carry.
#[derive(Clone, Copy)]
enum Ids {
    /// Per-job stream: the event's seq.
    Seq,
    /// Multi-job stream: the global offset.
    Offset,
}

/// GET /v1/jobs/{job}/stream
pub async fn job_stream(
    job: String,
    grant: Grant,
    last_event_id: Option<String>,
    query: String,
    state: AppState,
) -> Result<Response, ApiError> {
    let job = job_from_path(&job)?;
    if !grant.can_subscribe(job.as_str()) {
        return Err(forbidden("read", job.as_str()));
    }
    let pairs = query_pairs(&query);
    let resume = resume_point(last_event_id.as_deref(), query_value(&pairs, "after"))?;
    let sub = match state.src.open_job(job, resume)? {
        // Nothing more will ever come: 204 makes EventSource stop reconnecting.
        Start::Finished(_) | Start::Gone => return Ok(StatusCode::NO_CONTENT.into_response()),
        Start::Follow(sub) => sub,
    };
    let (tx, rx) = mpsc::channel(BUFFER);
    let guard = state.src.metrics.subscriber(Transport::Sse);
    let (src, token) = (state.src.clone(), state.supervisor.token().clone());
    state.supervisor.spawn("sse-job", async move {
        let _guard = guard;
        sub.run(src, tx, token).await
    });
    Ok(respond(&state, rx, Ids::Seq, &grant))
}

/// GET /v1/stream?job=a&job=b | ?prefix=p
pub async fn many_stream(
    grant: Grant,
    last_event_id: Option<String>,
    query: String,
    state: AppState,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&query);
    let resume = resume_point(last_event_id.as_deref(), query_value(&pairs, "after"))?;
    let filter = filter(&pairs, &grant)?;
    let sub = state.src.open_many(filter, resume);
    let (tx, rx) = mpsc::channel(BUFFER);
    let guard = state.src.metrics.subscriber(Transport::Sse);
    let (src, token) = (state.src.clone(), state.supervisor.token().clone());
    state.supervisor.spawn("sse-many", async move {
        let _guard = guard;
        sub.run(src, tx, token).await
    });
    Ok(respond(&state, rx, Ids::Offset, &grant))
}

/// `?job=` (repeatable, each validated) and `?prefix=`, within what `grant` may read: a
/// filter wholly outside it is refused; otherwise the stream only carries readable jobs.
pub fn filter(pairs: &[(String, String)], grant: &Grant) -> Result<Filter, ApiError> {
    let mut jobs = None;
    for (_, v) in pairs.iter().filter(|(k, _)| k == "job") {
        let id = crate::model::JobId::parse(v)?;
        if !grant.can_subscribe(id.as_str()) {
            return Err(forbidden("read", id.as_str()));
        }
        jobs.get_or_insert_with(std::collections::BTreeSet::new)
            .insert(id.as_str().to_owned());
    }
    let prefix = query_value(pairs, "prefix").unwrap_or("");
    if !grant.can_subscribe_under(prefix) {
        return Err(forbidden("read jobs under", prefix));
    }
    Ok(Filter {
        jobs,
        prefix: prefix.to_owned(),
        grant: grant.clone(),
    })
}

fn respond(state: &AppState, rx: mpsc::Receiver<Frame>, ids: Ids, grant: &Grant) -> Response {
    let retry = state.config.retry;
    let token = state.supervisor.token().clone();
    // A stream lives no longer than its token: it just closes (no `end`: the job goes on).
    let expiry = grant.remaining();
    let expired = async move {
        match expiry {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    let events = stream::once(async move { Ok::<_, Infallible>(Event::default().retry(retry)) })
        .chain(ReceiverStream::new(rx).map(move |frame| Ok(sse_event(frame, ids))))
        .take_until(expired)
        // A stream ended by shutdown says when to come back; EventSource then resumes with
        // Last-Event-ID against the restarted daemon.
        .chain(
            stream::once(async move { token.is_cancelled() }).filter_map(move |stopping| {
                std::future::ready(stopping.then(|| Ok(Event::default().retry(retry))))
            }),
        );
    let body = warp::sse::keep_alive()
        .interval(state.config.keepalive)
        .text(" keepalive")
        .stream(events);
    let mut res = warp::sse::reply(body).into_response();
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

fn sse_event(frame: Frame, ids: Ids) -> Event {
    match frame {
        Frame::Snapshot {
            reset, seq, json, ..
        } => Event::default()
            .event(if reset { "reset" } else { "snapshot" })
            .id(seq.to_string())
            .data(json),
        // `id:` alone: EventSource records it as its Last-Event-ID and fires no event.
        Frame::Position { offset } => Event::default().id(offset.to_string()),
        Frame::ResetAll { offset, json } => Event::default()
            .event("reset")
            .id(offset.to_string())
            .data(json),
        Frame::Event(e) => Event::default()
            .event("progress")
            .id(match ids {
                Ids::Seq => e.seq.to_string(),
                Ids::Offset => e.offset.to_string(),
            })
            .data(e.json.clone()),
        Frame::End { job, status } => Event::default().event("end").data(to_json_line(
            &serde_json::json!({"job": &*job, "status": status}),
        )),
        Frame::Failed { job } => {
            Event::default()
                .event("error")
                .data(to_json_line(&serde_json::json!({
                    "error": "unavailable",
                    "message": "the subscription failed; reconnect to resume",
                    "job": job.as_deref(),
                })))
        }
        Frame::Removed { job, offset } => {
            let event = Event::default()
                .event("deleted")
                .data(to_json_line(&serde_json::json!({"job": &*job})));
            match ids {
                Ids::Offset if offset > 0 => event.id(offset.to_string()),
                Ids::Offset | Ids::Seq => event,
            }
        }
    }
}
