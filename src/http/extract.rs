//! What the routes read from a request besides their own body format: the body within the
//! limit, the content type, the request id and the client's deadline.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use tokio::time::Instant;

use crate::app::AppState;
use crate::app::Call;
use crate::http::ApiError;

/// Body bytes a request holds against the server's `max_body_memory`; released on drop (when
/// the handler is done with the body).
#[derive(Default)]
pub(crate) struct BodyMemory(Option<tokio::sync::OwnedSemaphorePermit>);

impl BodyMemory {
    /// Takes `n` more bytes of the budget, waiting for other bodies to finish until `until`.
    async fn take(&mut self, app: &AppState, n: usize, until: Instant) -> Result<(), ApiError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let sem = app.body_memory.clone();
        let permit = match sem.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => tokio::time::timeout_at(until, sem.acquire_many_owned(n))
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or_else(|| {
                    ApiError::Unavailable(
                        "the server is holding as many request bodies as it may; retry".into(),
                    )
                })?,
        };
        match &mut self.0 {
            Some(held) => held.merge(permit),
            None => self.0 = Some(permit),
        }
        Ok(())
    }
}

/// When the body must have arrived: `body_timeout` after the request's start, or its deadline
/// when that is sooner.
fn body_deadline(app: &AppState, call: &Call) -> Instant {
    let start = call.started.unwrap_or_else(Instant::now);
    call.deadline(app.request_timeout)
        .min(start + app.body_timeout)
}

/// Reads the body frame by frame into `sink`: within the limit (by Content-Length first, then
/// as it streams), by its deadline (408 after; a client sending slowly holds nothing for
/// longer), and within the server's body memory.
pub(crate) async fn read_frames(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    call: &Call,
    mut sink: impl FnMut(Bytes),
) -> Result<BodyMemory, ApiError> {
    use http_body_util::BodyExt;
    let limit = app.max_body_bytes;
    declared_length(headers, limit)?;
    let until = body_deadline(app, call);
    let mut held = BodyMemory::default();
    let mut seen: u64 = 0;
    let mut body = body;
    loop {
        // A frame already there needs no timer (the common small body: its only frame and its
        // end are in hand at once).
        let next = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(ready) => Ok(ready),
            None => tokio::time::timeout_at(until, body.frame()).await,
        };
        let frame = match next {
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} ms",
                    until
                        .saturating_duration_since(call.started.unwrap_or(until))
                        .as_millis()
                )))
            }
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(unreadable)?,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        seen += chunk.len() as u64;
        if seen > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        held.take(app, chunk.len(), until).await?;
        sink(chunk);
    }
    Ok(held)
}

/// Reads the whole body (see [`read_frames`]). A body that came in one frame is not copied.
pub(crate) async fn read_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    call: &Call,
) -> Result<(Bytes, BodyMemory), ApiError> {
    let mut first: Option<Bytes> = None;
    let mut rest = bytes::BytesMut::new();
    let held = read_frames(app, headers, body, call, |chunk| match &first {
        None if rest.is_empty() => first = Some(chunk),
        _ => {
            if let Some(f) = first.take() {
                rest.extend_from_slice(&f);
            }
            rest.extend_from_slice(&chunk);
        }
    })
    .await?;
    Ok((first.unwrap_or_else(|| rest.freeze()), held))
}

/// Bodies from this size on are decoded on the preprocessing pool, not on an async worker.
const BIG_BODY: usize = 256 << 10;

/// Runs `parse` over a body of `len` bytes: on the preprocessing pool for a big body (so a
/// 16 MiB body does not hold an async worker, or the health probes behind it), inline otherwise.
pub(crate) async fn decode<T: Send + 'static>(
    app: &AppState,
    call: &Call,
    len: usize,
    parse: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if len < BIG_BODY {
        return parse();
    }
    app.off_workers(call.deadline(app.request_timeout), parse)
        .await?
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
        started: Some(tokio::time::Instant::now()),
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
