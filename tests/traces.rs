//! Traces end to end: a server with `telemetry.endpoint` pointing at an OTLP receiver on
//! loopback (tests/common/otlp.rs), real ONNX Runtime sessions. One test: the exporter and the
//! log subscriber are the process's.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::config::LogFormat;
use ortserve::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ortserve::tensor::Tensor;
use otlp::{attr, hex, until};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn infer_request(traceparent: Option<&str>, id: &str) -> Request<Body> {
    let body = v2_json(
        &[(
            "input",
            &Tensor::from_f32(vec![1, 4], &[0.1, 0.2, 0.3, 0.4]).unwrap(),
        )],
        false,
    );
    let mut r = Request::post("/v2/models/mlp/infer")
        .header("content-type", "application/json")
        .header("x-request-id", id);
    if let Some(tp) = traceparent {
        r = r.header("traceparent", tp);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_traced_with_their_callers_parent_and_linked_from_their_batch() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (received, _stop, _task) = otlp::receiver(listener).await;
    let config = config(&format!(
        "telemetry: {{endpoint: 'http://127.0.0.1:{port}', service_name: traced}}
models:
  - {{name: mlp, path: mlp.onnx, devices: cpu, batching: {{max_batch_size: 8, max_queue_delay: 50ms}}}}"
    ));
    let telemetry = ortserve::telemetry::init(LogFormat::Json, "warn", &config.telemetry)
        .unwrap()
        .expect("traces on");
    let (_served, router) = start_config(&config).await;

    // 0. Probes and scrapes are not traced, whatever they carry (checked once the spans of
    // the requests after them have arrived: spans are exported in the order they end).
    let probe_trace = "4bf92f3577b34da6a3ce929d0e0e4799";
    for path in ["/v2/health/live", "/v2/health/ready", "/metrics"] {
        let probe = Request::get(path)
            .header("traceparent", format!("00-{probe_trace}-{CALLER}-01"))
            .body(Body::empty())
            .unwrap();
        let reply = send(&router, probe).await;
        reply.assert_status(200);
        assert!(reply.headers.get("traceparent").is_none(), "{path}");
    }

    // 1. The caller's traceparent: the request span is its child, the answer names the span.
    let reply = send(
        &router,
        infer_request(Some(&format!("00-{TRACE}-{CALLER}-01")), "traced-1"),
    )
    .await;
    reply.assert_status(200);
    let answered = reply.headers["traceparent"].to_str().unwrap().to_string();
    let parts: Vec<&str> = answered.split('-').collect();
    assert_eq!(parts.len(), 4, "{answered}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", TRACE, "01"),
        "{answered}"
    );
    let request_span = parts[2].to_string();
    assert_ne!(request_span, CALLER);
    telemetry.flush();
    let spans = until(&received, "the request's spans", |spans| {
        spans.iter().any(|s| hex(&s.span_id) == request_span)
            && spans.iter().any(|s| s.name == "batch")
            && spans.iter().any(|s| s.name == "encode")
    })
    .await;
    let request = spans
        .iter()
        .find(|s| hex(&s.span_id) == request_span)
        .unwrap();
    assert_eq!(request.name, "request");
    assert_eq!(hex(&request.trace_id), TRACE);
    assert!(
        !spans.iter().any(|s| hex(&s.trace_id) == probe_trace),
        "a probe was traced"
    );
    assert_eq!(
        hex(&request.parent_span_id),
        CALLER,
        "the caller's span is the parent"
    );
    assert_eq!(attr(request, "model").as_deref(), Some("mlp"));
    assert_eq!(attr(request, "version").as_deref(), Some("1"));
    assert_eq!(attr(request, "status").as_deref(), Some("200"));
    assert_eq!(
        attr(request, "route").as_deref(),
        Some("/v2/models/{model}/infer")
    );
    for child in ["body_read", "decode", "queue", "encode"] {
        let s = spans
            .iter()
            .find(|s| s.name == child && hex(&s.trace_id) == TRACE)
            .unwrap_or_else(|| panic!("no {child} span in the trace"));
        assert_eq!(
            hex(&s.parent_span_id),
            request_span,
            "{child}'s parent is the request span"
        );
    }
    // The batch is a trace of its own (it may carry several requests), linked to the request.
    let batch = spans
        .iter()
        .find(|s| {
            s.name == "batch"
                && s.links
                    .iter()
                    .any(|l| hex(&l.span_id) == request_span && hex(&l.trace_id) == TRACE)
        })
        .expect("a batch span linked to the request span");
    assert_eq!(attr(batch, "rows").as_deref(), Some("1"));
    assert_eq!(attr(batch, "request_ids").as_deref(), Some("traced-1"));
    assert!(attr(batch, "device").is_some());
    let run = spans
        .iter()
        .find(|s| s.name == "run" && s.parent_span_id == batch.span_id)
        .expect("the device run, a child of the batch");
    assert_eq!(run.trace_id, batch.trace_id);

    // 2. Without a traceparent the request starts a trace of its own (parent-based sampling
    // samples a root), and the answer names it.
    let reply = send(&router, infer_request(None, "root-1")).await;
    reply.assert_status(200);
    let answered = reply.headers["traceparent"].to_str().unwrap().to_string();
    assert!(
        !answered.contains(TRACE) && answered.ends_with("-01"),
        "{answered}"
    );
    // An unsampled caller is respected: the answer says so, and nothing is exported for it.
    let unsampled = "4bf92f3577b34da6a3ce929d0e0e4737";
    let reply = send(
        &router,
        infer_request(Some(&format!("00-{unsampled}-{CALLER}-00")), "unsampled-1"),
    )
    .await;
    reply.assert_status(200);
    let answered = reply.headers["traceparent"].to_str().unwrap().to_string();
    assert!(
        answered.starts_with(&format!("00-{unsampled}-")) && answered.ends_with("-00"),
        "{answered}"
    );

    // 3. Requests that shared a batch: each request span is linked from that one batch span.
    // The batcher may send the first of them alone to an idle device, and on two busy cores
    // four at once all ran alone in 20 rounds (once in six runs, and in a CI run), so a round
    // sends sixteen (two batches' worth), and there are a few rounds.
    let mut shared = None;
    for round in 0..20 {
        let ids: Vec<String> = (0..16).map(|i| format!("shared-{round}-{i}")).collect();
        let replies = futures_util::future::join_all(
            ids.iter().map(|id| send(&router, infer_request(None, id))),
        )
        .await;
        let mut request_spans = std::collections::BTreeMap::new();
        for (id, r) in ids.iter().zip(&replies) {
            r.assert_status(200);
            let tp = r.headers["traceparent"].to_str().unwrap();
            let p: Vec<&str> = tp.split('-').collect();
            request_spans.insert(id.clone(), (p[1].to_string(), p[2].to_string()));
        }
        telemetry.flush();
        let spans = until(&received, "the round's batches", |spans| {
            let carried: usize = spans
                .iter()
                .filter(|s| s.name == "batch")
                .filter_map(|s| attr(s, "request_ids"))
                .filter(|ids| ids.contains(&format!("shared-{round}-")))
                .map(|ids| ids.split(',').count())
                .sum();
            carried == ids.len()
        })
        .await;
        let batch = spans.iter().find(|s| {
            s.name == "batch"
                && attr(s, "request_ids").is_some_and(|ids| {
                    ids.contains(&format!("shared-{round}-")) && ids.contains(',')
                })
        });
        if let Some(batch) = batch {
            shared = Some((batch.clone(), request_spans));
            break;
        }
    }
    let (batch, request_spans) = shared.expect("two requests shared a batch in 20 rounds");
    let carried: Vec<String> = attr(&batch, "request_ids")
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(attr(&batch, "rows"), Some(carried.len().to_string()));
    assert_eq!(attr(&batch, "parts"), Some(carried.len().to_string()));
    let linked: BTreeSet<(String, String)> = batch
        .links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect();
    let want: BTreeSet<(String, String)> =
        carried.iter().map(|id| request_spans[id].clone()).collect();
    assert_eq!(linked, want, "the batch links to every request it carried");
    assert!(want.len() >= 2);
    // Each of those request spans was exported, with its own trace.
    let spans = received.spans();
    for (trace, span) in &want {
        assert!(
            spans.iter().any(|s| s.name == "request"
                && hex(&s.trace_id) == *trace
                && hex(&s.span_id) == *span),
            "request span {span} exported"
        );
    }
    assert!(
        !spans.iter().any(|s| hex(&s.trace_id) == unsampled),
        "nothing of the unsampled trace is exported"
    );

    // 4. gRPC: the same `traceparent` in the call's metadata, the answer's metadata naming the
    // call's request span.
    let grpc = ortserve::http::bind("127.0.0.1:0", 64).await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let (_stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let server_config = config.server.clone();
    let state = _served.arc();
    tokio::spawn(async move {
        ortserve::grpc::serve(state, &server_config, grpc, async {
            let _ = grpc_stopped.await;
        })
        .await
    });
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut call = tonic::Request::new(ortserve::grpc::raw_request(
        "mlp",
        &[(
            "input",
            &Tensor::from_f32(vec![1, 4], &[0.1, 0.2, 0.3, 0.4]).unwrap(),
        )],
    ));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let answer = client.model_infer(call).await.expect("the call succeeds");
    let answered = answer
        .metadata()
        .get("traceparent")
        .expect("a traceparent in the answer")
        .to_str()
        .unwrap()
        .to_string();
    let p: Vec<&str> = answered.split('-').collect();
    assert_eq!((p[0], p[1], p[3]), ("00", grpc_trace, "01"), "{answered}");
    let grpc_span = p[2].to_string();
    telemetry.flush();
    let spans = until(&received, "the gRPC call's spans", |spans| {
        spans.iter().any(|s| hex(&s.span_id) == grpc_span)
            && spans
                .iter()
                .any(|s| s.name == "batch" && s.links.iter().any(|l| hex(&l.span_id) == grpc_span))
    })
    .await;
    let request = spans.iter().find(|s| hex(&s.span_id) == grpc_span).unwrap();
    assert_eq!(request.name, "request");
    assert_eq!(hex(&request.trace_id), grpc_trace);
    assert_eq!(hex(&request.parent_span_id), "b7ad6b7169203331");
    assert_eq!(attr(request, "rpc").as_deref(), Some("ModelInfer"));
    assert_eq!(attr(request, "model").as_deref(), Some("mlp"));
    assert_eq!(attr(request, "status").as_deref(), Some("OK"));
    for child in ["decode", "queue"] {
        assert!(
            spans
                .iter()
                .any(|s| s.name == child && hex(&s.parent_span_id) == grpc_span),
            "the gRPC call's {child} span"
        );
    }
    telemetry.shutdown();
}
