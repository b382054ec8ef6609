//! Helpers shared by the integration tests: starting a server on the fixture models, a V2
//! client written independently of the server's codec, in-process reference runs, metrics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use ortserve::app::{AppState, DeviceStatus};
use ortserve::config::{Config, DispatchPolicy, RuntimeConfig};
use ortserve::device::{init_runtime, DeviceKind, DevicePlan, ModelRunner, OrtRunner, RunError};
use ortserve::model::{ModelInfo, TensorInfo};
use ortserve::tensor::{DataType, Tensor};
use ortserve::testing::{BatchSettings, DeviceRunner};
use rand::Rng;
use serde_json::{json, Value};
use tower::ServiceExt;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A validated config from YAML whose model paths are relative to tests/fixtures.
pub fn config(yaml: &str) -> Config {
    let mut c = Config::from_yaml(yaml).expect("test config parses");
    c.resolve_paths(&fixtures());
    c.validate().expect("test config is valid");
    c
}

/// A served state (the loaded server's, or a fake model's). It reads as the state (`Deref`);
/// its registry owns the models, so dropping the last handle on it stops them.
pub struct Served {
    state: Arc<AppState>,
}

impl std::ops::Deref for Served {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.state
    }
}

impl Served {
    /// The first model's devices, as its metadata reports them.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.state.models()[0].devices()
    }

    /// Marks the first model's device `index` healthy or not.
    pub fn set_healthy(&self, index: usize, healthy: bool) {
        ortserve::testing::set_device_healthy(&self.state.models()[0], index, healthy);
    }

    /// The state itself, to serve it another way (the gRPC front door).
    pub fn arc(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Stops the models: what was admitted is answered, threads are joined.
    pub async fn shutdown(self) {
        self.state.stop_models().await;
    }
}

pub async fn start(yaml: &str) -> (Served, Router) {
    start_config(&config(yaml)).await
}

pub async fn start_config(config: &Config) -> (Served, Router) {
    let server = ortserve::start(config).await.expect("server starts");
    let state = server.state().clone();
    let router = ortserve::http::router(state.clone());
    let served = Served { state };
    (served, router)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn assert_status(&self, want: u16) {
        assert_eq!(
            self.status.as_u16(),
            want,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }

    /// Asserts the status and that the JSON error message contains `says`.
    #[track_caller]
    pub fn assert_error(&self, want: u16, says: &str) {
        self.assert_status(want);
        let body = self.json();
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "expected {says:?} in {body}");
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.expect("router answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// A POST with no body (the repository extension's load and unload).
pub async fn post_empty(router: &Router, uri: &str) -> Reply {
    send(router, Request::post(uri).body(Body::empty()).unwrap()).await
}

/// `POST /v2/repository/index`, checked to be 200, as JSON.
pub async fn repository_index(router: &Router) -> Value {
    let reply = post_empty(router, "/v2/repository/index").await;
    reply.assert_status(200);
    serde_json::from_slice(&reply.body).unwrap()
}

pub async fn get(router: &Router, uri: &str) -> Reply {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

pub async fn post_json(router: &Router, uri: &str, body: &Value) -> Reply {
    // No Content-Type, as tritonclient sends it.
    send(
        router,
        Request::post(uri)
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

/// JSON numbers (or booleans) of a tensor, flat, decoded from its bytes by the test itself.
pub fn values(t: &Tensor) -> Vec<Value> {
    let d = &t.data;
    let n = t.dtype.size();
    d.chunks_exact(n)
        .map(|c| match t.dtype {
            DataType::Bool => json!(c[0] != 0),
            DataType::U8 => json!(c[0]),
            DataType::I8 => json!(c[0] as i8),
            DataType::U16 => json!(u16::from_le_bytes([c[0], c[1]])),
            DataType::I16 => json!(i16::from_le_bytes([c[0], c[1]])),
            DataType::F16 => json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            DataType::U32 => json!(u32::from_le_bytes(c.try_into().unwrap())),
            DataType::I32 => json!(i32::from_le_bytes(c.try_into().unwrap())),
            DataType::F32 => json!(f32::from_le_bytes(c.try_into().unwrap())),
            DataType::U64 => json!(u64::from_le_bytes(c.try_into().unwrap())),
            DataType::I64 => json!(i64::from_le_bytes(c.try_into().unwrap())),
            DataType::F64 => json!(f64::from_le_bytes(c.try_into().unwrap())),
        })
        .collect()
}

pub fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Bool(b) => f64::from(u8::from(*b)),
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// A V2 JSON request body. `nested` writes data as nested rows instead of flat.
pub fn v2_json(inputs: &[(&str, &Tensor)], nested: bool) -> Value {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|(name, t)| {
            let flat = values(t);
            let data = if nested && t.shape.len() > 1 && t.shape[0] > 0 {
                let per_row = flat.len() / t.shape[0];
                Value::Array(
                    flat.chunks(per_row)
                        .map(|r| Value::Array(r.to_vec()))
                        .collect(),
                )
            } else {
                Value::Array(flat)
            };
            json!({"name": name, "shape": t.shape, "datatype": t.dtype.v2_name(), "data": data})
        })
        .collect();
    json!({ "inputs": inputs })
}

/// A V2 binary-extension body asking for every output in binary; returns (body, header length).
pub fn v2_binary(inputs: &[(&str, &Tensor)]) -> (Vec<u8>, usize) {
    let header = json!({
        "inputs": inputs.iter().map(|(name, t)| json!({
            "name": name, "shape": t.shape, "datatype": t.dtype.v2_name(),
            "parameters": {"binary_data_size": t.data.len()},
        })).collect::<Vec<_>>(),
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for (_, t) in inputs {
        body.extend_from_slice(&t.data);
    }
    (body, header.len())
}

/// Output tensors of a V2 response, JSON or binary, as (name, dtype, shape, values as f64).
pub fn outputs(reply: &Reply) -> Vec<(String, String, Vec<usize>, Vec<f64>)> {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let header_len = reply
        .headers
        .get("inference-header-content-length")
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    let (head, mut rest) = match header_len {
        Some(n) => (&reply.body[..n], &reply.body[n..]),
        None => (&reply.body[..], &[][..]),
    };
    let head: Value = serde_json::from_slice(head).unwrap();
    head["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let name = o["name"].as_str().unwrap().to_string();
            let dt = o["datatype"].as_str().unwrap().to_string();
            let shape: Vec<usize> = o["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let vals = match o.get("parameters").and_then(|p| p.get("binary_data_size")) {
                Some(size) => {
                    let size = size.as_u64().unwrap() as usize;
                    let (mine, tail) = rest.split_at(size);
                    rest = tail;
                    let t = Tensor::new(
                        DataType::from_v2_name(&dt).unwrap(),
                        shape.clone(),
                        mine.to_vec(),
                    )
                    .unwrap();
                    values(&t).iter().map(as_f64).collect()
                }
                None => o["data"].as_array().unwrap().iter().map(as_f64).collect(),
            };
            (name, dt, shape, vals)
        })
        .collect()
}

/// An in-process ONNX Runtime session on one CPU thread: the reference.
pub fn reference(model: &str) -> OrtRunner {
    init_runtime(&RuntimeConfig::default()).expect("ONNX Runtime loads (run scripts/setup.sh)");
    let plan = DevicePlan {
        device: "cpu:0".into(),
        instance: 0,
        kind: DeviceKind::Cpu {
            intra_op_threads: 1,
            spinning: false,
        },
    };
    OrtRunner::open(&fixtures().join(model), &plan).expect("reference session")
}

pub fn run_reference(runner: &mut OrtRunner, inputs: &[Tensor]) -> Vec<Tensor> {
    runner.run(&[inputs.to_vec()]).expect("reference run")
}

/// Random values of `dtype`, never all zeros; integer ranges small enough for every model here.
pub fn random_tensor(dtype: DataType, shape: Vec<usize>, rng: &mut impl Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let mut data = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        match dtype {
            DataType::Bool => data.push(u8::from(rng.random_bool(0.5))),
            DataType::U8 => data.push(rng.random_range(0..=255u8)),
            DataType::I8 => data.extend((rng.random_range(-128..=127i16) as i8).to_le_bytes()),
            DataType::U16 => data.extend(rng.random_range(0..=60000u16).to_le_bytes()),
            DataType::I16 => data.extend(rng.random_range(-30000..=30000i16).to_le_bytes()),
            DataType::F16 => {
                data.extend(half::f16::from_f32(rng.random_range(-4.0..4.0f32)).to_le_bytes())
            }
            DataType::U32 => data.extend(rng.random_range(0..=4_000_000_000u32).to_le_bytes()),
            DataType::I32 => data.extend(
                rng.random_range(-2_000_000_000..=2_000_000_000i32)
                    .to_le_bytes(),
            ),
            DataType::F32 => data.extend(rng.random_range(-2.0..2.0f32).to_le_bytes()),
            // 2^53 and below, so JSON clients that read numbers as doubles lose nothing.
            DataType::U64 => data.extend(rng.random_range(0..=(1u64 << 53)).to_le_bytes()),
            DataType::I64 => data.extend(rng.random_range(-16..16i64).to_le_bytes()),
            DataType::F64 => data.extend(rng.random_range(-2.0..2.0f64).to_le_bytes()),
        }
    }
    Tensor::new(dtype, shape, data).unwrap()
}

/// Asserts a served output equals the reference within 1e-5 (absolute, or relative for big values).
pub fn assert_close(what: &str, got: &(String, String, Vec<usize>, Vec<f64>), want: &Tensor) {
    assert_eq!(got.1, want.dtype.v2_name(), "{what}: datatype");
    assert_eq!(got.2, want.shape, "{what}: shape");
    let want: Vec<f64> = values(want).iter().map(as_f64).collect();
    assert_eq!(got.3.len(), want.len(), "{what}: element count");
    for (i, (g, w)) in got.3.iter().zip(&want).enumerate() {
        let tol = 1e-5 * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: served {g}, in-process {w}"
        );
    }
}

/// The value of a metric sample from Prometheus text, or 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Echoes its input; each batch waits for a token on `gate` (or for the gate to close), and
/// fails when the first value is negative.
pub struct Gated {
    gate: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl ModelRunner for Gated {
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
        let _ = self.gate.lock().unwrap().recv();
        let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
        let out = Tensor::concat(&firsts).map_err(|e| RunError::Failed(e.to_string()))?;
        if out.to_f32()[0] < 0.0 {
            return Err(RunError::Failed("device fault at 0xdeadbeef".into()));
        }
        Ok(vec![out])
    }
}

/// A fake model's inputs and outputs: `x: FP32[-1, cols]` in, `y` alike out.
pub fn xy_info(cols: i64) -> ModelInfo {
    let tensor = |n: &str| TensorInfo {
        name: n.into(),
        dtype: DataType::F32,
        dims: vec![-1, cols],
    };
    ModelInfo {
        inputs: vec![tensor("x")],
        outputs: vec![tensor("y")],
    }
}

/// A server over fake runners: model `name` takes `x: FP32[-1, cols]` and returns `y` alike.
pub fn fake_server(
    name: &str,
    cols: i64,
    runners: Vec<DeviceRunner>,
    policy: DispatchPolicy,
    settings: BatchSettings,
) -> (Served, axum::Router) {
    let state = ortserve::testing::serve_runners(name, xy_info(cols), policy, settings, runners);
    let router = ortserve::http::router(state.clone());
    (Served { state }, router)
}

/// One device that holds each batch until the returned sender sends a token (or is dropped).
pub fn gated_server(queue_capacity: usize) -> (Served, axum::Router, mpsc::Sender<()>) {
    let (runner, open) = gated_runner("cpu:0", Duration::from_secs(30));
    let settings = BatchSettings::new(Duration::ZERO, queue_capacity, Duration::from_secs(30));
    let (state, router) = fake_server(
        "gated",
        1,
        vec![runner],
        DispatchPolicy::LeastLoaded,
        settings,
    );
    (state, router, open)
}

/// A device of one-row batches that holds each batch until the returned sender sends a token
/// (or is dropped), with the watchdog at `run_timeout`.
pub fn gated_runner(name: &str, run_timeout: Duration) -> (DeviceRunner, mpsc::Sender<()>) {
    let (open, gate) = mpsc::channel();
    let runner = DeviceRunner {
        run_timeout,
        refine: None,
        name: name.into(),
        max_batch: 1,
        buckets: Vec::new(),
        runner: Box::new(Gated {
            gate: Arc::new(Mutex::new(gate)),
        }),
        rebuild: None,
    };
    (runner, open)
}

/// A one-row request for the gated server.
pub fn one(v: f32) -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [v]}]})
}

/// The reference: antialiased bilinear (triangle filter widened by the scale factor, as PIL's
/// `Image.resize(..., BILINEAR)`), computed in f64, separately per axis.
pub fn reference_resize(src: &image::RgbImage, out_w: u32, out_h: u32) -> Vec<[f64; 3]> {
    fn weights(n_in: u32, n_out: u32) -> Vec<Vec<(usize, f64)>> {
        let scale = n_in as f64 / n_out as f64;
        let support = scale.max(1.0);
        (0..n_out)
            .map(|i| {
                let center = (i as f64 + 0.5) * scale;
                let lo = (center - support).floor().max(0.0) as usize;
                let hi = ((center + support).ceil() as usize).min(n_in as usize);
                let mut ws: Vec<(usize, f64)> = (lo..hi)
                    .map(|j| {
                        (
                            j,
                            (1.0 - ((j as f64 + 0.5 - center) / support).abs()).max(0.0),
                        )
                    })
                    .filter(|(_, w)| *w > 0.0)
                    .collect();
                let sum: f64 = ws.iter().map(|(_, w)| w).sum();
                ws.iter_mut().for_each(|(_, w)| *w /= sum);
                ws
            })
            .collect()
    }
    let (w, h) = src.dimensions();
    let wx = weights(w, out_w);
    let wy = weights(h, out_h);
    let mut horiz = vec![[0f64; 3]; (out_w * h) as usize];
    for y in 0..h {
        for (x, ws) in wx.iter().enumerate() {
            for &(j, wt) in ws {
                let p = src.get_pixel(j as u32, y);
                for c in 0..3 {
                    horiz[(y * out_w) as usize + x][c] += wt * f64::from(p[c]);
                }
            }
        }
    }
    let mut out = vec![[0f64; 3]; (out_w * out_h) as usize];
    for (y, ws) in wy.iter().enumerate() {
        for x in 0..out_w as usize {
            for &(j, wt) in ws {
                for c in 0..3 {
                    out[y * out_w as usize + x][c] += wt * horiz[j * out_w as usize + x][c];
                }
            }
        }
    }
    out
}

/// The reference preprocessing of the EfficientNet-Lite0 config: RGB, shorter side 256
/// (antialiased bilinear), centre crop 224, (x - 127) / 128, NCHW, as an f32 `[1, 3, 224, 224]`.
pub fn reference_preprocess(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let (rw, rh) = if w <= h {
        (256, (h as f64 * 256.0 / w as f64).round() as u32)
    } else {
        ((w as f64 * 256.0 / h as f64).round() as u32, 256)
    };
    let full = reference_resize(img, rw, rh);
    let (left, top) = (((rw - 224) / 2) as usize, ((rh - 224) / 2) as usize);
    let mut values = vec![0f32; 3 * 224 * 224];
    for c in 0..3 {
        for y in 0..224 {
            for x in 0..224 {
                // The server rounds resized pixels to 8 bits; so does the reference.
                let p = full[(y + top) * rw as usize + x + left][c]
                    .round()
                    .clamp(0.0, 255.0);
                values[(c * 224 + y) * 224 + x] = ((p - 127.0) / 128.0) as f32;
            }
        }
    }
    Tensor::from_f32(vec![1, 3, 224, 224], &values).unwrap()
}

/// A PNG written by hand, so a test controls what a library would not write: colour type
/// `color` at `depth` bits, Adam7-interlaced or not, `extra` chunks before the pixels (an ICC
/// profile, text). `px(x, y)` gives one pixel's bytes.
pub fn png_file(
    (w, h): (u32, u32),
    (color, depth): (u8, u8),
    interlaced: bool,
    extra: &[([u8; 4], Vec<u8>)],
    px: impl Fn(u32, u32) -> Vec<u8>,
) -> Vec<u8> {
    use std::io::Write;
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, u8::from(interlaced)]);
    chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        chunk(&mut out, kind, data);
    }
    // Adam7's passes (x0, y0, dx, dy), or the whole image as one pass.
    let passes: &[(u32, u32, u32, u32)] = if interlaced {
        &[
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        ]
    } else {
        &[(0, 0, 1, 1)]
    };
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for &(x0, y0, dx, dy) in passes {
        if x0 >= w || y0 >= h {
            continue;
        }
        for y in (y0..h).step_by(dy as usize) {
            let mut row = vec![0u8]; // filter: none
            for x in (x0..w).step_by(dx as usize) {
                row.extend(px(x, y));
            }
            z.write_all(&row).unwrap();
        }
    }
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The zlib stream of `n` zero bytes (a decompression bomb's payload: about 1,000 to 1).
pub fn zlib_zeros(n: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let take = left.min(block.len());
        z.write_all(&block[..take]).unwrap();
        left -= take;
    }
    z.finish().unwrap()
}

/// A log writer that keeps what it is given, for tests that read the server's log lines.
#[derive(Clone)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool `scripts/setup_tools.sh` installs into the project venv (`python`, `hadolint`, …).
pub fn tool(name: &str) -> PathBuf {
    let p = root().join(".ortserve/venv/bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/setup_tools.sh",
        p.display()
    );
    p
}

/// Runs `cmd` with its stdout closed before it writes anything, as `cmd | head -0` would, and
/// returns how it ended and its stderr.
pub fn run_with_stdout_closed(cmd: &mut std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// Polls `check` every 50 ms for up to 30 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "not within 30 s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
