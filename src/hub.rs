//! The hub: in-process fan-out of durable events to live subscribers.
//!
//! The writer publishes here only after an event is durable, so nothing a subscriber sees can
//! be taken back by a crash. Notices go into `tokio::sync::broadcast` channels, in offset
//! order:
//!
//! - one channel carries every notice; multi-job streams each hold a receiver of it;
//! - each job with live subscriptions has a channel of its own, read by the job's **fan-out
//!   stage** (one supervised task, started by the first subscription and ended [`LINGER`]
//!   after the last one left, or at shutdown). The stage delivers each notice to the per-job
//!   subscriptions *attached* to it: one `try_send` of a shared frame per subscriber, in
//!   slices with a yield between them. So a fan-out to 10,000 subscribers wakes each
//!   connection once, never queues a publisher's request behind all of them, and a busy job
//!   never delays another job's stage.
//!
//! A per-job subscription replays from the store by itself, then attaches with its position;
//! the stage hands it back (`Detached`) when it cannot deliver the next notice in order (a full
//! channel, a gap, a lag of its own) and it catches up from the store again. Nothing ever
//! blocks a publisher: the broadcast channel overwrites its oldest slot. Memory is bounded by
//! the channel capacities, not by client speed.
//!
//! The stage keeps the job's latest events, rendered, and keeps taking them up for a while
//! after its last subscriber left: clients that drop together and come back together (a
//! network blip, a deploy of the front end) catch up from there, not each from the store.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::model::{Event, Status};
use crate::store::Store;
use crate::subscription::Frame;
use crate::supervisor::Supervisor;
use crate::writer::Writer;

/// A durable event, rendered to JSON once by the writer and shared by every subscriber.
///
/// Its frames on the wire are rendered by the first subscriber that sends one and shared by
/// all the others: a delivery is a reference count, never a serialization.
#[derive(Debug)]
pub struct EventMsg {
    pub job: Arc<str>,
    /// Incarnation of the job (see `JobRecord::num`).
    pub num: u64,
    pub seq: u64,
    pub offset: u64,
    /// Set when this event ended the job.
    pub terminal: Option<Status>,
    pub json: String,
    /// The SSE block with the seq as id (per-job streams), once rendered.
    pub sse_by_seq: OnceLock<Bytes>,
    /// The SSE block with the offset as id (multi-job streams), once rendered.
    pub sse_by_offset: OnceLock<Bytes>,
    /// The WebSocket text frame, once rendered.
    pub ws_text: OnceLock<String>,
}

impl EventMsg {
    /// Renders a stored event of job incarnation `num`.
    pub fn new(event: &Event, num: u64) -> EventMsg {
        EventMsg {
            job: Arc::from(event.job.as_str()),
            num,
            seq: event.seq,
            offset: event.offset,
            terminal: event.change.status.filter(|s| s.is_terminal()),
            json: event.to_json(),
            sse_by_seq: OnceLock::new(),
            sse_by_offset: OnceLock::new(),
            ws_text: OnceLock::new(),
        }
    }
}

/// What flows through the channels.
#[derive(Clone, Debug)]
pub enum Notice {
    Event(Arc<EventMsg>),
    /// Incarnation `num` of the job was deleted (or expired); `offset` is the log entry of
    /// its removal.
    Removed {
        job: Arc<str>,
        num: u64,
        offset: u64,
    },
}

impl Notice {
    pub fn job(&self) -> &str {
        match self {
            Notice::Event(e) => &e.job,
            Notice::Removed { job, .. } => job,
        }
    }

    pub fn offset(&self) -> u64 {
        match self {
            Notice::Event(e) => e.offset,
            Notice::Removed { offset, .. } => *offset,
        }
    }
}

pub struct Hub {
    // A std Mutex: the critical sections are map and list updates, `send`s and `try_send`s,
    // never an await, and a std lock is cheaper than tokio's when it is never held across one.
    jobs: Mutex<HashMap<Arc<str>, JobFan>>,
    /// Every notice, in offset order, for multi-job streams.
    all: broadcast::Sender<Notice>,
    /// Highest offset published so far.
    published: AtomicU64,
    next_id: AtomicU64,
    job_capacity: usize,
    /// Runs the per-job fan-out stages.
    supervisor: Supervisor,
    /// Where a stage that lagged reads what it missed (set once the writer runs).
    replay: OnceLock<(Store, Writer)>,
}

/// A job with live subscriptions: its notices, who is attached to its fan-out stage, and
/// what the stage has already taken up (a subscription behind that must catch up from the
/// store first).
struct JobFan {
    /// Tells one life of the entry from the next (a stage only serves its own).
    id: u64,
    tx: broadcast::Sender<Notice>,
    /// Subscriptions of this job (attached or not); the entry goes [`LINGER`] after the
    /// last one left.
    watchers: usize,
    /// Told when `watchers` drops to zero.
    left: Arc<Notify>,
    attached: Vec<Attached>,
    /// Highest offset published before the entry existed: the stage never sees those, so a
    /// subscription must have read the store at least this far before it attaches.
    born: u64,
    /// Offset of the last notice the stage took up.
    taken: u64,
    /// The stage is between two slices of a pass over `attached`: nobody else may move its
    /// entries.
    passing: bool,
    /// Notices up to this offset may have been missed by the stage (it lagged).
    lost_upto: u64,
    /// Incarnation and seq of the last event the stage took up.
    stage_last: Option<(u64, u64)>,
    /// The job's latest events the stage took up, in seq order of one incarnation (at most
    /// the channel's capacity): a subscription a little behind catches up from here, with
    /// frames already rendered, instead of reading and rendering from the store.
    recent: VecDeque<Arc<EventMsg>>,
}

/// A subscription the stage delivers to directly.
struct Attached {
    id: u64,
    /// None once the subscription is dropped: its slot stays until the stage removes it,
    /// because only the stage may move entries (a pass over them spans several slices).
    out: Option<mpsc::Sender<Frame>>,
    pos: Position,
    back: oneshot::Sender<Detached>,
}

/// Where a per-job subscription stands: the incarnation it follows (once known) and the
/// last seq it delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub num: Option<u64>,
    pub last: u64,
}

/// Why the stage handed a subscription back.
#[derive(Debug)]
pub enum Detached {
    /// Its channel was full (`full`), the next notice is not the next seq, or the stage
    /// lagged: catch up from the store from `pos`.
    Behind { pos: Position, full: bool },
    /// It delivered the job's terminal event: send `end` and stop.
    Ended { status: Status },
    /// The incarnation it follows was removed.
    Removed { job: Arc<str>, offset: u64 },
}

/// The answer to [`JobWatch::attach`].
pub enum Attach {
    /// The stage delivers from now on; the receiver says when and why it stopped.
    Attached(oneshot::Receiver<Detached>),
    /// The stage already took up a notice past what the subscription has read from the
    /// store: catch up again first.
    Behind,
}

/// Subscriptions served per slice of a pass: between slices the stage goes to the back of the
/// run queue, so a publisher's request (or another job's stage) never waits for a whole
/// fan-out to thousands. (Two in unit tests, so a pass spans slices.)
const SLICE: usize = if cfg!(test) { 2 } else { 128 };
/// Notices a stage takes up in one pass, at most.
const BATCH: usize = 64;
/// How long a job's stage and its recent events outlive the job's last subscriber. Longer
/// than clients take to reconnect (EventSource's `retry`, a WebSocket client's backoff).
pub const LINGER: Duration = Duration::from_secs(30);
/// Frames a subscriber's channel holds: a few passes, so a burst of events that its
/// connection has not yet written out does not hand it back to catch up.
pub const OUTBOX: usize = 4 * BATCH;

type Backs = Vec<(oneshot::Sender<Detached>, Detached)>;

impl Hub {
    pub fn new(job_capacity: usize, all_capacity: usize, supervisor: Supervisor) -> Arc<Hub> {
        Arc::new(Hub {
            jobs: Mutex::new(HashMap::new()),
            all: broadcast::channel(all_capacity).0,
            published: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            job_capacity,
            supervisor,
            replay: OnceLock::new(),
        })
    }

    /// Lets a stage that lagged read what it missed from `store`, up to `writer`'s visible
    /// watermark, once for all its subscribers.
    pub fn replay_from(&self, store: Store, writer: Writer) {
        let _ = self.replay.set((store, writer));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, JobFan>> {
        // Nothing panics while holding this lock (list updates and sends), so a poisoned map
        // is still consistent.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches one job; the first watcher starts the job's fan-out stage. Call this *before*
    /// reading the store: from then on the stage records what it takes up for the job, so
    /// [`JobWatch::attach`] can tell whether the reads missed anything.
    pub fn watch_job(self: &Arc<Self>, job: &str) -> JobWatch {
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut jobs = self.lock();
        match jobs.get_mut(job) {
            // (Maybe lingering, with no watcher.)
            Some(fan) => fan.watchers += 1,
            None => {
                let (tx, rx) = broadcast::channel(self.job_capacity);
                let job: Arc<str> = Arc::from(job);
                let fan = JobFan {
                    id,
                    tx,
                    watchers: 1,
                    left: Arc::new(Notify::new()),
                    attached: Vec::new(),
                    born: self.published.load(Relaxed),
                    taken: 0,
                    passing: false,
                    lost_upto: 0,
                    stage_last: None,
                    recent: VecDeque::new(),
                };
                let left = Arc::clone(&fan.left);
                jobs.insert(Arc::clone(&job), fan);
                let stage = Arc::clone(self).stage(job, id, rx, left);
                self.supervisor.spawn_stream("fanout", stage);
            }
        }
        JobWatch {
            id,
            job: Arc::from(job),
            hub: Arc::clone(self),
        }
    }

    /// Subscribes to every offset.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Notice> {
        self.all.subscribe()
    }

    /// Hands durable notices, in offset order, to their subscribers. Never blocks: a channel
    /// overwrites its oldest slot, and whoever was too slow catches up from the store.
    pub fn publish(&self, notices: &[Notice]) {
        // In offset order: the last is the highest.
        if let Some(last) = notices.last() {
            self.published.fetch_max(last.offset(), Relaxed);
        }
        for n in notices {
            // No receiver is not an error: nobody is watching.
            let _ = self.all.send(n.clone());
        }
        let jobs = self.lock();
        if jobs.is_empty() {
            return;
        }
        for n in notices {
            if let Some(fan) = jobs.get(n.job()) {
                let _ = fan.tx.send(n.clone());
            }
        }
    }

    /// Number of jobs with at least one live subscriber.
    pub fn watched_jobs(&self) -> usize {
        self.lock().values().filter(|f| f.watchers > 0).count()
    }

    /// Removes the job's entry if it is still `id`'s and nobody watches it. True if so (or
    /// if it is gone already): the stage ends.
    fn retire(&self, job: &str, id: u64) -> bool {
        let mut jobs = self.lock();
        match jobs.get(job) {
            Some(fan) if fan.id == id && fan.watchers == 0 => {
                jobs.remove(job);
                true
            }
            Some(fan) => fan.id != id,
            None => true,
        }
    }

    /// A job's fan-out stage: takes up the job's queued notices and delivers them to the
    /// attached subscriptions, one `try_send` of a shared frame each, `SLICE` subscriptions
    /// at a time. Whatever is queued goes out in one pass, so a burst wakes each connection
    /// once. A subscription whose channel is full is handed back to catch up from the store,
    /// so a slow client never holds up the others. Ends [`LINGER`] after its last watcher
    /// left (meanwhile it keeps taking up the job's events, for those who come back), or at
    /// shutdown once nobody watches.
    async fn stage(
        self: Arc<Self>,
        job: Arc<str>,
        id: u64,
        mut rx: broadcast::Receiver<Notice>,
        left: Arc<Notify>,
    ) -> Result<(), Infallible> {
        use broadcast::error::{RecvError, TryRecvError};
        let stop = self.supervisor.token().clone();
        let mut batch = Vec::with_capacity(BATCH);
        let mut backs = Vec::new();
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        let mut lingering = false;
        loop {
            // Shutting down: no lingering.
            if stop.is_cancelled() && self.retire(&job, id) {
                return Ok(());
            }
            let next = tokio::select! {
                r = rx.recv() => r,
                () = left.notified() => {
                    linger.as_mut().reset(Instant::now() + LINGER);
                    lingering = true;
                    continue;
                }
                () = &mut linger, if lingering => {
                    lingering = false;
                    if self.retire(&job, id) {
                        return Ok(());
                    }
                    continue;
                }
                () = stop.cancelled(), if !stop.is_cancelled() => continue,
            };
            match next {
                Ok(n) => batch.push(n),
                Err(RecvError::Lagged(_)) => {
                    self.refill(&job, id, &mut backs).await;
                    continue;
                }
                Err(RecvError::Closed) => return Ok(()),
            }
            let mut lagged = false;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(n) => batch.push(n),
                    Err(TryRecvError::Lagged(_)) => {
                        lagged = true;
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            self.deliver(&job, id, &batch, &mut backs).await;
            batch.clear();
            if lagged {
                self.refill(&job, id, &mut backs).await;
            }
        }
    }

    /// The stage missed notices: it reads the job's events after the last one it took from
    /// the store, renders them once and delivers them like any notice, so its subscribers
    /// stay attached (rather than each reading and rendering the same events). When it
    /// cannot (the job was removed or re-created, retention dropped them, the store
    /// refused), they are handed back to catch up by themselves.
    async fn refill(&self, job: &str, id: u64, backs: &mut Backs) {
        // Nobody attached (it lingers, or every subscription is catching up by itself): not
        // worth reading the store for; forgetting what it had is enough.
        let from = self
            .lock()
            .get(job)
            .filter(|f| f.id == id && !f.attached.is_empty())
            .and_then(|f| f.stage_last);
        let (Some((store, writer)), Some((num, mut seq))) = (self.replay.get(), from) else {
            return self.lost(job, id, backs);
        };
        loop {
            let visible = writer.visible();
            let events = match store.job(job) {
                Ok(Some(rec)) if rec.num == num => store.events_after(num, seq, self.job_capacity),
                Ok(_) | Err(_) => return self.lost(job, id, backs),
            };
            let Ok(events) = events else {
                return self.lost(job, id, backs);
            };
            if events.first().is_some_and(|e| e.seq != seq + 1) {
                return self.lost(job, id, backs);
            }
            let full = events.len() == self.job_capacity;
            let batch: Vec<Notice> = events
                .iter()
                .take_while(|e| e.offset <= visible)
                .map(|e| Notice::Event(Arc::new(EventMsg::new(e, num))))
                .collect();
            let Some(Notice::Event(last)) = batch.last() else {
                return;
            };
            let read = batch.len() as u64;
            self.supervisor
                .metrics()
                .replayed_from_store
                .fetch_add(read, Relaxed);
            seq = last.seq;
            let more = full && batch.len() == events.len();
            self.deliver(job, id, &batch, backs).await;
            if !more {
                return;
            }
        }
    }

    /// The stage missed notices and cannot replay them: everyone attached catches up, and
    /// nobody attaches again without having read the store at least up to what was
    /// published.
    fn lost(&self, job: &str, id: u64, backs: &mut Backs) {
        let upto = self.published.load(Relaxed);
        let mut jobs = self.lock();
        if let Some(fan) = jobs.get_mut(job).filter(|f| f.id == id) {
            fan.lost_upto = upto;
            // No longer an unbroken run of the job's events.
            fan.recent.clear();
            for a in fan.attached.drain(..) {
                let why = Detached::Behind {
                    pos: a.pos,
                    full: false,
                };
                backs.push((a.back, why));
            }
        }
        drop(jobs);
        hand_back(backs);
    }

    /// One pass of `batch` (in offset order) over the attached subscriptions.
    async fn deliver(&self, job: &str, id: u64, batch: &[Notice], backs: &mut Backs) {
        let Some(last) = batch.last() else {
            return;
        };
        let mut i = 0;
        loop {
            let more = {
                let mut jobs = self.lock();
                let Some(fan) = jobs.get_mut(job).filter(|f| f.id == id) else {
                    return;
                };
                if i == 0 {
                    fan.taken = last.offset();
                    fan.remember(batch, self.job_capacity);
                }
                let end = i + SLICE;
                // A handed-back one is swapped out, so `i` only moves past kept ones.
                'subs: while i < end.min(fan.attached.len()) {
                    for notice in batch {
                        match step(&mut fan.attached[i], notice) {
                            Step::Keep => {}
                            Step::Detach(why) => {
                                let a = fan.attached.swap_remove(i);
                                backs.push((a.back, why));
                                continue 'subs;
                            }
                            Step::Drop => {
                                drop(fan.attached.swap_remove(i));
                                continue 'subs;
                            }
                        }
                    }
                    i += 1;
                }
                fan.passing = i < fan.attached.len();
                fan.passing
            };
            hand_back(backs);
            if !more {
                return;
            }
            Requeue::default().await;
        }
    }
}

/// Tells each handed-back subscription why (outside the lock). One that is gone is no
/// longer waiting to hear it.
fn hand_back(backs: &mut Backs) {
    for (back, why) in backs.drain(..) {
        let _ = back.send(why);
    }
}

/// Goes to the back of the worker's run queue at once. (`tokio::task::yield_now` waits for
/// the worker's next driver poll, which under load leaves a fan-out half done for long.)
#[derive(Default)]
struct Requeue(bool);

impl Future for Requeue {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl JobFan {
    /// How far a subscription must have read the store to attach: past what was published
    /// before the stage existed, what it took up, and what it may have missed.
    fn must_have_seen(&self) -> u64 {
        self.born.max(self.taken).max(self.lost_upto)
    }

    /// Keeps `batch`'s events in `recent`, the latest `capacity` of them.
    fn remember(&mut self, batch: &[Notice], capacity: usize) {
        for notice in batch {
            match notice {
                Notice::Event(e) => {
                    self.stage_last = Some((e.num, e.seq));
                    // Already here (offered by a subscription, or taken again after a
                    // refill).
                    if self
                        .recent
                        .back()
                        .is_some_and(|b| b.num == e.num && e.seq <= b.seq)
                    {
                        continue;
                    }
                    let follows = self
                        .recent
                        .back()
                        .is_none_or(|b| b.num == e.num && b.seq + 1 == e.seq);
                    if !follows {
                        self.recent.clear();
                    }
                    if self.recent.len() == capacity {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(Arc::clone(e));
                }
                Notice::Removed { .. } => {
                    self.stage_last = None;
                    self.recent.clear();
                }
            }
        }
    }
}

/// The answer to [`JobWatch::recent_after`].
pub struct Recent {
    /// The next events after the position, in order.
    pub events: Vec<Arc<EventMsg>>,
    /// Once they are delivered, everything of the job up to this offset is (and all the
    /// stage took up): the `seen` to attach with.
    pub upto: u64,
    /// More follow in `recent` than were asked for.
    pub more: bool,
}

enum Step {
    Keep,
    Detach(Detached),
    /// The subscriber left (its channel is closed, or its subscription dropped).
    Drop,
}

/// What one notice does to one attached subscription.
fn step(a: &mut Attached, notice: &Notice) -> Step {
    let Some(out) = &a.out else {
        return Step::Drop;
    };
    let pos = a.pos;
    match notice {
        Notice::Event(e) => {
            if pos.num == Some(e.num) && e.seq <= pos.last {
                return Step::Keep;
            }
            if pos.num.is_some_and(|n| n != e.num) || e.seq != pos.last + 1 {
                return Step::Detach(Detached::Behind { pos, full: false });
            }
            match out.try_send(Frame::Event(Arc::clone(e))) {
                Ok(()) => {
                    a.pos = Position {
                        num: Some(e.num),
                        last: e.seq,
                    };
                    match e.terminal {
                        Some(status) => Step::Detach(Detached::Ended { status }),
                        None => Step::Keep,
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Step::Detach(Detached::Behind { pos, full: true })
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Step::Drop,
            }
        }
        // The removal of an earlier incarnation than the one followed is old news.
        Notice::Removed { num, .. } if pos.num.is_some_and(|n| n > *num) => Step::Keep,
        Notice::Removed { job, offset, .. } => Step::Detach(Detached::Removed {
            job: Arc::clone(job),
            offset: *offset,
        }),
    }
}

/// A subscription's hold on one job's fan-out entry (which lingers after the last one), and
/// dropping it detaches the subscription (so its channel closes with it).
pub struct JobWatch {
    id: u64,
    job: Arc<str>,
    hub: Arc<Hub>,
}

impl JobWatch {
    /// Hands delivery to the stage from `pos` on. `seen` is the visible watermark up to
    /// which the subscription has read the store (everything of the job at or below it is
    /// delivered).
    pub fn attach(&self, out: &mpsc::Sender<Frame>, pos: Position, seen: u64) -> Attach {
        let mut jobs = self.hub.lock();
        let Some(fan) = jobs.get_mut(&*self.job) else {
            return Attach::Behind;
        };
        if fan.must_have_seen() > seen {
            return Attach::Behind;
        }
        let (back, rx) = oneshot::channel();
        fan.attached.push(Attached {
            id: self.id,
            out: Some(out.clone()),
            pos,
            back,
        });
        Attach::Attached(rx)
    }
}

impl JobWatch {
    /// Up to `max` events after `pos` from the job's recent events, if they reach back to
    /// it; None when the store must be read.
    pub fn recent_after(&self, pos: Position, max: usize) -> Option<Recent> {
        let jobs = self.hub.lock();
        let fan = jobs.get(&*self.job)?;
        let front = fan.recent.front()?;
        // (A subscription that has not seen the job yet learns its incarnation from the
        // store: the recent events may be an earlier one's.)
        if pos.num != Some(front.num) || front.seq > pos.last + 1 {
            return None;
        }
        // Delivering up to the last of them must leave nothing the stage already took up
        // undelivered: they must reach its last event (or it has taken up none).
        let back = fan.recent.back()?;
        let upto = match fan.stage_last {
            Some((num, seq)) if back.num == num && back.seq >= seq => fan.taken.max(back.offset),
            None if fan.taken == 0 => back.offset,
            Some(_) | None => return None,
        };
        if upto < fan.must_have_seen() {
            return None;
        }
        let skip = (pos.last + 1 - front.seq) as usize;
        let events: Vec<_> = fan.recent.iter().skip(skip).take(max).cloned().collect();
        Some(Recent {
            more: fan.recent.len() > skip + events.len(),
            events,
            upto,
        })
    }
}

impl JobWatch {
    /// Events a subscription read from the store and rendered, offered to the others of the
    /// job: kept in its recent events when they are empty or these come right before them,
    /// so a crowd catching up from the same point reads and renders them once.
    pub fn offer(&self, events: &[Arc<EventMsg>]) {
        let Some(last) = events.last() else {
            return;
        };
        let cap = self.hub.job_capacity;
        let mut jobs = self.hub.lock();
        let Some(fan) = jobs.get_mut(&*self.job) else {
            return;
        };
        let fits = fan.recent.len() + events.len() <= cap;
        match fan.recent.front() {
            None => fan.recent.extend(events.iter().take(cap).cloned()),
            Some(front) if fits && front.num == last.num && front.seq == last.seq + 1 => {
                for e in events.iter().rev() {
                    fan.recent.push_front(Arc::clone(e));
                }
            }
            Some(_) => {}
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut jobs = self.hub.lock();
        let Some(fan) = jobs.get_mut(&*self.job) else {
            return;
        };
        if let Some(at) = fan.attached.iter().position(|a| a.id == self.id) {
            if fan.passing {
                // The stage is halfway through a pass over the list: it removes the slot.
                fan.attached[at].out = None;
            } else {
                drop(fan.attached.swap_remove(at));
            }
        }
        fan.watchers -= 1;
        if fan.watchers == 0 {
            // The stage lingers, then removes the entry.
            fan.left.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    fn hub(job_capacity: usize) -> Arc<Hub> {
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::new(Metrics::default()));
        Hub::new(job_capacity, 16, supervisor)
    }

    fn event(job: &str, seq: u64) -> Notice {
        Notice::Event(Arc::new(EventMsg {
            job: job.into(),
            num: 1,
            seq,
            offset: seq,
            terminal: None,
            json: String::new(),
            sse_by_seq: OnceLock::new(),
            sse_by_offset: OnceLock::new(),
            ws_text: OnceLock::new(),
        }))
    }

    const START: Position = Position {
        num: Some(1),
        last: 0,
    };

    /// Yields until the stages have done what `done` waits for.
    async fn until(hub: &Hub, done: impl Fn(&HashMap<Arc<str>, JobFan>) -> bool) {
        while !done(&hub.lock()) {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_lingers_after_its_last_watcher_then_goes() {
        let hub = hub(4);
        let a = hub.watch_job("a");
        let b = hub.watch_job("a");
        assert_eq!(hub.watched_jobs(), 1);
        drop(b);
        assert_eq!(hub.watched_jobs(), 1);
        drop(a);
        assert_eq!(hub.watched_jobs(), 0);
        // Still taking up the job's events, for whoever comes back.
        hub.publish(&[event("a", 1), event("a", 2)]);
        until(&hub, |jobs| jobs.get("a").is_some_and(|f| f.taken == 2)).await;
        tokio::time::sleep(LINGER / 2).await;
        let back = hub.watch_job("a");
        let recent = back.recent_after(START, 10).expect("kept while lingering");
        assert_eq!(
            recent.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(recent.upto, 2);
        drop(back);
        // Its own linger counts from the last watcher leaving, not the first.
        tokio::time::sleep(LINGER / 2 + Duration::from_secs(1)).await;
        assert!(hub.lock().contains_key("a"));
        tokio::time::sleep(LINGER / 2).await;
        until(&hub, |jobs| !jobs.contains_key("a")).await;
    }

    #[tokio::test]
    async fn a_lingering_stage_ends_at_shutdown() {
        let hub = hub(4);
        drop(hub.watch_job("a"));
        hub.supervisor.token().cancel();
        until(&hub, |jobs| !jobs.contains_key("a")).await;
        assert!(hub.supervisor.shutdown(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn the_stage_delivers_in_order_and_hands_back_a_full_channel() {
        let hub = hub(16);
        let watch = hub.watch_job("a");
        let (tx, mut rx) = mpsc::channel(2);
        let Attach::Attached(back) = watch.attach(&tx, START, 0) else {
            panic!("nothing was taken up yet");
        };
        hub.publish(&[event("b", 1), event("a", 1), event("a", 2), event("a", 3)]);
        let Ok(Detached::Behind { pos, full: true }) = back.await else {
            panic!("a full channel is handed back");
        };
        assert_eq!(pos.last, 2);
        for seq in [1, 2] {
            let Some(Frame::Event(e)) = rx.recv().await else {
                panic!("an event");
            };
            assert_eq!(e.seq, seq);
        }
        // The stage took up seq 3: attaching at 2 with the store read only up to offset 2
        // would miss it.
        assert!(matches!(watch.attach(&tx, pos, 2), Attach::Behind));
        assert!(matches!(
            watch.attach(&tx, Position { last: 3, ..pos }, 3),
            Attach::Attached(_)
        ));
    }

    #[tokio::test]
    async fn a_gap_or_a_lag_hands_the_subscription_back() {
        let hub = hub(2);
        let watch = hub.watch_job("a");
        let (tx, _rx) = mpsc::channel(8);
        let Attach::Attached(back) = watch.attach(&tx, START, 0) else {
            panic!("nothing was taken up yet");
        };
        hub.publish(&[event("a", 2)]);
        assert!(matches!(
            back.await,
            Ok(Detached::Behind {
                pos: START,
                full: false
            })
        ));
        // Four notices through a 2-slot channel before the stage runs: it lags, and nobody
        // attaches without having read up to what was published.
        let Attach::Attached(back) = watch.attach(&tx, START, 2) else {
            panic!("the store was read past what the stage took up");
        };
        hub.publish(&[event("a", 3), event("a", 4), event("a", 5), event("a", 6)]);
        assert!(matches!(back.await, Ok(Detached::Behind { .. })));
        assert!(matches!(watch.attach(&tx, START, 5), Attach::Behind));
        assert!(matches!(watch.attach(&tx, START, 6), Attach::Attached(_)));
    }

    #[tokio::test]
    async fn a_subscription_dropped_mid_pass_does_not_hide_another_from_it() {
        let hub = hub(16);
        let subs: Vec<_> = (0..5)
            .map(|_| {
                let watch = hub.watch_job("a");
                let (tx, rx) = mpsc::channel(8);
                let Attach::Attached(back) = watch.attach(&tx, START, 0) else {
                    panic!("nothing was taken up yet");
                };
                (watch, rx, back)
            })
            .collect();
        // A task of its own, not the test's main future, which the runtime polls only
        // between batches of tasks: this one runs right after the stage's first slice.
        let hub = Arc::clone(&hub);
        let check = tokio::spawn(async move {
            let mut subs = subs.into_iter();
            let (_w0, mut rx0, _b0) = subs.next().unwrap();
            let (w1, _rx1, _b1) = subs.next().unwrap();
            hub.publish(&[event("a", 1)]);
            // The stage has done its first slice (two subscriptions) and gone to the back of the
            // queue: drop one it already served, then every later one must still get the event.
            assert!(matches!(rx0.recv().await, Some(Frame::Event(_))));
            drop(w1);
            for (_w, mut rx, _b) in subs {
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
                assert!(matches!(got, Ok(Some(Frame::Event(e))) if e.seq == 1));
            }
        });
        check.await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_subscription_leaves_no_slot_between_passes() {
        let hub = hub(16);
        let (tx, _rx) = mpsc::channel(8);
        let stays = hub.watch_job("a");
        let leaves = hub.watch_job("a");
        for w in [&stays, &leaves] {
            assert!(matches!(w.attach(&tx, START, 0), Attach::Attached(_)));
        }
        drop(leaves);
        assert_eq!(hub.lock()["a"].attached.len(), 1);
    }
}
