//! Server metadata, liveness, readiness and metrics: open routes for probes and scrapers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;
use crate::http::ApiError;

/// `GET /v2`: server name, version and protocol extensions.
pub async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "ortserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// `GET /v2/health/live`, `/healthz`: the process answers.
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready`, `/readyz`: 200 when every model can take requests and the server is
/// not draining, else 503.
pub async fn ready(State(app): State<Arc<AppState>>) -> Response {
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

/// `GET /metrics`: Prometheus text. Device health is read from the dispatchers at scrape time.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut on_gpu = false;
    for m in app.models() {
        for d in m.pool.devices() {
            let labels = [m.name.as_str(), d.name.as_str()];
            app.metrics
                .device_healthy
                .with_label_values(&labels)
                .set(i64::from(d.is_healthy()));
            app.metrics
                .inflight_rows
                .with_label_values(&labels)
                .set(d.inflight_rows() as i64);
            on_gpu |= d.name.starts_with("cuda:");
        }
    }
    if on_gpu {
        let readings = tokio::task::spawn_blocking(crate::tuning::gpu_readings)
            .await
            .unwrap_or_default();
        for (gpu, used, total, util) in readings {
            let label = gpu.to_string();
            app.metrics
                .gpu_memory_used
                .with_label_values(&[&label])
                .set(used as i64);
            app.metrics
                .gpu_memory_total
                .with_label_values(&[&label])
                .set(total as i64);
            app.metrics
                .gpu_utilization
                .with_label_values(&[&label])
                .set(i64::from(util));
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {}; see README.md for the API",
        uri.path()
    ))
}
