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
/// router on, whose registry owns the model (`AppState::stop_models` stops it).
pub fn serve_runners(
    name: &str,
    info: ModelInfo,
    policy: DispatchPolicy,
    settings: BatchSettings,
    runners: Vec<DeviceRunner>,
) -> Arc<AppState> {
    let server = crate::config::ServerConfig {
        max_body_bytes: crate::config::ByteSize(1 << 20),
        ..Default::default()
    };
    serve_runners_with(&server, name, info, policy, settings, runners)
}

/// [`serve_runners`] with the server's settings (auth, limits, timeouts) from `server`.
pub fn serve_runners_with(
    server: &crate::config::ServerConfig,
    name: &str,
    info: ModelInfo,
    policy: DispatchPolicy,
    settings: BatchSettings,
    runners: Vec<DeviceRunner>,
) -> Arc<AppState> {
    let state = Arc::new(AppState::loading(
        Arc::new(Metrics::new()),
        server,
        1,
        vec![name.to_string()],
    ));
    let model = model_over_runners(&state, name, "1", info, policy, settings, runners);
    state.install([model]);
    state
}

/// A model `name` at `version` over `runners`, with its owner, not yet published: hand it to
/// `state.registry().load_one`.
pub fn model_over_runners(
    state: &AppState,
    name: &str,
    version: &str,
    info: ModelInfo,
    policy: DispatchPolicy,
    settings: BatchSettings,
    runners: Vec<DeviceRunner>,
) -> (Model, ModelOwner) {
    let (handle, owner): (ModelHandle, ModelOwner) = ModelHandle::start(
        name,
        version,
        info,
        policy,
        settings,
        runners,
        state.metrics.clone(),
    )
    .expect("device threads start");
    (Model::new(handle, None, None, Vec::new()), owner)
}

/// Marks device `index` of `model` healthy or not, as the batcher does after failures or a probe.
pub fn set_device_healthy(model: &Model, index: usize, healthy: bool) {
    model.handle().set_device_healthy(index, healthy);
}

/// Makes every CPU memory reading in this process say that `room` bytes are left under its
/// limit (`None`: read the real limit again), as a container whose limit is that close would:
/// for testing what depends on the limit (a swap that does not fit) on a machine without one.
/// Process-wide: use it in a test binary of its own.
pub fn pretend_cpu_memory_room(room: Option<u64>) {
    crate::device::memory::PRETEND_ROOM.store(
        room.unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}
