//! The accept loop and each connection's limits, in place of a bare `axum::serve`:
//! at most `max_connections` open (more wait in the listen backlog), a request head must be
//! complete within `header_timeout` of its first byte, an idle keep-alive connection closes
//! after `keep_alive_timeout`, a response the client stops reading closes its connection after
//! `write_timeout` without progress, and on shutdown every connection finishes its request and
//! closes.
//! Body deadlines (408) are the handlers' (see `extract::read_body`); `Connection: close` on
//! every response from SIGTERM on is the outermost layer's (see `edge`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::framing::{ChunkTooLarge, Framing, Oversized};

use futures_util::task::AtomicWaker;
use ortserve_core::config::ServerConfig;
use ortserve_core::stamp::Stamp;

/// The connection limits of [`ServerConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub write_timeout: Duration,
    /// A chunk declaring more is answered 413 at once (see `framing`).
    pub max_body_bytes: u64,
}

impl ConnLimits {
    /// The data port's limits.
    pub(crate) fn of(server: &ServerConfig) -> ConnLimits {
        ConnLimits {
            max_connections: server.max_connections,
            header_timeout: server.header_timeout.0,
            keep_alive_timeout: server.keep_alive_timeout.0,
            write_timeout: server.write_timeout.0,
            max_body_bytes: server.max_body_bytes.0,
        }
    }

    /// The admin port's: the same timeouts, its own connection limit.
    pub(crate) fn admin(server: &ServerConfig) -> ConnLimits {
        ConnLimits {
            max_connections: server.admin_max_connections,
            ..ConnLimits::of(server)
        }
    }

    /// How often a connection checks its timeouts: a quarter of the shortest, within 10 ms..1 s.
    fn tick(&self) -> Duration {
        (self
            .header_timeout
            .min(self.keep_alive_timeout)
            .min(self.write_timeout)
            / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// Binds `addr` (an address or `host:port`) with a listen backlog of `backlog`. tokio's
/// `TcpListener::bind` asks for 128, so a burst of a few hundred connections (a load balancer
/// opening its pool, clients reconnecting after a rollout) had handshakes dropped, and those
/// clients waited a second to retry: a liveness probe took 1.04 s under `scripts/hostile.py`.
pub async fn bind(addr: &str, backlog: u32) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"))
    }))
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting, lets every open
/// connection finish the request it is on (idle ones close at once) and returns when all are
/// closed.
pub(crate) async fn serve(
    app: Router,
    listener: TcpListener,
    limits: ConnLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
            () = &mut stop => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        conns.spawn(connection(
            tcp,
            app.clone(),
            limits,
            closing.clone(),
            Some(permit),
        ));
        while conns.try_join_next().is_some() {}
    }
    // A client whose handshake completed is in the listen backlog; closing the listener would
    // reset its connection after it wrote its request. Take those too: they are answered with
    // `Connection: close`.
    // Accept with system calls until the queue is empty: tokio's `accept` would only try once
    // its reactor has seen the listener readable.
    if let Ok(listener) = listener.into_std() {
        while let Ok((tcp, _)) = listener.accept() {
            let Ok(tcp) = tcp
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(tcp))
            else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let permit = open.clone().try_acquire_owned().ok();
            conns.spawn(connection(
                tcp,
                app.clone(),
                limits,
                closing.clone(),
                permit,
            ));
        }
    }
    let _ = closing_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Where a connection is between requests: handling one (`busy`), or not, with the moment the
/// next request's head started arriving (`head`, unset while idle) and the moment it last
/// turned idle (`idle`); and since when a write has found the socket full (`write_stall`, unset
/// while writes go through).
#[derive(Default)]
struct Phase {
    busy: AtomicBool,
    head: Stamp,
    idle: Stamp,
    write_stall: Stamp,
    /// Requests this connection has started.
    requests: AtomicU64,
    /// The request (its ordinal, 0 for none) whose body has a chunk declared over the limit,
    /// and what it declared; the body reader's waker, woken when that is found.
    oversized: AtomicU64,
    oversized_declared: AtomicU64,
    body_waker: AtomicWaker,
}

impl Phase {
    /// Bytes came in: if no request is being handled, a request head has started. (Socket
    /// reads and the service run in the connection's one task, so these never race.)
    fn bytes_arrived(&self) {
        if !self.busy.load(Ordering::Acquire) {
            self.head.set_if_unset();
        }
    }

    /// A request is handed to the service; returns its ordinal (1 for the first).
    fn request_started(&self) -> u64 {
        self.busy.store(true, Ordering::Release);
        self.head.clear();
        self.requests.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn found_oversized(&self, found: Oversized) {
        self.oversized_declared
            .store(found.declared, Ordering::Release);
        self.oversized.store(found.request, Ordering::Release);
        self.body_waker.wake();
    }

    /// What request `ordinal` declared over the limit, if it did.
    fn oversized(&self, ordinal: u64) -> Option<u64> {
        (self.oversized.load(Ordering::Acquire) == ordinal)
            .then(|| self.oversized_declared.load(Ordering::Acquire))
    }

    fn request_answered(&self) {
        self.busy.store(false, Ordering::Release);
        self.idle.set();
    }

    /// A write's outcome: the socket was full (a stall starts, unless one has), or it took bytes
    /// (any stall ends).
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Pending => self.write_stall.set_if_unset(),
            Poll::Ready(Ok(n)) if *n > 0 => self.write_stall.clear(),
            Poll::Ready(_) => {}
        }
    }

    /// How long the connection has been idle: no request being handled, none arriving.
    fn idle_for(&self) -> Option<std::time::Duration> {
        if self.busy.load(Ordering::Acquire) || self.head.elapsed().is_some() {
            return None;
        }
        self.idle.elapsed()
    }
}

/// The socket, noting when bytes arrive on an idle connection and when writes stall, and
/// reading the request framing along with hyper.
struct Watched {
    tcp: TcpStream,
    phase: Arc<Phase>,
    framing: Framing,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.phase.bytes_arrived();
            let this = &mut *self;
            if let Some(found) = this.framing.read(&buf.filled()[before..]) {
                this.phase.found_oversized(found);
            }
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.phase.wrote(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.phase.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A request's body as hyper reads it, ended with [`ChunkTooLarge`] as soon as a chunk of it
/// declares more than the limit.
struct Checked {
    inner: Incoming,
    phase: Arc<Phase>,
    ordinal: u64,
    limit: u64,
}

impl Checked {
    fn too_large(&self) -> Option<ChunkTooLarge> {
        self.phase
            .oversized(self.ordinal)
            .map(|declared| ChunkTooLarge {
                declared,
                limit: self.limit,
            })
    }
}

impl hyper::body::Body for Checked {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::BoxError>>> {
        if let Some(e) = self.too_large() {
            return Poll::Ready(Some(Err(e.into())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                self.phase.body_waker.register(cx.waker());
                // Found between the first look and registering: not woken for it.
                match self.too_large() {
                    Some(e) => Poll::Ready(Some(Err(e.into()))),
                    None => Poll::Pending,
                }
            }
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Most bytes one connection's read buffer holds (hyper's default is about 400 KiB), so also
/// the longest request head: a longer one is answered 431. A binary tensor that arrived in one
/// read is a slice of that buffer until its batch has run, so the buffer is held that long
/// (src/http/routes/infer.rs); under every class of `scripts/hostile.py` at once the peak RSS
/// was 12.9 MiB lower than with hyper's default (docs/BENCHMARKS.md). Bigger bodies take more
/// reads.
const READ_BUFFER: usize = 128 << 10;

/// The size of a request head as sent: the request line, each header line, the blank line.
fn head_bytes<B>(req: &hyper::Request<B>) -> usize {
    let target = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |p| p.as_str().len());
    let line = req.method().as_str().len() + 1 + target + 1 + 8 + 2;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + headers + 2
}

/// A head over `READ_BUFFER`: hyper refuses one that fills its read buffer before it ends, but
/// one that arrives in a single large read can be parsed whole (heads of up to about 190 KiB
/// passed), so the limit is checked again on the parsed head, whatever the reads were.
fn head_too_large<B>(req: &hyper::Request<B>) -> Option<super::CallError> {
    let bytes = head_bytes(req);
    (bytes > READ_BUFFER).then_some(crate::CallError::HeadTooLarge {
        bytes,
        limit: READ_BUFFER,
    })
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without exactly one `Host` header is answered 400
/// (hyper takes it as it comes). HTTP/1.0 requests may omit it.
fn host_problem<B>(req: &hyper::Request<B>) -> Option<super::CallError> {
    let hosts = req.headers().get_all(hyper::header::HOST).iter().count();
    match hosts {
        1 => None,
        0 if req.version() != hyper::Version::HTTP_11 => None,
        0 => Some(crate::CallError::MalformedBody(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        _ => Some(crate::CallError::MalformedBody(format!(
            "{hosts} Host headers; a request has one"
        ))),
    }
}

/// One HTTP/1.1 connection until it closes: by the client, by a timeout, or gracefully once
/// `closing` turns true.
async fn connection(
    tcp: TcpStream,
    app: Router,
    limits: ConnLimits,
    mut closing: watch::Receiver<bool>,
    _open: Option<OwnedSemaphorePermit>,
) {
    let born = Instant::now();
    let phase = Arc::new(Phase::default());
    phase.idle.set();
    let io = TokioIo::new(Watched {
        tcp,
        phase: phase.clone(),
        framing: Framing::new(limits.max_body_bytes),
    });
    let service = hyper::service::service_fn({
        let phase = phase.clone();
        move |req: hyper::Request<Incoming>| {
            let ordinal = phase.request_started();
            let bad_head = head_too_large(&req).or_else(|| host_problem(&req));
            let app = app.clone();
            let phase = phase.clone();
            async move {
                let response = match bad_head {
                    Some(e) => Ok(axum::response::IntoResponse::into_response(
                        super::ApiError(e),
                    )),
                    None => {
                        let req = req.map(|inner| {
                            Body::new(Checked {
                                inner,
                                phase: phase.clone(),
                                ordinal,
                                limit: limits.max_body_bytes,
                            })
                        });
                        app.oneshot(req).await
                    }
                };
                phase.request_answered();
                response
            }
        }
    });
    // Both timeouts are checked on the connection's own tick below, not with hyper's header
    // timer, which would set a timer for every request.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(READ_BUFFER)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(limits.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    // A connection opened moments before the listener closed has a request on its way; it gets
    // up to a second to send it (answered with `Connection: close`) before it is closed.
    let linger = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(linger);
    let mut lingering = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = closing.changed(), if !stopping => {
                stopping = true;
                let fresh = born.elapsed() < Duration::from_secs(1)
                    && phase.requests.load(Ordering::Acquire) == 0;
                if fresh {
                    lingering = true;
                } else {
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = &mut linger, if lingering => {
                lingering = false;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                // A client that stopped reading: hyper waits on the write for ever, and neither
                // the header nor the keep-alive timeout applies while it does.
                if phase.write_stall.elapsed().is_some_and(|t| t > limits.write_timeout) {
                    tracing::debug!(write_timeout = ?limits.write_timeout, "closing a connection whose client stopped reading");
                    return;
                }
                if phase.head.elapsed().is_some_and(|t| t > limits.header_timeout) {
                    tracing::debug!(header_timeout = ?limits.header_timeout, "closing a connection whose request head did not arrive in time");
                    return;
                }
                if !stopping && phase.idle_for().is_some_and(|t| t > limits.keep_alive_timeout) {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
