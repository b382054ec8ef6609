//! Bearer-token auth for the model routes, when `server.auth` configures tokens: the header
//! handed to the request core's check (`ortserve_core::call::authorize`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use ortserve_core::app::AppState;

use super::ApiError;
use ortserve_core::call::authorize;

/// Lets the request through when it carries one of the configured tokens (the router adds this
/// layer only when there are tokens; with none it lets everything through).
pub(super) async fn require_token(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match authorize(&app, given) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError(e).into_response(),
    }
}
