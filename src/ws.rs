//! WebSocket: one session per socket, for one job (`/v1/jobs/{job}/ws`) or for many jobs
//! subscribed by message (`/v1/ws`).
//!
//! A session is a tracked task (warp spawns the upgrade future itself; we wrap it with
//! `Supervisor::track`). Each subscription of a session is a supervised subscription task with
//! its own small channel; the session merges them in a `StreamMap` keyed by job, so
//! unsubscribing (or subscribing again) drops that channel, which ends the old subscription
//! and discards what it had queued.
//!
//! Close codes: 1000 after `end`/`deleted` on a per-job socket, 1001 at shutdown, 1003 for a
//! binary frame, 1009 for a message over 64 KiB. Pings go out every keepalive interval; a
//! client silent for two intervals is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamMap;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::auth::Grant;
use crate::http::error::ApiError;
use crate::http::jobs::forbidden;
use crate::http::{job_from_path, parse_u64, query_pairs, query_value, AppState};
use crate::hub::EventMsg;
use crate::metrics::{Limit, Transport};
use crate::model::{to_json_line, JobId};
use crate::subscription::{Frame, Start};

/// Largest frame and message a client may send (contract: 64 KiB, else close 1009).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Frames buffered per subscription.
const BUFFER: usize = crate::hub::OUTBOX;

const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const UNSUPPORTED: u16 = 1003;
const TOO_BIG: u16 = 1009;
const INTERNAL: u16 = 1011;
const POLICY: u16 = 1008;

#[derive(Debug, Error)]
pub enum WsError {
    #[error("websocket send: {0}")]
    Send(#[source] warp::Error),
}

/// The upgrade, with the contract's size limits.
pub fn upgrade() -> impl Filter<Extract = (Ws,), Error = warp::Rejection> + Clone {
    warp::ws().map(|ws: Ws| ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE))
}

/// A per-job socket's subscription, opened before the handshake: a bad `after` is a `400`
/// rather than a socket that closes at once, and an event published after the handshake is
/// delivered as an event (not folded into a snapshot).
pub struct JobParams {
    job: JobId,
    start: Start,
    grant: Grant,
    state: AppState,
}

pub async fn check_job(
    job: String,
    grant: Grant,
    query: String,
    state: AppState,
) -> Result<JobParams, ApiError> {
    let job = job_from_path(&job)?;
    if !grant.can_subscribe(job.as_str()) {
        return Err(forbidden("read", job.as_str()));
    }
    let pairs = query_pairs(&query);
    let resume = match query_value(&pairs, "after") {
        None => None,
        Some(raw) => Some(
            parse_u64(raw)
                .ok_or_else(|| ApiError::InvalidLastEventId(raw.chars().take(64).collect()))?,
        ),
    };
    let start = state.src.open_job(job.clone(), resume)?;
    Ok(JobParams {
        job,
        start,
        grant,
        state,
    })
}

/// GET /v1/jobs/{job}/ws?after=N
pub fn job_session(params: JobParams, ws: Ws) -> Response {
    let supervisor = params.state.supervisor.clone();
    ws.on_upgrade(move |socket| {
        supervisor.track(
            "ws-job",
            Session::new(params.state, params.grant, true)
                .run(socket, Some((params.job, params.start))),
        )
    })
    .into_response()
}

/// GET /v1/ws
pub fn many_session(grant: Grant, state: AppState, ws: Ws) -> Response {
    let supervisor = state.supervisor.clone();
    ws.on_upgrade(move |socket| {
        supervisor.track(
            "ws-many",
            Session::new(state, grant, false).run(socket, None),
        )
    })
    .into_response()
}

/// What a client of `/v1/ws` may send, as JSON.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        job: String,
        #[serde(default)]
        after: Option<serde_json::Value>,
    },
    Unsubscribe {
        job: String,
    },
}

/// A valid request from a `/v1/ws` client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientRequest {
    Subscribe {
        job: JobId,
        after: Option<u64>,
    },
    /// Unsubscribing from anything is harmless, so the id is not validated.
    Unsubscribe {
        job: String,
    },
}

/// Reads one text message of a `/v1/ws` client; the error is what its `error` frame says.
pub fn parse_client_message(text: &str) -> Result<ClientRequest, ApiError> {
    let msg = match serde_json::from_str::<ClientMessage>(text) {
        Ok(msg) => msg,
        Err(e) if e.is_syntax() || e.is_eof() => return Err(ApiError::InvalidJson(e.to_string())),
        Err(e) => return Err(ApiError::InvalidBody(e.to_string())),
    };
    match msg {
        ClientMessage::Subscribe { job, after } => {
            let job = JobId::parse(&job)?;
            let after = match after {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .ok_or_else(|| ApiError::InvalidLastEventId(v.to_string()))?,
                ),
            };
            Ok(ClientRequest::Subscribe { job, after })
        }
        ClientMessage::Unsubscribe { job } => Ok(ClientRequest::Unsubscribe { job }),
    }
}

struct Session {
    state: AppState,
    /// What the token of the handshake allows; the socket closes (1008) when it expires.
    grant: Grant,
    /// A per-job socket closes when its job ends or is deleted.
    single: bool,
    subs: StreamMap<String, ReceiverStream<Frame>>,
}

/// Why the loop stopped: a close frame to send, or nothing (the peer is gone).
type Closing = Option<(u16, &'static str)>;

impl Session {
    fn new(state: AppState, grant: Grant, single: bool) -> Session {
        Session {
            state,
            grant,
            single,
            subs: StreamMap::new(),
        }
    }

    async fn run(mut self, socket: WebSocket, job: Option<(JobId, Start)>) -> Result<(), WsError> {
        let _guard = self.state.src.metrics.subscriber(Transport::Ws);
        let (mut sink, mut stream) = socket.split();
        let shutdown = self.state.supervisor.token().clone();
        let keepalive = self.state.config.keepalive;
        let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // When the oldest ping still unanswered went out.
        let mut unanswered: Option<Instant> = None;

        if let Some((job, start)) = job {
            if let Some(text) = self.follow(job, start) {
                // Already over: say so, then close.
                sink.send(Message::text(text))
                    .await
                    .map_err(WsError::Send)?;
                let _ = sink.send(Message::close_with(NORMAL, "job finished")).await;
                return Ok(());
            }
        }

        let expiry = self.grant.remaining();
        let expired = async move {
            match expiry {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let closing: Closing = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Some((GOING_AWAY, "server shutting down")),
                () = &mut expired => break Some((POLICY, "token expired")),
                Some((_, frame)) = self.subs.next() => {
                    let closing = match &frame {
                        Frame::End { .. } | Frame::Removed { .. } => Some((NORMAL, "job finished")),
                        Frame::Failed { .. } => Some((INTERNAL, "subscription failed; reconnect")),
                        Frame::Snapshot(_)
                        | Frame::ResetAll { .. }
                        | Frame::Position { .. }
                        | Frame::Event(_)
                        | Frame::Events(_) => None,
                    };
                    match frame {
                        // A catch-up's page: a message per event, flushed once.
                        Frame::Events(page) => {
                            for e in page {
                                sink.feed(Message::text(event_text(&e)))
                                    .await
                                    .map_err(WsError::Send)?;
                            }
                            sink.flush().await.map_err(WsError::Send)?;
                        }
                        frame => sink
                            .send(Message::text(ws_text(frame)))
                            .await
                            .map_err(WsError::Send)?,
                    }
                    if self.single && closing.is_some() {
                        break closing;
                    }
                }
                msg = stream.next() => match msg {
                    None => break None,
                    Some(Err(e)) => {
                        if too_big(&e) {
                            self.state.src.metrics.limit_hit(Limit::WsMessage);
                            break Some((TOO_BIG, "message too big"));
                        }
                        break None;
                    }
                    Some(Ok(msg)) => {
                        unanswered = None;
                        if msg.is_binary() {
                            break Some((UNSUPPORTED, "binary frames are not accepted"));
                        }
                        if msg.is_close() {
                            break None;
                        }
                        if let Ok(text) = msg.to_str() {
                            for reply in self.on_text(text) {
                                sink.send(Message::text(reply)).await.map_err(WsError::Send)?;
                            }
                        }
                    }
                },
                _ = ping.tick() => {
                    if unanswered.is_some_and(|t| t.elapsed() >= keepalive * 2) {
                        // Dead peer: nobody to say goodbye to.
                        break None;
                    }
                    unanswered.get_or_insert_with(Instant::now);
                    sink.send(Message::ping(Vec::new())).await.map_err(WsError::Send)?;
                }
            }
        };
        // Ending the streams ends their subscription tasks.
        drop(self.subs);
        if let Some((code, reason)) = closing {
            let _ = sink.send(Message::close_with(code, reason)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        Ok(())
    }

    /// A text message from the client; returns the frames that answer it, in order.
    fn on_text(&mut self, text: &str) -> Vec<String> {
        if self.single {
            return vec![error_text(&ApiError::InvalidBody(
                "this socket follows one job and takes no messages; use /v1/ws to subscribe".into(),
            ))];
        }
        let msg = match parse_client_message(text) {
            Ok(msg) => msg,
            Err(e) => return vec![error_text(&e)],
        };
        match msg {
            ClientRequest::Subscribe { job, after: resume } => {
                if !self.grant.can_subscribe(job.as_str()) {
                    return vec![error_text(&forbidden("read", job.as_str()))];
                }
                let max = self.state.config.max_subscriptions_per_socket;
                if self.subs.len() >= max && !self.subs.contains_key(job.as_str()) {
                    self.state.src.metrics.limit_hit(Limit::Subscriptions);
                    return vec![to_json_line(&serde_json::json!({
                        "type": "error",
                        "error": "limit_exceeded",
                        "message": format!("a socket follows at most {max} jobs; unsubscribe first"),
                        "job": job.as_str(),
                    }))];
                }
                let subscribed =
                    to_json_line(&serde_json::json!({"type": "subscribed", "job": job.as_str()}));
                // `subscribed` goes out before any of the job's frames: those wait in the
                // subscription's channel until the session loop reads them.
                match self.state.src.open_job(job.clone(), resume) {
                    Ok(start) => match self.follow(job, start) {
                        None => vec![subscribed],
                        Some(end) => vec![subscribed, end],
                    },
                    Err(e) => vec![error_text(&e.into())],
                }
            }
            ClientRequest::Unsubscribe { job } => {
                self.subs.remove(&job);
                vec![to_json_line(
                    &serde_json::json!({"type": "unsubscribed", "job": job}),
                )]
            }
        }
    }

    /// Follows an opened subscription; if the job is already over for its resume point,
    /// returns the frame that says so (`end` or `deleted`) instead.
    fn follow(&mut self, job: JobId, start: Start) -> Option<String> {
        let sub = match start {
            Start::Follow(sub) => sub,
            Start::Gone => {
                self.subs.remove(job.as_str());
                return Some(to_json_line(
                    &serde_json::json!({"type": "deleted", "job": job.as_str()}),
                ));
            }
            Start::Finished(status) => {
                self.subs.remove(job.as_str());
                return Some(to_json_line(
                    &serde_json::json!({"type": "end", "job": job.as_str(), "status": status}),
                ));
            }
        };
        let (tx, rx) = mpsc::channel(BUFFER);
        self.subs.insert(job.to_string(), ReceiverStream::new(rx));
        let (src, token) = (
            self.state.src.clone(),
            self.state.supervisor.token().clone(),
        );
        self.state
            .supervisor
            .spawn("ws-subscription", sub.run(src, tx, token));
        None
    }
}

fn ws_text(frame: Frame) -> String {
    match frame {
        Frame::Snapshot(s) => {
            let kind = if s.reset { "reset" } else { "snapshot" };
            format!(r#"{{"type":"{kind}","job":{}}}"#, s.json)
        }
        Frame::Event(e) => event_text(&e),
        // Sent a message per event (above); as one text, the events one per line.
        Frame::Events(page) => page.iter().map(event_text).collect::<Vec<_>>().join("\n"),
        Frame::End { job, status } => {
            to_json_line(&serde_json::json!({"type": "end", "job": &*job, "status": status}))
        }
        Frame::Removed { job, .. } => {
            to_json_line(&serde_json::json!({"type": "deleted", "job": &*job}))
        }
        Frame::Failed { job } => to_json_line(&serde_json::json!({
            "type": "error",
            "error": "unavailable",
            "message": "the subscription failed; subscribe again to resume",
            "job": job.as_deref(),
        })),
        // Never produced for a WebSocket: its subscriptions are per job.
        Frame::ResetAll { json, .. } => json.into(),
        Frame::Position { offset } => {
            to_json_line(&serde_json::json!({"type": "position", "offset": offset}))
        }
    }
}

/// An event's text frame: rendered once, shared by its subscribers.
fn event_text(e: &Arc<EventMsg>) -> String {
    e.ws_text
        .get_or_init(|| format!(r#"{{"type":"event","event":{}}}"#, e.json))
        .clone()
}

fn error_text(e: &ApiError) -> String {
    to_json_line(&serde_json::json!({"type": "error", "error": e.code(), "message": e.to_string()}))
}

/// Whether a read failed because the client's message was over our limit.
fn too_big(e: &warp::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
