//! Subscriptions: replay from the store, then live from the hub, with no seam.
//!
//! This is the heart of "a client that reconnects gets exactly what it missed". Both kinds of
//! subscription follow the same recipe:
//!
//! 1. subscribe to the hub channel *before* reading the store, so nothing published meanwhile
//!    can fall between the two;
//! 2. decide where to start: a snapshot (fresh subscribe), the resume point, or a `reset` when
//!    the resume point is not retained (too old) or not yet reached (in the future);
//! 3. replay retained events after that point from the store, never past the writer's visible
//!    watermark (what is above it will come live);
//! 4. follow the live channel, skipping what was replayed; a gap or a `Lagged` receiver sends
//!    us back to step 3 from the last position delivered.
//!
//! A subscription produces [`Frame`]s into a small bounded channel; the transports (`sse.rs`,
//! `ws.rs`) turn frames into bytes. A slow client fills that channel and then simply stops
//! its own subscription's progress: the broadcast channel moves on without it, and it catches
//! up from the store when it reads again. Nobody else waits.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Grant;
use crate::hub::{Attach, Detached, EventMsg, Hub, JobWatch, Notice, Position};
use crate::metrics::Metrics;
use crate::model::{to_json_line, JobId, JobRecord, Status};
use crate::store::{Logged, Store, StoreError};
use crate::writer::{WriteError, Writer};

/// Events read from the store per page.
const PAGE: usize = 256;

#[derive(Debug, Error)]
pub enum SubscriptionError {
    #[error("subscription: {0}")]
    Store(#[from] StoreError),
    #[error("subscription: {0}")]
    Write(#[from] WriteError),
}

/// One thing to deliver to a subscriber. Small (the rare large ones are boxed): a stream's
/// channel allocates room for 32 of them up front, idle or not.
#[derive(Debug)]
pub enum Frame {
    /// A job's snapshot: `snapshot` on a fresh subscribe, `reset` when the resume point was
    /// not retained.
    Snapshot(Box<Snapshot>),
    /// Where a multi-job stream without a resume point starts (the head when it subscribed):
    /// sent first, as an id without an event, so that a client reconnecting before any event
    /// arrived still resumes from there rather than from a later present.
    Position {
        offset: u64,
    },
    /// The reset of a multi-job stream: `{"jobs":[...]}` of every matching job, at `offset`.
    ResetAll {
        offset: u64,
        json: Box<str>,
    },
    Event(Arc<EventMsg>),
    /// A catch-up's page of one job's events, in order (at most [`PAGE`]): one message, so
    /// that the stream is woken once and writes them in a few `writev`s, not one per event.
    Events(Box<[Arc<EventMsg>]>),
    /// The job reached a terminal status; nothing follows for it.
    End {
        job: Arc<str>,
        status: Status,
    },
    /// The job was deleted or expired. `offset` is its log entry (0 when not known).
    Removed {
        job: Arc<str>,
        offset: u64,
    },
    /// The subscription failed (the store could not be read); the client should resume.
    Failed {
        job: Option<Arc<str>>,
    },
}

const _: () = assert!(std::mem::size_of::<Frame>() <= 32);

#[derive(Debug)]
pub struct Snapshot {
    pub reset: bool,
    /// Its id.
    pub seq: u64,
    pub json: String,
}

impl Frame {
    fn snapshot(reset: bool, job: &str, rec: &JobRecord) -> Frame {
        Frame::Snapshot(Box::new(Snapshot {
            reset,
            seq: rec.seq,
            json: rec.to_json(job),
        }))
    }
}

/// Everything a subscription reads from.
#[derive(Clone)]
pub struct Source {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
}

/// Where frames go; `false` from [`Out::send`] means the subscriber is gone.
struct Out<'a>(&'a mpsc::Sender<Frame>);

impl Out<'_> {
    async fn send(&self, frame: Frame) -> bool {
        self.0.send(frame).await.is_ok()
    }

    /// Waits until the stream has taken everything sent before (it may still be writing the
    /// last page it took), so that a subscriber holds at most two pages of catch-up: one
    /// being written, one waiting. None if the subscriber is gone.
    async fn emptied(&self) -> Option<()> {
        drop(self.0.reserve_many(self.0.max_capacity()).await.ok()?);
        Some(())
    }
}

/// Whether a subscription goes on after a step.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Done,
}

/// How a per-job subscription starts.
pub enum Start {
    /// The resume point is the end of a finished job: nothing will ever come (SSE answers
    /// 204 so EventSource stops reconnecting).
    Finished(Status),
    /// A resume point into a job that does not exist (any more): it was deleted or expired,
    /// so nothing will come either.
    Gone,
    Follow(Box<JobSubscription>),
}

impl Source {
    /// A job's record once everything it reflects is visible.
    pub async fn visible_job(&self, job: &str) -> Result<Option<JobRecord>, SubscriptionError> {
        let rec = self.store.job(job)?;
        if let Some(rec) = &rec {
            self.writer.wait_visible(rec.last_offset).await?;
        }
        Ok(rec)
    }

    /// Subscribes to one job from `resume` (a seq), or from its snapshot.
    pub fn open_job(&self, job: JobId, resume: Option<u64>) -> Result<Start, SubscriptionError> {
        let watch = self.hub.watch_job(job.as_str());
        let initial = self.store.job(job.as_str())?;
        match (resume, initial) {
            // Past the end is not "finished" but a reset (the id may have been reused).
            (Some(n), Some(rec)) if rec.is_finished() && n == rec.seq => {
                Ok(Start::Finished(rec.status))
            }
            // A client resuming a job it saw that no longer exists. (`after=0` is "from the
            // start", for a job not published yet.)
            (Some(n), None) if n > 0 => Ok(Start::Gone),
            (resume, initial) => Ok(Start::Follow(Box::new(JobSubscription {
                watch,
                job,
                resume,
                initial: initial.map(Box::new),
            }))),
        }
    }

    /// Subscribes to the jobs `filter` matches from `resume` (an offset), or from now.
    pub fn open_many(&self, filter: Filter, resume: Option<u64>) -> ManySubscription {
        let rx = self.hub.subscribe_all();
        ManySubscription {
            rx,
            filter,
            // "Now" is the moment of subscribing, not the moment the task gets to run.
            resume,
            now: self.writer.visible(),
        }
    }
}

/// A per-job subscription at the end of `rec`'s incarnation up to seq `last`.
fn at(rec: &JobRecord, last: u64) -> Position {
    Position {
        last,
        num: Some(rec.num),
    }
}

pub struct JobSubscription {
    watch: JobWatch,
    job: JobId,
    resume: Option<u64>,
    /// The job as it was when we subscribed: what "fresh subscribe" and "resume point"
    /// are judged against, so an event published after the subscription is delivered as an
    /// event, not folded into a snapshot.
    initial: Option<Box<JobRecord>>,
}

impl JobSubscription {
    /// Delivers frames into `out` until the job ends, the subscriber leaves or `cancel` fires.
    pub async fn run(
        mut self,
        src: Source,
        out: mpsc::Sender<Frame>,
        cancel: CancellationToken,
    ) -> Result<(), SubscriptionError> {
        let job: Arc<str> = Arc::from(self.job.as_str());
        let result = tokio::select! {
            r = self.follow(&src, Out(&out)) => r,
            () = cancel.cancelled() => Ok(()),
            () = out.closed() => Ok(()),
        };
        if result.is_err() {
            // Best effort: a client that is not reading will see the stream end instead.
            let _ = out.try_send(Frame::Failed { job: Some(job) });
        }
        result
    }

    async fn follow(&mut self, src: &Source, out: Out<'_>) -> Result<(), SubscriptionError> {
        // The opening and each catch-up are boxed: an idle subscription's task then holds
        // only what waiting on the stage needs. (Catch-up starts by waiting for room, so a
        // client handed back for not reading holds no page of events read for it.)
        let Some(mut pos) = Box::pin(self.open(src, &out)).await? else {
            return Ok(());
        };
        let job = self.job.as_str();
        // Replay from the store, then hand delivery to the hub's fan-out stage; whenever it
        // hands us back (a full channel, a gap) or will not take us yet, replay again from
        // where we are.
        loop {
            let ControlFlow::Continue(seen) = Box::pin(self.catch_up(src, &out, &mut pos)).await?
            else {
                return Ok(());
            };
            let Attach::Attached(back) = self.watch.attach(out.0, pos, seen) else {
                continue;
            };
            match back.await {
                Ok(Detached::Behind { pos: at, full }) => {
                    if full {
                        src.metrics.lag_catchups.fetch_add(1, Relaxed);
                    }
                    pos = at;
                }
                Ok(Detached::Ended { status }) => {
                    out.send(end(job, status)).await;
                    return Ok(());
                }
                Ok(Detached::Removed { job, offset }) => {
                    out.send(Frame::Removed { job, offset }).await;
                    return Ok(());
                }
                // The stage let go of us: the subscriber left.
                Err(_) => return Ok(()),
            }
        }
    }

    /// Where the subscription starts: after the snapshot it sent (a fresh subscribe, or a
    /// `reset` when the resume point is not retained) or at the resume point. `None` when
    /// nothing follows (the subscriber left, or the job had already ended).
    async fn open(
        &mut self,
        src: &Source,
        out: &Out<'_>,
    ) -> Result<Option<Position>, SubscriptionError> {
        let job = self.job.as_str();
        let mut pos = Position { last: 0, num: None };
        let initial = self.initial.take();
        if let Some(rec) = &initial {
            src.writer.wait_visible(rec.last_offset).await?;
        }
        match (self.resume, initial) {
            (None, Some(rec)) => {
                pos = at(&rec, rec.seq);
                if !out.send(Frame::snapshot(false, job, &rec)).await {
                    return Ok(None);
                }
                if rec.is_finished() {
                    out.send(end(job, rec.status)).await;
                    return Ok(None);
                }
            }
            // Not published yet: its events will be delivered from seq 1. (A resume point
            // into a job that is gone was answered by `open_job`.)
            (_, None) => {}
            (Some(n), Some(rec)) if n > rec.seq || n + 1 < rec.first_seq => {
                src.metrics.resets.fetch_add(1, Relaxed);
                pos = at(&rec, rec.seq);
                if !out.send(Frame::snapshot(true, job, &rec)).await {
                    return Ok(None);
                }
                if rec.is_finished() {
                    out.send(end(job, rec.status)).await;
                    return Ok(None);
                }
            }
            (Some(n), Some(rec)) => {
                if rec.is_finished() && n >= rec.seq {
                    out.send(end(job, rec.status)).await;
                    return Ok(None);
                }
                pos = at(&rec, n);
            }
        }
        Ok(Some(pos))
    }

    /// Replays from the store everything visible after `pos`. Goes on with the visible
    /// watermark it read up to: everything of the job at or below it has been delivered.
    async fn catch_up(
        &self,
        src: &Source,
        out: &Out<'_>,
        pos: &mut Position,
    ) -> Result<ControlFlow<(), u64>, SubscriptionError> {
        let job = self.job.as_str();
        // A subscription a little behind finds what it missed in the hub's recent events,
        // rendered and shared: no store read.
        loop {
            if out.emptied().await.is_none() {
                return Ok(ControlFlow::Break(()));
            }
            let Some(recent) = self.watch.recent_after(*pos, PAGE) else {
                break;
            };
            let n = recent.events.len() as u64;
            src.metrics.replayed_from_memory.fetch_add(n, Relaxed);
            if deliver_all(out, pos, recent.events).await == Flow::Done {
                return Ok(ControlFlow::Break(()));
            }
            if !recent.more {
                return Ok(ControlFlow::Continue(recent.upto));
            }
        }
        loop {
            let visible = src.writer.visible();
            let rec = match src.store.job(job)? {
                // Deleted (and maybe published again) while we were away.
                Some(rec) if pos.num.is_some_and(|n| n != rec.num) => None,
                other => other,
            };
            let Some(rec) = rec else {
                if pos.num.is_some() {
                    out.send(Frame::Removed {
                        job: Arc::from(job),
                        offset: 0,
                    })
                    .await;
                    return Ok(ControlFlow::Break(()));
                }
                return Ok(ControlFlow::Continue(visible));
            };
            pos.num = Some(rec.num);
            if pos.last + 1 < rec.first_seq {
                // Retention dropped what we had not delivered yet: say so.
                src.writer.wait_visible(rec.last_offset).await?;
                src.metrics.resets.fetch_add(1, Relaxed);
                pos.last = rec.seq;
                if !out.send(Frame::snapshot(true, job, &rec)).await {
                    return Ok(ControlFlow::Break(()));
                }
                if rec.is_finished() {
                    out.send(end(job, rec.status)).await;
                    return Ok(ControlFlow::Break(()));
                }
                return Ok(ControlFlow::Continue(visible));
            }
            // Not before the stream took the last page: a client that stopped reading
            // holds no more pages of events read for it.
            if out.emptied().await.is_none() {
                return Ok(ControlFlow::Break(()));
            }
            let events = src.store.events_after(rec.num, pos.last, PAGE)?;
            src.metrics
                .replayed_from_store
                .fetch_add(events.len() as u64, Relaxed);
            let full = events.len() == PAGE;
            let (mut gap, mut ahead) = (false, false);
            let mut rendered = Vec::with_capacity(events.len());
            for ev in &events {
                if ev.seq != pos.last + 1 + rendered.len() as u64 {
                    // Retention dropped the next one after we read the record: read it again
                    // (the branch above will say reset).
                    gap = true;
                    break;
                }
                if ev.offset > visible {
                    // Not durable yet: it will come live.
                    ahead = true;
                    break;
                }
                rendered.push(Arc::new(EventMsg::new(ev, rec.num)));
            }
            // Rendered once for the job's other subscriptions this far behind, too.
            self.watch.offer(&rendered);
            if deliver_all(out, pos, rendered).await == Flow::Done {
                return Ok(ControlFlow::Break(()));
            }
            if ahead || (!full && !gap) {
                return Ok(ControlFlow::Continue(visible));
            }
        }
    }
}

fn end(job: &str, status: Status) -> Frame {
    Frame::End {
        job: Arc::from(job),
        status,
    }
}

/// Delivers `events` (the next ones after `pos`, in order) as one frame, and `end` after a
/// terminal one (nothing after it is sent), moving `pos` along.
async fn deliver_all(out: &Out<'_>, pos: &mut Position, mut events: Vec<Arc<EventMsg>>) -> Flow {
    if let Some(terminal) = events.iter().position(|e| e.terminal.is_some()) {
        events.truncate(terminal + 1);
    }
    let Some(last) = events.last() else {
        return Flow::Continue;
    };
    pos.num = Some(last.num);
    pos.last = last.seq;
    let ending = last.terminal.map(|s| end(&last.job, s));
    let frame = if events.len() == 1 {
        Frame::Event(events.swap_remove(0))
    } else {
        Frame::Events(events.into_boxed_slice())
    };
    if !out.send(frame).await {
        return Flow::Done;
    }
    match ending {
        Some(frame) => {
            out.send(frame).await;
            Flow::Done
        }
        None => Flow::Continue,
    }
}

/// Which jobs a multi-job stream carries.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Exactly these jobs (`?job=a&job=b`).
    pub jobs: Option<BTreeSet<String>>,
    /// Jobs whose id starts with this (`?prefix=p`); empty for all.
    pub prefix: String,
    /// Only jobs the subscriber's token may read.
    pub grant: Grant,
}

impl Filter {
    pub fn matches(&self, job: &str) -> bool {
        job.starts_with(&self.prefix)
            && self.jobs.as_ref().is_none_or(|set| set.contains(job))
            && self.grant.can_subscribe(job)
    }

    /// The matching jobs' records.
    fn records(&self, store: &Store) -> Result<Vec<(String, JobRecord)>, StoreError> {
        match &self.jobs {
            Some(set) => {
                let mut out = Vec::with_capacity(set.len());
                for job in set.iter().filter(|j| self.matches(j)) {
                    if let Some(rec) = store.job(job)? {
                        out.push((job.clone(), rec));
                    }
                }
                Ok(out)
            }
            None => Ok(store
                .jobs_with_prefix(&self.prefix)?
                .into_iter()
                .filter(|(job, _)| self.grant.can_subscribe(job))
                .collect()),
        }
    }
}

pub struct ManySubscription {
    rx: broadcast::Receiver<Notice>,
    filter: Filter,
    resume: Option<u64>,
    /// The visible head when we subscribed: where a stream without resume point starts.
    now: u64,
}

impl ManySubscription {
    pub async fn run(
        mut self,
        src: Source,
        out: mpsc::Sender<Frame>,
        cancel: CancellationToken,
    ) -> Result<(), SubscriptionError> {
        let result = tokio::select! {
            r = self.follow(&src, Out(&out)) => r,
            () = cancel.cancelled() => Ok(()),
            () = out.closed() => Ok(()),
        };
        if result.is_err() {
            let _ = out.try_send(Frame::Failed { job: None });
        }
        result
    }

    async fn follow(&mut self, src: &Source, out: Out<'_>) -> Result<(), SubscriptionError> {
        // `last` is the last offset accounted for: delivered, or known not to match. Resets
        // and catch-ups are boxed: an idle subscription's task holds only what waiting needs.
        let mut last = self.now;
        match self.resume {
            Some(n) if n > src.writer.visible() || self.lost_after(src, n)? => {
                last = Box::pin(self.reset(src, &out)).await?;
            }
            Some(n) => last = n,
            None => {
                if !out.send(Frame::Position { offset: self.now }).await {
                    return Ok(());
                }
            }
        }
        Box::pin(self.catch_up(src, &out, &mut last)).await?;
        loop {
            match self.rx.recv().await {
                Ok(notice) => {
                    if notice.offset() <= last {
                        continue;
                    }
                    if notice.offset() > last + 1 {
                        // Every offset passes through this channel, so a hole means we missed
                        // some: the store has them.
                        Box::pin(self.catch_up(src, &out, &mut last)).await?;
                        if notice.offset() <= last {
                            continue;
                        }
                    }
                    last = notice.offset();
                    if !self.filter.matches(notice.job()) {
                        continue;
                    }
                    let frame = match notice {
                        Notice::Event(e) => Frame::Event(e),
                        Notice::Removed { job, offset, .. } => Frame::Removed { job, offset },
                    };
                    if !out.send(frame).await {
                        return Ok(());
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    src.metrics.lag_catchups.fetch_add(1, Relaxed);
                    Box::pin(self.catch_up(src, &out, &mut last)).await?;
                }
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Whether a matching event after offset `n` is no longer retained.
    fn lost_after(&self, src: &Source, n: u64) -> Result<bool, StoreError> {
        if src.store.heads()?.log_floor > n {
            return Ok(true);
        }
        Ok(self
            .filter
            .records(&src.store)?
            .iter()
            .any(|(_, rec)| rec.dropped_offset > n))
    }

    /// Sends a `reset` with the snapshots of every matching job; returns its offset.
    ///
    /// The snapshots and the offset must be one consistent cut (an event committed between
    /// reading the records and reading the head would be in neither), so they are read at a
    /// quiet point of the writer.
    async fn reset(&self, src: &Source, out: &Out<'_>) -> Result<u64, SubscriptionError> {
        src.metrics.resets.fetch_add(1, Relaxed);
        let (filter, store) = (self.filter.clone(), src.store.clone());
        let (offset, records) = src
            .writer
            .at_quiet_point(move |head| filter.records(&store).map(|r| (head, r)))
            .await??;
        #[derive(serde::Serialize)]
        struct Reset<'a> {
            jobs: Vec<crate::model::SnapshotView<'a>>,
        }
        let json = to_json_line(&Reset {
            jobs: records.iter().map(|(job, rec)| rec.view(job)).collect(),
        });
        out.send(Frame::ResetAll {
            offset,
            json: json.into_boxed_str(),
        })
        .await;
        Ok(offset)
    }

    /// Replays the log from `last` up to the visible watermark.
    ///
    /// Offsets with no log entry were dropped by retention (or are expired tombstones). When
    /// a page has such a hole, check whether it was something we carry: if so, reset rather
    /// than skip it.
    async fn catch_up(
        &self,
        src: &Source,
        out: &Out<'_>,
        last: &mut u64,
    ) -> Result<(), SubscriptionError> {
        loop {
            let visible = src.writer.visible();
            let from = *last;
            let entries: Vec<(u64, Logged)> = src
                .store
                .log_after(from, PAGE, &|job| self.filter.matches(job))?
                .into_iter()
                .take_while(|(offset, _)| *offset <= visible)
                .collect();
            let read = entries
                .iter()
                .filter(|(_, e)| matches!(e, Logged::Event { .. }))
                .count();
            src.metrics
                .replayed_from_store
                .fetch_add(read as u64, Relaxed);
            let full = entries.len() == PAGE;
            let mut expected = from + 1;
            let mut hole = false;
            for (offset, _) in &entries {
                hole |= *offset != expected;
                expected = offset + 1;
            }
            hole |= !full && expected <= visible;
            if hole && self.lost_after(src, from)? {
                *last = self.reset(src, out).await?;
                return Ok(());
            }
            for (offset, entry) in entries {
                let frame = match entry {
                    Logged::Event { num, event } => {
                        Frame::Event(Arc::new(EventMsg::new(&event, num)))
                    }
                    Logged::Removed { job, .. } => Frame::Removed {
                        job: Arc::from(job),
                        offset,
                    },
                    Logged::Elsewhere => {
                        *last = offset;
                        continue;
                    }
                };
                if !out.send(frame).await {
                    return Ok(());
                }
                *last = offset;
            }
            if !full {
                *last = (*last).max(visible);
                return Ok(());
            }
        }
    }
}
