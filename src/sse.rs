//! Server-Sent Events: the two stream endpoints and the framing of subscription frames.
//!
//! A stream is a supervised subscription task feeding a small bounded channel, and a response
//! body that reads it: `retry:` first, then frames, with `: keepalive` comments in the quiet.
//! The body ends when the subscription does: after `end`/`deleted`, when the client leaves
//! (the task sees its channel close), or at shutdown (the task sees the token), which is what
//! lets warp's graceful shutdown finish instead of waiting on an endless stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use warp::http::{HeaderValue, StatusCode};
use warp::reply::{Reply, Response};
use warp::sse::Event;

use crate::auth::Grant;
use crate::handoff::Handoff;
use crate::http::error::ApiError;
use crate::http::jobs::forbidden;
use crate::http::{job_from_path, query_pairs, query_value, resume_point, AppState};
use crate::hub::EventMsg;
use crate::metrics::Transport;
use crate::model::to_json_line;
use crate::subscription::{Filter, Frame, Start};

/// Frames buffered per stream beyond what the socket holds.
const BUFFER: usize = crate::hub::OUTBOX;

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
    // A subscriber while its task runs. (Not an async block, which would hold `sub` twice.)
    let run = sub.run(src, tx, token).inspect(move |_| drop(guard));
    state.supervisor.spawn("sse-job", run);
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
    // A subscriber while its task runs. (Not an async block, which would hold `sub` twice.)
    let run = sub.run(src, tx, token).inspect(move |_| drop(guard));
    state.supervisor.spawn("sse-many", run);
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
    let retry = retry_block(state.config.retry);
    let token = state.supervisor.token().clone();
    // A stream lives no longer than its token: it just closes (no `end`: the job goes on).
    let expiry = grant.remaining();
    let expired = async move {
        match expiry {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    let frames = Blocks {
        rx,
        batch: Vec::new().into_iter(),
        ids,
    };
    let again = retry.clone();
    let body = stream::once(std::future::ready(retry))
        .chain(KeepAlive::new(frames, state.config.keepalive))
        .take_until(expired)
        // A stream ended by shutdown says when to come back; EventSource then resumes with
        // Last-Event-ID against the restarted daemon.
        .chain(
            stream::once(async move { token.is_cancelled() })
                .filter_map(move |stopping| std::future::ready(stopping.then(|| again.clone()))),
        )
        .map(Ok::<_, Infallible>);
    let mut res = warp::reply::stream(body).into_response();
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Written by our own loop once the head is ready, without hyper's buffers (`handoff.rs`).
    res.extensions_mut().insert(Handoff);
    res
}

fn retry_block(retry: Duration) -> Bytes {
    Bytes::from(Event::default().retry(retry).to_string())
}

/// A stream's frames as SSE blocks; the events of a catch-up's page one block each.
struct Blocks {
    rx: mpsc::Receiver<Frame>,
    /// What is left of the page being written.
    batch: std::vec::IntoIter<Arc<EventMsg>>,
    ids: Ids,
}

impl Stream for Blocks {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(e) = self.batch.next() {
                return Poll::Ready(Some(event_block(&e, self.ids)));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Frame::Events(page)) => self.batch = page.into_vec().into_iter(),
                Some(frame) => return Poll::Ready(Some(render(frame, self.ids))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// An event's block: rendered once, by whichever of its subscribers gets there first, and
/// shared by the others.
fn event_block(e: &Arc<EventMsg>, ids: Ids) -> Bytes {
    let cell = match ids {
        Ids::Seq => &e.sse_by_seq,
        Ids::Offset => &e.sse_by_offset,
    };
    cell.get_or_init(|| {
        let id = match ids {
            Ids::Seq => e.seq,
            Ids::Offset => e.offset,
        };
        let event = Event::default()
            .event("progress")
            .id(id.to_string())
            .data(e.json.clone());
        Bytes::from(event.to_string())
    })
    .clone()
}

/// A `: keepalive` comment in every keepalive interval in which nothing else was sent. A
/// ticking interval rather than a timer reset per frame: a delivery costs no timer work.
struct KeepAlive<S> {
    frames: S,
    tick: tokio::time::Interval,
    /// Nothing was sent since the last tick.
    quiet: bool,
}

impl<S> KeepAlive<S> {
    fn new(frames: S, every: Duration) -> KeepAlive<S> {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        KeepAlive {
            frames,
            tick,
            quiet: true,
        }
    }
}

impl<S: Stream<Item = Bytes> + Unpin> Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Poll::Ready(next) = self.frames.poll_next_unpin(cx) {
            self.quiet = false;
            return Poll::Ready(next);
        }
        while self.tick.poll_tick(cx).is_ready() {
            if self.quiet {
                return Poll::Ready(Some(Bytes::from_static(b": keepalive\n\n")));
            }
            self.quiet = true;
        }
        Poll::Pending
    }
}

/// The bytes of any frame (a page's are its events' blocks one after the other).
fn render(frame: Frame, ids: Ids) -> Bytes {
    let event = match frame {
        Frame::Event(e) => return event_block(&e, ids),
        Frame::Events(page) => {
            let blocks: Vec<Bytes> = page.iter().map(|e| event_block(e, ids)).collect();
            return Bytes::from(blocks.concat());
        }
        Frame::Snapshot(s) => Event::default()
            .event(if s.reset { "reset" } else { "snapshot" })
            .id(s.seq.to_string())
            .data(s.json),
        // `id:` alone: EventSource records it as its Last-Event-ID and fires no event.
        Frame::Position { offset } => Event::default().id(offset.to_string()),
        Frame::ResetAll { offset, json } => Event::default()
            .event("reset")
            .id(offset.to_string())
            .data(String::from(json)),
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
    };
    Bytes::from(event.to_string())
}
