//! W3C trace context on REST, the answer's side: the request span (made the caller's child in
//! `layered` by the core's `trace_context`) is named in the answer's `traceparent` and handed to
//! the access log. Only while traces are exported ([`ortserve_core::call::traces_on`]);
//! otherwise nothing here runs.

use axum::http::HeaderValue;

use ortserve_core::trace_context::{self, TRACEPARENT};

/// The request span, carried out of it on the answer so that the access log line (written by
/// the edge, outside the span) is written inside it and names its trace.
#[derive(Clone)]
pub(crate) struct RequestSpan(pub(crate) tracing::Span);

/// Records the status on the request span (current here), names the span in the answer, and
/// hands the span to the edge's access log.
pub(crate) fn answer<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let span = tracing::Span::current();
    span.record("status", response.status().as_u16());
    if let Some(v) =
        trace_context::traceparent_of(&span).and_then(|v| HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(TRACEPARENT, v);
    }
    response.extensions_mut().insert(RequestSpan(span));
    response
}
