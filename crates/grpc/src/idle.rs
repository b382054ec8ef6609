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

use crate::outbox::Outbox;

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

    /// A call arrived: it is open until the [`Open`] (or the answer it [holds](Open::hold))
    /// is dropped.
    pub(crate) fn begin(&self) -> Open {
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
pub(crate) struct Open(Arc<Inner>);

impl Open {
    /// The answer, whose body keeps the call open until it is sent or dropped; its data is
    /// counted into the connection's `outbox` as it is handed over.
    pub(crate) fn hold(
        self,
        response: http::Response<Body>,
        outbox: Outbox,
    ) -> http::Response<Held> {
        response.map(|inner| Held {
            inner,
            outbox,
            _open: self,
        })
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        *self.0.quiet_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, holding its call open until it is sent or dropped.
pub(crate) struct Held {
    inner: Body,
    outbox: Outbox,
    _open: Open,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if let Some(data) = f.data_ref() {
                self.outbox.handed(data.len());
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
