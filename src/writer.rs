//! The writer: where a publish is stored, made durable and handed to the hub.
//!
//! One task owns every mutation of the store. Publishers (and deletes, and retention) send it
//! commands through a bounded queue; it drains whatever is queued (first letting the runtime
//! poll connections whose publishes have arrived, so that they join the same drain),
//! allocates seqs and offsets, applies the whole drain in one sled transaction, flushes once
//! (group commit: concurrent publishers share one fsync), raises the visible watermark, hands
//! the events to the hub and only then answers each publisher. Because it is alone, seqs are
//! dense and offsets strictly increasing without any lock, and a crash can only lose a drain
//! that nobody was told about.
//!
//! The watermark (`visible`) is the highest offset that readers may show: in `sync` mode the
//! highest durable offset, in `relaxed` mode the highest committed one. Reads of the store
//! (snapshots, history, replays) never show anything above it, so a client never sees an event
//! that a crash could take back.
//!
//! What it does not do: validation of input (`model.rs`, done before a command is sent) and
//! delivery to subscribers (`hub.rs`, `subscription.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{Config, Durability};
use crate::hub::{EventMsg, Hub, Notice};
use crate::metrics::Metrics;
use crate::model::{now_ms, Change, Event, JobId, JobRecord};
use crate::store::{
    Expiry, Heads, Logged, Mutation, Remembered, RunChange, RunHead, Store, StoreError,
};
use crate::supervisor::Supervisor;

/// Commands taken in one drain, at most.
const MAX_DRAIN: usize = 1024;
/// Events taken in one drain before it is closed (bounds one transaction's size).
const MAX_DRAIN_EVENTS: usize = 16 * 1024;
/// Yields a drain waits for more publishers to join it, at most (see `Core::run`).
const GATHER_YIELDS: usize = 4;
/// Pending commands before publishers wait for room. With `--max-body` this bounds the
/// memory a flood of publishes can hold.
const QUEUE: usize = 1024;

/// The answer to an append: seq and offset of its last event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub offset: u64,
    /// A repeat of an idempotency key: this is the first attempt's answer; nothing was
    /// appended.
    pub replayed: bool,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WriteError {
    #[error("job {0} has finished; nothing can be published to it")]
    JobFinished(String),
    #[error("the store cannot take writes right now")]
    Unavailable,
}

#[derive(Debug, Error)]
pub enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Command {
    Append {
        job: JobId,
        changes: Vec<Change>,
        key: Option<String>,
        reply: oneshot::Sender<Result<Appended, WriteError>>,
    },
    Delete {
        job: JobId,
        reply: oneshot::Sender<Result<bool, WriteError>>,
    },
    Expire {
        due: Vec<(u64, Expiry)>,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Runs between drains, when everything committed is visible and nothing is in flight:
    /// a consistent cut of the store at the given head offset.
    Quiet(Box<dyn FnOnce(u64) + Send>),
}

impl Command {
    fn events(&self) -> usize {
        match self {
            Command::Append { changes, .. } => changes.len(),
            Command::Delete { .. } | Command::Expire { .. } | Command::Quiet(_) => 1,
        }
    }
}

/// The handle everyone else holds: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
    visible: watch::Receiver<u64>,
}

impl Writer {
    /// Appends `changes` (one update or a batch) to `job`, all or nothing. With an
    /// idempotency `key` already used for this job within the window, appends nothing and
    /// answers what the first attempt was answered.
    pub async fn append(
        &self,
        job: JobId,
        changes: Vec<Change>,
        key: Option<String>,
    ) -> Result<Appended, WriteError> {
        self.call(|reply| Command::Append {
            job,
            changes,
            key,
            reply,
        })
        .await?
    }

    /// Deletes a job and its history. False if there was no such job.
    pub async fn delete(&self, job: JobId) -> Result<bool, WriteError> {
        self.call(|reply| Command::Delete { job, reply }).await?
    }

    /// Carries out the expiries retention found due.
    pub async fn expire(&self, due: Vec<(u64, Expiry)>) -> Result<(), WriteError> {
        self.call(|reply| Command::Expire { due, reply }).await?
    }

    /// Runs `read` at a quiet point of the writer, with the head offset: everything at or
    /// below it is visible, nothing above it exists. For reads that must be a consistent cut
    /// across many keys (sled has no snapshots).
    pub async fn at_quiet_point<T: Send + 'static>(
        &self,
        read: impl FnOnce(u64) -> T + Send + 'static,
    ) -> Result<T, WriteError> {
        self.call(|reply| {
            Command::Quiet(Box::new(move |head| {
                let _ = reply.send(read(head));
            }))
        })
        .await
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| WriteError::Unavailable)?;
        // A dropped reply means the drain failed (the store refused it) or we are stopping.
        answer.await.map_err(|_| WriteError::Unavailable)
    }

    /// Highest offset readers may show.
    pub fn visible(&self) -> u64 {
        *self.visible.borrow()
    }

    /// Waits until `offset` is visible (one group commit at most, normally).
    pub async fn wait_visible(&self, offset: u64) -> Result<(), WriteError> {
        let mut rx = self.visible.clone();
        rx.wait_for(|&v| v >= offset)
            .await
            .map(drop)
            .map_err(|_| WriteError::Unavailable)
    }
}

/// Starts the writer (and, in relaxed mode, its flusher) under the supervisor. `stop` ends
/// them once the queue is drained; it is separate from the supervisor's token so that the
/// HTTP server can finish its in-flight publishes first.
pub fn start(
    store: Store,
    hub: Arc<Hub>,
    config: &Config,
    supervisor: &Supervisor,
    stop: CancellationToken,
) -> Result<Writer, StoreError> {
    let heads = store.heads()?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let (visible_tx, visible) = watch::channel(heads.offset);
    let core = Arc::new(Core {
        store,
        hub,
        metrics: Arc::clone(supervisor.metrics()),
        durability: config.durability,
        history: config.history,
        finished_ttl_ms: config.finished_ttl.as_millis() as u64,
        idem_window_ms: config.idempotency_window.as_millis() as u64,
        // Held by one run at a time, across its awaits; a restarted run takes it over with
        // whatever was queued meanwhile.
        rx: Mutex::new(rx),
        visible: visible_tx,
        stop: stop.clone(),
        supervisor: supervisor.clone(),
    });
    let run = Arc::clone(&core);
    supervisor.service("writer", move || Arc::clone(&run).run());
    if config.durability == Durability::Relaxed {
        let interval = config.flush_interval;
        supervisor.service("flusher", move || Arc::clone(&core).flush_every(interval));
    }
    Ok(Writer { tx, visible })
}

struct Core {
    store: Store,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    durability: Durability,
    history: u64,
    finished_ttl_ms: u64,
    idem_window_ms: u64,
    rx: Mutex<mpsc::Receiver<Command>>,
    visible: watch::Sender<u64>,
    stop: CancellationToken,
    supervisor: Supervisor,
}

impl Core {
    async fn run(self: Arc<Self>) -> Result<(), WriterError> {
        let mut rx = self.rx.lock().await;
        // Reload the heads on every (re)start: after a failed commit the store is the truth.
        let mut heads = self.store.heads()?;
        // A previous run may have committed a drain and failed to flush it: make it durable
        // now, then show and publish it, so readers waiting for it are not left hanging.
        self.store.flush().await?;
        let shown = *self.visible.borrow();
        if heads.offset > shown {
            let notices = self.notices_between(shown, heads.offset)?;
            self.visible.send_replace(heads.offset);
            self.hub.publish(&notices);
        }
        debug!(offset = heads.offset, "writer started");
        loop {
            let first = tokio::select! {
                cmd = rx.recv() => cmd,
                () = self.stop.cancelled() => None,
            };
            let Some(first) = first else {
                // Stopping: refuse new commands, carry out the queued ones, flush.
                rx.close();
                let mut rest = Vec::new();
                while let Some(cmd) = rx.recv().await {
                    rest.push(cmd);
                    if rest.len() == MAX_DRAIN {
                        self.process(&mut heads, std::mem::take(&mut rest)).await?;
                    }
                }
                if !rest.is_empty() {
                    self.process(&mut heads, rest).await?;
                }
                self.store.flush().await?;
                info!(offset = heads.offset, "writer stopped; store flushed");
                return Ok(());
            };
            let mut events = first.events();
            let mut drain = Vec::with_capacity(16);
            drain.push(first);
            // Publishers whose requests have arrived but are not parsed yet may join this
            // drain: a yield lets the runtime poll their connections first. Again while that
            // brings more, a few times at most; a lone publisher waits one yield.
            let (mut yields, mut joined) = (0, true);
            while drain.len() < MAX_DRAIN && events < MAX_DRAIN_EVENTS {
                match rx.try_recv() {
                    Ok(cmd) => {
                        events += cmd.events();
                        drain.push(cmd);
                        joined = true;
                    }
                    Err(TryRecvError::Empty) if joined && yields < GATHER_YIELDS => {
                        (yields, joined) = (yields + 1, false);
                        tokio::task::yield_now().await;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.process(&mut heads, drain).await?;
        }
    }

    /// Stages a drain, commits it, flushes (sync), publishes, answers.
    async fn process(&self, heads: &mut Heads, drain: Vec<Command>) -> Result<(), WriterError> {
        let now = now_ms();
        let mut staged = Staged::new(
            &self.store,
            *heads,
            self.history,
            self.finished_ttl_ms,
            self.idem_window_ms,
        );
        let mut appends = Vec::new();
        let mut deletes = Vec::new();
        let mut expiries = Vec::new();
        let mut quiet = Vec::new();
        for cmd in drain {
            match cmd {
                Command::Append {
                    job,
                    changes,
                    key,
                    reply,
                } => match staged.append(&job, changes, key, now)? {
                    Ok((appended, count)) => appends.push((reply, appended, count)),
                    Err(e) => {
                        self.metrics.publish_rejected.fetch_add(1, Relaxed);
                        let _ = reply.send(Err(e));
                    }
                },
                Command::Delete { job, reply } => {
                    let found = staged.delete(job.as_str(), now)?;
                    deletes.push((reply, found));
                }
                Command::Expire { due, reply } => {
                    for (at, what) in due {
                        staged.expire(at, what, now)?;
                    }
                    expiries.push(reply);
                }
                Command::Quiet(read) => quiet.push(read),
            }
        }
        if staged.changed {
            let (mutation, notices, new_heads) = staged.finish();
            self.store.commit(&mutation)?;
            self.metrics.commits.fetch_add(1, Relaxed);
            if self.durability == Durability::Sync {
                self.store.flush().await?;
                self.metrics.flushes.fetch_add(1, Relaxed);
            }
            // Writes work (again): ready, if earlier failures had made us not-ready.
            self.supervisor.recovered("writer");
            *heads = new_heads;
            // Visible before published: a subscriber that sees a notice can always read it.
            self.visible.send_replace(heads.offset);
            self.hub.publish(&notices);
            let removed = notices
                .iter()
                .filter(|n| matches!(n, Notice::Removed { .. }))
                .count();
            self.metrics.jobs_removed.fetch_add(removed as u64, Relaxed);
        }
        for (reply, appended, count) in appends {
            self.metrics.events_published.fetch_add(count, Relaxed);
            self.metrics.publish_requests.fetch_add(1, Relaxed);
            let _ = reply.send(Ok(appended));
        }
        for (reply, found) in deletes {
            let _ = reply.send(Ok(found));
        }
        for reply in expiries {
            let _ = reply.send(Ok(()));
        }
        for read in quiet {
            read(heads.offset);
        }
        Ok(())
    }

    /// The notices of log entries in (`from`, `to`], rebuilt from the store.
    fn notices_between(&self, from: u64, to: u64) -> Result<Vec<Notice>, StoreError> {
        let mut notices = Vec::new();
        let mut last = from;
        while last < to {
            let entries = self.store.log_after(last, 1024, &|_| true)?;
            if entries.is_empty() {
                break;
            }
            for (offset, entry) in entries {
                if offset > to {
                    return Ok(notices);
                }
                last = offset;
                match entry {
                    Logged::Event { num, event } => {
                        notices.push(Notice::Event(Arc::new(EventMsg::new(&event, num))));
                    }
                    Logged::Removed { job, num } => notices.push(Notice::Removed {
                        job: Arc::from(job.as_str()),
                        num,
                        offset,
                    }),
                    Logged::Elsewhere => {}
                }
            }
        }
        Ok(notices)
    }

    /// Relaxed mode: make committed writes durable every `interval`.
    async fn flush_every(self: Arc<Self>, interval: Duration) -> Result<(), WriterError> {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return Ok(()),
            }
            self.store.flush().await?;
            self.metrics.flushes.fetch_add(1, Relaxed);
        }
    }
}

use std::sync::atomic::Ordering::Relaxed;

/// Where a staged run starts and how long it is.
fn run_head(events: &[Event]) -> Option<RunHead> {
    let first = events.first()?;
    Some(RunHead {
        first_seq: first.seq,
        first_offset: first.offset,
        count: events.len() as u64,
    })
}

/// The state of one drain before it is committed: the job records it touched (as of the
/// commands staged so far) and the writes it will make.
struct Staged<'a> {
    store: &'a Store,
    heads: Heads,
    history: u64,
    ttl_ms: u64,
    idem_window_ms: u64,
    idem: BTreeMap<(String, String), Option<Remembered>>,
    jobs: HashMap<String, (Option<JobRecord>, bool)>,
    /// Runs of events by (job num, first seq): staged to be stored, or stored and to drop.
    runs: BTreeMap<(u64, u64), RunChange>,
    /// Tombstones by offset: to write, or (None) to drop.
    removals: BTreeMap<u64, Option<(String, u64)>>,
    expiry: Vec<((u64, Expiry), bool)>,
    notices: Vec<Notice>,
    changed: bool,
}

impl<'a> Staged<'a> {
    fn new(
        store: &'a Store,
        heads: Heads,
        history: u64,
        ttl_ms: u64,
        idem_window_ms: u64,
    ) -> Staged<'a> {
        Staged {
            store,
            heads,
            history,
            ttl_ms,
            idem_window_ms,
            idem: BTreeMap::new(),
            jobs: HashMap::new(),
            runs: BTreeMap::new(),
            removals: BTreeMap::new(),
            expiry: Vec::new(),
            notices: Vec::new(),
            changed: false,
        }
    }

    /// The job as this drain sees it.
    fn job(&mut self, job: &str) -> Result<Option<JobRecord>, StoreError> {
        if let Some((rec, _)) = self.jobs.get(job) {
            return Ok(rec.clone());
        }
        let rec = self.store.job(job)?;
        self.jobs.insert(job.to_owned(), (rec.clone(), false));
        Ok(rec)
    }

    fn put_job(&mut self, job: &str, rec: Option<JobRecord>) {
        self.jobs.insert(job.to_owned(), (rec, true));
        self.changed = true;
    }

    /// The inner result is the client's answer; the outer one a store failure.
    #[allow(clippy::type_complexity)]
    fn append(
        &mut self,
        job: &JobId,
        changes: Vec<Change>,
        key: Option<String>,
        now: u64,
    ) -> Result<Result<(Appended, u64), WriteError>, StoreError> {
        if let Some(key) = &key {
            if let Some(r) = self.remembered(job.as_str(), key, now)? {
                return Ok(Ok((
                    Appended {
                        seq: r.seq,
                        offset: r.offset,
                        replayed: true,
                    },
                    0,
                )));
            }
        }
        let current = self.job(job.as_str())?;
        let finished = current.as_ref().is_some_and(JobRecord::is_finished);
        // A terminal status anywhere but last would put updates after it: refuse the batch.
        let ends_early = changes
            .iter()
            .rev()
            .skip(1)
            .any(|c| c.status.is_some_and(|s| s.is_terminal()));
        if finished || ends_early || changes.is_empty() {
            return Ok(Err(WriteError::JobFinished(job.to_string())));
        }
        let mut rec = match current {
            Some(rec) => rec,
            None => {
                self.heads.num += 1;
                self.heads.jobs += 1;
                JobRecord::new(self.heads.num, now)
            }
        };
        let count = changes.len() as u64;
        let first_seq = rec.seq + 1;
        let mut run = Vec::with_capacity(changes.len());
        for change in changes {
            self.heads.offset += 1;
            let event = Event {
                job: job.as_str().to_owned(),
                seq: rec.seq + 1,
                offset: self.heads.offset,
                at_ms: now,
                change,
            };
            rec.apply(&event);
            self.notices
                .push(Notice::Event(Arc::new(EventMsg::new(&event, rec.num))));
            run.push(event);
        }
        self.heads.events += count;
        self.runs.insert((rec.num, first_seq), RunChange::Put(run));
        if let Some(finished_ms) = rec.finished_ms {
            self.expiry.push((
                (finished_ms + self.ttl_ms, Expiry::Job(job.to_string())),
                true,
            ));
        }
        self.trim(&mut rec)?;
        let appended = Appended {
            seq: rec.seq,
            offset: rec.last_offset,
            replayed: false,
        };
        if let Some(key) = key {
            let answer = Remembered {
                seq: appended.seq,
                offset: appended.offset,
                at_ms: now,
            };
            self.expiry.push((
                (
                    now + self.idem_window_ms,
                    Expiry::Idempotency {
                        job: job.to_string(),
                        key: key.clone(),
                    },
                ),
                true,
            ));
            self.idem.insert((job.to_string(), key), Some(answer));
        }
        self.put_job(job.as_str(), Some(rec));
        Ok(Ok((appended, count)))
    }

    /// The answer remembered for `key` of `job`, if still within the window.
    fn remembered(&self, job: &str, key: &str, now: u64) -> Result<Option<Remembered>, StoreError> {
        let r = match self.idem.get(&(job.to_owned(), key.to_owned())) {
            Some(staged) => *staged,
            None => self.store.remembered(job, key)?,
        };
        Ok(r.filter(|r| r.at_ms + self.idem_window_ms > now))
    }

    /// Drops the oldest events beyond `history`, whether already stored or staged in this
    /// drain (those are still delivered live; they are simply never stored). Whole runs go;
    /// the one the cut goes through is stored again from the cut.
    fn trim(&mut self, rec: &mut JobRecord) -> Result<(), StoreError> {
        let retained = (rec.seq + 1).saturating_sub(rec.first_seq);
        let excess = retained.saturating_sub(self.history);
        if excess == 0 {
            return Ok(());
        }
        let last_dropped = rec.first_seq + excess - 1;
        while let Some(run) = self.oldest_run(rec.num, rec.first_seq)? {
            if run.first_seq > last_dropped {
                break;
            }
            let kept = (run.first_seq + run.count).saturating_sub(last_dropped + 1);
            let dropped = run.count - kept;
            if kept > 0 {
                let mut events = self.take_run(rec.num, run)?;
                events.drain(..dropped as usize);
                self.runs
                    .insert((rec.num, last_dropped + 1), RunChange::Put(events));
            } else {
                self.drop_run(rec.num, run);
            }
            rec.dropped_offset = rec.dropped_offset.max(run.first_offset + dropped - 1);
            self.heads.events = self.heads.events.saturating_sub(dropped);
            rec.first_seq = run.first_seq + dropped;
        }
        rec.first_seq = last_dropped + 1;
        Ok(())
    }

    /// The first run of job incarnation `num` at or after `from_seq`, as this drain sees it.
    fn oldest_run(&self, num: u64, from_seq: u64) -> Result<Option<RunHead>, StoreError> {
        let staged = self
            .runs
            .range((num, from_seq)..=(num, u64::MAX))
            .find_map(|(_, change)| match change {
                RunChange::Put(events) => run_head(events),
                RunChange::Drop { .. } => None,
            });
        // Stored runs this drain has not dropped. The oldest normally starts right at
        // `from_seq` (the job's first retained seq): a point read finds it.
        let dropped = |seq: u64| self.runs.contains_key(&(num, seq));
        if !dropped(from_seq) {
            if let Some(head) = self.store.run_head_at(num, from_seq)? {
                return Ok(Some(match staged {
                    Some(s) if s.first_seq < head.first_seq => s,
                    _ => head,
                }));
            }
        }
        let mut from = from_seq;
        let stored = loop {
            let page = self.store.run_heads(num, from, 16)?;
            let Some(last) = page.last().copied() else {
                break None;
            };
            let live = page.into_iter().find(|h| !dropped(h.first_seq));
            if live.is_some() {
                break live;
            }
            from = last.first_seq + 1;
        };
        Ok(match (staged, stored) {
            (Some(a), Some(b)) => Some(if a.first_seq < b.first_seq { a } else { b }),
            (a, b) => a.or(b),
        })
    }

    /// The events of a run `oldest_run` found, taken out of the drain's view: a staged run
    /// is forgotten, a stored one read and dropped.
    fn take_run(&mut self, num: u64, run: RunHead) -> Result<Vec<Event>, StoreError> {
        if let Some(RunChange::Put(events)) = self.runs.remove(&(num, run.first_seq)) {
            return Ok(events);
        }
        self.drop_run(num, run);
        self.store
            .run(num, run.first_seq)?
            .ok_or_else(|| StoreError::Decode {
                what: "run",
                detail: format!("run {num}/{} has a head but no events", run.first_seq),
            })
    }

    /// Forgets a staged run, or drops a stored one.
    fn drop_run(&mut self, num: u64, run: RunHead) {
        let key = (num, run.first_seq);
        match self.runs.remove(&key) {
            Some(RunChange::Put(_)) => {}
            Some(RunChange::Drop { .. }) | None => {
                self.runs.insert(
                    key,
                    RunChange::Drop {
                        first_offset: run.first_offset,
                    },
                );
            }
        }
    }

    /// Removes a job and its history, leaving a tombstone in the log. False if unknown.
    fn delete(&mut self, job: &str, now: u64) -> Result<bool, StoreError> {
        let Some(rec) = self.job(job)? else {
            return Ok(false);
        };
        // Its runs staged in this drain are forgotten, its stored ones dropped: one read of
        // their heads.
        let staged: Vec<(u64, u64)> = self
            .runs
            .range((rec.num, 0)..=(rec.num, u64::MAX))
            .filter(|(_, change)| matches!(change, RunChange::Put(_)))
            .map(|(key, _)| *key)
            .collect();
        for key in staged {
            self.runs.remove(&key);
        }
        for run in self.store.run_heads(rec.num, 0, usize::MAX)? {
            self.drop_run(rec.num, run);
        }
        let retained = (rec.seq + 1).saturating_sub(rec.first_seq);
        self.heads.events = self.heads.events.saturating_sub(retained);
        self.heads.jobs = self.heads.jobs.saturating_sub(1);
        // Its idempotency keys go with it (their expiries then find nothing).
        let staged_keys: Vec<String> = self
            .idem
            .keys()
            .filter(|(j, _)| j == job)
            .map(|(_, k)| k.clone())
            .collect();
        for key in staged_keys
            .into_iter()
            .chain(self.store.remembered_keys(job)?)
        {
            self.idem.insert((job.to_owned(), key), None);
        }
        if let Some(finished_ms) = rec.finished_ms {
            self.expiry.push((
                (finished_ms + self.ttl_ms, Expiry::Job(job.to_owned())),
                false,
            ));
        }
        self.heads.offset += 1;
        let offset = self.heads.offset;
        self.removals
            .insert(offset, Some((job.to_owned(), rec.num)));
        self.expiry
            .push(((now + self.ttl_ms, Expiry::Tombstone(offset)), true));
        self.notices.push(Notice::Removed {
            job: Arc::from(job),
            num: rec.num,
            offset,
        });
        self.put_job(job, None);
        Ok(true)
    }

    fn expire(&mut self, due: u64, what: Expiry, now: u64) -> Result<(), StoreError> {
        self.expiry.push(((due, what.clone()), false));
        self.changed = true;
        match what {
            Expiry::Job(job) => {
                // The job may have been deleted, or deleted and published again since.
                let expired = self
                    .job(&job)?
                    .and_then(|rec| rec.finished_ms)
                    .is_some_and(|f| f + self.ttl_ms <= now);
                if expired {
                    self.delete(&job, now)?;
                }
            }
            Expiry::Tombstone(offset) => {
                self.removals.insert(offset, None);
                self.heads.log_floor = self.heads.log_floor.max(offset);
            }
            Expiry::Idempotency { job, key } => {
                // Only if the key was not used again since (a later use has its own expiry).
                if self.remembered(&job, &key, now)?.is_none() {
                    self.idem.insert((job, key), None);
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> (Mutation, Vec<Notice>, Heads) {
        let mutation = Mutation {
            jobs: self
                .jobs
                .into_iter()
                .filter(|(_, (_, dirty))| *dirty)
                .map(|(job, (rec, _))| (job, rec))
                .collect(),
            runs: self.runs.into_iter().collect(),
            removals: self.removals.into_iter().collect(),
            expiry: self.expiry,
            idem: self.idem.into_iter().collect(),
            heads: Some(self.heads),
        };
        (mutation, self.notices, self.heads)
    }
}
