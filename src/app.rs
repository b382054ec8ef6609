//! The running server's shared state: the models, metrics, limits and the readiness flags that
//! handlers read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::batching::ModelHandle;
use crate::metrics::Metrics;

pub struct AppState {
    pub models: Vec<Arc<ModelHandle>>,
    pub metrics: Arc<Metrics>,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Set once on shutdown: readiness answers 503 from then on.
    draining: AtomicBool,
}

impl AppState {
    pub fn new(
        models: Vec<Arc<ModelHandle>>,
        metrics: Arc<Metrics>,
        max_body_bytes: u64,
    ) -> AppState {
        AppState {
            models,
            metrics,
            max_body_bytes,
            draining: AtomicBool::new(false),
        }
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelHandle>> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Readiness: not draining and every model has a healthy device.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.models.iter().all(|m| m.is_ready())
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}
