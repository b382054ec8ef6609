//! `serve --model-dir DIR`: KServe's model contract. KServe downloads an InferenceService's
//! `storageUri` into a folder (`/mnt/models`) and names the model in the runtime's arguments.
//! The folder holds either
//! - one `*.onnx` file, served as `--model-name` (else the file's stem), with an optional
//!   `labels.txt` and `ortserve.yaml` beside it; or
//! - a repository: `DIR/NAME/model.onnx`, each with an optional `labels.txt` and `ortserve.yaml`
//!   (that model's settings: devices, batching, tuning, image, classification, ...);
//!   `--model-name` then picks one of them. A model folder may instead hold versions,
//!   `DIR/NAME/VERSION/model.onnx` with VERSION a positive whole number (Triton's layout); its
//!   `labels.txt` and `ortserve.yaml` stay in `DIR/NAME`, and `version_policy` there picks the
//!   versions served ([`versions_of`]).
//!
//! `ortserve.yaml` holds one entry of the config file's `models` list without `name` and `path`
//! (they come from the folder), checked the same way; its relative paths are relative to its
//! folder. A `labels.txt` is the classifier's labels unless `ortserve.yaml` names others.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::{parse_value, ConfigError, ModelConfig};

/// A repository model's file, in its folder.
pub const MODEL_FILE: &str = "model.onnx";
/// A model's settings, beside its `.onnx` file.
pub const SETTINGS_FILE: &str = "ortserve.yaml";
/// A classifier's labels, beside its `.onnx` file.
pub const LABELS_FILE: &str = "labels.txt";

fn problem(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::ModelDir {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The models `dir` holds (see the module's documentation).
pub fn models_in_dir(dir: &Path, name: Option<&str>) -> Result<Vec<ModelConfig>, ConfigError> {
    // Absolute, so the model paths do not depend on the working folder (and a settings file's
    // relative paths are resolved against its folder once).
    let dir = &std::path::absolute(dir).map_err(|e| problem(dir, e.to_string()))?;
    let entries = std::fs::read_dir(dir).map_err(|e| problem(dir, format!("cannot read: {e}")))?;
    let (mut files, mut folders) = (Vec::new(), Vec::new());
    for entry in entries {
        let path = entry
            .map_err(|e| problem(dir, format!("cannot read: {e}")))?
            .path();
        if path.is_dir() && (path.join(MODEL_FILE).is_file() || is_versioned(&path)) {
            folders.push(path);
        } else if path.is_file() && path.extension().is_some_and(|e| e == "onnx") {
            files.push(path);
        }
    }
    files.sort();
    folders.sort();
    let listed = |paths: &[PathBuf]| {
        paths
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (files.as_slice(), folders.is_empty()) {
        ([], true) => Err(problem(
            dir,
            format!(
                "no model: expected one .onnx file, or folders NAME/{MODEL_FILE} or \
                 NAME/VERSION/{MODEL_FILE}"
            ),
        )),
        ([file], true) => {
            let stem = file.file_stem().unwrap_or_default().to_string_lossy();
            Ok(vec![model(name.unwrap_or(&stem), file, dir)?])
        }
        ([_], false) => Err(problem(
            dir,
            format!(
                "both a model file ({}) and model folders ({}): keep one layout",
                listed(&files),
                listed(&folders)
            ),
        )),
        ([_, _, ..], _) => Err(problem(
            dir,
            format!(
                "{} .onnx files ({}): keep one, or put each in its own folder NAME/{MODEL_FILE}",
                files.len(),
                listed(&files)
            ),
        )),
        ([], false) => {
            let named = |p: &PathBuf| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            };
            let chosen: Vec<&PathBuf> = match name {
                Some(n) => folders.iter().filter(|p| named(p) == n).collect(),
                None => folders.iter().collect(),
            };
            if chosen.is_empty() {
                return Err(problem(
                    dir,
                    format!(
                        "no model named {:?}; the folder has {}",
                        name.unwrap_or_default(),
                        listed(&folders)
                    ),
                ));
            }
            chosen
                .into_iter()
                .map(|folder| {
                    // A versioned folder is the model's path; its versions are found at load.
                    let path = if folder.join(MODEL_FILE).is_file() {
                        folder.join(MODEL_FILE)
                    } else {
                        folder.clone()
                    };
                    model(&named(folder), &path, folder)
                })
                .collect()
        }
    }
}

/// A version folder's number: a positive whole number, written without a leading zero.
fn version_number(folder: &Path) -> Option<u64> {
    let name = folder.file_name()?.to_str()?;
    let n = name.parse::<u64>().ok().filter(|&n| n > 0)?;
    (n.to_string() == name).then_some(n)
}

/// Whether `folder` holds versions (`VERSION/model.onnx`).
fn is_versioned(folder: &Path) -> bool {
    std::fs::read_dir(folder).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| version_number(&e.path()).is_some() && e.path().join(MODEL_FILE).is_file())
    })
}

/// The versions of model `m` to serve, one entry each: for a versioned folder, its
/// `VERSION/model.onnx` files that `version_policy` chooses (none when it has none yet), each
/// with its `version` and `path`; a model file is served as it is.
pub fn versions_of(m: &ModelConfig) -> Result<Vec<ModelConfig>, ConfigError> {
    if !m.path.is_dir() {
        return Ok(vec![m.clone()]);
    }
    let entries =
        std::fs::read_dir(&m.path).map_err(|e| problem(&m.path, format!("cannot read: {e}")))?;
    let mut present = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if let Some(n) = version_number(&path) {
            if path.join(MODEL_FILE).is_file() {
                present.push(n);
            }
        }
    }
    let policy = m.version_policy.clone().unwrap_or_default();
    Ok(policy
        .choose(&present)
        .into_iter()
        .map(|n| ModelConfig {
            version: n.to_string(),
            path: m.path.join(n.to_string()).join(MODEL_FILE),
            version_policy: None,
            ..m.clone()
        })
        .collect())
}

/// One model: `onnx` served as `name`, with the settings and labels found in `folder`.
fn model(name: &str, onnx: &Path, folder: &Path) -> Result<ModelConfig, ConfigError> {
    let settings_path = folder.join(SETTINGS_FILE);
    let mut settings = match std::fs::read_to_string(&settings_path) {
        Ok(text) => match serde_yaml_ng::from_str::<Value>(&text)
            .map_err(|e| problem(&settings_path, e.to_string()))?
        {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(problem(
                    &settings_path,
                    "expected a mapping of model settings",
                ))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Mapping::new(),
        Err(e) => return Err(problem(&settings_path, format!("cannot read: {e}"))),
    };
    for key in ["name", "path"] {
        if settings.contains_key(key) {
            return Err(problem(
                &settings_path,
                format!("{key}: comes from the folder (--model-dir, --model-name); remove it"),
            ));
        }
    }
    settings.insert("name".into(), name.into());
    settings.insert("path".into(), onnx.to_string_lossy().into_owned().into());
    let labels = folder.join(LABELS_FILE);
    if labels.is_file() {
        let labels = Value::from(labels.to_string_lossy().into_owned());
        match settings.get_mut("classification") {
            Some(Value::Mapping(c)) if !c.contains_key("labels") => {
                c.insert("labels".into(), labels);
            }
            Some(_) => {}
            None => {
                let mut c = Mapping::new();
                c.insert("labels".into(), labels);
                settings.insert("classification".into(), Value::Mapping(c));
            }
        }
    }
    let mut model: ModelConfig = parse_value(Value::Mapping(settings)).map_err(|e| match e {
        ConfigError::Parse { path, message } => {
            problem(&settings_path, format!("{path}: {message}"))
        }
        other => other,
    })?;
    model.resolve_paths(folder);
    Ok(model)
}
