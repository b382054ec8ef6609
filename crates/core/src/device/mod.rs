//! Devices: the ONNX Runtime library, one session per (model, device, instance), and the OS
//! thread that owns each session. The only module that imports `ort`.
//!
//! The rest of the server sees a [`ModelRunner`] (implemented by [`OrtRunner`], and by fakes in
//! tests) behind a [`DeviceWorker`] that takes [`RunJob`]s over a channel.

pub(crate) mod memory;
mod ort_runner;
mod plan;
pub(crate) mod provider;
mod runtime;
mod worker;

use thiserror::Error;

use crate::tensor::Tensor;

pub(crate) use memory::{gpu_readings, DeviceMemory};
pub use memory::{process_rss, MemoryReading};
pub use ort_runner::OrtRunner;
pub(crate) use plan::plan_devices;
pub use plan::{DeviceKind, DevicePlan};
pub(crate) use provider::SessionSettings;
pub use runtime::{init_runtime, RuntimeInfo};
pub use worker::{panic_message, Rebuild};
pub(crate) use worker::{serve_borrowed, DeviceCommand, DeviceWorker, Padding, RunDone, RunJob};

/// A log filter directive that keeps ONNX Runtime's own logs (forwarded by `ort` to tracing) at
/// warn. Written `ort::` because filter targets match by prefix and `ort` alone would also
/// silence `ortserve`.
pub const RUNTIME_LOG_QUIET: &str = "ort::=warn";

/// Runs batches of one model on one device. Called from that device's worker thread only.
pub trait ModelRunner: Send + 'static {
    /// `parts[p][i]` is input `i` (model order) of request part `p`; each part has its own rows
    /// along dim 0. Returns every model output, batched over all parts in order.
    fn run(&mut self, parts: &[Vec<Tensor>]) -> Result<Vec<Tensor>, RunError>;
}

/// Why a run failed.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum RunError {
    /// ONNX Runtime refused the values of the input (for example an index out of range).
    #[error("the model rejected the input: {0}")]
    Input(String),
    /// The run failed for another reason (device error, out of memory, a bug).
    #[error("model run failed: {0}")]
    Failed(String),
}

/// Errors while loading the library or building sessions; all are startup errors.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("ONNX Runtime library not usable. Looked in: {}. Run scripts/setup.sh, or set ORT_DYLIB_PATH or runtime.onnxruntime_path", .looked.join("; "))]
    LibraryNotFound { looked: Vec<String> },
    #[error("ONNX Runtime environment: {0}")]
    Environment(String),
    #[error("{device}: {message}")]
    Unavailable { device: String, message: String },
    #[error("loading {path} on {device}: {message}")]
    Session {
        path: String,
        device: String,
        message: String,
    },
    #[error("{path}: {message}")]
    UnsupportedModel { path: String, message: String },
}
