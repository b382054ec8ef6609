//! `ModelInfer` without tonic's streaming codec: the one call that carries tensors. The request
//! message is taken whole from the HTTP/2 body (a slice of the received bytes when it came in one
//! DATA frame, else gathered into a buffer that grows with what arrives) and decoded in place, so
//! raw input contents stay slices of what arrived; the answer is encoded into one buffer of its
//! exact size and sent as one DATA frame and the trailers. Everything else (auth, deadline,
//! limits, metrics, status codes) is the same code as the tonic path (`service.rs`). The
//! repository calls are read, counted and decoded here too (their `parameters` maps), and a
//! request that is not gRPC is answered here; the other RPCs go to tonic.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use prost::Message;
use tonic::body::Body;
use tonic::Status;

use crate::census::{self, Refused};
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::{
    ModelInferRequest, RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
};
use crate::service::Inference;
use crate::status::status_of;
use ortserve_core::app::BACKGROUND_BYTES;
use ortserve_core::gather::Gather;

/// The inference service's path prefix; `ModelInfer` is served here.
const SERVICE: &str = "/inference.GRPCInferenceService/";
const INFER: &str = "ModelInfer";

/// The repository calls, whose messages are read, counted and decoded here (their
/// `parameters` maps: a 15 MB map of 1.9 million distinct keys decoded to about 100 bytes a
/// key, on the connection's task, for 1-5 s a call, before the call was refused).
#[derive(Clone, Copy)]
enum Repository {
    Load,
    Unload,
}

impl Repository {
    fn at(path: &str) -> Option<Repository> {
        match path.strip_prefix(SERVICE)? {
            "RepositoryModelLoad" => Some(Repository::Load),
            "RepositoryModelUnload" => Some(Repository::Unload),
            _ => None,
        }
    }

    fn rpc(self) -> &'static str {
        match self {
            Repository::Load => "RepositoryModelLoad",
            Repository::Unload => "RepositoryModelUnload",
        }
    }
}

/// Serves `ModelInfer` itself, counts the repository calls' messages before the inner service
/// decodes them, refuses what is not gRPC, and hands every other request to the inner service.
#[derive(Clone)]
pub(crate) struct FastInferLayer {
    inference: Arc<Inference>,
    max_message: usize,
}

impl FastInferLayer {
    pub(crate) fn new(inference: Arc<Inference>, max_message: usize) -> FastInferLayer {
        FastInferLayer {
            inference,
            max_message,
        }
    }
}

impl<S> tower::Layer<S> for FastInferLayer {
    type Service = FastInfer<S>;
    fn layer(&self, inner: S) -> FastInfer<S> {
        FastInfer {
            inner,
            inference: self.inference.clone(),
            max_message: self.max_message,
        }
    }
}

#[derive(Clone)]
pub(crate) struct FastInfer<S> {
    inner: S,
    inference: Arc<Inference>,
    max_message: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for FastInfer<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if !is_grpc(req.headers()) {
            return Box::pin(std::future::ready(Ok(not_grpc())));
        }
        // A compressed call goes to tonic, which refuses it before reading its message.
        let plain = req
            .headers()
            .get("grpc-encoding")
            .is_none_or(|e| e == "identity");
        let path = req.uri().path();
        let inference = self.inference.clone();
        let max_message = self.max_message;
        if let (true, Some(call)) = (plain, Repository::at(path)) {
            return Box::pin(
                async move { Ok(repository(inference, max_message, call, req).await) },
            );
        }
        if path.strip_prefix(SERVICE) != Some(INFER) || !plain {
            return Box::pin(self.inner.call(req));
        }
        Box::pin(async move { Ok(answer(inference, max_message, req).await) })
    }
}

/// How much larger than the message limit a message's typed contents may decode (packed
/// varints grow up to eight times; REST's JSON numbers up to four): beyond it, a client is told
/// to send raw contents.
const TYPED_GROWTH: usize = 4;

async fn answer(
    inference: Arc<Inference>,
    max_message: usize,
    req: http::Request<Body>,
) -> http::Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    // Nothing is read, counted or decoded for a client without a valid token, or with a
    // malformed `grpc-timeout`.
    if let Some(status) = inference.refused_early(INFER, headers, started) {
        return status.into_http();
    }
    let refuse = |status| {
        inference
            .refuse(INFER, headers, status, started)
            .into_http()
    };
    // Bytes after the message are not waited for or read: an answer is not held back for the
    // end of the stream, and an inference a client abandons changes nothing.
    let mut body = body;
    let message = match read_message(&mut body, max_message).await {
        Ok((m, _)) => m,
        Err(status) => return refuse(status),
    };
    let typed_limit = max_message.saturating_mul(TYPED_GROWTH);
    // A call runs in its connection's task (`streams.rs`): decoding a heavy message there held
    // up the connection's other calls and PINGs, and in a task of its own it held up a tokio
    // worker's other connections (docs/BENCHMARKS.md). A message is heavy when walking it
    // (`census.rs`) takes more than `BACKGROUND_BYTES` of work: many fields, or many typed
    // values; raw contents, however large, are slices and cost nothing to decode (as REST's
    // binary tail is not parsed). Heavy messages are counted, decoded and their typed contents
    // converted on the preprocessing pool, as REST parses a large JSON body; a call waits for a
    // slot there until its deadline.
    let light = match census::check_within(&message, typed_limit, BACKGROUND_BYTES) {
        Ok(light) => light,
        Err(refused) => return refuse(refusal(refused)),
    };
    let (request, converted) = if light {
        match ModelInferRequest::decode(message) {
            Ok(request) => (request, None),
            Err(e) => return refuse(undecodable(e)),
        }
    } else {
        let deadline = inference.deadline(headers);
        let job = inference.app().in_background(deadline, move || {
            decode(message, typed_limit).map(|mut request| {
                let converted = crate::service::convert(&mut request);
                (request, converted)
            })
        });
        match job.await {
            Ok(Ok((request, converted))) => (request, Some(converted)),
            Ok(Err(status)) => return refuse(status),
            Err(waited) => return refuse(status_of(&waited.into())),
        }
    };
    encoded(
        inference
            .model_infer_with(headers, request, converted, started)
            .await,
    )
}

/// A unary call's answer as HTTP: its message encoded into one buffer of its exact size, sent
/// as one DATA frame and the trailers; or its status.
fn encoded<M: Message>(answer: Result<tonic::Response<M>, Status>) -> http::Response<Body> {
    let response = match answer {
        Ok(response) => response,
        Err(status) => return status.into_http(),
    };
    let (metadata, message, _) = response.into_parts();
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    if message.encode(&mut buf).is_err() {
        return Status::internal("the answer could not be encoded").into_http();
    }
    let mut resp = http::Response::new(Body::new(Frames(
        [Frame::data(buf.freeze()), Frame::trailers(ok_trailers())].into(),
    )));
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.extend(metadata.into_headers());
    resp
}

/// Whether a request says it is gRPC: `content-type: application/grpc` or
/// `application/grpc+proto` (any case), with or without parameters. Another subtype names a
/// codec this server does not have (`+json` would be read as protobuf).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    const PROTO: &[u8] = b"+proto";
    let Some(v) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let v = v.as_bytes();
    let v = v
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    let Some((head, subtype)) = v.split_at_checked(GRPC.len()) else {
        return false;
    };
    head.eq_ignore_ascii_case(GRPC) && (subtype.is_empty() || subtype.eq_ignore_ascii_case(PROTO))
}

/// A request that is not gRPC, answered as the protocol asks (HTTP 415, so an HTTP client
/// does not take the error's status 200 for success), with `INTERNAL` as grpc-go answers it.
/// It is not a call: nothing is read, recorded or checked.
fn not_grpc() -> http::Response<Body> {
    let mut answer = Status::internal(
        "the content-type is not application/grpc: this port serves gRPC only (REST is on \
         server.http_addr)",
    )
    .into_http();
    *answer.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    answer
}

/// A repository call. What its headers refuse (token, `grpc-timeout`) is answered before
/// anything is read; then its one message and the rest of the body to its end (a call the
/// client resets or never finishes is not served, and bytes after the message are refused:
/// tonic waited for the end too, and it loads or unloads models), counted (`census.rs`),
/// decoded, and served by `service.rs`.
async fn repository(
    inference: Arc<Inference>,
    max_message: usize,
    call: Repository,
    req: http::Request<Body>,
) -> http::Response<Body> {
    let started = Instant::now();
    let rpc = call.rpc();
    let (parts, body) = req.into_parts();
    if let Some(status) = inference.refused_early(rpc, &parts.headers, started) {
        return status.into_http();
    }
    let refuse = |status| {
        inference
            .refuse(rpc, &parts.headers, status, started)
            .into_http()
    };
    let message = match read_only_message(body, max_message).await {
        Ok(m) => m,
        Err(status) => return refuse(status),
    };
    if let Err(refused) = census::check_repository(&message) {
        return refuse(refusal(refused));
    }
    let metadata = || tonic::metadata::MetadataMap::from_headers(parts.headers.clone());
    // Timed from the call's arrival, its message's reading included.
    let arrived = || {
        let mut e = http::Extensions::new();
        e.insert(crate::service::Arrived(started));
        e
    };
    match call {
        Repository::Load => match RepositoryModelLoadRequest::decode(message) {
            Ok(m) => {
                let request = tonic::Request::from_parts(metadata(), arrived(), m);
                encoded(inference.repository_model_load(request).await)
            }
            Err(e) => refuse(undecodable(e)),
        },
        Repository::Unload => match RepositoryModelUnloadRequest::decode(message) {
            Ok(m) => {
                let request = tonic::Request::from_parts(metadata(), arrived(), m);
                encoded(inference.repository_model_unload(request).await)
            }
            Err(e) => refuse(undecodable(e)),
        },
    }
}

/// The message, counted first (`census.rs`) so that decoding it allocates in proportion to
/// what arrived, then decoded.
fn decode(message: Bytes, typed_limit: usize) -> Result<ModelInferRequest, Status> {
    census::check(&message, typed_limit).map_err(refusal)?;
    ModelInferRequest::decode(message).map_err(undecodable)
}

/// The status of a message refused before it was decoded.
fn refusal(refused: Refused) -> Status {
    match refused {
        Refused::Over(e) => status_of(&e),
        Refused::Malformed(what) => {
            Status::internal(format!("failed to decode Protobuf message: {what}"))
        }
        // `check` has all the work it needs; `check_within`'s caller decides on the pool.
        Refused::Heavy => Status::internal("the message could not be checked"),
    }
}

/// prost's error says "failed to decode Protobuf message: ..." itself.
fn undecodable(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
}

fn ok_trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::with_capacity(1);
    t.insert("grpc-status", http::HeaderValue::from_static("0"));
    t
}

/// [`read_message`], then the rest of the body to its end: a unary call's one message, and
/// nothing after it (`INTERNAL` otherwise, as grpc-java answers a second message).
async fn read_only_message(mut body: Body, max: usize) -> Result<Bytes, Status> {
    let (message, mut more) = read_message(&mut body, max).await?;
    loop {
        if more {
            return Err(Status::internal(
                "a unary call has one message: more bytes followed it",
            ));
        }
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return Ok(message),
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => more = frame.data_ref().is_some_and(|d| !d.is_empty()),
        }
    }
}

/// The one length-prefixed message of a unary call, its declared length checked against `max`
/// as soon as the prefix has arrived: a slice of the first DATA frame when it holds it whole,
/// else the frames gathered into one buffer ([`Gather`]: it grows with what arrives, never past
/// the declared length, and is never sized by it). With it, whether more bytes came after it in
/// the frames read.
async fn read_message(body: &mut Body, max: usize) -> Result<(Bytes, bool), Status> {
    let mut gathered = Gather::default();
    let mut need: Option<usize> = None;
    loop {
        if need.is_none() {
            if let Some(head) = gathered.head::<5>() {
                if head[0] != 0 {
                    return Err(Status::unimplemented(
                        "compressed messages are not accepted; send them uncompressed",
                    ));
                }
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                if len > max {
                    return Err(Status::out_of_range(format!(
                        "the message is {len} bytes, more than the {max} accepted (server.max_body_bytes)"
                    )));
                }
                need = Some(5 + len);
            }
        }
        let have = gathered.len();
        if let Some(n) = need.filter(|&n| have >= n) {
            return Ok((gathered.finish().slice(5..n), have > n));
        }
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            None => return Err(Status::internal("the request ended before its message")),
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    gathered.push(data, need.unwrap_or(0));
                }
            }
        }
    }
}

/// A body of frames known in advance: a unary answer (one DATA frame, then the trailers).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend((message.len() as u32).to_be_bytes());
        v.extend(message);
        v
    }

    fn body(chunks: Vec<Vec<u8>>) -> Body {
        Body::new(Frames(
            chunks
                .into_iter()
                .map(|c| Frame::data(Bytes::from(c)))
                .collect(),
        ))
    }

    fn read(chunks: Vec<Vec<u8>>, max: usize) -> Result<Bytes, Status> {
        futures_executor(read_message(&mut body(chunks), max)).map(|(m, _)| m)
    }

    /// Runs a future that never waits (the test bodies are ready at once).
    fn futures_executor<F: Future>(f: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn a_message_in_one_frame_is_a_slice_of_it_and_split_ones_are_gathered() {
        let whole = framed(b"hello, tensors");
        let one = Bytes::from(whole.clone());
        let mut body = Body::new(Frames([Frame::data(one.clone())].into()));
        let (got, more) = futures_executor(read_message(&mut body, 1024)).unwrap();
        assert!(!more);
        assert_eq!(&got[..], b"hello, tensors");
        assert_eq!(got.as_ptr(), one[5..].as_ptr(), "not copied");
        // Split anywhere, even inside the length prefix.
        for cut in [1, 3, 5, 9] {
            let (a, b) = whole.split_at(cut);
            assert_eq!(
                &read(vec![a.to_vec(), b.to_vec()], 1024).unwrap()[..],
                b"hello, tensors"
            );
        }
        let (a, rest) = whole.split_at(2);
        let (b, c) = rest.split_at(6);
        assert_eq!(
            &read(vec![a.to_vec(), b.to_vec(), c.to_vec()], 1024).unwrap()[..],
            b"hello, tensors"
        );
    }

    #[test]
    fn a_repository_call_has_one_message_and_nothing_after_it() {
        let whole = framed(b"hello");
        let only = |chunks| futures_executor(read_only_message(body(chunks), 1024));
        assert_eq!(&only(vec![whole.clone()]).unwrap()[..], b"hello");
        // An empty DATA frame (a client ending its stream so) is not more.
        assert_eq!(&only(vec![whole.clone(), vec![]]).unwrap()[..], b"hello");
        let mut two = whole.clone();
        two.extend(framed(b"again"));
        for chunks in [vec![two], vec![whole.clone(), vec![0]]] {
            let e = only(chunks).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
            assert!(e.message().contains("one message"), "{e:?}");
        }
        // ModelInfer's reader answers without them.
        let mut body = body(vec![whole, vec![0]]);
        let (m, more) = futures_executor(read_message(&mut body, 1024)).unwrap();
        assert_eq!((&m[..], more), (&b"hello"[..], false));
    }

    #[test]
    fn a_declared_length_over_the_limit_compression_and_a_short_body_are_refused() {
        let mut lie = vec![0];
        lie.extend((1u32 << 30).to_be_bytes());
        lie.extend([0; 10]);
        let e = read(vec![lie], 1 << 20).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        assert_eq!(
            read(vec![compressed], 1024).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        let short = framed(b"hello")[..7].to_vec();
        assert_eq!(
            read(vec![short], 1024).unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
