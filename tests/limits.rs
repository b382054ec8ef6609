//! Hostile and malformed input that used to be answered wrongly or at a cost out of proportion
//! to its size (issue 13): each case must get a clear 4xx (or a startup error), fast.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{json, Value};

const MODELS: &str = "models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
  - name: img
    path: cnn.onnx
    devices: cpu
    batching: {max_batch_size: 4}
    image: {size: [64, 64], resize_shorter: 72, max_pixels: 1000000}
    classification: {top_k: 3}";

fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

async fn post(router: &axum::Router, uri: &str, ctype: &str, body: Vec<u8>) -> Reply {
    let req = Request::post(uri)
        .header("content-type", ctype)
        .body(Body::from(body))
        .unwrap();
    send(router, req).await
}

fn error_type(reply: &Reply) -> String {
    reply.json()["error_type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extreme_aspect_ratio_is_refused_before_resizing() {
    let (_s, router) = start(MODELS).await;
    // 1 × 5000: decoding is 5,000 pixels, but the shorter side to 72 makes 72 × 360,000
    // = 25.9 M pixels, over max_pixels (1 M). (1 × 100,000 at 256 asked for 19.6 GB.)
    let thin = image::RgbImage::from_fn(1, 5000, |_, y| image::Rgb([y as u8, 0, 9]));
    let reply = post(
        &router,
        "/v1/models/img:predict",
        "image/png",
        encoded(&thin, image::ImageFormat::Png),
    )
    .await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE.as_u16(), "max_pixels");
    // A panorama well inside the limit still works.
    let wide = image::RgbImage::from_fn(600, 100, |x, _| image::Rgb([x as u8, 50, 9]));
    let reply = post(
        &router,
        "/v1/models/img:predict",
        "image/png",
        encoded(&wide, image::ImageFormat::Png),
    )
    .await;
    reply.assert_status(StatusCode::OK.as_u16());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_outputs_are_refused() {
    let (_s, router) = start(MODELS).await;
    let body = json!({
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "logits"}, {"name": "logits"}],
    });
    let reply = post_json(&router, "/v2/models/mlp/infer", &body).await;
    reply.assert_error(StatusCode::BAD_REQUEST.as_u16(), "more than once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ragged_or_out_of_range_data_is_refused() {
    let (_s, router) = start(MODELS).await;
    let infer = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]});
    let cases = [
        (
            "ragged rows",
            infer(json!([2, 4]), "FP32", json!([[1, 2, 3], [4, 5, 6, 7, 8]])),
        ),
        (
            "rows too long",
            infer(json!([2, 4]), "FP32", json!([[1, 2, 3, 4, 5, 6, 7, 8], []])),
        ),
        (
            "over FP32's range",
            infer(json!([1, 4]), "FP32", json!([1, 2, 3, 1e39])),
        ),
    ];
    for (what, body) in cases {
        let reply = post_json(&router, "/v2/models/mlp/infer", &body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    // Nested as the shape says, or flat: both fine.
    for data in [
        json!([[1, 2, 3, 4], [5, 6, 7, 8]]),
        json!([1, 2, 3, 4, 5, 6, 7, 8]),
    ] {
        let reply = post_json(
            &router,
            "/v2/models/mlp/infer",
            &infer(json!([2, 4]), "FP32", data),
        )
        .await;
        reply.assert_status(StatusCode::OK.as_u16());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_jpeg_is_refused() {
    let (_s, router) = start(MODELS).await;
    let img = image::RgbImage::from_fn(96, 80, |x, y| image::Rgb([x as u8 * 2, y as u8 * 3, 40]));
    let jpeg = encoded(&img, image::ImageFormat::Jpeg);
    let whole = post(
        &router,
        "/v1/models/img:predict",
        "image/jpeg",
        jpeg.clone(),
    )
    .await;
    assert_eq!(
        whole.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    let cut = jpeg[..jpeg.len() * 2 / 3].to_vec();
    let reply = post(&router, "/v1/models/img:predict", "image/jpeg", cut).await;
    reply.assert_status(StatusCode::BAD_REQUEST.as_u16());
    assert_eq!(error_type(&reply), "invalid_input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifier_over_a_non_float_output_is_a_startup_error() {
    let c = config(
        "models: [{name: g, path: int64_gather.onnx, devices: cpu, classification: {output: next}}]",
    );
    let err = ortserve::start(&c).await.err().expect("refused at startup");
    assert!(err.to_string().contains("next"), "{err}");
    assert!(err.to_string().contains("FP32"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_that_could_forge_log_fields_are_replaced() {
    let (_s, router) = start(MODELS).await;
    let with_id = |id: &str| {
        Request::get("/v2/health/live")
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap()
    };
    let kept = send(&router, with_id("client-42.a:b")).await;
    assert_eq!(kept.headers["x-request-id"], "client-42.a:b");
    let long = "x".repeat(300);
    for hostile in ["abc method=DELETE path=/admin", "a\"b", long.as_str()] {
        let reply = send(&router, with_id(hostile)).await;
        let id = reply.headers["x-request-id"].to_str().unwrap();
        assert_ne!(id, hostile);
        assert!(uuid_like(id), "{id}");
    }
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_json_body() {
    let (_s, router) = start(MODELS).await;
    let wrong_method = get(&router, "/v2/models/mlp/infer").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_type(&wrong_method), "method_not_allowed");
    let png = encoded(&image::RgbImage::new(64, 64), image::ImageFormat::Png);
    let bad_query = post(
        &router,
        "/v1/models/img:predict?raw=maybe",
        "image/png",
        png,
    )
    .await;
    assert_eq!(bad_query.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&bad_query), "malformed_body");
    let bad_path = get(&router, "/v2/models/%FF%FE/ready").await;
    assert_eq!(
        bad_path.status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&bad_path.body)
    );
    assert_eq!(error_type(&bad_path), "malformed_body");
}

/// The decoding one request can ask for is bounded by `max_request_pixels` over all its images
/// (eight small files that each declare the most pixels allowed used to hold the only slot for
/// 38 s), and requests share the slots: a one-image request is not queued behind all of another
/// request's images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessing_is_bounded_per_request_and_shared() {
    let (_s, router) = start(
        "runtime: {preprocess_threads: 1}
models:
  - name: img
    path: cnn.onnx
    devices: cpu
    batching: {max_batch_size: 8}
    image: {size: [64, 64], max_pixels: 4000000, max_request_pixels: 2000000, max_images: 8}",
    )
    .await;
    let big = encoded(
        &image::RgbImage::from_fn(1200, 1200, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (y * 3) as u8])
        }),
        image::ImageFormat::Png,
    );
    let parts = |images: &[&[u8]]| {
        let mut body = Vec::new();
        for image in images {
            body.extend_from_slice(b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n");
            body.extend_from_slice(image);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XYZ--\r\n");
        body
    };
    let multipart = |n: usize| parts(&vec![&big[..]; n]);
    // Two images of 1.44 M pixels: each within max_pixels, together over max_request_pixels.
    let reply = post(
        &router,
        "/v1/models/img:predict",
        "multipart/form-data; boundary=XYZ",
        multipart(2),
    )
    .await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE.as_u16(), "max_request_pixels");
    // Checked from the headers before any image is decoded: the first image's pixel data is cut
    // short, but the second one's header already puts the request over its budget.
    let reply = post(
        &router,
        "/v1/models/img:predict",
        "multipart/form-data; boundary=XYZ",
        parts(&[&big[..big.len() / 2], &big]),
    )
    .await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE.as_u16(), "image 1: ");

    // Sharing: with one slot, a one-image request sent while a five-image request is being
    // decoded finishes first.
    let (_s, router) = start(
        "runtime: {preprocess_threads: 1}
models:
  - name: img
    path: cnn.onnx
    devices: cpu
    batching: {max_batch_size: 8}
    image: {size: [64, 64], max_images: 8}",
    )
    .await;
    let many = multipart(5);
    let first = tokio::spawn({
        let r = router.clone();
        async move {
            let reply = post(
                &r,
                "/v1/models/img:predict",
                "multipart/form-data; boundary=XYZ",
                many,
            )
            .await;
            (reply.status, std::time::Instant::now())
        }
    });
    // Once the first of its images is decoded (its body has arrived), send the other request.
    for _ in 0..2000 {
        let text = String::from_utf8(get(&router, "/metrics").await.body).unwrap();
        if metric(
            &text,
            "ortserve_preprocess_duration_seconds_count",
            &[("model", "img")],
        ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let (status, one_done) = {
        let reply = post(&router, "/v1/models/img:predict", "image/png", big.clone()).await;
        (reply.status, std::time::Instant::now())
    };
    let (many_status, many_done) = first.await.unwrap();
    assert_eq!((status, many_status), (StatusCode::OK, StatusCode::OK));
    assert!(
        one_done < many_done,
        "the one-image request waited for all five images of the other"
    );
}

/// A big JSON body is decoded off the async workers: with one worker, the liveness probe is
/// answered while a 13 MB `instances` body is being parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_big_json_body_does_not_hold_the_health_probe() {
    let (_s, router) = start(
        "server: {max_body_bytes: 16MiB}
models: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}]",
    )
    .await;
    let row = "[0.123456789,1.23456789,2.3456789,3.456789]";
    let mut body = String::from("{\"instances\":[");
    for i in 0..300_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(row);
    }
    body.push_str("]}");
    assert!(body.len() > 12_000_000);
    // The probe runs as a task, on the one worker with the request (the test's own thread is
    // not a worker); a late wake-up from its 5 ms sleep counts against it too.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = tokio::spawn({
        let (r, done) = (router.clone(), done.clone());
        async move {
            let (mut slowest, mut probes) = (std::time::Duration::ZERO, 0);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let t = std::time::Instant::now();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                assert_eq!(get(&r, "/v2/health/live").await.status, StatusCode::OK);
                slowest = slowest.max(
                    t.elapsed()
                        .saturating_sub(std::time::Duration::from_millis(5)),
                );
                probes += 1;
            }
            (slowest, probes)
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let big = tokio::spawn(async move {
        let status = post(
            &router,
            "/v1/models/mlp:predict",
            "application/json",
            body.into_bytes(),
        )
        .await
        .status;
        done.store(true, std::sync::atomic::Ordering::Release);
        status
    });
    let status = big.await.unwrap();
    let (slowest, probes) = probe.await.unwrap();
    eprintln!("slowest of {probes} probes: {slowest:?}");
    // 300,000 rows are more than the model's queue takes: refused after parsing.
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        slowest < std::time::Duration::from_millis(100),
        "the liveness probe took {slowest:?} while the body was parsed"
    );
}

/// Body bytes held at once over all requests are bounded by `max_body_memory`: a body that
/// would go over is answered 503 at once, and the budget comes back when a request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_memory_is_shared_and_shed_not_queued() {
    let (_s, router) = start(
        "server: {max_body_bytes: 1KiB, max_body_memory: 1KiB, body_timeout: 400ms}
models: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}]",
    )
    .await;
    // 800 bytes of a body, then nothing: held until its body_timeout.
    let stalled = Body::from_stream(futures_util::stream::unfold(0, |n| async move {
        if n == 0 {
            Some((
                Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 800])),
                1,
            ))
        } else {
            std::future::pending().await
        }
    }));
    let slow = tokio::spawn({
        let r = router.clone();
        async move {
            send(
                &r,
                Request::post("/v2/models/mlp/infer").body(stalled).unwrap(),
            )
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let body = format!(
        "{}{}",
        " ".repeat(700),
        json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    );
    let t = std::time::Instant::now();
    let shed = post(
        &router,
        "/v2/models/mlp/infer",
        "application/json",
        body.clone().into_bytes(),
    )
    .await;
    shed.assert_status(503);
    assert!(
        t.elapsed() < std::time::Duration::from_millis(200),
        "shed at once"
    );
    slow.await.unwrap().assert_status(408);
    post(
        &router,
        "/v2/models/mlp/infer",
        "application/json",
        body.into_bytes(),
    )
    .await
    .assert_status(200);
}
