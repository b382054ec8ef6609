//! Server metadata, liveness, readiness and metrics: open routes for probes and scrapers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::{ApiError, CallError};
use ortserve_core::app::AppState;

/// `GET /v2`: server name, version and protocol extensions.
pub(crate) async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "ortserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository", "statistics"],
    }))
}

/// `GET /v2/health/live`, `/healthz`: the process answers.
pub(crate) async fn live() -> Json<serde_json::Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`, `/readyz`: 200 when every model can take requests and the server is
/// not draining, else 503.
pub(crate) async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let ready = app.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": ready, "draining": app.is_draining()})),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text. Device health and GPU readings are taken at scrape time.
pub(crate) async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.render_metrics().await,
    )
        .into_response()
}

/// `GET /openapi.yaml`: the OpenAPI 3 description of every route (docs/openapi.yaml, built in).
pub(crate) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../../../docs/openapi.yaml"),
    )
        .into_response()
}

pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(CallError::NotFound(format!(
        "no route {}; see README.md for the API",
        uri.path()
    )))
}
