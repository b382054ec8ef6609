//! The tuning cache: one JSON file per (model file, device, ONNX Runtime release, tuning
//! settings), so a restart with nothing changed skips the sweep.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::TuningConfig;
use crate::device::DevicePlan;

use super::DeviceTuning;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The key: model sha256, device name and kind (threads on CPU; on CUDA the GPU's NVML name,
/// `gpu`), runtime release, ortserve's version (the probe may change between versions), and
/// every tuning setting that changes the result. `None` when the model file cannot be read.
pub(crate) fn cache_key(
    model: &Path,
    device: &str,
    plan: &DevicePlan,
    gpu: Option<&str>,
    runtime: &str,
    cfg: &TuningConfig,
) -> Option<String> {
    let sha = file_sha256(model).ok()?;
    let settings = serde_json::json!({
        "memory_headroom": cfg.memory_headroom,
        "memory_budget": cfg.memory_budget.map(|b| b.0),
        "latency_budget_ns": cfg.latency_budget.map(|d| d.0.as_nanos() as u64),
        "max_batch_cap": cfg.max_batch_cap,
        "max_duration_ms": cfg.max_duration.0.as_millis() as u64,
        "dims": cfg.dims,
    });
    Some(format!(
        "model={sha} device={device} kind={:?} gpu={} ort={runtime} ortserve={} settings={settings}",
        plan.kind,
        gpu.unwrap_or("-"),
        env!("CARGO_PKG_VERSION"),
    ))
}

fn dir(cfg: &TuningConfig) -> PathBuf {
    cfg.cache_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("ortserve-tuning"))
}

fn file(cfg: &TuningConfig, key: &str) -> PathBuf {
    dir(cfg).join(format!("{}.json", hex(&Sha256::digest(key.as_bytes()))))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    key: String,
    result: DeviceTuning,
}

/// One result of `ortserve tune --json FILE`, as `tuning.results_file` reads it back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedResult {
    pub model: String,
    pub key: String,
    pub result: DeviceTuning,
}

/// What `tuning.results_file` holds for `key`.
pub(super) enum Shared {
    Found(DeviceTuning),
    /// The file has `entries` results, none for this key.
    NoMatch {
        entries: usize,
    },
    Unreadable(String),
}

pub(super) fn shared(path: &Path, key: &str) -> Shared {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return Shared::Unreadable(e.to_string()),
    };
    match serde_json::from_str::<Vec<SharedResult>>(&text) {
        Ok(all) => match all.iter().find(|r| r.key == key) {
            Some(r) => Shared::Found(r.result.clone()),
            None => Shared::NoMatch { entries: all.len() },
        },
        Err(e) => Shared::Unreadable(format!("not the output of `ortserve tune --json`: {e}")),
    }
}

/// The cached result for `key`, if a readable file holds exactly that key.
pub(super) fn load(cfg: &TuningConfig, key: &str) -> Option<DeviceTuning> {
    let text = std::fs::read_to_string(file(cfg, key)).ok()?;
    let entry: Entry = serde_json::from_str(&text).ok()?;
    (entry.key == key).then_some(entry.result)
}

/// Writes the result (to a temporary file first, so a crash leaves no half-written entry).
pub(super) fn store(cfg: &TuningConfig, key: &str, result: &DeviceTuning) -> std::io::Result<()> {
    std::fs::create_dir_all(dir(cfg))?;
    let path = file(cfg, key);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let entry = Entry {
        key: key.to_string(),
        result: result.clone(),
    };
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&entry).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path)
}
