//! A gRPC load generator: N callers, each sending the same prepared unary `ModelInfer` call back
//! to back for a bounded time, recording each call's status code and latency, like the HTTP
//! load generator in `client`.
//!
//! The callers share a few HTTP/2 connections, [`CALLERS_PER_CONNECTION`] to each, as a client's
//! pool of channels would spread them, so that no one connection (the one task on each side that
//! reads and writes its frames) limits the load. The request's tensors are `bytes::Bytes`
//! (`raw_input_contents`), so cloning the message for a call copies no tensor data; prost copies
//! them once into the frame, which is the cost of the protocol itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ortserve::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ortserve::grpc::proto::inference::ModelInferRequest;
use tonic::transport::{Channel, Endpoint};

use crate::client::{cpu_between, LoadResult};

/// Callers that share one HTTP/2 connection.
pub const CALLERS_PER_CONNECTION: usize = 8;

/// The largest answer a call accepts (tonic's default is 4 MiB).
const MAX_ANSWER_BYTES: usize = 64 << 20;

pub use ortserve::grpc::raw_request;

/// Drives the gRPC port at `addr` with `concurrency` callers for `duration`, after `warmup`
/// (not counted). A call answered OK counts under status 200 of the result, any other code the
/// server answered under its number; a call that got no answer (no connection, a reset stream)
/// is an error, and its caller waits 10 ms before the next, as the HTTP generator does when it
/// cannot connect. Channels reconnect by themselves.
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
    let connections = concurrency.div_ceil(CALLERS_PER_CONNECTION).max(1);
    let channels: Vec<Channel> = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => {
            let e = e.tcp_nodelay(true);
            (0..connections).map(|_| e.connect_lazy()).collect()
        }
        Err(_) => {
            return LoadResult {
                errors: 1,
                elapsed: duration,
                ..LoadResult::default()
            }
        }
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut client = GrpcInferenceServiceClient::new(channels[i % connections].clone())
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            while Instant::now() < end {
                let t0 = Instant::now();
                let outcome = client.model_infer(request.clone()).await;
                let counted = t0 >= measure_from && Instant::now() <= end;
                let status = match outcome {
                    Ok(_) => Some(200),
                    Err(s) if std::error::Error::source(&s).is_none() => Some(s.code() as u16),
                    Err(_) => None,
                };
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
                    }
                }
            }
            r
        }));
    }
    crate::client::gather(tasks, duration, cpu).await
}
