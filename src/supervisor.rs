//! The supervisor: the one owner of every task the daemon runs.
//!
//! A `TaskTracker` knows every task so shutdown can wait for them; a `CancellationToken` tells
//! them all to stop. Every task has a name: when it returns an error or panics, the failure is
//! logged with that name and counted in `progressd_task_failures_total{task=...}`. Nothing in
//! the daemon calls `tokio::spawn` directly (warp spawns its connection tasks itself; the
//! WebSocket sessions it spawns are tracked with [`Supervisor::track`]).
//!
//! Long-lived services (the writer, retention) run under [`Supervisor::service`]: restarted
//! with exponential backoff, and reported not-ready while they keep failing.
//!
//! Event streams (the fan-out stages and the streams handed off from hyper) run on a runtime
//! of their own, [`StreamRuntime`], with `--stream-threads` workers: a fan-out to thousands of
//! sockets can only take those threads, so publishes, reads and the writer on the main runtime
//! never wait in a run queue behind it. The same tracker and token cover both.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::runtime::{Handle, Runtime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// Consecutive failures after which a service makes the daemon not-ready.
const FAILURES_BEFORE_UNREADY: u32 = 3;
/// A service that ran this long before failing starts its backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    token: CancellationToken,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Where [`Supervisor::spawn_stream`] runs its tasks; None: on the caller's runtime.
    streams: Option<Handle>,
}

/// The runtime event streams run on (see the module's documentation). Whoever starts the
/// daemon owns it, and drops it after the supervisor's shutdown: its tasks are over by then,
/// and dropping it does not wait for them (so it may be dropped inside another runtime).
pub struct StreamRuntime(Option<Runtime>);

impl StreamRuntime {
    /// A runtime of `threads` workers; None for 0 (streams share the caller's runtime).
    pub fn start(threads: usize) -> std::io::Result<Option<StreamRuntime>> {
        if threads == 0 {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("progressd-streams")
            .enable_all()
            .build()?;
        Ok(Some(StreamRuntime(Some(runtime))))
    }

    pub fn handle(&self) -> Option<Handle> {
        self.0.as_ref().map(|rt| rt.handle().clone())
    }
}

impl Drop for StreamRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Readiness: set once start-up is done, cleared at shutdown or while a service is failing.
#[derive(Default)]
pub struct Health {
    started: AtomicBool,
    failing: Mutex<BTreeSet<&'static str>>,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Acquire)
            && self
                .failing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }

    pub fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::Release);
    }

    fn set_failing(&self, name: &'static str, failing: bool) {
        let mut set = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing {
            set.insert(name);
        } else {
            set.remove(name);
        }
    }
}

impl Supervisor {
    pub fn new(token: CancellationToken, metrics: Arc<Metrics>) -> Supervisor {
        Supervisor {
            tracker: TaskTracker::new(),
            token,
            metrics,
            health: Arc::new(Health::default()),
            streams: None,
        }
    }

    /// Runs [`Supervisor::spawn_stream`]'s tasks on `streams` (None: on the caller's runtime).
    pub fn with_streams(self, streams: Option<Handle>) -> Supervisor {
        Supervisor { streams, ..self }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs `fut` as a named, tracked task. An `Err` or a panic is logged and counted.
    pub fn spawn<F, E>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        self.tracker
            .spawn(watch(name, Arc::clone(&self.metrics), fut));
    }

    /// Like [`Supervisor::spawn`], on the stream runtime: for the work of event streams.
    pub fn spawn_stream<F, E>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let task = watch(name, Arc::clone(&self.metrics), fut);
        match &self.streams {
            Some(streams) => drop(self.tracker.spawn_on(task, streams)),
            None => drop(self.tracker.spawn(task)),
        }
    }

    /// Wraps a future that someone else spawns (warp's WebSocket upgrade) so that it is
    /// tracked, named and its failure counted like any other task.
    pub fn track<F, E>(
        &self,
        name: &'static str,
        fut: F,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        self.tracker
            .track_future(watch(name, Arc::clone(&self.metrics), fut).map(|_| ()))
    }

    /// Runs a long-lived service: `make` builds one run of it; a run that fails is restarted
    /// after a backoff (100 ms doubling to 10 s) until the token is cancelled.
    pub fn service<M, F, E>(&self, name: &'static str, mut make: M)
    where
        M: FnMut() -> F + Send + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let metrics = Arc::clone(&self.metrics);
        let health = Arc::clone(&self.health);
        let token = self.token.clone();
        self.tracker.spawn(async move {
            let mut failures = 0u32;
            loop {
                let run = watch(name, Arc::clone(&metrics), make());
                tokio::pin!(run);
                let ok = tokio::select! {
                    ok = &mut run => ok,
                    () = tokio::time::sleep(HEALTHY_RUN) => {
                        // Up long enough to call it recovered.
                        health.set_failing(name, false);
                        failures = 0;
                        run.await
                    }
                };
                if ok {
                    // A service returns Ok only when it was told to stop.
                    return;
                }
                if token.is_cancelled() {
                    return;
                }
                failures += 1;
                if failures >= FAILURES_BEFORE_UNREADY {
                    health.set_failing(name, true);
                }
                let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(7)))
                    .min(Duration::from_secs(10));
                warn!(task = name, failures, ?backoff, "restarting service");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = token.cancelled() => return,
                }
                info!(task = name, "service restarted");
            }
        });
    }

    /// A service reports that it works again (it made progress after failures), so the
    /// daemon is ready again without waiting for the service to have stayed up a while.
    pub fn recovered(&self, name: &'static str) {
        self.health.set_failing(name, false);
    }

    /// Cancels everything and waits for the tasks, at most `grace`. Returns whether they
    /// all ended in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => true,
            Err(_) => {
                warn!(
                    remaining = self.tracker.len(),
                    ?grace,
                    "tasks still running after the shutdown grace period; exiting anyway"
                );
                false
            }
        }
    }
}

/// Awaits `fut`, logging and counting an error or a panic under `name`. True on success.
///
/// A combinator, not an `async fn`: an `async fn` keeps its argument and the future it
/// awaits side by side, so every wrapper would double the task's allocation (a connection's
/// task was 4x the size of the connection it serves).
fn watch<F, E>(
    name: &'static str,
    metrics: Arc<Metrics>,
    fut: F,
) -> impl Future<Output = bool> + Send + 'static
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    AssertUnwindSafe(fut)
        .catch_unwind()
        .map(move |outcome| match outcome {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                error!(task = name, error = %e, "task failed");
                metrics.task_failed(name);
                false
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                error!(task = name, panic = %msg, "task panicked");
                metrics.task_failed(name);
                false
            }
        })
}

/// Runs a blocking call (a sled flush: the write of the log and its sync) on tokio's blocking
/// threads, and waits for it. Not a background task: its caller awaits it and cannot go on
/// before it is done, so a failure (a panic) comes back to the caller as an error.
pub async fn blocking<T, F>(call: F) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(call).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    // That a failed task is logged by name and counted: `tests/task_logs.rs`, alone in its
    // binary, because log capture races with the other tests here.

    #[test]
    fn watching_a_task_does_not_multiply_its_size() {
        // Every connection and subscription is a task: a wrapper that kept the future twice
        // (an async fn holds its argument beside the future it awaits) made each of them
        // several times the size of what it runs.
        let big = async {
            let buf = [0u8; 4096];
            std::future::ready(()).await;
            std::hint::black_box(&buf);
            Ok::<(), String>(())
        };
        let size = std::mem::size_of_val(&big);
        let watched = watch("big", Arc::new(Metrics::default()), big);
        assert!(
            std::mem::size_of_val(&watched) <= size + 64,
            "{} for a {size}-byte task",
            std::mem::size_of_val(&watched)
        );
    }

    /// Stream work runs on the stream runtime's threads, is tracked (shutdown waits for it)
    /// and has its failures counted like any task; without a stream runtime it runs where
    /// it was spawned from.
    #[tokio::test]
    async fn stream_tasks_run_on_the_stream_runtime_and_are_supervised() {
        let metrics = Arc::new(Metrics::default());
        let streams = StreamRuntime::start(1).unwrap().unwrap();
        let sup = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics))
            .with_streams(streams.handle());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = sup.token().clone();
        sup.spawn_stream("streamer", async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
            token.cancelled().await;
            Err::<(), _>("gave up")
        });
        assert_eq!(rx.await.unwrap().as_deref(), Some("progressd-streams"));
        // Still running: shutdown waits for it, and counts how it ended.
        assert_eq!(metrics.task_failures("streamer"), 0);
        assert!(sup.shutdown(Duration::from_secs(5)).await);
        assert_eq!(metrics.task_failures("streamer"), 1);
        drop(streams);

        let here = std::thread::current().id();
        let sup = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        let (tx, rx) = tokio::sync::oneshot::channel();
        sup.spawn_stream("local", async move {
            let _ = tx.send(std::thread::current().id());
            Ok::<(), String>(())
        });
        // A current-thread test runtime: the task ran on this thread.
        assert_eq!(rx.await.unwrap(), here);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_service_is_restarted_and_makes_the_daemon_unready() {
        let metrics = Arc::new(Metrics::default());
        let sup = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        sup.health().set_started(true);
        let runs = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&runs);
        let token = sup.token().clone();
        sup.service("flaky", move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let token = token.clone();
            async move {
                if n < 3 {
                    Err(format!("failure {n}"))
                } else {
                    token.cancelled().await;
                    Ok(())
                }
            }
        });
        // Backoffs are virtual time: wait until the fourth run is up.
        while runs.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.task_failures("flaky"), 3);
        // Three failures in a row marked it failing; the run that is now up has not cleared
        // it yet (only a clean stop does), so readiness reflects the recent trouble.
        assert!(!sup.health().is_ready());
        assert!(sup.shutdown(Duration::from_secs(5)).await);
    }
}
