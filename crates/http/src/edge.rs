//! The outermost layer, one unboxed service for what every request and answer passes through:
//! a client's unusable `x-request-id` is dropped (so one is generated), every error answer gets
//! the JSON body of the status table (axum writes 405 and extractor rejections as plain text),
//! and from SIGTERM on every answer says `Connection: close`. Three `axum::middleware` layers
//! did this before, each boxing a future per request; on the tiny-model path that cost about
//! 15% of requests per second (docs/BENCHMARKS.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use tower::{Layer, Service};

use crate::{ApiError, CallError, REQUEST_ID};
use ortserve_core::app::AppState;

#[derive(Clone)]
pub(crate) struct EdgeLayer(pub(crate) Arc<AppState>);

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Edge<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S, B> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = axum::http::Response<B>>,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        drop_unusable_request_id(&mut req);
        let access = self.state.access_log.then(|| Access {
            method: req.method().clone(),
            // Bounded: a path is a client's claim too.
            path: req.uri().path().chars().take(MAX_LOGGED_PATH).collect(),
            started: std::time::Instant::now(),
        });
        let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        EdgeFuture {
            inner: self.inner.call(req),
            state: self.state.clone(),
            access,
            has_body,
        }
    }
}

/// Longest path written to the access log, in characters.
const MAX_LOGGED_PATH: usize = 256;

/// What the access log line needs of the request (`server.access_log`).
pub(crate) struct Access {
    method: axum::http::Method,
    path: String,
    started: std::time::Instant,
}

pin_project_lite::pin_project! {
    pub(crate) struct EdgeFuture<F> {
        #[pin]
        inner: F,
        state: Arc<AppState>,
        access: Option<Access>,
        // The request came with a body, which an error answer may leave unread.
        has_body: bool,
    }
}

impl<F, B, E> Future for EdgeFuture<F>
where
    F: Future<Output = Result<axum::http::Response<B>, E>>,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(resp)) => resp,
        };
        // The one conversion to axum's body, as the router would make.
        let mut resp = json_errors(resp.map(Body::new));
        let status = resp.status();
        if this.state.is_draining()
            || (*this.has_body && (status.is_client_error() || status.is_server_error()))
        {
            // A keep-alive client opens its next request on a new connection (to another pod)
            // instead of writing it on one this server is about to close: when draining, and
            // after an error answered before the request's body was read (an unknown model, a
            // full queue), whose connection is not kept.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // With traces on, the request span came back on the answer: the access line is
        // written inside it, so the JSON log gives it the request's trace_id and span_id.
        let span = resp.extensions_mut().remove::<crate::trace::RequestSpan>();
        if let Some(a) = this.access.take() {
            let _inside = span.as_ref().map(|s| s.0.enter());
            let id = resp
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info!(
                target: "ortserve::access",
                method = %a.method,
                path = %a.path,
                status = resp.status().as_u16(),
                ms = (a.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
                request_id = id,
                "request"
            );
        }
        Poll::Ready(Ok(resp))
    }
}

/// Removes a client's `x-request-id` that is too long or has characters that could forge or
/// break log fields (spaces, quotes, `=` after a space, control characters), so the request-id
/// layer generates one instead. Ids of letters, digits and `-_.:/+=@~` up to 128 bytes are kept.
fn drop_unusable_request_id(req: &mut Request<Body>) {
    let usable = |v: &HeaderValue| ortserve_core::call::usable_request_id(v.as_bytes());
    if req.headers().get(REQUEST_ID).is_some_and(|v| !usable(v)) {
        req.headers_mut().remove(REQUEST_ID);
    }
}

/// Gives an error answer that is not JSON the JSON body of the status table: 405 for a known
/// route with another method, and 400 for a path that is not UTF-8 or a query that does not
/// parse (axum writes those as plain text before a handler runs).
fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // axum's plain-text errors are in memory: their body is ready at the first poll.
    let text = axum::body::to_bytes(body, 4096)
        .now_or_never()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = match status.as_u16() {
        405 => CallError::MethodNotAllowed,
        404 => CallError::NotFound(text),
        415 => CallError::UnsupportedMediaType(text),
        400 | 422 => CallError::MalformedBody(text),
        // Nothing else writes plain-text errors today; keep such an answer as it is.
        _ => return Response::from_parts(parts, Body::from(text)),
    };
    let mut out = ApiError(error).into_response();
    // Keep what the original answer said besides its body (`Allow` on a 405).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
