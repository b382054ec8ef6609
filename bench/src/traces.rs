//! `--traces RATIO`: the server's traces on, exported over OTLP/gRPC to a receiver in this
//! process that counts what it gets, so the cost of tracing is measured with a real export
//! (encoding, the batch processor's thread, the gRPC calls) on the same cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// Spans received.
#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver and the exporter, on a runtime of their own for the whole run.
pub struct Traces {
    received: Count,
    telemetry: Option<ortserve::telemetry::Telemetry>,
    runtime: tokio::runtime::Runtime,
}

impl Traces {
    /// Starts the receiver on 127.0.0.1 and sets the process's log subscriber with the exporter
    /// pointed at it, sampling `ratio` of the traces (`parentbased_traceidratio`).
    pub fn start(ratio: f64) -> Result<Traces, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let received = Count::default();
        let service = TraceServiceServer::new(received.clone());
        let addr = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            Ok::<_, std::io::Error>(addr)
        });
        let addr = addr.map_err(|e| format!("the OTLP receiver: {e}"))?;
        let config = ortserve::config::TelemetryConfig {
            endpoint: Some(format!("http://{addr}")),
            sampler: "parentbased_traceidratio".into(),
            sampler_arg: Some(ratio.to_string()),
            ..Default::default()
        };
        let telemetry = runtime.block_on(async {
            ortserve::telemetry::init(ortserve::config::LogFormat::Text, "warn", &config)
        })?;
        Ok(Traces {
            received,
            telemetry,
            runtime,
        })
    }

    /// Exports what is held, then says what was received and dropped.
    pub fn finish(mut self) -> String {
        if let Some(t) = self.telemetry.take() {
            self.runtime.block_on(async { t.shutdown() });
        }
        format!(
            "traces: {} spans received, {} dropped",
            self.received.0.load(Ordering::Relaxed),
            ortserve::metrics::trace_spans_dropped().get()
        )
    }
}
