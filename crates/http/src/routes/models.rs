//! Model metadata and model readiness.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::{ApiError, CallError};
use ortserve_core::app::{AppState, Model};
use ortserve_core::model::TensorInfo;

/// Finds a model, and checks the version when the URL names one.
pub(crate) fn lookup<'a>(
    app: &'a AppState,
    model: &str,
    version: Option<&str>,
) -> Result<&'a Model, CallError> {
    let Some(m) = app.model(model) else {
        // Configured but not loaded yet (loading and tuning at startup): 503, which clients and
        // balancers retry; 404 is for names that are not configured, which they do not.
        return Err(match app.configured_version(model) {
            None => CallError::ModelNotFound(model.to_string()),
            Some(configured) if version.is_some_and(|v| v != configured) => {
                CallError::VersionNotFound {
                    model: model.to_string(),
                    version: version.unwrap_or_default().to_string(),
                }
            }
            Some(_) => CallError::Unavailable(format!(
                "model {model:?} is loading; it is served once it is loaded and tuned"
            )),
        });
    };
    match version {
        Some(v) if v != m.version() => Err(CallError::VersionNotFound {
            model: model.to_string(),
            version: v.to_string(),
        }),
        _ => Ok(m),
    }
}

fn describe(t: &TensorInfo) -> serde_json::Value {
    json!({"name": t.name, "datatype": t.dtype.v2_name(), "shape": t.dims})
}

fn metadata_of(m: &Model) -> Json<serde_json::Value> {
    Json(json!({
        "name": m.name(),
        "versions": [m.version()],
        "platform": "onnxruntime_onnx",
        "inputs": m.info().inputs.iter().map(describe).collect::<Vec<_>>(),
        "outputs": m.info().outputs.iter().map(describe).collect::<Vec<_>>(),
        "devices": m.devices().iter().map(|d| json!({
            "name": d.name,
            "healthy": d.healthy,
            "max_batch_size": d.max_batch,
            "measured_rows_per_second": d.rows_per_second,
        })).collect::<Vec<_>>(),
    }))
}

/// `GET /v2/models/{model}`
pub(crate) async fn metadata(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(metadata_of(lookup(&app, &model, None)?))
}

/// `GET /v2/models/{model}/versions/{version}`
pub(crate) async fn metadata_version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(metadata_of(lookup(&app, &model, Some(&version))?))
}

fn ready_of(app: &AppState, m: &Model) -> Response {
    let ready = m.is_ready() && !app.is_draining();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"name": m.name(), "ready": ready}))).into_response()
}

/// `GET /v2/models/{model}/ready`
pub(crate) async fn ready(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    Ok(ready_of(&app, lookup(&app, &model, None)?))
}

/// `GET /v2/models/{model}/versions/{version}/ready`
pub(crate) async fn ready_version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(ready_of(&app, lookup(&app, &model, Some(&version))?))
}

/// `GET /v1/models/{model}/tuning`: per device, every probed size (run and served time, rows/s,
/// memory), the chosen size and why, the fixed cost measured, and the cap now with what
/// `tuning.refine` changed.
pub(crate) async fn tuning(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let m = lookup(&app, &model, None)?;
    let live = m.devices();
    let devices: Vec<serde_json::Value> = m
        .tuning()
        .iter()
        .map(|t| {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            let now = live.iter().find(|d| d.name == t.device);
            if let (Some(obj), Some(d)) = (v.as_object_mut(), now) {
                obj.insert("max_batch_size_now".into(), json!(d.max_batch));
                obj.insert("refine".into(), json!(d.refine));
            }
            v
        })
        .collect();
    Ok(Json(json!({"model": m.name(), "devices": devices})))
}
