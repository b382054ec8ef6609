//! W3C trace context on gRPC: `traceparent` (and `tracestate`) metadata makes the call's
//! request span a child of the caller's span, and the answer's metadata names the request span
//! in its own `traceparent`. Only while traces are exported ([`call::traces_on`]). The same
//! reading as the REST front door's (the two front doors share only the core, which stays on
//! plain `tracing`).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ortserve_core::call;

pub(crate) const TRACEPARENT: &str = "traceparent";

/// Makes `span` the child of the span the metadata names, if it names one.
pub(crate) fn adopt_parent(span: &tracing::Span, metadata: &http::HeaderMap) {
    let Some((trace, parent, flags)) = metadata
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(call::parse_traceparent)
    else {
        return;
    };
    let state = metadata
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
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let s = cx.span();
    let sc = s.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}
