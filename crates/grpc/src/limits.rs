//! What bounds a call on the gRPC port beyond the HTTP/2 settings and the connection limit
//! ([`crate::serve`]): its deadline ([`DeadlineLayer`]) and the request bytes it holds
//! ([`BodyBudgetLayer`]: every message counts against the body-memory budget the HTTP port
//! uses, as it arrives, until its call is answered).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use std::time::Duration;

use tonic::body::Body;

use ortserve_core::app::AppState;
use ortserve_core::call::OwnedBodyMemory;

/// Ends a call that is not answered within its deadline (the client's `grpc-timeout`, at most
/// `server.request_timeout` and a second) with DEADLINE_EXCEEDED, whatever it was doing (its
/// message still arriving, say). The request core gives the same status when the deadline
/// passes in the queue; this is the backstop.
#[derive(Clone)]
pub(crate) struct DeadlineLayer {
    app: Arc<AppState>,
    limit: Duration,
}

impl DeadlineLayer {
    pub(crate) fn new(app: Arc<AppState>, request_timeout: Duration) -> DeadlineLayer {
        DeadlineLayer {
            app,
            limit: request_timeout + Duration::from_secs(1),
        }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            app: self.app.clone(),
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
    app: Arc<AppState>,
    limit: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let asked = crate::service::timeout_header(req.headers()).ok().flatten();
        let within = asked.map_or(self.limit, |a| a.min(self.limit));
        // A metric label: one of the RPCs served, never the client's text.
        let asked_rpc = req.uri().path().rsplit('/').next().unwrap_or_default();
        let rpc = crate::service::RPCS
            .iter()
            .find(|r| **r == asked_rpc)
            .copied()
            .unwrap_or("other");
        let app = self.app.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            // A little past the deadline: the request core answers a call whose deadline passed
            // in the queue itself, with its model in the metrics.
            match tokio::time::timeout(within + Duration::from_millis(5), answer).await {
                Ok(answered) => answered,
                Err(_) => {
                    ortserve_core::call::record(
                        &app,
                        "grpc",
                        "",
                        rpc,
                        "DEADLINE_EXCEEDED",
                        started,
                    );
                    Ok(
                        tonic::Status::deadline_exceeded(format!("not answered within {within:?}"))
                            .into_http(),
                    )
                }
            }
        })
    }
}

/// Counts every request's bytes against the body-memory budget as they arrive, and holds them
/// until the call is answered; a message that would go over fails with UNAVAILABLE, one that
/// has not arrived within `server.body_timeout` with DEADLINE_EXCEEDED.
#[derive(Clone)]
pub(crate) struct BodyBudgetLayer {
    app: Arc<AppState>,
}

impl BodyBudgetLayer {
    pub(crate) fn new(app: Arc<AppState>) -> BodyBudgetLayer {
        BodyBudgetLayer { app }
    }
}

impl<S> tower::Layer<S> for BodyBudgetLayer {
    type Service = BodyBudget<S>;
    fn layer(&self, inner: S) -> BodyBudget<S> {
        BodyBudget {
            inner,
            app: self.app.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct BodyBudget<S> {
    inner: S,
    app: Arc<AppState>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for BodyBudget<S>
where
    S: tower::Service<http::Request<Body>> + Send,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let held = Arc::new(Mutex::new(OwnedBodyMemory::new(self.app.clone())));
        let by = Box::pin(tokio::time::sleep(self.app.body_timeout));
        let req = req.map(|inner| {
            Body::new(Counted {
                inner: Body::new(inner),
                held: held.clone(),
                by,
            })
        });
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answered = answer.await;
            drop(held);
            answered
        })
    }
}

/// A request body whose data frames are counted into `held` as they arrive, and which must
/// have arrived whole by `by` (`server.body_timeout` after the call began).
struct Counted {
    inner: Body,
    held: Arc<Mutex<OwnedBodyMemory>>,
    by: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                // A message sent slowly, or never finished, holds a stream and its bytes: it
                // gets as long as a REST body does.
                if self.by.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
                        "the request message did not arrive within server.body_timeout",
                    ))));
                }
                return Poll::Pending;
            }
        };
        if let Some(data) = frame.data_ref() {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = held.take(data.len()) {
                return Poll::Ready(Some(Err(crate::status::status_of(&e))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
