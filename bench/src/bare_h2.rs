//! Three bare HTTP/2 responders for scenario b's one-caller comparison of the protocol stacks:
//! every call is answered OK with an empty message, no model, no tonic, no limits. Next to the
//! bare axum handler (`hello.rs`, HTTP/1.1) they tell what each stack costs a call from what the
//! server does with it.
//!
//! - [`serve_hyper`]: hyper's HTTP/2 server, the stack the gRPC port runs on, each call spawned on
//!   tokio with the body read whole.
//! - [`serve_h2`]: the `h2` crate that hyper's HTTP/2 is built on, driven directly: a
//!   connection's task reads each call's body and answers it in the same poll, without hyper's
//!   per-call request, body channel, executor and response body. What hyper adds to h2.
//! - [`serve_frames`]: frames read and written by hand (RFC 9113), as little as the load
//!   generator's calls need: one read, the frames parsed, one write of every answer they
//!   completed. A lower bound for an HTTP/2 server, not one: it checks nothing, keeps no stream
//!   state, skips the request's header block (the load generator's is always the same call) and
//!   gives the client the largest windows at the start so that it never has to update them. For
//!   the load generator on loopback only.

use std::convert::Infallible;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::grpc_client::{
    frame_head, ACK, DATA, DEFAULT_FRAME, DEFAULT_WINDOW, END_HEADERS, END_STREAM, HEADERS, PING,
    PREFACE, SETTINGS, WINDOW, WINDOW_UPDATE,
};

/// The empty message, length-prefixed.
const EMPTY_MESSAGE: [u8; 5] = [0; 5];

/// A gRPC answer's head: status 200, `content-type: application/grpc`.
fn grpc_head<B>(body: B) -> http::Response<B> {
    let mut head = http::Response::new(body);
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    head
}

/// A gRPC answer's trailers: `grpc-status: 0`.
fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// hyper's HTTP/2 server on `listener` until the runtime stops.
pub async fn serve_hyper(listener: TcpListener) {
    #[derive(Clone)]
    struct Spawn;
    impl<F: std::future::Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Spawn {
        fn execute(&self, call: F) {
            tokio::spawn(call);
        }
    }
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let answer =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async {
                let _ = req.into_body().collect().await;
                let body = http_body_util::Full::new(bytes::Bytes::from_static(&EMPTY_MESSAGE))
                    .with_trailers(async { Some(Ok::<_, Infallible>(ok_trailers())) });
                Ok::<_, Infallible>(grpc_head(body))
            });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(Spawn)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), answer)
                .await;
        });
    }
}

/// The `h2` crate's server on `listener` until the runtime stops: one task a connection accepts
/// its streams, reads each request's body and answers it in the same poll, with the gRPC port's
/// frame size and 1 MiB windows (hyper's defaults).
pub async fn serve_h2(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::Builder::new()
                .initial_window_size(1 << 20)
                .initial_connection_window_size(1 << 20)
                .max_frame_size(64 * 1024)
                .handshake::<_, bytes::Bytes>(tcp)
                .await
            else {
                return;
            };
            let mut open: Vec<(h2::RecvStream, h2::server::SendResponse<bytes::Bytes>)> =
                Vec::new();
            std::future::poll_fn(|cx| loop {
                let mut progress = false;
                loop {
                    match conn.poll_accept(cx) {
                        std::task::Poll::Ready(Some(Ok((req, respond)))) => {
                            open.push((req.into_body(), respond));
                            progress = true;
                        }
                        std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                        std::task::Poll::Pending => break,
                    }
                }
                let mut i = 0;
                while i < open.len() {
                    let (body, _) = &mut open[i];
                    let finished = loop {
                        match body.poll_data(cx) {
                            std::task::Poll::Ready(Some(Ok(b))) => {
                                let _ = body.flow_control().release_capacity(b.len());
                            }
                            std::task::Poll::Ready(Some(Err(_))) => break Some(false),
                            std::task::Poll::Ready(None) => break Some(true),
                            std::task::Poll::Pending => break None,
                        }
                    };
                    match finished {
                        None => i += 1,
                        Some(ok) => {
                            let (_, mut respond) = open.swap_remove(i);
                            progress = true;
                            if !ok {
                                continue;
                            }
                            if let Ok(mut send) = respond.send_response(grpc_head(()), false) {
                                let _ = send
                                    .send_data(bytes::Bytes::from_static(&EMPTY_MESSAGE), false);
                                let _ = send.send_trailers(ok_trailers());
                            }
                        }
                    }
                }
                if !progress {
                    return std::task::Poll::Pending;
                }
            })
            .await;
        });
    }
}

/// The answer's header block: `:status: 200` (static table entry 8), then `content-type:
/// application/grpc` as a literal without indexing whose name is static entry 31 (RFC 7541
/// §6.2.2: 4-bit prefix, 31 = 15 + 16).
const ANSWER_BLOCK: &[u8] = b"\x88\x0f\x10\x10application/grpc";
/// The trailers' block: `grpc-status: 0`, a literal without indexing with a new name.
const TRAILERS_BLOCK: &[u8] = b"\x00\x0bgrpc-status\x010";

/// The hand-written responder on `listener` until the runtime stops.
pub async fn serve_frames(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(frames(tcp));
    }
}

async fn frames(mut tcp: TcpStream) {
    let mut out = Vec::with_capacity(4096);
    // SETTINGS_INITIAL_WINDOW_SIZE the largest, and the connection's window raised as much.
    frame_head(&mut out, 6, SETTINGS, 0, 0);
    out.extend_from_slice(&[0, 4]);
    out.extend_from_slice(&WINDOW.to_be_bytes());
    frame_head(&mut out, 4, WINDOW_UPDATE, 0, 0);
    out.extend_from_slice(&(WINDOW - DEFAULT_WINDOW as u32).to_be_bytes());
    if tcp.write_all(&out).await.is_err() {
        return;
    }
    out.clear();

    let mut preface = [0u8; PREFACE.len()];
    if tcp.read_exact(&mut preface).await.is_err() {
        return;
    }
    // Room for several whole frames.
    let mut buf = vec![0u8; 8 * (9 + DEFAULT_FRAME)];
    let (mut have, mut at) = (0usize, 0usize);
    loop {
        match tcp.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        while have >= at + 9 {
            let head = &buf[at..at + 9];
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if len > DEFAULT_FRAME {
                return;
            }
            if have < at + 9 + len {
                break;
            }
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match kind {
                DATA | HEADERS if flags & END_STREAM != 0 => {
                    frame_head(&mut out, ANSWER_BLOCK.len(), HEADERS, END_HEADERS, stream);
                    out.extend_from_slice(ANSWER_BLOCK);
                    frame_head(&mut out, EMPTY_MESSAGE.len(), DATA, 0, stream);
                    out.extend_from_slice(&EMPTY_MESSAGE);
                    let flags = END_HEADERS | END_STREAM;
                    frame_head(&mut out, TRAILERS_BLOCK.len(), HEADERS, flags, stream);
                    out.extend_from_slice(TRAILERS_BLOCK);
                }
                SETTINGS if flags & ACK == 0 => frame_head(&mut out, 0, SETTINGS, ACK, 0),
                PING if flags & ACK == 0 && len == 8 => {
                    frame_head(&mut out, 8, PING, ACK, 0);
                    out.extend_from_slice(&buf[at + 9..at + 17]);
                }
                _ => {}
            }
            at += 9 + len;
        }
        // What is left of a frame moves to the front.
        buf.copy_within(at..have, 0);
        have -= at;
        at = 0;
        if !out.is_empty() {
            if tcp.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
