//! A gRPC load generator: N callers, each sending the same prepared unary `ModelInfer` call back
//! to back for a bounded time, recording each call's status code and latency, like the HTTP
//! load generator in `client`.
//!
//! The call is encoded once (the gRPC message prefix and the protobuf message), as the HTTP
//! generator sends a prepared request, and written as HTTP/2 frames by the `h2` crate: what a
//! call costs the load generator is the protocol's framing, not a client library's encoding (a
//! tonic client took 16 µs of CPU per MLP call against the HTTP generator's 8, on the same cores
//! as the server; docs/BENCHMARKS.md). The callers share a few HTTP/2 connections,
//! [`CALLERS_PER_CONNECTION`] to each, as a client's pool of channels would spread them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ortserve::grpc::proto::inference::ModelInferRequest;

use crate::client::{cpu_between, LoadResult};

/// Callers that share one HTTP/2 connection.
pub const CALLERS_PER_CONNECTION: usize = 8;

/// The receive windows the client offers (the answers are small; the server's are its own).
const WINDOW: u32 = 1 << 20;

pub use ortserve::grpc::raw_request;

/// A call as sent: the gRPC length-prefixed message, encoded once.
fn prepared(request: &ModelInferRequest) -> Bytes {
    let message = prost::Message::encode_to_vec(request);
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

async fn connect(addr: SocketAddr) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake(tcp)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(send)
}

/// `grpc-status` of a header block (the answer's trailers, or its headers when it has no body).
fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// One call: its gRPC status code, or `None` when it got no answer.
async fn call(send: &h2::client::SendRequest<Bytes>, uri: &http::Uri, body: &Bytes) -> Option<u16> {
    let request = http::Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let mut send = send.clone().ready().await.ok()?;
    let (answer, mut stream) = send.send_request(request, false).ok()?;
    stream.send_data(body.clone(), true).ok()?;
    let answer = answer.await.ok()?;
    if let Some(code) = grpc_status(answer.headers()) {
        return Some(code);
    }
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    grpc_status(&body.trailers().await.ok()??)
}

/// Drives the gRPC port at `addr` with `concurrency` callers for `duration`, after `warmup`
/// (not counted). A call answered OK counts under status 200 of the result, any other code the
/// server answered under its number; a call that got no answer (no connection, a reset stream)
/// is an error, and its caller waits 10 ms and opens a connection of its own, as the HTTP
/// generator does when it cannot connect.
pub async fn run(
    addr: SocketAddr,
    request: ModelInferRequest,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let cpu = cpu_between(measure_from, end);
    let body = prepared(&request);
    let uri: http::Uri =
        match format!("http://{addr}/inference.GRPCInferenceService/ModelInfer").parse() {
            Ok(u) => u,
            Err(_) => {
                return LoadResult {
                    errors: 1,
                    elapsed: duration,
                    ..LoadResult::default()
                }
            }
        };
    let connections = concurrency.div_ceil(CALLERS_PER_CONNECTION).max(1);
    let mut shared = Vec::with_capacity(connections);
    for _ in 0..connections {
        shared.push(connect(addr).await);
    }
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut send = shared[i % connections].clone();
        let (body, uri) = (body.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            while Instant::now() < end {
                let t0 = Instant::now();
                let status = match &send {
                    Some(s) => call(s, &uri, &body)
                        .await
                        .map(|c| if c == 0 { 200 } else { c }),
                    None => None,
                };
                let counted = t0 >= measure_from && Instant::now() <= end;
                match status {
                    Some(status) => {
                        if counted {
                            *r.statuses.entry(status).or_default() += 1;
                            r.latencies.push(t0.elapsed());
                        }
                    }
                    None => {
                        if counted {
                            r.errors += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        send = connect(addr).await;
                    }
                }
            }
            r
        }));
    }
    crate::client::gather(tasks, duration, cpu).await
}
