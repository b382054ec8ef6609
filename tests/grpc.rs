//! The gRPC front door over a real socket, driven by the Rust client generated from the same
//! protos: every RPC, inference that matches REST bit for bit, every error kind with its status
//! code, the request id and metrics, the health service, and the drain.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::app::AppState;
use ortserve::grpc::proto::health::health_client::HealthClient;
use ortserve::grpc::proto::health::HealthCheckRequest;
use ortserve::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ortserve::grpc::proto::inference::model_infer_request::InferRequestedOutputTensor;
use ortserve::grpc::proto::inference::*;
use ortserve::tensor::{DataType, Tensor};
use rand::SeedableRng;
use tonic::transport::Channel;
use tonic::Code;

type Client = GrpcInferenceServiceClient<Channel>;

/// A server from `yaml` (model paths relative to tests/fixtures) serving HTTP and gRPC on
/// loopback ports; dropping `stop` drains it.
struct Running {
    state: Arc<AppState>,
    grpc: SocketAddr,
    router: axum::Router,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(yaml: &str) -> Running {
        let server = ortserve::start(&config(yaml)).await.expect("server starts");
        Running::serve(server.state().clone(), move |listeners, stopped| {
            tokio::spawn(server.serve(listeners, stopped))
        })
        .await
    }

    /// Serves an existing state (a fake model's) on gRPC only.
    async fn over(state: Arc<AppState>, server: ortserve::config::ServerConfig) -> Running {
        Running::serve(state.clone(), move |listeners, stopped| {
            tokio::spawn(async move {
                let l = listeners.grpc.unwrap();
                ortserve::grpc::serve(state, &server, l, stopped).await
            })
        })
        .await
    }

    async fn serve(
        state: Arc<AppState>,
        spawn: impl FnOnce(
            ortserve::Listeners,
            std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ) -> tokio::task::JoinHandle<std::io::Result<()>>,
    ) -> Running {
        let http = ortserve::http::bind("127.0.0.1:0", 64).await.unwrap();
        let grpc = ortserve::http::bind("127.0.0.1:0", 64).await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = ortserve::Listeners {
            http,
            admin: None,
            grpc: Some(grpc),
        };
        let task = spawn(
            listeners,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        );
        Running {
            router: ortserve::http::router(state.clone()),
            state,
            grpc: addr,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)
    }

    async fn health(&self) -> HealthClient<Channel> {
        HealthClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        drop(self.stop.take());
        self.task.await.unwrap().unwrap();
        self.state.stop_models().await;
    }
}

const MODELS: &str = "
server: {drain_delay: 0s}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
  - {name: cnn, path: cnn.onnx, devices: cpu, batching: {max_batch_size: 4}}";

/// `r` with `change` made to it.
fn changed(
    mut r: ModelInferRequest,
    change: impl FnOnce(&mut ModelInferRequest),
) -> ModelInferRequest {
    change(&mut r);
    r
}

/// [`ortserve::grpc::raw_request`] with an id to echo.
fn raw_request(model: &str, inputs: &[(&str, &Tensor)]) -> ModelInferRequest {
    ModelInferRequest {
        id: "req-7".into(),
        ..ortserve::grpc::raw_request(model, inputs)
    }
}

fn typed_request(model: &str, name: &str, t: &Tensor) -> ModelInferRequest {
    let mut req = raw_request(model, &[(name, t)]);
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: t.to_f32(),
        ..Default::default()
    });
    req
}

/// The raw bytes of each output of a REST binary-extension answer.
fn rest_raw_outputs(reply: &Reply) -> Vec<(String, Vec<u8>)> {
    reply.assert_status(200);
    let n: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&reply.body[..n]).unwrap();
    let mut rest = &reply.body[n..];
    head["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
            let (mine, tail) = rest.split_at(size);
            rest = tail;
            (o["name"].as_str().unwrap().to_string(), mine.to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_over_a_real_socket() {
    let server = Running::start(MODELS).await;
    let mut c = server.client().await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "ortserve");
    assert!(meta.extensions.contains(&"model_repository".to_string()));
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    for (name, version, want) in [
        ("mlp", "", true),
        ("mlp", "1", true),
        ("mlp", "7", false),
        ("nope", "", false),
    ] {
        let got = c
            .model_ready(ready(name, version))
            .await
            .unwrap()
            .into_inner()
            .ready;
        assert_eq!(got, want, "{name} {version}");
    }
    let m = c
        .model_metadata(ModelMetadataRequest {
            name: "cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions, ["1"]);
    assert_eq!(m.platform, "onnxruntime_onnx");
    assert_eq!(m.inputs[0].datatype, "FP32");
    assert_eq!(m.inputs[0].shape, [-1, 3, 64, 64]);
    let index = c
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let states: Vec<_> = index
        .models
        .iter()
        .map(|e| (e.name.as_str(), e.state.as_str()))
        .collect();
    assert_eq!(states, [("cnn", "READY"), ("mlp", "READY")]);
    // Load and unload need `model_control: explicit`, as on REST.
    let refused = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "mlp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("model_control"), "{refused:?}");

    let mut h = server.health().await;
    for service in ["", "inference.GRPCInferenceService"] {
        let s = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, 1, "SERVING for {service:?}");
    }
    let unknown = h
        .check(HealthCheckRequest {
            service: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.shutdown().await;
}

/// The same inputs give the same output bytes over gRPC (raw and typed contents) and REST's
/// binary extension, for the MLP and the CNN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_matches_rest_bit_for_bit() {
    let server = Running::start(MODELS).await;
    let mut c = server.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    // Eight CNN rows are a 384 KiB message: with typed contents heavy to decode, so decoded
    // (and converted) on the preprocessing pool; with raw contents light, so decoded in the
    // connection's task (grpc's census.rs, `check_within`).
    for (model, shape) in [
        ("mlp", vec![3, 4]),
        ("cnn", vec![2, 3, 64, 64]),
        ("cnn", vec![8, 3, 64, 64]),
    ] {
        let x = random_tensor(DataType::F32, shape, &mut rng);
        let (body, header_len) = v2_binary(&[("input", &x)]);
        let rest = send(
            &server.router,
            Request::post(format!("/v2/models/{model}/infer"))
                .header("inference-header-content-length", header_len)
                .header("content-type", "application/octet-stream")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
        let rest = rest_raw_outputs(&rest);
        for req in [
            raw_request(model, &[("input", &x)]),
            typed_request(model, "input", &x),
        ] {
            let r = c.model_infer(req).await.unwrap();
            assert!(r.metadata().get("x-request-id").is_some());
            let r = r.into_inner();
            assert_eq!(
                (r.model_name.as_str(), r.model_version.as_str()),
                (model, "1")
            );
            assert_eq!(r.id, "req-7", "the id is echoed");
            assert_eq!(r.outputs.len(), rest.len());
            for ((out, raw), (name, bytes)) in
                r.outputs.iter().zip(&r.raw_output_contents).zip(&rest)
            {
                assert_eq!(&out.name, name);
                assert_eq!(out.datatype, "FP32");
                assert_eq!(out.shape[0], x.shape[0] as i64);
                assert_eq!(&raw[..], &bytes[..], "{model}: {name} differs from REST");
            }
        }
    }
    // One output asked for by name; the request id given is echoed in the metadata.
    let x = random_tensor(DataType::F32, vec![1, 4], &mut rng);
    let mut req = tonic::Request::new(ModelInferRequest {
        outputs: vec![InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        ..raw_request("mlp", &[("input", &x)])
    });
    req.metadata_mut()
        .insert("x-request-id", "trace-me-1".parse().unwrap());
    let r = c.model_infer(req).await.unwrap();
    assert_eq!(r.metadata().get("x-request-id").unwrap(), "trace-me-1");
    assert_eq!(r.into_inner().outputs.len(), 1);
    let text = server.state.render_metrics().await;
    let ok = [
        ("model", "mlp"),
        ("route", "ModelInfer"),
        ("status", "OK"),
        ("protocol", "grpc"),
    ];
    assert_eq!(metric(&text, "ortserve_requests_total", &ok), 3.0);
    // The statistics extension over gRPC says the same as over REST.
    let stats = c
        .model_statistics(ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let m = &stats.model_stats[0];
    let rest: serde_json::Value = get(&server.router, "/v2/models/mlp/stats").await.json();
    let r = &rest["model_stats"][0];
    assert_eq!(m.inference_count, r["inference_count"].as_u64().unwrap());
    assert_eq!(m.execution_count, r["execution_count"].as_u64().unwrap());
    let success = m.inference_stats.as_ref().unwrap().success.unwrap();
    assert_eq!(
        (success.count, success.ns),
        (
            r["inference_stats"]["success"]["count"].as_u64().unwrap(),
            r["inference_stats"]["success"]["ns"].as_u64().unwrap()
        )
    );
    // On the MLP: REST's request and two gRPC ones of 3 rows, then one of 1 row.
    assert_eq!((success.count, m.inference_count), (4, 3 + 3 + 3 + 1));
    let every = c
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(every.model_stats.len(), 2);
    server.shutdown().await;
}

/// Requests that are wrong: INVALID_ARGUMENT with what is wrong, or NOT_FOUND; nothing is
/// allocated for a shape the bytes do not back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_have_their_codes() {
    let server = Running::start(MODELS).await;
    let mut c = server.client().await;
    let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let good = || raw_request("mlp", &[("input", &x)]);

    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            ModelInferRequest {
                model_name: "nope".into(),
                ..good()
            },
            Code::NotFound,
            "nope",
        ),
        (
            "unknown version",
            ModelInferRequest {
                model_version: "9".into(),
                ..good()
            },
            Code::NotFound,
            "9",
        ),
        (
            "a huge shape with 16 bytes",
            changed(good(), |r| r.inputs[0].shape = vec![1 << 40, 1 << 20]),
            Code::InvalidArgument,
            "input",
        ),
        (
            "raw bytes that do not fit the shape",
            changed(good(), |r| r.inputs[0].shape = vec![2, 4]),
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "two raw entries for one input",
            changed(good(), |r| r.raw_input_contents.push(x.data.clone())),
            Code::InvalidArgument,
            "raw_input_contents",
        ),
        (
            "a negative size",
            changed(good(), |r| r.inputs[0].shape = vec![-1, 4]),
            Code::InvalidArgument,
            "negative",
        ),
        (
            "BYTES",
            changed(good(), |r| r.inputs[0].datatype = "BYTES".into()),
            Code::InvalidArgument,
            "BYTES",
        ),
        (
            "an unknown output",
            ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor {
                    name: "nope".into(),
                    ..Default::default()
                }],
                ..good()
            },
            Code::InvalidArgument,
            "nope",
        ),
        (
            "the wrong input name",
            changed(good(), |r| r.inputs[0].name = "other".into()),
            Code::InvalidArgument,
            "other",
        ),
        (
            "the wrong columns",
            raw_request(
                "mlp",
                &[(
                    "input",
                    &Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap(),
                )],
            ),
            Code::InvalidArgument,
            "input",
        ),
        (
            "a timeout parameter that is text",
            changed(good(), |r| {
                r.parameters.insert(
                    "timeout".into(),
                    InferParameter {
                        parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(
                            "soon".into(),
                        )),
                    },
                );
            }),
            Code::InvalidArgument,
            "timeout",
        ),
    ];
    for (what, req, code, says) in cases {
        let e = c.model_infer(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {e:?}");
        assert!(e.metadata().get("x-request-id").is_some(), "{what}");
    }
    // A bad grpc-timeout.
    let mut req = tonic::Request::new(good());
    req.metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    assert_eq!(
        c.model_infer(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A message over max_body_bytes (16 MiB by default).
    let big = Tensor::new(DataType::F32, vec![1 << 20, 4], vec![0u8; 1 << 24]).unwrap();
    let e = c
        .model_infer(raw_request("mlp", &[("input", &big)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // The server still answers.
    c.model_infer(good()).await.unwrap();
    server.shutdown().await;
}

/// The MLP behind bearer auth, its one token `s3cret-token-of-16+` read from `env` (a variable
/// of the test's own, so that tests running at once do not share it).
async fn with_token(env: &str) -> Running {
    std::env::set_var(env, "s3cret-token-of-16+");
    let mut cfg = config(&format!(
        "server: {{drain_delay: 0s, auth: {{tokens_env: {env}}}}}\nmodels:\n  - {{name: mlp, path: mlp.onnx, devices: cpu, batching: {{max_batch_size: 8}}}}"
    ));
    cfg.load_tokens(|k| std::env::var(k).ok()).unwrap();
    let server = ortserve::start(&cfg).await.unwrap();
    Running::serve(server.state().clone(), move |listeners, stopped| {
        tokio::spawn(server.serve(listeners, stopped))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_applies_to_model_rpcs_and_not_to_health() {
    let server = with_token("ORTSERVE_GRPC_TEST_TOKENS").await;
    let mut c = server.client().await;
    let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let e = c
        .model_infer(raw_request("mlp", &[("input", &x)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(raw_request("mlp", &[("input", &x)]));
    req.metadata_mut().insert(
        "authorization",
        "Bearer s3cret-token-of-16+".parse().unwrap(),
    );
    c.model_infer(req).await.unwrap();
    // Probes stay open.
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    server.shutdown().await;
}

/// A full queue (RESOURCE_EXHAUSTED), a deadline that passes in the queue
/// (DEADLINE_EXCEEDED), no healthy device (UNAVAILABLE), a failing run (INTERNAL): the request
/// core's kinds, each with its code, on a model whose one device holds every batch until let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_deadlines_and_device_faults_have_their_codes() {
    let (served, _router, open) = gated_server(1);
    let server = Running::over(served.arc(), ortserve::config::ServerConfig::default()).await;
    let c = server.client().await;
    let one = |v: f32| {
        let t = Tensor::from_f32(vec![1, 1], &[v]).unwrap();
        raw_request("gated", &[("x", &t)])
    };
    // The first call holds the device; the second waits in the queue (capacity 1 counts what
    // is queued or running); the third is refused.
    let held = tokio::spawn({
        let mut c = c.clone();
        let r = one(1.0);
        async move { c.model_infer(r).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c2 = c.clone();
    let full = c2.model_infer(one(2.0)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    open.send(()).unwrap();
    held.await.unwrap().unwrap();

    // A deadline of 100 ms (`parameters.timeout`, in microseconds, as Triton takes it) while
    // the device holds the batch: the server answers DEADLINE_EXCEEDED.
    let mut req = one(3.0);
    req.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(100_000)),
        },
    );
    let started = std::time::Instant::now();
    let late = c2.model_infer(req).await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let exceeded = [
        ("model", "gated"),
        ("route", "ModelInfer"),
        ("status", "DEADLINE_EXCEEDED"),
        ("protocol", "grpc"),
    ];
    let text = server.state.render_metrics().await;
    assert_eq!(metric(&text, "ortserve_requests_total", &exceeded), 1.0);
    // The same deadline as `grpc-timeout`: the client gives up at its deadline too (tonic says
    // CANCELLED and resets the stream, which may reach the server before its own answer).
    let mut req = tonic::Request::new(one(3.5));
    req.metadata_mut()
        .insert("grpc-timeout", "100m".parse().unwrap());
    let started = std::time::Instant::now();
    let late = c2.model_infer(req).await.unwrap_err();
    assert!(
        matches!(late.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{late:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    open.send(()).unwrap();

    served.set_healthy(0, false);
    let down = c2.model_infer(one(4.0)).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    served.set_healthy(0, true);
    // A run that fails on the device (the gated runner fails a negative first value): INTERNAL,
    // with no details beyond the message the REST path gives. (Tokens for the batch of the
    // grpc-timeout call still waiting on the gate, and for this one.)
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    let failed = c2.model_infer(one(-1.0)).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    drop(open);
    server.shutdown().await;
}

/// SIGTERM's drain as gRPC sees it: health turns NOT_SERVING at once while calls are still
/// answered for the drain delay; then the server sends GOAWAY, the calls in flight finish, and
/// no call on the open connection failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_answers_every_call_and_health_turns_not_serving() {
    let server = Running::start(
        "server: {drain_delay: 500ms, shutdown_timeout: 5s}\nmodels:\n  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    let c = server.client().await;
    let mut h = server.health().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut c, stop) = (c.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
            let (mut ok, mut failed) = (0usize, Vec::new());
            // Bounded: at most 20,000 calls each.
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match c.model_infer(raw_request("mlp", &[("input", &x)])).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed.push(e);
                        break;
                    }
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Running {
        state,
        stop: s,
        task,
        ..
    } = server;
    state.start_draining();
    drop(s);
    let during = h
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(during.status, 2, "NOT_SERVING while draining");
    // Past the drain delay: GOAWAY comes while the clients are calling.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        answered += ok;
        // After GOAWAY a client's next call finds the connection closing: it was never taken
        // by the server (UNAVAILABLE; tonic's CANCELLED "connection closed" or "connection was
        // not ready", hyper's words for a request it could not send; or a stream above the
        // GOAWAY's last stream id, which tonic reports as INTERNAL with the GoAway), and
        // clients retry it on another server. Nothing else; and the count below shows that no
        // call the server took went unanswered.
        for e in &failed {
            let text = format!("{e:?}");
            let unsent = ["connection closed", "connection was not ready"]
                .iter()
                .any(|w| text.contains(w));
            let closed = e.code() == Code::Unavailable
                || (e.code() == Code::Cancelled && unsent)
                || (e.code() == Code::Internal && text.contains("GoAway"));
            assert!(closed, "{e:?}");
        }
    }
    assert!(answered > 10, "{answered} calls answered");
    task.await.unwrap().unwrap();
    // Every call the server answered reached its client: none was answered and lost.
    let text = state.render_metrics().await;
    let ok = [
        ("model", "mlp"),
        ("route", "ModelInfer"),
        ("status", "OK"),
        ("protocol", "grpc"),
    ];
    assert_eq!(
        metric(&text, "ortserve_requests_total", &ok),
        answered as f64
    );
    state.stop_models().await;
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const H2_DATA: u8 = 0;
const H2_HEADERS: u8 = 1;
const H2_RST_STREAM: u8 = 3;
const H2_SETTINGS: u8 = 4;
const H2_GOAWAY: u8 = 7;

/// A connection to `addr` past the HTTP/2 preface, the server's SETTINGS acknowledged; returns
/// it and the SETTINGS' payload.
async fn h2_handshake(addr: SocketAddr) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    let settings = loop {
        let (kind, flags, _, payload) = read_h2_frame(&mut s).await.unwrap();
        if kind == H2_SETTINGS && flags & 1 == 0 {
            break payload;
        }
    };
    s.write_all(&h2_frame(H2_SETTINGS, 1, 0, &[]))
        .await
        .unwrap();
    (s, settings)
}

/// A gRPC call's header block to `path`, as HPACK literals (never indexed, no Huffman).
fn grpc_call_headers(path: &str) -> Vec<u8> {
    grpc_call_headers_with(path, &[])
}

/// [`grpc_call_headers`] with `extra` headers after the call's own.
fn grpc_call_headers_with(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for &(name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    .iter()
    .chain(extra)
    {
        block.push(0x10);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// `m` as a gRPC length-prefixed message (not compressed), as a DATA frame carries it.
fn grpc_message(m: &impl prost::Message) -> Vec<u8> {
    let encoded = m.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed
}

/// The next frame from `s`: (type, flags, stream, payload).
async fn read_h2_frame(s: &mut tokio::net::TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// The server takes DATA frames of up to 64 KiB (it says so in its SETTINGS): a 48 KiB CNN call
/// arrives in one frame, read at once and decoded in place, instead of three 16 KiB frames (the
/// protocol's default, which made such calls a quarter slower than REST binary;
/// docs/BENCHMARKS.md). A client that sends the call as one frame is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_48_kib_call_comes_in_one_frame() {
    use tokio::io::AsyncWriteExt;
    let server = Running::start(MODELS).await;
    let (mut s, settings) = h2_handshake(server.grpc).await;
    // The server's SETTINGS: SETTINGS_MAX_FRAME_SIZE (0x5) is 64 KiB.
    let max_frame = settings
        .chunks(6)
        .find(|e| e[..2] == [0, 5])
        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
    assert_eq!(max_frame, Some(ortserve::grpc::MAX_FRAME_BYTES));
    assert_eq!(ortserve::grpc::MAX_FRAME_BYTES, 64 * 1024);

    // The call's HEADERS, then the message in one DATA frame.
    let block = grpc_call_headers("/inference.GRPCInferenceService/ModelInfer");
    s.write_all(&h2_frame(H2_HEADERS, 0x4, 1, &block))
        .await
        .unwrap();
    let x = Tensor::from_f32(vec![1, 3, 64, 64], &vec![0.25; 3 * 64 * 64]).unwrap();
    let body = grpc_message(&raw_request("cnn", &[("input", &x)]));
    assert!(body.len() > 48 * 1024 && body.len() <= 64 * 1024);
    s.write_all(&h2_frame(H2_DATA, 0x1, 1, &body))
        .await
        .unwrap();

    // The answer: a DATA frame on stream 1 with the output message, no GOAWAY.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (kind, _, stream, payload) = read_h2_frame(&mut s).await.unwrap();
            assert_ne!(kind, H2_GOAWAY, "the connection was ended: {payload:?}");
            if kind == H2_DATA && stream == 1 && !payload.is_empty() {
                break payload;
            }
        }
    })
    .await
    .expect("answered within 10 s");
    let answer: ModelInferResponse = prost::Message::decode(&answered[5..]).unwrap();
    assert_eq!(answer.id, "req-7");
    assert_eq!(answer.model_name, "cnn");
    assert_eq!(answer.raw_output_contents.len(), 1);
    drop(s);
    server.shutdown().await;
}

/// A connection with no call open for `server.keep_alive_timeout` is sent GOAWAY and closed
/// (a client that only answers pings would otherwise hold one of `max_connections` places for
/// ever); one whose `Health/Watch` stream stays open is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_an_open_watch_keeps_its_own() {
    use tokio::io::AsyncWriteExt;
    let server = Running::start(
        "
server: {drain_delay: 0s, keep_alive_timeout: 1s}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    let started = std::time::Instant::now();
    let (mut idle, _) = h2_handshake(server.grpc).await;
    let (mut watching, _) = h2_handshake(server.grpc).await;
    let block = grpc_call_headers("/grpc.health.v1.Health/Watch");
    watching
        .write_all(&h2_frame(H2_HEADERS, 0x4, 1, &block))
        .await
        .unwrap();
    // An empty HealthCheckRequest (the server as a whole), and the end of the request.
    watching
        .write_all(&h2_frame(H2_DATA, 0x1, 1, &[0, 0, 0, 0, 0]))
        .await
        .unwrap();

    // The idle one: GOAWAY (or the close) after about a second, within five.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_h2_frame(&mut idle).await {
                Ok((H2_GOAWAY, ..)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an idle connection was kept for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );

    // The watching one: its stream answers SERVING and the connection is neither sent GOAWAY
    // nor closed until 2.5 s (2.5 timeouts) after the start.
    let mut answered = false;
    let watched = tokio::time::timeout_at(
        tokio::time::Instant::from_std(started + Duration::from_millis(2500)),
        async {
            loop {
                let (kind, _, stream, payload) = read_h2_frame(&mut watching)
                    .await
                    .expect("the watching connection was closed");
                assert_ne!(kind, H2_GOAWAY, "a connection with an open Watch was ended");
                if kind == H2_DATA && stream == 1 && !payload.is_empty() {
                    answered = true;
                }
                if answered && started.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
        },
    )
    .await;
    assert!(watched.is_err(), "the watch ended early");
    assert!(answered, "the watch was not answered");
    drop((idle, watching));
    server.shutdown().await;
}

/// Messages of 256 KiB and more are decoded and converted on the preprocessing pool (grpc's
/// fast.rs): their errors keep the small calls' codes and order (an unknown model before a
/// shape that does not match its contents, auth before both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_keeps_the_codes_of_a_small_one() {
    let s = Running::start(MODELS).await;
    let mut client = s.client().await;
    // 100,000 FP32 values: 400 KB of typed contents.
    let x = Tensor::from_f32(vec![1, 100_000], &vec![0.5; 100_000]).unwrap();
    let mut wrong = typed_request("mlp", "input", &x);
    wrong.inputs[0].shape = vec![1, 99_999];
    let e = client.model_infer(wrong.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("99999"), "{}", e.message());
    wrong.model_name = "nope".into();
    let e = client.model_infer(wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Right in size but not the model's shape: refused by the core, as a small call is.
    let e = client
        .model_infer(typed_request("mlp", "input", &x))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    s.shutdown().await;
}

/// Sends `message` (any bytes) as a `ModelInfer` call's message and returns the status.
async fn raw_call(server: &Running, message: Vec<u8>, token: Option<&str>) -> tonic::Status {
    raw_call_to(server, "ModelInfer", message, token).await
}

/// Sends `message` (any bytes) as the message of a call to `rpc` of the inference service and
/// returns the status.
async fn raw_call_to(
    server: &Running,
    rpc: &str,
    message: Vec<u8>,
    token: Option<&str>,
) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    struct Raw;
    struct RawEncoder;
    struct RawDecoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }
    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = format!("/inference.GRPCInferenceService/{rpc}")
        .parse()
        .unwrap();
    grpc.unary::<_, Vec<u8>, _>(req, path, Raw)
        .await
        .expect_err("not protobuf")
}

/// With auth on, a message from a client without a valid token is refused before it is read
/// or decoded (grpc's fast.rs), whatever its size: bytes that are not protobuf get
/// UNAUTHENTICATED, and with the token the decoder's INTERNAL. Small messages were decoded
/// first: a client without a token could keep a connection's task decoding (a review measured
/// a valid caller's calls at 250-790 ms meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_token_is_not_decoded() {
    let server = with_token("ORTSERVE_GRPC_TEST_TOKENS_LARGE").await;
    for size in [64, 300_000] {
        let garbage = vec![0xff; size];
        let e = raw_call(&server, garbage.clone(), None).await;
        assert_eq!(e.code(), Code::Unauthenticated, "{size}: {e:?}");
        let e = raw_call(&server, garbage.clone(), Some("not-the-token-at-all")).await;
        assert_eq!(e.code(), Code::Unauthenticated, "{size}: {e:?}");
        let e = raw_call(&server, garbage, Some("s3cret-token-of-16+")).await;
        assert_eq!(e.code(), Code::Internal, "{size}: {e:?}");
        assert!(e.message().contains("decode"), "{}", e.message());
    }
    server.shutdown().await;
}

/// A client that never opens its flow-control window gets no answer, and the answer it leaves
/// unread counts against the body-memory budget (grpc's outbox.rs): here it leaves too little
/// for another client's request, which is refused with UNAVAILABLE. Once nothing has
/// been written for `write_timeout` its connection is closed and the budget is whole again. A
/// review held 2.3 GB of answers this way, for as long as the client kept its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_never_reads_are_counted_until_its_connection_is_closed() {
    let server = Running::start(
        "server: {drain_delay: 0s, write_timeout: 1s, max_body_bytes: 1KiB, max_body_memory: 1100B}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 64}}",
    )
    .await;
    // 40 rows: a message of about 680 bytes, an answer of about 530.
    let x = Tensor::from_f32(vec![40, 4], &[0.5; 160]).unwrap();
    let request = || raw_request("mlp", &[("input", &x)]);
    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .initial_stream_window_size(0)
        .initial_connection_window_size(0)
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut unread = GrpcInferenceServiceClient::new(channel);
    let r = request();
    let unread = tokio::spawn(async move { unread.model_infer(r).await });
    // Its answer made (the call is recorded then) and owed: another client's request does not
    // fit beside it.
    let answered = || async {
        metric(
            &server.state.render_metrics().await,
            "ortserve_requests_total",
            &[("route", "ModelInfer"), ("status", "OK")],
        )
    };
    for _ in 0..500 {
        if answered().await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(answered().await, 1.0, "the unread call was not answered");
    let mut other = server.client().await;
    let mut refused = None;
    for _ in 0..100 {
        match other.model_infer(request()).await {
            Err(e) if e.code() == Code::Unavailable => {
                refused = Some(started.elapsed());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let refused = refused.expect("never refused while an answer was owed");
    assert!(refused < Duration::from_secs(1), "{refused:?}");
    let e = unread
        .await
        .unwrap()
        .expect_err("an answer through a closed window");
    assert_ne!(e.code(), Code::Ok);
    let closed = started.elapsed();
    assert!(closed >= Duration::from_secs(1), "{closed:?}");
    assert!(closed < Duration::from_secs(10), "{closed:?}");
    other
        .model_infer(request())
        .await
        .expect("the budget is whole again");
    server.shutdown().await;
}

/// Messages whose decoding would allocate far more than they hold are refused before they are
/// decoded (grpc's census.rs): 4 MB of empty `inputs` entries, 2 bytes each on the wire and
/// about 300 decoded (a review saw 3.8 GB of memory for 16 MB of them). Calls refused before
/// their message is decoded are answered with the request id and counted like any other, and
/// a status quoting a client's long model name is cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_refused_before_decoding_and_recorded() {
    let server = Running::start(MODELS).await;
    let counted = |text: &str, status: &str| {
        metric(
            text,
            "ortserve_requests_total",
            &[
                ("route", "ModelInfer"),
                ("protocol", "grpc"),
                ("status", status),
            ],
        )
    };
    let before = server.state.render_metrics().await;
    let empties = [0x2a, 0x00].repeat(2_000_000);
    let e = raw_call(&server, empties, None).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("more than 1024 inputs"),
        "{}",
        e.message()
    );
    assert!(e.metadata().get("x-request-id").is_some(), "{e:?}");
    let e = raw_call(&server, vec![0xff; 64], None).await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.metadata().get("x-request-id").is_some(), "{e:?}");
    let after = server.state.render_metrics().await;
    for status in ["INVALID_ARGUMENT", "INTERNAL"] {
        assert_eq!(
            counted(&after, status) - counted(&before, status),
            1.0,
            "{status}: {after}"
        );
    }

    let mut c = server.client().await;
    let long = "m".repeat(20_000);
    let e = c
        .model_metadata(ModelMetadataRequest {
            name: long.clone(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().len() <= 1100, "{} bytes", e.message().len());
    let e = c
        .model_infer(ModelInferRequest {
            model_name: long,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    server.shutdown().await;
}

/// The repository calls' `parameters` maps are counted before tonic decodes them: a 15 MB map
/// of 1.9 million distinct keys decoded to about 100 bytes a key, on the connection's task, for
/// 1-5 s a call, before the call was refused (four such calls took the server from 50 to 467
/// MiB). Past 1,024 entries a call is now refused unread, recorded as the others are; up to
/// 1,024 it is served as before. And what is not gRPC (`content-type`) gets HTTP 415, as the
/// protocol asks, not a status 200 an HTTP client could take for success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_maps_are_counted_first_and_what_is_not_grpc_gets_415() {
    let server = Running::start(MODELS).await;
    let mut c = server.client().await;
    let load = |entries: usize| RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: "mlp".into(),
        parameters: (0..entries)
            .map(|i| (format!("k{i}"), ModelRepositoryParameter::default()))
            .collect(),
    };
    // Served as before up to the limit: models are fixed at startup here.
    let plain = c.repository_model_load(load(0)).await.unwrap_err();
    let at_limit = c.repository_model_load(load(1024)).await.unwrap_err();
    assert_eq!(plain.code(), Code::InvalidArgument, "{plain:?}");
    assert_eq!(
        (at_limit.code(), at_limit.message()),
        (plain.code(), plain.message())
    );
    let before = server.state.render_metrics().await;
    let over = c.repository_model_load(load(1025)).await.unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument, "{over:?}");
    assert!(
        over.message().contains("more than 1024 parameters"),
        "{over:?}"
    );
    assert!(over.metadata().get("x-request-id").is_some(), "{over:?}");
    let e = c
        .repository_model_unload(RepositoryModelUnloadRequest {
            repository_name: String::new(),
            model_name: "mlp".into(),
            parameters: load(1025).parameters,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("more than 1024 parameters"), "{e:?}");
    let e = raw_call_to(&server, "RepositoryModelLoad", vec![0xff; 64], None).await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("decode"), "{e:?}");
    let after = server.state.render_metrics().await;
    let counted = |text: &str, route: &str| {
        metric(
            text,
            "ortserve_requests_total",
            &[
                ("route", route),
                ("protocol", "grpc"),
                ("status", "INVALID_ARGUMENT"),
            ],
        )
    };
    for route in ["RepositoryModelLoad", "RepositoryModelUnload"] {
        assert_eq!(
            counted(&after, route) - counted(&before, route),
            1.0,
            "{route}: {after}"
        );
    }

    // Not gRPC: HTTP 415 with INTERNAL, on every path, not counted as a call; gRPC as
    // `+proto` and with any case is served.
    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (path, content_type, want) in [
        ("ModelInfer", Some("application/json"), 415),
        ("ModelInfer", None, 415),
        ("ServerLive", Some("text/plain"), 415),
        ("ServerLive", Some("application/grpcx"), 415),
        ("ServerLive", Some("application/grpc+json"), 415),
        ("ServerLive", Some("application/grpc-web"), 415),
        ("ServerLive", Some("application/grpc+proto"), 200),
        ("ServerLive", Some("Application/gRPC; charset=utf-8"), 200),
    ] {
        let mut req = Request::post(format!("/inference.GRPCInferenceService/{path}"))
            .header("te", "trailers");
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let req = req
            .body(tonic::body::Body::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"\0\0\0\0\0"),
            )))
            .unwrap();
        let answer = tower::ServiceExt::oneshot(channel.clone(), req)
            .await
            .unwrap();
        assert_eq!(answer.status(), want, "{path} {content_type:?}");
        if want == 415 {
            assert_eq!(
                answer.headers()["grpc-status"],
                "13",
                "{path} {content_type:?}"
            );
        }
    }
    server.shutdown().await;
}

/// A repository call loads or unloads models, so it is served once its stream has ended with
/// its one message: a call the client resets after sending its message is not served (tonic
/// waited for the end too; the first version of the counted path did not). What its headers
/// refuse (a malformed `grpc-timeout`) is answered before any of its message is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_call_is_served_once_whole_and_refused_early_by_its_headers() {
    use tokio::io::AsyncWriteExt;
    let server = Running::start(
        "
server: {drain_delay: 0s, model_control: explicit}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    let mut c = server.client().await;
    let ready = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.model_ready(ModelReadyRequest {
                name: "mlp".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .ready
        }
    };
    assert!(ready(&mut c).await);
    let message = grpc_message(&RepositoryModelUnloadRequest {
        repository_name: String::new(),
        model_name: "mlp".into(),
        parameters: Default::default(),
    });
    let path = "/inference.GRPCInferenceService/RepositoryModelUnload";

    // The whole message, no END_STREAM, then a reset: not served.
    let (mut s, _) = h2_handshake(server.grpc).await;
    s.write_all(&h2_frame(H2_HEADERS, 0x4, 1, &grpc_call_headers(path)))
        .await
        .unwrap();
    s.write_all(&h2_frame(H2_DATA, 0, 1, &message))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&h2_frame(H2_RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ready(&mut c).await, "a reset unload call was served");

    // A malformed grpc-timeout: the stream is ended before any message is sent.
    let before = server.state.render_metrics().await;
    let block = grpc_call_headers_with(path, &[("grpc-timeout", "+5S")]);
    s.write_all(&h2_frame(H2_HEADERS, 0x4, 3, &block))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (kind, flags, stream, _) = read_h2_frame(&mut s).await.unwrap();
            if kind == H2_HEADERS && stream == 3 && flags & 0x1 != 0 {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "not answered before its message was sent");
    let after = server.state.render_metrics().await;
    let refused = |text: &str| {
        metric(
            text,
            "ortserve_requests_total",
            &[
                ("route", "RepositoryModelUnload"),
                ("protocol", "grpc"),
                ("status", "INVALID_ARGUMENT"),
            ],
        )
    };
    assert_eq!(refused(&after) - refused(&before), 1.0, "{after}");
    assert!(ready(&mut c).await);

    // The same message with END_STREAM, 300 ms after the call's HEADERS: served, and timed
    // from the HEADERS.
    let before = server.state.render_metrics().await;
    s.write_all(&h2_frame(H2_HEADERS, 0x4, 5, &grpc_call_headers(path)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&h2_frame(H2_DATA, 0x1, 5, &message))
        .await
        .unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if !ready(&mut c).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "a whole unload call was not served");
    let unloads = |text: &str, what: &str| {
        metric(
            text,
            &format!("ortserve_request_duration_seconds_{what}"),
            &[("route", "RepositoryModelUnload"), ("protocol", "grpc")],
        )
    };
    // The answer is recorded once the unload has finished, which may be after `ready` said no.
    let mut after = server.state.render_metrics().await;
    for _ in 0..100 {
        if unloads(&after, "count") > unloads(&before, "count") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = server.state.render_metrics().await;
    }
    assert_eq!(
        unloads(&after, "count") - unloads(&before, "count"),
        1.0,
        "{after}"
    );
    assert!(
        unloads(&after, "sum") - unloads(&before, "sum") >= 0.3,
        "{after}"
    );
    drop(s);
    server.shutdown().await;
}
