//! HTTP: the router, its tower layers, the V2 codec and the one error table. The only module
//! that imports axum and tower-http.

mod auth;
pub mod error;
pub mod hello;
mod routes;
pub mod v2;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;

pub use error::ApiError;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route, with request ids, tracing and panic catching. Body limits are enforced by the
/// handlers so that a too-large body gets our JSON error.
pub fn router(state: Arc<AppState>) -> Router {
    // Model routes: behind bearer-token auth when it is configured.
    let models = Router::new()
        .route("/v2/models/{model}", get(routes::models::metadata))
        .route("/v2/models/{model}/ready", get(routes::models::ready))
        .route("/v2/models/{model}/infer", post(routes::infer::infer))
        .route("/v1/models/{model}/tuning", get(routes::models::tuning))
        .route("/v1/models/{target}", post(routes::predict::predict))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(routes::models::metadata_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(routes::models::ready_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(routes::infer::infer_version),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    // Probes and scrapers: always open.
    Router::new()
        .route("/v2", get(routes::health::server_metadata))
        .route("/v2/health/live", get(routes::health::live))
        .route("/v2/health/ready", get(routes::health::ready))
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .route("/metrics", get(routes::health::metrics))
        .merge(models)
        .fallback(routes::health::not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                })
                // 5xx answers are logged where they arise, with their cause.
                .on_failure(()))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(|_| {
                    axum::response::IntoResponse::into_response(ApiError::Internal)
                })),
        )
        .with_state(state)
}
