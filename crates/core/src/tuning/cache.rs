//! The tuning cache: one JSON file per (model file, device, ONNX Runtime release, tuning
//! settings), so a restart with nothing changed skips the sweep.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::TuningConfig;
use crate::device::DevicePlan;

use super::{Cores, DeviceTuning};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn file_sha256(path: &Path) -> std::io::Result<String> {
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

/// What the probe measures, in the key: results of another method are probed again, not read
/// with their fields missing. 1: the session run alone. 2: batches as served (hand-off, run,
/// split, replies), with `served_*`, `fixed_cost_ms` and `max_good`. 3: served with two
/// batches in flight, as under load (the same fields, other figures). 4: the larger end of the
/// tied sizes where the device will limit a loaded server (`prefer` in the result is the end
/// chosen; a result of 3 chose by another rule).
const PROBE_METHOD: u32 = 4;

/// The key: model sha256, device name and kind (threads on CPU; on CUDA the GPU's NVML name,
/// `gpu`), runtime release, ortserve's version (the probe may change between versions), every
/// tuning setting that changes the result, which end of the tied sizes is chosen and the
/// cores left for request handling (both follow the cores the process may use). `None` when
/// the model file cannot be read.
pub(crate) fn cache_key(
    model: &Path,
    device: &str,
    plan: &DevicePlan,
    gpu: Option<&str>,
    runtime: &str,
    cfg: &TuningConfig,
    cores: Cores,
) -> Option<String> {
    let sha = file_sha256(model).ok()?;
    let settings = serde_json::json!({
        "memory_headroom": cfg.memory_headroom,
        "memory_budget": cfg.memory_budget.map(|b| b.0),
        "latency_budget_ns": cfg.latency_budget.map(|d| d.0.as_nanos() as u64),
        "max_batch_cap": cfg.max_batch_cap,
        "max_duration_ms": cfg.max_duration.0.as_millis() as u64,
        "dims": cfg.dims,
        "prefer": cores.prefer,
        "handling_cores": cores.handling,
    });
    Some(format!(
        "model={sha} device={device} kind={:?} gpu={} ort={runtime} ortserve={} probe={PROBE_METHOD} settings={settings}",
        plan.kind,
        gpu.unwrap_or("-"),
        env!("CARGO_PKG_VERSION"),
    ))
}

fn dir(cfg: &TuningConfig) -> PathBuf {
    cfg.cache_dir
        .clone()
        .unwrap_or_else(crate::config::default_cache_dir)
}

/// Creates `dir` (and its parents) readable and writable by this user only, and checks that
/// the folder is this user's and nobody else may write it: in a folder that another user can
/// write, they could plant a result that the next start would serve.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {} with mode {:o}; the tuning cache needs a folder only \
                 uid {uid} may write",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Whether a result read from a file (the cache, `tuning.results_file`) is one this config could
/// have produced: a chosen size within the cap that was probed and ran, and finite readings.
/// Files are written by other processes and may be edited; nothing in them is trusted.
pub(super) fn plausible(t: &DeviceTuning, cfg: &TuningConfig) -> Result<(), String> {
    let cap = cfg.max_batch_cap.min(crate::config::MAX_BATCH_LIMIT);
    if t.chosen == 0 || t.chosen > cap {
        return Err(format!(
            "chosen batch size {} is outside 1..={cap} (tuning.max_batch_cap)",
            t.chosen
        ));
    }
    for p in &t.probes {
        let finite = [
            p.latency_ms,
            p.rows_per_second,
            p.served_ms,
            p.served_rows_per_second,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0);
        if p.batch == 0 || p.batch > cap || !finite {
            return Err(format!(
                "probe of batch size {} has readings out of range",
                p.batch
            ));
        }
    }
    let measured = t
        .probes
        .iter()
        .any(|p| p.batch == t.chosen && p.outcome == super::probe::Outcome::Ok);
    if !t.probes.is_empty() && !measured {
        return Err(format!(
            "chosen batch size {} is not a size that was probed and ran",
            t.chosen
        ));
    }
    // The refiner's ceiling: a size that ran within the limits, at least the chosen one; none
    // (0) without probes.
    let max_good_ran = t
        .probes
        .iter()
        .any(|p| p.batch == t.max_good && p.outcome == super::probe::Outcome::Ok);
    let max_good_ok = if t.probes.is_empty() {
        t.max_good == 0
    } else {
        max_good_ran && t.max_good >= t.chosen && t.max_good <= cap
    };
    if !max_good_ok {
        return Err(format!(
            "max_good {} is not a size that was probed and ran, from {} to {cap}",
            t.max_good, t.chosen
        ));
    }
    if !t.fixed_cost_ms.is_finite() || t.fixed_cost_ms < 0.0 {
        return Err("fixed_cost_ms is out of range".into());
    }
    if t.warmup.iter().any(|w| w.batch == 0 || w.batch > t.chosen) {
        return Err("a warm-up size is outside 1..=chosen".into());
    }
    Ok(())
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
        Ok(all) => {
            // A result, or the one with every thread inside a result opened with one fewer.
            let found = all
                .iter()
                .flat_map(|r| {
                    let earlier = r.result.earlier.as_deref();
                    [
                        (r.key == key).then_some(&r.result),
                        earlier.filter(|e| e.key.as_deref() == Some(key)),
                    ]
                })
                .flatten()
                .next();
            match found {
                Some(r) => Shared::Found(DeviceTuning {
                    earlier: None,
                    ..r.clone()
                }),
                None => Shared::NoMatch { entries: all.len() },
            }
        }
        Err(e) => Shared::Unreadable(format!("not the output of `ortserve tune --json`: {e}")),
    }
}

/// The cached result for `key`, if a private folder has a file that holds exactly that key and a
/// [`plausible`] result.
pub(super) fn load(cfg: &TuningConfig, key: &str) -> Option<DeviceTuning> {
    let folder = dir(cfg);
    if let Err(e) = private_dir(&folder) {
        tracing::warn!(error = %e, "the tuning cache is not used");
        return None;
    }
    let path = file(cfg, key);
    let text = std::fs::read_to_string(&path).ok()?;
    let entry: Entry = serde_json::from_str(&text).ok()?;
    if entry.key != key {
        return None;
    }
    match plausible(&entry.result, cfg) {
        Ok(()) => Some(entry.result),
        Err(why) => {
            tracing::warn!(file = %path.display(), %why, "a tuning cache entry is not used; probing");
            None
        }
    }
}

/// Writes the result (to a temporary file first, so a crash leaves no half-written entry).
pub(super) fn store(cfg: &TuningConfig, key: &str, result: &DeviceTuning) -> std::io::Result<()> {
    private_dir(&dir(cfg))?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::tuning::probe::{Outcome, Probe};
    use crate::tuning::{Prefer, Source};

    fn probed(batch: usize) -> Probe {
        Probe {
            batch,
            outcome: Outcome::Ok,
            latency_ms: 1.5,
            rows_per_second: 1000.0,
            served_ms: 1.5,
            served_rows_per_second: 667.0,
            memory_used_bytes: 1 << 20,
            memory_limit_bytes: None,
            memory_estimated: false,
            error: None,
        }
    }

    fn result(chosen: usize) -> DeviceTuning {
        DeviceTuning {
            device: "cpu:0".into(),
            source: Source::Probe,
            chosen,
            reason: "test".into(),
            memory_source: "test".into(),
            probes: vec![probed(1), probed(2), probed(4)],
            baseline_memory_bytes: 0,
            duration_ms: 1.0,
            fixed_cost_ms: 0.5,
            max_good: 4,
            prefer: Some(Prefer::Smaller),
            key: None,
            warmup: Vec::new(),
            earlier: None,
        }
    }

    /// Issue 24, finding 4: an entry edited to `"chosen": 100000000` was served as that batch
    /// size; now every value is checked against the config, and a folder that another user may
    /// write is not used.
    #[test]
    fn edited_entries_and_folders_others_may_write_are_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = TuningConfig {
            cache_dir: Some(tmp.path().join("cache")),
            max_batch_cap: 64,
            ..TuningConfig::default()
        };
        store(&cfg, "k", &result(4)).unwrap();
        assert_eq!(load(&cfg, "k").map(|t| t.chosen), Some(4));
        let mode = std::fs::metadata(tmp.path().join("cache"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "the folder is created private");

        let path = file(&cfg, "k");
        let edit = |from: &str, to: &str| {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(from), "{text}");
            std::fs::write(&path, text.replace(from, to)).unwrap();
        };
        edit("\"chosen\": 4", "\"chosen\": 100000000");
        assert!(load(&cfg, "k").is_none(), "a chosen size over the cap");
        edit("\"chosen\": 100000000", "\"chosen\": 3");
        assert!(load(&cfg, "k").is_none(), "a chosen size never probed");
        edit("\"chosen\": 3", "\"chosen\": 0");
        assert!(load(&cfg, "k").is_none(), "a chosen size of 0");
        edit("\"chosen\": 0", "\"chosen\": 2");
        assert_eq!(load(&cfg, "k").map(|t| t.chosen), Some(2), "2 was probed");
        edit("\"max_good\": 4", "\"max_good\": 100000");
        assert!(
            load(&cfg, "k").is_none(),
            "a refinement ceiling over the cap"
        );
        edit("\"max_good\": 100000", "\"max_good\": 3");
        assert!(
            load(&cfg, "k").is_none(),
            "a refinement ceiling that was never probed"
        );
        edit("\"max_good\": 3", "\"max_good\": 4");
        let mut none_probed = result(4);
        none_probed.probes.clear();
        none_probed.max_good = 1_000_000;
        assert!(
            plausible(&none_probed, &cfg).is_err(),
            "a ceiling with no probes"
        );
        none_probed.max_good = 0;
        assert!(plausible(&none_probed, &cfg).is_ok());
        edit("\"latency_ms\": 1.5", "\"latency_ms\": -1.5");
        assert!(load(&cfg, "k").is_none(), "a negative latency");

        // A folder others may write: neither read nor written.
        std::fs::set_permissions(
            tmp.path().join("cache"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        edit("\"latency_ms\": -1.5", "\"latency_ms\": 1.5");
        assert!(load(&cfg, "k").is_none(), "a world-writable folder is read");
        assert!(store(&cfg, "k", &result(4)).is_err());

        // With no folder configured, the default is this user's, not a fixed name in /tmp.
        let default = crate::config::default_cache_dir();
        assert_ne!(default, std::env::temp_dir().join("ortserve-tuning"));
    }

    /// Issue 25: results of the old probe (the session run alone, no served figures) are probed
    /// again, not read with their new fields missing: the method is part of the key.
    #[test]
    fn results_of_another_probe_method_do_not_match() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = TuningConfig {
            cache_dir: Some(tmp.path().join("cache")),
            ..TuningConfig::default()
        };
        let model = tmp.path().join("m.onnx");
        std::fs::write(&model, b"model").unwrap();
        let plan = DevicePlan {
            device: "cpu:0".into(),
            instance: 0,
            kind: crate::device::DeviceKind::Cpu {
                intra_op_threads: 1,
                spinning: false,
            },
        };
        let key = |prefer, handling| {
            let cores = Cores { prefer, handling };
            cache_key(&model, "cpu:0", &plan, None, "1.22", &cfg, cores).unwrap()
        };
        let smaller = key(Prefer::Smaller, 1.0);
        assert!(smaller.contains(" probe=4 "), "{smaller}");
        // The other end of the tied sizes, or other cores for request handling, is another
        // result.
        let larger = key(Prefer::Larger, 1.0);
        assert_ne!(smaller, larger);
        assert_ne!(smaller, key(Prefer::Smaller, 3.0));
        store(&cfg, &larger, &result(4)).unwrap();
        assert!(
            load(&cfg, &smaller).is_none(),
            "a result for the other end is not read"
        );
        let key = smaller;
        let old_key = key.replace(" probe=4", "");
        for older in 2..4 {
            let method_key = key.replace(" probe=4 ", &format!(" probe={older} "));
            store(&cfg, &method_key, &result(4)).unwrap();
            assert!(
                load(&cfg, &key).is_none(),
                "an entry of probe method {older} is not read"
            );
        }
        store(&cfg, &old_key, &result(4)).unwrap();
        assert!(load(&cfg, &old_key).is_some());
        assert!(load(&cfg, &key).is_none(), "an old entry is not read");
        let shared_file = tmp.path().join("results.json");
        let entry = serde_json::json!([{"model": "m", "key": old_key, "result": result(4)}]);
        std::fs::write(&shared_file, entry.to_string()).unwrap();
        assert!(matches!(
            shared(&shared_file, &key),
            Shared::NoMatch { entries: 1 }
        ));
    }

    /// A result opened with one thread fewer carries the result with every thread that decided
    /// it (`earlier`): `tuning.results_file` answers that key too, so a start that looks it up
    /// first does not probe (the CI run of f1a6fc8 did, and served another size).
    #[test]
    fn the_shared_file_answers_the_result_that_decided_one_thread_fewer() {
        let tmp = tempfile::tempdir().unwrap();
        let mut first = result(4);
        first.key = Some("threads=2".into());
        let mut last = result(2);
        last.key = Some("threads=1".into());
        last.earlier = Some(Box::new(first));
        let file = tmp.path().join("results.json");
        let entry = serde_json::json!([{"model": "m", "key": "threads=1", "result": last}]);
        std::fs::write(&file, entry.to_string()).unwrap();
        for (key, chosen) in [("threads=2", 4), ("threads=1", 2)] {
            match shared(&file, key) {
                Shared::Found(hit) => {
                    assert_eq!(hit.chosen, chosen, "{key}");
                    assert!(hit.earlier.is_none(), "{key}");
                }
                _ => panic!("{key} not found"),
            }
        }
        assert!(matches!(
            shared(&file, "threads=3"),
            Shared::NoMatch { entries: 1 }
        ));
    }
}
