//! `inference.GRPCInferenceService`: each RPC decodes its message, drives the request core
//! (call context, auth, lookup, admission and inference through the `app` façade, the
//! lifecycle), and ends with the status [`status_of`] gives its error. Every call is recorded
//! in the request metrics with `protocol="grpc"` and echoes its request id in the response
//! metadata (`x-request-id`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::model_infer_response::InferOutputTensor;
use crate::proto::inference::model_metadata_response::TensorMetadata;
use crate::proto::inference::repository_index_response::ModelIndex;
use crate::proto::inference::*;
use crate::status::{label, status_of};
use crate::tensors;
use ortserve_core::app::AppState;
use ortserve_core::call::{self, Call, CallError};
use ortserve_core::lifecycle;
use ortserve_core::model::TensorInfo;
use ortserve_core::tensor::Tensor;
use ortserve_core::trace_context;

/// The service over the server's state.
pub struct Inference {
    app: Arc<AppState>,
}

impl Inference {
    pub fn new(app: Arc<AppState>) -> Inference {
        Inference { app }
    }
}

const REQUEST_ID: &str = "x-request-id";

/// The RPCs served, as the metrics name them (`route`).
pub(crate) const RPCS: [&str; 10] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];

/// `grpc-timeout` (gRPC's wire form: up to 8 digits and a unit, `H M S m u n`).
pub(crate) fn timeout_header(headers: &http::HeaderMap) -> Result<Option<Duration>, CallError> {
    let Some(v) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || CallError::InvalidInput("grpc-timeout is not a gRPC timeout (e.g. 500m)".into());
    let text = v.to_str().map_err(|_| bad())?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    // Digits only: Rust's integer parser would take a sign (`+5S`).
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// The client's request id when it is usable, else a new one (the server's counted ids).
fn request_id(app: &AppState, metadata: &http::HeaderMap) -> String {
    metadata
        .get(REQUEST_ID)
        .map(|v| v.as_bytes())
        .filter(|b| call::usable_request_id(b))
        .and_then(|b| std::str::from_utf8(b).ok())
        .map_or_else(|| app.request_ids.next_id(), str::to_string)
}

/// What a call's headers say before anything else: its `grpc-timeout` (which must be well
/// formed) and, when `auth`, its bearer token checked (`authorization` metadata, as the HTTP
/// header), in that order.
fn checked_headers(
    app: &AppState,
    metadata: &http::HeaderMap,
    auth: bool,
) -> Result<Option<Duration>, CallError> {
    let timeout = timeout_header(metadata)?;
    if auth {
        call::authorize(app, bearer(metadata))?;
    }
    Ok(timeout)
}

/// When a call arrived, where its message was read before the service method ran (`fast.rs`
/// puts it in the request's extensions).
#[derive(Clone, Copy)]
pub(crate) struct Arrived(pub(crate) Instant);

/// The call's [`Arrived`], or now.
fn arrived(extensions: &http::Extensions) -> Instant {
    extensions
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0)
}

/// One call's bookkeeping: its context for the core, the RPC and model it names for the
/// metrics, and when it arrived.
struct Rpc<'a> {
    app: &'a AppState,
    name: &'static str,
    model: String,
    started: Instant,
    call: Call,
}

impl<'a> Rpc<'a> {
    /// The call as it arrived: its id, deadline (`grpc-timeout`) and, when `auth`, its bearer
    /// token checked (`authorization` metadata, as the HTTP header).
    fn begin(
        app: &'a AppState,
        name: &'static str,
        metadata: &http::HeaderMap,
        auth: bool,
    ) -> (Rpc<'a>, Result<(), CallError>) {
        Rpc::begin_at(app, name, metadata, auth, Instant::now())
    }

    /// [`Rpc::begin`] for a call that arrived at `started` (its message read since).
    fn begin_at(
        app: &'a AppState,
        name: &'static str,
        metadata: &http::HeaderMap,
        auth: bool,
        started: Instant,
    ) -> (Rpc<'a>, Result<(), CallError>) {
        let id = request_id(app, metadata);
        let checked = checked_headers(app, metadata, auth);
        // A refused call has no deadline to keep.
        let timeout = checked.as_ref().ok().copied().flatten();
        let rpc = Rpc {
            app,
            name,
            model: String::new(),
            started,
            call: Call::arrived(timeout, Some(id)),
        };
        (rpc, checked.map(drop))
    }

    /// The call's answer: recorded in the metrics (and the access log), with the request id
    /// in its metadata.
    fn end<T>(self, answer: Result<T, CallError>) -> Result<Response<T>, Status> {
        self.finish(answer.map(Response::new).map_err(|e| status_of(&e)))
    }

    /// [`Rpc::end`] for an answer that is a response or a status already.
    fn finish<T>(self, out: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        let id = self.call.request_id.clone().unwrap_or_default();
        let code = out.as_ref().map_or_else(Status::code, |_| Code::Ok);
        call::record(
            self.app,
            "grpc",
            &self.model,
            self.name,
            label(code),
            self.started,
        );
        if self.app.access_log {
            tracing::info!(
                target: "ortserve::access",
                rpc = self.name,
                model = %shown_model(self.app, &self.model),
                status = label(code),
                ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
                request_id = %id,
                "grpc call"
            );
        }
        let value = MetadataValue::try_from(id.as_str()).ok();
        match out {
            Ok(mut r) => {
                if let Some(v) = value {
                    r.metadata_mut().insert(REQUEST_ID, v);
                }
                Ok(r)
            }
            Err(s) => {
                let mut s = bounded(s);
                if let Some(v) = value {
                    s.metadata_mut().insert(REQUEST_ID, v);
                }
                Err(s)
            }
        }
    }
}

/// The most bytes of a status message: messages quote what the client sent (a model name, a
/// shape), and gRPC clients refuse metadata over 16 KiB with RESOURCE_EXHAUSTED, a code some
/// retry (grpc-message is percent-encoded: up to three bytes a byte).
const MAX_MESSAGE_BYTES: usize = 1024;

/// `s` with its message cut to [`MAX_MESSAGE_BYTES`] (at a character's boundary, marked `…`).
fn bounded(s: Status) -> Status {
    let message = s.message();
    if message.len() <= MAX_MESSAGE_BYTES {
        return s;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Status::new(s.code(), format!("{}…", &message[..end]))
}

/// The model a call named, as a log field: a configured name as it is (letters, digits and
/// `_ - .`), any other name the client's text, escaped (no line breaks to forge lines with) and
/// cut to 64 characters.
fn shown_model(app: &AppState, model: &str) -> String {
    if model.is_empty() || app.is_configured(model) {
        return model.to_string();
    }
    let cut: String = model.chars().take(64).collect();
    let more = if cut.len() < model.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

/// A request's input tensors, or why they cannot be had.
pub(crate) type Converted = Result<Vec<(String, Tensor)>, CallError>;

/// Takes the request's inputs as tensors: raw contents as they are, typed contents converted
/// (the request keeps everything else).
pub(crate) fn convert(req: &mut ModelInferRequest) -> Converted {
    let raw = std::mem::take(&mut req.raw_input_contents);
    let given = std::mem::take(&mut req.inputs);
    if !raw.is_empty() && raw.len() != given.len() {
        return Err(CallError::InvalidInput(format!(
            "{} raw_input_contents for {} inputs: send one per input, or none",
            raw.len(),
            given.len()
        )));
    }
    given
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let name = input.name.clone();
            Ok((name, tensors::input(input, raw.get(i).cloned())?))
        })
        .collect()
}

/// The call's `authorization` metadata, as the HTTP header.
fn bearer(metadata: &http::HeaderMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok())
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

fn described(t: &TensorInfo) -> TensorMetadata {
    TensorMetadata {
        name: t.name.clone(),
        datatype: t.dtype.v2_name().to_string(),
        shape: t.dims.clone(),
    }
}

/// A request parameter as a whole number (Triton's `timeout` is INT64 microseconds).
fn whole(p: &InferParameter, name: &str) -> Result<u64, CallError> {
    use infer_parameter::ParameterChoice;
    match p.parameter_choice {
        Some(ParameterChoice::Int64Param(n)) if n >= 0 => Ok(n as u64),
        Some(ParameterChoice::Uint64Param(n)) => Ok(n),
        _ => Err(CallError::InvalidInput(format!(
            "parameter {name:?} must be a whole number of microseconds"
        ))),
    }
}

impl Inference {
    /// When a call with `headers` must be answered, counted from now.
    pub(crate) fn deadline(&self, headers: &http::HeaderMap) -> tokio::time::Instant {
        let asked = timeout_header(headers).ok().flatten();
        Call::arrived(asked, None).deadline(self.app.request_timeout)
    }

    /// The server's state (its preprocessing pool, for `fast.rs`).
    pub(crate) fn app(&self) -> &AppState {
        &self.app
    }

    /// What the headers of a call to `rpc` (one that needs a token) refuse before its message
    /// is read: a malformed `grpc-timeout`, or with auth on a missing or wrong token (answered
    /// and recorded as the others are); `None` when it may go on.
    pub(crate) fn refused_early(
        &self,
        rpc: &'static str,
        headers: &http::HeaderMap,
        started: Instant,
    ) -> Option<Status> {
        checked_headers(&self.app, headers, true)
            .err()
            .map(|e| self.refuse(rpc, headers, status_of(&e), started))
    }

    /// A call to `rpc` (one that needs a token) that arrived at `started`, refused before its
    /// message was decoded, answered and recorded as the others are (what `Rpc::begin` finds
    /// wrong, such as its token, first).
    pub(crate) fn refuse(
        &self,
        rpc: &'static str,
        headers: &http::HeaderMap,
        status: Status,
        started: Instant,
    ) -> Status {
        let (rpc, checked) = Rpc::begin_at(&self.app, rpc, headers, true, started);
        let status = checked.err().map_or(status, |e| status_of(&e));
        rpc.finish::<()>(Err(status))
            .expect_err("an error is answered as one")
    }

    /// `ModelInfer` for a message decoded by tonic or by the fast path (`fast.rs`), the call
    /// having arrived at `started`; `converted` is its inputs' tensors when they were
    /// converted already (off the async workers, `fast.rs`).
    pub(crate) async fn model_infer_with(
        &self,
        headers: &http::HeaderMap,
        req: ModelInferRequest,
        converted: Option<Converted>,
        started: Instant,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (mut rpc, checked) = Rpc::begin_at(&self.app, "ModelInfer", headers, true, started);
        rpc.model = req.model_name.clone();
        // With traces: the call's request span (the REST one's fields), child of the caller's
        // `traceparent`, named in the answer's. Without, no span.
        let span = if call::traces_on() {
            let id = rpc.call.request_id.clone().unwrap_or_default();
            let span = tracing::info_span!("request", request_id = %id, rpc = "ModelInfer",
                model = tracing::field::Empty, version = tracing::field::Empty,
                status = tracing::field::Empty);
            trace_context::adopt_parent(&span, |name| {
                headers.get(name).and_then(|v| v.to_str().ok())
            });
            span
        } else {
            tracing::Span::none()
        };
        let answer = match checked {
            Ok(()) => {
                use tracing::Instrument;
                self.infer(&mut rpc, req, converted)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        if span.is_none() {
            return rpc.end(answer);
        }
        let code = answer
            .as_ref()
            .map_or_else(|e| status_of(e).code(), |_| Code::Ok);
        span.record("status", label(code));
        let traceparent = trace_context::traceparent_of(&span)
            .and_then(|v| MetadataValue::try_from(v.as_str()).ok());
        // The access line inside the span, so that the JSON log names the call's trace.
        let mut ended = span.in_scope(|| rpc.end(answer));
        if let Some(v) = traceparent {
            match &mut ended {
                Ok(r) => r.metadata_mut().insert(trace_context::TRACEPARENT, v),
                Err(s) => s.metadata_mut().insert(trace_context::TRACEPARENT, v),
            };
        }
        ended
    }

    async fn infer(
        &self,
        rpc: &mut Rpc<'_>,
        mut req: ModelInferRequest,
        converted: Option<Converted>,
    ) -> Result<ModelInferResponse, CallError> {
        let app = &self.app;
        let m = app.lookup(&req.model_name, version(&req.model_version))?;
        if let Some(p) = req.parameters.get("timeout") {
            let asked = Duration::from_micros(whole(p, "timeout")?);
            rpc.call.timeout = Some(rpc.call.timeout.map_or(asked, |t| t.min(asked)));
        }
        let inputs = match converted {
            Some(converted) => converted?,
            None => tracing::debug_span!("decode").in_scope(|| convert(&mut req))?,
        };
        // The requested outputs are resolved before running, so a typo costs no inference.
        let info = m.info();
        let selected: Vec<usize> = if req.outputs.is_empty() {
            (0..info.outputs.len()).collect()
        } else {
            req.outputs
                .iter()
                .map(|o| {
                    info.output_index(&o.name)
                        .map_err(|e| CallError::InvalidInput(e.to_string()))
                })
                .collect::<Result<_, _>>()?
        };
        let outputs = m.infer(inputs, &rpc.call).await?;
        Ok(ModelInferResponse {
            model_name: m.name().to_string(),
            model_version: m.version().to_string(),
            id: req.id,
            parameters: Default::default(),
            outputs: selected
                .iter()
                .map(|&i| InferOutputTensor {
                    name: info.outputs[i].name.clone(),
                    datatype: outputs[i].dtype.v2_name().to_string(),
                    shape: tensors::dims(&outputs[i]),
                    parameters: Default::default(),
                    contents: None,
                })
                .collect(),
            raw_output_contents: selected.iter().map(|&i| outputs[i].data.clone()).collect(),
        })
    }
}

/// A model version's statistics (`compute_input` and `compute_output`: see
/// [`ortserve_core::stats::Snapshot`]).
fn statistics(m: &ortserve_core::app::Model) -> ModelStatistics {
    let s = m.stats().snapshot();
    let d = |(count, ns): (u64, u64)| Some(StatisticDuration { count, ns });
    ModelStatistics {
        name: m.name().to_string(),
        version: m.version().to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: d(s.success),
            fail: d(s.fail),
            queue: d(s.queue),
            compute_input: d((s.compute_infer.0, 0)),
            compute_infer: d(s.compute_infer),
            compute_output: d((s.compute_infer.0, 0)),
            cache_hit: d((0, 0)),
            cache_miss: d((0, 0)),
        }),
        batch_stats: s
            .batches
            .into_iter()
            .map(|(size, runs, ns)| InferBatchStatistics {
                batch_size: size as u64,
                compute_input: d((runs, 0)),
                compute_infer: d((runs, ns)),
                compute_output: d((runs, 0)),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let (mut rpc, checked) = Rpc::begin(
            &self.app,
            "ModelStatistics",
            request.metadata().as_ref(),
            true,
        );
        let req = request.into_inner();
        rpc.model = req.name.clone();
        let answer = checked.and_then(|()| {
            let app = &self.app;
            let models = match (req.name.as_str(), version(&req.version)) {
                ("", _) => app.models(),
                (name, Some(v)) => vec![app.lookup(name, Some(v))?],
                (name, None) => app.served_versions(name)?,
            };
            Ok(ModelStatisticsResponse {
                model_stats: models.iter().map(|m| statistics(m)).collect(),
            })
        });
        rpc.end(answer)
    }

    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        let (rpc, checked) =
            Rpc::begin(&self.app, "ServerLive", request.metadata().as_ref(), false);
        rpc.end(checked.map(|()| ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let (rpc, checked) =
            Rpc::begin(&self.app, "ServerReady", request.metadata().as_ref(), false);
        let ready = self.app.is_ready();
        rpc.end(checked.map(|()| ServerReadyResponse { ready }))
    }

    /// Ready when the model (at the version, else its highest) is served with a healthy
    /// device; a model that is not served, or still loading, is not ready (no error, as
    /// clients ask this to poll).
    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let (mut rpc, checked) =
            Rpc::begin(&self.app, "ModelReady", request.metadata().as_ref(), false);
        let req = request.into_inner();
        rpc.model = req.name.clone();
        let ready = self
            .app
            .lookup(&req.name, version(&req.version))
            .is_ok_and(|m| m.is_ready());
        rpc.end(checked.map(|()| ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let (rpc, checked) = Rpc::begin(
            &self.app,
            "ServerMetadata",
            request.metadata().as_ref(),
            false,
        );
        rpc.end(checked.map(|()| ServerMetadataResponse {
            name: "ortserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_repository".into(), "statistics".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let (mut rpc, checked) = Rpc::begin(
            &self.app,
            "ModelMetadata",
            request.metadata().as_ref(),
            true,
        );
        let req = request.into_inner();
        rpc.model = req.name.clone();
        let answer = checked.and_then(|()| {
            let m = self.app.lookup(&req.name, version(&req.version))?;
            Ok(ModelMetadataResponse {
                name: m.name().to_string(),
                versions: self.app.registry().versions(m.name()),
                platform: "onnxruntime_onnx".into(),
                inputs: m.info().inputs.iter().map(described).collect(),
                outputs: m.info().outputs.iter().map(described).collect(),
            })
        });
        rpc.end(answer)
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.model_infer_with(metadata.as_ref(), req, None, Instant::now())
            .await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let (rpc, checked) = Rpc::begin(
            &self.app,
            "RepositoryIndex",
            request.metadata().as_ref(),
            true,
        );
        let ready = request.into_inner().ready;
        rpc.end(checked.map(|()| {
            RepositoryIndexResponse {
                models: lifecycle::index(&self.app, ready)
                    .into_iter()
                    .map(|e| ModelIndex {
                        name: e.name,
                        version: e.version,
                        state: e.state.as_str().to_string(),
                        reason: e.reason,
                    })
                    .collect(),
            }
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let (mut rpc, checked) = Rpc::begin_at(
            &self.app,
            "RepositoryModelLoad",
            request.metadata().as_ref(),
            true,
            arrived(request.extensions()),
        );
        let name = request.into_inner().model_name;
        rpc.model = name.clone();
        let answer = match checked {
            Ok(()) => lifecycle::load(&self.app, &name).await,
            Err(e) => Err(e),
        };
        rpc.end(answer.map(|()| RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let (mut rpc, checked) = Rpc::begin_at(
            &self.app,
            "RepositoryModelUnload",
            request.metadata().as_ref(),
            true,
            arrived(request.extensions()),
        );
        let name = request.into_inner().model_name;
        rpc.model = name.clone();
        let answer = match checked {
            Ok(()) => lifecycle::unload(&self.app, &name).await,
            Err(e) => Err(e),
        };
        rpc.end(answer.map(|()| RepositoryModelUnloadResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    #[test]
    fn grpc_timeouts_in_every_unit_and_bad_ones_refused() {
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            timeout_header(m.as_ref())
        };
        assert_eq!(with("2S").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(with("1500m").unwrap(), Some(Duration::from_millis(1500)));
        assert_eq!(with("7u").unwrap(), Some(Duration::from_micros(7)));
        assert_eq!(with("3M").unwrap(), Some(Duration::from_secs(180)));
        assert_eq!(with("1H").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(with("99n").unwrap(), Some(Duration::from_nanos(99)));
        for bad in ["", "S", "123456789S", "5x", "-1S", "1.5S", "+5S", " 5S"] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
        assert_eq!(timeout_header(MetadataMap::new().as_ref()).unwrap(), None);
    }

    #[test]
    fn request_ids_are_kept_when_usable_and_made_otherwise() {
        let app = AppState::loading(
            std::sync::Arc::new(ortserve_core::metrics::Metrics::new()),
            &ortserve_core::config::ServerConfig::default(),
            1,
            Vec::new(),
        );
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert(REQUEST_ID, v.parse().unwrap());
            request_id(&app, m.as_ref())
        };
        assert_eq!(with("abc-123"), "abc-123");
        let made = with("has space");
        assert_ne!(made, "has space");
        assert_eq!(made.len(), 36);
        assert_eq!(with(&"x".repeat(129)).len(), 36);
    }
}
