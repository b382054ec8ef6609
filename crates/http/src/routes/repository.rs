//! The V2 repository extension: `POST /v2/repository/index`, `POST
//! /v2/repository/models/{m}/load` and `/unload`, over the core's lifecycle. Load and unload
//! answer 200 with an empty body when done, as Triton does; they need
//! `server.model_control: explicit`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::extract::{self, read_body};
use crate::{ApiError, CallError};
use ortserve_core::app::AppState;
use ortserve_core::lifecycle;

/// The index request: `{}` or `{"ready": true}`; an empty body counts as `{}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
    /// Triton's field; ortserve has one repository, so any name lists it.
    #[serde(default, rename = "repository_name")]
    _repository_name: Option<serde::de::IgnoredAny>,
}

pub(crate) async fn index(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match index_of(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => ApiError(e).into_response(),
    };
    super::record(&app, "", "v2_repository_index", &response, started);
    response
}

async fn index_of(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, CallError> {
    let call = extract::call(headers)?;
    let (bytes, _held) = read_body(app, headers, body, &call).await?;
    let req: IndexRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::MalformedBody(format!("repository index request: {e}")))?
    };
    let entries: Vec<_> = lifecycle::index(app, req.ready)
        .into_iter()
        .map(|e| {
            json!({
                "name": e.name,
                "version": e.version,
                "state": e.state.as_str(),
                "reason": e.reason,
            })
        })
        .collect();
    Ok(Json(entries).into_response())
}

pub(crate) async fn load(State(app): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    let started = Instant::now();
    let response = answer(lifecycle::load(&app, &model).await);
    super::record(&app, &model, "v2_repository_load", &response, started);
    response
}

pub(crate) async fn unload(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Response {
    let started = Instant::now();
    let response = answer(lifecycle::unload(&app, &model).await);
    super::record(&app, &model, "v2_repository_unload", &response, started);
    response
}

fn answer(done: Result<(), CallError>) -> Response {
    match done {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}
