//! The protocol-neutral core of a call, which every front door drives: the call's context
//! ([`Call`]: request id, deadline from arrival), bearer auth ([`authorize`]), the errors a
//! client can get ([`CallError`]) with a kind every protocol has a word for ([`ErrorKind`]), and
//! request metrics ([`record`], labelled with the protocol), and the body budget
//! ([`BodyMemory`], with [`Call::body_deadline`]). Admission (the model's queue, inside
//! [`Model::infer`](crate::app::Model::infer)) is the core's too.
//!
//! A front door parses its wire format, builds a [`Call`], calls the [`app`](crate::app)
//! façade, and maps a [`CallError`] to its own status codes in one table (the HTTP crate's
//! `error.rs`). docs/ARCHITECTURE.md, "Adding a front door", walks through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::app::{AppState, InferError};
use crate::codec::JsonError;

/// Per-request settings that travel with a request into the core.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The client's deadline; it can only shorten the server's default.
    pub timeout: Option<Duration>,
    /// The request's id (HTTP `x-request-id`), carried to the device's log lines.
    pub request_id: Option<String>,
    /// When the request arrived: its deadline counts from here, through reading the body,
    /// preprocessing, the queue and the run. `None` counts from when the core first sees it.
    pub started: Option<Instant>,
}

impl Call {
    /// A call that arrived now, with the client's timeout (if it gave one) and request id.
    pub fn arrived(timeout: Option<Duration>, request_id: Option<String>) -> Call {
        Call {
            timeout,
            request_id,
            started: Some(Instant::now()),
        }
    }

    /// When the request must be answered: its arrival plus its timeout, which can only
    /// shorten `default`.
    pub fn deadline(&self, default: Duration) -> Instant {
        let timeout = self.timeout.map_or(default, |t| t.min(default));
        self.started.unwrap_or_else(Instant::now) + timeout
    }
}

thread_local! {
    static BATCHER_CAN_START: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called on the thread that queued a request with a model whose device is free to run it,
/// slow enough per row to be worth starting at once, and able to run beside this thread (more
/// than one core; `DeviceSlot::worth_starting_now` in `dispatch`). The model's batcher, just
/// woken, would send the rows to the device as soon as it runs; but tokio runs a task woken on
/// a worker thread on that same thread, after the task that woke it gives the thread back, and
/// tells no other thread to take it. The model's request path calls it; public for front
/// doors' tests.
pub fn batcher_can_start() {
    BATCHER_CAN_START.with(|c| c.set(true));
}

/// Whether a request queued on this thread since the last look could start on a device now
/// (see [`batcher_can_start`]); looking clears it. A task that runs several requests itself
/// (a gRPC connection, which polls its own calls) looks after each one it queued and, when
/// it is set, gives the thread to the batcher before it decodes the next: the device starts
/// on the first while the connection reads the others, instead of waiting for all of them.
pub fn take_batcher_can_start() -> bool {
    BATCHER_CAN_START.with(|c| c.replace(false))
}

/// Ids for requests that come without one, in the UUID version 4 layout: 122 random bits drawn
/// once, with a counter added to the low 62, so each id is unique in this process and unlikely
/// to repeat another's. Making one is an atomic add; a random UUID per request would read the
/// kernel's random source (a system call) every time. One per server, shared by the front
/// doors (`AppState::request_ids`).
#[derive(Debug)]
pub struct RequestIds {
    base: u128,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        RequestIds::from_base(uuid::Uuid::new_v4().as_u128())
    }
}

impl RequestIds {
    fn from_base(base: u128) -> RequestIds {
        RequestIds {
            base,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The `n`th id.
    fn id(&self, n: u64) -> uuid::Uuid {
        const LOW: u128 = (1 << 62) - 1;
        let low = (self.base & LOW).wrapping_add(u128::from(n)) & LOW;
        // The version and variant bits of `base` are above the low 62 bits and stay as they are.
        uuid::Uuid::from_u128((self.base & !LOW) | low)
    }

    /// A new id, hyphenated, lower case.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.id(n).hyphenated().encode_lower(&mut text).to_string()
    }
}

/// The longest request id kept from a client, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (`telemetry.endpoint` set): the front doors read `traceparent`
/// and answer with one only then, so traces off cost one load per request. Set once at
/// startup by the binary, with the exporter.
pub fn traces_on() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
}

/// See [`traces_on`].
pub fn set_traces_on(on: bool) {
    TRACES_ON.store(on, Ordering::Relaxed);
}

/// Whether a client's request id may be used as it is (in logs, echoed back): 1 to
/// [`MAX_REQUEST_ID`] bytes of letters, digits and `-_.:/+=@~`, nothing that could forge or
/// break a log field. Front doors generate one instead of an id that is not.
pub fn usable_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@~".contains(c))
}

/// What kind of failure an error is, in words every protocol has (they follow gRPC's codes).
/// A front door maps [`CallError`]s to its own codes; the kind says what a client may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is wrong and will stay wrong: do not retry it as it is.
    InvalidArgument,
    /// No valid credentials.
    Unauthenticated,
    /// No such route, model or version.
    NotFound,
    /// The route or method exists, but not for this call.
    Unimplemented,
    /// The call's deadline (or the body's) passed.
    DeadlineExceeded,
    /// Over a limit: a queue (retry later) or a size (do not retry as it is).
    ResourceExhausted,
    /// Not ready, draining, or no healthy device: retry, elsewhere or later.
    Unavailable,
    /// A failure of the server's own; details are in its log, under the request id.
    Internal,
}

/// An error answered to a client, whatever the protocol. Messages are written for the client;
/// internal details are logged with the request id, never returned. `CallError::iter()` yields
/// every variant (with empty fields), so each front door's tests can check that its table has
/// a row for each.
#[derive(Debug, Clone, PartialEq, strum::EnumIter)]
pub enum CallError {
    /// The body is not valid JSON or not a valid request of the protocol.
    MalformedBody(String),
    /// Well-formed, but does not fit the model: input name, dtype, shape, element count.
    InvalidInput(String),
    /// Auth is on and the request has no valid bearer token.
    Unauthorized,
    /// No such route.
    NotFound(String),
    /// The route exists, for other methods.
    MethodNotAllowed,
    /// The body did not arrive within `body_timeout` (or the request's deadline).
    RequestTimeout(String),
    /// A request head over the connection's read buffer (the connection is then closed).
    HeadTooLarge {
        bytes: usize,
        limit: usize,
    },
    ModelNotFound(String),
    VersionNotFound {
        model: String,
        version: String,
    },
    PayloadTooLarge {
        limit: u64,
    },
    /// An image (or the number of images) over a configured limit.
    ImageTooLarge(String),
    UnsupportedMediaType(String),
    QueueFull(String),
    /// Not ready, draining, or no healthy device.
    Unavailable(String),
    DeadlineExceeded,
    /// A model run failed; details are logged with the request id, never returned.
    Internal,
}

impl CallError {
    /// The kind: what every protocol's table maps from.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::MalformedBody(_)
            | CallError::InvalidInput(_)
            | CallError::UnsupportedMediaType(_) => ErrorKind::InvalidArgument,
            CallError::Unauthorized => ErrorKind::Unauthenticated,
            CallError::NotFound(_)
            | CallError::ModelNotFound(_)
            | CallError::VersionNotFound { .. } => ErrorKind::NotFound,
            CallError::MethodNotAllowed => ErrorKind::Unimplemented,
            CallError::RequestTimeout(_) | CallError::DeadlineExceeded => {
                ErrorKind::DeadlineExceeded
            }
            CallError::HeadTooLarge { .. }
            | CallError::PayloadTooLarge { .. }
            | CallError::ImageTooLarge(_)
            | CallError::QueueFull(_) => ErrorKind::ResourceExhausted,
            CallError::Unavailable(_) => ErrorKind::Unavailable,
            CallError::Internal => ErrorKind::Internal,
        }
    }

    /// A stable machine-readable name for the error (`error_type` in answers).
    pub fn error_type(&self) -> &'static str {
        match self {
            CallError::MalformedBody(_) => "malformed_body",
            CallError::InvalidInput(_) => "invalid_input",
            CallError::NotFound(_) => "not_found",
            CallError::MethodNotAllowed => "method_not_allowed",
            CallError::RequestTimeout(_) => "request_timeout",
            CallError::HeadTooLarge { .. } => "header_too_large",
            CallError::Unauthorized => "unauthorized",
            CallError::ModelNotFound(_) | CallError::VersionNotFound { .. } => "model_not_found",
            CallError::PayloadTooLarge { .. } | CallError::ImageTooLarge(_) => "payload_too_large",
            CallError::UnsupportedMediaType(_) => "unsupported_media_type",
            CallError::QueueFull(_) => "queue_full",
            CallError::Unavailable(_) => "unavailable",
            CallError::DeadlineExceeded => "deadline_exceeded",
            CallError::Internal => "internal",
        }
    }

    /// What the client is told.
    pub fn message(&self) -> String {
        match self {
            CallError::MalformedBody(m)
            | CallError::InvalidInput(m)
            | CallError::UnsupportedMediaType(m)
            | CallError::NotFound(m)
            | CallError::ImageTooLarge(m)
            | CallError::QueueFull(m)
            | CallError::RequestTimeout(m)
            | CallError::Unavailable(m) => m.clone(),
            CallError::ModelNotFound(m) => format!("unknown model {m:?}"),
            CallError::VersionNotFound { model, version } => {
                format!("model {model:?} has no version {version:?}")
            }
            CallError::PayloadTooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            CallError::HeadTooLarge { bytes, limit } => {
                format!("the request head has {bytes} bytes; the limit is {limit}")
            }
            CallError::Unauthorized => {
                "a valid `Authorization: Bearer <token>` header is required".into()
            }
            CallError::MethodNotAllowed => {
                "this route does not take that method; the Allow header lists those it takes".into()
            }
            CallError::DeadlineExceeded => {
                "the request's deadline passed before it could be answered".into()
            }
            CallError::Internal => {
                "the model run failed; the server log has details under this request's x-request-id"
                    .into()
            }
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for CallError {}

impl From<InferError> for CallError {
    fn from(e: InferError) -> CallError {
        match e {
            InferError::Input(_)
            | InferError::TooManyRows { .. }
            | InferError::Rejected(_)
            | InferError::InvalidImage(_) => CallError::InvalidInput(e.to_string()),
            InferError::ImageTooLarge(m) => CallError::ImageTooLarge(m),
            InferError::QueueFull(_) => CallError::QueueFull(e.to_string()),
            InferError::DeadlineExceeded => CallError::DeadlineExceeded,
            InferError::NoHealthyDevice(_) | InferError::ShuttingDown => {
                CallError::Unavailable(e.to_string())
            }
            InferError::RunFailed(_) | InferError::Reassembly(_) => {
                tracing::error!(error = %e, "inference failed");
                CallError::Internal
            }
        }
    }
}

/// A JSON body the codec could not read: malformed, or invalid input. Rows past the most are
/// invalid input too; a front door that has its own words for them maps
/// [`JsonError::TooManyRows`] itself.
impl From<JsonError> for CallError {
    fn from(e: JsonError) -> CallError {
        match e {
            JsonError::Malformed(m) => CallError::MalformedBody(m),
            JsonError::Invalid(m) => CallError::InvalidInput(m),
            JsonError::TooManyRows { .. } => CallError::InvalidInput(e.to_string()),
        }
    }
}

/// Lets a call through when auth is off or `authorization` (the HTTP header's or the gRPC
/// metadata's value, `Bearer <token>`) carries one of the configured tokens.
pub fn authorize(app: &AppState, authorization: Option<&str>) -> Result<(), CallError> {
    if app.tokens.is_empty() {
        return Ok(());
    }
    let given = authorization.and_then(bearer_token);
    // Every configured token is compared, so the time does not tell which one matched.
    let ok = given.is_some_and(|g| {
        app.tokens
            .iter()
            .fold(false, |found, t| same(g.as_bytes(), t.as_bytes()) | found)
    });
    if ok {
        Ok(())
    } else {
        Err(CallError::Unauthorized)
    }
}

/// Equal-length byte strings compared without an early exit, so the time taken does not tell
/// how many leading bytes of a guess were right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of a `Bearer <token>` value; the scheme's case does not matter (RFC 9110 section
/// 11.1), and spaces around the token are dropped.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Counts an answered call and its duration. `protocol` is the front door's (`http`, `grpc`),
/// `status` its own code for the answer. Only configured model names become label values, so
/// clients cannot grow the label set.
pub fn record(
    app: &AppState,
    protocol: &'static str,
    model: &str,
    route: &str,
    status: &str,
    started: std::time::Instant,
) {
    let label = if app.is_configured(model) { model } else { "" };
    app.metrics
        .requests
        .with_label_values(&[label, route, status, protocol])
        .inc();
    app.metrics
        .request_duration
        .with_label_values(&[label, route, protocol])
        .observe(started.elapsed().as_secs_f64());
}

/// Body bytes a call holds against the server's `max_body_memory`, taken as they arrive and
/// given back on drop (when the handler is done with the body).
#[derive(Default)]
pub struct BodyMemory<'a>(Option<crate::budget::Taken<'a>>);

impl<'a> BodyMemory<'a> {
    /// Takes `n` more bytes of the budget; 503 (unavailable) when the server already holds as
    /// many body bytes as it may: load is shed at once rather than queued.
    pub fn take(&mut self, app: &'a AppState, n: usize) -> Result<(), CallError> {
        let taken = match &mut self.0 {
            Some(held) => held.grow(n),
            None => {
                self.0 = app.body_memory.try_take(n);
                self.0.is_some()
            }
        };
        if taken {
            Ok(())
        } else {
            Err(body_memory_full())
        }
    }
}

/// The answer when `max_body_memory` is held already: 503 (unavailable), load shed at once.
fn body_memory_full() -> CallError {
    CallError::Unavailable(
        "the server is holding as many request and answer bytes as it may (max_body_memory); retry"
            .into(),
    )
}

/// [`BodyMemory`] that owns its hold on the state, for a body that outlives any borrow (one a
/// transport streams into a message it owns: the gRPC front door). Given back on drop.
pub struct OwnedBodyMemory {
    app: std::sync::Arc<AppState>,
    held: usize,
}

impl OwnedBodyMemory {
    pub fn new(app: std::sync::Arc<AppState>) -> OwnedBodyMemory {
        OwnedBodyMemory { app, held: 0 }
    }

    /// Takes `n` more bytes of the budget, as [`BodyMemory::take`] does.
    pub fn take(&mut self, n: usize) -> Result<(), CallError> {
        match self.app.body_memory.try_take(n) {
            Some(taken) => {
                std::mem::forget(taken);
                self.held += n;
                Ok(())
            }
            None => Err(body_memory_full()),
        }
    }

    /// Takes `n` more bytes whether or not the budget has them: bytes held already (an answer
    /// made), which the budget must count, so that nothing else is taken until they are given
    /// back.
    pub fn take_anyway(&mut self, n: usize) {
        self.app.body_memory.take_anyway(n);
        self.held += n;
    }

    /// Gives back `n` of the bytes held (all of them when fewer are held).
    pub fn give_back(&mut self, n: usize) {
        let n = n.min(self.held);
        self.app.body_memory.give_back(n);
        self.held -= n;
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Bytes of the server's budget free now, over every request and answer.
    pub fn free(&self) -> usize {
        self.app.body_memory.free()
    }
}

impl Drop for OwnedBodyMemory {
    fn drop(&mut self) {
        self.app.body_memory.give_back(self.held);
    }
}

impl Call {
    /// When the body must have arrived: `body_timeout` after the call's arrival, or its
    /// deadline when that is sooner.
    pub fn body_deadline(&self, app: &AppState) -> Instant {
        let start = self.started.unwrap_or_else(Instant::now);
        self.deadline(app.request_timeout)
            .min(start + app.body_timeout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids = super::RequestIds::default();
        let made: std::collections::HashSet<String> = (0..1000)
            .map(|_| {
                let text = ids.next_id();
                let parsed = uuid::Uuid::parse_str(&text).expect("a UUID");
                assert_eq!(parsed.get_version_num(), 4, "{text}");
                assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{text}");
                text
            })
            .collect();
        assert_eq!(made.len(), 1000);
        // The counter wraps within the low 62 bits without touching the version or variant.
        let edge = super::RequestIds::from_base(ids.base | ((1 << 62) - 1));
        let wrapped = edge.id(1);
        assert_eq!(wrapped.get_version_num(), 4);
        assert_eq!(wrapped.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(wrapped, edge.id(0));
    }

    use super::*;

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

    /// Retrying makes sense for exactly the kinds a client can expect to change: a full queue,
    /// an unavailable server. Sizes and bad input stay what they are.
    #[test]
    fn each_error_has_the_kind_a_client_acts_on() {
        let cases = [
            (
                CallError::MalformedBody("x".into()),
                ErrorKind::InvalidArgument,
            ),
            (
                CallError::UnsupportedMediaType("x".into()),
                ErrorKind::InvalidArgument,
            ),
            (CallError::Unauthorized, ErrorKind::Unauthenticated),
            (CallError::ModelNotFound("m".into()), ErrorKind::NotFound),
            (CallError::MethodNotAllowed, ErrorKind::Unimplemented),
            (
                CallError::RequestTimeout("x".into()),
                ErrorKind::DeadlineExceeded,
            ),
            (
                CallError::QueueFull("x".into()),
                ErrorKind::ResourceExhausted,
            ),
            (
                CallError::PayloadTooLarge { limit: 1 },
                ErrorKind::ResourceExhausted,
            ),
            (CallError::Unavailable("x".into()), ErrorKind::Unavailable),
            (CallError::Internal, ErrorKind::Internal),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
        }
        assert_eq!(
            CallError::from(InferError::ShuttingDown).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(
            CallError::from(InferError::RunFailed("cuda".into())),
            CallError::Internal,
            "internal details are not returned"
        );
    }

    /// The codec's errors keep their words, and say whose fault they are.
    #[test]
    fn json_errors_become_malformed_bodies_or_invalid_input() {
        assert_eq!(
            CallError::from(JsonError::Malformed("m".into())),
            CallError::MalformedBody("m".into())
        );
        assert_eq!(
            CallError::from(JsonError::Invalid("i".into())),
            CallError::InvalidInput("i".into())
        );
        assert_eq!(
            CallError::from(JsonError::TooManyRows { max: 3 }),
            CallError::InvalidInput("the data has more than 3 rows".into())
        );
    }
}
