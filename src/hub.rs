//! The hub: in-process fan-out of durable events to live subscribers.
//!
//! One `tokio::sync::broadcast` channel per job that has subscribers (created by the first,
//! dropped with the last) and one channel that carries every offset, for multi-job streams.
//! The writer publishes here only after an event is durable, so nothing a subscriber sees can
//! be taken back by a crash.
//!
//! The hub never blocks a publisher: a broadcast channel overwrites its oldest slot, and the
//! receiver that was too slow gets `Lagged` and catches up from the store (see
//! `subscription.rs`). Memory is bounded by the channel capacities, not by client speed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::model::{Event, Status};

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
    // A std Mutex: the critical sections are a map lookup and a `send`, never an await, and
    // a std lock is cheaper than tokio's when it is never held across one.
    jobs: Mutex<HashMap<Arc<str>, broadcast::Sender<Notice>>>,
    all: broadcast::Sender<Notice>,
    job_capacity: usize,
}

impl Hub {
    pub fn new(job_capacity: usize, all_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            jobs: Mutex::new(HashMap::new()),
            all: broadcast::channel(all_capacity).0,
            job_capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, broadcast::Sender<Notice>>> {
        // Nothing panics while holding this lock (inserts, removes, sends), so a poisoned
        // map is still consistent.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to one job. Call this *before* reading the store, so nothing published in
    /// between is missed.
    pub fn subscribe_job(self: &Arc<Self>, job: &str) -> JobReceiver {
        let mut jobs = self.lock();
        let rx = match jobs.get(job) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.job_capacity);
                jobs.insert(Arc::from(job), tx);
                rx
            }
        };
        JobReceiver {
            rx: Some(rx),
            job: Arc::from(job),
            hub: Arc::clone(self),
        }
    }

    /// Subscribes to every offset.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Notice> {
        self.all.subscribe()
    }

    /// Hands durable notices, in offset order, to their subscribers.
    pub fn publish(&self, notices: &[Notice]) {
        for n in notices {
            // No receiver is not an error: nobody is watching.
            let _ = self.all.send(n.clone());
        }
        let jobs = self.lock();
        if jobs.is_empty() {
            return;
        }
        for n in notices {
            if let Some(tx) = jobs.get(n.job()) {
                let _ = tx.send(n.clone());
            }
        }
    }

    /// Number of jobs with at least one live subscriber.
    pub fn watched_jobs(&self) -> usize {
        self.lock().len()
    }
}

/// A receiver of one job's notices; the job's channel goes away with its last receiver.
pub struct JobReceiver {
    rx: Option<broadcast::Receiver<Notice>>,
    job: Arc<str>,
    hub: Arc<Hub>,
}

impl JobReceiver {
    pub async fn recv(&mut self) -> Result<Notice, broadcast::error::RecvError> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for JobReceiver {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut jobs = self.hub.lock();
        if jobs
            .get(&*self.job)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            jobs.remove(&*self.job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn channels_live_as_long_as_their_subscribers() {
        let hub = Hub::new(4, 4);
        let mut a = hub.subscribe_job("a");
        let b = hub.subscribe_job("a");
        assert_eq!(hub.watched_jobs(), 1);
        hub.publish(&[event("a", 1), event("b", 1)]);
        assert_eq!(a.recv().await.unwrap().offset(), 1);
        drop(b);
        assert_eq!(hub.watched_jobs(), 1);
        drop(a);
        assert_eq!(hub.watched_jobs(), 0);
    }

    #[tokio::test]
    async fn a_slow_receiver_lags_instead_of_blocking() {
        let hub = Hub::new(2, 2);
        let mut a = hub.subscribe_job("a");
        for seq in 1..=5 {
            hub.publish(&[event("a", seq)]);
        }
        assert!(matches!(
            a.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
        assert_eq!(a.recv().await.unwrap().offset(), 4);
    }
}
