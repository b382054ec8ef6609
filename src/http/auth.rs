//! Bearer-token auth for the model routes, when `server.auth` configures tokens.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;

use super::ApiError;

/// Equal-length byte strings compared without an early exit, so the time taken does not tell
/// how many leading bytes of a guess were right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lets the request through when it carries one of the configured tokens (the router adds this
/// layer only when there are tokens; with none it lets everything through).
pub(super) async fn require_token(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if app.tokens.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    // Every configured token is compared, so the time does not tell which one matched.
    let ok = given.is_some_and(|g| {
        app.tokens
            .iter()
            .fold(false, |found, t| same(g.as_bytes(), t.as_bytes()) | found)
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn compares_whole_strings() {
        assert!(same(b"secret-token-123", b"secret-token-123"));
        assert!(!same(b"secret-token-123", b"secret-token-124"));
        assert!(!same(b"secret-token-12", b"secret-token-123"));
        assert!(!same(b"", b"x"));
    }
}
