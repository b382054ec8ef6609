//! End to end on real ONNX Runtime CPU sessions: every fixture model and datatype over V2 JSON
//! and the binary extension, compared with an in-process run of the same model.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use ortserve::tensor::Tensor;
use rand::SeedableRng;
use serde_json::json;

const ALL_MODELS: &str = "
models:
  - {name: mlp, path: mlp.onnx, devices: cpu}
  - {name: cnn, path: cnn.onnx, devices: cpu}
  - {name: two_input, path: two_input.onnx, devices: cpu}
  - {name: int64_gather, path: int64_gather.onnx, devices: cpu}
  - {name: fixed_batch, path: fixed_batch.onnx, devices: cpu}
  - {name: dtypes, path: dtypes.onnx, devices: cpu}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_and_dtype_matches_in_process_onnx_runtime() {
    let (state, router) = start(ALL_MODELS).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for model in state.models() {
        let mut reference = reference(&format!("{}.onnx", model.name()));
        let batchable = model.info().inputs[0].dims[0] == -1;
        let sizes: &[usize] = if batchable { &[1, 8, 5] } else { &[2] };
        for &rows in sizes {
            let inputs: Vec<Tensor> = model
                .info()
                .inputs
                .iter()
                .map(|i| {
                    let shape = i
                        .dims
                        .iter()
                        .map(|&d| if d < 0 { rows } else { d as usize })
                        .collect();
                    random_tensor(i.dtype, shape, &mut rng)
                })
                .collect();
            let named: Vec<(&str, &Tensor)> = model
                .info()
                .inputs
                .iter()
                .map(|i| i.name.as_str())
                .zip(&inputs)
                .collect();
            let want = run_reference(&mut reference, &inputs);
            let uri = format!("/v2/models/{}/infer", model.name());

            for nested in [false, true] {
                let reply = post_json(&router, &uri, &v2_json(&named, nested)).await;
                let got = outputs(&reply);
                assert_eq!(got.len(), want.len());
                for ((g, w), info) in got.iter().zip(&want).zip(&model.info().outputs) {
                    assert_eq!(g.0, info.name);
                    assert_close(
                        &format!("{} rows={rows} json nested={nested} {}", model.name(), g.0),
                        g,
                        w,
                    );
                }
            }

            let (body, header_len) = v2_binary(&named);
            let req = Request::post(&uri)
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", header_len)
                .body(Body::from(body))
                .unwrap();
            let reply = send(&router, req).await;
            assert_eq!(reply.headers["content-type"], "application/octet-stream");
            let got = outputs(&reply);
            for (g, w) in got.iter().zip(&want) {
                assert_close(
                    &format!("{} rows={rows} binary {}", model.name(), g.0),
                    g,
                    w,
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_spinning_threads_give_the_same_answers() {
    // `runtime.cpu_spinning` changes how ONNX Runtime's two intra-op threads wait, not what
    // they compute.
    let (state, router) = start(
        "runtime: {cpu_threads: 2, cpu_spinning: true}\nmodels: [{name: cnn, path: cnn.onnx, devices: cpu}]",
    )
    .await;
    let models = state.models();
    let input = &models[0].info().inputs[0];
    let shape = input
        .dims
        .iter()
        .map(|&d| if d < 0 { 3 } else { d as usize })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let x = random_tensor(input.dtype, shape, &mut rng);
    let want = run_reference(&mut reference("cnn.onnx"), std::slice::from_ref(&x));
    let reply = post_json(
        &router,
        "/v2/models/cnn/infer",
        &v2_json(&[(input.name.as_str(), &x)], false),
    )
    .await;
    let got = outputs(&reply);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_close("cnn with spinning threads", g, w);
    }
}

/// A run of several parts copies their rows into one batch tensor whose memory is not zeroed
/// first (`uninit_tensor` in crates/core/src/device/ort_runner.rs). Right after a run that left other values
/// in the memory the batch may reuse, every part still gets the answers of its own rows.
#[test]
fn a_batch_of_parts_answers_each_part_as_if_it_ran_alone() {
    use ortserve::device::ModelRunner;
    let mut runner = reference("mlp.onnx");
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let row = |n: usize, rng: &mut rand::rngs::StdRng| {
        random_tensor(ortserve::tensor::DataType::F32, vec![n, 4], rng)
    };
    let stale = row(6, &mut rng);
    run_reference(&mut runner, &[stale]);
    let parts: Vec<Vec<Tensor>> = [2, 1, 3].iter().map(|&n| vec![row(n, &mut rng)]).collect();
    let batched = runner.run(&parts).expect("batched run");
    let mut start = 0;
    for (i, part) in parts.iter().enumerate() {
        let rows = part[0].shape[0];
        let alone = run_reference(&mut runner, part);
        assert_eq!(batched.len(), alone.len());
        for (b, a) in batched.iter().zip(&alone) {
            let (got, want) = (b.slice_rows(start, rows).to_f32(), a.to_f32());
            assert_eq!(got.len(), want.len(), "part {i}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "part {i}: {g} in the batch, {w} alone"
                );
            }
        }
        start += rows;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_can_be_chosen_and_mixed_binary_and_json() {
    let (_state, router) =
        start("models: [{name: two_input, path: two_input.onnx, devices: cpu}]").await;
    let a = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let b = Tensor::from_f32(vec![1, 4], &[0.5, 0.5, 2.0, -1.0]).unwrap();
    let mut body = v2_json(&[("a", &a), ("b", &b)], false);
    body["id"] = json!("req-7");
    body["outputs"] =
        json!([{"name": "prod", "parameters": {"binary_data": true}}, {"name": "sum"}]);
    let reply = post_json(&router, "/v2/models/two_input/infer", &body).await;
    let got = outputs(&reply);
    assert_eq!(
        got.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["prod", "sum"]
    );
    assert_eq!(got[0].3, vec![0.5, 1.0, 6.0, -4.0]);
    assert_eq!(got[1].3, vec![1.5, 2.5, 5.0, 3.0]);
    let n: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&reply.body[..n]).unwrap();
    assert_eq!(head["id"], "req-7");
    assert_eq!(head["model_name"], "two_input");
    assert!(head["outputs"][1]["data"].is_array(), "sum stays JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_health_routes() {
    let (_state, router) = start(
        "models: [{name: mlp, path: mlp.onnx, devices: cpu, version: '3'}, {name: fixed_batch, path: fixed_batch.onnx, devices: cpu}]",
    )
    .await;
    let server = get(&router, "/v2").await.json();
    assert_eq!(server["name"], "ortserve");
    assert!(server["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));
    for uri in [
        "/v2/health/live",
        "/v2/health/ready",
        "/healthz",
        "/readyz",
        "/v2/models/mlp/ready",
        "/v2/models/mlp/versions/3/ready",
    ] {
        assert_eq!(get(&router, uri).await.status, StatusCode::OK, "{uri}");
    }
    for uri in ["/v2/models/mlp", "/v2/models/mlp/versions/3"] {
        let m = get(&router, uri).await.json();
        assert_eq!(m["name"], "mlp");
        assert_eq!(m["versions"], json!(["3"]));
        assert_eq!(
            m["inputs"],
            json!([{"name": "input", "datatype": "FP32", "shape": [-1, 4]}])
        );
        assert_eq!(
            m["outputs"],
            json!([{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}])
        );
    }
    let fixed = get(&router, "/v2/models/fixed_batch").await.json();
    assert_eq!(
        fixed["inputs"][0]["shape"],
        json!([2, 4]),
        "fixed dims are reported as they are"
    );
    assert_eq!(
        get(&router, "/v2/models/mlp/versions/4").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_a_device_batch_is_split_across_slots_and_reassembled() {
    let (state, router) = start(
        "runtime: {cpu_threads: 2}
models:
  - name: mlp
    path: mlp.onnx
    devices: [cpu:0, cpu:1]
    dispatch: round_robin
    batching: {max_batch_size: 4, max_queue_delay: 0ms}",
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let x = random_tensor(ortserve::tensor::DataType::F32, vec![12, 4], &mut rng);
    let want = run_reference(&mut reference("mlp.onnx"), std::slice::from_ref(&x));
    let reply = post_json(
        &router,
        "/v2/models/mlp/infer",
        &v2_json(&[("input", &x)], false),
    )
    .await;
    let got = outputs(&reply);
    assert_close("12 rows split in 3 parts", &got[0], &want[0]);
    let metrics = get(&router, "/metrics").await;
    let text = String::from_utf8(metrics.body).unwrap();
    let rows0 = metric(
        &text,
        "ortserve_device_rows_total",
        &[("model", "mlp"), ("device", "cpu:0")],
    );
    let rows1 = metric(
        &text,
        "ortserve_device_rows_total",
        &[("model", "mlp"), ("device", "cpu:1")],
    );
    assert_eq!(rows0 + rows1, 12.0);
    assert!(
        rows0 >= 4.0 && rows1 >= 4.0,
        "both slots ran a part: cpu:0 {rows0}, cpu:1 {rows1}"
    );
    assert_eq!(
        metric(&text, "ortserve_batch_size_rows_sum", &[("model", "mlp")]),
        12.0
    );
    assert_eq!(
        metric(&text, "ortserve_batch_size_rows_count", &[("model", "mlp")]),
        3.0,
        "three batches of 4"
    );
    drop(state);
}

/// TF-Serving `instances` for tensor models: rows of a one-input model are read in one pass
/// (any member order, nested or not), rows as objects by input name take the general path, and
/// both give what the same rows give over V2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_instances_in_every_form_match_v2() {
    let (_state, router) = start(
        "models: [{name: mlp, path: mlp.onnx, devices: cpu}, {name: two_input, path: two_input.onnx, devices: cpu}]",
    )
    .await;
    let rows = [[1.0f32, 2.0, 3.0, 4.0], [0.5, 0.1, -1.0, 2.0]];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let x = Tensor::from_f32(vec![2, 4], &flat).unwrap();
    let want = outputs(
        &post_json(
            &router,
            "/v2/models/mlp/infer",
            &v2_json(&[("input", &x)], false),
        )
        .await,
    )[0]
    .3
    .clone();
    let predictions = |reply: &Reply| -> Vec<f64> {
        reply.json()["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p.as_array().unwrap().iter().map(as_f64))
            .collect()
    };
    let post = |uri: &'static str, body: &str| {
        let req = Request::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        send(&router, req)
    };
    let rows_first =
        r#"{"instances": [[1, 2, 3, 4], [0.5, 0.1, -1, 2]], "signature_name": "serving_default"}"#;
    let rows_last =
        r#"{"signature_name": {"a": [1, "]"]}, "instances": [ [1,2,3,4] ,[0.5,0.1,-1,2] ] }"#;
    let as_objects = r#"{"instances": [{"input": [1, 2, 3, 4]}, {"input": [0.5, 0.1, -1, 2]}]}"#;
    for body in [rows_first, rows_last, as_objects] {
        let reply = post("/v1/models/mlp:predict", body).await;
        reply.assert_status(200);
        let got = predictions(&reply);
        assert_eq!(got.len(), want.len(), "{body}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{body}: {got:?} vs {want:?}");
        }
    }
    // A two-input model's rows are objects by input name.
    let reply = post(
        "/v1/models/two_input:predict",
        r#"{"instances": [{"a": [1, 2, 3, 4], "b": [0.5, 0.5, 2, -1]}]}"#,
    )
    .await;
    reply.assert_status(200);
    assert_eq!(
        reply.json()["predictions"][0]["sum"],
        json!([1.5, 2.5, 5.0, 3.0])
    );
    // Refused, each with what is wrong.
    for (body, status, says) in [
        (r#"{"instances": [[1, 2, 3, 4], [1, 2, 3]]}"#, 400, "nested"),
        (r#"{"instances": [1, 2, 3, 4]}"#, 400, "elements"),
        (r#"{"instances": []}"#, 400, "empty"),
        (
            r#"{"instances": [[1, 2, 3, 4]], "instances": [[1, 2, 3, 4]]}"#,
            400,
            "duplicate field `instances`",
        ),
        (
            r#"{"instances": [[1, 2, 3, 4],]}"#,
            400,
            "expected a value at line 1 column 29",
        ),
        (r#"{"instances": 5}"#, 400, "expected an array"),
        (
            r#"{"rows": [[1, 2, 3, 4]]}"#,
            400,
            "missing field `instances`",
        ),
        (r#"{"instances": [["1", 2, 3, 4]]}"#, 400, "element 0"),
    ] {
        let reply = post("/v1/models/mlp:predict", body).await;
        assert_eq!(reply.status.as_u16(), status, "{body}");
        let text = String::from_utf8_lossy(&reply.body).to_string();
        assert!(text.contains(says), "{body}: {text}");
    }
}
