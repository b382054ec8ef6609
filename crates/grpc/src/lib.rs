//! ortserve's gRPC front door: the KServe V2 / Open Inference Protocol service
//! (`inference.GRPCInferenceService`, as `tritonclient.grpc` and KServe's clients call it) and
//! `grpc.health.v1.Health`, on a listener of their own, over the protocol-neutral request core
//! (`ortserve_core::call`, the `app` façade, the registry and the lifecycle), so the REST path's
//! guarantees hold here too: auth, deadlines, limits, admission, errors by kind, metrics
//! labelled `protocol="grpc"`, and the drain.
//!
//! [`serve`] runs it; [`status::status_of`] is the one table from error kinds to gRPC codes.

// Unused `pub` items fail the build, as in the core (scripts/test.sh runs clippy with -D warnings).
#![warn(unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use ortserve_core::app::AppState;
use ortserve_core::config::ServerConfig;

mod census;
mod fast;
mod health;
mod idle;
mod limits;
mod outbox;
mod service;
mod status;
mod streams;
mod tensors;
mod turns;

pub use health::Health;
pub use service::Inference;
pub use status::status_of;
pub use tensors::raw_request;

/// The code generated from `proto/` (`inference` and `grpc.health.v1`), servers and clients.
pub mod proto {
    pub mod inference {
        tonic::include_proto!("inference");
    }
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}

/// Streams one HTTP/2 connection may have open at once; more are refused by the protocol
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`), not queued.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// The largest header list a client may send (its metadata).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// The largest frame a client may send (`SETTINGS_MAX_FRAME_SIZE`; the protocol's default is
/// 16 KiB). A message up to this size can arrive in one DATA frame, read in one piece and
/// decoded in place, instead of gathered from 16 KiB frames read one by one (the CNN fixture's
/// 48 KiB calls at 32 clients: 0.75-0.77 of REST binary's rows/s with 16 KiB frames, 0.88
/// with 64 KiB; docs/BENCHMARKS.md). The connection's read buffer grows to a frame's declared
/// size as its header arrives, and a client may leave a frame unfinished until the keepalive
/// ping, whose answer cannot be read past the unfinished frame, times out (40 s, seen with
/// scripts/h2raw.py): 64 KiB bounds that at 64 MiB for 1,024 connections (256 KiB would allow
/// 256 MiB).
pub const MAX_FRAME_BYTES: u32 = 64 * 1024;
/// How often an idle connection is pinged, and how long the answer may take before it is closed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a client may reset before the server has answered them, per connection, before the
/// connection is closed (a flood of RST_STREAM).
pub const MAX_PENDING_RESETS: usize = 32;

/// Serves the gRPC services on `listener` until `shutdown` resolves, then stops accepting, sends
/// GOAWAY on every connection and returns once the calls in flight are answered (the caller
/// bounds that wait with `server.shutdown_timeout`). Connections are HTTP/2 only, at most
/// `server.max_connections` at once (more wait in the listen backlog); one with no call open for
/// `server.keep_alive_timeout` is sent GOAWAY and closed (`idle.rs`).
pub async fn serve(
    app: Arc<AppState>,
    server: &ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use proto::health::health_server::HealthServer;
    use proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;

    let max_message = usize::try_from(server.max_body_bytes.0).unwrap_or(usize::MAX);
    let shared = Arc::new(Inference::new(app.clone()));
    let inference = GrpcInferenceServiceServer::from_arc(shared.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(usize::MAX);
    let health = HealthServer::new(Health::new(app.clone()));
    let routes = tonic::service::Routes::new(inference)
        .add_service(health)
        .prepare();
    let service = tower::ServiceBuilder::new()
        .layer(limits::DeadlineLayer::new(
            app.clone(),
            server.request_timeout.0,
        ))
        .layer(limits::BodyBudgetLayer::new(app.clone()))
        .layer(fast::FastInferLayer::new(shared, max_message))
        .service(routes);

    // One builder a connection: its calls are run by the connection's own task (streams.rs).
    let h2 = |exec: streams::ConnExecutor| {
        let mut h2 = hyper::server::conn::http2::Builder::new(exec);
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .max_local_error_reset_streams(Some(MAX_PENDING_RESETS));
        h2
    };
    let max_connections = server
        .max_connections
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let places = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // true from the drain on: every connection sends GOAWAY and finishes its calls.
    let (draining, drain) = tokio::sync::watch::channel(false);
    let idle_timeout = server.keep_alive_timeout.0;
    let write_timeout = server.write_timeout.0;
    tokio::pin!(shutdown);
    loop {
        let place = tokio::select! {
            p = places.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "gRPC: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let calls = idle::Calls::new();
        let outbox = outbox::Outbox::new(app.clone());
        let svc = hyper::service::service_fn({
            let (service, calls, outbox) = (service.clone(), calls.clone(), outbox.clone());
            move |req: http::Request<hyper::body::Incoming>| {
                let open = calls.begin();
                let outbox = outbox.clone();
                let answer = tower::ServiceExt::oneshot(service.clone(), req);
                async move { answer.await.map(|r| open.hold(r, outbox)) }
            }
        });
        let exec = streams::ConnExecutor::default();
        let turns = turns::Turns::default();
        let calls_running = exec.calls(turns.clone());
        let conn = h2(exec).serve_connection(TokioIo::new(outbox.socket(stream)), svc);
        let mut drain = drain.clone();
        // Its wake-ups of itself are polls of the same turn (`turns.rs`).
        tokio::spawn(turns.run(async move {
            tokio::pin!(conn);
            tokio::pin!(calls_running);
            let idle = tokio::time::sleep(idle_timeout);
            tokio::pin!(idle);
            let stall = tokio::time::sleep(write_timeout);
            tokio::pin!(stall);
            let mut closing = false;
            let ended = loop {
                // The calls first: an answer one of them finished is written when the
                // connection is polled next, in the same wake-up.
                tokio::select! {
                    biased;
                    never = calls_running.as_mut() => match never {},
                    ended = conn.as_mut() => break ended,
                    _ = drain.wait_for(|d| *d), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = idle.as_mut(), if !closing => match calls.idle_for() {
                        Some(quiet) if quiet >= idle_timeout => {
                            tracing::debug!(?idle_timeout, "closing an idle gRPC connection");
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                        quiet => idle
                            .as_mut()
                            .reset(tokio::time::Instant::now() + (idle_timeout - quiet.unwrap_or_default())),
                    },
                    // Answer bytes not written within `write_timeout`: the client does not
                    // read them (`outbox.rs`); the connection is dropped, not drained.
                    _ = stall.as_mut() => match outbox.oldest_owed() {
                        Some(stalled) if stalled >= write_timeout => {
                            tracing::debug!(?write_timeout, "closing a gRPC connection whose client reads no answers");
                            break Ok(());
                        }
                        stalled => stall
                            .as_mut()
                            .reset(tokio::time::Instant::now() + (write_timeout - stalled.unwrap_or_default())),
                    },
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
            drop(place);
        }));
    }
    drop(listener);
    let _ = draining.send(true);
    // Every connection has given its place back once its calls are answered.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = places.acquire_many(all).await;
    Ok(())
}
