//! Changing the served models while the server runs: the V2 repository extension's index, load
//! and unload (`server.model_control: explicit`), and the poller that reloads a model whose file
//! changed (`poll`), over the registry.
//!
//! A load builds the model beside the one being served (open, tune and warm up every session:
//! [`startup::load_one`]), publishes it ([`Registry::load_one`](crate::registry::Registry)), and
//! only then stops the one it replaces, once the requests holding that one are answered: clients
//! see no gap. A load that fails leaves what is served untouched; the failure shows in the
//! index's `reason` and in the log. Loads and unloads of one model take turns; those of
//! different models run at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::SystemTime;

use crate::app::AppState;
use crate::call::CallError;
use crate::config::{Config, ModelControl};
use crate::device::DevicePlan;
use crate::registry::lock;
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
    pub const ALL: [ModelState; 4] = [
        ModelState::Ready,
        ModelState::Loading,
        ModelState::Unloading,
        ModelState::Unavailable,
    ];

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
    /// Per model, its file as it was when last loaded or tried (`poll`).
    seen: Mutex<BTreeMap<String, Fingerprint>>,
    /// Wakes the poller at once (SIGHUP).
    poke: tokio::sync::Notify,
}

/// A model file as the poller saw it: what `stat` says (through symlinks, so a ConfigMap's
/// `..data` swap shows as another file) and the sha256 of its content (hex, as the tuning
/// cache's key has it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    stat: Stat,
    sha256: String,
}

/// Size, modification time and identity (device, inode) of a file, through symlinks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

fn stat(path: &Path) -> std::io::Result<Stat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stat {
        len: m.len(),
        modified: m.modified().ok(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The file's fingerprint, read in full (on a blocking thread: models are megabytes).
fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    Ok(Fingerprint {
        stat: stat(path)?,
        sha256: crate::tuning::file_sha256(path)?,
    })
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

/// Notes each model file as startup is about to load it (`poll` mode), so the poller reloads
/// only what changes afterwards. A file that cannot be read is left for the load to report.
pub(crate) async fn note_files(app: &AppState, files: Vec<(String, PathBuf)>) {
    let noted = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .filter_map(|(name, path)| fingerprint(&path).ok().map(|f| (name, f)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    lock(&app.lifecycle().seen).extend(noted);
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
    match app.model_control {
        ModelControl::Explicit => {}
        ModelControl::None => {
            return Err(CallError::InvalidInput(
                "models are fixed at startup (server.model_control is `none`); set it to \
                 `explicit` to load and unload them"
                    .into(),
            ))
        }
        ModelControl::Poll => {
            return Err(CallError::InvalidInput(
                "models follow their files (server.model_control is `poll`); change the file, \
                 or set it to `explicit` to load and unload them"
                    .into(),
            ))
        }
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
    let current = app.registry().get(name, Some(&m.version));
    let served = current.is_some();
    if !served {
        life.set(name, ModelState::Loading, "");
    }
    tracing::info!(model = %name, reload = served, "loading");
    let started = std::time::Instant::now();
    let loaded = startup::load_one(
        &loader.config,
        m,
        plans,
        &loader.runtime_version,
        &app.metrics,
        current.as_deref(),
    )
    .await;
    // Let go of the served version, so its stop below waits only for its requests.
    drop(current);
    match loaded {
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

/// Starts the poller when `server.model_control` is `poll`: every `poll_interval`, or at once
/// after [`poll_now`], each configured model's file is compared with what was last loaded, and a
/// model whose content changed is reloaded as [`load`] does. A file caught half-written fails
/// to load and leaves the served model serving; it is tried again once its content changes
/// again. The poller ends with the server (it holds the state weakly) or when draining starts.
pub fn start_poller(app: &Arc<AppState>) {
    if app.model_control != ModelControl::Poll {
        return;
    }
    let interval = app.poll_interval;
    let weak: Weak<AppState> = Arc::downgrade(app);
    tokio::spawn(async move {
        loop {
            {
                let Some(app) = weak.upgrade() else { return };
                let poke = app.lifecycle().poke.notified();
                tokio::pin!(poke);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = &mut poke => {}
                }
            }
            let Some(app) = weak.upgrade() else { return };
            if app.is_draining() {
                return;
            }
            poll_once(&app).await;
        }
    });
}

/// Wakes the poller at once (SIGHUP in `poll` mode).
pub fn poll_now(app: &AppState) {
    app.lifecycle().poke.notify_one();
}

/// One look at every configured model's file; reloads those whose content changed.
pub async fn poll_once(app: &Arc<AppState>) {
    let Some(loader) = app.lifecycle().loader.get() else {
        return;
    };
    for m in &loader.config.models {
        let (name, path) = (m.name.clone(), m.path.clone());
        let seen = lock(&app.lifecycle().seen).get(&name).cloned();
        let checked =
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<Fingerprint>> {
                let now = stat(&path)?;
                if seen.as_ref().is_some_and(|s| s.stat == now) {
                    return Ok(None);
                }
                let f = fingerprint(&path)?;
                Ok(Some(f))
            })
            .await;
        let fresh = match checked {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::debug!(model = %name, error = %e, "poll: cannot read the model file");
                continue;
            }
            Err(_) => continue,
        };
        let changed = {
            let mut seen = lock(&app.lifecycle().seen);
            let changed = seen.get(&name).is_none_or(|s| s.sha256 != fresh.sha256);
            // Recorded before the load: content that fails to load is not tried again until it
            // changes.
            seen.insert(name.clone(), fresh);
            changed
        };
        if changed {
            tracing::info!(model = %name, "poll: the model file changed; reloading");
            // A failure is in the index, the log and the metrics already.
            let _ = load_in_turn(app, &name).await;
        }
    }
}
