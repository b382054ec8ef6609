//! Batch-size buckets (`batching.buckets`): the batcher's batches run only at the sizes 1, 2, 4,
//! ... up to the batch size, padded with zero rows that no client sees, counted in
//! `ortserve_padded_rows_total`, and every size is run once before readiness. On by default on
//! CUDA (first runs of a new shape are slow there); tested here on CPU with `buckets: on`, next to
//! the same model without buckets.

mod common;

use common::*;
use serde_json::{json, Value};

fn rows(n: usize) -> Value {
    let data: Vec<f32> = (0..n * 4).map(|i| (i as f32 * 0.37).sin()).collect();
    json!({"inputs": [{"name": "input", "shape": [n, 4], "datatype": "FP32", "data": data}]})
}

fn values(reply: &Reply) -> Vec<f64> {
    reply.assert_status(200);
    reply.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn padded(metrics: &str, model: &str) -> u64 {
    let line = format!("ortserve_padded_rows_total{{device=\"cpu:0\",model=\"{model}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_pad_invisibly_count_the_padding_and_warm_every_size_before_readiness() {
    let (_s, router) = start(
        "models:
  - {name: bucketed, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8, buckets: on}}
  - {name: plain, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    // Every bucket ran once before the server was ready; CPU's `auto` has none.
    let tuning = get(&router, "/v1/models/bucketed/tuning").await.json();
    let warmed: Vec<u64> = tuning["devices"][0]["warmup"]
        .as_array()
        .unwrap_or_else(|| panic!("no warm-up in {tuning}"))
        .iter()
        .map(|w| w["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(warmed, [1, 2, 4, 8]);
    let plain = get(&router, "/v1/models/plain/tuning").await.json();
    assert!(plain["devices"][0]["warmup"].is_null(), "{plain}");

    // 3 rows run as 4, 5 as 8, 8 as 8: the outputs are the unpadded model's, row for row.
    let mut expected_padding = 0;
    for (n, pad) in [(3, 1), (5, 3), (8, 0), (1, 0)] {
        let body = rows(n);
        let got = values(&post_json(&router, "/v2/models/bucketed/infer", &body).await);
        let want = values(&post_json(&router, "/v2/models/plain/infer", &body).await);
        assert_eq!(got.len(), n * 3, "{n} rows in, {n} rows out");
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{n} rows: {got:?} vs {want:?}"
            );
        }
        expected_padding += pad;
        let metrics = String::from_utf8(get(&router, "/metrics").await.body).unwrap();
        assert_eq!(
            padded(&metrics, "bucketed"),
            expected_padding,
            "after {n} rows"
        );
        assert_eq!(padded(&metrics, "plain"), 0);
    }
}
