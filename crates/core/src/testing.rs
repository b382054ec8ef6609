//! For the workspace's tests, not a stable API: a model served by any
//! [`ModelRunner`](crate::device::ModelRunner) (fakes that pace, gate or fail batches), with its
//! owner, and device health switches. Nothing in the server calls these, so the binary links
//! none of it. (A cargo feature turned on by a
//! dev-dependency on this crate was tried: cargo unifies it into `cargo build --release` too.)

use std::sync::Arc;

pub use crate::batching::{BatchSettings, DeviceRunner, ModelOwner};
pub use crate::dispatch::{CapChange, RefineReport, RefineSettings};
pub use crate::tuning::process_rss;

use crate::app::{AppState, Model};
use crate::batching::ModelHandle;
use crate::config::DispatchPolicy;
use crate::metrics::Metrics;
use crate::model::ModelInfo;

/// Serves one model, version "1", over `runners` (no ONNX Runtime needed): the state to build a
/// router on, and the model's owner (shut it down, or drop it, to stop the model).
pub fn serve_runners(
    name: &str,
    info: ModelInfo,
    policy: DispatchPolicy,
    settings: BatchSettings,
    runners: Vec<DeviceRunner>,
) -> (Arc<AppState>, ModelOwner) {
    let metrics = Arc::new(Metrics::new());
    let (handle, owner): (ModelHandle, ModelOwner) =
        ModelHandle::start(name, "1", info, policy, settings, runners, metrics.clone())
            .expect("device threads start");
    let server = crate::config::ServerConfig {
        max_body_bytes: crate::config::ByteSize(1 << 20),
        ..Default::default()
    };
    let state = Arc::new(AppState::loading(
        metrics,
        &server,
        1,
        vec![(name.to_string(), "1".to_string())],
    ));
    state.install(vec![Model::new(handle, None, None, Vec::new())]);
    (state, owner)
}

/// Marks device `index` of `model` healthy or not, as the batcher does after failures or a probe.
pub fn set_device_healthy(model: &Model, index: usize, healthy: bool) {
    model.handle().set_device_healthy(index, healthy);
}
