//! What operators see: every metric after traffic with its labels, and the request id on the
//! log lines of a request, including those written on the device thread.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::config::DispatchPolicy;
use ortserve::device::{ModelRunner, RunError};
use ortserve::tensor::Tensor;
use ortserve::testing::{BatchSettings, DeviceRunner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_appears_after_traffic_with_its_labels() {
    let (_state, router) = start(
        "models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
  - name: img
    path: cnn.onnx
    devices: cpu
    batching: {max_batch_size: 4}
    tuning: {max_batch_cap: 4, cache_dir: /tmp/ortserve-observability-test}
    image: {size: [64, 64]}
    classification: {top_k: 3}",
    )
    .await;
    let x = Tensor::from_f32(vec![2, 4], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap();
    assert_eq!(
        post_json(
            &router,
            "/v2/models/mlp/infer",
            &v2_json(&[("input", &x)], false)
        )
        .await
        .status,
        200
    );
    let png = {
        let img = image::RgbImage::from_fn(80, 70, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let req = Request::post("/v1/models/img:predict")
        .header("content-type", "image/png")
        .body(Body::from(png))
        .unwrap();
    assert_eq!(send(&router, req).await.status, 200);
    let text = String::from_utf8(get(&router, "/metrics").await.body).unwrap();
    let expected = [
        r#"ortserve_requests_total{model="mlp",protocol="http",route="v2_infer",status="200"} 1"#,
        r#"ortserve_requests_total{model="img",protocol="http",route="v1_predict",status="200"} 1"#,
        r#"ortserve_request_duration_seconds_count{model="mlp",protocol="http",route="v2_infer"} 1"#,
        r#"ortserve_queue_depth_requests{model="mlp"}"#,
        r#"ortserve_queue_duration_seconds_count{model="mlp"} 1"#,
        r#"ortserve_batch_size_rows_sum{model="mlp"} 2"#,
        r#"ortserve_batches_total{model="mlp",reason="#,
        r#"ortserve_inference_duration_seconds_count{device="cpu:0",model="mlp"} 1"#,
        r#"ortserve_device_rows_total{device="cpu:0",model="mlp"} 2"#,
        r#"ortserve_device_failures_total{device="cpu:0",model="mlp"} 0"#,
        r#"ortserve_inflight_rows{device="cpu:0",model="mlp"} 0"#,
        r#"ortserve_device_healthy{device="cpu:0",model="mlp"} 1"#,
        r#"ortserve_tuned_max_batch_size{device="cpu:0",model="mlp"} 8"#,
        r#"ortserve_tuned_max_batch_size{device="cpu:0",model="img"}"#,
        r#"ortserve_preprocess_duration_seconds_count{model="img"} 1"#,
    ];
    for line in expected {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // NVML gauges only appear on hosts serving on a GPU.
    assert!(!text.contains("ortserve_gpu_memory_used_bytes{"));
}

/// Fails every run, so the device thread logs a warning inside the batch span.
struct Broken;

impl ModelRunner for Broken {
    fn run(&mut self, _parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        Err(RunError::Failed("broken on purpose".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_on_the_log_lines_of_the_request_across_threads() {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Capture(buffer.clone());
    tracing_subscriber::fmt()
        .with_env_filter("ortserve=debug,tower_http=debug")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();
    let runner = DeviceRunner {
        run_timeout: std::time::Duration::from_secs(30),
        refine: None,
        name: "cpu:0".into(),
        max_batch: 4,
        buckets: Vec::new(),
        runner: Box::new(Broken),
        rebuild: None,
    };
    let settings = BatchSettings::new(Duration::ZERO, 16, Duration::from_secs(30));
    let (_state, router) = fake_server(
        "broken",
        1,
        vec![runner],
        DispatchPolicy::LeastLoaded,
        settings,
    );
    let req = Request::post("/v2/models/broken/infer")
        .header("x-request-id", "trace-me-42")
        .body(Body::from(one(1.0).to_string()))
        .unwrap();
    let reply = send(&router, req).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.headers["x-request-id"], "trace-me-42",
        "the id comes back"
    );
    let log = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let worker = log
        .lines()
        .find(|l| l.contains("batch failed"))
        .unwrap_or_else(|| panic!("no worker line in\n{log}"));
    assert!(
        worker.contains("trace-me-42"),
        "device thread line without the id: {worker}"
    );
    let handler = log
        .lines()
        .find(|l| l.contains("inference failed"))
        .unwrap_or_else(|| panic!("no handler line in\n{log}"));
    assert!(
        handler.contains("trace-me-42"),
        "handler line without the id: {handler}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("/v2/models/broken/infer"))
    {
        assert!(
            line.contains("trace-me-42"),
            "request line without the id: {line}"
        );
    }
}

/// The value of `ortserve_saturation{model="gated"}` on `/metrics`.
async fn saturation(router: &axum::Router) -> f64 {
    let text = String::from_utf8(get(router, "/metrics").await.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ortserve_saturation{model=\"gated\"} "))
        .unwrap_or_else(|| panic!("no ortserve_saturation in\n{text}"))
        .parse()
        .unwrap()
}

/// The autoscaling signal: rows admitted and not answered over the rows the devices run at once.
/// One device of one-row batches held by a gate: three requests make 3.0 (one running, two
/// queued), and it falls back to 0 as they are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_counts_queued_and_running_rows_against_the_devices_batch_sizes() {
    let (_state, router, open) = gated_server(8);
    assert_eq!(saturation(&router).await, 0.0);
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let r = router.clone();
            tokio::spawn(
                async move { post_json(&r, "/v2/models/gated/infer", &one(i as f32)).await },
            )
        })
        .collect();
    let t = std::time::Instant::now();
    while saturation(&router).await < 3.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "never reached 3.0");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert_eq!(saturation(&router).await, 0.0);
}
