//! No number a client declares (a Content-Length, a header length, a shape) may size an
//! allocation beyond the bytes that actually arrived, and every route's body counts against
//! `max_body_bytes` (issue 13, findings 3 and 4); a big image is held once while it is
//! preprocessed. This test binary counts the largest single allocation and the peak of live
//! bytes while each request is handled; it holds one test so nothing else allocates meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::http::Request;
use common::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
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

/// Sends `req` and returns the reply with how far live bytes rose above where they started.
async fn peak_growth(router: &axum::Router, req: Request<Body>) -> (Reply, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let reply = send(router, req).await;
    (reply, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// Posts a PNG to the `img` model, checks it is served (200), and returns how far live bytes
/// rose meanwhile.
async fn png_served(router: &axum::Router, png: Vec<u8>) -> usize {
    let req = Request::post("/v1/models/img:predict")
        .header("content-type", "image/png")
        .body(Body::from(png))
        .unwrap();
    let (reply, growth) = peak_growth(router, req).await;
    reply.assert_status(200);
    growth
}

/// `bytes` as a body that arrives in 64 KiB frames.
fn in_frames(bytes: &[u8]) -> Body {
    Body::from_stream(futures_util::stream::iter(
        bytes
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ))
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

    // A 3 MiB body in 64 KiB frames with its Content-Length: gathered in a buffer that stops
    // growing at the declared length (doubling alone would end in a 4 MiB one).
    let mut json =
        br#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#
            .to_vec();
    json.resize(3 * MIB + 1, b' ');
    let req = Request::post("/v2/models/mlp/infer")
        .header("content-length", json.len())
        .body(in_frames(&json))
        .unwrap();
    let (reply, largest) = measured(&router, req).await;
    reply.assert_status(200);
    assert!(
        largest <= json.len(),
        "a {}-byte body made a {largest}-byte allocation",
        json.len()
    );

    // The binary extension the same way: a 3 MiB tensor tail in 64 KiB frames ends in a 3 MiB
    // buffer (it grew to 4 MiB before).
    let header = br#"{"inputs":[{"name":"input","shape":[196608,4],"datatype":"FP32","parameters":{"binary_data_size":3145728}}]}"#;
    let mut body = header.to_vec();
    body.resize(header.len() + 3 * MIB, 0);
    let req = Request::post("/v2/models/mlp/infer")
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", header.len())
        .header("content-length", body.len())
        .body(in_frames(&body))
        .unwrap();
    let (reply, largest) = measured(&router, req).await;
    assert_ne!(reply.status, 413, "{:?}", reply.json());
    assert!(
        largest <= 3 * MIB,
        "a 3 MiB binary tail made a {largest}-byte allocation"
    );

    // 300,000 TF-Serving instances (3 MB of JSON) for a model that takes a few thousand rows per
    // request: refused when the parser reaches one too many, not after listing them all and
    // converting every value (4.8 MB of list and 4.8 MB of tensor).
    let mut body = b"{\"instances\":[".to_vec();
    for i in 0..300_000 {
        body.extend_from_slice(if i == 0 { b"[1,2,3,4]" } else { b",[1,2,3,4]" });
    }
    body.extend_from_slice(b"]}");
    let req = Request::post("/v1/models/mlp:predict")
        .body(Body::from(body))
        .unwrap();
    let (reply, growth) = peak_growth(&router, req).await;
    reply.assert_error(400, "rows per request");
    assert!(
        growth < MIB,
        "300,000 instances raised live memory by {growth} bytes"
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
        .body(in_frames(&part))
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
        .body(in_frames(&head))
        .unwrap();
    let reply = send(&small, req).await;
    assert!(
        [400, 413].contains(&reply.status.as_u16()),
        "an endless part header: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );

    // A 2000 × 2000 grey PNG (4 MB of pixels decoded) is resized as grey and only its small
    // resized frame is converted to RGB: the decoded frame is never copied (it used to be turned
    // into RGB, 12 MB, and that copied again for the resizer, 12 MB more).
    let mut png = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_fn(2000, 2000, |x, y| image::Luma([((x ^ y) & 0xff) as u8]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let growth = png_served(&router, png.into_inner()).await;
    assert!(
        growth < 8 * MIB,
        "a 4-megapixel grey image raised live memory by {growth} bytes"
    );

    // Issue 24, finding 2. A 64 × 64 PNG whose ICC profile inflates to 256 MiB: the profile is
    // skipped, not inflated (the image crate inflated it, up to 16 × max_pixels bytes).
    let icc = [b"bomb\0\0".to_vec(), zlib_zeros(256 * MIB)].concat();
    let bomb = png_file((64, 64), (2, 8), false, &[(*b"iCCP", icc)], |x, y| {
        vec![x as u8, y as u8, 7]
    });
    let growth = png_served(&router, bomb).await;
    assert!(
        growth < 8 * MIB,
        "a 64 × 64 PNG with a 256 MiB ICC profile raised live memory by {growth} bytes"
    );

    // A 16-bit RGBA PNG of 4000 × 4000 (128 MB of samples): decoded row by row into 8 bits and
    // reduced while decoded, never held whole (it was held at 8 bytes a pixel, then copied).
    let deep = png_file((4000, 4000), (6, 16), false, &[], |x, y| {
        let v = (((x / 500 + y / 500) % 16) as u16 * 4000).to_be_bytes();
        [v, v, v, [0xff, 0xff]].concat()
    });
    let growth = png_served(&router, deep).await;
    assert!(
        growth < 16 * MIB,
        "a 16-megapixel 16-bit PNG raised live memory by {growth} bytes"
    );
}
