//! The V2 statistics extension (as Triton serves it, so `tritonclient`'s
//! `get_inference_statistics` reads it): `GET /v2/models/stats`, `/v2/models/{m}/stats` and
//! `/v2/models/{m}/versions/{v}/stats`, from the core's per-model counts.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::ApiError;
use ortserve_core::app::{AppState, Model};

fn tally((count, ns): (u64, u64)) -> Value {
    json!({"count": count, "ns": ns})
}

/// One model version's entry (`compute_input` and `compute_output`: see
/// [`ortserve_core::stats::Snapshot`]).
fn entry(m: &Model) -> Value {
    let s = m.stats().snapshot();
    let zero = |count| tally((count, 0));
    json!({
        "name": m.name(),
        "version": m.version(),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": tally(s.success),
            "fail": tally(s.fail),
            "queue": tally(s.queue),
            "compute_input": zero(s.compute_infer.0),
            "compute_infer": tally(s.compute_infer),
            "compute_output": zero(s.compute_infer.0),
            "cache_hit": zero(0),
            "cache_miss": zero(0),
        },
        "batch_stats": s.batches.into_iter().map(|(size, runs, ns)| json!({
            "batch_size": size,
            "compute_input": zero(runs),
            "compute_infer": tally((runs, ns)),
            "compute_output": zero(runs),
        })).collect::<Vec<_>>(),
    })
}

fn answer(models: Vec<Arc<Model>>) -> Json<Value> {
    Json(json!({"model_stats": models.iter().map(|m| entry(m)).collect::<Vec<_>>()}))
}

/// `GET /v2/models/stats`: every served model and version.
pub(crate) async fn all(State(app): State<Arc<AppState>>) -> Json<Value> {
    answer(app.models())
}

/// `GET /v2/models/{model}/stats`: each served version of the model.
pub(crate) async fn model(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(answer(app.served_versions(&model)?))
}

/// `GET /v2/models/{model}/versions/{version}/stats`.
pub(crate) async fn version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(answer(vec![app.lookup(&model, Some(&version))?]))
}
