//! The accept loop: ours rather than `warp::serve`, so that every connection is counted,
//! limited, given a header deadline and run as a supervised task.
//!
//! warp's own server spawns each connection with a bare `tokio::spawn` and has no limits;
//! here a connection over `--max-connections` gets a `503` with `Retry-After` and is closed,
//! a client that does not finish its request headers within `--header-timeout` is dropped
//! (slowloris), and shutdown stops accepting, lets in-flight requests finish and waits for
//! connections through hyper's graceful shutdown (bounded by the caller).
//!
//! An event stream's connection leaves hyper once the response head is ready: the task drops
//! hyper's connection and writes the stream itself (`handoff.rs`). It stays counted and
//! tracked until the stream ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::handoff::{self, HandoffService, Shared, SharedIo};
use crate::listen::Listener;
use crate::metrics::{Limit, Metrics};
use crate::supervisor::Supervisor;

/// What every connection shares.
#[derive(Clone)]
pub struct Server {
    routes: BoxedFilter<(Response,)>,
    supervisor: Supervisor,
    metrics: Arc<Metrics>,
    open: Arc<OpenConnections>,
    max_connections: usize,
    header_timeout: Duration,
}

/// Open connections, all listeners together, and a wake-up for when the last one closes.
#[derive(Default)]
struct OpenConnections {
    count: AtomicUsize,
    none: Notify,
}

/// Counts a connection while it lives.
struct Open(Arc<OpenConnections>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

/// The whole answer to a connection over `--max-connections` (the systemd probe knows it).
pub const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 73\r\n\r\n\
{\"error\":\"unavailable\",\"message\":\"too many connections, try again later\"}";

impl Server {
    pub fn new(
        routes: BoxedFilter<(Response,)>,
        supervisor: Supervisor,
        max_connections: usize,
        header_timeout: Duration,
    ) -> Server {
        Server {
            metrics: Arc::clone(supervisor.metrics()),
            routes,
            supervisor,
            open: Arc::default(),
            max_connections,
            header_timeout,
        }
    }

    /// Open connections, all listeners together.
    pub fn open_connections(&self) -> usize {
        self.open.count.load(Ordering::Acquire)
    }

    /// Accepts on `listener` until `stop`; then every connection finishes the request it is
    /// serving and closes, and this returns once none is left (the caller bounds the wait).
    pub async fn run(self, listener: Listener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                a = accept(&listener) => a,
                () = stop.cancelled() => break,
            };
            match accepted {
                Ok(Conn::Tcp(s)) => {
                    // Progress events go out as soon as they are written.
                    let _ = s.set_nodelay(true);
                    self.serve(s, &stop);
                }
                Ok(Conn::Unix(s)) => self.serve(s, &stop),
                Err(e) if is_transient(&e) => debug!(error = %e, "accept"),
                Err(e) => {
                    // Out of descriptors, typically: wait for some to close rather than spin.
                    warn!(error = %e, "accept failed; pausing");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = stop.cancelled() => break,
                    }
                }
            }
        }
        drop(listener);
        loop {
            let none_left = self.open.none.notified();
            if self.open_connections() == 0 {
                return;
            }
            none_left.await;
        }
    }

    fn serve<IO>(&self, io: IO, stop: &CancellationToken)
    where
        IO: Socket,
    {
        if self.open.count.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            drop(Open(Arc::clone(&self.open)));
            self.metrics.limit_hit(Limit::Connections);
            self.supervisor.spawn("connection-refused", refuse(io));
            return;
        }
        // Held by the task and by hyper's socket: a WebSocket session keeps the socket after
        // hyper's connection (and this task) end, and stays counted.
        let open = Arc::new(Open(Arc::clone(&self.open)));
        let shared = Shared::new(io);
        let service = HandoffService::new(
            TowerToHyperService::new(warp::service(self.routes.clone())),
            Arc::clone(&shared),
        );
        // Boxed before the task captures it, so the task holds a pointer: an async block
        // keeps what it captured beside what it awaits, which would hold the connection twice.
        // Dropped (with hyper's buffers) when an event stream is handed off.
        let conn = Box::pin(
            http1::Builder::new()
                .timer(TokioTimer::new())
                // What a connection may hold unsent (a client that stops reading) or unparsed:
                // hyper's default is 400 KiB; a stream's frames are tiny and its backlog is in
                // the store, not here.
                .max_buf_size(MAX_BUF)
                .header_read_timeout(self.header_timeout)
                .serve_connection(
                    TokioIo::new(SharedIo::new(Arc::clone(&shared), open.clone())),
                    service,
                )
                .with_upgrades(),
        );
        let (metrics, stop) = (Arc::clone(&self.metrics), stop.clone());
        let supervisor = self.supervisor.clone();
        self.supervisor.spawn("connection", async move {
            // Its place in the count: held to the end of the task, or of its handed-off stream.
            let open = open;
            let mut conn = conn;
            let served = tokio::select! {
                s = until_handoff(&mut conn, &shared) => s,
                () = stop.cancelled() => {
                    // Finish the request in flight, take no other, close.
                    conn.as_mut().graceful_shutdown();
                    until_handoff(&mut conn, &shared).await
                }
            };
            match served {
                Served::Done(Ok(())) => {}
                Served::Done(Err(e)) => {
                    if e.is_timeout() {
                        metrics.limit_hit(Limit::HeaderTimeout);
                    }
                    // A client going away is not a failure of ours.
                    debug!(error = %e, "connection ended with an error");
                }
                Served::HandedOff(res) => {
                    // hyper's side goes first: its buffers, and its hold on the socket.
                    drop(conn);
                    let Some(io) = shared.take_io() else {
                        return Ok(());
                    };
                    drop(shared);
                    // The stream goes on the stream runtime, still counted as open, and its
                    // socket to that runtime's reactor: otherwise every write's completion
                    // would wake this runtime's idle workers to note a readiness nobody
                    // waits for.
                    let std = io.into_std()?;
                    supervisor.spawn_stream("stream", async move {
                        let _open = open;
                        handoff::serve(IO::from_std(std)?, res).await;
                        Ok::<(), std::io::Error>(())
                    });
                }
            }
            Ok::<(), std::io::Error>(())
        });
    }
}

/// An accepted connection: a socket that can move to the reactor of another runtime.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static + Sized {
    type Std: Send + 'static;
    /// Leaves the reactor of the runtime it was registered with.
    fn into_std(self) -> std::io::Result<Self::Std>;
    /// Registers with the reactor of the current runtime.
    fn from_std(std: Self::Std) -> std::io::Result<Self>;
}

impl Socket for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(std)
    }
}

impl Socket for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(std)
    }
}

/// How hyper's part of a connection ended.
enum Served {
    Done(hyper::Result<()>),
    /// An event stream's response, to be written by us.
    HandedOff(Response),
}

/// Drives hyper's connection until it ends or hands a response off (the service deposits it
/// while hyper polls it, so it is looked for after each poll).
async fn until_handoff<C, IO>(conn: &mut Pin<Box<C>>, shared: &Shared<IO>) -> Served
where
    C: Future<Output = hyper::Result<()>>,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Served::Done(r));
        }
        match shared.take_offered() {
            Some(res) => Poll::Ready(Served::HandedOff(res)),
            None => Poll::Pending,
        }
    })
    .await
}

/// Bytes a connection buffers each way beyond the kernel's socket buffers.
const MAX_BUF: usize = 64 * 1024;

/// Over capacity: a short answer, then close.
async fn refuse<IO: AsyncWrite + Unpin>(mut io: IO) -> Result<(), std::convert::Infallible> {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(OVER_CAPACITY).await;
        let _ = io.shutdown().await;
    })
    .await;
    Ok(())
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Conn> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
    }
}

/// Errors of one connection that surface at accept; the listener is fine.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_canned_503_declares_its_length() {
        let text = std::str::from_utf8(super::OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "unavailable");
    }
}
