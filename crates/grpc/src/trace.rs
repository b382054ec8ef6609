//! W3C trace context on gRPC: `traceparent` (and `tracestate`) metadata makes the call's
//! request span a child of the caller's span, and the answer's metadata names the request span
//! in its own `traceparent` (the core's `trace_context` does both, for REST too). Only while
//! traces are exported ([`ortserve_core::call::traces_on`]).

use ortserve_core::trace_context;

pub(crate) use ortserve_core::trace_context::TRACEPARENT;

/// Makes `span` the child of the span the metadata names, if it names one.
pub(crate) fn adopt_parent(span: &tracing::Span, metadata: &http::HeaderMap) {
    let text = |name| metadata.get(name).and_then(|v| v.to_str().ok());
    trace_context::adopt_parent(span, text(TRACEPARENT), text(trace_context::TRACESTATE));
}

/// The `traceparent` naming `span`, when it is traced.
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    trace_context::traceparent_of(span)
}
