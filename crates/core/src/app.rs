//! The core's façade for the front doors: the served models ([`Model`]: infer tensors, status,
//! tuning) and their lookup, image prediction (preprocessing → batching → classification),
//! readiness and the metrics text. A front door calls this, `call`, `registry` and `lifecycle`
//! (and the leaves `config`, `tensor`, `metrics`); it never names dispatch, device or tuning
//! types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use crate::batching::{DeviceStatus, InferError};
use crate::batching::{ModelHandle, ModelOwner};
pub use crate::call::Call;
use crate::call::CallError;
use crate::classify::{Class, Classifier};
use crate::config::ImageConfig;
use crate::lifecycle::{Lifecycle, ModelState};
use crate::metrics::Metrics;
use crate::model::ModelInfo;
use crate::preprocess::{finished, Pool, PreprocessError, Priority};
use crate::registry::Registry;
use crate::tensor::{DataType, Tensor};
use crate::tuning::DeviceTuning;

/// A served model: its request handle, what it serves besides tensors (image preprocessing and
/// labels), and each device's tuning result.
pub struct Model {
    handle: ModelHandle,
    image: Option<ImageConfig>,
    classifier: Option<Classifier>,
    tuning: Vec<DeviceTuning>,
}

impl Model {
    pub(crate) fn new(
        handle: ModelHandle,
        image: Option<ImageConfig>,
        classifier: Option<Classifier>,
        tuning: Vec<DeviceTuning>,
    ) -> Model {
        Model {
            handle,
            image,
            classifier,
            tuning,
        }
    }

    pub fn name(&self) -> &str {
        self.handle.name()
    }

    pub fn version(&self) -> &str {
        self.handle.version()
    }

    /// Inputs and outputs, with -1 for dynamic dims.
    pub fn info(&self) -> &ModelInfo {
        self.handle.info()
    }

    /// The image preprocessing, for models that take uploaded images.
    pub fn image(&self) -> Option<&ImageConfig> {
        self.image.as_ref()
    }

    /// Rows admitted and not yet answered (queued or running) over the rows its devices run at
    /// once (the sum of their batch sizes). 1.0: a full batch waits or runs for every device;
    /// above it, requests queue behind full batches. The autoscaling signal
    /// (`ortserve_saturation`, docs/DEPLOY.md). `devices` is a reading of [`Model::devices`].
    fn saturation(&self, devices: &[DeviceStatus]) -> f64 {
        let capacity: usize = devices.iter().map(|d| d.max_batch).sum();
        self.handle.outstanding_rows() as f64 / capacity.max(1) as f64
    }

    /// The most rows one request may have (its batches must fit the queue at once).
    pub fn max_rows(&self) -> usize {
        self.handle.max_rows()
    }

    /// Takes requests and has a healthy device.
    pub fn is_ready(&self) -> bool {
        self.handle.is_ready()
    }

    /// Every device: health, tuned batch size, measured rate, rows in flight.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.handle.devices()
    }

    /// Per device, every probed size, the chosen size and why (serializable as served).
    pub fn tuning(&self) -> &[DeviceTuning] {
        &self.tuning
    }

    /// Runs one request: named input tensors in, every model output (model order) out.
    pub async fn infer(
        &self,
        named: Vec<(String, Tensor)>,
        call: &Call,
    ) -> Result<Vec<Tensor>, InferError> {
        self.handle.infer(named, call).await
    }

    /// The statistics extension's counts.
    pub fn stats(&self) -> &crate::stats::ModelStats {
        self.handle.stats()
    }

    /// The request handle (tests reach devices through it, see `testing`).
    pub(crate) fn handle(&self) -> &ModelHandle {
        &self.handle
    }
}

/// One uploaded image's answer.
#[derive(Debug, Clone)]
pub struct ImagePrediction {
    /// The top classes, when the model has a classifier.
    pub classes: Option<Vec<Class>>,
    /// The image's row of the scored output (its name and a one-row tensor), when asked for raw
    /// outputs or when the model has no classifier.
    pub output: Option<(String, Tensor)>,
}

/// JSON request bodies (REST) from this size on, and gRPC messages with this much to walk (their
/// fields and typed values, not their raw tensor bytes), are decoded on the preprocessing pool's
/// low-priority threads ([`AppState::in_background`]), not on an async worker, where decoding
/// holds up what else that worker serves (a connection's other calls, the probes). At about
/// 70 ms for 15 MiB of typed gRPC contents, 256 KiB is about a millisecond.
pub const BACKGROUND_BYTES: usize = 256 * 1024;

/// The running server's shared state: the models (a [`Registry`]), metrics, limits, the image
/// pool and the readiness flags.
pub struct AppState {
    /// The served models, by name and version.
    registry: Registry,
    /// Set when startup has loaded and tuned every configured model.
    loaded: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// The default deadline of a request, from its arrival.
    pub request_timeout: std::time::Duration,
    /// The most a body may take to arrive, from the request's arrival.
    pub body_timeout: std::time::Duration,
    /// Body bytes that may be held at once over all requests.
    pub(crate) body_memory: crate::budget::Budget,
    /// Decoding and resizing of uploaded images.
    pool: Pool,
    /// Set once on shutdown: readiness answers 503 from then on.
    draining: AtomicBool,
    /// Accepted bearer tokens; empty means auth is off.
    pub tokens: Vec<String>,
    /// `server.access_log`: one info line per answered request.
    pub access_log: bool,
    /// `server.model_control`: whether the repository API may load and unload models, or the
    /// poller reloads changed files.
    pub model_control: crate::config::ModelControl,
    /// `server.poll_interval`.
    pub poll_interval: std::time::Duration,
    /// Loads and unloads while serving: each model's state, the loader, the turns.
    lifecycle: Lifecycle,
    /// Ids for requests that come without one, for every front door.
    pub request_ids: crate::call::RequestIds,
}

impl AppState {
    /// A state whose models are still loading: health answers, readiness is 503.
    pub fn loading(
        metrics: Arc<Metrics>,
        server: &crate::config::ServerConfig,
        preprocess_threads: usize,
        configured: Vec<String>,
    ) -> AppState {
        let tokens = server
            .auth
            .as_ref()
            .map(|a| a.tokens.clone())
            .unwrap_or_default();
        AppState {
            registry: Registry::default(),
            loaded: AtomicBool::new(false),
            metrics,
            max_body_bytes: server.max_body_bytes.0,
            request_timeout: server.request_timeout.0,
            body_timeout: server.body_timeout.0,
            body_memory: crate::budget::Budget::new(
                usize::try_from(server.body_memory()).unwrap_or(usize::MAX),
            ),
            pool: Pool::new(preprocess_threads),
            draining: AtomicBool::new(false),
            tokens,
            access_log: server.access_log,
            model_control: server.model_control,
            poll_interval: server.poll_interval.0,
            lifecycle: {
                let l = Lifecycle::default();
                l.configure(configured);
                l
            },
            request_ids: crate::call::RequestIds::default(),
        }
    }

    /// Publishes the models startup loaded, each with its owner, and marks loading done (see
    /// [`AppState::is_loaded`]). Models loaded later go through [`AppState::registry`].
    pub fn install(&self, models: impl IntoIterator<Item = (Model, ModelOwner)>) {
        for (model, owner) in models {
            self.lifecycle.installed(model.name(), model.version());
            if let Some(old) = self.registry.load_one(model, Some(owner)) {
                // Startup loads each configured (name, version) once; validation refuses twins.
                tracing::warn!(model = %old.model().name(), "a model was installed twice");
            }
        }
        self.loaded.store(true, Ordering::Release);
    }

    /// Whether startup has loaded every configured model.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The served models and their owners: load, replace and unload at runtime.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Each configured model's state for the repository index, and what loads it again.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Every served model, by name then version.
    pub fn models(&self) -> Vec<Arc<Model>> {
        self.registry.all()
    }

    /// The highest served version of model `name`.
    pub fn model(&self, name: &str) -> Option<Arc<Model>> {
        self.registry.get(name, None)
    }

    /// Every served version of model `name`, lowest first; the errors of [`AppState::lookup`]
    /// when none is served.
    pub fn served_versions(&self, name: &str) -> Result<Vec<Arc<Model>>, CallError> {
        let highest = self.lookup(name, None)?;
        Ok(self
            .registry
            .versions(highest.name())
            .iter()
            .filter_map(|v| self.registry.get(highest.name(), Some(v)))
            .collect())
    }

    /// Finds the model a call names (the highest version when it names none): 404 for a name
    /// or version that is not served, 503 for a configured model that is still loading (which
    /// clients and balancers retry; they do not retry 404).
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Result<Arc<Model>, CallError> {
        if let Some(m) = self.registry.get(name, version) {
            if crate::call::traces_on() {
                // The front doors' request spans have these fields.
                let span = tracing::Span::current();
                span.record("model", name);
                span.record("version", m.version());
            }
            return Ok(m);
        }
        let not_served = || CallError::VersionNotFound {
            model: name.to_string(),
            version: version.unwrap_or_default().to_string(),
        };
        if let Some(v) = version {
            if self.lifecycle.is_loading(name, v) {
                return Err(CallError::Unavailable(format!(
                    "model {name:?} version {v} is loading; it is served once it is loaded and tuned"
                )));
            }
            if self.registry.get(name, None).is_some() || self.lifecycle.wants_other(name, v) {
                return Err(not_served());
            }
        }
        if !self.lifecycle.is_configured(name) {
            return Err(CallError::ModelNotFound(name.to_string()));
        }
        Err(match self.lifecycle.state(name) {
            // Unloaded through the repository API, or its load failed: not served here until
            // it is loaded again, which a retry will not bring about.
            Some((ModelState::Unavailable | ModelState::Unloading, reason)) => {
                let how = match self.model_control {
                    crate::config::ModelControl::Explicit => {
                        format!("POST /v2/repository/models/{name}/load loads it")
                    }
                    _ => "it is loaded again when its files or settings change".into(),
                };
                CallError::NotFound(format!("model {name:?} is not loaded ({reason}); {how}"))
            }
            _ => CallError::Unavailable(format!(
                "model {name:?} is loading; it is served once it is loaded and tuned"
            )),
        })
    }

    /// Stops every model (on shutdown): each answers what it admitted, then its threads are
    /// joined.
    pub async fn stop_models(&self) {
        self.registry.stop_all().await;
    }

    /// Whether `name` is a configured model, loaded or not.
    pub fn is_configured(&self, name: &str) -> bool {
        self.lifecycle.is_configured(name)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Readiness: loaded and tuned, not draining, and every model has a healthy device.
    pub fn is_ready(&self) -> bool {
        self.is_loaded() && !self.is_draining() && self.models().iter().all(|m| m.is_ready())
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Decodes and preprocesses `images` on the bounded pool, runs them as one request of
    /// `images.len()` rows, and classifies each row (or returns its raw output row when `raw`
    /// or when the model has no classifier).
    pub async fn predict_images(
        &self,
        m: &Model,
        images: Vec<Bytes>,
        raw: bool,
        call: &Call,
    ) -> Result<Vec<ImagePrediction>, InferError> {
        let cfg = m.image().ok_or_else(|| {
            InferError::InvalidImage(format!("model {:?} does not take images", m.name()))
        })?;
        if images.len() > cfg.max_images {
            return Err(InferError::ImageTooLarge(format!(
                "more than {} images in one request",
                cfg.max_images
            )));
        }
        let timer = self
            .metrics
            .preprocess_duration
            .with_label_values(&[m.name()]);
        // Bounded in time by the request's deadline (waiting for a slot and decoding), and in
        // work by `max_request_pixels` over all its images, checked from their headers before
        // any is decoded (one image is checked by its own decode against `max_pixels`).
        let deadline = call.deadline(self.request_timeout);
        let refused = |i: usize, e: PreprocessError| match e {
            PreprocessError::TooLarge(msg) => {
                InferError::ImageTooLarge(format!("image {i}: {msg}"))
            }
            other => InferError::InvalidImage(format!("image {i}: {other}")),
        };
        if images.len() > 1 {
            let (all, c) = (images.clone(), cfg.clone());
            self.off_workers(deadline, move || crate::preprocess::check_request(&all, &c))
                .await?
                .map_err(|(i, e)| refused(i, e))?;
        }
        let mut started = Vec::with_capacity(images.len());
        // Each image's span is the request's child, on the pool's thread.
        let parent = crate::call::traces_on().then(tracing::Span::current);
        for (i, bytes) in images.into_iter().enumerate() {
            let (cfg, timer, parent) = (cfg.clone(), timer.clone(), parent.clone());
            let job = self.pool.start(Priority::Normal, move || {
                let _span = parent
                    .map(|p| tracing::debug_span!(parent: &p, "preprocess", image = i).entered());
                let t = Instant::now();
                let r = crate::preprocess::preprocess(&bytes, &cfg);
                timer.observe(t.elapsed().as_secs_f64());
                r
            });
            started.push(
                tokio::time::timeout_at(deadline, job)
                    .await
                    .map_err(|_| InferError::DeadlineExceeded)?,
            );
        }
        let mut rows = Vec::with_capacity(started.len());
        for (i, job) in started.into_iter().enumerate() {
            let done = tokio::time::timeout_at(deadline, job)
                .await
                .map_err(|_| InferError::DeadlineExceeded)?;
            rows.push(finished(done).map_err(|e| refused(i, e))?);
        }
        let refs: Vec<&Tensor> = rows.iter().collect();
        let batch = Tensor::concat(&refs).map_err(|e| InferError::InvalidImage(e.to_string()))?;
        let n = rows.len();
        let input = m.info().inputs[0].name.clone();
        let outputs = m.infer(vec![(input, batch)], call).await?;
        let classifier = m.classifier.as_ref();
        let out_index = match classifier.and_then(|c| c.output.as_deref()) {
            Some(name) => m.info().output_index(name)?,
            None => 0,
        };
        let scores = &outputs[out_index];
        let out_name = &m.info().outputs[out_index].name;
        Ok((0..n)
            .map(|i| {
                let row = scores.slice_rows(i, 1);
                let classes = classifier.map(|c| {
                    let values: Vec<f32> = match row.dtype {
                        DataType::F32 => row.to_f32(),
                        _ => Vec::new(),
                    };
                    c.top(&values)
                });
                let output = (raw || classifier.is_none()).then(|| (out_name.clone(), row));
                ImagePrediction { classes, output }
            })
            .collect())
    }

    /// Runs `job` (checking a request's images) on the preprocessing pool, so the async
    /// workers stay free; waits for a slot until `deadline`.
    pub async fn off_workers<T: Send + 'static>(
        &self,
        deadline: tokio::time::Instant,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, InferError> {
        self.on_pool(deadline, Priority::Normal, job).await
    }

    /// Runs `job` (decoding a request body of [`BACKGROUND_BYTES`] or more) on the pool's
    /// low-priority threads, so that it yields the CPU to small requests and probes; waits for
    /// a slot until `deadline`.
    pub async fn in_background<T: Send + 'static>(
        &self,
        deadline: tokio::time::Instant,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, InferError> {
        self.on_pool(deadline, Priority::Background, job).await
    }

    async fn on_pool<T: Send + 'static>(
        &self,
        deadline: tokio::time::Instant,
        priority: Priority,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, InferError> {
        let job = tokio::time::timeout_at(deadline, self.pool.start(priority, job))
            .await
            .map_err(|_| InferError::DeadlineExceeded)?;
        Ok(finished(job.await))
    }

    /// The Prometheus text, with device health, rows in flight and (on GPU hosts) NVML memory
    /// and utilization read at this moment.
    pub async fn render_metrics(&self) -> String {
        // Each configured model's state, one series per state (1 for the one it is in).
        for e in crate::lifecycle::index(self, false) {
            for state in crate::lifecycle::ModelState::ALL {
                self.metrics
                    .model_state
                    .with_label_values(&[e.name.as_str(), e.version.as_str(), state.as_str()])
                    .set(i64::from(e.state == state));
            }
        }
        let mut on_gpu = false;
        for m in self.models() {
            let devices = m.devices();
            self.metrics
                .saturation
                .with_label_values(&[m.name()])
                .set(m.saturation(&devices));
            for d in devices {
                let labels = [m.name(), d.name.as_str()];
                self.metrics
                    .device_healthy
                    .with_label_values(&labels)
                    .set(i64::from(d.healthy));
                self.metrics
                    .inflight_rows
                    .with_label_values(&labels)
                    .set(d.inflight_rows as i64);
                on_gpu |= crate::device::provider::is_gpu_device(&d.name);
            }
        }
        if on_gpu {
            let readings = tokio::task::spawn_blocking(crate::device::gpu_readings)
                .await
                .unwrap_or_default();
            for (gpu, used, total, util) in readings {
                let label = gpu.to_string();
                self.metrics
                    .gpu_memory_used
                    .with_label_values(&[&label])
                    .set(used as i64);
                self.metrics
                    .gpu_memory_total
                    .with_label_values(&[&label])
                    .set(total as i64);
                self.metrics
                    .gpu_utilization
                    .with_label_values(&[&label])
                    .set(i64::from(util));
            }
        }
        self.metrics.render()
    }
}
