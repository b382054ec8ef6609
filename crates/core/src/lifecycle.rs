//! Changing the served models while the server runs (`server.model_control: explicit`): the V2
//! repository extension's index, load and unload, over the registry.
//!
//! A load builds the model beside the one being served (open, tune and warm up every session:
//! [`startup::load_one`]), publishes it ([`Registry::load_one`](crate::registry::Registry)), and
//! only then stops the one it replaces, once the requests holding that one are answered: clients
//! see no gap. A load that fails leaves what is served untouched; the failure shows in the
//! index's `reason` and in the log. Loads and unloads of one model take turns; those of
//! different models run at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::app::AppState;
use crate::call::CallError;
use crate::config::{Config, ModelControl};
use crate::device::DevicePlan;
use crate::startup;

/// What a configured model is doing, as the repository index says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Served.
    Ready,
    /// Being loaded (at startup, or a load through the API that serves nothing yet).
    Loading,
    /// Being unloaded: its last requests are answered.
    Unloading,
    /// Not served: unloaded, or its load failed.
    Unavailable,
}

impl ModelState {
    /// The protocol's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Loading => "LOADING",
            ModelState::Unloading => "UNLOADING",
            ModelState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    /// Why it is in that state, when there is something to say (a failed load, an unload).
    pub reason: String,
}

/// What it takes to load a configured model again: the config, each model's device plans and
/// the runtime's version (part of the tuning cache's key).
pub(crate) struct Loader {
    pub(crate) config: Config,
    pub(crate) plans: BTreeMap<String, Vec<DevicePlan>>,
    pub(crate) runtime_version: String,
}

/// The lifecycle's own state, kept in [`AppState`].
#[derive(Default)]
pub struct Lifecycle {
    /// Set by startup once the runtime is loaded and the devices planned.
    loader: OnceLock<Loader>,
    /// Per configured model: its state and why, when it is not simply served.
    status: Mutex<BTreeMap<String, (ModelState, String)>>,
    /// Per model, the turn a load or unload holds.
    turns: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Lifecycle {
    pub(crate) fn set_loader(&self, loader: Loader) {
        let _ = self.loader.set(loader);
    }

    pub(crate) fn set(&self, name: &str, state: ModelState, reason: impl Into<String>) {
        lock(&self.status).insert(name.to_string(), (state, reason.into()));
    }

    /// The state set for `name`, if any was.
    pub(crate) fn state(&self, name: &str) -> Option<(ModelState, String)> {
        lock(&self.status).get(name).cloned()
    }

    fn turn(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.turns)
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// Every configured model with its state (only the served ones when `ready_only`).
pub fn index(app: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let life = app.lifecycle();
    app.configured()
        .iter()
        .map(|(name, version)| {
            let served = app.registry().get(name, Some(version)).is_some();
            let (state, reason) = match life.state(name) {
                Some(s) => s,
                None if served => (ModelState::Ready, String::new()),
                None => (ModelState::Loading, String::new()),
            };
            IndexEntry {
                name: name.clone(),
                version: version.clone(),
                state,
                reason,
            }
        })
        .filter(|e| !ready_only || e.state == ModelState::Ready)
        .collect()
}

/// Checks that `name` may be loaded or unloaded now, and returns its configured version.
fn controllable(app: &AppState, name: &str) -> Result<String, CallError> {
    if app.model_control != ModelControl::Explicit {
        return Err(CallError::InvalidInput(
            "models are fixed at startup (server.model_control is `none`); set it to `explicit` \
             to load and unload them"
                .into(),
        ));
    }
    let Some(version) = app.configured_version(name) else {
        return Err(CallError::ModelNotFound(name.to_string()));
    };
    if app.is_draining() {
        return Err(CallError::Unavailable("the server is shutting down".into()));
    }
    if app.lifecycle().loader.get().is_none() {
        return Err(CallError::Unavailable(
            "the server is still loading its models; retry".into(),
        ));
    }
    Ok(version.to_string())
}

/// Loads model `name` from its configuration, or reloads it when it is served: the new one is
/// opened, tuned and warmed up beside the old, then takes its place; the old one stops once its
/// requests are answered. Runs to its end even when the caller stops waiting.
pub async fn load(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    controllable(app, name)?;
    let task = tokio::spawn({
        let app = app.clone();
        let name = name.to_string();
        async move { load_in_turn(&app, &name).await }
    });
    task.await
        .unwrap_or_else(|e| Err(CallError::Unavailable(format!("the load stopped: {e}"))))
}

async fn load_in_turn(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    let life = app.lifecycle();
    let turn = life.turn(name);
    let _turn = turn.lock().await;
    let loader = life.loader.get().expect("checked by controllable");
    let Some(m) = loader.config.models.iter().find(|m| m.name == name) else {
        return Err(CallError::ModelNotFound(name.to_string()));
    };
    let plans = loader.plans.get(name).cloned().unwrap_or_default();
    let served = app.registry().get(name, Some(&m.version)).is_some();
    if !served {
        life.set(name, ModelState::Loading, "");
    }
    tracing::info!(model = %name, reload = served, "loading");
    let started = std::time::Instant::now();
    match startup::load_one(
        &loader.config,
        m,
        plans,
        &loader.runtime_version,
        &app.metrics,
    )
    .await
    {
        Ok((model, owner)) => {
            let old = app.registry().load_one(model, Some(owner));
            life.set(name, ModelState::Ready, "");
            let m = &app.metrics;
            m.model_loads.with_label_values(&[name, "ok"]).inc();
            m.model_load_duration
                .with_label_values(&[name])
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(model = %name, took = ?started.elapsed(), "loaded: serving it");
            if let Some(old) = old {
                old.stop(app.request_timeout).await;
                tracing::info!(model = %name, "the version it replaced is stopped");
            }
            Ok(())
        }
        Err(e) => {
            let reason = format!("load failed: {e}");
            tracing::error!(model = %name, error = %e, "load failed; what was served is unchanged");
            let state = if served {
                ModelState::Ready
            } else {
                ModelState::Unavailable
            };
            life.set(name, state, reason.clone());
            app.metrics
                .model_loads
                .with_label_values(&[name, "failed"])
                .inc();
            Err(CallError::InvalidInput(format!("model {name:?}: {reason}")))
        }
    }
}

/// Unloads model `name`: new requests no longer reach it (404), the ones that hold it are
/// answered, then its sessions and threads are released. Unloading what is not loaded succeeds.
pub async fn unload(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    let version = controllable(app, name)?;
    let task = tokio::spawn({
        let app = app.clone();
        let name = name.to_string();
        async move {
            let life = app.lifecycle();
            let turn = life.turn(&name);
            let _turn = turn.lock().await;
            if let Some(retired) = app.registry().unload_one(&name, &version) {
                life.set(&name, ModelState::Unloading, "");
                retired.stop(app.request_timeout).await;
                app.metrics.model_unloads.with_label_values(&[&name]).inc();
                tracing::info!(model = %name, "unloaded");
            }
            life.set(&name, ModelState::Unavailable, "unloaded");
        }
    });
    task.await
        .map_err(|e| CallError::Unavailable(format!("the unload stopped: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
