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

/// Finds a model, and checks the version when the URL names one (the request core's lookup).
pub(crate) fn lookup(
    app: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<Arc<Model>, CallError> {
    app.lookup(model, version)
}

fn describe(t: &TensorInfo) -> serde_json::Value {
    json!({"name": t.name, "datatype": t.dtype.v2_name(), "shape": t.dims})
}

/// A model's metadata: `versions` lists every version served now, the rest is `m`'s.
fn metadata_of(app: &AppState, m: &Model) -> Json<serde_json::Value> {
    Json(json!({
        "name": m.name(),
        "versions": app.registry().versions(m.name()),
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
    let m = lookup(&app, &model, None)?;
    Ok(metadata_of(&app, &m))
}

/// `GET /v2/models/{model}/versions/{version}`
pub(crate) async fn metadata_version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let m = lookup(&app, &model, Some(&version))?;
    Ok(metadata_of(&app, &m))
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
    let m = lookup(&app, &model, None)?;
    Ok(ready_of(&app, &m))
}

/// `GET /v2/models/{model}/versions/{version}/ready`
pub(crate) async fn ready_version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let m = lookup(&app, &model, Some(&version))?;
    Ok(ready_of(&app, &m))
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
