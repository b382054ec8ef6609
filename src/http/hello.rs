//! A bare axum handler: the HTTP stack's own limit, for the overhead benchmark.

use axum::routing::{get, post};
use axum::Router;

/// `POST /` and `GET /` answer a fixed small JSON body.
pub fn hello_router() -> Router {
    async fn hello() -> &'static str {
        r#"{"hello":"world"}"#
    }
    Router::new().route("/", get(hello)).route("/", post(hello))
}

/// Serves [`hello_router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, hello_router())
        .with_graceful_shutdown(shutdown)
        .await
}
