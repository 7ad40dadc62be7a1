//! Event streams leave hyper once their response is ready, and are written to the socket by a
//! small loop of our own.
//!
//! hyper keeps, for as long as a connection lives, an 8 KiB read buffer and an 8 KiB buffer
//! for response heads, and has no setting to shrink either on the server. For a request that
//! lasts a second that is nothing; for an SSE stream held open for hours by each of ten
//! thousand browsers it was most of the daemon's memory (15 KiB a stream, against 6 without
//! them). So a streaming response marks itself with [`Handoff`]; when the connection
//! sees that mark it drops hyper's connection (and its buffers), takes the socket back, writes
//! the head and then each frame straight from the stage's shared `Bytes`.
//!
//! What the handed-off connection is, on the wire:
//! - the response's status and headers as the routes made them (CORS included), plus `date`
//!   and `connection: close`;
//! - a body delimited by the end of the connection (RFC 9112 §6.3, rule 8), not chunked: a
//!   frame goes out as it is, in one `write` (or one `writev` with the others ready);
//! - nothing read after the request: what a client sends is read and discarded, so that it
//!   leaving (EOF or reset) is noticed while its stream is quiet;
//! - when the body ends (`end`, `deleted`, a token's expiry, shutdown) the socket is shut down
//!   and closed.
//!
//! Only `GET` requests are handed off; everything else, WebSocket upgrades included, stays
//! with hyper.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use warp::http::{Method, Request};
use warp::reply::Response;

/// The mark a streaming response carries: "serve me outside hyper". A response served some
/// other way (`warp::test`, say) still has an ordinary streaming body.
#[derive(Clone, Copy, Debug)]
pub struct Handoff;

/// What a connection shares with its service: the socket, which hyper uses until a handoff,
/// and the response being handed off.
pub struct Shared<IO> {
    io: Mutex<Option<IO>>,
    /// hyper's last write left bytes in its buffer (a client not reading, typically).
    unsent: AtomicBool,
    handing: Mutex<Handing>,
}

/// Where a marked response is between the service and the connection.
enum Handing {
    None,
    /// Offered by the service, whose future waits to be woken if the connection declines.
    Offered(Response, Waker),
    /// Declined by the connection: the service's future gives it back to hyper.
    Declined(Response),
}

impl<IO> Shared<IO> {
    pub fn new(io: IO) -> Arc<Shared<IO>> {
        Arc::new(Shared {
            io: Mutex::new(Some(io)),
            unsent: AtomicBool::new(false),
            handing: Mutex::new(Handing::None),
        })
    }

    /// The response offered, if the connection can take it now. hyper flushes after each
    /// round of writing, so after a poll of its connection its buffer is empty unless its
    /// last write was short. If it was, the offer is declined and hyper serves the response:
    /// taking the socket would lose what hyper still holds. (hyper 1.x reads a pipelined
    /// request only once the response before it is flushed, so this is a guard for the
    /// corners, such as a request whose body is read after its response was written.)
    pub fn take_offered(&self) -> Option<Response> {
        let mut handing = lock(&self.handing);
        match std::mem::replace(&mut *handing, Handing::None) {
            Handing::Offered(res, waker) if self.unsent.load(Ordering::Relaxed) => {
                *handing = Handing::Declined(res);
                waker.wake();
                None
            }
            Handing::Offered(res, _) => Some(res),
            other @ (Handing::None | Handing::Declined(_)) => {
                *handing = other;
                None
            }
        }
    }

    /// The socket back, once hyper's connection is dropped.
    pub fn take_io(&self) -> Option<IO> {
        lock(&self.io).take()
    }
}

/// A poisoned lock here only means a panic elsewhere while it was held; the value is a
/// socket or a response, still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The socket as hyper sees it, until it is taken back. It keeps `hold` alive for as long as
/// hyper has it, or a WebSocket session upgraded from it: hyper's connection ends at the
/// upgrade, but the connection goes on (the server holds its place in the connection count
/// this way).
pub struct SharedIo<IO> {
    shared: Arc<Shared<IO>>,
    _hold: Arc<dyn Send + Sync>,
}

impl<IO> SharedIo<IO> {
    pub fn new(shared: Arc<Shared<IO>>, hold: Arc<dyn Send + Sync>) -> SharedIo<IO> {
        SharedIo {
            shared,
            _hold: hold,
        }
    }
}

impl<IO: Unpin> SharedIo<IO> {
    fn with<R>(
        &self,
        f: impl FnOnce(Pin<&mut IO>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match lock(&self.shared.io).as_mut() {
            Some(io) => f(Pin::new(io)),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    /// Notes whether a write of `offered` bytes took them all.
    fn wrote(
        &self,
        offered: usize,
        r: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let short = !matches!(r, Poll::Ready(Ok(n)) if n >= offered);
        self.shared.unsent.store(short, Ordering::Relaxed);
        r
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SharedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.with(|io| io.poll_read(cx, buf))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SharedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = self.with(|io| io.poll_write(cx, buf));
        self.wrote(buf.len(), r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = self.with(|io| io.poll_write_vectored(cx, bufs));
        self.wrote(bufs.iter().map(|b| b.len()).sum(), r)
    }

    fn is_write_vectored(&self) -> bool {
        lock(&self.shared.io)
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|io| io.poll_shutdown(cx))
    }
}

/// The routes' service, which hands a marked response to the connection instead of
/// returning it to hyper.
pub struct HandoffService<S, IO> {
    inner: S,
    shared: Arc<Shared<IO>>,
}

impl<S, IO> HandoffService<S, IO> {
    pub fn new(inner: S, shared: Arc<Shared<IO>>) -> HandoffService<S, IO> {
        HandoffService { inner, shared }
    }
}

impl<S, IO> hyper::service::Service<Request<Incoming>> for HandoffService<S, IO>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Offer<S::Future, IO>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let shared = (req.method() == Method::GET).then(|| Arc::clone(&self.shared));
        Offer {
            inner: self.inner.call(req),
            shared,
            offered: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response, unless it is handed off: then it stays pending, and hyper's
    /// connection is dropped by the connection's task, which looks for an offer after each
    /// poll of it. A declined offer comes back here and goes to hyper after all.
    pub struct Offer<F, IO> {
        #[pin]
        inner: F,
        shared: Option<Arc<Shared<IO>>>,
        offered: bool,
    }
}

impl<F, E, IO> Future for Offer<F, IO>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(shared) = this.shared else {
            return this.inner.poll(cx);
        };
        if *this.offered {
            let mut handing = lock(&shared.handing);
            return match std::mem::replace(&mut *handing, Handing::None) {
                Handing::Declined(res) => Poll::Ready(Ok(res)),
                Handing::Offered(res, _) => {
                    *handing = Handing::Offered(res, cx.waker().clone());
                    Poll::Pending
                }
                // Taken by the connection, which then drops hyper's side without polling it
                // again: this future is never asked again.
                Handing::None => Poll::Pending,
            };
        }
        let res = ready!(this.inner.poll(cx))?;
        if res.extensions().get::<Handoff>().is_none() {
            return Poll::Ready(Ok(res));
        }
        *lock(&shared.handing) = Handing::Offered(res, cx.waker().clone());
        *this.offered = true;
        Poll::Pending
    }
}

/// Writes a handed-off response on `io`: its head, then its body as it comes, then closes.
/// Returns when the body ends, the client leaves, or a write fails.
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, res: Response) {
    let (parts, mut body) = res.into_parts();
    let head = Bytes::from(render_head(&parts));
    // Only the body lives on with the stream.
    drop(parts);
    if let Ok(()) = pump(&mut io, head, &mut body).await {
        let _ = io.shutdown().await;
        // Closing a socket with unread bytes in it sends a reset, which can make the client
        // drop the last frames (`end`, the shutdown's `retry:`) before reading them: read
        // what it has sent, without waiting for more.
        let _ = left(&mut io).now_or_never();
    }
}

/// The head of a handed-off response.
fn render_head(parts: &warp::http::response::Parts) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    out
}

/// Frames written in one `writev`, at most: a catch-up of 100 events is two or three calls
/// (at 16 a resume storm of 10,000 streams made 80,000 `writev`s, at 64 30,000).
const BATCH: usize = 64;

/// Writes `first`, then the body's frames until it ends (`Ok`) or the client leaves or a
/// write fails (`Err`). A quiet stream holds only its body and the socket.
async fn pump<IO, B>(io: &mut IO, first: Bytes, body: &mut B) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut next = Some(first);
    let mut ended = false;
    loop {
        if let Some(first) = next.take() {
            // Whatever else is ready goes in the same write: a catch-up is a few syscalls,
            // not one per event. A live event (one frame) is written without a copy.
            let mut more = Vec::new();
            while !ended && more.len() < BATCH - 1 {
                match poll_data(body).now_or_never() {
                    Some(Some(data)) => more.push(data),
                    Some(None) => ended = true,
                    None => break,
                }
            }
            if more.is_empty() {
                io.write_all(&first).await?;
            } else {
                more.insert(0, first);
                write_all_bufs(io, &mut more).await?;
            }
        }
        if ended {
            return Ok(());
        }
        tokio::select! {
            data = poll_data(body) => match data {
                Some(data) => next = Some(data),
                None => return Ok(()),
            },
            () = left(io) => return Err(std::io::ErrorKind::ConnectionAborted.into()),
        }
    }
}

/// The body's next data frame; `None` at its end (or on an error, which ends it too).
async fn poll_data<B>(body: &mut B) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => return Some(data),
                // Trailers: a stream has none, and this framing could not carry them.
                Err(_) => continue,
            },
            Some(Err(_)) | None => return None,
        }
    }
}

/// Resolves when the client has gone: end of its side, or an error. What it sends meanwhile
/// is read and dropped.
async fn left<IO: AsyncRead + Unpin>(io: &mut IO) {
    let mut sink = [0u8; 64];
    while let Ok(1..) = io.read(&mut sink).await {}
}

/// `write_all` for a list of buffers, with `writev`.
async fn write_all_bufs<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    bufs: &mut [Bytes],
) -> std::io::Result<()> {
    let mut from = 0;
    while from < bufs.len() {
        // The slices are made afresh on each poll, so that they are not part of the future
        // every stream holds while it waits (64 of them are 1 KiB).
        let pending = &bufs[from..];
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let n = slices.len().min(pending.len());
            for (slice, buf) in slices.iter_mut().zip(pending) {
                *slice = IoSlice::new(buf);
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let buf = &mut bufs[from];
            let step = written.min(buf.len());
            buf.advance(step);
            written -= step;
            if buf.is_empty() {
                from += 1;
            }
        }
        while bufs.get(from).is_some_and(Bytes::is_empty) {
            from += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use warp::Reply;

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (Arc::clone(&wakes), Waker::from(wakes))
    }

    fn offer(shared: &Arc<Shared<()>>) -> Offer<std::future::Ready<Result<Response, ()>>, ()> {
        let mut res = warp::reply().into_response();
        res.extensions_mut().insert(Handoff);
        Offer {
            inner: std::future::ready(Ok(res)),
            shared: Some(Arc::clone(shared)),
            offered: false,
        }
    }

    #[test]
    fn an_offer_is_taken_when_hyper_has_sent_everything() {
        let shared = Shared::new(());
        let (_, waker) = counting_waker();
        let mut offer = std::pin::pin!(offer(&shared));
        assert!(offer
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert!(shared.take_offered().is_some());
        assert!(shared.take_offered().is_none());
    }

    #[test]
    fn an_offer_goes_back_to_hyper_while_hyper_holds_unsent_bytes() {
        let shared = Shared::new(());
        let (wakes, waker) = counting_waker();
        let mut offer = std::pin::pin!(offer(&shared));
        let mut cx = Context::from_waker(&waker);
        assert!(offer.as_mut().poll(&mut cx).is_pending());
        // hyper's last write was short: an earlier response is still in its buffer.
        shared.unsent.store(true, Ordering::Relaxed);
        assert!(shared.take_offered().is_none());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        let Poll::Ready(Ok(res)) = offer.as_mut().poll(&mut cx) else {
            panic!("a declined offer must be answered by hyper");
        };
        assert!(res.extensions().get::<Handoff>().is_some());
    }

    #[test]
    fn a_request_other_than_get_is_never_offered() {
        let shared = Shared::new(());
        let (_, waker) = counting_waker();
        let mut unmarked = offer(&shared);
        unmarked.shared = None;
        let mut unmarked = std::pin::pin!(unmarked);
        assert!(unmarked
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
        assert!(shared.take_offered().is_none());
    }

    #[tokio::test]
    async fn buffers_are_written_whole_across_short_writes() {
        // A pipe that takes a few bytes at a time.
        let (mut client, server) = tokio::io::duplex(7);
        let mut bufs: Vec<Bytes> = [&b"retry: 3000\n\n"[..], b"id: 1\ndata: {}\n\n", b"", b"x"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let writer = async move {
            let mut server = server;
            write_all_bufs(&mut server, &mut bufs).await.unwrap();
        };
        let mut got = Vec::new();
        let reader = client.read_to_end(&mut got);
        let (_, read) = tokio::join!(writer, reader);
        read.unwrap();
        assert_eq!(got, b"retry: 3000\n\nid: 1\ndata: {}\n\nx");
    }
}
