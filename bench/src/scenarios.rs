//! The scenarios: the server on 127.0.0.1 under a keep-alive load generator, next to the
//! in-process ceiling (the same model and threads through ONNX Runtime directly), in one run.
//! docs/BENCHMARKS.md has the method and the results. Not a test: numbers, not assertions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use ortserve::config::Config;
use ortserve::device::{init_runtime, DeviceKind, DevicePlan, ModelRunner, OrtRunner};
use ortserve::grpc::proto::inference::ModelInferRequest;
use ortserve::tensor::Tensor;

use crate::client::{self, LoadResult};
use crate::cpu;
use crate::grpc_client;

/// One measured line of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub variant: String,
    pub concurrency: usize,
    pub requests_per_second: f64,
    pub rows_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub non_200: u64,
    /// Mean rows per device run over the load (from the server's `/metrics`).
    pub mean_batch: Option<f64>,
    /// Device run time / wall time over the load, summed over the devices.
    pub device_busy: Option<f64>,
    /// Cores used over the measured time, by group.
    pub cpu: Option<cpu::CpuSplit>,
    /// For the in-process batch-1 run of scenario a: ortserve's p50 at one client minus this
    /// run's median, in ms.
    pub excess_ms: Option<f64>,
    /// What this line is compared with, and the ratio.
    pub reference: Option<String>,
    pub ratio: Option<f64>,
}

impl Row {
    /// A line measured in-process: rows/s only.
    fn in_process(scenario: &str, variant: String, rows_per_second: f64) -> Row {
        Row {
            scenario: scenario.into(),
            variant,
            concurrency: 0,
            requests_per_second: 0.0,
            rows_per_second,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            errors: 0,
            non_200: 0,
            mean_batch: None,
            device_busy: None,
            cpu: None,
            excess_ms: None,
            reference: None,
            ratio: None,
        }
    }

    fn with_batch(mut self, b: Batches) -> Row {
        self.mean_batch = b.mean_rows;
        self.device_busy = b.busy;
        self
    }
}

pub struct Options {
    pub seconds: f64,
    pub warmup: f64,
    pub scenarios: Vec<char>,
    pub out_dir: PathBuf,
    /// The fixture models (the repository's tests/fixtures).
    pub fixtures: PathBuf,
    /// What scripts/setup_models.sh made (the repository's .ortserve), for scenario e.
    pub setup_dir: PathBuf,
    /// Scenario g's models (`mlp`, `cnn`, `cnn_wide`); empty: all three.
    pub oracle_models: Vec<String>,
    /// Scenario g's rounds: every line is measured once a round and reported as the median.
    pub oracle_rounds: usize,
    pub oracle_threads: usize,
    /// Scenario g's fixed caps (empty: every power of two up to the probe's largest good size).
    pub oracle_caps: Vec<u64>,
    /// Scenario g's client counts (empty: 1 and 32).
    pub oracle_clients: Vec<usize>,
}

/// A server on its own runtime (2 workers) and its own thread; stopped on drop.
struct Server {
    addr: SocketAddr,
    /// The gRPC port of an ortserve server ([`Server::start`]), which serves both.
    grpc: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds 127.0.0.1 on a 2-worker runtime (as `ortserve serve` has on this machine; one per
    /// server core when pinned) in its own
    /// thread, whose threads count as HTTP threads in the CPU split, and runs `serve` on the
    /// listener until the server is dropped. `serve` gets a sender for an error that stops it
    /// from starting (the address is only handed back once it has started), and reports the
    /// address of a gRPC listener it bound itself, if any.
    fn spawn<F, Fut>(serve: F) -> Result<Server, String>
    where
        F: FnOnce(tokio::net::TcpListener, StartReport, tokio::sync::oneshot::Receiver<()>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            crate::pin::server_thread();
            // As `ortserve serve` sizes it: a worker per core it may run on.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(crate::pin::server_cores().unwrap_or(2))
                .on_thread_start(cpu::register_http_thread)
                .on_thread_stop(cpu::unregister_http_thread)
                .enable_all()
                .build()
                .expect("server runtime");
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(format!("bind 127.0.0.1: {e}")));
                        return;
                    }
                };
                let addr = listener.local_addr().map_err(|e| e.to_string());
                serve(listener, StartReport { addr, tx: addr_tx }, stop_rx).await;
            });
        });
        let (addr, grpc) = addr_rx.recv().map_err(|e| e.to_string())??;
        Ok(Server {
            addr,
            grpc,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// ortserve with `yaml` (model paths resolved against `fixtures`), serving HTTP and, on a
    /// second port of 127.0.0.1 bound as `ortserve serve` binds it, gRPC.
    fn start(yaml: &str, fixtures: &Path) -> Result<Server, String> {
        let mut config = Config::from_yaml(yaml).map_err(|e| e.to_string())?;
        config.resolve_paths(fixtures);
        config.validate().map_err(|e| e.to_string())?;
        Server::spawn(move |listener, started, stop| async move {
            let grpc = match ortserve::http::bind("127.0.0.1:0", config.server.listen_backlog).await
            {
                Ok(l) => l,
                Err(e) => return started.failed(format!("bind 127.0.0.1 for gRPC: {e}")),
            };
            let grpc_addr = match grpc.local_addr() {
                Ok(a) => a,
                Err(e) => return started.failed(e.to_string()),
            };
            let server = match ortserve::start(&config).await {
                Ok(s) => s,
                Err(e) => return started.failed(e.to_string()),
            };
            started.ready(Some(grpc_addr));
            let listeners = ortserve::Listeners {
                http: listener,
                admin: None,
                grpc: Some(grpc),
            };
            let _ = server
                .serve(listeners, async {
                    let _ = stop.await;
                })
                .await;
        })
    }
}

/// Tells [`Server::spawn`]'s caller whether the server started: its addresses (HTTP, and gRPC
/// where it serves it), or why not.
struct StartReport {
    addr: Result<SocketAddr, String>,
    tx: std::sync::mpsc::Sender<Result<(SocketAddr, Option<SocketAddr>), String>>,
}

impl StartReport {
    fn ready(self, grpc: Option<SocketAddr>) {
        let _ = self.tx.send(self.addr.map(|a| (a, grpc)));
    }

    fn failed(self, why: String) {
        let _ = self.tx.send(Err(why));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bare axum handler, served like [`Server::start`].
fn start_hello() -> Server {
    Server::spawn(|listener, started, stop| async move {
        started.ready(None);
        let _ = crate::hello::serve(listener, async {
            let _ = stop.await;
        })
        .await;
    })
    .expect("hello started")
}

/// The HTTP stacks alone at one caller, each answering the MLP's call without a model: the bare
/// axum handler (HTTP/1.1, the body read, a few bytes answered), hyper's HTTP/2 server, the h2
/// crate under it driven directly, and hand-written HTTP/2 frames (`bare_h2.rs`, an empty gRPC
/// message answered), the last three driven by the gRPC load generator. What the protocol
/// stacks cost a call, apart from the server's work, where one caller's latency is the measure
/// (issue 29).
fn bare_stacks_one_caller(
    rt: &tokio::runtime::Runtime,
    x: &Tensor,
    o: &Options,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let hello = start_hello();
    let r = load(rt, hello.addr, v2_binary_request("/sink", "input", x), 1, o);
    rows.push(row(
        "b",
        "bare axum handler reading the same body",
        1,
        1,
        &r,
    ));
    drop(hello);
    let call = grpc_client::raw_request("mlp", &[("input", x)]);
    type Serve = fn(
        tokio::net::TcpListener,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let stacks: [(&str, Serve); 3] = [
        ("bare hyper HTTP/2 server, an empty gRPC answer", |l| {
            Box::pin(crate::bare_h2::serve_hyper(l))
        }),
        ("bare h2 crate server, an empty gRPC answer", |l| {
            Box::pin(crate::bare_h2::serve_h2(l))
        }),
        (
            "bare hand-written HTTP/2 frames, an empty gRPC answer",
            |l| Box::pin(crate::bare_h2::serve_frames(l)),
        ),
    ];
    for (name, serve) in stacks {
        let server = Server::spawn(move |listener, started, stop| async move {
            started.ready(None);
            tokio::select! {
                _ = serve(listener) => {}
                _ = stop => {}
            }
        })?;
        let r = rt.block_on(grpc_client::run(
            server.addr,
            call.clone(),
            1,
            1,
            Duration::from_secs_f64(o.warmup),
            Duration::from_secs_f64(o.seconds),
        ));
        rows.push(row("b", name, 1, 1, &r));
    }
    Ok(rows)
}

fn cpu_plan(threads: usize) -> DevicePlan {
    DevicePlan {
        device: "cpu:0".into(),
        instance: 0,
        kind: DeviceKind::Cpu {
            intra_op_threads: threads,
            spinning: false,
        },
    }
}

/// In-process: rows/s at each batch size (runs for `per_size` each), and the median latency of
/// one batch-1 run.
fn ceiling(
    model: &Path,
    threads: usize,
    row: &[Tensor],
    sizes: &[usize],
    per_size: Duration,
) -> Result<(Vec<(usize, f64)>, f64), String> {
    let threads = crate::pin::threads(threads);
    crate::pin::on_server_cores(|| ceiling_here(model, threads, row, sizes, per_size))
}

/// [`ceiling`] on the calling thread's cores.
fn ceiling_here(
    model: &Path,
    threads: usize,
    row: &[Tensor],
    sizes: &[usize],
    per_size: Duration,
) -> Result<(Vec<(usize, f64)>, f64), String> {
    init_runtime(&Default::default()).map_err(|e| e.to_string())?;
    let mut runner = OrtRunner::open(model, &cpu_plan(threads)).map_err(|e| e.to_string())?;
    let mut curve = Vec::new();
    let mut single = Vec::new();
    for &b in sizes {
        let inputs: Vec<Tensor> = row
            .iter()
            .map(|t| {
                let refs: Vec<&Tensor> = std::iter::repeat_n(t, b).collect();
                Tensor::concat(&refs).expect("same shapes")
            })
            .collect();
        let parts = [inputs];
        runner.run(&parts).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut runs = 0usize;
        while start.elapsed() < per_size {
            let t = Instant::now();
            runner.run(&parts).map_err(|e| e.to_string())?;
            if b == 1 {
                single.push(t.elapsed());
            }
            runs += 1;
        }
        curve.push((b, (runs * b) as f64 / start.elapsed().as_secs_f64()));
    }
    single.sort();
    let median = single
        .get(single.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Ok((curve, median))
}

/// In-process: `sessions` sessions of `threads` threads each, running `batch`-row batches side by
/// side for `time`; their rows/s added up (the ceiling of scenario c).
fn parallel_ceiling(
    model: &Path,
    sessions: usize,
    threads: usize,
    row: &Tensor,
    batch: usize,
    time: Duration,
) -> Result<f64, String> {
    crate::pin::on_server_cores(|| {
        init_runtime(&Default::default()).map_err(|e| e.to_string())?;
        let refs: Vec<&Tensor> = std::iter::repeat_n(row, batch).collect();
        let parts = [vec![Tensor::concat(&refs).map_err(|e| e.to_string())?]];
        let mut runners = (0..sessions)
            .map(|_| OrtRunner::open(model, &cpu_plan(threads)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let barrier = std::sync::Barrier::new(sessions);
        let counts: Vec<Result<(usize, Duration), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = runners
                .iter_mut()
                .map(|runner| {
                    let (parts, barrier) = (&parts, &barrier);
                    s.spawn(move || {
                        runner.run(parts).map_err(|e| e.to_string())?;
                        barrier.wait();
                        let start = Instant::now();
                        let mut runs = 0;
                        while start.elapsed() < time {
                            runner.run(parts).map_err(|e| e.to_string())?;
                            runs += 1;
                        }
                        Ok((runs * batch, start.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        let mut total = 0.0;
        for c in counts {
            let (rows, elapsed) = c?;
            total += rows as f64 / elapsed.as_secs_f64();
        }
        Ok(total)
    })
}

fn load(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    request: Vec<u8>,
    concurrency: usize,
    o: &Options,
) -> LoadResult {
    rt.block_on(client::run(
        addr,
        Arc::new(request),
        concurrency,
        Duration::from_secs_f64(o.warmup),
        Duration::from_secs_f64(o.seconds),
    ))
}

/// What `/metrics` showed over one load (warm-up included).
#[derive(Debug, Clone, Copy, Default)]
struct Batches {
    /// Mean rows per device run.
    mean_rows: Option<f64>,
    /// Device run time over wall time, summed over devices (2.0: two devices always running).
    busy: Option<f64>,
}

/// [`load`] against an ortserve server, with what its `/metrics` say of the batches it ran.
fn load_server(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    request: Vec<u8>,
    concurrency: usize,
    o: &Options,
) -> (LoadResult, Batches) {
    with_batches(rt, addr, || load(rt, addr, request, concurrency, o))
}

/// `ModelInfer` calls of `request` from `concurrency` callers against the gRPC port of `server`
/// for the options' warm-up and time, with what its `/metrics` say of the batches it ran.
fn load_grpc(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    request: &ModelInferRequest,
    concurrency: usize,
    per_connection: usize,
    o: &Options,
) -> Result<(LoadResult, Batches), String> {
    let grpc = server.grpc.ok_or("the server has no gRPC port")?;
    Ok(with_batches(rt, server.addr, || {
        rt.block_on(grpc_client::run(
            grpc,
            request.clone(),
            concurrency,
            per_connection,
            Duration::from_secs_f64(o.warmup),
            Duration::from_secs_f64(o.seconds),
        ))
    }))
}

/// Runs `measure` (a load against the server whose HTTP port is `addr`), and reads the
/// server's `/metrics` before and after it for the batches it ran.
fn with_batches(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    measure: impl FnOnce() -> LoadResult,
) -> (LoadResult, Batches) {
    let before = batch_totals(rt, addr);
    let started = Instant::now();
    let r = measure();
    let wall = started.elapsed().as_secs_f64();
    let after = batch_totals(rt, addr);
    let b = match (before, after) {
        (Some((s0, n0, t0)), Some((s1, n1, t1))) if n1 > n0 => Batches {
            mean_rows: Some((s1 - s0) / (n1 - n0)),
            busy: Some((t1 - t0) / wall.max(1e-9)),
        },
        _ => Batches::default(),
    };
    (r, b)
}

/// Sum and count of `ortserve_batch_size_rows`, and the summed device run time, over all models
/// and devices.
fn batch_totals(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Option<(f64, f64, f64)> {
    let text = rt.block_on(client::get(addr, "/metrics")).ok()?;
    let total = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        total("ortserve_batch_size_rows_sum"),
        total("ortserve_batch_size_rows_count"),
        total("ortserve_inference_duration_seconds_sum"),
    ))
}

fn row(
    scenario: &str,
    variant: &str,
    concurrency: usize,
    rows_per_request: usize,
    r: &LoadResult,
) -> Row {
    let non_200 = r
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum();
    Row {
        scenario: scenario.into(),
        variant: variant.into(),
        concurrency,
        requests_per_second: r.requests_per_second(),
        rows_per_second: r.requests_per_second() * rows_per_request as f64,
        p50_ms: r.percentile_ms(0.5),
        p90_ms: r.percentile_ms(0.9),
        p99_ms: r.percentile_ms(0.99),
        errors: r.errors,
        non_200,
        mean_batch: None,
        device_busy: None,
        cpu: r.cpu,
        excess_ms: None,
        reference: None,
        ratio: None,
    }
}

/// The server's V2 parser on `body` alone, in this thread: nanoseconds per number, best of five
/// rounds of about 0.2 s.
fn parse_ns_per_number(body: &[u8], numbers: usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let mut reps = 0u32;
        while start.elapsed() < Duration::from_millis(200) {
            ortserve::http::parse_v2_request(std::hint::black_box(body), None)
                .expect("the bench's body parses");
            reps += 1;
        }
        best = best.min(start.elapsed().as_nanos() as f64 / (f64::from(reps) * numbers as f64));
    }
    best
}

/// A V2 JSON body with one FP32 input, its data flat (written here, not by the server's codec).
fn v2_json_body(name: &str, t: &Tensor) -> Vec<u8> {
    let data = t.to_f32();
    serde_json::json!({"inputs": [{"name": name, "shape": t.shape, "datatype": t.dtype.v2_name(), "data": data}]})
        .to_string()
        .into_bytes()
}

fn v2_binary_request(path: &str, name: &str, t: &Tensor) -> Vec<u8> {
    let header = serde_json::json!({
        "inputs": [{"name": name, "shape": t.shape, "datatype": t.dtype.v2_name(),
                    "parameters": {"binary_data_size": t.data.len()}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&t.data);
    client::request(
        "POST",
        path,
        &[
            ("Content-Type", "application/octet-stream".into()),
            ("Inference-Header-Content-Length", header.len().to_string()),
        ],
        &body,
    )
}

fn mlp_row() -> Tensor {
    Tensor::from_f32(vec![1, 4], &[0.5, -1.0, 2.0, 0.25]).expect("shape")
}

/// The tiny MLP's V2 JSON request for `x` (scenarios a and f).
fn mlp_request(x: &Tensor) -> Vec<u8> {
    client::request(
        "POST",
        "/v2/models/mlp/infer",
        &[],
        &v2_json_body("input", x),
    )
}

fn cnn_row() -> Tensor {
    cnn_rows(1)
}

/// `n` copies of the CNN fixture's input row.
fn cnn_rows(n: usize) -> Tensor {
    let row = 3 * 64 * 64;
    let values: Vec<f32> = (0..n * row)
        .map(|i| (((i % row) * 7919) % 200) as f32 / 100.0 - 1.0)
        .collect();
    Tensor::from_f32(vec![n, 3, 64, 64], &values).expect("shape")
}

/// Runs the chosen scenarios and returns every measured line (and writes plots and JSON).
pub fn run(o: &Options) -> Result<Vec<Row>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows: Vec<Row> = Vec::new();
    let per_size = Duration::from_secs_f64((o.seconds / 4.0).clamp(0.3, 2.0));
    std::fs::create_dir_all(&o.out_dir).map_err(|e| e.to_string())?;

    if o.scenarios.contains(&'a') {
        // (a) overhead-bound: the tiny MLP, V2 JSON, one row per request.
        let hello = start_hello();
        let server = Server::start(
            "server: {drain_delay: 0s}\nruntime: {cpu_threads: 1}\nmodels: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 32, max_queue_delay: 0ms}}]",
            &o.fixtures,
        )?;
        let x = mlp_row();
        let infer = mlp_request(&x);
        let hello_req = client::request("POST", "/", &[], b"{}");
        let (_, single_ms) = ceiling(
            &o.fixtures.join("mlp.onnx"),
            1,
            std::slice::from_ref(&x),
            &[1],
            per_size,
        )?;
        for c in [1, 32] {
            let h = load(&rt, hello.addr, hello_req.clone(), c, o);
            let (s, s_batch) = load_server(&rt, server.addr, infer.clone(), c, o);
            let mut hr = row("a", "bare axum handler", c, 1, &h);
            hr.reference = Some("-".into());
            let mut sr = row("a", "ortserve V2 JSON, mlp", c, 1, &s).with_batch(s_batch);
            sr.ratio = Some(sr.requests_per_second / hr.requests_per_second.max(1e-9));
            sr.reference = Some("requests/s of the bare axum handler".into());
            rows.push(hr);
            rows.push(sr.clone());
            if c == 1 {
                rows.push(Row {
                    concurrency: 1,
                    requests_per_second: 1e3 / single_ms.max(1e-9),
                    p50_ms: single_ms,
                    excess_ms: Some(sr.p50_ms - single_ms),
                    reference: Some(format!(
                        "ortserve p50 − this = {:.3} ms",
                        sr.p50_ms - single_ms
                    )),
                    ..Row::in_process(
                        "a",
                        "in-process ORT, one batch-1 run".into(),
                        1e3 / single_ms.max(1e-9),
                    )
                });
            }
        }
    }

    if o.scenarios.contains(&'f') {
        // (f) big bodies beside small ones: the tiny MLP's p99 over V2 JSON, alone and with two
        // clients posting 16-row CNN bodies of several MB (parsed on the preprocessing pool, not
        // on the async workers the small requests need).
        let server = Server::start(
            "server: {drain_delay: 0s, max_body_bytes: 16MiB}\nruntime: {cpu_threads: 1}\nmodels: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 32, max_queue_delay: 0ms}}, {name: cnn, path: cnn.onnx, devices: cpu, batching: {max_batch_size: 16, max_queue_delay: 1ms}}]",
            &o.fixtures,
        )?;
        let small = mlp_request(&mlp_row());
        let one = cnn_row();
        let big = Tensor::concat(&[&one; 16]).map_err(|e| e.to_string())?;
        let big_body = v2_json_body("input", &big);
        let mb = big_body.len() as f64 / 1e6;
        let big = client::request("POST", "/v2/models/cnn/infer", &[], &big_body);
        let alone = load(&rt, server.addr, small.clone(), 8, o);
        let mut line = row("f", "ortserve V2 JSON, mlp, alone", 8, 1, &alone);
        line.reference = Some("-".into());
        rows.push(line);
        let (addr, warmup, seconds) = (server.addr, o.warmup, o.seconds);
        let background = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Starts with the small load's warm-up and outlasts its measured time.
            rt.block_on(client::run(
                addr,
                Arc::new(big),
                2,
                Duration::ZERO,
                Duration::from_secs_f64(warmup + seconds + 0.5),
            ))
        });
        let mixed = load(&rt, server.addr, small, 8, o);
        let big = background
            .join()
            .map_err(|_| "the big-body load panicked")?;
        let mut line = row(
            "f",
            &format!("ortserve V2 JSON, mlp, with 2 clients posting {mb:.1} MB CNN JSON"),
            8,
            1,
            &mixed,
        );
        line.reference = Some(format!(
            "big bodies: {:.1} req/s, {} not 200, p50 {:.0} ms; ratio: small p99 / alone",
            big.requests_per_second(),
            big.statuses
                .iter()
                .filter(|(s, _)| **s != 200)
                .map(|(_, n)| n)
                .sum::<u64>()
                + big.errors,
            big.percentile_ms(0.5),
        ));
        line.ratio = Some(mixed.percentile_ms(0.99) / alone.percentile_ms(0.99).max(1e-9));
        rows.push(line);
    }

    // The CNN fixture (0.4 M multiply-adds per row: moving its 48 KiB input costs more than
    // running it), `cnn_wide` (same input, about 20 M: compute-bound) and, in scenario b alone,
    // the tiny MLP (16 bytes a row: the front door's own cost per request is all there is).
    let mut models: Vec<(&str, Tensor, &[usize])> = Vec::new();
    if o.scenarios.iter().any(|s| "bcd".contains(*s)) {
        models.push(("cnn", cnn_row(), &[1, 2, 4, 8, 16, 32, 64]));
        models.push(("cnn_wide", cnn_row(), &[1, 2, 4, 8, 16, 32]));
    }
    if o.scenarios.contains(&'b') {
        models.push(("mlp", mlp_row(), &[1, 2, 4, 8, 16, 32, 64]));
    }
    for (name, x, sizes) in &models {
        let (name, x, sizes) = (*name, x, *sizes);
        let fixture = name == "cnn";
        let mlp = name == "mlp";
        let model = o.fixtures.join(format!("{name}.onnx"));
        // Two ONNX Runtime threads, or fewer when pinned to fewer cores: the ceiling and the
        // servers of scenarios b and d alike (two intra-op threads on one core take turns).
        let threads = crate::pin::threads(2);
        let (curve, _) = ceiling(&model, threads, std::slice::from_ref(x), sizes, per_size)?;
        let best = curve.iter().map(|c| c.1).fold(0.0, f64::max);
        rows.push(Row {
            reference: Some(format!("{curve:.0?}")),
            ..Row::in_process(
                "b",
                format!(
                    "in-process ceiling, {name}, {threads} threads, best of batch {:?}",
                    curve.iter().map(|c| c.0).collect::<Vec<_>>()
                ),
                best,
            )
        });
        plot_curve(&o.out_dir.join(format!("ceiling-{name}.svg")), name, &curve)?;
        let cfg = |devices: &str, batch: &str, threads: usize| {
            format!("server: {{drain_delay: 0s}}\nruntime: {{cpu_threads: {threads}}}\nmodels: [{{name: {name}, path: {name}.onnx, devices: {devices}, batching: {{max_batch_size: {batch}, max_queue_delay: 1ms, queue_capacity: 1024}}}}]")
        };
        let path = format!("/v2/models/{name}/infer");
        let bin = v2_binary_request(&path, "input", x);
        if o.scenarios.contains(&'b') {
            let server = Server::start(&cfg("cpu", "64", threads), &o.fixtures)?;
            let raw = grpc_client::raw_request(name, &[("input", x)]);
            let mut sweep = Vec::new();
            let levels: &[usize] = match name {
                "cnn" => &[1, 4, 16, 32],
                "mlp" => &[1, 32],
                _ => &[32],
            };
            for &c in levels {
                // The same tensor as V2 binary over REST, then as raw contents over gRPC, at the
                // same clients (callers), against the same server.
                let (r, mb) = load_server(&rt, server.addr, bin.clone(), c, o);
                let mut line =
                    row("b", &format!("ortserve V2 binary, {name}"), c, 1, &r).with_batch(mb);
                line.ratio = Some(line.rows_per_second / best);
                line.reference = Some("in-process ceiling".into());
                sweep.push((c, line.rows_per_second, line.p99_ms));
                rows.push(line);
                let per = grpc_client::CALLERS_PER_CONNECTION;
                let (r, mb) = load_grpc(&rt, &server, &raw, c, per, o)?;
                let mut line =
                    row("b", &format!("ortserve gRPC raw, {name}"), c, 1, &r).with_batch(mb);
                line.ratio = Some(line.rows_per_second / best);
                line.reference = Some("in-process ceiling".into());
                rows.push(line);
                if c > 1 && c < per {
                    // The same callers, each on a connection of its own as over REST: what
                    // sharing one connection costs (its frames are read and its calls decoded
                    // by one task, on one core at a time).
                    let (r, mb) = load_grpc(&rt, &server, &raw, c, 1, o)?;
                    let mut line = row(
                        "b",
                        &format!("ortserve gRPC raw, {name}, a connection a caller"),
                        c,
                        1,
                        &r,
                    )
                    .with_batch(mb);
                    line.ratio = Some(line.rows_per_second / best);
                    line.reference = Some("in-process ceiling".into());
                    rows.push(line);
                }
            }
            if fixture {
                // Calls of 8 rows (384 KiB): over both protocols' threshold for decoding on the
                // preprocessing pool instead of the connection's task, so these lines measure
                // that path (the one-row lines above never take it).
                let (c, n) = (4, 8);
                let many = cnn_rows(n);
                let (r, mb) = load_server(
                    &rt,
                    server.addr,
                    v2_binary_request(&path, "input", &many),
                    c,
                    o,
                );
                let mut line = row(
                    "b",
                    &format!("ortserve V2 binary, {name}, {n} rows a call"),
                    c,
                    n,
                    &r,
                )
                .with_batch(mb);
                line.ratio = Some(line.rows_per_second / best);
                line.reference = Some("in-process ceiling".into());
                rows.push(line);
                let raw = grpc_client::raw_request(name, &[("input", &many)]);
                for (per, how) in [
                    (grpc_client::CALLERS_PER_CONNECTION, ""),
                    (1, ", a connection a caller"),
                ] {
                    let (r, mb) = load_grpc(&rt, &server, &raw, c, per, o)?;
                    let variant = format!("ortserve gRPC raw, {name}, {n} rows a call{how}");
                    let mut line = row("b", &variant, c, n, &r).with_batch(mb);
                    line.ratio = Some(line.rows_per_second / best);
                    line.reference = Some("in-process ceiling".into());
                    rows.push(line);
                }
                plot_sweep(&o.out_dir.join("cnn-concurrency.svg"), &sweep)?;
                // The HTTP stack alone, reading the same bodies and answering a few bytes.
                let hello = start_hello();
                let sink = v2_binary_request("/sink", "input", x);
                let r = load(&rt, hello.addr, sink, 32, o);
                let mut line = row("b", "bare axum handler reading the same body", 32, 1, &r);
                line.ratio = Some(line.rows_per_second / best);
                line.reference = Some("in-process ceiling".into());
                rows.push(line);
                drop(hello);
                let body = v2_json_body("input", x);
                let parse = parse_ns_per_number(&body, x.element_count());
                let json = client::request("POST", &path, &[], &body);
                let (r, mb) = load_server(&rt, server.addr, json, 32, o);
                let mut line = row("b", "ortserve V2 JSON, cnn", 32, 1, &r).with_batch(mb);
                line.ratio = Some(line.rows_per_second / best);
                // The HTTP threads' CPU per number of the body (issue 15's measure of the JSON
                // path: reading, parsing and answering, over the numbers sent).
                let numbers = line.requests_per_second * x.element_count() as f64;
                line.reference = Some(match &line.cpu {
                    Some(c) if numbers > 0.0 => format!(
                        "in-process ceiling; HTTP threads {:.1} ns per number, the parser alone {parse:.1}",
                        c.http / numbers * 1e9
                    ),
                    _ => "in-process ceiling".into(),
                });
                rows.push(line);
            }
            if mlp {
                rows.extend(bare_stacks_one_caller(&rt, x, o)?);
            }
        }
        if o.scenarios.contains(&'c') && !mlp {
            for sessions in [1, 2] {
                let r = parallel_ceiling(&model, sessions, 1, x, 16, per_size * 2)?;
                rows.push(Row::in_process(
                    "c",
                    format!(
                        "in-process, {name}: {sessions} session(s) of 1 thread side by side, batch 16"
                    ),
                    r,
                ));
            }
            let one = (
                format!("{name}: cpu:0, 1 thread"),
                cfg("[{device: 'cpu:0', intra_op_threads: 1}]", "64", 1),
            );
            let two = (
                format!("{name}: cpu:0 + cpu:1, 1 thread each"),
                cfg("[{device: 'cpu:0', intra_op_threads: 1}, {device: 'cpu:1', intra_op_threads: 1}]", "64", 2),
            );
            rows.extend(compare(&rt, o, "c", one, two, &bin, "one slot")?);
        }
        if o.scenarios.contains(&'d') && fixture {
            let off = (
                "batching off (max_batch_size 1)".to_string(),
                cfg("cpu", "1", threads),
            );
            let on = (
                "batching on (max_batch_size 64)".to_string(),
                cfg("cpu", "64", threads),
            );
            rows.extend(compare(&rt, o, "d", off, on, &bin, "batching off")?);
        }
    }

    if o.scenarios.contains(&'g') {
        rows.extend(oracle(&rt, o)?);
    }

    if o.scenarios.contains(&'e') {
        // Absolute: the server resolves a config's relative paths against the fixtures folder.
        let root = std::path::absolute(&o.setup_dir).map_err(|e| e.to_string())?;
        let model = root.join("models/efficientnet_lite0.onnx");
        let photo = root.join("data/coffee.png");
        if !model.exists() || !photo.exists() {
            return Err("scenario e needs scripts/setup_models.sh".into());
        }
        let img = image::open(&photo).map_err(|e| e.to_string())?.into_rgb8();
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .map_err(|e| e.to_string())?;
        let server = Server::start(&format!(
            "server: {{drain_delay: 0s}}\nmodels:\n  - name: effnet\n    path: {}\n    devices: cpu\n    batching: {{max_batch_size: 8, max_queue_delay: 2ms}}\n    image: {{size: [224, 224], resize_shorter: 256, mean: [127, 127, 127], std: [128, 128, 128]}}\n    classification: {{labels: {}}}\n",
            model.display(),
            root.join("models/imagenet_labels.txt").display()
        ), &o.fixtures)?;
        let req = client::request(
            "POST",
            "/v1/models/effnet:predict",
            &[("Content-Type", "image/jpeg".into())],
            jpeg.get_ref(),
        );
        let row_t = ortserve::preprocess::preprocess(
            jpeg.get_ref(),
            &ortserve::config::ImageConfig {
                resize_shorter: Some(256),
                mean: [127.0; 3],
                std: [128.0; 3],
                ..ortserve::config::ImageConfig::new([224, 224])
            },
        )
        .map_err(|e| e.to_string())?;
        let (curve, _) = ceiling(
            &model,
            2,
            std::slice::from_ref(&row_t),
            &[1, 2, 4, 8],
            per_size,
        )?;
        let best = curve.iter().map(|c| c.1).fold(0.0, f64::max);
        rows.push(Row {
            reference: Some(format!("{curve:.1?}")),
            ..Row::in_process(
                "e",
                format!(
                    "in-process ceiling, EfficientNet-Lite0, {} threads, best of batch [1, 2, 4, 8], no decoding",
                    crate::pin::threads(2)
                ),
                best,
            )
        });
        for c in [1, 8] {
            let (r, mb) = load_server(&rt, server.addr, req.clone(), c, o);
            let mut line =
                row("e", "ortserve JPEG upload, EfficientNet-Lite0", c, 1, &r).with_batch(mb);
            line.ratio = Some(line.rows_per_second / best);
            line.reference = Some("in-process ceiling".into());
            rows.push(line);
        }
    }
    Ok(rows)
}

/// One compared line over repeated runs: its ratio (or its p50 over the in-process run, for the
/// one-client latency target) in each run, and the median.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub variant: String,
    pub concurrency: usize,
    /// What the values are.
    pub measure: String,
    pub values: Vec<f64>,
    pub median: f64,
}

/// The compared lines of every run, matched by scenario, variant and concurrency.
/// What `/v1/models/{m}/tuning` said of the first device: the chosen size, the largest good
/// size, and the cap now.
fn tuned(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    model: &str,
) -> Result<(u64, u64, u64), String> {
    let body = rt
        .block_on(client::get(addr, &format!("/v1/models/{model}/tuning")))
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let d = &v["devices"][0];
    if let Some(changes) = d["refine"]["changes"].as_array().filter(|c| !c.is_empty()) {
        // The refiner's log goes to stderr with each round's figures.
        let steps: Vec<String> = changes
            .iter()
            .map(|c| {
                format!(
                    "{}→{} {} ({:.0} rows/s, {:.1} s)",
                    c["from"],
                    c["to"],
                    c["why"].as_str().unwrap_or("?"),
                    c["rows_per_second"].as_f64().unwrap_or(0.0),
                    c["at_s"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        eprintln!("oracle {model} auto: refiner {}", steps.join(", "));
    }
    let n = |k: &str| d[k].as_u64().ok_or_else(|| format!("no {k} in {d}"));
    Ok((n("chosen")?, n("max_good")?, n("max_batch_size_now")?))
}

/// (g) The batch-size oracle (issue 25): for each fixture model, `--oracle-threads` ONNX Runtime
/// threads (one by default), binary
/// V2 requests of one row, 32 clients: the served rows/s with `max_batch_size: auto` (probed at
/// each start, `tuning.refine` on) against every fixed cap 1, 2, 4, … up to the probe's largest
/// good size; and the p50 at one client with `auto` against fixed cap 1 (and the largest cap).
/// This machine's runs differ by 10% or more from one to the next, and the best of nine noisy
/// caps is biased upward, so every line is measured in each of `rounds` rounds (the order of the
/// servers reversed every other round) and reported as its median; `auto` is compared with the
/// best of the fixed caps' medians. Pinning comes from `--server-cores`/`--client-cores`.
fn oracle(rt: &tokio::runtime::Runtime, o: &Options) -> Result<Vec<Row>, String> {
    // Absolute: the servers' relative paths resolve against the fixtures folder, and a
    // relative cache folder would land in tests/fixtures.
    let cache = std::path::absolute(o.out_dir.join("oracle-tuning-cache"))
        .map_err(|e| format!("{}: {e}", o.out_dir.display()))?;
    let mut rows = Vec::new();
    for (name, x) in [
        ("mlp", mlp_row()),
        ("cnn", cnn_row()),
        ("cnn_wide", cnn_row()),
    ] {
        if !o.oracle_models.is_empty() && !o.oracle_models.iter().any(|m| m == name) {
            continue;
        }
        let cfg = |batch: &str| {
            format!(
                "server: {{drain_delay: 0s}}\nruntime: {{cpu_threads: {}}}\nmodels: [{{name: {name}, path: {name}.onnx, devices: cpu, batching: {{max_batch_size: {batch}, max_queue_delay: 1ms, queue_capacity: 1024}}, tuning: {{force: true, cache_dir: '{}'}}}}]",
                match o.oracle_threads {
                    0 => "auto".to_string(),
                    n => n.to_string(),
                },
                cache.display()
            )
        };
        let bin = v2_binary_request(&format!("/v2/models/{name}/infer"), "input", &x);
        // The caps to compare: up to the largest good size of a first probe.
        let (_, max_good, _) = {
            let server = Server::start(&cfg("auto"), &o.fixtures)?;
            tuned(rt, server.addr, name)?
        };
        let mut caps: Vec<u64> = std::iter::successors(Some(1u64), |c| Some(c * 2))
            .take_while(|&c| c <= max_good)
            .collect();
        if caps.last() != Some(&max_good) {
            caps.push(max_good);
        }
        if !o.oracle_caps.is_empty() {
            caps = o.oracle_caps.clone();
        }
        let clients = |n: usize| o.oracle_clients.is_empty() || o.oracle_clients.contains(&n);
        // Per line (label, clients): each round's row.
        let mut lines: Vec<((String, usize), Vec<Row>)> = Vec::new();
        // Each round's figures go to stderr as they come (the table has the medians).
        let mut push = |label: String, clients: usize, r: Row| {
            eprintln!(
                "oracle {name} {label}, {clients} clients: {:.0} rows/s, p50 {:.3} ms",
                r.rows_per_second, r.p50_ms
            );
            match lines
                .iter_mut()
                .find(|(k, _)| k.0 == label && k.1 == clients)
            {
                Some((_, v)) => v.push(r),
                None => lines.push(((label, clients), vec![r])),
            }
        };
        let mut choices = Vec::new();
        for round in 0..o.oracle_rounds {
            let mut order: Vec<Option<u64>> = std::iter::once(None)
                .chain(caps.iter().copied().map(Some))
                .collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for cap in order {
                let batch = cap.map_or("auto".to_string(), |c| c.to_string());
                let label = cap.map_or("auto".to_string(), |c| format!("fixed cap {c}"));
                let server = Server::start(&cfg(&batch), &o.fixtures)?;
                let one = cap.is_none() || cap == Some(1) || cap == caps.last().copied();
                if one && clients(1) {
                    let (r, _) = load_server(rt, server.addr, bin.clone(), 1, o);
                    push(label.clone(), 1, row("g", &label, 1, 1, &r));
                }
                if clients(32) {
                    let (r, mb) = load_server(rt, server.addr, bin.clone(), 32, o);
                    push(
                        label.clone(),
                        32,
                        row("g", &label, 32, 1, &r).with_batch(mb),
                    );
                }
                if cap.is_none() {
                    let (chosen, _, now) = tuned(rt, server.addr, name)?;
                    choices.push(format!("{chosen}→{now}"));
                }
            }
        }
        let med = |v: &[Row], f: fn(&Row) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let mut summary: Vec<Row> = lines
            .iter()
            .map(|((label, clients), runs)| {
                let mut r = runs[0].clone();
                r.variant = format!("{name}: {label}, median of {}", runs.len());
                r.requests_per_second = med(runs, |r| r.requests_per_second);
                r.rows_per_second = med(runs, |r| r.rows_per_second);
                r.p50_ms = med(runs, |r| r.p50_ms);
                r.p90_ms = med(runs, |r| r.p90_ms);
                r.p99_ms = med(runs, |r| r.p99_ms);
                r.mean_batch = runs.iter().filter_map(|r| r.mean_batch).reduce(f64::max);
                r.concurrency = *clients;
                r
            })
            .collect();
        let best = summary
            .iter()
            .filter(|r| r.concurrency == 32 && !r.variant.contains(": auto"))
            .max_by(|a, b| a.rows_per_second.total_cmp(&b.rows_per_second))
            .map(|r| (r.variant.clone(), r.rows_per_second))
            .unwrap_or_default();
        let one = summary
            .iter()
            .find(|r| r.concurrency == 1 && r.variant.contains("fixed cap 1,"))
            .map(|r| r.p50_ms);
        for r in &mut summary {
            if r.concurrency == 32 {
                r.ratio = Some(r.rows_per_second / best.1.max(1e-9));
                r.reference = Some(format!("rows/s of the best fixed cap ({})", best.0));
            } else if let (Some(p50), true) = (one, r.variant.contains("fixed cap 1,")) {
                r.ratio = Some(1.0);
                r.reference = Some(format!("p50 {p50:.3} ms"));
            } else if let Some(p50) = one {
                r.ratio = Some(r.p50_ms / p50.max(1e-9));
                r.reference = Some("p50 over fixed cap 1's p50 at one client".into());
            }
            if r.variant.contains(": auto") {
                r.variant = format!(
                    "{} (chose→cap after load: {})",
                    r.variant,
                    choices.join(", ")
                );
            }
        }
        rows.extend(summary);
    }
    Ok(rows)
}

pub fn summarize(runs: &[Vec<Row>]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for rows in runs {
        for r in rows {
            let (measure, value) = match (r.ratio, r.excess_ms) {
                (Some(x), _) => (
                    format!("ratio to {}", r.reference.clone().unwrap_or_default()),
                    x,
                ),
                (None, Some(ms)) => ("ortserve p50 − in-process run, ms".to_string(), ms),
                _ => continue,
            };
            let found = out.iter_mut().find(|s| {
                (s.scenario.as_str(), s.variant.as_str(), s.concurrency)
                    == (r.scenario.as_str(), r.variant.as_str(), r.concurrency)
            });
            match found {
                Some(s) => s.values.push(value),
                None => out.push(Summary {
                    scenario: r.scenario.clone(),
                    variant: r.variant.clone(),
                    concurrency: r.concurrency,
                    measure,
                    values: vec![value],
                    median: 0.0,
                }),
            }
        }
    }
    for s in &mut out {
        s.median = median(&s.values);
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The summary as a Markdown table.
pub fn summary_table(summary: &[Summary]) -> String {
    let mut out = String::from(
        "| scenario | line | conc. | measure | each run | median |\n|---|---|---|---|---|---|\n",
    );
    for s in summary {
        let each: Vec<String> = s.values.iter().map(|v| format!("{v:.3}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} |\n",
            s.scenario,
            s.variant,
            s.concurrency,
            s.measure,
            each.join(", "),
            s.median
        ));
    }
    out
}

/// Writes `results.json`: every run's lines and the summary.
pub fn write_results(dir: &Path, runs: &[Vec<Row>], summary: &[Summary]) -> Result<(), String> {
    let json = serde_json::json!({"runs": runs, "summary": summary});
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}

/// Runs `request` at 32 clients against a server with config `base`, then one with `other`, one
/// after the other; the second line carries its ratio to the first.
fn compare(
    rt: &tokio::runtime::Runtime,
    o: &Options,
    scenario: &str,
    base: (String, String),
    other: (String, String),
    request: &[u8],
    base_name: &str,
) -> Result<[Row; 2], String> {
    let measure = |(label, yaml): (String, String)| -> Result<Row, String> {
        let server = Server::start(&yaml, &o.fixtures)?;
        let (r, mb) = load_server(rt, server.addr, request.to_vec(), 32, o);
        Ok(row(scenario, &label, 32, 1, &r).with_batch(mb))
    };
    let first = measure(base)?;
    let mut second = measure(other)?;
    second.ratio = Some(second.rows_per_second / first.rows_per_second.max(1e-9));
    second.reference = Some(base_name.into());
    Ok([first, second])
}

/// The results as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| scenario | variant | conc. | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | non-200 | rows/run | device busy | cores: http / device / load gen / idle / others | server sleeps/req | ratio | to |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.variant,
            r.concurrency,
            r.requests_per_second,
            r.rows_per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.errors,
            r.non_200,
            r.mean_batch.map_or(String::new(), |x| format!("{x:.1}")),
            r.device_busy.map_or(String::new(), |x| format!("{x:.2}")),
            r.cpu.map_or(String::new(), |c| format!(
                "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                c.http, c.device, c.loadgen, c.idle, c.others
            )),
            match r.cpu {
                Some(c) if r.requests_per_second > 0.0 =>
                    format!("{:.1}", c.server_sleeps / r.requests_per_second),
                _ => String::new(),
            },
            r.ratio.map_or(String::new(), |x| format!("{x:.2}")),
            r.reference.clone().unwrap_or_default()
        ));
    }
    out
}

type Chart<'a, 'b> = plotters::chart::ChartContext<
    'a,
    plotters::backend::SVGBackend<'b>,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// Draws `pts` as a line with a dot at each point.
fn line_with_points(
    chart: &mut Chart<'_, '_>,
    pts: Vec<(f64, f64)>,
    color: plotters::style::RGBColor,
) -> Result<(), String> {
    use plotters::prelude::*;
    chart
        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn plot_curve(path: &Path, model: &str, curve: &[(usize, f64)]) -> Result<(), String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (700, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let max_y = curve.iter().map(|c| c.1).fold(1.0, f64::max) * 1.1;
        let max_x = curve
            .iter()
            .map(|c| (c.0 as f64).log2())
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "in-process rows/s against batch size ({model}, {} threads)",
                    crate::pin::threads(2)
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("batch size")
            .y_desc("rows/s")
            .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
            .draw()
            .map_err(|e| e.to_string())?;
        let pts: Vec<(f64, f64)> = curve.iter().map(|c| ((c.0 as f64).log2(), c.1)).collect();
        line_with_points(&mut chart, pts, BLUE)?;
        root.present().map_err(|e| e.to_string())?;
    }
    std::fs::write(path, svg).map_err(|e| e.to_string())
}

fn plot_sweep(path: &Path, sweep: &[(usize, f64, f64)]) -> Result<(), String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (700, 700)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((2, 1));
        let max_x = sweep.iter().map(|s| s.0 as f64).fold(1.0, f64::max) * 1.05;
        for (panel, (title, pick)) in panels.iter().zip([
            ("rows/s against concurrency (cnn, V2 binary)", 1usize),
            ("p99 latency (ms) against concurrency", 2usize),
        ]) {
            let value = |s: &(usize, f64, f64)| if pick == 1 { s.1 } else { s.2 };
            let max_y = sweep.iter().map(value).fold(1e-9, f64::max) * 1.1;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..max_x, 0.0..max_y)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("concurrent clients")
                .draw()
                .map_err(|e| e.to_string())?;
            let pts: Vec<(f64, f64)> = sweep.iter().map(|s| (s.0 as f64, value(s))).collect();
            line_with_points(&mut chart, pts, RED)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    std::fs::write(path, svg).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("bench/ has a parent")
            .join("tests/fixtures")
    }

    fn short() -> Options {
        Options {
            seconds: 0.3,
            warmup: 0.1,
            scenarios: vec!['b'],
            out_dir: PathBuf::new(),
            fixtures: fixtures(),
            setup_dir: PathBuf::new(),
            oracle_models: Vec::new(),
            oracle_rounds: 1,
            oracle_threads: 1,
            oracle_caps: Vec::new(),
            oracle_clients: Vec::new(),
        }
    }

    /// Short options, a runtime for the load, and a server of the fixture `model` (batches of up
    /// to 8, one thread).
    fn serving(model: &str) -> (Options, tokio::runtime::Runtime, Server) {
        let o = short();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let yaml = format!("server: {{drain_delay: 0s}}\nruntime: {{cpu_threads: 1}}\nmodels: [{{name: {model}, path: {model}.onnx, devices: cpu, batching: {{max_batch_size: 8, max_queue_delay: 1ms}}}}]");
        let server = Server::start(&yaml, &o.fixtures).unwrap();
        (o, rt, server)
    }

    #[test]
    fn grpc_calls_answered_ok_count_as_200_with_the_servers_batches() {
        // Not a measurement: the gRPC generator against the server's gRPC port, one connection
        // shared by several callers and a second one for the rest.
        let _alone = crate::cpu::tests::PROCESS_CPU
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (o, rt, server) = serving("mlp");
        let raw = grpc_client::raw_request("mlp", &[("input", &mlp_row())]);
        let callers = grpc_client::CALLERS_PER_CONNECTION + 2;
        let (r, b) = load_grpc(
            &rt,
            &server,
            &raw,
            callers,
            grpc_client::CALLERS_PER_CONNECTION,
            &o,
        )
        .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.ok() > 0, "{r:?}");
        assert_eq!(r.statuses.len(), 1, "only OK: {:?}", r.statuses);
        assert_eq!(r.latencies.len() as u64, r.ok());
        assert!(b.mean_rows.is_some_and(|m| m >= 1.0), "{b:?}");
        // A model the server does not have: answered, NOT_FOUND, counted under its code.
        let missing = grpc_client::raw_request("nope", &[("input", &mlp_row())]);
        let (r, _) = load_grpc(
            &rt,
            &server,
            &missing,
            2,
            grpc_client::CALLERS_PER_CONNECTION,
            &o,
        )
        .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.ok(), 0, "{r:?}");
        assert!(
            r.statuses
                .get(&(tonic::Code::NotFound as u16))
                .is_some_and(|&n| n > 0),
            "{:?}",
            r.statuses
        );
        let line = row("b", "gRPC", 2, 1, &r);
        assert_eq!(line.non_200, r.latencies.len() as u64);
    }

    #[test]
    fn the_bare_stacks_answer_one_caller_ok_on_each_protocol() {
        // Not a measurement: the four bare responders of scenario b, each driven by its load
        // generator for the short run; every call answered, and answered OK.
        let _alone = crate::cpu::tests::PROCESS_CPU
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let o = short();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let rows = bare_stacks_one_caller(&rt, &mlp_row(), &o).unwrap();
        assert_eq!(rows.len(), 4);
        for r in &rows {
            assert_eq!(r.concurrency, 1);
            assert_eq!((r.errors, r.non_200), (0, 0), "{}: {r:?}", r.variant);
            assert!(r.requests_per_second > 0.0, "{}: {r:?}", r.variant);
        }
    }

    #[test]
    fn grpc_calls_larger_than_a_frame_go_out_in_frames_from_the_file() {
        // Three CNN rows, 144 KiB: over the server's 64 KiB frame, so each call is three DATA
        // frames sent with sendfile(2) behind their headers. Every call is answered OK.
        let _alone = crate::cpu::tests::PROCESS_CPU
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (o, rt, server) = serving("cnn");
        let raw = grpc_client::raw_request("cnn", &[("input", &cnn_rows(3))]);
        assert!(raw.raw_input_contents[0].len() > ortserve::grpc::MAX_FRAME_BYTES as usize * 2);
        let (r, b) = load_grpc(
            &rt,
            &server,
            &raw,
            3,
            grpc_client::CALLERS_PER_CONNECTION,
            &o,
        )
        .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.ok() > 0, "{r:?}");
        assert_eq!(r.statuses.len(), 1, "only OK: {:?}", r.statuses);
        assert!(b.mean_rows.is_some_and(|m| m >= 3.0), "{b:?}");
    }

    #[test]
    fn grpc_calls_with_no_server_are_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let raw = grpc_client::raw_request("mlp", &[("input", &mlp_row())]);
        let r = rt.block_on(grpc_client::run(
            addr,
            raw,
            2,
            grpc_client::CALLERS_PER_CONNECTION,
            Duration::ZERO,
            Duration::from_millis(200),
        ));
        assert!(r.errors > 0, "{r:?}");
        assert!(r.statuses.is_empty(), "{r:?}");
    }

    fn line(variant: &str, ratio: Option<f64>, excess_ms: Option<f64>) -> Row {
        Row {
            ratio,
            excess_ms,
            reference: ratio.map(|_| "one slot".to_string()),
            concurrency: 32,
            ..Row::in_process("c", variant.into(), 1.0)
        }
    }

    #[test]
    fn repeated_runs_are_matched_by_line_and_summarized_by_median() {
        let runs = vec![
            vec![
                line("two", Some(1.4), None),
                line("one", None, None),
                line("lat", None, Some(0.2)),
            ],
            vec![line("two", Some(1.6), None), line("lat", None, Some(0.1))],
            vec![line("two", Some(1.5), None), line("lat", None, Some(0.3))],
            vec![line("two", Some(1.1), None)],
        ];
        let s = summarize(&runs);
        assert_eq!(
            s.len(),
            2,
            "a line with neither a ratio nor a latency is left out"
        );
        assert_eq!(s[0].variant, "two");
        assert_eq!(s[0].values, [1.4, 1.6, 1.5, 1.1]);
        assert!((s[0].median - 1.45).abs() < 1e-9, "{}", s[0].median);
        assert_eq!(s[0].measure, "ratio to one slot");
        assert_eq!(s[1].values, [0.2, 0.1, 0.3]);
        assert!((s[1].median - 0.2).abs() < 1e-9);
        assert!(summary_table(&s)
            .contains("| c | two | 32 | ratio to one slot | 1.400, 1.600, 1.500, 1.100 | 1.450 |"));
    }
}
