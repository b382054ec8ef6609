//! Startup batch-size tuning (README.md, "Batch-size tuning"): per (model, device), probe batch
//! sizes with synthetic inputs, measure latency, throughput and memory, choose the size, and
//! cache it.

mod cache;
pub(crate) use cache::file_sha256;
pub mod plot;
mod probe;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::TuningConfig;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::RuntimeConfig;
use crate::device::{
    DeviceCommand, DeviceMemory, DevicePlan, ModelRunner, RunDone, RunError, RunJob,
};
use crate::model::ModelInfo;
use crate::tensor::{DataType, Tensor};

pub use crate::device::process_rss;
pub(crate) use cache::cache_key;
pub use cache::SharedResult;
pub(crate) use probe::{one_thread_fewer, Cores, Limits, Measured, Target};
pub use probe::{MemoryReading, Outcome, Prefer, Probe, ProbeError};

/// Where a device's batch size came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Measured at this start.
    Probe,
    /// Read from the tuning cache (same model, device, runtime and settings).
    Cache,
    /// Read from `tuning.results_file` (written by `ortserve tune --json`, shared between pods).
    Shared,
    /// `max_batch_size` is a number in the config.
    Config,
    /// The model's batch dimension is fixed, so there is nothing to choose.
    FixedBatch,
    /// Taken from the version this one replaces, which has the same inputs and outputs: the
    /// reload happened while that one served, and a probe then would measure a busy device.
    Served,
}

/// The tuning result of one device, as served by `GET /v1/models/{m}/tuning`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTuning {
    pub device: String,
    pub source: Source,
    pub chosen: usize,
    pub reason: String,
    /// How memory was read ("process RSS against cgroup v2 memory.max", "NVML", ...).
    pub memory_source: String,
    #[serde(default)]
    pub probes: Vec<Probe>,
    #[serde(default)]
    pub baseline_memory_bytes: u64,
    #[serde(default)]
    pub duration_ms: f64,
    /// What serving adds to a batch beyond the session run, as the probe measured it (the median
    /// over the good sizes of `served_ms - latency_ms`).
    #[serde(default)]
    pub fixed_cost_ms: f64,
    /// The largest size that ran within the memory and latency limits: the most the batcher
    /// may raise the size to under load (`tuning.refine`). 0 when not probed.
    #[serde(default)]
    pub max_good: usize,
    /// Which end of the sizes tied with the most served rows/s was chosen (within 10%,
    /// `smaller`, or 3%, `larger`: the model's CPU sessions took every core, or the device
    /// will limit a loaded server, as the reason says); unset when not probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Prefer>,
    /// What the result was measured for (see `tuning.results_file`); unset when not probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// With `batching.buckets`: the sizes the device runs, each run once before readiness.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup: Vec<Warmup>,
    /// Under `runtime.cpu_threads: auto`, when this session was opened again with one thread
    /// fewer: the result with every core's threads that decided it. `ortserve tune --json`
    /// writes it inside this result, and `tuning.results_file` answers its key too, so a start
    /// that reads the file finds its first key there and decides the same without probing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier: Option<Box<DeviceTuning>>,
}

impl DeviceTuning {
    /// A result no probe measured: the size is decided by `source` (the config, a fixed batch
    /// dimension), for the reason given.
    pub(crate) fn unprobed(
        device: String,
        source: Source,
        chosen: usize,
        reason: &str,
        memory_source: String,
    ) -> DeviceTuning {
        DeviceTuning {
            device,
            source,
            chosen,
            reason: reason.into(),
            memory_source,
            probes: Vec::new(),
            baseline_memory_bytes: 0,
            duration_ms: 0.0,
            fixed_cost_ms: 0.0,
            max_good: 0,
            prefer: None,
            key: None,
            warmup: Vec::new(),
            earlier: None,
        }
    }
}

/// One batch-size bucket's warm-up run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Warmup {
    pub batch: usize,
    pub ms: f64,
}

#[derive(Debug, Error)]
pub enum TuningError {
    #[error("{model} on {device}: {source}")]
    Probe {
        model: String,
        device: String,
        source: ProbeError,
    },
    #[error("{model}: input {input:?} dimension {index} ({name:?}) is dynamic; set tuning.dims.{name} so the probe can build inputs")]
    UnknownDim {
        model: String,
        input: String,
        index: usize,
        name: String,
    },
    #[error("{model} on {device}: NVML: {message}")]
    Nvml {
        model: String,
        device: String,
        message: String,
    },
}

/// The non-batch dims of every input, with dynamic ones taken from `tuning.dims` by name.
pub(crate) fn resolve_dims(
    model: &str,
    info: &ModelInfo,
    names: &[Vec<String>],
    cfg: &TuningConfig,
) -> Result<Vec<Vec<usize>>, TuningError> {
    info.inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            input
                .dims
                .iter()
                .enumerate()
                .skip(1)
                .map(|(d, &n)| {
                    if n >= 0 {
                        return Ok(n as usize);
                    }
                    let name = names
                        .get(i)
                        .and_then(|v| v.get(d))
                        .cloned()
                        .unwrap_or_default();
                    cfg.dims.get(&name).copied().ok_or(TuningError::UnknownDim {
                        model: model.to_string(),
                        input: input.name.clone(),
                        index: d,
                        name,
                    })
                })
                .collect()
        })
        .collect()
}

/// A small deterministic generator (splitmix64): synthetic inputs need variety, not quality.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// Random inputs of `rows` rows, never all zeros. Integers are small (0..4) so index-like
/// inputs stay in range; floats are in [-1, 1).
pub(crate) fn synthetic_inputs(
    info: &ModelInfo,
    dims: &[Vec<usize>],
    rows: usize,
    seed: u64,
) -> Vec<Tensor> {
    let mut rng = Mix(seed);
    info.inputs
        .iter()
        .zip(dims)
        .map(|(input, rest)| {
            let mut shape = vec![rows];
            shape.extend(rest);
            let n: usize = shape.iter().product();
            let mut data = Vec::with_capacity(n * input.dtype.size());
            for _ in 0..n {
                let small = (rng.next() % 4) as u8;
                let x = rng.unit();
                match input.dtype {
                    DataType::Bool => data.push(small & 1),
                    DataType::U8 | DataType::I8 => data.push(small),
                    DataType::U16 | DataType::I16 => data.extend((small as u16).to_le_bytes()),
                    DataType::U32 | DataType::I32 => data.extend((small as u32).to_le_bytes()),
                    DataType::U64 | DataType::I64 => data.extend((small as u64).to_le_bytes()),
                    DataType::F16 => data.extend(half::f16::from_f64(x).to_le_bytes()),
                    DataType::F32 => data.extend((x as f32).to_le_bytes()),
                    DataType::F64 => data.extend(x.to_le_bytes()),
                }
            }
            Tensor {
                dtype: input.dtype,
                shape,
                data: data.into(),
            }
        })
        .collect()
}

/// How the probe reads memory on one device: as the device's execution provider reads it
/// (the cgroup/RSS reader on CPU, NVML on CUDA).
pub(crate) struct MemoryProbe(Box<dyn DeviceMemory>);

impl MemoryProbe {
    /// For a plan, from its kind's execution provider (`runtime` has what it needs to find the
    /// device, e.g. `CUDA_VISIBLE_DEVICES` to map `cuda:N` to its NVML index).
    pub(crate) fn for_plan(
        plan: &DevicePlan,
        runtime: &RuntimeConfig,
    ) -> Result<MemoryProbe, String> {
        plan.kind
            .provider()
            .memory(plan.kind, runtime)
            .map(MemoryProbe)
    }

    /// The device's model (NVML's name, e.g. "NVIDIA H100 80GB HBM3") on a GPU: part of the
    /// tuning key, so results are shared only between GPUs of one model.
    pub(crate) fn gpu_name(&self) -> Option<String> {
        self.0.device_name()
    }

    pub(crate) fn name(&self) -> String {
        self.0.name()
    }

    pub(crate) fn read(&self) -> MemoryReading {
        self.0.read()
    }
}

/// The sweep's target: the runner on a device thread of its own, running the same job loop as
/// a serving device thread (`device::serve_borrowed`), fed from this thread as the batcher
/// feeds it, each batch split into one-row request parts with a reply channel each. Two batches
/// are kept in flight, as a loaded device has them (its two slots, `dispatch`): a batch's
/// served time is the interval between the last reply of the batch before it and its own, so
/// what serving adds on the device thread (assembling the parts, splitting the outputs, sending
/// the replies) is in it, and the hand-off of the next batch overlaps the run as it does under
/// load. Timed one batch at a time instead, each batch paid two cross-thread wake-ups that a
/// loaded device never waits for; on these virtual machines they took 0.016-0.08 ms from one
/// start to the next, which outweighed the session's own cost per row and swung the choice
/// from 8 to 256 for the CNN fixture, whose served rows/s at 32 clients is highest at 4-8
/// (docs/BENCHMARKS.md, "Tuning: the smallest size that serves the most").
struct ServedTarget<'a> {
    jobs: mpsc::Sender<DeviceCommand>,
    info: &'a ModelInfo,
    dims: &'a [Vec<usize>],
    memory: &'a MemoryProbe,
    clock: Arc<crate::stamp::Stamp>,
}

/// Timed batches per size: at least 3, at most 1,000, and no more once 200 ms are spent. Many
/// short runs make the median of a fast model steadier on a busy machine: with at most 25, the
/// CNN fixture's batches of 4 (0.09 ms) were timed over about 2 ms, and their served rows/s
/// spread over 42.5k-49.5k in 20 starts; with 1,000, over 40.8k-45.0k in 16
/// (docs/BENCHMARKS.md).
const MIN_RUNS: usize = 3;
const MAX_RUNS: usize = 1000;
const RUN_TIME: Duration = Duration::from_millis(200);

/// One part's reply, as a handler receives it.
type Reply = Result<Vec<Tensor>, RunError>;

/// A batch handed to the probe's device thread, not yet answered.
struct Pending {
    replies: Vec<oneshot::Receiver<Reply>>,
    /// The run's time on the device thread and the parts, given back after the replies.
    back: std::sync::mpsc::Receiver<(Duration, Vec<Vec<Tensor>>)>,
}

impl ServedTarget<'_> {
    /// Hands a batch of `parts` to the device thread (waiting while its queue is full).
    fn submit(&mut self, parts: Vec<Vec<Tensor>>) -> Result<Pending, RunError> {
        let (senders, replies): (Vec<_>, Vec<_>) = (0..parts.len())
            .map(|_| oneshot::channel::<Reply>())
            .unzip();
        let (back_tx, back) = std::sync::mpsc::sync_channel(1);
        let done: RunDone = Box::new(move |result, elapsed, parts| {
            match result {
                Ok(outputs) => {
                    for (tx, out) in senders.into_iter().zip(outputs) {
                        let _ = tx.send(Ok(out));
                    }
                }
                Err(e) => {
                    for tx in senders {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            let _ = back_tx.send((elapsed, parts));
        });
        let job = RunJob {
            parts,
            span: tracing::Span::none(),
            done,
            clock: self.clock.clone(),
        };
        self.jobs
            .blocking_send(DeviceCommand::Run(job))
            .map_err(|_| gone())?;
        Ok(Pending { replies, back })
    }

    /// Waits for every reply of `batch`: when the last came, the run's time, and the parts.
    fn finish(
        &mut self,
        batch: Pending,
    ) -> Result<(Instant, Duration, Vec<Vec<Tensor>>), RunError> {
        for reply in batch.replies {
            reply.blocking_recv().map_err(|_| gone())??;
        }
        let answered = Instant::now();
        let (run, parts) = batch.back.recv().map_err(|_| gone())?;
        Ok((answered, run, parts))
    }
}

fn gone() -> RunError {
    RunError::Failed("the probe's device thread is gone".into())
}

impl Target for ServedTarget<'_> {
    fn measure(&mut self, rows: usize, deadline: Instant) -> Result<Measured, RunError> {
        let parts = |seed: usize| -> Vec<Vec<Tensor>> {
            (0..rows)
                .map(|i| synthetic_inputs(self.info, self.dims, 1, (seed * 7919 + i) as u64))
                .collect()
        };
        let (first, second) = (parts(rows), parts(rows + 1));
        // The warm-up runs alone (a new size's first run sets up its buffers): a size that
        // fails, out of memory say, fails here with nothing queued behind it.
        let warm_up = self.submit(first)?;
        let (mut last, _, first) = self.finish(warm_up)?;
        let started = Instant::now();
        let mut m = Measured {
            served: Vec::with_capacity(MAX_RUNS),
            run: Vec::with_capacity(MAX_RUNS),
        };
        let more = |n: usize| {
            let now = Instant::now();
            n == 0
                || (now < deadline && (n < MIN_RUNS || (n < MAX_RUNS && now - started < RUN_TIME)))
        };
        // The first timed batch is timed from the warm-up's answer, so it holds a hand-off;
        // the ones after it were queued while the batch before them ran.
        let mut flying = std::collections::VecDeque::with_capacity(2);
        flying.push_back(self.submit(first)?);
        if more(1) {
            flying.push_back(self.submit(second)?);
        }
        while let Some(batch) = flying.pop_front() {
            let (answered, run, parts) = match self.finish(batch) {
                Ok(done) => done,
                Err(e) => {
                    // Nothing is left running when the sweep goes on.
                    for batch in flying {
                        let _ = self.finish(batch);
                    }
                    return Err(e);
                }
            };
            m.served.push(answered - last);
            m.run.push(run);
            last = answered;
            if more(m.served.len() + flying.len()) {
                flying.push_back(self.submit(parts)?);
            }
        }
        Ok(m)
    }

    fn memory(&mut self) -> MemoryReading {
        self.memory.read()
    }
}

/// What [`tune_device`] needs besides the runner.
pub(crate) struct TuneRequest<'a> {
    pub model: &'a str,
    pub model_path: &'a std::path::Path,
    pub plan: &'a DevicePlan,
    /// The device's name as served (`cpu:0`, `cpu:0#1`).
    pub device: &'a str,
    pub info: &'a ModelInfo,
    pub dim_names: &'a [Vec<String>],
    pub config: &'a TuningConfig,
    /// Which end of the tied sizes to choose (see [`Prefer::for_threads`]), and the cores left
    /// for request handling per CPU session of the model, 0 on a GPU (see
    /// `probe::device_limits_the_server`).
    pub cores: Cores,
    pub runtime_version: &'a str,
    pub memory: &'a MemoryProbe,
    /// On a reload: this device's result for the version being replaced, used when the cache
    /// has nothing for the new file (unless `force`).
    pub served: Option<&'a DeviceTuning>,
}

/// Tunes one device: from the cache when it has this key (unless `force`), else by sweeping.
pub(crate) fn tune_device(
    runner: &mut dyn ModelRunner,
    req: &TuneRequest<'_>,
) -> Result<DeviceTuning, TuningError> {
    if !req.info.batchable() {
        return Ok(DeviceTuning::unprobed(
            req.device.to_string(),
            Source::FixedBatch,
            1,
            "the model's batch dimension is fixed; requests run one at a time",
            req.memory.name(),
        ));
    }
    let dims = resolve_dims(req.model, req.info, req.dim_names, req.config)?;
    let gpu = req.memory.gpu_name();
    let key = cache_key(
        req.model_path,
        req.device,
        req.plan,
        gpu.as_deref(),
        req.runtime_version,
        req.config,
        req.cores,
    );
    if let (false, Some(k)) = (req.config.force, &key) {
        if let Some(path) = &req.config.results_file {
            match cache::shared(path, k) {
                cache::Shared::Found(mut hit) => match cache::plausible(&hit, req.config) {
                    Ok(()) => {
                        hit.source = Source::Shared;
                        hit.device = req.device.to_string();
                        hit.key = key.clone();
                        return Ok(hit);
                    }
                    Err(why) => tracing::warn!(
                        file = %path.display(), model = req.model, device = req.device, %why,
                        "tuning.results_file has a result for this key that is not used; probing"
                    ),
                },
                cache::Shared::NoMatch { entries } => tracing::info!(
                    file = %path.display(), model = req.model, device = req.device, entries,
                    "tuning.results_file has no result for this key (model file, device, ONNX \
                     Runtime, ortserve version, tuning settings, or prefer and the cores for \
                     request handling, which follow the cores this process may use, differ); \
                     probing"
                ),
                cache::Shared::Unreadable(e) => tracing::warn!(
                    file = %path.display(), error = %e,
                    "tuning.results_file cannot be used; probing"
                ),
            }
        }
        if let Some(mut hit) = cache::load(req.config, k) {
            hit.source = Source::Cache;
            hit.device = req.device.to_string();
            hit.key = key.clone();
            return Ok(hit);
        }
    }
    if let (false, Some(prev)) = (req.config.force, req.served) {
        if cache::plausible(prev, req.config).is_ok() {
            let mut reused = prev.clone();
            reused.source = Source::Served;
            reused.device = req.device.to_string();
            reused.key = key;
            reused.warmup = Vec::new();
            reused.reason = format!(
                "the version this one replaced, which has the same inputs and outputs (a probe \
                 while it serves would measure a busy device): {}",
                prev.reason
            );
            return Ok(reused);
        }
    }
    let limits = Limits {
        memory_headroom: req.config.memory_headroom,
        memory_budget: req.config.memory_budget.map(|b| b.0),
        latency_budget: req.config.latency_budget.map(|d| d.0),
        max_batch_cap: req.config.max_batch_cap,
        max_duration: req.config.max_duration.0,
        cores: req.cores,
    };
    // The runner is lent to a device thread for the sweep and comes back when it ends.
    let sweep = std::thread::scope(|scope| {
        let (jobs, rx) = mpsc::channel(1);
        let worker = std::thread::Builder::new()
            .name("ortserve-probe".into())
            .spawn_scoped(scope, move || crate::device::serve_borrowed(runner, rx))
            .map_err(|e| ProbeError::Thread(e.to_string()))?;
        let mut target = ServedTarget {
            jobs,
            info: req.info,
            dims: &dims,
            memory: req.memory,
            clock: Arc::default(),
        };
        let sweep = probe::sweep(&mut target, &limits);
        drop(target);
        let _ = worker.join();
        sweep
    })
    .map_err(|source| TuningError::Probe {
        model: req.model.to_string(),
        device: req.device.to_string(),
        source,
    })?;
    let result = DeviceTuning {
        device: req.device.to_string(),
        source: Source::Probe,
        chosen: sweep.chosen,
        reason: sweep.reason,
        memory_source: req.memory.name(),
        probes: sweep.probes,
        baseline_memory_bytes: sweep.baseline_memory_bytes,
        duration_ms: sweep.duration_ms,
        fixed_cost_ms: sweep.fixed_cost_ms,
        max_good: sweep.max_good,
        prefer: Some(sweep.prefer),
        key: key.clone(),
        warmup: Vec::new(),
        earlier: None,
    };
    if let Some(k) = &key {
        if let Err(e) = cache::store(req.config, k, &result) {
            tracing::warn!(error = %e, "could not write the tuning cache");
        }
    }
    Ok(result)
}

/// The result as a text table, one line per probe: what the log and `ortserve tune` print.
pub fn table(model: &str, t: &DeviceTuning) -> String {
    let mut out = format!(
        "tuning {model} on {}: chosen {} ({:?}; {})\n",
        t.device, t.chosen, t.source, t.reason
    );
    if t.probes.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "  serving adds {:.3} ms a batch to the session run (median over the good sizes)\n  \
         batch   outcome                run_ms    run_rows_s    served_ms  served_rows_s   memory_MiB\n",
        t.fixed_cost_ms
    ));
    let mut probes = t.probes.clone();
    probes.sort_by_key(|p| p.batch);
    for p in probes {
        out.push_str(&format!(
            "  {:>5}   {:<20} {:>8.3} {:>13.1} {:>12.3} {:>14.1} {:>12.1}{}\n",
            p.batch,
            format!("{:?}", p.outcome),
            p.latency_ms,
            p.rows_per_second,
            p.served_ms,
            p.served_rows_per_second,
            p.memory_used_bytes as f64 / (1024.0 * 1024.0),
            if p.memory_estimated {
                " (estimated)"
            } else {
                ""
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorInfo;

    fn info(dims: Vec<i64>, dtype: DataType) -> ModelInfo {
        ModelInfo {
            inputs: vec![TensorInfo {
                name: "x".into(),
                dtype,
                dims: dims.clone(),
            }],
            outputs: vec![TensorInfo {
                name: "y".into(),
                dtype,
                dims,
            }],
        }
    }

    /// Sleeps `ms` a run and fails, as ONNX Runtime does out of memory, from `oom_rows` rows;
    /// counts its runs.
    struct Slow {
        ms: u64,
        oom_rows: usize,
        runs: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl crate::device::ModelRunner for Slow {
        fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError> {
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(self.ms));
            if parts.len() >= self.oom_rows {
                return Err(RunError::Failed(
                    "Failed to allocate memory for requested buffer".into(),
                ));
            }
            let firsts: Vec<&Tensor> = parts.iter().map(|p| &p[0]).collect();
            Ok(vec![Tensor::concat(&firsts).expect("same shapes")])
        }
    }

    /// No memory to read: `measure` does not read it.
    struct NoMemory;
    impl crate::device::memory::DeviceMemory for NoMemory {
        fn name(&self) -> String {
            "none".into()
        }
        fn read(&self) -> MemoryReading {
            MemoryReading {
                used: 0,
                limit: None,
            }
        }
    }

    /// Runs `f` against a [`ServedTarget`] over `runner` on a probe thread, as `tune_device`
    /// does; returns what `f` returned once the thread has ended.
    fn with_target<R>(mut runner: Slow, f: impl FnOnce(&mut ServedTarget<'_>) -> R) -> R {
        let m = info(vec![-1, 2], DataType::F32);
        let dims = vec![vec![2]];
        let memory = MemoryProbe(Box::new(NoMemory));
        std::thread::scope(|scope| {
            let (jobs, rx) = mpsc::channel(1);
            let worker = scope.spawn(move || crate::device::serve_borrowed(&mut runner, rx));
            let mut target = ServedTarget {
                jobs,
                info: &m,
                dims: &dims,
                memory: &memory,
                clock: Arc::default(),
            };
            let out = f(&mut target);
            drop(target);
            worker.join().unwrap();
            out
        })
    }

    #[test]
    fn a_size_is_timed_after_a_warm_up_and_leaves_nothing_running() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        let slow = |oom_rows| Slow {
            ms: 2,
            oom_rows,
            runs: runs.clone(),
        };
        // Enough time: 3 to 1,000 timed batches, each run once, after one warm-up.
        let m = with_target(slow(usize::MAX), |t| {
            t.measure(4, Instant::now() + Duration::from_secs(30))
        })
        .unwrap();
        assert!((MIN_RUNS..=MAX_RUNS).contains(&m.served.len()), "{m:?}");
        assert_eq!(count(), m.served.len() + 1);
        assert!(
            m.run.iter().all(|r| *r >= Duration::from_millis(2)),
            "{m:?}"
        );
        // A size that fails fails in its warm-up, alone: one run, no second one queued.
        runs.store(0, std::sync::atomic::Ordering::SeqCst);
        let e = with_target(slow(4), |t| {
            t.measure(4, Instant::now() + Duration::from_secs(30))
        })
        .unwrap_err();
        assert!(e.to_string().contains("Failed to allocate memory"), "{e}");
        assert_eq!(count(), 1);
        // Past the deadline: the warm-up and one timed batch.
        runs.store(0, std::sync::atomic::Ordering::SeqCst);
        let m = with_target(slow(usize::MAX), |t| t.measure(4, Instant::now())).unwrap();
        assert_eq!(m.served.len(), 1);
        assert_eq!(count(), 2);
    }

    #[test]
    fn dynamic_non_batch_dims_come_from_config_by_name() {
        let m = info(vec![-1, 3, -1, -1], DataType::F32);
        let names = vec![vec![
            "batch".to_string(),
            "".into(),
            "height".into(),
            "width".into(),
        ]];
        let mut cfg = TuningConfig::default();
        let e = resolve_dims("m", &m, &names, &cfg).unwrap_err().to_string();
        assert!(e.contains("tuning.dims.height"), "{e}");
        cfg.dims.insert("height".into(), 32);
        cfg.dims.insert("width".into(), 48);
        assert_eq!(
            resolve_dims("m", &m, &names, &cfg).unwrap(),
            vec![vec![3, 32, 48]]
        );
    }

    #[test]
    fn synthetic_inputs_have_the_shape_and_are_not_zero() {
        for dtype in DataType::ALL {
            let m = info(vec![-1, 5], dtype);
            let t = &synthetic_inputs(&m, &[vec![5]], 4, 1)[0];
            assert_eq!(t.shape, vec![4, 5]);
            assert_eq!(t.data.len(), 20 * dtype.size());
            assert!(t.data.iter().any(|&b| b != 0), "{dtype}");
        }
    }
}
