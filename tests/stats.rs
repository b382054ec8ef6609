//! The V2 statistics extension against the requests sent: exact counts, plausible durations.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ortserve::tensor::Tensor;
use serde_json::Value;

fn rows(n: usize) -> Tensor {
    Tensor::from_f32(vec![n, 4], &vec![0.5; n * 4]).unwrap()
}

fn count(v: &Value, what: &str) -> (u64, u64) {
    let t = &v["inference_stats"][what];
    (t["count"].as_u64().unwrap(), t["ns"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_what_was_sent() {
    let (served, router) = start(
        "models:\n  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}\n  - {name: cnn, path: cnn.onnx, devices: cpu, batching: {max_batch_size: 2}}",
    )
    .await;
    let started = Instant::now();
    let sizes = [1usize, 2, 3, 1, 5];
    for &n in &sizes {
        post_json(
            &router,
            "/v2/models/mlp/infer",
            &v2_json(&[("input", &rows(n))], false),
        )
        .await
        .assert_status(200);
    }
    // Refused by the model (three columns): a failure.
    post_json(
        &router,
        "/v2/models/mlp/infer",
        &v2_json(
            &[(
                "input",
                &Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap(),
            )],
            false,
        ),
    )
    .await
    .assert_status(400);
    let wall = started.elapsed();

    let reply = get(&router, "/v2/models/mlp/stats").await;
    reply.assert_status(200);
    let body: Value = reply.json();
    let stats = &body["model_stats"];
    assert_eq!(stats.as_array().unwrap().len(), 1);
    let s = &stats[0];
    assert_eq!(
        (s["name"].as_str(), s["version"].as_str()),
        (Some("mlp"), Some("1"))
    );
    let sent: u64 = sizes.iter().sum::<usize>() as u64;
    assert_eq!(s["inference_count"], sent, "rows inferred");
    assert_eq!(
        s["execution_count"],
        sizes.len(),
        "one run each, sent one after another"
    );
    let (ok, ok_ns) = count(s, "success");
    let (failed, _) = count(s, "fail");
    let (queued, queue_ns) = count(s, "queue");
    let (computed, compute_ns) = count(s, "compute_infer");
    assert_eq!((ok, failed, queued, computed), (5, 1, 5, 5));
    // Durations: each part of a whole request, and the whole under the wall time.
    assert!(
        ok_ns > 0 && Duration::from_nanos(ok_ns) <= wall,
        "{ok_ns} ns in {wall:?}"
    );
    assert!(
        compute_ns > 0 && compute_ns <= ok_ns,
        "{compute_ns} of {ok_ns}"
    );
    assert!(queue_ns <= ok_ns, "{queue_ns} of {ok_ns}");
    let batches: Vec<(u64, u64)> = s["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["batch_size"].as_u64().unwrap(),
                b["compute_infer"]["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(batches, vec![(1, 2), (2, 1), (3, 1), (5, 1)]);
    let last = s["last_inference"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now_ms - last < 60_000,
        "last_inference {last}, now {now_ms}"
    );

    // Every model, and one version; an unknown one is 404.
    let all: Value = get(&router, "/v2/models/stats").await.json();
    let names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cnn", "mlp"]);
    assert_eq!(all["model_stats"][0]["inference_count"], 0);
    get(&router, "/v2/models/mlp/versions/1/stats")
        .await
        .assert_status(200);
    get(&router, "/v2/models/mlp/versions/2/stats")
        .await
        .assert_status(404);
    get(&router, "/v2/models/nope/stats")
        .await
        .assert_status(404);
    served.shutdown().await;
}
