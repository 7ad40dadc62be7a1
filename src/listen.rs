//! Where the daemon listens: TCP addresses, Unix domain sockets, and sockets handed over by
//! systemd (socket activation).
//!
//! Binding happens before the store is opened: a connection that arrives while the daemon is
//! still recovering waits in the kernel's accept queue and is served once it is ready, instead
//! of being refused or answered 503. Socket activation extends that across restarts: systemd
//! keeps the socket open while the service restarts.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};

/// A `--listen` value: `host:port` or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path, e.g. unix:/run/progressd/progressd.sock".into()),
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => s.parse().map(ListenAddr::Tcp).map_err(|_| {
                format!("{s:?}: expected host:port (e.g. 127.0.0.1:7700) or unix:/path")
            }),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: ListenAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {addr}: another process is already listening there")]
    InUse { addr: ListenAddr },
    #[error("socket activation: fd {index}: {source}")]
    Activation {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Connections the kernel queues before we accept them (capped by `net.core.somaxconn`):
/// thousands of clients reconnect at once after a restart, and with tokio's default of 1,024
/// the rest have their SYNs dropped and retry only after 1 s, 3 s, 7 s… The socket unit asks
/// for the same.
const BACKLOG: u32 = 4096;

fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std and tokio do: a restarted daemon rebinds while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

impl Listener {
    /// Binds `addr`. A Unix socket gets `mode`; a stale socket file left by a previous run is
    /// replaced, but never one that something still listens on.
    pub async fn bind(addr: &ListenAddr, mode: u32) -> Result<Listener, ListenError> {
        let err = |source| ListenError::Bind {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(sa) => bind_tcp(*sa).map(Listener::Tcp).map_err(err),
            ListenAddr::Unix(path) => {
                remove_stale(path, addr).await?;
                let listener = UnixListener::bind(path).map_err(err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(err)?;
                Ok(Listener::Unix(listener))
            }
        }
    }

    /// The listeners systemd passed, if any. `fds` comes from `ListenFd::from_env()`, called
    /// once before the runtime starts threads: it reads (and, as the protocol asks, clears)
    /// `LISTEN_FDS`/`LISTEN_PID`. This must run inside the runtime.
    pub fn from_systemd(mut fds: listenfd::ListenFd) -> Result<Vec<Listener>, ListenError> {
        let mut out = Vec::with_capacity(fds.len());
        for index in 0..fds.len() {
            let activation = |source| ListenError::Activation { index, source };
            // Passed sockets arrive blocking; tokio needs them non-blocking.
            if let Ok(Some(l)) = fds.take_tcp_listener(index) {
                l.set_nonblocking(true).map_err(activation)?;
                out.push(Listener::Tcp(TcpListener::from_std(l).map_err(activation)?));
            } else if let Some(l) = fds.take_unix_listener(index).map_err(activation)? {
                l.set_nonblocking(true).map_err(activation)?;
                out.push(Listener::Unix(
                    UnixListener::from_std(l).map_err(activation)?,
                ));
            }
        }
        Ok(out)
    }

    /// Where it listens, for logs and self-checks.
    pub fn local_addr(&self) -> Option<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(ListenAddr::Tcp),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| ListenAddr::Unix(p.to_owned()))),
        }
    }
}

async fn remove_stale(path: &Path, addr: &ListenAddr) -> Result<(), ListenError> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(ListenError::InUse { addr: addr.clone() });
    }
    std::fs::remove_file(path).map_err(|source| ListenError::Bind {
        addr: addr.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            "127.0.0.1:7700".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7700)))
        );
        assert_eq!(
            "unix:/run/p.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/p.sock".into())
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert_eq!(ListenAddr::Unix("/a".into()).to_string(), "unix:/a");
    }

    #[tokio::test]
    async fn a_unix_socket_gets_its_mode_and_replaces_a_stale_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let addr = ListenAddr::Unix(path.clone());
        let first = Listener::bind(&addr, 0o600).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Still listening: refused.
        assert!(matches!(
            Listener::bind(&addr, 0o600).await,
            Err(ListenError::InUse { .. })
        ));
        drop(first);
        // Gone, file left behind: replaced.
        assert!(Listener::bind(&addr, 0o660).await.is_ok());
    }
}
