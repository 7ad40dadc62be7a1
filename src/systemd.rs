//! systemd integration through `sd_notify`: `READY=1`, `STATUS=`, `WATCHDOG=1`,
//! `STOPPING=1` and `EXTEND_TIMEOUT_USEC=`. Every call is a no-op when `NOTIFY_SOCKET` is not
//! set, so the daemon behaves the same on a laptop.
//!
//! Readiness and the watchdog are earned, not assumed: both come from a [`Probe`] that asks
//! the writer to answer (a wedged store leaves it unanswered) and fetches `/readyz` through
//! our own listener (a stuck accept loop leaves that unanswered). Without an answer there is
//! no ping, and systemd restarts us. A daemon at `--max-connections` answers the probe with
//! its canned `503`: that proves the accept loop runs too, so being full is not mistaken for
//! being stuck. Without `NOTIFY_SOCKET` there is nobody to tell, and the probe does not run
//! (it would take one of the connections `--max-connections` counts).

use std::time::Duration;

use sd_notify::NotifyState;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::listen::ListenAddr;
use crate::subscription::Source;
use crate::supervisor::Supervisor;

#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("sd_notify: {0}")]
    Notify(#[source] std::io::Error),
}

fn notify(states: &[NotifyState]) -> Result<(), SystemdError> {
    sd_notify::notify(states).map_err(SystemdError::Notify)
}

/// `STOPPING=1`, with a status line.
pub fn stopping() {
    if let Err(e) = notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]) {
        warn!(error = %e, "cannot tell systemd we are stopping");
    }
}

/// Asks systemd for `extra` more time to start or stop, because we are making progress.
pub fn extend_timeout(extra: Duration) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    if let Err(e) = notify(&[NotifyState::ExtendTimeoutUsec(usec)]) {
        debug!(error = %e, "cannot extend the systemd timeout");
    }
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Is the daemon working? The writer answers and the HTTP server answers `/readyz` 200.
#[derive(Clone)]
pub struct Probe {
    pub src: Source,
    pub addr: Option<ListenAddr>,
}

impl Probe {
    pub async fn healthy(&self, within: Duration) -> bool {
        let writer = self.src.writer.at_quiet_point(|_| ());
        let check = async {
            if writer.await.is_err() {
                return false;
            }
            match &self.addr {
                Some(addr) => http_ready(addr).await,
                None => true,
            }
        };
        tokio::time::timeout(within, check).await.unwrap_or(false)
    }
}

/// `GET /readyz` over our own listener: proves the accept loop runs and the daemon is ready.
/// The canned answer of a daemon at its connection limit proves the first, and the writer's
/// answer (asked before this) the second.
async fn http_ready(addr: &ListenAddr) -> bool {
    let answer = match addr {
        ListenAddr::Tcp(sa) => {
            // A wildcard address is reached through loopback.
            let mut target = *sa;
            if target.ip().is_unspecified() {
                target.set_ip(match target {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            match tokio::net::TcpStream::connect(target).await {
                Ok(s) => ask_readyz(s).await,
                Err(e) => Err(e),
            }
        }
        ListenAddr::Unix(path) => match tokio::net::UnixStream::connect(path).await {
            Ok(s) => ask_readyz(s).await,
            Err(e) => Err(e),
        },
    };
    answer.is_ok_and(|a| a.starts_with(b"HTTP/1.1 200") || a == crate::server::OVER_CAPACITY)
}

/// The answer to `GET /readyz` (the connection closes after it), up to 1 KiB. What arrived
/// before an error counts: a refused connection is closed with our request unread, which
/// resets it once the answer is sent.
async fn ask_readyz<S>(mut s: S) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    const REQUEST: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: progressd\r\nConnection: close\r\n\r\n";
    s.write_all(REQUEST).await?;
    let mut answer = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while answer.len() < 1024 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if answer.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(answer)
}

/// Sends `READY=1` once the probe passes, then keeps `STATUS=` current and, when systemd
/// asked for a watchdog, pings it at half its period while the probe passes.
pub async fn run(
    probe: Probe,
    watchdog: Option<Duration>,
    supervisor: Supervisor,
    token: CancellationToken,
) -> Result<(), SystemdError> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not run by systemd: nothing to tell, so no probe.
        token.cancelled().await;
        return Ok(());
    }
    // Ready: as soon as our own /readyz answers 200 through the listener.
    loop {
        if probe.healthy(Duration::from_secs(5)).await {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = token.cancelled() => return Ok(()),
        }
    }
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status(&probe, &supervisor, 0.0)),
    ])?;

    let every = watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 2).min(Duration::from_secs(5))
    });
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_events = probe
        .src
        .metrics
        .events_published
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut last_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return Ok(()),
        }
        if watchdog.is_some() {
            // The probe may take at most the time left before the next ping is due.
            if probe.healthy(every).await {
                notify(&[NotifyState::Watchdog])?;
            } else {
                warn!("health probe failed: not pinging the systemd watchdog");
            }
        }
        let events = probe
            .src
            .metrics
            .events_published
            .load(std::sync::atomic::Ordering::Relaxed);
        let rate = (events - last_events) as f64 / last_at.elapsed().as_secs_f64().max(0.001);
        (last_events, last_at) = (events, tokio::time::Instant::now());
        notify(&[NotifyState::Status(&status(&probe, &supervisor, rate))])?;
    }
}

/// One line for `systemctl status`.
fn status(probe: &Probe, supervisor: &Supervisor, events_per_sec: f64) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &probe.src.metrics;
    format!(
        "{} jobs, {} subscribers, {:.0} events/s, {} events stored, store {} MiB{}",
        probe.src.store.job_count(),
        m.subscribers_sse.load(Relaxed) + m.subscribers_ws.load(Relaxed),
        events_per_sec,
        probe.src.store.event_count(),
        probe.src.store.size_on_disk() / (1024 * 1024),
        if supervisor.health().is_ready() {
            ""
        } else {
            ", NOT READY"
        }
    )
}
