//! W3C trace context on REST: a `traceparent` (and `tracestate`) header makes the request span
//! a child of the caller's span, and the answer names the request span in its own
//! `traceparent`. Only while traces are exported ([`call::traces_on`]); otherwise nothing here
//! runs.

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ortserve_core::call;

pub(crate) const TRACEPARENT: &str = "traceparent";

/// Makes `span` the child of the span the headers name, if they name one.
pub(crate) fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
    let Some((trace, parent, flags)) = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(call::parse_traceparent)
    else {
        return;
    };
    let state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(
        TraceId::from_bytes(trace),
        SpanId::from_bytes(parent),
        TraceFlags::new(flags),
        true,
        state,
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The `traceparent` naming `span`, when it is traced.
pub(crate) fn traceparent(span: &tracing::Span) -> Option<HeaderValue> {
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    if !sc.is_valid() {
        return None;
    }
    HeaderValue::from_str(&format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
    .ok()
}

/// Records the status on the request span (current here) and names the span in the answer.
pub(crate) fn answer<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let span = tracing::Span::current();
    span.record("status", response.status().as_u16());
    if let Some(v) = traceparent(&span) {
        response.headers_mut().insert(TRACEPARENT, v);
    }
    response
}
