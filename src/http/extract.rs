//! What the routes read from a request besides their own body format: the body within the
//! limit, the content type, the request id and the client's deadline.

use axum::body::Body;
use axum::http::{header, HeaderMap};

use crate::app::AppState;
use crate::app::Call;
use crate::http::ApiError;

/// Reads the whole body, refusing more than the limit (by Content-Length first, then as it streams).
pub(crate) async fn read_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let limit = app.max_body_bytes;
    declared_length(headers, limit)?;
    axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::PayloadTooLarge { limit }
            } else {
                unreadable(e)
            }
        })
}

/// The Content-Length, refused at once when it is over `limit`.
pub(crate) fn declared_length(headers: &HeaderMap, limit: u64) -> Result<Option<u64>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(ApiError::PayloadTooLarge { limit }),
        other => Ok(other),
    }
}

pub(crate) fn unreadable(e: impl std::fmt::Display) -> ApiError {
    ApiError::MalformedBody(format!("could not read the request body: {e}"))
}

/// The request's id (set by the request-id layer before any handler runs).
fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(crate::http::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `X-Timeout-Ms`: the client's deadline in milliseconds (it can only shorten the server's).
fn header_timeout(headers: &HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    match headers.get("x-timeout-ms") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|ms| Some(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| {
                ApiError::MalformedBody(
                    "X-Timeout-Ms must be a whole number of milliseconds".into(),
                )
            }),
    }
}

/// The core's per-request settings: the `X-Timeout-Ms` deadline and the request id.
pub(crate) fn call(headers: &HeaderMap) -> Result<Call, ApiError> {
    Ok(Call {
        timeout: header_timeout(headers)?,
        request_id: request_id(headers),
    })
}

/// The media type of the body, lower case, without parameters (`application/json`).
pub(crate) fn content_type(headers: &HeaderMap) -> Option<String> {
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
