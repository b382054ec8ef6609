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

/// Makes `span` the child of the span the request's `traceparent` names (with its
/// `tracestate`), if it names one. `header` gives a header's (REST) or metadata entry's (gRPC)
/// text by its name.
pub fn adopt_parent<'a>(span: &tracing::Span, header: impl Fn(&str) -> Option<&'a str>) {
    let Some((trace, parent, flags)) = header(TRACEPARENT).and_then(parse_traceparent) else {
        return;
    };
    let state = header(TRACESTATE)
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

/// A W3C `traceparent` value: (trace id, parent span id, flags), or `None` for one that is
/// malformed, all-zero or of version `ff` (which the specification says to ignore). A later
/// version is read by its first four fields.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let v = value.trim().as_bytes();
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) {
        return None;
    }
    let hex = |b: &[u8], out: &mut [u8]| -> Option<()> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        for (o, pair) in out.iter_mut().zip(b.chunks(2)) {
            *o = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(())
    };
    let (mut version, mut trace, mut span, mut flags) = ([0u8], [0u8; 16], [0u8; 8], [0u8]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    hex(&v[0..2], &mut version)?;
    hex(&v[3..35], &mut trace)?;
    hex(&v[36..52], &mut span)?;
    hex(&v[53..55], &mut flags)?;
    if version[0] == 0xff || trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags[0]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn traceparent_is_read_as_the_w3c_specification_says() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = super::parse_traceparent(good).unwrap();
        assert_eq!((t[0], t[15], s[0], s[7], f), (0x4b, 0x36, 0x00, 0xb7, 1));
        // A later version may add fields after a dash.
        assert!(super::parse_traceparent(&format!("01{}-more", &good[2..])).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert_eq!(super::parse_traceparent(bad), None, "{bad:?}");
        }
    }
}
