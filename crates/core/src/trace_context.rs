//! W3C trace context for both front doors: a caller's `traceparent` (and `tracestate`) as the
//! parent of a request span, and the `traceparent` that names a span in an answer. The only
//! place in the core that names OpenTelemetry; the exporter and the layer that turn `tracing`
//! spans into OpenTelemetry spans are the binary's. Used only while traces are exported
//! ([`crate::call::traces_on`]).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (REST) and metadata key (gRPC).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Makes `span` the child of the span a `traceparent` value names (with its `tracestate`),
/// if it names one (see [`crate::call::parse_traceparent`]).
pub fn adopt_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some((trace, parent, flags)) = traceparent.and_then(crate::call::parse_traceparent) else {
        return;
    };
    let state = tracestate
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
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
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
