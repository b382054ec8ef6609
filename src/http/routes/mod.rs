//! One file per endpoint group.

pub mod health;
pub mod infer;
pub mod models;
pub mod predict;

use std::time::Instant;

use axum::http::{header, HeaderMap};
use axum::response::Response;

use crate::app::AppState;

/// Counts an answered request and its duration. Only known model names become label values, so
/// clients cannot grow the label set.
pub fn record(app: &AppState, model: &str, route: &str, response: &Response, started: Instant) {
    let label = if app.model(model).is_some() {
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

/// The media type of the body, lower case, without parameters (`application/json`).
pub fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}
