//! A bare axum handler: the HTTP stack's own limit, for the overhead benchmark.

use axum::routing::{get, post};
use axum::Router;

/// `POST /` and `GET /` answer a fixed small JSON body. `POST /sink` reads the whole body first
/// and answers its length: the HTTP stack's limit for requests as large as a model's inputs.
pub fn hello_router() -> Router {
    async fn hello() -> &'static str {
        r#"{"hello":"world"}"#
    }
    async fn sink(body: axum::body::Bytes) -> String {
        format!("{{\"bytes\":{}}}", body.len())
    }
    Router::new()
        .route("/", get(hello))
        .route("/", post(hello))
        .route("/sink", post(sink))
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
