//! Dynamic batching: the façade handlers call ([`ModelHandle::infer`]), the per-model batcher
//! actor, and its pure [`State`].
//!
//! A request is checked against the model, admitted (bounded, else 429), split into parts no
//! larger than the smallest device batch, queued, merged with other requests' rows by the
//! batcher, run on a device chosen by the dispatcher, and put back together in row order.

mod actor;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::device::{DeviceWorker, ModelRunner, RunError};
use crate::dispatch::DevicePool;
use crate::metrics::Metrics;
use crate::model::{InputError, ModelInfo};
use crate::tensor::Tensor;

pub use state::{Dead, Queued, ShapeKey, State};

/// Why an inference request was not answered with outputs.
#[derive(Debug, Error)]
pub enum InferError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("the request has {rows} rows; this model takes at most {max} rows per request")]
    TooManyRows { rows: usize, max: usize },
    #[error("model {0:?} is at its queue capacity; retry later")]
    QueueFull(String),
    #[error("the request's deadline passed before it could run")]
    DeadlineExceeded,
    #[error("model {0:?} has no healthy device")]
    NoHealthyDevice(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("outputs of a split request do not fit together: {0}")]
    Reassembly(String),
}

/// A queued part of a request.
pub struct Entry {
    pub inputs: Vec<Tensor>,
    pub rows: usize,
    pub key: ShapeKey,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// Batcher (or device worker) → the waiting handler. Closed when the client left.
    pub reply: oneshot::Sender<Result<Vec<Tensor>, InferError>>,
    pub span: tracing::Span,
    /// The part's place in the model's queue; released when the part is answered.
    pub permit: OwnedSemaphorePermit,
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

/// A served model: what handlers call.
pub struct ModelHandle {
    pub name: String,
    pub version: String,
    pub info: ModelInfo,
    pub pool: Arc<DevicePool>,
    batchable: bool,
    settings: BatchSettings,
    /// Free places in this model's queue; a request part takes one until it is answered.
    admission: Arc<Semaphore>,
    /// Handlers → batcher. Sized to the admission count, so sends do not wait. Dropped on
    /// shutdown, which lets the batcher finish the queue and exit.
    tx: std::sync::Mutex<Option<mpsc::Sender<Entry>>>,
    batcher: std::sync::Mutex<Option<JoinHandle<()>>>,
    workers: std::sync::Mutex<Vec<DeviceWorker>>,
}

/// A device worker to start for a model: its slot name, max batch and runner.
pub struct DeviceRunner {
    pub name: String,
    pub max_batch: usize,
    pub runner: Box<dyn ModelRunner>,
    /// Builds a fresh runner after a panic; `None` keeps the old one.
    pub rebuild: Option<crate::device::Rebuild>,
}

impl ModelHandle {
    /// Starts the device workers and the batcher. Must run inside a tokio runtime.
    pub fn start(
        name: &str,
        version: &str,
        info: ModelInfo,
        policy: crate::config::DispatchPolicy,
        settings: BatchSettings,
        runners: Vec<DeviceRunner>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<ModelHandle>> {
        let batchable = info.batchable();
        let mut pool = DevicePool::new(policy);
        let mut workers = Vec::new();
        for r in runners {
            let worker = DeviceWorker::spawn(
                &format!("{name}-{}", r.name),
                r.runner,
                r.rebuild,
                crate::dispatch::DEVICE_DEPTH,
            )?;
            let max = if batchable { r.max_batch } else { 1 };
            pool.add(r.name.clone(), max, worker.sender());
            // Every per-device series exists from the start, at zero.
            let labels = [name, r.name.as_str()];
            metrics.device_failures.with_label_values(&labels);
            metrics.device_rows.with_label_values(&labels);
            metrics.inflight_rows.with_label_values(&labels);
            metrics.device_healthy.with_label_values(&labels).set(1);
            metrics
                .device_healthy
                .with_label_values(&[name, &r.name])
                .set(1);
            workers.push(worker);
        }
        let pool = Arc::new(pool);
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
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
            settings.queue_capacity,
        ));
        Ok(Arc::new(ModelHandle {
            name: name.to_string(),
            version: version.to_string(),
            info,
            pool,
            batchable,
            admission: Arc::new(Semaphore::new(settings.queue_capacity)),
            settings,
            tx: std::sync::Mutex::new(Some(tx)),
            batcher: std::sync::Mutex::new(Some(batcher)),
            workers: std::sync::Mutex::new(workers),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.pool.any_healthy() && self.tx.lock().map(|t| t.is_some()).unwrap_or(false)
    }

    /// Runs one request: named input tensors in, every model output (model order) out.
    /// `timeout` can only shorten the server's default deadline.
    pub async fn infer(
        &self,
        named: Vec<(String, Tensor)>,
        timeout: Option<Duration>,
    ) -> Result<Vec<Tensor>, InferError> {
        self.infer_as(named, timeout, None).await
    }

    /// [`ModelHandle::infer`] for the request `request_id` (carried to the device's log lines).
    pub async fn infer_as(
        &self,
        named: Vec<(String, Tensor)>,
        timeout: Option<Duration>,
        request_id: Option<String>,
    ) -> Result<Vec<Tensor>, InferError> {
        let (inputs, rows) = self.info.check_inputs(named)?;
        if !self.pool.any_healthy() {
            return Err(InferError::NoHealthyDevice(self.name.clone()));
        }
        let chunk = if self.batchable {
            self.pool.chunk_rows()
        } else {
            rows.max(1)
        };
        let parts = rows.div_ceil(chunk);
        let max_rows = self.settings.queue_capacity * chunk;
        if parts > self.settings.queue_capacity {
            return Err(InferError::TooManyRows {
                rows,
                max: max_rows,
            });
        }
        let mut permit = self
            .admission
            .clone()
            .try_acquire_many_owned(parts as u32)
            .map_err(|_| InferError::QueueFull(self.name.clone()))?;
        let tx = self
            .tx
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .ok_or(InferError::ShuttingDown)?;
        let now = Instant::now();
        let timeout = timeout.map_or(self.settings.default_timeout, |t| {
            t.min(self.settings.default_timeout)
        });
        let key = ShapeKey::of(&inputs);
        let span = tracing::Span::current();
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
                deadline: now + timeout,
                reply,
                span: span.clone(),
                permit: permit.split(1).expect("one permit per part"),
                failed_on: None,
                last_error: None,
                request_id: request_id.clone(),
            };
            tx.send(entry).await.map_err(|_| InferError::ShuttingDown)?;
            waiting.push(rx);
        }
        let mut results = Vec::with_capacity(parts);
        for rx in waiting {
            results.push(rx.await.map_err(|_| InferError::ShuttingDown)??);
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

    /// Stops taking requests, lets the batcher run everything queued, then joins the device
    /// threads. Requests already admitted are answered.
    pub async fn shutdown(&self) {
        drop(self.tx.lock().ok().and_then(|mut t| t.take()));
        let batcher = self.batcher.lock().ok().and_then(|mut b| b.take());
        if let Some(b) = batcher {
            if let Err(e) = b.await {
                tracing::error!(model = %self.name, error = %e, "batcher task failed");
            }
        }
        let workers: Vec<DeviceWorker> = self
            .workers
            .lock()
            .map(|mut w| w.drain(..).collect())
            .unwrap_or_default();
        let _ =
            tokio::task::spawn_blocking(move || workers.into_iter().for_each(DeviceWorker::join))
                .await;
    }
}
