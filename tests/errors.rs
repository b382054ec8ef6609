//! Every row of the status table, produced through HTTP. Real sessions where a real model can
//! produce the error; a gated fake runner where the error needs a device held busy or failing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::json;

/// Every (status, error_type) the server documents.
const TABLE: [(u16, &str); 13] = [
    (400, "malformed_body"),
    (400, "invalid_input"),
    (401, "unauthorized"),
    (404, "not_found"),
    (404, "model_not_found"),
    (405, "method_not_allowed"),
    (408, "request_timeout"),
    (413, "payload_too_large"),
    (415, "unsupported_media_type"),
    (429, "queue_full"),
    (500, "internal"),
    (503, "unavailable"),
    (504, "deadline_exceeded"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_table_row_through_http() {
    let (_s, router) = start(
        "server: {max_body_bytes: 2KiB, body_timeout: 300ms}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu}
  - {name: int64_gather, path: int64_gather.onnx, devices: cpu}",
    )
    .await;
    let mlp = "/v2/models/mlp/infer";
    let x = |shape: serde_json::Value, dt: &str, data: serde_json::Value| json!({"inputs": [{"name": "input", "shape": shape, "datatype": dt, "data": data}]});
    let mut seen: Vec<(String, u16, String, String)> = Vec::new();
    let mut check = |case: &str, reply: Reply, status: u16, kind: &str, needle: &str| {
        let v = reply.json();
        assert_eq!(reply.status.as_u16(), status, "{case}: {v}");
        assert_eq!(v["error_type"], kind, "{case}: {v}");
        let msg = v["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains(needle),
            "{case}: message {msg:?} should mention {needle:?}"
        );
        seen.push((case.to_string(), status, kind.to_string(), msg));
    };

    // 400: the body is not a request.
    let raw = |body: &'static str| Request::post(mlp).body(Body::from(body)).unwrap();
    check(
        "malformed JSON",
        send(&router, raw("{\"inputs\": [")).await,
        400,
        "malformed_body",
        "JSON",
    );
    check(
        "not a V2 request",
        send(&router, raw("{\"instances\": [1]}")).await,
        400,
        "malformed_body",
        "inputs",
    );
    check(
        "input without data",
        post_json(
            &router,
            mlp,
            &json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}),
        )
        .await,
        400,
        "malformed_body",
        "neither",
    );
    // 400: well-formed but does not fit the model.
    let ok_data = json!([1, 2, 3, 4]);
    check(
        "wrong input name",
        post_json(&router, mlp, &json!({"inputs": [{"name": "image", "shape": [1, 4], "datatype": "FP32", "data": ok_data}]})).await,
        400,
        "invalid_input",
        "\"image\"",
    );
    check(
        "wrong shape",
        post_json(
            &router,
            mlp,
            &x(json!([1, 5]), "FP32", json!([1, 2, 3, 4, 5])),
        )
        .await,
        400,
        "invalid_input",
        "[-1, 4]",
    );
    check(
        "wrong dtype",
        post_json(&router, mlp, &x(json!([1, 4]), "INT32", ok_data.clone())).await,
        400,
        "invalid_input",
        "expected datatype FP32, got INT32",
    );
    check(
        "element count",
        post_json(&router, mlp, &x(json!([2, 4]), "FP32", ok_data.clone())).await,
        400,
        "invalid_input",
        "needs 8 elements, data has 4",
    );
    check(
        "unknown datatype",
        post_json(&router, mlp, &x(json!([1, 4]), "BYTES", ok_data.clone())).await,
        400,
        "invalid_input",
        "BYTES",
    );
    check(
        "negative dim",
        post_json(&router, mlp, &x(json!([-1, 4]), "FP32", ok_data.clone())).await,
        400,
        "invalid_input",
        "negative",
    );
    let mut unknown_out = x(json!([1, 4]), "FP32", ok_data.clone());
    unknown_out["outputs"] = json!([{"name": "probabilities"}]);
    check(
        "unknown output",
        post_json(&router, mlp, &unknown_out).await,
        400,
        "invalid_input",
        "probabilities",
    );
    let bad_index =
        json!({"inputs": [{"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [1, 99]}]});
    check(
        "ONNX Runtime rejects the values",
        post_json(&router, "/v2/models/int64_gather/infer", &bad_index).await,
        400,
        "invalid_input",
        "idx=99",
    );
    // 404
    check(
        "unknown model",
        post_json(&router, "/v2/models/resnet/infer", &one(1.0)).await,
        404,
        "model_not_found",
        "resnet",
    );
    check(
        "unknown version",
        post_json(&router, "/v2/models/mlp/versions/9/infer", &one(1.0)).await,
        404,
        "model_not_found",
        "\"9\"",
    );
    check(
        "unknown route",
        get(&router, "/v3/whatever").await,
        404,
        "not_found",
        "/v3/whatever",
    );
    // 405: a known route, another method; the Allow header stays.
    let wrong_method = get(&router, mlp).await;
    assert_eq!(wrong_method.headers["allow"], "POST");
    check(
        "wrong method",
        wrong_method,
        405,
        "method_not_allowed",
        "Allow",
    );
    // 408: a body that stops arriving.
    let stalled = Body::from_stream(futures_util::stream::unfold(0, |n| async move {
        if n == 0 {
            Some((
                Ok::<_, std::io::Error>(axum::body::Bytes::from("{\"inputs\": [")),
                1,
            ))
        } else {
            std::future::pending().await
        }
    }));
    let t = std::time::Instant::now();
    check(
        "body too slow",
        send(&router, Request::post(mlp).body(stalled).unwrap()).await,
        408,
        "request_timeout",
        "did not arrive within 300 ms",
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // 413, with and without a Content-Length that tells in advance.
    let big = "x".repeat(4096);
    let with_len = Request::post(mlp)
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    check(
        "oversize body (Content-Length)",
        send(&router, with_len).await,
        413,
        "payload_too_large",
        "2048",
    );
    let stream =
        Body::from_stream(futures_util::stream::iter((0..4).map(|_| {
            Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 1024]))
        })));
    check(
        "oversize body (streamed)",
        send(&router, Request::post(mlp).body(stream).unwrap()).await,
        413,
        "payload_too_large",
        "2048",
    );
    // The binary extension reads its body frame by frame: the same limit, a header that claims
    // more than the body holds, and a header split across frames.
    let frames = |sizes: Vec<Vec<u8>>| {
        Body::from_stream(futures_util::stream::iter(
            sizes
                .into_iter()
                .map(|b| Ok::<_, std::io::Error>(axum::body::Bytes::from(b))),
        ))
    };
    let binary = |header_len: usize, body: Body| {
        Request::post(mlp)
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", header_len)
            .body(body)
            .unwrap()
    };
    check(
        "oversize binary body (streamed)",
        send(&router, binary(10, frames(vec![vec![b' '; 1024]; 4]))).await,
        413,
        "payload_too_large",
        "2048",
    );
    check(
        "binary header longer than the body",
        send(&router, binary(100, frames(vec![b"{}".to_vec()]))).await,
        400,
        "malformed_body",
        "Inference-Header-Content-Length is 100 but the body has only 2 bytes",
    );
    let header = br#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#;
    let tensor: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let (a, b) = header.split_at(7);
    let mut tail = b.to_vec();
    tail.extend_from_slice(&tensor[..5]);
    let split = binary(
        header.len(),
        frames(vec![a.to_vec(), tail, tensor[5..].to_vec()]),
    );
    let reply = send(&router, split).await;
    reply.assert_status(200);
    let same = post_json(
        &router,
        mlp,
        &x(json!([1, 4]), "FP32", json!([1.0, 2.0, 3.0, 4.0])),
    )
    .await;
    assert_eq!(same.status, 200);
    assert_eq!(
        reply.json()["outputs"][0]["data"],
        same.json()["outputs"][0]["data"],
        "a body split across frames reads as the whole"
    );
    // 415
    let png = Request::post(mlp)
        .header("content-type", "image/png")
        .body(Body::from("\u{89}PNG"))
        .unwrap();
    check(
        "image to a tensor route",
        send(&router, png).await,
        415,
        "unsupported_media_type",
        "image/png",
    );

    // 429, 504, 500 and 503 need a device held busy or failing.
    let (state, gated, open) = gated_server(3);
    let uri = "/v2/models/gated/infer";
    let held: Vec<_> = (0..3)
        .map(|i| {
            let r = gated.clone();
            tokio::spawn(async move { post_json(&r, uri, &one(i as f32)).await })
        })
        .collect();
    // Wait until all three are admitted: one running, one in the device's channel, one queued.
    for _ in 0..200 {
        if state.devices()[0].inflight_rows == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let full = post_json(&gated, uri, &one(3.0)).await;
    assert_eq!(full.headers["retry-after"], "1");
    check("queue full", full, 429, "queue_full", "queue capacity");
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }

    let busy = tokio::spawn({
        let r = gated.clone();
        async move { post_json(&r, uri, &one(4.0)).await }
    });
    for _ in 0..200 {
        if state.devices()[0].inflight_rows == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut hurry = one(5.0);
    hurry["parameters"] = json!({"timeout": 20_000});
    // The device takes a second job into its channel at once; a third waits in the queue.
    let queued = tokio::spawn({
        let r = gated.clone();
        async move { post_json(&r, uri, &one(6.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    check(
        "deadline passed in the queue",
        post_json(&gated, uri, &hurry).await,
        504,
        "deadline_exceeded",
        "deadline",
    );
    open.send(()).unwrap();
    open.send(()).unwrap();
    assert_eq!(busy.await.unwrap().status, StatusCode::OK);
    assert_eq!(queued.await.unwrap().status, StatusCode::OK);
    // Five requests ran (three held, these two); the expired one never reached the device.
    let ran = state.devices()[0].rows_run;
    assert_eq!(ran, 5, "the expired request must not run");

    drop(open); // From here every batch runs at once.
    let failed = post_json(&gated, uri, &one(-1.0)).await;
    let request_id = failed.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(!request_id.is_empty());
    let body = String::from_utf8_lossy(&failed.body).to_string();
    check("model run failed", failed, 500, "internal", "x-request-id");
    assert!(
        !body.contains("deadbeef"),
        "details stay in the log: {body}"
    );

    state.set_healthy(0, false);
    check(
        "no healthy device",
        post_json(&gated, uri, &one(1.0)).await,
        503,
        "unavailable",
        "no healthy device",
    );
    assert_eq!(
        get(&gated, "/v2/health/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&gated, "/v2/models/gated/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    state.set_healthy(0, true);
    assert_eq!(
        post_json(&gated, uri, &one(1.0)).await.status,
        StatusCode::OK
    );
    state.shutdown().await;
    check(
        "model shut down",
        post_json(&gated, uri, &one(1.0)).await,
        503,
        "unavailable",
        "shutting down",
    );

    // 401: a server with auth on.
    let (_a, secured) = secured_server().await;
    check(
        "no token",
        post_json(&secured, mlp_uri(), &one_mlp()).await,
        401,
        "unauthorized",
        "Bearer",
    );

    let covered: BTreeSet<(u16, String)> =
        seen.iter().map(|(_, s, k, _)| (*s, k.clone())).collect();
    let table: BTreeSet<(u16, String)> = TABLE.iter().map(|(s, k)| (*s, k.to_string())).collect();
    assert_eq!(
        covered, table,
        "every status table row is produced through HTTP"
    );
}

const TOKEN: &str = "test-token-0123456789";

fn mlp_uri() -> &'static str {
    "/v2/models/mlp/infer"
}

fn one_mlp() -> serde_json::Value {
    json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
}

async fn secured_server() -> (Served, axum::Router) {
    let mut c = config(
        "server: {auth: {tokens_env: ORTSERVE_TEST_TOKENS}}\nmodels: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}]",
    );
    c.load_tokens(|k| {
        (k == "ORTSERVE_TEST_TOKENS").then(|| format!("another-token-abcdefgh, {TOKEN}"))
    })
    .unwrap();
    start_config(&c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_guards_model_routes_and_leaves_probes_open() {
    let (_s, router) = secured_server().await;
    let with = |token: Option<&str>, uri: &str, body: Option<serde_json::Value>| {
        let mut b = match body {
            Some(_) => Request::post(uri),
            None => Request::get(uri),
        };
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::from(body.map(|v| v.to_string()).unwrap_or_default()))
            .unwrap()
    };
    for (token, status) in [
        (None, 401),
        (Some("wrong-token-0123456789"), 401),
        (Some(&TOKEN[..TOKEN.len() - 1]), 401),
        (Some(TOKEN), 200),
    ] {
        let r = send(&router, with(token, mlp_uri(), Some(one_mlp()))).await;
        assert_eq!(r.status.as_u16(), status, "token {token:?}");
        if status == 401 {
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
        assert_eq!(
            send(&router, with(token, "/v2/models/mlp", None))
                .await
                .status
                .as_u16(),
            status,
            "metadata, token {token:?}"
        );
    }
    assert_eq!(
        send(
            &router,
            with(Some("another-token-abcdefgh"), "/v2/models/mlp", None)
        )
        .await
        .status,
        StatusCode::OK
    );
    for open in [
        "/v2/health/live",
        "/v2/health/ready",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2",
        // Issue 26, defect 4: per-model readiness is a probe too (it asked for a token).
        "/v2/models/mlp/ready",
        "/v2/models/mlp/versions/1/ready",
    ] {
        assert_eq!(
            get(&router, open).await.status,
            StatusCode::OK,
            "{open} stays open"
        );
    }
}

#[test]
fn auth_without_tokens_or_with_short_ones_is_a_config_error() {
    let yaml = "server: {auth: {tokens_env: T}}\nmodels: [{name: mlp, path: mlp.onnx}]";
    let mut c = ortserve::config::Config::from_yaml(yaml).unwrap();
    let e = c.load_tokens(|_| None).unwrap_err().to_string();
    assert!(
        e.contains("server.auth.tokens_env") && e.contains("T is not set"),
        "{e}"
    );
    let e = c
        .load_tokens(|_| Some("short".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 16 characters"), "{e}");
    let e = c
        .load_tokens(|_| Some(" , ".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no token"), "{e}");
}
