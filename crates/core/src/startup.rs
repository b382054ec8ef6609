//! Loading: ONNX Runtime, every (model, device) session built and tuned, the batchers started;
//! and stopping them. The server crate (`ortserve`, `src/server.rs`) serves what this loads.
//!
//! [`new_state`] is the state every way of serving starts from (readiness 503, no model);
//! [`load_models`] loads and tunes; [`stop_models`] answers what was admitted and joins.

use std::sync::Arc;

use thiserror::Error;

use crate::app::{AppState, Model};
use crate::batching::{BatchSettings, DeviceRunner, ModelHandle, ModelOwner};
use crate::classify::Classifier;
use crate::config::{self, Config, ConfigError, ImageConfig, MaxBatch};
use crate::device::{self, DeviceError, OrtRunner};
use crate::dispatch;
use crate::lifecycle::Loader;
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

/// What loading produces: each served model with its owner (what stops it).
pub type Loaded = Vec<(Model, ModelOwner)>;

/// Loads ONNX Runtime, builds every (model, device, instance) session, tunes each device's
/// batch size (or takes it from config or the cache), and starts the device threads and
/// batchers. Devices are tuned one after another, so probes do not disturb each other.
pub async fn load_models(config: &Config, state: &AppState) -> Result<Loaded, StartupError> {
    let metrics = &state.metrics;
    let runtime_cfg = config.runtime.clone();
    let runtime = tokio::task::spawn_blocking(move || device::init_runtime(&runtime_cfg))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    let plans = device::plan_devices(config, &runtime)?;
    let version = runtime.version();
    state
        .lifecycle()
        .set_loader(Loader::new(config, plans.clone(), runtime));
    let mut versions = Vec::new();
    for m in &config.models {
        let found = config::versions_of(m)?;
        if found.is_empty() {
            return Err(StartupError::Model {
                model: m.name.clone(),
                message: format!(
                    "no version to serve in {} (folders VERSION/{} that version_policy chooses)",
                    m.path.display(),
                    config::MODEL_FILE
                ),
            });
        }
        state
            .lifecycle()
            .want(&m.name, found.iter().map(|v| v.version.clone()).collect());
        versions.push(found);
    }
    if config.server.model_control != config::ModelControl::None {
        crate::lifecycle::note_loaded(state, versions.iter().flatten().cloned().collect()).await;
    }
    let mut loaded = Loaded::new();
    for (found, plans) in versions.into_iter().zip(plans) {
        for m in &found {
            // What the version adds to memory: what another version needs beside it later.
            let before = crate::lifecycle::read_memory_now(&plans, &config.runtime).await;
            loaded.push(load_one(config, m, plans.clone(), &version, metrics, None).await?);
            let after = crate::lifecycle::read_memory_now(&plans, &config.runtime).await;
            state.lifecycle().note_footprint(
                &m.name,
                &m.version,
                crate::lifecycle::grown(&before, &after),
            );
        }
    }
    Ok(loaded)
}

/// Loads one model on its planned devices: opens and tunes each (model, device, instance)
/// session one after another, then starts its device threads and batcher. What it returns is
/// not served until it is published ([`AppState::install`], or the registry's `load_one`).
/// `served` is the version it will replace, if one serves: a device whose cache has nothing for
/// the new file takes that version's batch size when the inputs and outputs are the same,
/// rather than probing a device that is busy serving.
pub async fn load_one(
    config: &Config,
    m: &config::ModelConfig,
    plans: Vec<device::DevicePlan>,
    runtime_version: &str,
    metrics: &Arc<Metrics>,
    served: Option<&Model>,
) -> Result<(Model, ModelOwner), StartupError> {
    let mut runners = Vec::new();
    let mut results = Vec::new();
    let mut info: Option<ModelInfo> = None;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let choices: Vec<tuning::Cores> = plans.iter().map(|p| cores_for(p, &plans, cores)).collect();
    // One CPU session with every core, from `cpu_threads: auto` and no count of the model's own.
    let alone = plans.len() == 1
        && config.runtime.cpu_threads == config::Threads::Auto
        && m.devices.0.iter().all(|e| e.intra_op_threads.is_none());
    for (plan, choice) in plans.into_iter().zip(choices) {
        let threads_auto = alone && cpu_threads(&plan) == Some(cores);
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
            runtime_version: runtime_version.to_string(),
            runtime: config.runtime.clone(),
            cores: choice,
            served: served.and_then(|s| {
                let t = s.tuning().iter().find(|t| t.device == name)?;
                Some((s.info().clone(), t.clone()))
            }),
            threads_auto,
        };
        let (runner, result, opened) = tokio::task::spawn_blocking(move || open_and_tune(job))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        // A rebuild opens the session as it was opened (one thread fewer, say).
        let again = Reopen {
            plan: opened,
            ..again
        };
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
            let settings = device::SessionSettings {
                memory_limit: None,
                pinned_inputs: again.pinned_inputs,
                conv_search: again.conv_search,
            };
            OrtRunner::open_with(&again.path, &again.plan, settings)
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
    Ok((Model::new(handle, image, classifier, results), owner))
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
        tuning::Source::Probe
            | tuning::Source::Cache
            | tuning::Source::Shared
            | tuning::Source::Served
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
    /// What the device's execution provider needs to find it (`CUDA_VISIBLE_DEVICES`).
    runtime: config::RuntimeConfig,
    /// Which end of the sizes the probe finds tied to choose, and the cores left for request
    /// handling (see [`cores_for`]).
    cores: tuning::Cores,
    /// On a reload: the replaced version's inputs and outputs and this device's tuning.
    served: Option<(ModelInfo, DeviceTuning)>,
    /// The session's threads are every core, from `runtime.cpu_threads: auto` and no count of
    /// the model's own: its probe may give one up to request handling
    /// ([`tuning::one_thread_fewer`]).
    threads_auto: bool,
}

fn cpu_threads(p: &device::DevicePlan) -> Option<usize> {
    match p.kind {
        device::DeviceKind::Cpu {
            intra_op_threads, ..
        } => Some(intra_op_threads),
        _ => None,
    }
}

/// What `plan`'s probe is told about the cores (`cores`: `available_parallelism`, the affinity
/// mask and the cgroup's CPU quota), from its model's CPU sessions' intra-op threads together
/// (other models' sessions are not counted: they are idle unless their own load runs):
/// - `prefer`: a CPU session takes the larger of the tied sizes when those threads are as many
///   as the cores (request handling then runs on the device's cores);
/// - `handling`: the cores those threads leave for request handling, shared by the sessions
///   (every instance counts): how many requests a loaded server can handle for each, next to
///   what the session can run (see `tuning::probe::device_limits_the_server`).
///
/// A device that computes off the CPU (CUDA) leaves the cores to request handling and gets the
/// smaller end and 0: the device-limits rule is measured on CPU sessions only, and a GPU's
/// choice and tuning key stay as they were.
fn cores_for(
    plan: &device::DevicePlan,
    plans: &[device::DevicePlan],
    cores: usize,
) -> tuning::Cores {
    if cpu_threads(plan).is_none() {
        return tuning::Cores {
            prefer: tuning::Prefer::Smaller,
            handling: 0.0,
        };
    }
    let taken: usize = plans.iter().filter_map(cpu_threads).sum();
    tuning::Cores {
        prefer: tuning::Prefer::for_threads(taken, cores),
        handling: cores.saturating_sub(taken) as f64 / plans.len().max(1) as f64,
    }
}

/// What a panic's rebuild needs to open the same session again.
struct Reopen {
    path: std::path::PathBuf,
    plan: device::DevicePlan,
    pinned_inputs: bool,
    conv_search: config::ConvAlgoSearch,
}

/// Builds one device's session and decides its batch size: from the config, or by the probe
/// (or its cache). On a device with memory of its own (CUDA), ONNX Runtime's arena is capped at
/// the free memory less the headroom.
///
/// A CPU session whose threads are every core from `runtime.cpu_threads: auto` is opened again
/// with one thread fewer, and probed again, where its probe says the device would not limit a
/// loaded server with one thread fewer ([`tuning::one_thread_fewer`]); the reason says so, and
/// the plan returned is the one the session was opened with.
fn open_and_tune(
    slot: Slot,
) -> Result<(OrtRunner, DeviceTuning, device::DevicePlan), StartupError> {
    let Slot {
        model: m,
        mut plan,
        name,
        runtime_version,
        runtime,
        cores,
        served,
        threads_auto,
    } = slot;
    let runtime_version = runtime_version.as_str();
    let (mut runner, mut result) =
        open_tuned(&m, &plan, &name, runtime_version, &runtime, cores, &served)?;
    let threads = cpu_threads(&plan).unwrap_or(0);
    let fewer = threads_auto
        .then(|| tuning::one_thread_fewer(&result.probes, result.fixed_cost_ms, threads))
        .flatten();
    if let Some(why) = fewer {
        if let device::DeviceKind::Cpu {
            intra_op_threads, ..
        } = &mut plan.kind
        {
            *intra_op_threads = threads - 1;
        }
        // The session alone, on the cores its threads took (`threads_auto`).
        let cores = cores_for(&plan, std::slice::from_ref(&plan), threads);
        drop(runner);
        tracing::info!(model = %m.name, device = %name, "{why}");
        let first = result;
        (runner, result) = open_tuned(&m, &plan, &name, runtime_version, &runtime, cores, &served)?;
        result.earlier = Some(Box::new(first));
        // A reload that takes the served version's result has its reason already begun so.
        let rest = match result.reason.split_once("; ") {
            Some((head, rest)) if head.contains("intra-op thread(s), not") => rest.to_string(),
            _ => result.reason.clone(),
        };
        result.reason = format!("{why}; {rest}");
    }
    let info = runner.info().clone();
    let provider = plan.kind.provider();
    let sizes = if info.batchable() {
        m.batching.buckets.sizes(result.chosen, provider.is_gpu())
    } else {
        Vec::new()
    };
    if !sizes.is_empty() {
        let device = result.device.clone();
        result.warmup = warm_up(&mut runner, &m, &info, &sizes, &device)?;
    }
    Ok((runner, result, plan))
}

/// Opens `plan`'s session and decides its batch size (see [`open_and_tune`]).
fn open_tuned(
    m: &config::ModelConfig,
    plan: &device::DevicePlan,
    name: &str,
    runtime_version: &str,
    runtime: &config::RuntimeConfig,
    cores: tuning::Cores,
    served: &Option<(ModelInfo, DeviceTuning)>,
) -> Result<(OrtRunner, DeviceTuning), StartupError> {
    let auto = m.batching.max_batch_size == MaxBatch::Auto;
    let provider = plan.kind.provider();
    let memory = if auto || provider.caps_arena() {
        Some(
            tuning::MemoryProbe::for_plan(plan, runtime).map_err(|message| {
                StartupError::Model {
                    model: m.name.clone(),
                    message: format!("{name}: cannot read device memory: {message}"),
                }
            })?,
        )
    } else {
        None
    };
    let memory_limit = match &memory {
        Some(probe) if provider.caps_arena() => {
            let r = probe.read();
            let free = r.limit.unwrap_or(0).saturating_sub(r.used);
            Some((free as f64 * (1.0 - m.tuning.memory_headroom)) as u64)
        }
        _ => None,
    };
    let settings = device::SessionSettings {
        memory_limit,
        pinned_inputs: m.cuda.pinned_inputs,
        conv_search: m.cuda.cudnn_conv_algo_search,
    };
    let mut runner = OrtRunner::open_with(&m.path, plan, settings)?;
    let result = match (m.batching.max_batch_size, memory) {
        (MaxBatch::Auto, Some(memory)) => {
            let info = runner.info().clone();
            let dim_names = runner.dim_names().to_vec();
            let req = tuning::TuneRequest {
                model: &m.name,
                model_path: &m.path,
                plan,
                device: name,
                info: &info,
                dim_names: &dim_names,
                config: &m.tuning,
                cores,
                runtime_version,
                memory: &memory,
                // Only for a model with the same inputs and outputs.
                served: served
                    .as_ref()
                    .filter(|(served_info, _)| *served_info == info)
                    .map(|(_, t)| t),
            };
            let result = tuning::tune_device(&mut runner, &req)?;
            if result.source == tuning::Source::Probe {
                // A fresh session to serve with: the probed one keeps in its arena what the
                // largest size took, and served lone requests more slowly (the CNN fixture's
                // p50 at one client: 0.196-0.247 ms after a probe in the same session, 0.179-0.192
                // with the size read from the cache; docs/BENCHMARKS.md, "Tuning for the server").
                drop(runner);
                runner = OrtRunner::open_with(&m.path, plan, settings)?;
            }
            result
        }
        (fixed, _) => DeviceTuning::unprobed(
            name.to_string(),
            tuning::Source::Config,
            match fixed {
                MaxBatch::Fixed(n) => n,
                MaxBatch::Auto => 1,
            },
            "batching.max_batch_size in the config",
            String::new(),
        ),
    };
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
    let mut versions = Vec::new();
    for m in &config.models {
        match config::versions_of(m) {
            Ok(found) if found.is_empty() => report.errors.push(format!(
                "model {:?}: no version to serve in {}",
                m.name,
                m.path.display()
            )),
            Ok(found) => versions.extend(found),
            Err(e) => report.errors.push(format!("model {:?}: {e}", m.name)),
        }
    }
    for m in &versions {
        let runner = match OrtRunner::open_with(&m.path, &plan, device::SessionSettings::default())
        {
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
            let scores = info.outputs.get(index);
            if let Some(o) = scores {
                if o.dtype != tensor::DataType::F32 {
                    return Err(fail(format!(
                        "classification: output {:?} is {}; top-k labels need an FP32 output (set classification.output)",
                        o.name,
                        o.dtype.v2_name()
                    )));
                }
            }
            let cl = Classifier::load(c).map_err(|e| fail(format!("labels: {e}")))?;
            // A labels file one line off (a background class, a header line) would name every
            // class wrongly without an error: its lines must be the output's classes, where the
            // model fixes their number.
            let classes = scores.and_then(|o| {
                let row = o.dims.get(1..).filter(|d| !d.is_empty())?;
                row.iter()
                    .all(|&d| d > 0)
                    .then(|| row.iter().product::<i64>())
            });
            if let (Some(lines), Some(classes)) = (cl.label_count(), classes) {
                if lines as i64 != classes {
                    return Err(fail(format!(
                        "classification.labels: {lines} labels for the {classes} classes of output {:?}",
                        scores.map_or("", |o| o.name.as_str())
                    )));
                }
            }
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
pub fn new_state(config: &Config) -> Arc<AppState> {
    let state = Arc::new(AppState::loading(
        Arc::new(Metrics::new()),
        &config.server,
        preprocess_threads(config),
        config.models.iter().map(|m| m.name.clone()).collect(),
    ));
    // A model file's version is known before it loads (a versioned folder's once it is read):
    // a request for another version is 404 from the start.
    for m in config.models.iter().filter(|m| !m.path.is_dir()) {
        state.lifecycle().want(&m.name, vec![m.version.clone()]);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuning::Prefer;

    fn cpu(instance: usize, threads: usize) -> device::DevicePlan {
        device::DevicePlan {
            device: "cpu:0".into(),
            instance,
            kind: device::DeviceKind::Cpu {
                intra_op_threads: threads,
                spinning: false,
            },
        }
    }

    #[test]
    fn a_model_whose_cpu_sessions_take_every_core_prefers_the_larger_size() {
        // One session, one thread: larger on one core, smaller on two.
        let one = [cpu(0, 1)];
        assert_eq!(cores_for(&one[0], &one, 1).prefer, Prefer::Larger);
        assert_eq!(cores_for(&one[0], &one, 2).prefer, Prefer::Smaller);
        // Two instances of one thread each take two cores together.
        let two = [cpu(0, 1), cpu(1, 1)];
        assert_eq!(cores_for(&two[1], &two, 2).prefer, Prefer::Larger);
        assert_eq!(cores_for(&two[1], &two, 4).prefer, Prefer::Smaller);
        // A GPU beside a CPU session that takes every core leaves the cores to request
        // handling for its own batches.
        let mixed = [
            cpu(0, 2),
            device::DevicePlan {
                device: "cuda:0".into(),
                instance: 0,
                kind: device::DeviceKind::Cuda { id: 0 },
            },
        ];
        assert_eq!(cores_for(&mixed[0], &mixed, 2).prefer, Prefer::Larger);
        assert_eq!(cores_for(&mixed[1], &mixed, 2).prefer, Prefer::Smaller);
    }

    #[test]
    fn request_handling_has_the_cores_the_model_s_cpu_threads_leave_shared_by_its_sessions() {
        let one = [cpu(0, 1)];
        assert_eq!(cores_for(&one[0], &one, 2).handling, 1.0);
        let two_threads = [cpu(0, 2)];
        assert_eq!(cores_for(&two_threads[0], &two_threads, 2).handling, 0.0);
        let four_threads = [cpu(0, 4)];
        assert_eq!(cores_for(&four_threads[0], &four_threads, 2).handling, 0.0);
        let two = [cpu(0, 1), cpu(1, 1)];
        assert_eq!(cores_for(&two[1], &two, 8).handling, 3.0);
        let gpus: Vec<_> = (0..2)
            .map(|id| device::DevicePlan {
                device: format!("cuda:{id}"),
                instance: 0,
                kind: device::DeviceKind::Cuda { id },
            })
            .collect();
        // A GPU: 0, the rule does not apply (nor go in its key).
        assert_eq!(cores_for(&gpus[0], &gpus, 16).handling, 0.0);
        let mixed = [cpu(0, 1), gpus[0].clone()];
        assert_eq!(cores_for(&mixed[0], &mixed, 4).handling, 1.5);
        assert_eq!(cores_for(&mixed[1], &mixed, 4).handling, 0.0);
    }
}
