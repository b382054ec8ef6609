//! Dynamic batching: a model's request handle ([`ModelHandle::infer`]) and its owner
//! ([`ModelOwner`]), the per-model batcher actor, and its pure [`State`].
//!
//! A request is checked against the model, admitted (bounded, else 429), split into parts no
//! larger than the smallest device batch, queued, merged with other requests' rows by the
//! batcher, run on a device chosen by the dispatcher, and put back together in row order.

mod actor;
mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::budget::Budget;
pub(crate) use crate::call::Call;
use tokio::task::JoinHandle;

use crate::device::{DeviceWorker, ModelRunner, RunError};
use crate::dispatch::DevicePool;
use crate::metrics::Metrics;
use crate::model::{InputError, ModelInfo};
use crate::tensor::Tensor;

pub(crate) use state::{Queued, ShapeKey, State};

/// Why an inference request was not answered with outputs. The HTTP layer's status table
/// maps each variant (`http::ApiError`); nothing outside this module names device errors.
#[derive(Debug, Error)]
pub enum InferError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("the request has {rows} rows; this model takes at most {max} rows per request")]
    TooManyRows { rows: usize, max: usize },
    #[error("model {0:?} is at its queue capacity; retry later")]
    QueueFull(String),
    #[error("the request's deadline passed before it could be answered")]
    DeadlineExceeded,
    #[error("model {0:?} has no healthy device")]
    NoHealthyDevice(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// ONNX Runtime refused the values of the input (for example an index out of range).
    #[error("the model rejected the input: {0}")]
    Rejected(String),
    /// The run failed for another reason (device error, out of memory, a bug): logged, never
    /// returned to the client.
    #[error("model run failed: {0}")]
    RunFailed(String),
    #[error("outputs of a split request do not fit together: {0}")]
    Reassembly(String),
    /// An uploaded image (or the number of images) over a configured limit.
    #[error("{0}")]
    ImageTooLarge(String),
    /// An uploaded image that cannot be decoded or does not fit the model.
    #[error("{0}")]
    InvalidImage(String),
}

impl From<RunError> for InferError {
    fn from(e: RunError) -> InferError {
        match e {
            RunError::Input(m) => InferError::Rejected(m),
            RunError::Failed(m) => InferError::RunFailed(m),
        }
    }
}

/// A queued part of a request.
pub(crate) struct Entry {
    pub inputs: Vec<Tensor>,
    pub rows: usize,
    pub key: ShapeKey,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// Batcher (or device worker) → the waiting handler. Closed when the client left.
    pub reply: oneshot::Sender<Result<Vec<Tensor>, InferError>>,
    pub span: tracing::Span,
    /// Set when the part failed on that device and is being run once more elsewhere.
    pub failed_on: Option<usize>,
    /// The error of the part's last run, answered if it cannot run again.
    pub last_error: Option<RunError>,
    /// The request's `x-request-id`, for log lines written on the device thread.
    pub request_id: Option<String>,
}

impl Queued for Entry {
    fn rows(&self) -> usize {
        self.rows
    }
    fn key(&self) -> &ShapeKey {
        &self.key
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Settings of one model's batching, from config.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    pub default_timeout: Duration,
    /// Failed runs in a row after which a device is marked unhealthy.
    pub failure_threshold: u32,
    /// How often unhealthy devices are probed.
    pub reprobe_interval: Duration,
}

impl BatchSettings {
    /// Settings with the health defaults (3 failures, probe every 2 s).
    pub fn new(
        max_queue_delay: Duration,
        queue_capacity: usize,
        default_timeout: Duration,
    ) -> BatchSettings {
        BatchSettings {
            max_queue_delay,
            queue_capacity,
            default_timeout,
            failure_threshold: 3,
            reprobe_interval: Duration::from_secs(2),
        }
    }
}

/// A served model as requests see it: cheap to clone, and nothing on its request path takes
/// a lock (admission is one atomic count, the queue an unbounded channel behind a weak sender
/// upgraded per request). Stopping and joining belong to its [`ModelOwner`].
#[derive(Clone)]
pub(crate) struct ModelHandle(Arc<Shared>);

struct Shared {
    name: String,
    version: String,
    info: ModelInfo,
    pool: Arc<DevicePool>,
    batchable: bool,
    settings: BatchSettings,
    /// Free places in this model's queue; a request part takes one until it is answered.
    admission: Budget,
    /// Rows admitted and not yet answered (queued or running). It never refuses (its total is
    /// unbounded); what it has handed out is the numerator of `ortserve_saturation`.
    rows: Budget,
    /// Handlers → batcher, weak: only the [`ModelOwner`] holds the strong sender. A request
    /// upgrades it for as long as it sends its parts; once the owner lets go, upgrades fail
    /// (`ShuttingDown`) and the channel closes when the last in-progress request has sent, so
    /// the batcher runs everything sent and exits. Unbounded (lock-free) because admission
    /// bounds it: a request sends only the parts it holds places for, and the parts of a
    /// request answered early are swept by the batcher on its next turn.
    tx: mpsc::WeakUnboundedSender<Entry>,
    /// Set by the owner when it stops the model: readiness turns false.
    stopping: AtomicBool,
    /// The statistics extension's counts (the batcher and device threads add to them too).
    stats: Arc<crate::stats::ModelStats>,
}

/// Starts and stops a model's batcher and device threads; there is one per model, held by the
/// server (never by requests). [`ModelOwner::shutdown`] stops taking requests, lets the batcher
/// run what was admitted and joins every thread. Dropping it without `shutdown` stops taking
/// requests too; the batcher then drains and stops the device threads on its own, unjoined.
pub struct ModelOwner {
    handle: ModelHandle,
    /// The one strong handlers → batcher sender (see [`Shared::tx`]); dropped to stop.
    tx: Option<mpsc::UnboundedSender<Entry>>,
    batcher: Option<JoinHandle<()>>,
    workers: Vec<DeviceWorker>,
}

/// One device's state, as model metadata and tests read it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    /// `cpu:0`, `cuda:1`, or `cpu:0#1` for a second instance.
    pub name: String,
    pub healthy: bool,
    /// Most rows one batch on this device may have now.
    pub max_batch: usize,
    /// Measured rows per second (moving average); 0 before the first batch.
    pub rows_per_second: f64,
    /// Rows in batches sent to the device and not finished.
    pub inflight_rows: usize,
    /// Rows of successful runs so far.
    pub rows_run: u64,
    /// Failed runs so far (device faults, not refused inputs).
    pub failures: u64,
    /// What `tuning.refine` did with the cap; `None` when the cap is fixed.
    pub refine: Option<crate::dispatch::RefineReport>,
}

/// A device worker to start for a model: its slot name, max batch and runner.
pub struct DeviceRunner {
    pub name: String,
    pub max_batch: usize,
    /// The batch sizes the device runs (`batching.buckets`): a batch is padded with zero rows up
    /// to the next one. Empty: every size runs as it comes.
    pub buckets: Vec<usize>,
    pub runner: Box<dyn ModelRunner>,
    /// Builds a fresh runner after a panic; `None` keeps the old one.
    pub rebuild: Option<crate::device::Rebuild>,
    /// The watchdog: a run that has not returned after this long marks the device unhealthy,
    /// so new batches go to other devices (or are refused with 503 when there is none).
    pub run_timeout: Duration,
    /// `tuning.refine`: how the cap may move from `max_batch` under load; `None` keeps it.
    pub refine: Option<crate::dispatch::RefineSettings>,
}

impl ModelHandle {
    /// Starts the device workers and the batcher. Must run inside a tokio runtime.
    pub(crate) fn start(
        name: &str,
        version: &str,
        info: ModelInfo,
        policy: crate::config::DispatchPolicy,
        settings: BatchSettings,
        runners: Vec<DeviceRunner>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(ModelHandle, ModelOwner)> {
        let batchable = info.batchable();
        let mut pool = DevicePool::new(policy);
        let mut workers = Vec::new();
        for r in runners {
            let labels = [name, r.name.as_str()];
            let padded = metrics.padded_rows.with_label_values(&labels);
            let padding = (batchable && !r.buckets.is_empty()).then(|| crate::device::Padding {
                sizes: r.buckets.clone(),
                padded,
            });
            let worker = DeviceWorker::spawn(
                &format!("{name}-{}", r.name),
                r.runner,
                r.rebuild,
                padding,
                crate::dispatch::DEVICE_DEPTH,
            )?;
            let max = if batchable { r.max_batch } else { 1 };
            let slot = pool.add(r.name.clone(), max, r.run_timeout, worker.sender());
            if let (true, Some(refine)) = (batchable && r.buckets.is_empty(), r.refine) {
                slot.refine(refine);
            }
            metrics.max_batch.with_label_values(&labels).set(max as i64);
            // Every per-device series exists from the start, at zero.
            metrics.device_failures.with_label_values(&labels);
            metrics.device_rows.with_label_values(&labels);
            metrics.inflight_rows.with_label_values(&labels);
            metrics.device_healthy.with_label_values(&labels).set(1);
            workers.push(worker);
        }
        let pool = Arc::new(pool);
        let stats = Arc::new(crate::stats::ModelStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(actor::run(
            rx,
            pool.clone(),
            actor::Settings {
                model: name.to_string(),
                max_queue_delay: settings.max_queue_delay,
                batchable,
                failure_threshold: settings.failure_threshold,
                reprobe_interval: settings.reprobe_interval,
            },
            metrics,
            stats.clone(),
            settings.queue_capacity,
        ));
        let handle = ModelHandle(Arc::new(Shared {
            name: name.to_string(),
            version: version.to_string(),
            info,
            pool,
            batchable,
            admission: Budget::new(settings.queue_capacity),
            rows: Budget::new(usize::MAX),
            settings,
            tx: tx.downgrade(),
            stopping: AtomicBool::new(false),
            stats,
        }));
        let owner = ModelOwner {
            handle: handle.clone(),
            tx: Some(tx),
            batcher: Some(batcher),
            workers,
        };
        Ok((handle, owner))
    }

    pub(crate) fn name(&self) -> &str {
        &self.0.name
    }

    /// The statistics extension's counts.
    pub(crate) fn stats(&self) -> &crate::stats::ModelStats {
        &self.0.stats
    }

    /// Rows admitted and not yet answered: queued, or in a batch on a device.
    pub(crate) fn outstanding_rows(&self) -> usize {
        self.0.rows.taken()
    }

    /// The most rows one request may have: its batches must fit the queue at once. A model that
    /// cannot batch runs each request whole, so any count fits.
    pub(crate) fn max_rows(&self) -> usize {
        let s = &*self.0;
        if s.batchable {
            s.settings.queue_capacity * s.pool.chunk_rows()
        } else {
            usize::MAX
        }
    }

    pub(crate) fn version(&self) -> &str {
        &self.0.version
    }

    /// The model's inputs and outputs.
    pub(crate) fn info(&self) -> &ModelInfo {
        &self.0.info
    }

    /// Takes requests and has a healthy device.
    pub(crate) fn is_ready(&self) -> bool {
        self.0.pool.any_healthy() && !self.0.stopping.load(Ordering::Acquire)
    }

    /// Every device, in the order they were configured.
    pub(crate) fn devices(&self) -> Vec<DeviceStatus> {
        self.0
            .pool
            .devices()
            .iter()
            .map(|d| DeviceStatus {
                name: d.name.clone(),
                healthy: d.is_healthy(),
                max_batch: d.cap(),
                rows_per_second: d.rate(),
                inflight_rows: d.inflight_rows(),
                rows_run: d.rows.load(Ordering::Relaxed),
                failures: d.failures.load(Ordering::Relaxed),
                refine: d.refine_report(),
            })
            .collect()
    }

    /// Marks device `index` healthy or not, as the batcher does after failures or a probe.
    pub(crate) fn set_device_healthy(&self, index: usize, healthy: bool) {
        if let Some(d) = self.0.pool.devices().get(index) {
            d.set_healthy(healthy);
        }
    }

    /// Runs one request: named input tensors in, every model output (model order) out.
    /// The path takes no lock: an atomic admission count, a weak-sender upgrade, sends into an
    /// unbounded (lock-free) channel, and oneshot replies awaited with the deadline's timer.
    pub(crate) async fn infer(
        &self,
        named: Vec<(String, Tensor)>,
        call: &Call,
    ) -> Result<Vec<Tensor>, InferError> {
        // The batch links to the request's span (the current one), not to `queue`: admission,
        // the wait for a batch and its run, until every part is answered.
        let request = tracing::Span::current();
        let queue = tracing::debug_span!(
            "queue",
            rows = tracing::field::Empty,
            parts = tracing::field::Empty
        );
        let answered =
            tracing::Instrument::instrument(self.infer_counted(named, call, request), queue).await;
        let took = call.started.map_or(Duration::ZERO, |t| t.elapsed());
        match &answered {
            Ok(_) => self.0.stats.succeeded(took),
            Err(_) => self.0.stats.fail.add(1, took),
        }
        answered
    }

    async fn infer_counted(
        &self,
        named: Vec<(String, Tensor)>,
        call: &Call,
        span: tracing::Span,
    ) -> Result<Vec<Tensor>, InferError> {
        let s = &*self.0;
        let (inputs, rows) = s.info.check_inputs(named)?;
        if !s.pool.any_healthy() {
            return Err(InferError::NoHealthyDevice(s.name.clone()));
        }
        let chunk = if s.batchable {
            s.pool.chunk_rows()
        } else {
            rows.max(1)
        };
        let parts = rows.div_ceil(chunk);
        if parts > s.settings.queue_capacity {
            return Err(InferError::TooManyRows {
                rows,
                max: self.max_rows(),
            });
        }
        // The request's places in the queue, held here: they are free again as soon as this
        // request is answered, including with 504 while its batch is still running.
        let _admission = s
            .admission
            .try_take(parts)
            .ok_or_else(|| InferError::QueueFull(s.name.clone()))?;
        let _rows = s.rows.try_take(rows);
        let tx = s.tx.upgrade().ok_or(InferError::ShuttingDown)?;
        let now = Instant::now();
        let deadline = call.deadline(s.settings.default_timeout);
        if deadline <= now {
            return Err(InferError::DeadlineExceeded);
        }
        let key = ShapeKey::of(&inputs);
        if crate::call::traces_on() {
            tracing::Span::current()
                .record("rows", rows)
                .record("parts", parts);
        }
        let mut waiting = Vec::with_capacity(parts);
        let mut whole = Some(inputs);
        for p in 0..parts {
            let start = p * chunk;
            let n = chunk.min(rows - start);
            let part_inputs = if parts == 1 {
                whole.take().unwrap_or_default()
            } else {
                whole
                    .iter()
                    .flatten()
                    .map(|t| t.slice_rows(start, n))
                    .collect()
            };
            let (reply, rx) = oneshot::channel();
            let entry = Entry {
                inputs: part_inputs,
                rows: n,
                key: key.clone(),
                enqueued: now,
                deadline,
                reply,
                span: span.clone(),
                failed_on: None,
                last_error: None,
                request_id: call.request_id.clone(),
            };
            tx.send(entry).map_err(|_| InferError::ShuttingDown)?;
            waiting.push(rx);
        }
        // Sent: the batcher may now see the channel close once the owner has let go.
        drop(tx);
        if s.pool.devices().iter().any(|d| d.worth_starting_now()) {
            crate::call::batcher_can_start();
        }
        let mut results = Vec::with_capacity(parts);
        // The deadline holds while the batch runs too: at the deadline the answer is 504 and the
        // run's result, when it comes, is dropped.
        for rx in waiting {
            let reply = tokio::time::timeout_at(deadline, rx)
                .await
                .map_err(|_| InferError::DeadlineExceeded)?;
            results.push(reply.map_err(|_| InferError::ShuttingDown)??);
        }
        if results.len() == 1 {
            return Ok(results.pop().unwrap_or_default());
        }
        (0..results[0].len())
            .map(|o| {
                let pieces: Vec<&Tensor> = results.iter().map(|r| &r[o]).collect();
                Tensor::concat(&pieces).map_err(|e| InferError::Reassembly(e.to_string()))
            })
            .collect()
    }
}

impl ModelOwner {
    /// Stops taking requests, lets the batcher run everything admitted, then joins the device
    /// threads. Requests already admitted are answered.
    pub async fn shutdown(mut self) {
        self.stop_taking_requests();
        if let Some(b) = self.batcher.take() {
            if let Err(e) = b.await {
                tracing::error!(model = %self.handle.name(), error = %e, "batcher task failed");
            }
        }
        let workers = std::mem::take(&mut self.workers);
        let _ =
            tokio::task::spawn_blocking(move || workers.into_iter().for_each(DeviceWorker::join))
                .await;
    }

    fn stop_taking_requests(&mut self) {
        self.handle.0.stopping.store(true, Ordering::Release);
        drop(self.tx.take());
    }
}

impl Drop for ModelOwner {
    fn drop(&mut self) {
        // Without `shutdown`: the batcher drains and stops the workers by itself, unjoined.
        self.stop_taking_requests();
    }
}

#[cfg(test)]
mod tests;
