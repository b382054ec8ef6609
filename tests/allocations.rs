//! No number a client declares (a Content-Length, a header length, a shape) may size an
//! allocation beyond the bytes that actually arrived, and every route's body counts against
//! `max_body_bytes` (issue 13, findings 3 and 4). This test binary counts the largest single
//! allocation made while each request is handled; it holds one test so nothing else allocates
//! meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::http::Request;
use common::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;

/// Sends `req` and returns the reply with the largest allocation made meanwhile.
async fn measured(router: &axum::Router, req: Request<Body>) -> (Reply, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let reply = send(router, req).await;
    (reply, LARGEST.load(Ordering::Relaxed))
}

/// A body that arrives in `n` frames of `size` bytes of `byte`.
fn frames(n: usize, size: usize, byte: u8) -> Body {
    Body::from_stream(futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(Bytes::from(vec![byte; size]))),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_sizes_never_size_an_allocation_and_every_body_counts() {
    let (_s, router) = start(
        "server: {max_body_bytes: 64MiB}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
  - name: img
    path: cnn.onnx
    devices: cpu
    image: {size: [64, 64], resize_shorter: 72, max_image_bytes: 8MiB}",
    )
    .await;

    // The binary extension: Content-Length says 60 MiB, 11 bytes come.
    let req = Request::post("/v2/models/mlp/infer")
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", 11)
        .header("content-length", 60 * MIB)
        .body(Body::from(&b"{\"inputs\":["[..]))
        .unwrap();
    let (reply, largest) = measured(&router, req).await;
    reply.assert_status(400);
    assert!(
        largest < MIB,
        "an 11-byte binary body made a {largest}-byte allocation"
    );

    // A shape of 2^28 elements over two values of data.
    let req = Request::post("/v2/models/mlp/infer")
        .body(Body::from(
            r#"{"inputs":[{"name":"input","shape":[67108864,4],"datatype":"FP32","data":[1,2]}]}"#,
        ))
        .unwrap();
    let (reply, largest) = measured(&router, req).await;
    reply.assert_status(400);
    assert!(
        largest < MIB,
        "a 100-byte JSON body made a {largest}-byte allocation"
    );

    // Multipart, chunked, over a smaller limit: no boundary ever comes; one huge non-image part.
    let (_small, small) = start(
        "server: {max_body_bytes: 1MiB}
models:
  - name: img
    path: cnn.onnx
    devices: cpu
    image: {size: [64, 64], resize_shorter: 72}",
    )
    .await;
    let req = Request::post("/v1/models/img:predict")
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(frames(64, 64 * 1024, b'a'))
        .unwrap();
    let (reply, largest) = measured(&small, req).await;
    reply.assert_status(413);
    assert!(
        largest < 4 * MIB,
        "4 MiB without a boundary made a {largest}-byte allocation"
    );
    let mut part = b"--XYZ\r\nContent-Disposition: form-data; name=\"notes\"\r\n\r\n".to_vec();
    part.extend(vec![b'n'; 3 * MIB]);
    part.extend_from_slice(b"\r\n--XYZ--\r\n");
    let req = Request::post("/v1/models/img:predict")
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(Body::from_stream(futures_util::stream::iter(
            part.chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    let reply = send(&small, req).await;
    assert_eq!(
        reply.status,
        413,
        "a 3 MiB part that is not an image still counts: {}",
        String::from_utf8_lossy(&reply.body)
    );
    // An endless part header.
    let mut head = b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\nX-Pad: ".to_vec();
    head.extend(vec![b'p'; 2 * MIB]);
    let req = Request::post("/v1/models/img:predict")
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(Body::from_stream(futures_util::stream::iter(
            head.chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    let reply = send(&small, req).await;
    assert!(
        [400, 413].contains(&reply.status.as_u16()),
        "an endless part header: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
}
