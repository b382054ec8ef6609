//! `serve --model-dir DIR`: KServe's model contract. KServe downloads an InferenceService's
//! `storageUri` into a folder (`/mnt/models`) and names the model in the runtime's arguments.
//! The folder holds either
//! - one `*.onnx` file, served as `--model-name` (else the file's stem), with an optional
//!   `labels.txt` and `ortserve.yaml` beside it; or
//! - a repository: `DIR/NAME/model.onnx`, each with an optional `labels.txt` and `ortserve.yaml`
//!   (that model's settings: devices, batching, tuning, image, classification, ...);
//!   `--model-name` then picks one of them.
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
        if path.is_dir() && path.join(MODEL_FILE).is_file() {
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
            format!("no model: expected one .onnx file, or folders NAME/{MODEL_FILE}"),
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
                .map(|folder| model(&named(folder), &folder.join(MODEL_FILE), folder))
                .collect()
        }
    }
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
