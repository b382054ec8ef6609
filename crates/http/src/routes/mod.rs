//! One file per endpoint group.

pub(crate) mod health;
pub(crate) mod infer;
pub(crate) mod models;
pub(crate) mod predict;
pub(crate) mod repository;
pub(crate) mod stats;

use std::time::Instant;

use axum::response::Response;

use ortserve_core::app::AppState;

/// Counts an answered request and its duration in the request core's metrics, labelled
/// `protocol="http"`.
pub(crate) fn record(
    app: &AppState,
    model: &str,
    route: &str,
    response: &Response,
    started: Instant,
) {
    ortserve_core::call::record(
        app,
        "http",
        model,
        route,
        response.status().as_str(),
        started,
    );
}
