//! Counters and gauges, rendered as Prometheus text at `GET /metrics`.
//!
//! A dozen atomics do not justify a metrics framework; each is bumped where its event happens
//! and read only here.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Default)]
pub struct Metrics {
    pub events_published: AtomicU64,
    pub publish_requests: AtomicU64,
    pub publish_rejected: AtomicU64,
    pub commits: AtomicU64,
    pub flushes: AtomicU64,
    pub subscribers_sse: AtomicI64,
    pub subscribers_ws: AtomicI64,
    pub lag_catchups: AtomicU64,
    pub resets: AtomicU64,
    /// Events replayed to catching-up subscribers from the jobs' recent events in memory.
    pub replayed_from_memory: AtomicU64,
    /// Events read from the store to replay (by a subscription, or by a stage that lagged).
    pub replayed_from_store: AtomicU64,
    pub jobs_removed: AtomicU64,
    task_failures: Mutex<BTreeMap<&'static str, u64>>,
    limit_hits: [AtomicU64; Limit::ALL.len()],
}

/// The limits that protect the daemon from one client; each hit is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    HeaderTimeout,
    Body,
    Batch,
    ListLimit,
    WsMessage,
    Subscriptions,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::Connections,
        Limit::HeaderTimeout,
        Limit::Body,
        Limit::Batch,
        Limit::ListLimit,
        Limit::WsMessage,
        Limit::Subscriptions,
    ];

    fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::HeaderTimeout => "header_timeout",
            Limit::Body => "body",
            Limit::Batch => "batch",
            Limit::ListLimit => "list_limit",
            Limit::WsMessage => "ws_message",
            Limit::Subscriptions => "subscriptions",
        }
    }
}

/// Which transport a subscriber uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Sse,
    Ws,
}

/// Counts a subscriber for as long as it lives.
pub struct SubscriberGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.transport).fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn limit_hit(&self, limit: Limit) {
        self.limit_hits[limit as usize].fetch_add(1, Relaxed);
    }

    pub fn limit_hits(&self, limit: Limit) -> u64 {
        self.limit_hits[limit as usize].load(Relaxed)
    }

    pub fn task_failed(&self, task: &'static str) {
        *self
            .task_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(task)
            .or_default() += 1;
    }

    pub fn task_failures(&self, task: &str) -> u64 {
        self.task_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task)
            .copied()
            .unwrap_or(0)
    }

    fn gauge(&self, transport: Transport) -> &AtomicI64 {
        match transport {
            Transport::Sse => &self.subscribers_sse,
            Transport::Ws => &self.subscribers_ws,
        }
    }

    pub fn subscriber(self: &Arc<Self>, transport: Transport) -> SubscriberGuard {
        self.gauge(transport).fetch_add(1, Relaxed);
        SubscriberGuard {
            metrics: Arc::clone(self),
            transport,
        }
    }

    /// Prometheus text exposition; `store` carries the gauges read from the store.
    pub fn render(&self, store: &StoreGauges) -> String {
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "progressd_events_published_total",
            "Events stored and acknowledged.",
            self.events_published.load(Relaxed),
        );
        counter(
            "progressd_publish_requests_total",
            "Publish requests acknowledged.",
            self.publish_requests.load(Relaxed),
        );
        counter(
            "progressd_publish_rejected_total",
            "Publish requests refused (bad input, finished job, store unavailable).",
            self.publish_rejected.load(Relaxed),
        );
        counter(
            "progressd_store_commits_total",
            "Group commits applied to the store.",
            self.commits.load(Relaxed),
        );
        counter(
            "progressd_store_flushes_total",
            "Flushes of the store to disk.",
            self.flushes.load(Relaxed),
        );
        counter(
            "progressd_lag_catchups_total",
            "Times a subscriber fell behind the live channel and caught up from the store.",
            self.lag_catchups.load(Relaxed),
        );
        counter(
            "progressd_resets_total",
            "Resets sent to subscribers whose resume point was not retained.",
            self.resets.load(Relaxed),
        );
        counter(
            "progressd_jobs_removed_total",
            "Jobs deleted or expired.",
            self.jobs_removed.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP progressd_replayed_events_total Events replayed to catching-up subscribers, \
             from the jobs' recent events in memory or read from the store.\n\
             # TYPE progressd_replayed_events_total counter\n\
             progressd_replayed_events_total{{from=\"memory\"}} {}\n\
             progressd_replayed_events_total{{from=\"store\"}} {}",
            self.replayed_from_memory.load(Relaxed),
            self.replayed_from_store.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP progressd_subscribers Open subscriptions.\n# TYPE progressd_subscribers gauge\n\
             progressd_subscribers{{transport=\"sse\"}} {}\nprogressd_subscribers{{transport=\"ws\"}} {}",
            self.subscribers_sse.load(Relaxed),
            self.subscribers_ws.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP progressd_limit_hits_total Requests, connections and messages refused by a limit.\n\
             # TYPE progressd_limit_hits_total counter"
        );
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "progressd_limit_hits_total{{limit=\"{}\"}} {}",
                limit.name(),
                self.limit_hits(limit)
            );
        }
        let _ = writeln!(
            out,
            "# HELP progressd_task_failures_total Supervised tasks that returned an error or panicked.\n\
             # TYPE progressd_task_failures_total counter"
        );
        for (task, n) in self
            .task_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "progressd_task_failures_total{{task=\"{task}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP progressd_jobs Jobs in the store.\n# TYPE progressd_jobs gauge\nprogressd_jobs {}\n\
             # HELP progressd_events_stored Events retained in the store.\n# TYPE progressd_events_stored gauge\nprogressd_events_stored {}\n\
             # HELP progressd_watched_jobs Jobs with at least one live subscriber.\n# TYPE progressd_watched_jobs gauge\nprogressd_watched_jobs {}\n\
             # HELP progressd_head_offset Last durable offset.\n# TYPE progressd_head_offset gauge\nprogressd_head_offset {}\n\
             # HELP progressd_store_disk_bytes Size of the store on disk.\n# TYPE progressd_store_disk_bytes gauge\nprogressd_store_disk_bytes {}\n\
             # HELP progressd_ready Whether the daemon is ready (1) or not (0).\n# TYPE progressd_ready gauge\nprogressd_ready {}",
            store.jobs,
            store.events,
            store.watched_jobs,
            store.head_offset,
            store.disk_bytes,
            u8::from(store.ready)
        );
        out
    }
}

/// Gauges read at scrape time.
pub struct StoreGauges {
    pub jobs: u64,
    pub events: u64,
    pub watched_jobs: usize,
    pub head_offset: u64,
    pub disk_bytes: u64,
    pub ready: bool,
}
