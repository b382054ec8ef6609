//! ortserve: an HTTP prediction server for ONNX models.
//!
//! It runs one ONNX Runtime session per device (GPU, or CPU slot), merges concurrent requests
//! into batches, sends each batch to a device through a round-robin or least-loaded dispatcher,
//! and speaks the KServe V2 / Open Inference Protocol over REST.
//!
//! # Layout
//!
//! Arrows point one way: `http` → `batching` → `dispatch` → `device`; `config`, `metrics`,
//! `tensor` and `model` are leaves.
//!
//! - [`config`]: the YAML schema, defaults, environment overrides, validation with key paths.
//! - [`http`]: the axum router, tower layers, the V2 codec and the status table ([`http::ApiError`]).
//!   The only module that imports axum and tower-http.
//! - [`app`]: state shared by handlers: models, metrics, readiness.
//! - [`batching`]: the façade handlers call ([`batching::ModelHandle`]), the batcher actor and its
//!   pure `State`.
//! - [`dispatch`]: device choice (`round_robin`, `least_loaded`), job slots and the in-flight guard.
//! - [`device`]: the ONNX Runtime library, sessions, device planning and the worker threads. The
//!   only module that imports `ort`.
//! - [`tensor`]: `Tensor { dtype, shape, data }`, concatenation and slicing along dim 0.
//! - [`model`]: a model's inputs and outputs and the checks on a request's tensors.
//! - [`metrics`]: the Prometheus registry.
//! - [`shutdown`]: signals and the drain sequence.
//!
//! Entry points: [`start`] loads everything, [`serve`] runs HTTP on an injected listener until an
//! injected shutdown future resolves; [`run`] does both.

pub mod app;
pub mod batching;
pub mod config;
pub mod device;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod model;
pub mod shutdown;
pub mod tensor;

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::app::AppState;
use crate::batching::{BatchSettings, DeviceRunner, ModelHandle};
use crate::config::{Config, ConfigError};
use crate::device::{DeviceError, OrtRunner};
use crate::metrics::Metrics;

#[derive(Debug, Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("model {model:?}: {message}")]
    Model { model: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loads ONNX Runtime, builds every (model, device, instance) session, and starts the device
/// threads and batchers. Returns when every model can take requests.
pub async fn start(config: &Config) -> Result<Arc<AppState>, StartupError> {
    let runtime_cfg = config.runtime.clone();
    let runtime = tokio::task::spawn_blocking(move || device::init_runtime(&runtime_cfg))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    let plans = device::plan_devices(config, &runtime)?;
    let metrics = Arc::new(Metrics::new());
    let mut models = Vec::new();
    for (m, plans) in config.models.iter().zip(plans) {
        let mut runners = Vec::new();
        let mut info = None;
        for plan in plans {
            let path = m.path.clone();
            let name = match plan.instance {
                0 => plan.device.clone(),
                i => format!("{}#{i}", plan.device),
            };
            let runner = tokio::task::spawn_blocking(move || OrtRunner::open(&path, &plan))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
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
            tracing::info!(model = %m.name, device = %name, "session ready");
            runners.push(DeviceRunner {
                name,
                max_batch: m.batching.max_batch_size,
                runner: Box::new(runner),
            });
        }
        let info = info.ok_or_else(|| StartupError::Model {
            model: m.name.clone(),
            message: "no device to run on".into(),
        })?;
        let settings = BatchSettings {
            max_queue_delay: m.batching.max_queue_delay.0,
            queue_capacity: m.batching.queue_capacity,
            default_timeout: config.server.request_timeout.0,
        };
        models.push(ModelHandle::start(
            &m.name,
            &m.version,
            info,
            m.dispatch,
            settings,
            runners,
            metrics.clone(),
        )?);
    }
    Ok(Arc::new(AppState::new(
        models,
        metrics,
        config.server.max_body_bytes.0,
    )))
}

/// Serves HTTP on `listener` until `shutdown` resolves, then drains (see [`shutdown`]) and stops
/// every model. Returns when the device threads are joined.
pub async fn serve(
    state: Arc<AppState>,
    server: &config::ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = http::router(state.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, models = state.models.len(), "serving");
    }
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_delay = server.drain_delay.0;
    let draining = state.clone();
    let graceful = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(?drain_delay, "draining: readiness is 503, still serving");
        tokio::time::sleep(drain_delay).await;
        tracing::info!("no longer accepting connections");
        let _ = drained_tx.send(());
    };
    let http = axum::serve(listener, router).with_graceful_shutdown(graceful);
    let shutdown_timeout = server.shutdown_timeout.0;
    let overdue = async move {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(shutdown_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = http => r?,
        _ = overdue => tracing::warn!(?shutdown_timeout, "in-flight requests did not finish in time"),
    }
    for m in &state.models {
        m.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// [`start`] then [`serve`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let state = start(&config).await?;
    serve(state, &config.server, listener, shutdown).await?;
    Ok(())
}
