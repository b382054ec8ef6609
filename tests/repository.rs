//! The V2 repository extension with real ONNX Runtime sessions: the index, unload and load, a
//! reload under continuous load that no client notices, a failed load that leaves the served
//! model alone, concurrent calls, and `model_control: none` refusing them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::tensor::Tensor;
use serde_json::{json, Value};

const EXPLICIT: &str = "
server: {model_control: explicit}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}";

use common::post_empty as post;
use common::repository_index as index;

fn x() -> Tensor {
    Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap()
}

async fn infer_status(router: &axum::Router, model: &str) -> u16 {
    post_json(
        router,
        &format!("/v2/models/{model}/infer"),
        &v2_json(&[("input", &x())], false),
    )
    .await
    .status
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_then_load_through_the_repository_api() {
    let (served, router) = start(EXPLICIT).await;
    assert_eq!(
        index(&router).await,
        json!([{"name": "mlp", "version": "1", "state": "READY", "reason": ""}])
    );
    let meta = get(&router, "/v2").await;
    assert!(String::from_utf8_lossy(&meta.body).contains("model_repository"));

    let unloaded = post(&router, "/v2/repository/models/mlp/unload").await;
    unloaded.assert_status(200);
    assert!(unloaded.body.is_empty());
    assert_eq!(
        index(&router).await,
        json!([{"name": "mlp", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}])
    );
    assert_eq!(index(&router).await.as_array().unwrap().len(), 1);
    let ready_only = send(
        &router,
        Request::post("/v2/repository/index")
            .body(Body::from(r#"{"ready": true}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&ready_only.body).unwrap(),
        json!([])
    );
    let text = served.render_metrics().await;
    let state = |s: &str| {
        metric(
            &text,
            "ortserve_model_state",
            &[("model", "mlp"), ("version", "1"), ("state", s)],
        )
    };
    assert_eq!((state("UNAVAILABLE"), state("READY")), (1.0, 0.0));
    let gone = post_json(
        &router,
        "/v2/models/mlp/infer",
        &v2_json(&[("input", &x())], false),
    )
    .await;
    gone.assert_status(404);
    assert!(String::from_utf8_lossy(&gone.body).contains("/v2/repository/models/mlp/load"));
    // Unloading again is not an error.
    post(&router, "/v2/repository/models/mlp/unload")
        .await
        .assert_status(200);

    post(&router, "/v2/repository/models/mlp/load")
        .await
        .assert_status(200);
    assert_eq!(index(&router).await[0]["state"], "READY");
    assert_eq!(infer_status(&router, "mlp").await, 200);

    // Names that are not configured are 404 (a name is looked up among the configured ones,
    // never used as a path); a malformed index request is 400.
    for name in [
        "nope",
        "..%2F..%2Fetc%2Fpasswd",
        "mlp%2F..",
        &"m".repeat(10_000),
    ] {
        for action in ["load", "unload"] {
            post(&router, &format!("/v2/repository/models/{name}/{action}"))
                .await
                .assert_status(404);
        }
    }
    let bad = send(
        &router,
        Request::post("/v2/repository/index")
            .body(Body::from("{"))
            .unwrap(),
    )
    .await;
    bad.assert_status(400);
    served.shutdown().await;
}

/// 16 clients, JSON and binary, send requests back to back while the model is reloaded three
/// times: every answer is 200, and the old sessions stop once the swap is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_continuous_load_loses_no_request() {
    let (served, router) = start(EXPLICIT).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..16 {
        let (router, stop, answered) = (router.clone(), stop.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            // The first few non-200 answers, and how many there were.
            let (mut bad, mut bad_count) = (Vec::new(), 0usize);
            while !stop.load(Ordering::Relaxed) {
                let reply = if c % 2 == 0 {
                    post_json(
                        &router,
                        "/v2/models/mlp/infer",
                        &v2_json(&[("input", &x())], false),
                    )
                    .await
                } else {
                    let (body, header_len) = v2_binary(&[("input", &x())]);
                    send(
                        &router,
                        Request::post("/v2/models/mlp/infer")
                            .header("inference-header-content-length", header_len)
                            .header("content-type", "application/octet-stream")
                            .body(Body::from(body))
                            .unwrap(),
                    )
                    .await
                };
                if reply.status != 200 {
                    bad_count += 1;
                    if bad.len() < 3 {
                        let text = String::from_utf8_lossy(&reply.body).into_owned();
                        bad.push((reply.status, text));
                    }
                    // Refused, a client waits a little (an error answer never yields to the
                    // scheduler, and 16 clients spinning on them would starve the reload).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            (bad_count, bad)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let before = answered.load(Ordering::Relaxed);
        tokio::time::timeout(
            Duration::from_secs(60),
            post(&router, "/v2/repository/models/mlp/load"),
        )
        .await
        .expect("a reload of the MLP takes well under a minute")
        .assert_status(200);
        assert!(
            answered.load(Ordering::Relaxed) > before,
            "requests were answered while the model reloaded"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut bad_count, mut bad) = (0, Vec::new());
    for c in clients {
        let (n, first) = c.await.unwrap();
        bad_count += n;
        bad.extend(first);
    }
    assert_eq!(bad_count, 0, "non-200 answers, the first: {bad:?}");
    let text = served.render_metrics().await;
    assert_eq!(
        metric(
            &text,
            "ortserve_model_loads_total",
            &[("model", "mlp"), ("result", "ok")]
        ),
        3.0
    );
    assert!(answered.load(Ordering::Relaxed) > 100);
    assert_eq!(
        served.models().len(),
        1,
        "one version served after the swaps"
    );
    served.shutdown().await;
}

/// A reload from a file that no longer parses fails with its reason and leaves the served
/// sessions serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_leaves_the_served_model_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mlp.onnx");
    std::fs::copy(fixtures().join("mlp.onnx"), &file).unwrap();
    let yaml = format!(
        "server: {{model_control: explicit}}\nmodels:\n  - {{name: mlp, path: {}, devices: cpu, batching: {{max_batch_size: 8}}}}",
        file.display()
    );
    let (served, router) = start(&yaml).await;
    // Half a file, as a copy that is still being written would leave it.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();

    let failed = post(&router, "/v2/repository/models/mlp/load").await;
    failed.assert_status(400);
    let text = String::from_utf8_lossy(&failed.body).into_owned();
    assert!(text.contains("load failed"), "{text}");
    let entry = &index(&router).await[0];
    assert_eq!(entry["state"], "READY", "{entry}");
    assert!(
        entry["reason"].as_str().unwrap().contains("load failed"),
        "{entry}"
    );
    assert_eq!(infer_status(&router, "mlp").await, 200);
    let text = served.render_metrics().await;
    let failed = [("model", "mlp"), ("result", "failed")];
    assert_eq!(metric(&text, "ortserve_model_loads_total", &failed), 1.0);

    // Fixed, it loads.
    std::fs::write(&file, &bytes).unwrap();
    post(&router, "/v2/repository/models/mlp/load")
        .await
        .assert_status(200);
    assert_eq!(index(&router).await[0]["reason"], "");
    served.shutdown().await;
}

/// Loads and unloads of one model at once take turns: each answers 200, and the end state is
/// the last one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_and_unloads_take_turns() {
    let (served, router) = start(EXPLICIT).await;
    let mut calls = Vec::new();
    for i in 0..6 {
        let router = router.clone();
        let action = if i % 3 == 2 { "unload" } else { "load" };
        calls.push(tokio::spawn(async move {
            post(&router, &format!("/v2/repository/models/mlp/{action}"))
                .await
                .status
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let state = index(&router).await[0]["state"].clone();
    let served_now = served.models().len();
    assert!(
        (state == "READY" && served_now == 1) || (state == "UNAVAILABLE" && served_now == 0),
        "index {state} with {served_now} served"
    );
    post(&router, "/v2/repository/models/mlp/load")
        .await
        .assert_status(200);
    assert_eq!(served.models().len(), 1);
    assert_eq!(infer_status(&router, "mlp").await, 200);
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_explicit_model_control_the_models_are_fixed() {
    let (served, router) = start(
        "models:\n  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    assert_eq!(index(&router).await[0]["state"], "READY");
    for action in ["load", "unload"] {
        let refused = post(&router, &format!("/v2/repository/models/mlp/{action}")).await;
        refused.assert_status(400);
        assert!(String::from_utf8_lossy(&refused.body).contains("model_control"));
    }
    assert_eq!(infer_status(&router, "mlp").await, 200);
    served.shutdown().await;
}

/// The first input's shape as the model's metadata gives it.
async fn input_shape(router: &axum::Router, model: &str) -> Value {
    let meta = get(router, &format!("/v2/models/{model}")).await;
    meta.assert_status(200);
    serde_json::from_slice::<Value>(&meta.body).unwrap()["inputs"][0]["shape"].clone()
}

/// A model file in a volume laid out as the kubelet lays out a ConfigMap or Secret: the file is
/// a link through `..data`, which points at a timestamped folder. The kubelet's update writes a
/// new folder, points a new link at it and renames the link over `..data`; with `poll`, the
/// server serves the new model without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_serves_the_new_model_after_a_kubelet_style_data_swap() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = d.join("..2026_12_05_10_00_00.111");
    std::fs::create_dir(&first).unwrap();
    std::fs::copy(fixtures().join("mlp.onnx"), first.join("model.onnx")).unwrap();
    symlink("..2026_12_05_10_00_00.111", d.join("..data")).unwrap();
    symlink("..data/model.onnx", d.join("model.onnx")).unwrap();
    let yaml = format!(
        "server: {{model_control: poll, poll_interval: 100ms}}\nmodels:\n  - {{name: m, path: {}, devices: cpu, batching: {{max_batch_size: 8}}}}",
        d.join("model.onnx").display()
    );
    let (served, router) = start(&yaml).await;
    assert_eq!(input_shape(&router, "m").await, json!([-1, 4]));
    // Polls of an unchanged file reload nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let text = served.render_metrics().await;
    let ok = [("model", "m"), ("result", "ok")];
    assert_eq!(metric(&text, "ortserve_model_loads_total", &ok), 0.0);

    // The kubelet's swap: a new folder, a new link to it, renamed over `..data`; then the old
    // folder goes.
    let second = d.join("..2026_12_05_10_05_00.222");
    std::fs::create_dir(&second).unwrap();
    std::fs::copy(fixtures().join("cnn.onnx"), second.join("model.onnx")).unwrap();
    symlink("..2026_12_05_10_05_00.222", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();

    eventually("the new model is served", async || {
        input_shape(&router, "m").await == json!([-1, 3, 64, 64])
    })
    .await;
    assert_eq!(
        index(&router).await,
        json!([{"name": "m", "version": "1", "state": "READY", "reason": ""}])
    );
    let text = served.render_metrics().await;
    assert_eq!(metric(&text, "ortserve_model_loads_total", &ok), 1.0);
    served.shutdown().await;
}

/// A model file rewritten in place and caught half-written fails to load; the served model
/// keeps serving, and once the file is whole it is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_keeps_serving_through_a_half_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.onnx");
    std::fs::copy(fixtures().join("mlp.onnx"), &file).unwrap();
    let yaml = format!(
        "server: {{model_control: poll, poll_interval: 100ms}}\nmodels:\n  - {{name: m, path: {}, devices: cpu, batching: {{max_batch_size: 8}}}}",
        file.display()
    );
    let (served, router) = start(&yaml).await;
    let cnn = std::fs::read(fixtures().join("cnn.onnx")).unwrap();
    std::fs::write(&file, &cnn[..cnn.len() / 2]).unwrap();
    eventually("the failed load shows in the index", async || {
        index(&router).await[0]["reason"]
            .as_str()
            .unwrap()
            .contains("load failed")
    })
    .await;
    assert_eq!(input_shape(&router, "m").await, json!([-1, 4]));
    let reply = post_json(
        &router,
        "/v2/models/m/infer",
        &v2_json(&[("input", &x())], false),
    )
    .await;
    reply.assert_status(200);

    std::fs::write(&file, &cnn).unwrap();
    eventually("the whole file is served", async || {
        input_shape(&router, "m").await == json!([-1, 3, 64, 64])
    })
    .await;
    assert_eq!(index(&router).await[0]["reason"], "");
    served.shutdown().await;
}

/// The tuning report's first device: (source, chosen).
async fn tuning_of(router: &axum::Router, model: &str) -> (String, u64) {
    let reply = get(router, &format!("/v1/models/{model}/tuning")).await;
    reply.assert_status(200);
    let v: Value = serde_json::from_slice(&reply.body).unwrap();
    let d = &v["devices"][0];
    (
        d["source"].as_str().unwrap().to_string(),
        d["chosen"].as_u64().unwrap(),
    )
}

/// A reload of a changed file while the model serves keeps the served version's batch size when
/// the inputs and outputs are the same (a probe would time a busy device); a model with other
/// inputs is probed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_the_served_batch_size_for_the_same_inputs_and_probes_other_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.onnx");
    std::fs::copy(fixtures().join("mlp.onnx"), &file).unwrap();
    let cache = dir.path().join("cache");
    let yaml = format!(
        "server: {{model_control: explicit}}\nmodels:\n  - {{name: m, path: {}, devices: cpu, tuning: {{max_batch_cap: 16, max_duration: 5s, cache_dir: {}}}}}",
        file.display(),
        cache.display()
    );
    let (served, router) = start(&yaml).await;
    let (source, chosen) = tuning_of(&router, "m").await;
    assert_eq!(source, "probe");

    // The same model with another doc_string (ModelProto field 6, appended: the last one
    // counts): another sha256, so the cache does not know it.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0x32, 3, b'v', b'2', b'!']);
    std::fs::write(&file, &bytes).unwrap();
    post(&router, "/v2/repository/models/m/load")
        .await
        .assert_status(200);
    assert_eq!(
        tuning_of(&router, "m").await,
        ("served".to_string(), chosen)
    );
    assert_eq!(infer_status(&router, "m").await, 200);

    // Other inputs: probed.
    std::fs::copy(fixtures().join("cnn.onnx"), &file).unwrap();
    post(&router, "/v2/repository/models/m/load")
        .await
        .assert_status(200);
    assert_eq!(tuning_of(&router, "m").await.0, "probe");
    served.shutdown().await;
}

/// A burst of load calls for one model is answered by at most a few loads, not one each: the
/// calls that wait while a load runs are answered together by the next one (each load reads
/// the files after every call it answers was made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_load_calls_costs_a_few_loads() {
    let (served, router) = start(EXPLICIT).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let router = router.clone();
        calls.push(tokio::spawn(async move {
            post(&router, "/v2/repository/models/mlp/load").await.status
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let text = served.render_metrics().await;
    let loads = metric(
        &text,
        "ortserve_model_loads_total",
        &[("model", "mlp"), ("result", "ok")],
    );
    assert!((1.0..=3.0).contains(&loads), "{loads} loads for 20 calls");
    assert_eq!(infer_status(&router, "mlp").await, 200);
    served.shutdown().await;
}

/// Load, load, unload, load, each sent while the one before still runs (EfficientNet-Lite0
/// loads for a quarter second or more): the last call is a load, so the model ends up loaded.
/// The load that waited behind the unload is not answered by the load before the unload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_of_interleaved_loads_and_unloads_wins() {
    let model = root().join(".ortserve/models/efficientnet_lite0.onnx");
    let (served, router) = start(&format!(
        "server: {{model_control: explicit}}\nmodels:\n  - {{name: e, path: '{}', devices: cpu, batching: {{max_batch_size: 4, buckets: on}}}}",
        model.display()
    ))
    .await;
    let mut calls = Vec::new();
    for action in ["load", "load", "unload", "load"] {
        let router = router.clone();
        calls.push(tokio::spawn(async move {
            post(&router, &format!("/v2/repository/models/e/{action}"))
                .await
                .status
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(index(&router).await[0]["state"], "READY");
    assert_eq!(served.models().len(), 1);
    served.shutdown().await;
}
