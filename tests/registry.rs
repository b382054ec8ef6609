//! The model registry at runtime: a model replaced or unloaded while a request still holds it
//! answers that request, new requests go to what is served now, and versions route by URL.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::config::DispatchPolicy;
use ortserve::device::{ModelRunner, RunError};
use ortserve::tensor::Tensor;
use ortserve::testing::{model_over_runners, BatchSettings, DeviceRunner};

/// Adds `add` to its input: which model answered is in the value.
struct Add(f32);

impl ModelRunner for Add {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
        let x = Tensor::concat(&firsts).map_err(|e| RunError::Failed(e.to_string()))?;
        let y: Vec<f32> = x.to_f32().iter().map(|v| v + self.0).collect();
        let y =
            Tensor::from_f32(x.shape.clone(), &y).map_err(|e| RunError::Failed(e.to_string()))?;
        Ok(vec![y])
    }
}

fn adder(add: f32) -> Vec<DeviceRunner> {
    vec![DeviceRunner {
        run_timeout: Duration::from_secs(30),
        refine: None,
        name: "cpu:0".into(),
        max_batch: 4,
        buckets: Vec::new(),
        runner: Box::new(Add(add)),
        rebuild: None,
    }]
}

fn settings() -> BatchSettings {
    BatchSettings::new(Duration::ZERO, 64, Duration::from_secs(30))
}

/// Posts one row `x` to `uri` and returns the status and, on 200, the value of `y`.
async fn infer(router: &axum::Router, uri: &str, x: f32) -> (u16, Option<f64>) {
    let reply = post_json(router, uri, &one(x)).await;
    let y = (reply.status == 200).then(|| outputs(&reply)[0].3[0]);
    (reply.status.as_u16(), y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_model_answers_the_requests_that_hold_it_while_new_ones_go_to_its_successor() {
    let (served, router, open) = gated_server(8);
    let state: &ortserve::app::AppState = &served;

    // A request that reaches the old model and waits in its device.
    let held = tokio::spawn({
        let router = router.clone();
        async move { infer(&router, "/v2/models/gated/infer", 7.0).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "the gated device holds the request");

    // The same name and version, replaced.
    let (model, owner) = model_over_runners(
        state,
        "gated",
        "1",
        xy_info(1),
        DispatchPolicy::RoundRobin,
        settings(),
        adder(100.0),
    );
    let retired = state
        .registry()
        .load_one(model, Some(owner))
        .expect("the old model is handed back");
    let stopping = tokio::spawn(retired.stop(Duration::from_secs(20)));

    // New requests reach the new model at once, though the old one is still busy.
    assert_eq!(
        infer(&router, "/v2/models/gated/infer", 1.0).await,
        (200, Some(101.0))
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "the old model is not stopped while a request holds it"
    );

    // The held request is answered by the old model (an echo), then the old model stops.
    open.send(()).unwrap();
    assert_eq!(held.await.unwrap(), (200, Some(7.0)));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the old model stops once its request is answered")
        .unwrap();
    assert_eq!(
        infer(&router, "/v2/models/gated/infer", 2.0).await,
        (200, Some(102.0))
    );
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_route_by_url_and_an_unloaded_version_is_gone() {
    let (served, router) =
        fake_server("m", 1, adder(100.0), DispatchPolicy::RoundRobin, settings());
    let state: &ortserve::app::AppState = &served;
    let (v2, owner) = model_over_runners(
        state,
        "m",
        "2",
        xy_info(1),
        DispatchPolicy::RoundRobin,
        settings(),
        adder(200.0),
    );
    assert!(state.registry().load_one(v2, Some(owner)).is_none());

    // No version: the highest; a version in the URL: that one.
    assert_eq!(
        infer(&router, "/v2/models/m/infer", 1.0).await,
        (200, Some(201.0))
    );
    assert_eq!(
        infer(&router, "/v2/models/m/versions/1/infer", 1.0).await,
        (200, Some(101.0))
    );
    assert_eq!(
        infer(&router, "/v2/models/m/versions/2/infer", 1.0).await,
        (200, Some(201.0))
    );
    let meta = get(&router, "/v2/models/m").await;
    meta.assert_status(200);
    let meta: serde_json::Value = serde_json::from_slice(&meta.body).unwrap();
    assert_eq!(meta["versions"], serde_json::json!(["1", "2"]));

    // The response says which version ran.
    let reply = post_json(&router, "/v2/models/m/infer", &one(1.0)).await;
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["model_version"], "2");

    let retired = state
        .registry()
        .unload_one("m", "2")
        .expect("version 2 is served");
    retired.stop(Duration::from_secs(5)).await;
    assert!(
        state.registry().unload_one("m", "2").is_none(),
        "already gone"
    );
    assert_eq!(
        infer(&router, "/v2/models/m/infer", 1.0).await,
        (200, Some(101.0))
    );
    let gone = send(
        &router,
        Request::post("/v2/models/m/versions/2/infer")
            .header("content-type", "application/json")
            .body(Body::from(one(1.0).to_string()))
            .unwrap(),
    )
    .await;
    gone.assert_status(404);
    assert!(String::from_utf8_lossy(&gone.body).contains("model_not_found"));
    served.shutdown().await;
}
