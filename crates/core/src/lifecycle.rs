//! Changing the served models while the server runs: the V2 repository extension's index, load
//! and unload (`server.model_control: explicit`), and the poller that reads the config and the
//! model files again and applies what changed (`poll`), over the registry.
//!
//! Everything goes through [`reconcile`], which brings one model to the versions its config
//! wants now: a version that is new, or whose file or settings changed, is built beside what is
//! served (open, tune and warm up every session: [`startup::load_one`]) and published
//! ([`Registry::load_one`](crate::registry::Registry)); only then are the versions it replaces
//! stopped, once the requests holding them are answered, so clients see no gap (`swap: overlap`;
//! `swap: replace` unloads first and answers 503 meanwhile). A load that fails leaves what is
//! served untouched; the failure shows in the index's `reason`, the log and a metric. Loads and
//! unloads of one model take turns; those of different models run at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::SystemTime;

use crate::app::AppState;
use crate::call::CallError;
use crate::config::{Config, ModelConfig, ModelControl, SwapMode};
use crate::device::{DevicePlan, RuntimeInfo};
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

/// What it takes to load a configured model again: the config as last read, each model's
/// device plans and the runtime (its version is part of the tuning cache's key).
pub(crate) struct Loader {
    config: Mutex<Config>,
    plans: Mutex<BTreeMap<String, Vec<DevicePlan>>>,
    runtime: RuntimeInfo,
}

impl Loader {
    pub(crate) fn new(config: &Config, plans: Vec<Vec<DevicePlan>>, runtime: RuntimeInfo) -> Self {
        Loader {
            config: Mutex::new(config.clone()),
            plans: Mutex::new(plan_map(config, plans)),
            runtime,
        }
    }

    fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// The config as its files say it now, with its device plans and each model's versions (or
    /// why they cannot be listed); the config last read when it was not read from files
    /// (tests). Files are read on a blocking thread: a hung volume holds that thread, never the
    /// async workers.
    async fn reread(&self) -> Result<Reread, String> {
        let (config, plans, runtime) = (
            self.config(),
            lock(&self.plans).clone(),
            self.runtime.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (config, plans) = match config.reread() {
                None => (config, plans),
                Some(read) => {
                    let config = read.map_err(|e| format!("config: {e}"))?;
                    let plans = crate::device::plan_devices(&config, &runtime)
                        .map_err(|e| format!("devices: {e}"))?;
                    let plans = plan_map(&config, plans);
                    (config, plans)
                }
            };
            let versions = config
                .models
                .iter()
                .map(|m| {
                    let found = crate::config::versions_of(m).map_err(|e| e.to_string());
                    (m.name.clone(), found)
                })
                .collect();
            Ok(Reread {
                config,
                plans,
                versions,
            })
        })
        .await
        .map_err(|e| format!("reading the config stopped: {e}"))?
    }

    /// Takes `config` (and its plans) as the one to load from.
    fn adopt(&self, config: Config, plans: BTreeMap<String, Vec<DevicePlan>>) {
        *lock(&self.config) = config;
        *lock(&self.plans) = plans;
    }
}

/// What [`Loader::reread`] found.
struct Reread {
    config: Config,
    plans: BTreeMap<String, Vec<DevicePlan>>,
    /// Each model's versions to serve, in the config's order.
    versions: Vec<(String, Result<Vec<ModelConfig>, String>)>,
}

fn plan_map(config: &Config, plans: Vec<Vec<DevicePlan>>) -> BTreeMap<String, Vec<DevicePlan>> {
    config
        .models
        .iter()
        .map(|m| m.name.clone())
        .zip(plans)
        .collect()
}

type Key = (String, String);

fn key(name: &str, version: &str) -> Key {
    (name.to_string(), version.to_string())
}

/// The lifecycle's own state, kept in [`AppState`].
#[derive(Default)]
pub struct Lifecycle {
    /// Set by startup once the runtime is loaded and the devices planned.
    loader: OnceLock<Loader>,
    /// Each configured model's name, with the versions its config wants served (empty until
    /// startup has looked, or when it wants none).
    wanted: Mutex<BTreeMap<String, Vec<String>>>,
    /// Per (model, version): its state and why, once a load or unload has set one.
    status: Mutex<BTreeMap<Key, (ModelState, String)>>,
    /// Per model, the turn a load or unload holds.
    turns: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per (model, version), what was last loaded or tried: its settings and file.
    seen: Mutex<BTreeMap<Key, Tried>>,
    /// Wakes the poller at once (SIGHUP).
    poke: tokio::sync::Notify,
    /// The last config-reading problem the poller logged, so it is logged once.
    reread_problem: Mutex<Option<String>>,
    /// Per model, the load calls asked for and done (see [`load`]).
    loads: Mutex<BTreeMap<String, Loads>>,
    /// Per served (model, version), the memory its load added on each device (bytes by device
    /// name): what another version of it is expected to need beside it.
    footprints: Mutex<BTreeMap<Key, BTreeMap<String, u64>>>,
}

/// Each planned device's memory now, by device name (those whose memory can be read).
fn read_memory(
    plans: &[DevicePlan],
    runtime: &crate::config::RuntimeConfig,
) -> BTreeMap<String, crate::device::MemoryReading> {
    let mut readings = BTreeMap::new();
    for plan in plans {
        if readings.contains_key(&plan.device) {
            continue;
        }
        if let Ok(probe) = crate::tuning::MemoryProbe::for_plan(plan, runtime) {
            readings.insert(plan.device.clone(), probe.read());
        }
    }
    readings
}

/// [`read_memory`] on a blocking thread (reading a GPU's memory may block).
pub(crate) async fn read_memory_now(
    plans: &[DevicePlan],
    runtime: &crate::config::RuntimeConfig,
) -> BTreeMap<String, crate::device::MemoryReading> {
    let (plans, runtime) = (plans.to_vec(), runtime.clone());
    tokio::task::spawn_blocking(move || read_memory(&plans, &runtime))
        .await
        .unwrap_or_default()
}

/// What memory grew by on each device between two readings.
pub(crate) fn grown(
    before: &BTreeMap<String, crate::device::MemoryReading>,
    after: &BTreeMap<String, crate::device::MemoryReading>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(d, a)| Some((d.clone(), a.used.saturating_sub(before.get(d)?.used))))
        .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Load calls of one model: calls that wait for their turn while a load is running are all
/// answered by the next load, which starts after each of them asked (it reads the files then),
/// so a burst of calls costs two loads, not one each.
#[derive(Default)]
struct Loads {
    /// Calls made so far (each call's ticket is the count when it asked).
    asked: u64,
    /// The calls the last finished load answers: those that asked before it started.
    answered: u64,
    last: Option<Result<(), CallError>>,
}

/// A version as it was loaded or tried: its settings (as YAML) and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tried {
    settings: String,
    file: Fingerprint,
}

fn settings_of(m: &ModelConfig) -> String {
    serde_yaml_ng::to_string(m).unwrap_or_default()
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

/// The file's fingerprint, read in full (models are megabytes: call it on a blocking thread).
/// `known` is skipped re-reading when `stat` says the file is the same one.
fn fingerprint(path: &Path, known: Option<&Fingerprint>) -> std::io::Result<Fingerprint> {
    let now = stat(path)?;
    if let Some(k) = known.filter(|k| k.stat == now) {
        return Ok(k.clone());
    }
    Ok(Fingerprint {
        stat: now,
        sha256: crate::tuning::file_sha256(path)?,
    })
}

impl Lifecycle {
    pub(crate) fn set_loader(&self, loader: Loader) {
        let _ = self.loader.set(loader);
    }

    /// Names the configured models (before their versions are known).
    pub(crate) fn configure(&self, names: impl IntoIterator<Item = String>) {
        let mut wanted = lock(&self.wanted);
        for n in names {
            wanted.entry(n).or_default();
        }
    }

    pub(crate) fn want(&self, name: &str, versions: Vec<String>) {
        lock(&self.wanted).insert(name.to_string(), versions);
    }

    /// Notes what version `version` of `name` added to each device's memory as it loaded.
    pub(crate) fn note_footprint(&self, name: &str, version: &str, bytes: BTreeMap<String, u64>) {
        lock(&self.footprints).insert(key(name, version), bytes);
    }

    /// Whether `name` is a configured model (served or not).
    pub fn is_configured(&self, name: &str) -> bool {
        lock(&self.wanted).contains_key(name)
    }

    /// Notes that startup serves `version` of `name`.
    pub(crate) fn installed(&self, name: &str, version: &str) {
        let mut wanted = lock(&self.wanted);
        let versions = wanted.entry(name.to_string()).or_default();
        if !versions.iter().any(|v| v == version) {
            versions.push(version.to_string());
        }
    }

    /// Whether the versions wanted of `name` are known and `version` is not one of them.
    pub(crate) fn wants_other(&self, name: &str, version: &str) -> bool {
        lock(&self.wanted)
            .get(name)
            .is_some_and(|v| !v.is_empty() && !v.iter().any(|w| w == version))
    }

    /// Whether version `version` of `name` is being loaded now.
    pub(crate) fn is_loading(&self, name: &str, version: &str) -> bool {
        matches!(
            lock(&self.status).get(&key(name, version)),
            Some((ModelState::Loading, _))
        )
    }

    pub(crate) fn set(
        &self,
        name: &str,
        version: &str,
        state: ModelState,
        reason: impl Into<String>,
    ) {
        lock(&self.status).insert(key(name, version), (state, reason.into()));
    }

    /// What model `name` is doing when none of its versions is served: loading (a retry will
    /// find it), or not served with the reason (unloaded, or its load failed).
    pub(crate) fn state(&self, name: &str) -> Option<(ModelState, String)> {
        let status = lock(&self.status);
        let mine: Vec<_> = status
            .range(key(name, "")..)
            .take_while(|((n, _), _)| n == name)
            .map(|(_, s)| s.clone())
            .collect();
        mine.iter()
            .find(|(s, _)| *s == ModelState::Loading)
            .or_else(|| mine.iter().find(|(s, _)| *s != ModelState::Ready))
            .or(mine.first())
            .cloned()
    }

    fn turn(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.turns)
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// Notes each version's settings and file as startup is about to load it (`poll` and
/// `explicit`), so that only what changes afterwards is loaded again. A file that cannot be read
/// is left for the load to report.
pub(crate) async fn note_loaded(app: &AppState, models: Vec<ModelConfig>) {
    let noted = tokio::task::spawn_blocking(move || {
        models
            .into_iter()
            .filter_map(|m| {
                let file = fingerprint(&m.path, None).ok()?;
                Some((
                    key(&m.name, &m.version),
                    Tried {
                        settings: settings_of(&m),
                        file,
                    },
                ))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    lock(&app.lifecycle().seen).extend(noted);
}

/// Every configured model's versions with their states (only the served ones when
/// `ready_only`): those its config wants, those served, and those a load or unload left a state
/// for. A model with none of these is one row with an empty version.
pub fn index(app: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let life = app.lifecycle();
    let wanted = lock(&life.wanted).clone();
    let status = lock(&life.status).clone();
    let mut rows = Vec::new();
    for (name, versions) in wanted {
        let mut all: BTreeSet<crate::registry::VersionKey> = versions
            .iter()
            .chain(&app.registry().versions(&name))
            .map(|v| crate::registry::VersionKey::of(v))
            .collect();
        all.extend(
            status
                .range(key(&name, "")..)
                .take_while(|((n, _), _)| *n == name)
                .map(|((_, v), _)| crate::registry::VersionKey::of(v)),
        );
        if all.is_empty() {
            all.insert(crate::registry::VersionKey::of(""));
        }
        for v in all {
            let version = v.to_string();
            let served = app.registry().get(&name, Some(&version)).is_some();
            let (state, reason) = match status.get(&key(&name, &version)) {
                Some(s) => s.clone(),
                None if served => (ModelState::Ready, String::new()),
                None if version.is_empty() => (ModelState::Unavailable, "no version".into()),
                None => (ModelState::Loading, String::new()),
            };
            rows.push(IndexEntry {
                name: name.clone(),
                version,
                state,
                reason,
            });
        }
    }
    rows.retain(|e| !ready_only || e.state == ModelState::Ready);
    rows
}

/// Checks that `name` may be loaded or unloaded through the API now.
fn controllable(app: &AppState, name: &str) -> Result<(), CallError> {
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
    if !app.lifecycle().is_configured(name) {
        return Err(CallError::ModelNotFound(name.to_string()));
    }
    if app.is_draining() {
        return Err(CallError::Unavailable("the server is shutting down".into()));
    }
    if app.lifecycle().loader.get().is_none() {
        return Err(CallError::Unavailable(
            "the server is still loading its models; retry".into(),
        ));
    }
    Ok(())
}

/// Loads model `name` as its config says now (the config file and model folder are read
/// again): every version its `version_policy` chooses is loaded, or reloaded when served, beside
/// what is served; versions it no longer chooses are then unloaded. Calls that arrive while a
/// load of the model runs wait for it and are answered by the next one, together. Runs to its
/// end even when the caller stops waiting.
pub async fn load(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    controllable(app, name)?;
    let ticket = {
        let mut loads = lock(&app.lifecycle().loads);
        let l = loads.entry(name.to_string()).or_default();
        l.asked += 1;
        l.asked
    };
    in_turn(app, name, move |app, name| async move {
        let life = app.lifecycle();
        let started = {
            let loads = lock(&life.loads);
            let l = &loads[&name];
            if let Some(last) = l.last.as_ref().filter(|_| l.answered >= ticket) {
                return last.clone();
            }
            l.asked
        };
        let result = load_in_turn(&app, &name).await;
        let mut loads = lock(&life.loads);
        let l = loads.entry(name).or_default();
        l.answered = started;
        l.last = Some(result.clone());
        result
    })
    .await
    .unwrap_or_else(|e| Err(CallError::Unavailable(format!("the load stopped: {e}"))))
}

/// Runs `work` on a task of its own in model `name`'s turn (after the loads and unloads of it
/// before), to its end even when the caller stops waiting.
fn in_turn<T, F, Fut>(app: &Arc<AppState>, name: &str, work: F) -> tokio::task::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Arc<AppState>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let (app, name) = (app.clone(), name.to_string());
    tokio::spawn(async move {
        let turn = app.lifecycle().turn(&name);
        let _turn = turn.lock().await;
        work(app, name).await
    })
}

/// [`load`]'s work, in the model's turn.
async fn load_in_turn(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    let loader = app
        .lifecycle()
        .loader
        .get()
        .expect("checked by controllable");
    let read = loader.reread().await.map_err(CallError::InvalidInput)?;
    let Some((_, found)) = read.versions.into_iter().find(|(n, _)| n == name) else {
        return Err(CallError::InvalidInput(format!(
            "model {name:?} is no longer in the config"
        )));
    };
    let versions = found.map_err(CallError::InvalidInput)?;
    if versions.is_empty() {
        return Err(CallError::InvalidInput(format!(
            "model {name:?}: no version to load (no VERSION/model.onnx that version_policy \
             chooses)"
        )));
    }
    loader.adopt(read.config, read.plans);
    reconcile_in_turn(app, name, versions, true).await
}

/// Unloads every version of model `name`: new requests no longer reach it (404), the ones that
/// hold it are answered, then its sessions and threads are released. Unloading what is not
/// loaded succeeds.
pub async fn unload(app: &Arc<AppState>, name: &str) -> Result<(), CallError> {
    controllable(app, name)?;
    in_turn(app, name, |app, name| async move {
        let life = app.lifecycle();
        for version in app.registry().versions(&name) {
            retire(&app, &name, &version, "unloaded").await;
        }
        lock(&life.seen).retain(|(n, _), _| *n != name);
        // A load call that waited behind this unload is not answered by a load before it.
        if let Some(l) = lock(&life.loads).get_mut(&name) {
            l.last = None;
        }
        let known: Vec<Key> = lock(&life.status)
            .range(key(&name, "")..)
            .take_while(|((n, _), _)| *n == name)
            .map(|(k, _)| k.clone())
            .collect();
        if known.is_empty() {
            life.set(&name, "", ModelState::Unavailable, "unloaded");
        }
        for (n, v) in known {
            life.set(&n, &v, ModelState::Unavailable, "unloaded");
        }
    })
    .await
    .map_err(|e| CallError::Unavailable(format!("the unload stopped: {e}")))
}

/// Takes version `version` of `name` out and stops it once its requests are answered.
async fn retire(app: &AppState, name: &str, version: &str, reason: &str) {
    let life = app.lifecycle();
    if let Some(retired) = app.registry().unload_one(name, version) {
        life.set(name, version, ModelState::Unloading, "");
        retired.stop(app.request_timeout).await;
        lock(&life.footprints).remove(&key(name, version));
        app.metrics.model_unloads.with_label_values(&[name]).inc();
        tracing::info!(model = %name, version, reason, "unloaded");
    }
    life.set(name, version, ModelState::Unavailable, reason);
}

/// Brings model `name` to `wanted` (its versions to serve, as its config says now), in its
/// turn: each wanted version that is not served, or whose settings or file content changed
/// since it was loaded (or always, with `force`), is loaded; then, once one wanted version is
/// served (or none is wanted), the served versions not wanted are unloaded. A version whose load
/// failed is not tried again until its file or settings change (or `force`). Returns the first
/// load's error.
pub(crate) async fn reconcile(
    app: &Arc<AppState>,
    name: &str,
    wanted: Vec<ModelConfig>,
    force: bool,
) -> Result<(), CallError> {
    in_turn(app, name, move |app, name| async move {
        reconcile_in_turn(&app, &name, wanted, force).await
    })
    .await
    .unwrap_or_else(|e| Err(CallError::Unavailable(format!("the change stopped: {e}"))))
}

/// [`reconcile`], for a caller that holds the model's turn.
async fn reconcile_in_turn(
    app: &Arc<AppState>,
    name: &str,
    wanted: Vec<ModelConfig>,
    force: bool,
) -> Result<(), CallError> {
    let life = app.lifecycle();
    life.want(name, wanted.iter().map(|m| m.version.clone()).collect());
    // What to load: read each file once (stat first, so an unchanged file is not hashed).
    let mut to_load = Vec::new();
    for m in &wanted {
        let k = key(name, &m.version);
        let before = lock(&life.seen).get(&k).cloned();
        let path = m.path.clone();
        let known = before.as_ref().map(|t| t.file.clone());
        let file = tokio::task::spawn_blocking(move || fingerprint(&path, known.as_ref()))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(model = %name, version = %m.version, error = %e, "cannot read the model file");
                continue;
            }
        };
        let now = Tried {
            settings: settings_of(m),
            file,
        };
        if force || before.as_ref() != Some(&now) {
            // Recorded before the load: what fails is not tried again until it changes.
            lock(&life.seen).insert(k, now);
            to_load.push(m.clone());
        }
    }
    let wanted_versions: BTreeSet<&str> = wanted.iter().map(|m| m.version.as_str()).collect();
    let extra: Vec<String> = app
        .registry()
        .versions(name)
        .into_iter()
        .filter(|v| !wanted_versions.contains(v.as_str()))
        .collect();
    let replace = wanted.first().is_some_and(|m| m.swap == SwapMode::Replace);
    if replace && !to_load.is_empty() {
        // Unload first: the model answers 503 (loading) until the new one serves.
        for m in &to_load {
            life.set(name, &m.version, ModelState::Loading, "");
        }
        let mut old: Vec<String> = extra.clone();
        old.extend(
            to_load
                .iter()
                .map(|m| m.version.clone())
                .filter(|v| app.registry().get(name, Some(v)).is_some()),
        );
        for v in old {
            retire(app, name, &v, "unloaded to make room (swap: replace)").await;
            if !wanted_versions.contains(v.as_str()) {
                lock(&life.seen).remove(&key(name, &v));
                lock(&life.status).remove(&key(name, &v));
            }
            if wanted_versions.contains(v.as_str()) {
                life.set(name, &v, ModelState::Loading, "");
            }
        }
    }
    // The highest first: a request without a version goes to the highest served, so it never
    // meets a lower version that is only just loaded (`version_policy: all`).
    to_load.sort_by_key(|m| std::cmp::Reverse(crate::registry::VersionKey::of(&m.version)));
    let mut first_error = None;
    for m in &to_load {
        if let Err(e) = load_version(app, m).await {
            first_error.get_or_insert(e);
        }
    }
    let any_served = wanted
        .iter()
        .any(|m| app.registry().get(name, Some(&m.version)).is_some());
    if wanted.is_empty() || any_served {
        let reason = if wanted.is_empty() {
            "unloaded: no longer configured, or no version left"
        } else {
            "unloaded: not chosen by version_policy"
        };
        for v in extra {
            retire(app, name, &v, reason).await;
            // Wanted again later, it is loaded again; until then the index leaves it out (a
            // model rolled through many versions does not list them all).
            lock(&life.seen).remove(&key(name, &v));
            lock(&life.status).remove(&key(name, &v));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Loads one version beside what is served, publishes it, then stops the one it replaces (the
/// same version's old content) once that one's requests are answered.
async fn load_version(app: &Arc<AppState>, m: &ModelConfig) -> Result<(), CallError> {
    let life = app.lifecycle();
    let (name, version) = (m.name.as_str(), m.version.as_str());
    let loader = life.loader.get().expect("set before any load");
    let config = loader.config();
    let plans = lock(&loader.plans).get(name).cloned().unwrap_or_default();
    // The served version it replaces, or else the highest served one: its tuning is taken for
    // the same inputs and outputs rather than probing a device that is busy serving.
    let same = app.registry().get(name, Some(version));
    let reload = same.is_some();
    let current = same.or_else(|| app.registry().get(name, None));
    let others = app.registry().versions(name).len() - usize::from(reload);
    if !reload {
        life.set(name, version, ModelState::Loading, "");
    }
    let before = read_memory_now(&plans, &config.runtime).await;
    if let (SwapMode::Overlap, Some(served)) = (m.swap, current.as_deref()) {
        if let Some(short) = too_little_memory(life, m, served, &before) {
            drop(current);
            return Err(failed(app, m, reload, short));
        }
    }
    tracing::info!(model = %name, version, path = %m.path.display(), reload, "loading");
    let started = std::time::Instant::now();
    let loaded = startup::load_one(
        &config,
        m,
        plans.clone(),
        &loader.runtime.version(),
        &app.metrics,
        current.as_deref(),
    )
    .await;
    // Let go of the served version, so its stop below waits only for its requests.
    drop(current);
    let metrics = &app.metrics;
    match loaded {
        Ok((model, owner)) => {
            let after = read_memory_now(&plans, &config.runtime).await;
            life.note_footprint(name, version, grown(&before, &after));
            let old = app.registry().load_one(model, Some(owner));
            life.set(name, version, ModelState::Ready, "");
            metrics.model_loads.with_label_values(&[name, "ok"]).inc();
            metrics
                .model_load_duration
                .with_label_values(&[name])
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(model = %name, version, took = ?started.elapsed(), "loaded: serving it");
            if let Some(old) = old {
                old.stop(app.request_timeout).await;
                tracing::info!(model = %name, version, "the content it replaced is stopped");
            }
            Ok(())
        }
        Err(e) => {
            let mut reason = format!("load failed: {e}");
            let text = e.to_string().to_ascii_lowercase();
            let memory = ["memory", "alloc"].iter().any(|w| text.contains(w));
            if (reload || others > 0) && m.swap == SwapMode::Overlap && memory {
                reason.push_str(
                    " (loaded beside the served version, swap: overlap; if the two do not fit \
                     in memory together, swap: replace unloads the served one first)",
                );
            }
            Err(failed(app, m, reload, reason))
        }
    }
}

/// Why version `m` cannot be loaded beside `served` (`swap: overlap`): on some device, what
/// `served` added to memory when it loaded is more than is left now under the limit less
/// `tuning.memory_headroom`. `None` when it fits, or when either is not known.
fn too_little_memory(
    life: &Lifecycle,
    m: &ModelConfig,
    served: &crate::app::Model,
    now: &BTreeMap<String, crate::device::MemoryReading>,
) -> Option<String> {
    let need = lock(&life.footprints)
        .get(&key(served.name(), served.version()))
        .cloned()?;
    for (device, bytes) in need {
        let Some(r) = now.get(&device) else { continue };
        let Some(limit) = r.limit else { continue };
        let usable = (limit as f64 * (1.0 - m.tuning.memory_headroom)) as u64;
        let room = usable.saturating_sub(r.used);
        if bytes > room {
            return Some(format!(
                "not loaded: it would need about {} on {device} beside the served version {} \
                 (what that one took when it loaded), and {} are left under the limit less \
                 tuning.memory_headroom ({:.0}%); swap: replace unloads the served version \
                 first (the model answers 503 meanwhile)",
                mib(bytes),
                served.version(),
                mib(room),
                m.tuning.memory_headroom * 100.0
            ));
        }
    }
    None
}

/// Records a failed load of version `m` (its state, the log, the metric) and returns the
/// caller's error. `reload`: the version is served, and stays so.
fn failed(app: &AppState, m: &ModelConfig, reload: bool, reason: String) -> CallError {
    let (name, version) = (m.name.as_str(), m.version.as_str());
    let served = app.registry().versions(name);
    tracing::error!(model = %name, version, path = %m.path.display(), %reason, ?served, "load failed; the versions served now are listed");
    let state = if reload {
        ModelState::Ready
    } else {
        ModelState::Unavailable
    };
    app.lifecycle().set(name, version, state, reason.clone());
    app.metrics
        .model_loads
        .with_label_values(&[name, "failed"])
        .inc();
    CallError::InvalidInput(format!("model {name:?} version {version}: {reason}"))
}

/// Starts the poller when `server.model_control` is `poll`: every `poll_interval`, or at once
/// after [`poll_now`], the config and model folders are read again ([`poll_once`]). The poller
/// ends with the server (it holds the state weakly) or when draining starts.
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

/// One look at the config and the model files: the config file (and `--model-dir`) are read
/// again, and each model is brought to what they say ([`reconcile`]): new models and versions
/// are loaded, changed ones reloaded, removed ones unloaded. A config that cannot be read or is
/// not valid changes nothing (it is logged once, and counted). Changes outside `models` need a
/// restart; they are logged.
pub async fn poll_once(app: &Arc<AppState>) {
    let life = app.lifecycle();
    let Some(loader) = life.loader.get() else {
        return;
    };
    let before = loader.config();
    let read = match loader.reread().await {
        Ok(read) => {
            *lock(&life.reread_problem) = None;
            read
        }
        Err(problem) => {
            app.metrics
                .config_reads
                .with_label_values(&["invalid"])
                .inc();
            let mut last = lock(&life.reread_problem);
            if last.as_deref() != Some(problem.as_str()) {
                tracing::error!(%problem, "poll: the config cannot be used; nothing changed");
                *last = Some(problem);
            }
            return;
        }
    };
    app.metrics.config_reads.with_label_values(&["ok"]).inc();
    let Reread {
        config,
        plans,
        versions,
    } = read;
    let yaml = |c: &Config| serde_yaml_ng::to_string(&(&c.server, &c.runtime)).unwrap_or_default();
    if yaml(&config) != yaml(&before) {
        tracing::warn!(
            "poll: the config's server or runtime section changed; a restart applies it"
        );
    }
    let removed: Vec<String> = before
        .models
        .iter()
        .map(|m| m.name.clone())
        .filter(|n| !config.models.iter().any(|m| &m.name == n))
        .collect();
    loader.adopt(config, plans);
    for (name, found) in versions {
        life.configure([name.clone()]);
        let wanted = match found {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "poll: cannot list the model's versions");
                continue;
            }
        };
        if wanted.is_empty() && app.registry().get(&name, None).is_some() {
            // Every version gone at once is more likely a volume being synced than a wish to
            // stop serving; what is served stays until a version appears.
            continue;
        }
        // A failure is in the index, the log and the metrics already.
        let _ = reconcile(app, &name, wanted, false).await;
    }
    for name in removed {
        tracing::info!(model = %name, "poll: the model left the config; unloading it");
        let _ = reconcile(app, &name, Vec::new(), false).await;
        lock(&life.wanted).remove(&name);
        lock(&life.status).retain(|(n, _), _| *n != name);
    }
}
