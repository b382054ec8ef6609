//! ortserve: an HTTP prediction server for ONNX models.
//!
//! It runs one ONNX Runtime session per device (GPU, or CPU slot), merges concurrent requests
//! into batches, sends each batch to a device through a round-robin or least-loaded dispatcher,
//! and speaks the KServe V2 / Open Inference Protocol over REST.
//!
//! # Layout
//!
//! Arrows point one way: `http` → `batching` → `dispatch` → `device`; `tuning` → `device`;
//! `config`, `metrics`,
//! `tensor` and `model` are leaves.
//!
//! - [`config`]: the YAML schema, defaults, environment overrides, validation with key paths.
//! - [`http`]: the axum router, tower layers, the V2 codec and the status table ([`http::ApiError`]).
//!   The only module that imports axum and tower-http.
//! - [`app`]: state shared by handlers: models, metrics, readiness.
//! - [`batching`]: the façade handlers call ([`batching::ModelHandle`]), the batcher actor and its
//!   pure `State`.
//! - [`dispatch`]: device choice (`round_robin`, `least_loaded`), job slots and the in-flight guard.
//! - [`device`]: the ONNX Runtime library, sessions, device planning and the worker threads. The
//!   only module that imports `ort`.
//! - [`tensor`]: `Tensor { dtype, shape, data }`, concatenation and slicing along dim 0.
//! - [`model`]: a model's inputs and outputs and the checks on a request's tensors.
//! - [`preprocess`]: uploaded images into model input rows, on a bounded CPU pool.
//! - [`classify`]: labels, softmax and top-k for classification outputs.
//! - [`metrics`]: the Prometheus registry.
//! - [`tuning`]: the startup batch-size probe, memory readings, the tuning cache and plot.
//! - [`shutdown`]: signals and the drain sequence.
//! - [`bench`]: `ortserve bench`, the server under load next to the in-process ceiling.
//!
//! Entry points: [`start`] loads everything, [`serve`] runs HTTP on an injected listener until an
//! injected shutdown future resolves; [`run`] does both.

pub mod app;
pub mod batching;
pub mod bench;
pub mod classify;
pub mod config;
pub mod device;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod shutdown;
pub mod tensor;
pub mod tuning;

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use std::collections::BTreeMap;

use crate::app::{AppState, Loaded, ModelExtras};
use crate::batching::{BatchSettings, DeviceRunner, ModelHandle};
use crate::config::{Config, ConfigError, MaxBatch};
use crate::device::{DeviceError, OrtRunner};
use crate::metrics::Metrics;
use crate::model::ModelInfo;
use crate::tuning::{DeviceTuning, TuningError};

#[derive(Debug, Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("model {model:?}: {message}")]
    Model { model: String, message: String },
    #[error(transparent)]
    Tuning(#[from] TuningError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loads ONNX Runtime, builds every (model, device, instance) session, tunes each device's
/// batch size (or takes it from config or the cache), and starts the device threads and
/// batchers. Devices are tuned one after another, so probes do not disturb each other.
pub async fn load_models(config: &Config, metrics: &Arc<Metrics>) -> Result<Loaded, StartupError> {
    let runtime_cfg = config.runtime.clone();
    let runtime = tokio::task::spawn_blocking(move || device::init_runtime(&runtime_cfg))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    let plans = device::plan_devices(config, &runtime)?;
    let version = runtime.version();
    let mut models = Vec::new();
    let mut tuning = BTreeMap::new();
    let mut extras = BTreeMap::new();
    for (m, plans) in config.models.iter().zip(plans) {
        let mut runners = Vec::new();
        let mut results = Vec::new();
        let mut info: Option<ModelInfo> = None;
        for plan in plans {
            let name = match plan.instance {
                0 => plan.device.clone(),
                i => format!("{}#{i}", plan.device),
            };
            let again = (m.path.clone(), plan.clone(), m.cuda.pinned_inputs);
            let job = (
                m.clone(),
                plan,
                name.clone(),
                version.clone(),
                config.runtime.cuda_visible_devices.clone(),
            );
            let (runner, result) = tokio::task::spawn_blocking(move || {
                open_and_tune(job.0, job.1, job.2, &job.3, job.4.as_deref())
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            match &info {
                None => info = Some(runner.info().clone()),
                Some(i) if i != runner.info() => {
                    return Err(StartupError::Model {
                        model: m.name.clone(),
                        message: format!(
                        "device {name} reports different inputs or outputs than the first device"
                    ),
                    })
                }
                Some(_) => {}
            }
            if result.source != tuning::Source::Config {
                tracing::info!("{}", tuning::table(&m.name, &result).trim_end());
            }
            metrics
                .tuned_max_batch
                .with_label_values(&[m.name.as_str(), name.as_str()])
                .set(result.chosen as i64);
            tracing::info!(model = %m.name, device = %name, max_batch = result.chosen, source = ?result.source, "session ready");
            // After a panic: a new session on the same device (the arena cap is not re-read).
            let rebuild: device::Rebuild = Box::new(move || {
                let cuda = device::CudaSettings {
                    gpu_mem_limit: None,
                    pinned_inputs: again.2,
                };
                OrtRunner::open_with(&again.0, &again.1, cuda)
                    .map(|r| Box::new(r) as Box<dyn device::ModelRunner>)
                    .map_err(|e| e.to_string())
            });
            runners.push(DeviceRunner {
                name,
                max_batch: result.chosen,
                runner: Box::new(runner),
                rebuild: Some(rebuild),
            });
            results.push(result);
        }
        let info = info.ok_or_else(|| StartupError::Model {
            model: m.name.clone(),
            message: "no device to run on".into(),
        })?;
        let settings = BatchSettings {
            max_queue_delay: m.batching.max_queue_delay.0,
            queue_capacity: m.batching.queue_capacity,
            default_timeout: config.server.request_timeout.0,
            failure_threshold: m.health.failure_threshold,
            reprobe_interval: m.health.reprobe_interval.0,
        };
        let model_extras = extras_for(m, &info)?;
        models.push(ModelHandle::start(
            &m.name,
            &m.version,
            info,
            m.dispatch,
            settings,
            runners,
            metrics.clone(),
        )?);
        tuning.insert(m.name.clone(), results);
        extras.insert(m.name.clone(), model_extras);
    }
    Ok(Loaded {
        models,
        tuning,
        extras,
    })
}

/// Builds one device's session and decides its batch size: from the config, or by the probe
/// (or its cache). On CUDA, ONNX Runtime's arena is capped at the free memory less the headroom.
fn open_and_tune(
    m: config::ModelConfig,
    plan: device::DevicePlan,
    name: String,
    runtime_version: &str,
    cuda_visible: Option<&str>,
) -> Result<(OrtRunner, DeviceTuning), StartupError> {
    let auto = m.batching.max_batch_size == MaxBatch::Auto;
    let on_cuda = matches!(plan.kind, device::DeviceKind::Cuda { .. });
    let memory = if auto || on_cuda {
        Some(
            tuning::MemoryProbe::for_plan(&plan, cuda_visible).map_err(|message| {
                StartupError::Model {
                    model: m.name.clone(),
                    message: format!("{name}: cannot read device memory: {message}"),
                }
            })?,
        )
    } else {
        None
    };
    let gpu_mem_limit = match &memory {
        Some(probe @ tuning::MemoryProbe::Cuda { .. }) => {
            let r = probe.read();
            let free = r.limit.unwrap_or(0).saturating_sub(r.used);
            Some((free as f64 * (1.0 - m.tuning.memory_headroom)) as u64)
        }
        _ => None,
    };
    let cuda = device::CudaSettings {
        gpu_mem_limit,
        pinned_inputs: m.cuda.pinned_inputs,
    };
    let mut runner = OrtRunner::open_with(&m.path, &plan, cuda)?;
    let result = match (m.batching.max_batch_size, memory) {
        (MaxBatch::Auto, Some(memory)) => {
            let info = runner.info().clone();
            let dim_names = runner.dim_names().to_vec();
            let req = tuning::TuneRequest {
                model: &m.name,
                model_path: &m.path,
                plan: &plan,
                device: &name,
                info: &info,
                dim_names: &dim_names,
                config: &m.tuning,
                runtime_version,
                memory: &memory,
            };
            tuning::tune_device(&mut runner, &req)?
        }
        (fixed, _) => DeviceTuning {
            device: name,
            source: tuning::Source::Config,
            chosen: match fixed {
                MaxBatch::Fixed(n) => n,
                MaxBatch::Auto => 1,
            },
            reason: "batching.max_batch_size in the config".into(),
            memory_source: String::new(),
            probes: Vec::new(),
            baseline_memory_bytes: 0,
            duration_ms: 0.0,
        },
    };
    Ok((runner, result))
}

/// Image preprocessing and labels of a model, checked against what the model takes.
fn extras_for(m: &config::ModelConfig, info: &ModelInfo) -> Result<ModelExtras, StartupError> {
    let fail = |message: String| StartupError::Model {
        model: m.name.clone(),
        message,
    };
    if let Some(img) = &m.image {
        let [h, w] = img.size;
        let want: Vec<i64> = match img.layout {
            config::Layout::Nchw => vec![3, h as i64, w as i64],
            config::Layout::Nhwc => vec![h as i64, w as i64, 3],
        };
        let dtype = match img.dtype {
            config::ImageDtype::Fp32 => tensor::DataType::F32,
            config::ImageDtype::Uint8 => tensor::DataType::U8,
        };
        let fits = info.inputs.len() == 1
            && info.inputs[0].dtype == dtype
            && info.inputs[0].dims.len() == 4
            && info.inputs[0].dims[1..]
                .iter()
                .zip(&want)
                .all(|(&d, &e)| d < 0 || d == e);
        if !fits {
            return Err(fail(format!(
                "image: {:?} {dtype} [batch, {want:?}] does not fit the model's inputs {:?}",
                img.layout,
                info.inputs
                    .iter()
                    .map(|i| (&i.name, i.dtype, &i.dims))
                    .collect::<Vec<_>>()
            )));
        }
    }
    let classifier = match &m.classification {
        None => None,
        Some(c) => {
            if let Some(out) = &c.output {
                info.output_index(out).map_err(|e| fail(e.to_string()))?;
            }
            let cl = classify::Classifier::load(c).map_err(|e| fail(format!("labels: {e}")))?;
            Some(cl)
        }
    };
    Ok(ModelExtras {
        image: m.image.clone(),
        classifier,
    })
}

fn auth_tokens(config: &Config) -> Vec<String> {
    config
        .server
        .auth
        .as_ref()
        .map(|a| a.tokens.clone())
        .unwrap_or_default()
}

/// Threads for image preprocessing: the configured count, or the cores the CPU sessions leave.
pub fn preprocess_threads(config: &Config) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    match config.runtime.preprocess_threads {
        config::Threads::Count(n) => n,
        config::Threads::Auto => {
            let cpu = match config.runtime.cpu_threads {
                config::Threads::Count(n) => n,
                config::Threads::Auto => cores,
            };
            cores.saturating_sub(cpu).max(1)
        }
    }
}

/// Loads everything (see [`load_models`]) and returns the state, ready to serve.
pub async fn start(config: &Config) -> Result<Arc<AppState>, StartupError> {
    let metrics = Arc::new(Metrics::new());
    let loaded = load_models(config, &metrics).await?;
    let state = Arc::new(
        AppState::loading(
            metrics,
            config.server.max_body_bytes.0,
            preprocess_threads(config),
        )
        .with_tokens(auth_tokens(config)),
    );
    state.install(loaded);
    Ok(state)
}

/// Serves HTTP on `listener` until `shutdown` resolves, then drains (see [`shutdown`]) and stops
/// every model. Returns when the device threads are joined.
pub async fn serve(
    state: Arc<AppState>,
    server: &config::ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = http::router(state.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving HTTP");
    }
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_delay = server.drain_delay.0;
    let draining = state.clone();
    let graceful = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(?drain_delay, "draining: readiness is 503, still serving");
        tokio::time::sleep(drain_delay).await;
        tracing::info!("no longer accepting connections");
        let _ = drained_tx.send(());
    };
    let http = axum::serve(listener, router).with_graceful_shutdown(graceful);
    let shutdown_timeout = server.shutdown_timeout.0;
    let overdue = async move {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(shutdown_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = http => r?,
        _ = overdue => tracing::warn!(?shutdown_timeout, "in-flight requests did not finish in time"),
    }
    for m in state.models() {
        m.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Serves at once (health answers, readiness is 503) while the models load and tune, then
/// serves them until `shutdown` resolves. A loading failure ends the server with the error.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(
        AppState::loading(
            metrics.clone(),
            config.server.max_body_bytes.0,
            preprocess_threads(&config),
        )
        .with_tokens(auth_tokens(&config)),
    );
    let serving = serve(state.clone(), &config.server, listener, shutdown);
    tokio::pin!(serving);
    let loading = load_models(&config, &metrics);
    tokio::pin!(loading);
    tokio::select! {
        loaded = &mut loading => {
            state.install(loaded?);
            tracing::info!("every model is loaded and tuned: ready");
            serving.await?;
        }
        served = &mut serving => served?,
    }
    Ok(())
}
