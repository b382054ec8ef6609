//! `server.access_log`: one info line per answered request (issue 26, defect 4: request logs
//! appeared only at debug level), off by default.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ortserve::grpc::proto::inference::ModelMetadataRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_at_info_when_asked() {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Capture(buffer.clone());
    // The server's default level.
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();
    let model =
        "models: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 4}}]";
    for (on, id) in [(true, "logged-1"), (false, "unlogged-2")] {
        let (_s, router) =
            start_config(&config(&format!("server: {{access_log: {on}}}\n{model}"))).await;
        let req = Request::get("/v2/models/mlp")
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, req).await.status, 200);
        let req = Request::get("/v2/models/nope")
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, req).await.status, 404);
    }
    let log = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ortserve::access"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, path, status) in [
        (lines[0], "/v2/models/mlp", "200"),
        (lines[1], "/v2/models/nope", "404"),
    ] {
        assert!(
            line.contains(" INFO ")
                && line.contains("method=GET")
                && line.contains(&format!("path={path}"))
                && line.contains(&format!("status={status}"))
                && line.contains("request_id=\"logged-1\"")
                && line.contains("ms="),
            "{line}"
        );
    }
    assert!(
        !log.contains("unlogged-2"),
        "access_log: false logs nothing: {log}"
    );

    // gRPC's line names the model a call asked for: a configured name as it is, a client's
    // other text escaped and cut short, so that a name with a line break forges no line and a
    // long one writes no long line (a review wrote a 15 MB line with one call).
    let cfg = config(&format!("server: {{access_log: true}}\n{model}"));
    let (s, _router) = start_config(&cfg).await;
    let listener = ortserve::http::bind("127.0.0.1:0", 64).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = cfg.server.clone();
    let task = tokio::spawn(async move {
        ortserve::grpc::serve(s.arc(), &server, listener, std::future::pending()).await
    });
    let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let forged = format!(
        "x\n2026-01-01T00:00:00Z  INFO ortserve::access: forged{}",
        "y".repeat(5000)
    );
    for name in ["mlp", forged.as_str()] {
        let _ = c
            .model_metadata(ModelMetadataRequest {
                name: name.into(),
                version: String::new(),
            })
            .await;
    }
    task.abort();
    let log = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let grpc: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ortserve::access") && l.contains("rpc=\"ModelMetadata\""))
        .collect();
    assert_eq!(grpc.len(), 2, "{log}");
    assert!(
        grpc[0].contains("model=mlp ") && grpc[0].contains("status=\"OK\""),
        "{}",
        grpc[0]
    );
    assert!(
        grpc[1].contains("model=\"x\\n2026") && grpc[1].contains("status=\"NOT_FOUND\""),
        "{}",
        grpc[1]
    );
    assert!(grpc[1].len() < 400, "{} bytes", grpc[1].len());
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01")),
        "a forged line: {log}"
    );
}
