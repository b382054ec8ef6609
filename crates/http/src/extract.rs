//! What the routes read from a request besides their own body format: the body within the
//! limit, the content type, the request id and the client's deadline.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};

use crate::CallError;
use ortserve_core::app::AppState;
use ortserve_core::app::Call;

pub(crate) use ortserve_core::call::BodyMemory;
pub(crate) use ortserve_core::gather::Gather;

/// Reads the body frame by frame into `sink`: within the limit (by Content-Length first, then
/// as it streams), by its deadline (408 after; a client sending slowly holds nothing for
/// longer), and within the server's body memory. `sink` also gets the declared length (0 when
/// there is none), to cap a buffer's growth, never to size it up front.
pub(crate) async fn read_frames<'a>(
    app: &'a AppState,
    headers: &HeaderMap,
    body: Body,
    call: &Call,
    sink: impl FnMut(Bytes, usize),
) -> Result<BodyMemory<'a>, CallError> {
    use tracing::Instrument;
    read_frames_untraced(app, headers, body, call, sink)
        .instrument(tracing::debug_span!("body_read"))
        .await
}

async fn read_frames_untraced<'a>(
    app: &'a AppState,
    headers: &HeaderMap,
    body: Body,
    call: &Call,
    mut sink: impl FnMut(Bytes, usize),
) -> Result<BodyMemory<'a>, CallError> {
    use http_body_util::BodyExt;
    let limit = app.max_body_bytes;
    let declared = declared_length(headers, limit)?
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let until = call.body_deadline(app);
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
                return Err(CallError::RequestTimeout(format!(
                    "the request body did not arrive within {} ms",
                    until
                        .saturating_duration_since(call.started.unwrap_or(until))
                        .as_millis()
                )))
            }
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|e| body_error(e, limit))?,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        seen += chunk.len() as u64;
        if seen > limit {
            return Err(CallError::PayloadTooLarge { limit });
        }
        held.take(app, chunk.len())?;
        sink(chunk, declared);
    }
    Ok(held)
}

/// Reads the whole body (see [`read_frames`]) into one buffer, with [`Gather`].
pub(crate) async fn read_body<'a>(
    app: &'a AppState,
    headers: &HeaderMap,
    body: Body,
    call: &Call,
) -> Result<(Bytes, BodyMemory<'a>), CallError> {
    let mut bytes = Gather::default();
    let held = read_frames(app, headers, body, call, |chunk, declared| {
        bytes.push(chunk, declared)
    })
    .await?;
    Ok((bytes.finish(), held))
}

/// Runs `parse` over a body of `len` bytes: for a big body on the preprocessing pool's
/// low-priority threads (so a 16 MiB body does not hold an async worker, or the health probes
/// behind it), inline otherwise.
pub(crate) async fn decode<T: Send + 'static>(
    app: &AppState,
    call: &Call,
    len: usize,
    parse: impl FnOnce() -> Result<T, CallError> + Send + 'static,
) -> Result<T, CallError> {
    use tracing::Instrument;
    let span = tracing::debug_span!("decode", bytes = len);
    if len < ortserve_core::app::BACKGROUND_BYTES {
        return span.in_scope(parse);
    }
    app.in_background(call.deadline(app.request_timeout), parse)
        .instrument(span)
        .await?
}

/// The Content-Length, refused at once when it is over `limit`.
pub(crate) fn declared_length(headers: &HeaderMap, limit: u64) -> Result<Option<u64>, CallError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(CallError::PayloadTooLarge { limit }),
        other => Ok(other),
    }
}

/// A body read that failed: 413 when a chunk declared more than the limit (see `framing`),
/// 400 otherwise.
fn body_error(e: axum::Error, limit: u64) -> CallError {
    let e = e.into_inner();
    match e.downcast_ref::<crate::framing::ChunkTooLarge>() {
        Some(_) => CallError::PayloadTooLarge { limit },
        None => unreadable(e),
    }
}

pub(crate) fn unreadable(e: impl std::fmt::Display) -> CallError {
    CallError::MalformedBody(format!("could not read the request body: {e}"))
}

/// The request's id (set by the request-id layer before any handler runs).
fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(crate::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `X-Timeout-Ms`: the client's deadline in milliseconds (it can only shorten the server's).
fn header_timeout(headers: &HeaderMap) -> Result<Option<std::time::Duration>, CallError> {
    match headers.get("x-timeout-ms") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|ms| Some(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| {
                CallError::MalformedBody(
                    "X-Timeout-Ms must be a whole number of milliseconds".into(),
                )
            }),
    }
}

/// The core's per-request settings: the `X-Timeout-Ms` deadline and the request id.
pub(crate) fn call(headers: &HeaderMap) -> Result<Call, CallError> {
    Ok(Call::arrived(header_timeout(headers)?, request_id(headers)))
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
