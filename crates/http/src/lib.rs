//! HTTP: the router, its tower layers, the V2 codec and the one error table. The only module
//! that imports axum and tower-http.

// Unused `pub` items fail the build, as in the core (scripts/test.sh runs clippy with -D warnings).
#![warn(unreachable_pub)]

mod auth;
mod edge;
mod error;
mod extract;
mod framing;
mod routes;
mod serve;
mod trace;
pub(crate) mod v2;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Request};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use ortserve_core::app::AppState;

pub(crate) use error::{ApiError, CallError};
pub use serve::bind;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Ids for requests that come without `x-request-id`: the server's counted ids
/// (`call::RequestIds`), shared with the other front doors.
#[derive(Clone)]
struct CountedIds(Arc<AppState>);

impl MakeRequestId for CountedIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&self.0.request_ids.next_id())
            .ok()
            .map(RequestId::new)
    }
}

/// Parses a V2 inference body (JSON, or the binary extension with `header_len`) as the infer
/// route does, without a model: the status and message a client would get when it does not
/// parse. For tools that measure or fuzz the parser (`ortserve-bench`, the property tests).
pub fn parse_v2_request(body: &[u8], header_len: Option<usize>) -> Result<(), (u16, String)> {
    v2::parse_request(body, header_len)
        .map(|_| ())
        .map_err(|e| (ApiError(e.clone()).status().as_u16(), e.message()))
}

/// Every route, with request ids, tracing and panic catching. Body limits are enforced by the
/// handlers so that a too-large body gets our JSON error.
pub fn router(state: Arc<AppState>) -> Router {
    // Model routes: behind bearer-token auth when it is configured.
    let models = Router::new()
        .route("/v2/models/{model}", get(routes::models::metadata))
        .route("/v2/models/{model}/infer", post(routes::infer::infer))
        .route("/v1/models/{model}/tuning", get(routes::models::tuning))
        .route("/v1/models/{target}", post(routes::predict::predict))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(routes::models::metadata_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(routes::infer::infer_version),
        )
        .route("/v2/models/stats", get(routes::stats::all))
        .route("/v2/models/{model}/stats", get(routes::stats::model))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(routes::stats::version),
        )
        .route("/v2/repository/index", post(routes::repository::index))
        .route(
            "/v2/repository/models/{model}/load",
            post(routes::repository::load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(routes::repository::unload),
        );
    // Only with tokens configured: the layer boxes a future on every request it wraps.
    let models = if state.tokens.is_empty() {
        models
    } else {
        models.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
    };
    // Probes and scrapers: always open, per-model readiness included (a balancer's probe has no
    // token).
    let open = probe_routes()
        .route("/v2", get(routes::health::server_metadata))
        .route("/openapi.yaml", get(routes::health::openapi))
        .route("/v2/models/{model}/ready", get(routes::models::ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(routes::models::ready_version),
        );
    layered(open.merge(models), state)
}

/// The admin port's routes: liveness, readiness and metrics, nothing a data-plane client uses.
pub(crate) fn admin_router(state: Arc<AppState>) -> Router {
    layered(probe_routes(), state)
}

/// The paths [`probe_routes`] serves (not traced). The routes are written out there, where
/// tests/openapi.rs reads them.
const PROBE_PATHS: [&str; 5] = [
    "/v2/health/live",
    "/v2/health/ready",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// Liveness, readiness and metrics, served on both ports.
fn probe_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2/health/live", get(routes::health::live))
        .route("/v2/health/ready", get(routes::health::ready))
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .route("/metrics", get(routes::health::metrics))
}

/// The fallback and the layers every answer passes through: the edge (JSON errors, `Host`
/// checks, `Connection: close` while draining), request ids, tracing and panic catching.
fn layered(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(routes::health::not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(
            ServiceBuilder::new()
                .layer(edge::EdgeLayer(state.clone()))
                .layer(SetRequestIdLayer::new(REQUEST_ID, CountedIds(state.clone())))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                    let traces = ortserve_core::call::traces_on();
                    if traces && PROBE_PATHS.contains(&req.uri().path()) {
                        // A kubelet's probes and Prometheus' scrapes every few seconds would
                        // fill the trace store with traces nobody reads.
                        return tracing::Span::none();
                    }
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    // route, model, version and status are recorded only while traces are
                    // exported, so the log lines stay as they were without.
                    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path(),
                        route = tracing::field::Empty, model = tracing::field::Empty,
                        version = tracing::field::Empty, status = tracing::field::Empty);
                    if traces {
                        ortserve_core::trace_context::adopt_parent(&span, |name| {
                            req.headers().get(name).and_then(|v| v.to_str().ok())
                        });
                        if let Some(route) = req.extensions().get::<axum::extract::MatchedPath>() {
                            span.record("route", route.as_str());
                        }
                    }
                    span
                })
                // 5xx answers are logged where they arise, with their cause.
                .on_failure(()))
                // With traces: the status on the request span, and its `traceparent` in the
                // answer. Without, no layer.
                .option_layer(
                    ortserve_core::call::traces_on()
                        .then(|| tower::util::MapResponseLayer::new(trace::answer::<_>)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(|_| {
                    axum::response::IntoResponse::into_response(ApiError(CallError::Internal))
                })),
        )
        .with_state(state)
}

/// Serves the router on `listener` with the connection limits of `server` until `stop`
/// resolves; then stops accepting and lets the open connections finish their requests before
/// it returns.
pub async fn serve(
    state: Arc<AppState>,
    server: &ortserve_core::config::ServerConfig,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve::serve(router(state), listener, serve::ConnLimits::of(server), stop).await
}

/// The admin port, served on a thread and tokio runtime of its own: probes and scrapes are then
/// answered however busy the data port's worker threads are (under every hostile class at
/// once, a liveness probe sharing them waited 220 ms; docs/BENCHMARKS.md).
pub struct AdminPort {
    /// Sent by the admin thread with how serving ended, just before it exits.
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    thread: std::thread::JoinHandle<()>,
}

impl AdminPort {
    /// Starts serving the admin routes on `listener` (with `server.admin_max_connections`) until
    /// `stop` resolves.
    pub fn start(
        state: Arc<AppState>,
        server: &ortserve_core::config::ServerConfig,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<AdminPort> {
        // Out of this runtime's reactor, into the admin runtime's.
        let listener = listener.into_std()?;
        let limits = serve::ConnLimits::admin(server);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("ortserve-admin".into())
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            serve::serve(admin_router(state), listener, limits, stop).await
                        })
                    });
                let _ = done_tx.send(served);
            })?;
        Ok(AdminPort { done, thread })
    }

    /// Waits until the admin port has stopped and its thread has ended.
    pub async fn join(self) -> std::io::Result<()> {
        let served = self
            .done
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the admin thread panicked")));
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        served
    }
}
