//! Startup and serving: load ONNX Runtime, build and tune every (model, device) session, start
//! the batchers, serve HTTP, and on shutdown drain, stop and join (README.md, "Operations").
//!
//! [`run`] serves at once (health answers, readiness is 503) while the models load; [`start`]
//! loads first and returns a [`Server`] to serve later (tests, the bench). Both build their state
//! with [`new_state`] and serve through [`serve_until`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::app::{AppState, Model};
use crate::batching::{BatchSettings, DeviceRunner, ModelHandle, ModelOwner};
use crate::classify::Classifier;
use crate::config::{self, Config, ConfigError, ImageConfig, MaxBatch, ServerConfig};
use crate::device::{self, DeviceError, OrtRunner};
use crate::dispatch;
use crate::metrics::Metrics;
use crate::model::ModelInfo;
use crate::tensor;
use crate::tuning::{self, DeviceTuning, TuningError};

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

/// What loading produces: the served models and, apart from them, their owners.
#[derive(Default)]
struct Loaded {
    models: Vec<Model>,
    owners: Vec<ModelOwner>,
}

/// Loads ONNX Runtime, builds every (model, device, instance) session, tunes each device's
/// batch size (or takes it from config or the cache), and starts the device threads and
/// batchers. Devices are tuned one after another, so probes do not disturb each other.
async fn load_models(config: &Config, metrics: &Arc<Metrics>) -> Result<Loaded, StartupError> {
    let runtime_cfg = config.runtime.clone();
    let runtime = tokio::task::spawn_blocking(move || device::init_runtime(&runtime_cfg))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    let plans = device::plan_devices(config, &runtime)?;
    let version = runtime.version();
    let mut loaded = Loaded::default();
    for (m, plans) in config.models.iter().zip(plans) {
        let mut runners = Vec::new();
        let mut results = Vec::new();
        let mut info: Option<ModelInfo> = None;
        for plan in plans {
            let name = match plan.instance {
                0 => plan.device.clone(),
                i => format!("{}#{i}", plan.device),
            };
            let again = Reopen {
                path: m.path.clone(),
                plan: plan.clone(),
                pinned_inputs: m.cuda.pinned_inputs,
                conv_search: m.cuda.cudnn_conv_algo_search,
            };
            let job = Slot {
                model: m.clone(),
                plan,
                name: name.clone(),
                runtime_version: version.clone(),
                cuda_visible: config.runtime.cuda_visible_devices.clone(),
            };
            let (runner, result) = tokio::task::spawn_blocking(move || open_and_tune(job))
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
                    pinned_inputs: again.pinned_inputs,
                    conv_search: again.conv_search,
                };
                OrtRunner::open_with(&again.path, &again.plan, cuda)
                    .map(|r| Box::new(r) as Box<dyn device::ModelRunner>)
                    .map_err(|e| e.to_string())
            });
            let refine = refine_settings(m, &result);
            // The watchdog allows for the largest size the cap may reach.
            let largest = refine.as_ref().map_or(result.chosen, |r| r.ceiling);
            let tuned_latency = result
                .probes
                .iter()
                .find(|p| p.batch == largest && p.latency_ms > 0.0)
                .map(|p| std::time::Duration::from_secs_f64(p.latency_ms / 1000.0));
            runners.push(DeviceRunner {
                name,
                max_batch: result.chosen,
                buckets: result.warmup.iter().map(|w| w.batch).collect(),
                runner: Box::new(runner),
                rebuild: Some(rebuild),
                run_timeout: m.health.run_timeout_for(tuned_latency),
                refine,
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
        let (image, classifier) = extras_for(m, &info)?;
        let (handle, owner) = ModelHandle::start(
            &m.name,
            &m.version,
            info,
            m.dispatch,
            settings,
            runners,
            metrics.clone(),
        )?;
        loaded
            .models
            .push(Model::new(handle, image, classifier, results));
        loaded.owners.push(owner);
    }
    Ok(loaded)
}

/// How a device's cap may move under load (`tuning.refine`): from the probe's choice up to the
/// largest size it ran within its limits. `None` for a configured size, a fixed batch
/// dimension, buckets (each size is warmed up before readiness), or nothing above the choice.
fn refine_settings(
    m: &config::ModelConfig,
    result: &DeviceTuning,
) -> Option<dispatch::RefineSettings> {
    let probed = matches!(
        result.source,
        tuning::Source::Probe | tuning::Source::Cache | tuning::Source::Shared
    );
    (m.tuning.refine && probed && result.warmup.is_empty() && result.max_good > result.chosen).then(
        || dispatch::RefineSettings {
            floor: result.chosen,
            ceiling: result.max_good,
            latency_budget: m.tuning.latency_budget.map(|d| d.0),
            window: std::time::Duration::from_millis(500),
            min_batches: 8,
        },
    )
}

/// One (model, device, instance) to open and tune, moved to a blocking thread.
struct Slot {
    model: config::ModelConfig,
    plan: device::DevicePlan,
    /// As served: `cpu:0`, `cpu:0#1`.
    name: String,
    runtime_version: String,
    cuda_visible: Option<String>,
}

/// What a panic's rebuild needs to open the same session again.
struct Reopen {
    path: std::path::PathBuf,
    plan: device::DevicePlan,
    pinned_inputs: bool,
    conv_search: config::ConvAlgoSearch,
}

/// Builds one device's session and decides its batch size: from the config, or by the probe
/// (or its cache). On CUDA, ONNX Runtime's arena is capped at the free memory less the headroom.
fn open_and_tune(slot: Slot) -> Result<(OrtRunner, DeviceTuning), StartupError> {
    let Slot {
        model: m,
        plan,
        name,
        runtime_version,
        cuda_visible,
    } = slot;
    let runtime_version = runtime_version.as_str();
    let cuda_visible = cuda_visible.as_deref();
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
        conv_search: m.cuda.cudnn_conv_algo_search,
    };
    let mut runner = OrtRunner::open_with(&m.path, &plan, cuda)?;
    let mut result = match (m.batching.max_batch_size, memory) {
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
            let result = tuning::tune_device(&mut runner, &req)?;
            if result.source == tuning::Source::Probe {
                // A fresh session to serve with: the probed one keeps in its arena what the
                // largest size took, and served lone requests more slowly (the CNN fixture's
                // p50 at one client: 0.196-0.247 ms after a probe in the same session, 0.179-0.192
                // with the size read from the cache; docs/BENCHMARKS.md, "Tuning for the server").
                drop(runner);
                runner = OrtRunner::open_with(&m.path, &plan, cuda)?;
            }
            result
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
            fixed_cost_ms: 0.0,
            max_good: 0,
            key: None,
            warmup: Vec::new(),
        },
    };
    let info = runner.info().clone();
    let sizes = if info.batchable() {
        m.batching.buckets.sizes(result.chosen, on_cuda)
    } else {
        Vec::new()
    };
    if !sizes.is_empty() {
        let device = result.device.clone();
        result.warmup = warm_up(&mut runner, &m, &info, &sizes, &device)?;
    }
    Ok((runner, result))
}

/// Runs every batch-size bucket once, before readiness, so no client request pays for a first
/// run of its shape (on CUDA, cuDNN's per-shape algorithm search). Returns each bucket's time.
fn warm_up(
    runner: &mut OrtRunner,
    m: &config::ModelConfig,
    info: &ModelInfo,
    sizes: &[usize],
    device: &str,
) -> Result<Vec<tuning::Warmup>, StartupError> {
    use device::ModelRunner;
    let dims = tuning::resolve_dims(&m.name, info, runner.dim_names(), &m.tuning)?;
    let mut runs = Vec::with_capacity(sizes.len());
    for (i, &batch) in sizes.iter().enumerate() {
        let inputs = tuning::synthetic_inputs(info, &dims, batch, i as u64);
        let started = std::time::Instant::now();
        runner.run(&[inputs]).map_err(|e| StartupError::Model {
            model: m.name.clone(),
            message: format!("{device}: warming up batch size {batch}: {e}"),
        })?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(model = %m.name, device, batch, ms, "bucket warmed up");
        runs.push(tuning::Warmup { batch, ms });
    }
    Ok(runs)
}

/// What `ortserve check-config` found: what `serve` would refuse (errors), and what depends on
/// the host it runs on (warnings: a GPU that this machine lacks).
#[derive(Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Checks a parsed, valid config against its model files as `serve` would, collecting every
/// problem instead of stopping at the first: the ONNX Runtime library, each model file (opened
/// on the CPU for its inputs and outputs), its `image:` and `classification:` sections, and the
/// dimensions `auto` tuning needs. Devices are planned on this host; what fails there is a
/// warning, since the config may be meant for another machine.
pub fn check(config: &Config) -> CheckReport {
    let mut report = CheckReport::default();
    let runtime = match device::init_runtime(&config.runtime) {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    if let Err(e) = device::plan_devices(config, &runtime) {
        report.warnings.push(format!("on this host: {e}"));
    }
    let plan = device::DevicePlan {
        device: "cpu:0".into(),
        instance: 0,
        kind: device::DeviceKind::Cpu {
            intra_op_threads: 1,
            spinning: false,
        },
    };
    for m in &config.models {
        let runner = match OrtRunner::open_with(&m.path, &plan, device::CudaSettings::default()) {
            Ok(r) => r,
            Err(e) => {
                report.errors.push(format!("model {:?}: {e}", m.name));
                continue;
            }
        };
        if let Err(e) = extras_for(m, runner.info()) {
            report.errors.push(e.to_string());
        }
        if m.batching.max_batch_size == MaxBatch::Auto && runner.info().batchable() {
            if let Err(e) =
                tuning::resolve_dims(&m.name, runner.info(), runner.dim_names(), &m.tuning)
            {
                report.errors.push(e.to_string());
            }
        }
    }
    report
}

/// Image preprocessing and labels of a model, checked against what the model takes.
fn extras_for(
    m: &config::ModelConfig,
    info: &ModelInfo,
) -> Result<(Option<ImageConfig>, Option<Classifier>), StartupError> {
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
            let index = match &c.output {
                Some(out) => info.output_index(out).map_err(|e| fail(e.to_string()))?,
                None => 0,
            };
            // Scores are read as FP32; another type would give no classes at all.
            if let Some(o) = info.outputs.get(index) {
                if o.dtype != tensor::DataType::F32 {
                    return Err(fail(format!(
                        "classification: output {:?} is {}; top-k labels need an FP32 output (set classification.output)",
                        o.name,
                        o.dtype.v2_name()
                    )));
                }
            }
            let cl = Classifier::load(c).map_err(|e| fail(format!("labels: {e}")))?;
            Some(cl)
        }
    };
    Ok((m.image.clone(), classifier))
}

/// Threads for image preprocessing: the configured count, or the cores the CPU sessions leave.
fn preprocess_threads(config: &Config) -> usize {
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

/// The state every way of serving starts from: metrics, limits, tokens and the image pool,
/// with no model yet (readiness is 503 until [`AppState::install`]).
fn new_state(config: &Config) -> Arc<AppState> {
    Arc::new(AppState::loading(
        Arc::new(Metrics::new()),
        &config.server,
        preprocess_threads(config),
        config
            .models
            .iter()
            .map(|m| (m.name.clone(), m.version.clone()))
            .collect(),
    ))
}

/// Where the server listens: the data port and, when `server.admin_addr` is set, the admin port
/// (liveness, readiness and metrics on a connection limit of their own). A bare `TcpListener`
/// converts into one with no admin port.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(http: TcpListener) -> Listeners {
        Listeners { http, admin: None }
    }
}

/// A loaded server, not yet serving: its state (for a router) and its models' owners.
pub struct Server {
    state: Arc<AppState>,
    owners: Vec<ModelOwner>,
    config: ServerConfig,
}

impl Server {
    /// The state handlers share (pass it to [`crate::http::router`]).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves HTTP on `listeners` until `shutdown` resolves, then drains and stops every model.
    /// Returns when the device threads are joined.
    pub async fn serve(
        self,
        listeners: impl Into<Listeners>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let served =
            serve_until(self.state.clone(), &self.config, listeners.into(), shutdown).await;
        stop_models(self.owners).await;
        served
    }

    /// Stops every model without serving: admitted requests are answered, threads joined.
    pub async fn shutdown(self) {
        stop_models(self.owners).await;
    }
}

/// Loads everything (see [`load_models`]) and returns the server, ready to serve.
pub async fn start(config: &Config) -> Result<Server, StartupError> {
    let state = new_state(config);
    let loaded = load_models(config, &state.metrics).await?;
    state.install(loaded.models);
    Ok(Server {
        state,
        owners: loaded.owners,
        config: config.server.clone(),
    })
}

/// Serves at once (health answers, readiness is 503) while the models load and tune, then
/// serves them until `shutdown` resolves. A loading failure ends the server with the error.
pub async fn run(
    config: Config,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let state = new_state(&config);
    let serving = serve_until(state.clone(), &config.server, listeners.into(), shutdown);
    tokio::pin!(serving);
    let loading = load_models(&config, &state.metrics);
    tokio::pin!(loading);
    tokio::select! {
        loaded = &mut loading => {
            let loaded = loaded?;
            state.install(loaded.models);
            tracing::info!("every model is loaded and tuned: ready");
            let served = serving.await;
            stop_models(loaded.owners).await;
            served?;
        }
        served = &mut serving => served?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Probes every (model, device) batch size without serving, stops the models, and returns the
/// results by model name (`ortserve tune`).
pub async fn tune(config: &Config) -> Result<BTreeMap<String, Vec<DeviceTuning>>, StartupError> {
    let server = start(config).await?;
    let results = server
        .state
        .models()
        .iter()
        .map(|m| (m.name().to_string(), m.tuning().to_vec()))
        .collect();
    server.shutdown().await;
    Ok(results)
}

/// Serves HTTP on `listeners` until `shutdown` resolves, then drains: readiness turns 503 at
/// once, requests are still served for `drain_delay` (so load balancers deregister the pod),
/// then the listener closes and open requests get up to `shutdown_timeout` to finish. The admin
/// port answers probes and scrapes throughout and closes last.
async fn serve_until(
    state: Arc<AppState>,
    server: &ServerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listeners.http;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving HTTP");
    }
    // The admin port stops when the data port has: `admin_stop` is dropped on return.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = match listeners.admin {
        Some(l) => {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving probes and metrics on the admin port");
            }
            let stopped = async move {
                let _ = admin_stopped.await;
            };
            Some(crate::http::AdminPort::start(
                state.clone(),
                server,
                l,
                stopped,
            )?)
        }
        None => None,
    };
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
    let http = crate::http::serve(state, server, listener, graceful);
    let shutdown_timeout = server.shutdown_timeout.0;
    let overdue = async move {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(shutdown_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = http => r,
        _ = overdue => {
            tracing::warn!(?shutdown_timeout, "in-flight requests did not finish in time");
            Ok(())
        }
    };
    drop(admin_stop);
    if let Some(admin) = admin {
        if let Err(e) = admin.join().await {
            tracing::warn!(error = %e, "the admin port ended with an error");
        }
    }
    served
}

/// Stops every model: each answers what it admitted, then its threads are joined.
async fn stop_models(owners: Vec<ModelOwner>) {
    for o in owners {
        o.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Dur;

    /// The drain sequence on tokio's paused clock: readiness turns 503 at the signal, serving
    /// goes on for exactly `drain_delay`, then it ends (no connection is open to wait for).
    #[tokio::test(start_paused = true)]
    async fn serving_goes_on_for_the_drain_delay_after_the_signal_then_ends() {
        let server = ServerConfig {
            drain_delay: Dur(Duration::from_secs(5)),
            ..ServerConfig::default()
        };
        let state = Arc::new(AppState::loading(
            Arc::new(Metrics::new()),
            &server,
            1,
            Vec::new(),
        ));
        state.install(Vec::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn({
            let state = state.clone();
            async move {
                serve_until(state, &server, listener.into(), async {
                    let _ = signalled.await;
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            state.is_ready() && !serving.is_finished(),
            "serves until the signal"
        );

        let at = tokio::time::Instant::now();
        signal.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(state.is_draining() && !state.is_ready(), "503 at once");
        tokio::time::sleep(Duration::from_millis(4990)).await;
        assert!(
            !serving.is_finished(),
            "still serving within the drain delay"
        );
        serving.await.unwrap().unwrap();
        let took = at.elapsed();
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_millis(5050),
            "serving ended {took:?} after the signal"
        );
    }
}
