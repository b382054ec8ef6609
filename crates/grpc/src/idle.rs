//! Idle gRPC connections end: a connection with no call open for `server.keep_alive_timeout`
//! is sent GOAWAY and closed, as an idle HTTP/1.1 keep-alive connection is. Keepalive pings
//! alone do not keep it: a client that answers pings and never calls would otherwise hold one of
//! the `max_connections` places for ever. A call is open from its request until its answer's
//! body has been sent or dropped, so a long `Health/Watch` stream keeps its connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;

/// The calls open on one connection, and when the last one ended.
#[derive(Clone)]
pub(crate) struct Calls(Arc<Inner>);

struct Inner {
    open: AtomicUsize,
    quiet_since: Mutex<Instant>,
}

impl Calls {
    pub(crate) fn new() -> Calls {
        Calls(Arc::new(Inner {
            open: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
        }))
    }

    fn begin(&self) -> Open {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Open(self.0.clone())
    }

    /// How long the connection has had no call open; `None` while one is.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.0.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.0.quiet_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(since.elapsed())
    }
}

/// One open call; dropped when its answer is done.
struct Open(Arc<Inner>);

impl Drop for Open {
    fn drop(&mut self) {
        *self.0.quiet_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts the calls of one connection into its [`Calls`].
#[derive(Clone)]
pub(crate) struct CountCalls<S> {
    pub(crate) inner: S,
    pub(crate) calls: Calls,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CountCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Held>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Held>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = self.calls.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|inner| Held { inner, _open: open }))
        })
    }
}

/// An answer's body, holding its call open until it is sent or dropped.
pub(crate) struct Held {
    inner: Body,
    _open: Open,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
