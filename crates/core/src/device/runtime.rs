//! Finding and loading `libonnxruntime.so`, and the one process-wide ONNX Runtime environment.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::config::RuntimeConfig;

use super::DeviceError;

/// The loaded library: where it came from and what it says about itself.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub library: PathBuf,
    /// ONNX Runtime's build string (`ORT Build Info: git-branch=..., git-commit-id=...`).
    pub build_info: String,
}

impl RuntimeInfo {
    /// The release (`1.32.0`), from the library's file name after following links
    /// (`libonnxruntime.so.1.32.0`), or `unknown`. The build string of the PyPI wheels names no
    /// release (`git-branch=HEAD`).
    pub fn version(&self) -> String {
        let real = std::fs::canonicalize(&self.library).unwrap_or_else(|_| self.library.clone());
        real.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split_once(".so."))
            .map(|(_, v)| v.to_string())
            .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
            .unwrap_or_else(|| "unknown".into())
    }
}

/// ONNX Runtime allows one environment per process and one loaded library; every server
/// started in this process (tests start many) shares them.
static RUNTIME: OnceLock<(ort::environment::Environment, RuntimeInfo)> = OnceLock::new();

pub(super) fn environment() -> Option<&'static ort::environment::Environment> {
    RUNTIME.get().map(|(env, _)| env)
}

/// Candidate library paths in search order, each with the reason it is on the list. A path
/// the operator named (ORT_DYLIB_PATH, then the config key) is the only candidate: falling back
/// to another library behind their back would hide a mistake.
fn candidates(cfg: &RuntimeConfig) -> Vec<(String, PathBuf)> {
    if let Some(p) = &cfg.dylib_env {
        return vec![("ORT_DYLIB_PATH".to_string(), p.clone())];
    }
    if let Some(p) = &cfg.onnxruntime_path {
        return vec![("runtime.onnxruntime_path".to_string(), p.clone())];
    }
    let mut c = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push((
            "next to the executable".to_string(),
            dir.join("libonnxruntime.so"),
        ));
        c.push((
            "next to the executable".to_string(),
            dir.join("lib").join("libonnxruntime.so"),
        ));
    }
    c.push((
        "project setup folder".to_string(),
        // The workspace root: this crate is crates/core.
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .unwrap_or(Path::new("."))
            .join(".ortserve/lib/libonnxruntime.so"),
    ));
    c.push((
        "current folder".to_string(),
        PathBuf::from(".ortserve/lib/libonnxruntime.so"),
    ));
    c
}

/// Loads the library from the first place that has a usable one and builds the environment.
/// Later calls return the runtime loaded first.
pub fn init_runtime(cfg: &RuntimeConfig) -> Result<RuntimeInfo, DeviceError> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, info)) = RUNTIME.get() {
        return Ok(info.clone());
    }
    let mut looked = Vec::new();
    for (why, path) in candidates(cfg) {
        if !path.exists() {
            looked.push(format!("{} ({why}): not found", path.display()));
            continue;
        }
        match ort::init_from(&path) {
            Ok(builder) => {
                let env = builder
                    .with_name("ortserve")
                    .with_telemetry(false)
                    .build()
                    .map_err(|e| DeviceError::Environment(e.to_string()))?;
                let info = RuntimeInfo {
                    library: path.clone(),
                    build_info: ort::info().to_string(),
                };
                tracing::info!(library = %path.display(), version = %info.version(), "loaded ONNX Runtime");
                let _ = RUNTIME.set((env, info));
                return Ok(RUNTIME.get().expect("just set").1.clone());
            }
            Err(e) => looked.push(format!("{} ({why}): {e}", path.display())),
        }
    }
    Err(DeviceError::LibraryNotFound { looked })
}
