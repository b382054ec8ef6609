//! A front door that is not HTTP, driving the protocol-neutral request core as a gRPC one would:
//! its own request type and status codes, and everything else (call context and deadline,
//! auth, body budget, model lookup, admission, errors and their kinds, metrics) from the core.

mod common;

use std::time::Duration;

use common::*;
use ortserve::app::AppState;
use ortserve::call::{self, BodyMemory, Call, CallError, ErrorKind};
use ortserve::config::{AuthConfig, ByteSize, DispatchPolicy, ServerConfig};
use ortserve::tensor::Tensor;
use ortserve::testing::{serve_runners_with, BatchSettings};

/// The fake protocol's request: a token, a model, a timeout, an id and one column of values.
struct FakeRequest {
    authorization: Option<&'static str>,
    model: &'static str,
    version: Option<&'static str>,
    timeout: Option<Duration>,
    x: Vec<f32>,
}

impl FakeRequest {
    fn new(model: &'static str, x: Vec<f32>) -> FakeRequest {
        FakeRequest {
            authorization: Some("Bearer s3cret"),
            model,
            version: None,
            timeout: None,
            x,
        }
    }
}

/// The fake protocol's one table: every error kind to its code.
fn code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "INVALID",
        ErrorKind::Unauthenticated => "NO_AUTH",
        ErrorKind::NotFound => "NOT_FOUND",
        ErrorKind::Unimplemented => "UNIMPLEMENTED",
        ErrorKind::DeadlineExceeded => "TOO_LATE",
        ErrorKind::ResourceExhausted => "EXHAUSTED",
        ErrorKind::Unavailable => "UNAVAILABLE",
        ErrorKind::Internal => "INTERNAL",
    }
}

/// The whole front door: decode, then the core's steps, then its own status code.
async fn fake_front_door(app: &AppState, req: FakeRequest) -> (&'static str, Option<Vec<f32>>) {
    let started = std::time::Instant::now();
    let call = Call::arrived(req.timeout, Some("fake-1".into()));
    let answer = async {
        call::authorize(app, req.authorization)?;
        let mut body = BodyMemory::default();
        body.take(app, req.x.len() * 4)?;
        let model = app.lookup(req.model, req.version)?;
        let x = Tensor::from_f32(vec![req.x.len(), 1], &req.x)
            .map_err(|e| CallError::InvalidInput(e.to_string()))?;
        let out = model.infer(vec![("x".into(), x)], &call).await?;
        Ok::<_, CallError>(out[0].to_f32())
    }
    .await;
    let (status, y) = match answer {
        Ok(y) => ("OK", Some(y)),
        Err(e) => (code(e.kind()), None),
    };
    call::record(app, "fake", req.model, "infer", status, started);
    (status, y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_door_of_its_own_gets_every_guarantee_from_the_core() {
    let server = ServerConfig {
        auth: Some(AuthConfig {
            tokens_file: None,
            tokens_env: None,
            tokens: vec!["s3cret".into()],
        }),
        max_body_bytes: ByteSize(1 << 20),
        max_body_memory: Some(ByteSize(64)),
        ..ServerConfig::default()
    };
    // One device that holds each batch until told (or the gate closes), and a queue of 1.
    let (runner, open) = gated_runner("cpu:0", Duration::from_secs(30));
    let settings = BatchSettings::new(Duration::ZERO, 1, Duration::from_secs(30));
    let state = serve_runners_with(
        &server,
        "m",
        xy_info(1),
        DispatchPolicy::RoundRobin,
        settings,
        vec![runner],
    );

    // Served: the gated device echoes once let through.
    open.send(()).unwrap();
    let (status, y) = fake_front_door(&state, FakeRequest::new("m", vec![3.0])).await;
    assert_eq!((status, y), ("OK", Some(vec![3.0])));

    // Auth, lookup and the body budget, each with its kind.
    let mut no_token = FakeRequest::new("m", vec![1.0]);
    no_token.authorization = Some("Bearer wrong");
    assert_eq!(fake_front_door(&state, no_token).await.0, "NO_AUTH");
    assert_eq!(
        fake_front_door(&state, FakeRequest::new("nope", vec![1.0]))
            .await
            .0,
        "NOT_FOUND"
    );
    let mut version = FakeRequest::new("m", vec![1.0]);
    version.version = Some("7");
    assert_eq!(fake_front_door(&state, version).await.0, "NOT_FOUND");
    assert_eq!(
        fake_front_door(&state, FakeRequest::new("m", vec![0.5; 17]))
            .await
            .0,
        "UNAVAILABLE",
        "68 bytes against a body budget of 64"
    );

    // The deadline counts from arrival: the gate holds the run past it.
    let mut late = FakeRequest::new("m", vec![1.0]);
    late.timeout = Some(Duration::from_millis(100));
    assert_eq!(fake_front_door(&state, late).await.0, "TOO_LATE");

    // Admission: with the device held and the queue (1) taken, the next call is refused.
    let held = {
        let state = state.clone();
        tokio::spawn(async move { fake_front_door(&state, FakeRequest::new("m", vec![5.0])).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake_front_door(&state, FakeRequest::new("m", vec![7.0]))
            .await
            .0,
        "EXHAUSTED"
    );
    // Tokens for the late call's batch, still in the device, and for the held one.
    open.send(()).unwrap();
    open.send(()).unwrap();
    assert_eq!(held.await.unwrap(), ("OK", Some(vec![5.0])));

    // Request metrics, labelled with the front door's protocol and its own codes.
    let text = state.render_metrics().await;
    for (status, n) in [
        ("OK", 2.0),
        ("NO_AUTH", 1.0),
        ("TOO_LATE", 1.0),
        ("EXHAUSTED", 1.0),
    ] {
        let got = metric(
            &text,
            "ortserve_requests_total",
            &[("model", "m"), ("protocol", "fake"), ("status", status)],
        );
        assert_eq!(got, n, "{status}\n{text}");
    }
    // Names that are not served do not become label values.
    assert_eq!(
        metric(
            &text,
            "ortserve_requests_total",
            &[("model", ""), ("protocol", "fake"), ("status", "NOT_FOUND")],
        ),
        1.0
    );
    state.stop_models().await;
}
