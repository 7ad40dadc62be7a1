//! progressd: durable job progress, fanned out live over Server-Sent Events and WebSocket.
//!
//! # Map
//!
//! A publish travels `http` → `writer` → `store` (durable) → `hub` → `subscription` →
//! `sse` / `ws`:
//!
//! | module           | owns                                                                   |
//! |------------------|------------------------------------------------------------------------|
//! | [`auth`]         | JWT grants (publish/subscribe/admin) and the exposure check at start   |
//! | [`backup`]       | export (JSON lines, from a running daemon) and import (offline)        |
//! | [`config`]       | the command line and the validated [`Config`]                          |
//! | [`model`]        | job ids, updates, events, snapshots: validation and JSON shapes        |
//! | [`store`]        | sled: trees, keys, encoding (a publish's events are one value, a run)  |
//! | [`writer`]       | the single writer: seqs, offsets, group commit, retention by count     |
//! | [`hub`]          | live fan-out: a stage per watched job, its recent events, broadcasts   |
//! | [`subscription`] | replay from the store, then attached to the hub's stage; resets        |
//! | [`listen`]       | TCP and Unix listeners, sockets passed by systemd                      |
//! | [`server`]       | the accept loop: connection limit, header timeout, tracked connections |
//! | [`handoff`]      | event streams taken from hyper after their head, written by our loop   |
//! | [`http`]         | warp routes, REST handlers, the JSON error body                        |
//! | [`sse`]          | Server-Sent Events framing and endpoints                               |
//! | [`ws`]           | WebSocket sessions                                                     |
//! | [`retention`]    | expiry of finished jobs after `--finished-ttl`                         |
//! | [`supervisor`]   | every task: named, tracked, failures counted; the stream runtime       |
//! | [`systemd`]      | sd_notify: readiness, status, watchdog, stopping                       |
//! | [`metrics`]      | counters and gauges for `/metrics`                                     |
//! | [`dashboard`]    | the live dashboard page served at `/` (built in, no external assets)   |
//! | [`cli`]          | the client commands: publish, watch, wait, jobs, exec                  |
//! | [`bench`]        | `progressd bench`: the load generator (publish, fanout, idle, …)       |
//!
//! [`run`] is the daemon: it takes a bound listener and a shutdown token, so the binary and
//! the tests drive the same code.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod handoff;
pub mod http;
pub mod hub;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod retention;
pub mod server;
pub mod sse;
pub mod store;
pub mod subscription;
pub mod supervisor;
pub mod systemd;
pub mod writer;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

use auth::Auth;
use hub::Hub;
pub use listen::{ListenAddr, ListenError, Listener};
use metrics::Metrics;
use server::Server;
use store::{Store, StoreError};
use subscription::Source;
use supervisor::{StreamRuntime, Supervisor};

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Exposed(#[from] auth::ExposureError),
    #[error("cannot start the stream runtime ({threads} threads): {source}")]
    StreamRuntime {
        threads: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store and starts the writer and retention under `supervisor`: the daemon
/// without its HTTP face. `writer_stop` ends the writer once its queue is drained.
pub fn open(
    config: &Config,
    supervisor: &Supervisor,
    writer_stop: CancellationToken,
) -> Result<Source, RunError> {
    let store = open_store(config)?;
    let hub = Hub::new(config.job_channel, config.all_channel, supervisor.clone());
    let writer = writer::start(
        store.clone(),
        Arc::clone(&hub),
        config,
        supervisor,
        writer_stop,
    )?;
    hub.replay_from(store.clone(), writer.clone());
    {
        let (store, writer, every, token) = (
            store.clone(),
            writer.clone(),
            config.gc_interval,
            supervisor.token().clone(),
        );
        supervisor.service("retention", move || {
            retention::run(store.clone(), writer.clone(), every, token.clone())
        });
    }
    Ok(Source {
        store,
        hub,
        writer,
        metrics: Arc::clone(supervisor.metrics()),
    })
}

/// Opens the store; while sled recovers a large store, keeps asking systemd for more time.
fn open_store(config: &Config) -> Result<Store, StoreError> {
    std::thread::scope(|scope| {
        let (done_tx, done) = std::sync::mpsc::channel();
        scope.spawn(move || {
            let _ = done_tx.send(Store::open(
                &config.data_dir,
                config.cache_bytes,
                config.faults.clone(),
            ));
        });
        loop {
            match done.recv_timeout(Duration::from_secs(2)) {
                Ok(result) => return result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    info!(data_dir = %config.data_dir.display(), "still opening the store");
                    systemd::extend_timeout(Duration::from_secs(10));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // The opening thread panicked; `scope` re-raises it on exit.
                    return Err(StoreError::Decode {
                        what: "store",
                        detail: "opening the store panicked".into(),
                    });
                }
            }
        }
    })
}

/// Runs the daemon on `listeners` until `shutdown` is cancelled, then drains within
/// `config.shutdown_timeout` and flushes the store.
pub async fn run(
    listeners: Vec<Listener>,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let bound: Vec<ListenAddr> = listeners.iter().filter_map(Listener::local_addr).collect();
    // Checked on the sockets we really have: systemd may have passed other ones.
    auth::check_exposure(
        &bound,
        &Auth::new(config.jwt_secret.as_deref()),
        config.allow_anonymous,
    )?;
    let addrs: Vec<String> = bound.iter().map(ToString::to_string).collect();
    let metrics = Arc::new(Metrics::default());
    let threads = config.stream_threads;
    // Dropped at the end, once the supervisor's shutdown is over.
    let streams = StreamRuntime::start(threads)
        .map_err(|source| RunError::StreamRuntime { threads, source })?;
    let supervisor = Supervisor::new(shutdown.clone(), Arc::clone(&metrics))
        .with_streams(streams.as_ref().and_then(StreamRuntime::handle));

    // Until `serve` below, connections wait in the kernel's accept queue: nobody is told
    // "unavailable" while we recover.
    // The writer outlives the HTTP server's drain so in-flight publishes are answered.
    let writer_stop = CancellationToken::new();
    let src = open(&config, &supervisor, writer_stop.clone())?;
    let store = src.store.clone();

    let auth = Auth::new(config.jwt_secret.as_deref());
    let config = Arc::new(config);
    let state = http::AppState::new(http::Shared {
        src,
        config: Arc::clone(&config),
        supervisor: supervisor.clone(),
        auth,
    });
    let probe = systemd::Probe {
        src: state.src.clone(),
        addr: listeners.iter().find_map(Listener::local_addr),
    };
    let server = Server::new(
        http::routes(state),
        supervisor.clone(),
        config.max_connections,
        config.header_timeout,
    );
    let server = futures_util::future::join_all(
        listeners
            .into_iter()
            .map(|listener| server.clone().run(listener, shutdown.clone())),
    );
    supervisor.health().set_started(true);
    {
        let (probe, watchdog, sup, token) = (
            probe,
            systemd::watchdog_period(),
            supervisor.clone(),
            shutdown.clone(),
        );
        supervisor.service("systemd", move || {
            systemd::run(probe.clone(), watchdog, sup.clone(), token.clone())
        });
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %addrs.join(","),
        data_dir = %config.data_dir.display(),
        durability = ?config.durability,
        history = config.history,
        finished_ttl = %humantime::format_duration(config.finished_ttl),
        "progressd listening"
    );

    tokio::pin!(server);
    // The server future ends by itself once the token is cancelled and its connections are
    // gone, possibly before we notice the token: never poll it again after that.
    let drained = tokio::select! {
        _ = &mut server => true,
        () = shutdown.cancelled() => false,
    };
    let deadline = Instant::now() + config.shutdown_timeout;
    systemd::stopping();
    supervisor.health().set_started(false);
    info!(grace = ?config.shutdown_timeout, "shutting down: ending streams, draining connections");
    // Streams end on the token; the server then waits for every open connection, with no
    // limit of its own.
    // While connections drain, keep systemd's stop timeout ahead of our own deadline.
    let drain = async {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = &mut server => return true,
                _ = tick.tick() => systemd::extend_timeout(
                    deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
                ),
            }
        }
    };
    if !drained
        && !tokio::time::timeout_at(deadline, drain)
            .await
            .unwrap_or(false)
    {
        warn!("connections still open at the end of the grace period; closing them");
    }
    writer_stop.cancel();
    let remaining = deadline.saturating_duration_since(Instant::now());
    supervisor
        .shutdown(remaining.max(Duration::from_millis(500)))
        .await;
    drop(streams);
    store.flush_now()?;
    info!("stopped");
    Ok(())
}
