//! Device faults: a failing device's batches succeed on the other one, it turns unhealthy, and
//! comes back after a probe once the fault is cleared; a refused input does not fail its batch
//! mates. Faults are injected with test-only runners (nothing like this ships).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use ortserve::config::DispatchPolicy;
use ortserve::device::{ModelRunner, RunError};
use ortserve::tensor::Tensor;
use ortserve::testing::{BatchSettings, DeviceRunner};

/// Echoes its input after 2 ms; fails every run while `fault` is set; refuses (as ONNX Runtime
/// does for bad values) any batch holding a negative value.
struct Flaky {
    fault: Arc<AtomicBool>,
}

impl ModelRunner for Flaky {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        std::thread::sleep(Duration::from_millis(2));
        if self.fault.load(Ordering::Acquire) {
            return Err(RunError::Failed("injected device fault".into()));
        }
        let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
        let out = Tensor::concat(&firsts).map_err(|e| RunError::Failed(e.to_string()))?;
        if out.to_f32().iter().any(|&v| v < 0.0) {
            return Err(RunError::Input("indices element out of data bounds".into()));
        }
        Ok(vec![out])
    }
}

fn server(settings: BatchSettings) -> (Served, axum::Router, Arc<AtomicBool>) {
    let fault = Arc::new(AtomicBool::new(false));
    let runners = vec![
        DeviceRunner {
            run_timeout: std::time::Duration::from_secs(30),
            refine: None,
            name: "cpu:0".into(),
            max_batch: 8,
            buckets: Vec::new(),
            runner: Box::new(Flaky {
                fault: Arc::new(AtomicBool::new(false)),
            }),
            rebuild: None,
        },
        DeviceRunner {
            run_timeout: std::time::Duration::from_secs(30),
            refine: None,
            name: "cpu:1".into(),
            max_batch: 8,
            buckets: Vec::new(),
            runner: Box::new(Flaky {
                fault: fault.clone(),
            }),
            rebuild: None,
        },
    ];
    let (state, router) = fake_server("flaky", 1, runners, DispatchPolicy::RoundRobin, settings);
    (state, router, fault)
}

async fn burst(router: &axum::Router, values: &[f32]) -> Vec<(f32, u16, Vec<f64>)> {
    let tasks: Vec<_> = values
        .iter()
        .map(|&v| {
            let r = router.clone();
            tokio::spawn(async move {
                let reply = post_json(&r, "/v2/models/flaky/infer", &one(v)).await;
                let status = reply.status.as_u16();

                let values = if status == 200 {
                    outputs(&reply)[0].3.clone()
                } else {
                    Vec::new()
                };
                (v, status, values)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_is_bypassed_marked_unhealthy_and_brought_back() {
    let mut settings = BatchSettings::new(Duration::from_millis(1), 256, Duration::from_secs(30));
    settings.reprobe_interval = Duration::from_millis(50);
    let (state, router, fault) = server(settings);
    let bad = || state.devices()[1].clone();

    fault.store(true, Ordering::Release);
    let values: Vec<f32> = (1..=40).map(|i| i as f32).collect();
    // Requests that arrive together share batches (up to 8 rows), so a burst of 40 may give
    // cpu:1 fewer than the 3 batches that turn it unhealthy: bursts until it is out, at most 10.
    for _ in 0..10 {
        for (v, status, got) in burst(&router, &values).await {
            assert_eq!(status, 200, "request {v} failed although cpu:0 is fine");
            assert_eq!(got, vec![v as f64], "request {v} got someone else's answer");
        }
        if !bad().healthy {
            break;
        }
    }
    assert!(
        !bad().healthy,
        "cpu:1 failed every run and should be unhealthy"
    );
    assert!(bad().failures >= 3);
    assert_eq!(
        get(&router, "/v2/health/ready").await.status,
        StatusCode::OK,
        "one healthy device keeps readiness"
    );
    let metrics = String::from_utf8(get(&router, "/metrics").await.body).unwrap();
    assert!(
        metrics.contains("ortserve_device_healthy{device=\"cpu:1\",model=\"flaky\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ortserve_device_failures_total{device=\"cpu:1\",model=\"flaky\"}"),
        "{metrics}"
    );

    // Still failing: probes keep it out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!bad().healthy);

    // Cleared: the next probe brings it back, and it takes work again.
    fault.store(false, Ordering::Release);
    let start = Instant::now();
    while !bad().healthy {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "cpu:1 did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = bad().rows_run;
    for (v, status, _) in burst(&router, &values).await {
        assert_eq!(status, 200, "request {v}");
    }
    assert!(bad().rows_run > before, "cpu:1 runs batches again");
    let metrics = String::from_utf8(get(&router, "/metrics").await.body).unwrap();
    assert!(
        metrics.contains("ortserve_device_healthy{device=\"cpu:1\",model=\"flaky\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_input_fails_only_its_own_request() {
    let (state, router, _fault) = server(BatchSettings::new(
        Duration::from_millis(5),
        256,
        Duration::from_secs(30),
    ));
    let values: Vec<f32> = (0..24)
        .map(|i| {
            if i % 6 == 0 {
                -1.0 - i as f32
            } else {
                i as f32
            }
        })
        .collect();
    for (v, status, got) in burst(&router, &values).await {
        if v < 0.0 {
            assert_eq!(status, 400, "the bad request {v}");
        } else {
            assert_eq!(
                status, 200,
                "request {v} shared a batch with a bad one and failed"
            );
            assert_eq!(got, vec![v as f64]);
        }
    }
    // Refused inputs are not device faults.
    for d in state.devices() {
        assert!(d.healthy);
        assert_eq!(d.failures, 0);
    }
}

/// Panics on a marked input (a value of 666); counts how often it was built.
struct Panicky;

impl ModelRunner for Panicky {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
        let out = Tensor::concat(&firsts).map_err(|e| RunError::Failed(e.to_string()))?;
        if out.to_f32().contains(&666.0) {
            panic!("marked input");
        }
        Ok(vec![out])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_is_rebuilt_and_the_server_keeps_serving() {
    let built = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = built.clone();
    let runner = DeviceRunner {
        run_timeout: std::time::Duration::from_secs(30),
        refine: None,
        name: "cpu:0".into(),
        max_batch: 4,
        buckets: Vec::new(),
        runner: Box::new(Panicky),
        rebuild: Some(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Panicky) as Box<dyn ModelRunner>)
        })),
    };
    let settings = BatchSettings::new(Duration::ZERO, 64, Duration::from_secs(30));
    let (_state, router) = fake_server(
        "panicky",
        1,
        vec![runner],
        DispatchPolicy::LeastLoaded,
        settings,
    );
    let uri = "/v2/models/panicky/infer";
    let reply = post_json(&router, uri, &one(666.0)).await;
    reply.assert_status(StatusCode::INTERNAL_SERVER_ERROR.as_u16());
    // The failed part is answered before the device thread rebuilds its session (a client does
    // not wait for the rebuild), so the rebuild may come a moment after the answer.
    for _ in 0..500 {
        if built.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        built.load(Ordering::SeqCst),
        1,
        "the session was rebuilt once"
    );
    let ok = post_json(&router, uri, &one(7.0)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(outputs(&ok)[0].3, vec![7.0]);
}

/// A run that does not return: its request is answered 504 at its deadline and frees its place
/// in the queue; the watchdog takes the device out, and batches go to the other device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_run_is_answered_at_the_deadline_and_the_watchdog_takes_its_device_out() {
    let timed = |timeout_ms: u64, v: f32| {
        axum::http::Request::post("/v2/models/gated/infer")
            .header("x-timeout-ms", timeout_ms)
            .body(axum::body::Body::from(one(v).to_string()))
            .unwrap()
    };
    // A 2.5 s batch (here: one that waits for the gate) and a 300 ms deadline.
    let (_state, router, open) = gated_server(4);
    let t = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(5), send(&router, timed(300, 1.0)))
        .await
        .expect("answered while the run goes on");
    let took = t.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        reply.json()
    );
    assert_eq!(reply.json()["error_type"], "deadline_exceeded");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(500),
        "answered after {took:?}"
    );
    // Its place is free: four more fit in the queue of four (none is refused with 429).
    let more: Vec<_> = (0..4)
        .map(|i| {
            let r = router.clone();
            tokio::spawn(async move { send(&r, timed(200, i as f32)).await.status })
        })
        .collect();
    for m in more {
        assert_eq!(m.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    }
    drop(open);

    // Two devices: cpu:0 never returns, cpu:1 answers at once. Watchdog at 300 ms.
    let (stuck, _gate) = gated_runner("cpu:0", Duration::from_millis(300));
    let fine = DeviceRunner {
        run_timeout: Duration::from_millis(300),
        refine: None,
        name: "cpu:1".into(),
        max_batch: 1,
        buckets: Vec::new(),
        runner: Box::new(Flaky {
            fault: Arc::new(AtomicBool::new(false)),
        }),
        rebuild: None,
    };
    let mut settings = BatchSettings::new(Duration::ZERO, 16, Duration::from_secs(30));
    settings.reprobe_interval = Duration::from_millis(100);
    let (state, router) = fake_server(
        "gated",
        1,
        vec![stuck, fine],
        DispatchPolicy::LeastLoaded,
        settings,
    );
    let t = Instant::now();
    let first = send(&router, timed(2000, 1.0)).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "it ran on cpu:0");
    assert!(!state.devices()[0].healthy, "the watchdog took cpu:0 out");
    assert!(t.elapsed() < Duration::from_millis(2500));
    for i in 0..20 {
        let r = send(&router, timed(2000, i as f32)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    }
    let devices = state.devices();
    assert_eq!(devices[1].rows_run, 20, "every later batch ran on cpu:1");
    assert!(
        !devices[0].healthy,
        "a stuck device does not pass its probe"
    );
    assert_eq!(
        get(&router, "/v2/health/ready").await.status,
        StatusCode::OK
    );
    let metrics = get(&router, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        metric(
            &text,
            "ortserve_device_failures_total",
            &[("device", "cpu:0")]
        ) >= 1.0,
        "{text}"
    );
}
