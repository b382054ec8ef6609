//! Bearer-token auth for the model routes, when `server.auth` configures tokens.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use ortserve_core::app::AppState;

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
        .and_then(bearer_token);
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

/// The token of an `Authorization: Bearer <token>` value; the scheme's case does not matter
/// (RFC 9110 section 11.1), and spaces around the token are dropped.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, same};

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "BeArEr  abc "] {
            assert_eq!(bearer_token(v), Some("abc"), "{v:?}");
        }
        for v in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn compares_whole_strings() {
        assert!(same(b"secret-token-123", b"secret-token-123"));
        assert!(!same(b"secret-token-123", b"secret-token-124"));
        assert!(!same(b"secret-token-12", b"secret-token-123"));
        assert!(!same(b"", b"x"));
    }
}
