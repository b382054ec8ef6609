//! `POST /v2/models/{model}[/versions/{version}]/infer`: JSON tensors or the binary extension.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::extract::{self, read_body, read_frames, BodyMemory};
use crate::routes::models::lookup;
use crate::{v2, ApiError, CallError};
use ortserve_core::app::AppState;
use ortserve_core::app::Call;

const HEADER_LEN: &str = "inference-header-content-length";

pub(crate) async fn infer(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, model, None, headers, body).await
}

pub(crate) async fn infer_version(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, model, Some(version), headers, body).await
}

async fn handle(
    app: Arc<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match run(&app, &model, version.as_deref(), &headers, body).await {
        Ok(r) => r,
        Err(e) => ApiError(e).into_response(),
    };
    super::record(&app, &model, "v2_infer", &response, started);
    response
}

/// Reads a binary-extension body as it streams in: the first `header_len` bytes into the JSON
/// header, the rest into the bytes the tensors will share (see [`v2::parse_parts`]). When the
/// tensor bytes arrive in one piece, as on a keep-alive connection whose read buffer has grown to
/// the requests' size, they are not copied at all; else once, from the connection's buffers (see
/// [`extract::Gather`]). The header's buffer grows with what has arrived: neither Content-Length
/// nor the header length is trusted to size it (a client could declare 16 MiB and send 11
/// bytes). Same limits as [`read_body`].
async fn read_binary_body<'a>(
    app: &'a AppState,
    headers: &HeaderMap,
    body: Body,
    header_len: usize,
    call: &Call,
) -> Result<(Vec<u8>, Bytes, BodyMemory<'a>), CallError> {
    let mut json = Vec::new();
    let mut binary = extract::Gather::default();
    let held = read_frames(app, headers, body, call, |mut chunk, declared| {
        if json.len() < header_len {
            let take = (header_len - json.len()).min(chunk.len());
            json.extend_from_slice(&chunk.split_to(take));
        }
        binary.push(chunk, declared.saturating_sub(header_len));
    })
    .await?;
    if json.len() < header_len {
        return Err(v2::header_too_long(header_len, json.len()));
    }
    Ok((json, binary.finish_detached_below(SMALL_TAIL), held))
}

/// Tensor bytes below this size are copied out of the connection's read buffer: a small tensor
/// waiting in a queue should not hold a whole read buffer alive.
const SMALL_TAIL: usize = 16 << 10;

/// JSON unless the binary header is there. No Content-Type counts as JSON (tritonclient sends
/// none), and so does curl's default for `-d` (`application/x-www-form-urlencoded`).
fn header_len(headers: &HeaderMap) -> Result<Option<usize>, CallError> {
    let mut given = headers.get_all(HEADER_LEN).iter();
    let (first, second) = (given.next(), given.next());
    if second.is_some() {
        return Err(CallError::MalformedBody(
            "Inference-Header-Content-Length is given more than once".into(),
        ));
    }
    let binary_len = match first {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    CallError::MalformedBody(
                        "Inference-Header-Content-Length must be a byte count".into(),
                    )
                })?,
        ),
    };
    let ctype = extract::content_type(headers);
    match (ctype.as_deref(), binary_len) {
        (_, Some(n)) => Ok(Some(n)),
        (None | Some("application/json" | "text/plain" | "application/x-www-form-urlencoded"), None) => Ok(None),
        (Some("application/octet-stream"), None) => Err(CallError::MalformedBody(
            "a binary body needs the Inference-Header-Content-Length header".into(),
        )),
        (Some(other), None) => Err(CallError::UnsupportedMediaType(format!(
            "content type {other:?} is not accepted here; send application/json or the binary tensor extension"
        ))),
    }
}

async fn run(
    app: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, CallError> {
    let mut call = extract::call(headers)?;
    let m = lookup(app, model, version)?;
    let (parsed, _held) = match header_len(headers)? {
        // The JSON is parsed off the async workers when it is big (the binary tail is taken
        // whole, not parsed).
        None => {
            let (bytes, held) = read_body(app, headers, body, &call).await?;
            let parsed = extract::decode(app, &call, bytes.len(), move || {
                v2::parse_parts(&bytes, Bytes::new())
            });
            (parsed.await?, held)
        }
        Some(n) => {
            let (json, binary, held) = read_binary_body(app, headers, body, n, &call).await?;
            let parsed = extract::decode(app, &call, json.len(), move || {
                v2::parse_parts(&json, binary)
            });
            (parsed.await?, held)
        }
    };
    // Resolve the requested outputs before running, so a typo costs no inference.
    let info = m.info();
    let selected: Vec<(usize, bool)> = match &parsed.outputs {
        None => (0..info.outputs.len())
            .map(|i| (i, parsed.binary_default))
            .collect(),
        Some(list) => list
            .iter()
            .map(|(name, binary)| {
                Ok((
                    info.output_index(name)
                        .map_err(|e| CallError::InvalidInput(e.to_string()))?,
                    *binary,
                ))
            })
            .collect::<Result<_, CallError>>()?,
    };
    call.timeout = parsed.timeout.or(call.timeout);
    let outputs = m.infer(parsed.inputs, &call).await?;
    let chosen: Vec<(&str, &ortserve_core::tensor::Tensor, bool)> = selected
        .iter()
        .map(|&(i, binary)| (info.outputs[i].name.as_str(), &outputs[i], binary))
        .collect();
    let enc = tracing::debug_span!("encode")
        .in_scope(|| v2::encode_response(m.name(), m.version(), parsed.id.as_deref(), &chosen));
    let mut resp = (StatusCode::OK, enc.body).into_response();
    let h = resp.headers_mut();
    match enc.header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(resp)
}
