//! A trace receiver that hangs (accepts and never answers) or is down (nothing listens) changes
//! no answer and no latency beyond noise: spans are exported off the request path, and those
//! that do not fit the bounded queue are dropped and counted. Shutdown's flush has a deadline.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::config::LogFormat;
use ortserve::tensor::Tensor;

/// `n` requests one after another: every status 200; their latencies, sorted.
async fn latencies(router: &axum::Router, n: usize) -> Vec<Duration> {
    let body = v2_json(
        &[(
            "input",
            &Tensor::from_f32(vec![1, 4], &[0.1, 0.2, 0.3, 0.4]).unwrap(),
        )],
        false,
    )
    .to_string();
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let req = Request::post("/v2/models/mlp/infer")
            .header("content-type", "application/json")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Body::from(body.clone()))
            .unwrap();
        let t = Instant::now();
        send(router, req).await.assert_status(200);
        took.push(t.elapsed());
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_or_absent_receiver_changes_no_answer_and_no_latency() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (received, stop, serving) = otlp::receiver(listener).await;
    let config = config(&format!(
        "telemetry: {{endpoint: 'http://{addr}', max_queue_size: 32, export_timeout: 2s, flush_timeout: 1s}}
models:
  - {{name: mlp, path: mlp.onnx, devices: cpu, batching: {{max_batch_size: 8}}}}"
    ));
    let telemetry = ortserve::telemetry::init(LogFormat::Text, "error", &config.telemetry)
        .unwrap()
        .expect("traces on");
    let (_served, router) = start_config(&config).await;
    let dropped = async || {
        let text = get(&router, "/metrics").await;
        metric(
            &String::from_utf8_lossy(&text.body),
            "ortserve_trace_spans_dropped_total",
            &[],
        )
    };

    // A receiver that answers: the baseline.
    latencies(&router, 20).await; // warm-up
    let answering = latencies(&router, 60).await;
    telemetry.flush();
    otlp::until(&received, "spans while the receiver answers", |s| {
        !s.is_empty()
    })
    .await;
    let dropped_before = dropped().await;
    let _ = stop.send(());
    serving.await.unwrap();

    // The same port now accepts and never answers.
    let hang = otlp::hanging(addr).await;
    let hanging = latencies(&router, 60).await;
    // Down: nothing listens there any more.
    hang.abort();
    let _ = hang.await;
    let down = latencies(&router, 60).await;

    let p50 = |l: &[Duration]| l[l.len() / 2];
    eprintln!(
        "p50 / max: answering {:?} / {:?}, hanging {:?} / {:?}, down {:?} / {:?}",
        p50(&answering),
        answering.last().unwrap(),
        p50(&hanging),
        hanging.last().unwrap(),
        p50(&down),
        down.last().unwrap()
    );
    let bound = p50(&answering) * 2 + Duration::from_millis(10);
    for (what, l) in [("hanging", &hanging), ("down", &down)] {
        assert!(
            p50(l) <= bound,
            "{what}: p50 {:?} against {:?} with an answering receiver",
            p50(l),
            p50(&answering)
        );
        assert!(
            *l.last().unwrap() < Duration::from_secs(1),
            "{what}: slowest request {:?}",
            l.last().unwrap()
        );
    }
    // Spans beyond the 32 held while the export hangs were dropped, and counted (a queue
    // this small also drops some while the receiver answers, at this request rate).
    let dropped_after = dropped().await;
    eprintln!(
        "spans dropped: {dropped_before} with the receiver answering, {dropped_after} in all"
    );
    assert!(
        dropped_after >= dropped_before + 60.0,
        "drops are counted: {dropped_before} before, {dropped_after} after"
    );

    // Shutdown flushes within its deadline (1 s) even though nothing answers.
    let t = Instant::now();
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
}
