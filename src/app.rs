//! The running server's shared state: the models (once loaded and tuned), their tuning results,
//! metrics, limits and the readiness flags that handlers read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::batching::ModelHandle;
use crate::classify::Classifier;
use crate::config::ImageConfig;
use crate::metrics::Metrics;
use crate::preprocess::Pool;
use crate::tuning::DeviceTuning;

/// What a model serves besides tensors: image preprocessing and labels.
#[derive(Default)]
pub struct ModelExtras {
    pub image: Option<ImageConfig>,
    pub classifier: Option<Classifier>,
}

/// What startup produces: the served models, each one's per-device tuning and extras.
pub struct Loaded {
    pub models: Vec<Arc<ModelHandle>>,
    pub tuning: BTreeMap<String, Vec<DeviceTuning>>,
    pub extras: BTreeMap<String, ModelExtras>,
}

pub struct AppState {
    /// Set once, when every model is loaded and tuned; empty until then.
    loaded: OnceLock<Loaded>,
    pub metrics: Arc<Metrics>,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Decoding and resizing of uploaded images.
    pub pool: Pool,
    /// Set once on shutdown: readiness answers 503 from then on.
    draining: AtomicBool,
    /// Accepted bearer tokens; empty means auth is off.
    pub tokens: Vec<String>,
}

impl AppState {
    /// A state whose models are still loading: health answers, readiness is 503.
    pub fn loading(
        metrics: Arc<Metrics>,
        max_body_bytes: u64,
        preprocess_threads: usize,
    ) -> AppState {
        AppState {
            loaded: OnceLock::new(),
            metrics,
            max_body_bytes,
            pool: Pool::new(preprocess_threads),
            draining: AtomicBool::new(false),
            tokens: Vec::new(),
        }
    }

    /// A state with its models (tests and tools that skip the loading phase).
    pub fn new(
        models: Vec<Arc<ModelHandle>>,
        metrics: Arc<Metrics>,
        max_body_bytes: u64,
    ) -> AppState {
        let state = AppState::loading(metrics, max_body_bytes, 1);
        state.install(Loaded {
            models,
            tuning: BTreeMap::new(),
            extras: BTreeMap::new(),
        });
        state
    }

    /// Turns bearer-token auth on for the model routes.
    pub fn with_tokens(mut self, tokens: Vec<String>) -> AppState {
        self.tokens = tokens;
        self
    }

    /// Publishes the loaded models; later calls are ignored.
    pub fn install(&self, loaded: Loaded) {
        let _ = self.loaded.set(loaded);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get().is_some()
    }

    pub fn models(&self) -> &[Arc<ModelHandle>] {
        self.loaded.get().map_or(&[], |l| &l.models)
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelHandle>> {
        self.models().iter().find(|m| m.name == name)
    }

    pub fn extras(&self, model: &str) -> Option<&ModelExtras> {
        self.loaded.get()?.extras.get(model)
    }

    pub fn tuning(&self, model: &str) -> Option<&[DeviceTuning]> {
        self.loaded.get()?.tuning.get(model).map(Vec::as_slice)
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
}
