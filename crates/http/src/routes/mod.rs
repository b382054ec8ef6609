//! One file per endpoint group.

pub(crate) mod health;
pub(crate) mod infer;
pub(crate) mod models;
pub(crate) mod predict;

use std::time::Instant;

use axum::response::Response;

use ortserve_core::app::AppState;

/// Counts an answered request and its duration. Only known model names become label values, so
/// clients cannot grow the label set.
pub(crate) fn record(
    app: &AppState,
    model: &str,
    route: &str,
    response: &Response,
    started: Instant,
) {
    let label = if app.configured_version(model).is_some() {
        model
    } else {
        ""
    };
    app.metrics
        .requests
        .with_label_values(&[label, route, response.status().as_str()])
        .inc();
    app.metrics
        .request_duration
        .with_label_values(&[label, route])
        .observe(started.elapsed().as_secs_f64());
}
