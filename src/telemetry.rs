//! Logging, and traces over OTLP when `telemetry.endpoint` is set (README.md, "Traces").
//!
//! Without an endpoint this is the log subscriber alone: no OpenTelemetry layer, and the
//! `debug` spans the server opens (body read, decode, queue, run, encode) are disabled at their
//! call sites, so they cost a cached check. With one, the `tracing` spans also go to an
//! [`OpenTelemetryLayer`](tracing_opentelemetry::OpenTelemetryLayer) whose tracer hands
//! finished spans to the SDK's batch processor, which exports them on its own thread over
//! OTLP/gRPC. A request never waits for the receiver: at most `telemetry.max_queue_size`
//! finished spans are held, and one ending beyond that is dropped and counted in
//! `ortserve_trace_spans_dropped_total` ([`Bounded`]).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use ortserve_core::config::{LogFormat, TelemetryConfig};

/// The exporter while traces are on: [`Telemetry::shutdown`] sends what is held.
pub struct Telemetry {
    provider: SdkTracerProvider,
    flush_timeout: Duration,
}

impl Telemetry {
    /// Exports what is held now (the tests, which do not wait for the batch delay).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Exports the spans still held, waiting at most `telemetry.flush_timeout`, then stops the
    /// exporter. Call it after the drain, while the async runtime still runs.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(self.flush_timeout) {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}

/// Sets the process's log subscriber: `format` to stderr at `level` (RUST_LOG chooses when
/// set), and the trace exporter when `telemetry` names an endpoint. With traces on it must be
/// called inside a tokio runtime (the gRPC channel's tasks run on it). Once per process.
pub fn init(
    format: LogFormat,
    level: &str,
    telemetry: &TelemetryConfig,
) -> Result<Option<Telemetry>, String> {
    use std::io::IsTerminal;
    // RUST_LOG chooses; unset or empty means `level`, with ONNX Runtime's own chatter at warn.
    let default = format!("{level},{}", ortserve_core::device::RUNTIME_LOG_QUIET);
    let default = default.as_str();
    let wanted = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let filter = tracing_subscriber::EnvFilter::try_new(wanted.as_deref().unwrap_or(default))
        .unwrap_or_else(|e| {
            eprintln!("RUST_LOG: {e}; using {default}");
            tracing_subscriber::EnvFilter::new(default)
        });
    let ansi = std::io::stderr().is_terminal();
    if !telemetry.enabled() {
        // As before traces existed: one global filter, so disabled spans cost nothing.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Text => builder.init(),
        }
        ortserve_core::call::set_traces_on(false);
        return Ok(None);
    }
    let provider = provider(telemetry)?;
    let tracer = provider.tracer("ortserve");
    let dispatch_cell = Arc::new(OnceLock::new());
    let dispatch: Dispatch = match format {
        LogFormat::Json => {
            let log = tracing_subscriber::fmt::layer()
                .json()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .event_format(WithTraceIds {
                    inner: tracing_subscriber::fmt::format().json(),
                    dispatch: dispatch_cell.clone(),
                })
                .fmt_fields(JsonFields::new())
                .with_filter(filter);
            tracing_subscriber::registry()
                .with(log)
                .with(otel_layer(tracer.clone()))
                .into()
        }
        LogFormat::Text => {
            let log = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .with_filter(filter);
            tracing_subscriber::registry()
                .with(log)
                .with(otel_layer(tracer.clone()))
                .into()
        }
    };
    let _ = dispatch_cell.set(dispatch.downgrade());
    dispatch
        .try_init()
        .map_err(|e| format!("cannot set the log subscriber: {e}"))?;
    ortserve_core::call::set_traces_on(true);
    Ok(Some(Telemetry {
        provider,
        flush_timeout: telemetry.flush_timeout.0,
    }))
}

/// The OTel layer sees this server's spans down to `debug`, and among events only warnings and
/// errors (they become span events); the log keeps its own filter.
fn otel_layer<S>(tracer: opentelemetry_sdk::trace::SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            if meta.is_span() {
                meta.target().starts_with("ortserve") && *meta.level() <= tracing::Level::DEBUG
            } else {
                *meta.level() <= tracing::Level::WARN
            }
        }))
}

fn provider(t: &TelemetryConfig) -> Result<SdkTracerProvider, String> {
    let endpoint = t.endpoint.clone().unwrap_or_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(t.export_timeout.0)
        .build()
        .map_err(|e| format!("telemetry.endpoint {endpoint:?}: {e}"))?;
    let held = Arc::new(AtomicUsize::new(0));
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(t.max_queue_size)
        .with_max_export_batch_size(t.max_queue_size.min(512))
        .build();
    let processor = Bounded {
        inner: BatchSpanProcessor::new(
            Released {
                inner: exporter,
                held: held.clone(),
            },
            batch,
        ),
        held,
        limit: t.max_queue_size,
    };
    let mut attributes: Vec<KeyValue> = t
        .resource_attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    attributes.push(KeyValue::new("service.name", t.service_name.clone()));
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler(&t.sampler, t.ratio()))
        .with_resource(
            Resource::builder_empty()
                .with_attributes(attributes)
                .build(),
        )
        .build())
}

/// The OpenTelemetry sampler of that name (validated by the config).
fn sampler(name: &str, ratio: f64) -> Sampler {
    let root = match name.trim_start_matches("parentbased_") {
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        _ => Sampler::AlwaysOn,
    };
    if name.starts_with("parentbased_") {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// The bound on finished spans: counts each from its end until its export returns (the
/// exporter side is [`Released`]), and drops and counts one that would go over `limit`. The
/// batch processor's own queue is as long as `limit`, so it never drops one itself (the SDK
/// does not say how many it drops).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.held.fetch_sub(1, Ordering::AcqRel);
            ortserve_core::metrics::trace_spans_dropped().inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter that gives back a batch's places in [`Bounded`] once its export returns
/// (sent, failed or timed out).
#[derive(Debug)]
struct Released<E> {
    inner: E,
    held: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Released<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.held.fetch_sub(n, Ordering::AcqRel);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// tracing-subscriber's JSON line, with `trace_id` and `span_id` added when the event is inside
/// a traced span (the ids a trace viewer shows, to go from a log line to its trace).
struct WithTraceIds {
    inner: Format<Json>,
    /// The subscriber this formatter is part of, to ask the OTel layer for the span's ids
    /// (set once the subscriber is built).
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl WithTraceIds {
    fn ids(&self, span: &tracing::span::Id) -> Option<(String, String)> {
        use opentelemetry::trace::TraceContextExt;
        let dispatch = self.dispatch.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(span, &dispatch)?;
        let s = cx.span();
        let sc = s.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }
}

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.parent_span().and_then(|span| self.ids(&span.id()));
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The line is one JSON object and a newline: the ids go in before its last brace.
        match line.rfind('}') {
            Some(end) => {
                writer.write_str(&line[..end])?;
                write!(writer, r#","trace_id":"{trace_id}","span_id":"{span_id}""#)?;
                writer.write_str(&line[end..])
            }
            None => writer.write_str(&line),
        }
    }
}
