//! `server.access_log`: one info line per answered request (issue 26, defect 4: request logs
//! appeared only at debug level), off by default.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use common::*;

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
}
