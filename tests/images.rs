//! Images in, labels out, on the real EfficientNet-Lite0 (installed by scripts/setup_models.sh)
//! with the scikit-image test photos: every upload form, the tensor path, preprocessing against
//! a reference computation, and every kind of bad image.

mod common;

use std::io::Cursor;
use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::*;
use image::{ImageFormat, Rgb, RgbImage};
use ortserve::config::{ByteSize, ImageConfig};
use serde_json::{json, Value};

fn setup_dir() -> PathBuf {
    fixtures().join("../../.ortserve")
}

fn photo(name: &str) -> Vec<u8> {
    let path = setup_dir().join("data").join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{} ({e}); run scripts/setup_models.sh", path.display()))
}

const EFFNET: &str = "
server: {max_body_bytes: 4MiB}
models:
  - name: effnet
    path: ../../.ortserve/models/efficientnet_lite0.onnx
    devices: cpu
    batching: {max_batch_size: 4}
    image: {size: [224, 224], resize_shorter: 256, mean: [127, 127, 127], std: [128, 128, 128], max_image_bytes: 1MiB, max_pixels: 4000000, max_images: 3}
    classification: {labels: ../../.ortserve/models/imagenet_labels.txt, top_k: 5}
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
";

const URI: &str = "/v1/models/effnet:predict";

fn multipart(parts: &[(&str, &[u8])]) -> Request<Body> {
    let boundary = "ortserve-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(URI)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap()
}

fn raw(content_type: &str, bytes: Vec<u8>) -> Request<Body> {
    Request::post(URI)
        .header("content-type", content_type)
        .body(Body::from(bytes))
        .unwrap()
}

fn b64(images: &[&[u8]]) -> Value {
    let e = base64::engine::general_purpose::STANDARD;
    json!({"instances": images.iter().map(|b| json!({"b64": e.encode(b)})).collect::<Vec<_>>()})
}

fn labels(prediction: &Value) -> Vec<String> {
    prediction["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap().to_string())
        .collect()
}

fn check_photos(predictions: &Value, how: &str) {
    let cat = labels(&predictions[0]);
    let coffee = labels(&predictions[1]);
    assert!(
        cat[..3]
            .iter()
            .any(|l| ["tabby, tabby cat", "tiger cat", "Egyptian cat"].contains(&l.as_str())),
        "{how}: chelsea.png top 3 {cat:?}"
    );
    assert_eq!(coffee[0], "espresso", "{how}: coffee.png {coffee:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_photos_through_every_upload_form_and_as_a_tensor() {
    let (_state, router) = start(EFFNET).await;
    let (chelsea, coffee) = (photo("chelsea.png"), photo("coffee.png"));

    // Multipart with two image parts (a field of another name is ignored).
    let reply = send(
        &router,
        multipart(&[("image", &chelsea), ("note", b"hello"), ("image", &coffee)]),
    )
    .await;
    reply.assert_status(StatusCode::OK.as_u16());
    let multi = reply.json();
    check_photos(&multi["predictions"], "multipart");

    // The same photos as JPEG (quality 90), in one multipart request.
    let jpeg = |png_bytes: &[u8]| {
        let img = image::load_from_memory(png_bytes).unwrap().into_rgb8();
        let mut out = Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out.into_inner()
    };
    let reply = send(
        &router,
        multipart(&[("image", &jpeg(&chelsea)), ("image", &jpeg(&coffee))]),
    )
    .await;
    check_photos(&reply.json()["predictions"], "multipart JPEG");

    // Raw image bodies, one at a time.
    let a = send(&router, raw("image/png", chelsea.clone()))
        .await
        .json();
    let b = send(&router, raw("image/png", coffee.clone())).await.json();
    check_photos(
        &json!([a["predictions"][0], b["predictions"][0]]),
        "raw body",
    );

    // JSON b64 instances, with the raw logits requested.
    let reply = post_json(
        &router,
        &format!("{URI}?raw=true"),
        &b64(&[&chelsea, &coffee]),
    )
    .await;
    let j = reply.json();
    check_photos(&j["predictions"], "b64");
    assert_eq!(
        j["predictions"][0]["logits"].as_array().unwrap().len(),
        1000
    );
    for i in 0..2 {
        assert_eq!(
            j["predictions"][i]["classes"], multi["predictions"][i]["classes"],
            "same scores whatever the form"
        );
    }

    // The same photo preprocessed by the test and sent as a V2 tensor gives the same scores.
    let img = image::load_from_memory(&chelsea).unwrap().into_rgb8();
    let x = reference_preprocess(&img);
    let reply = post_json(
        &router,
        "/v2/models/effnet/infer",
        &v2_json(&[("input", &x)], false),
    )
    .await;
    let logits = &outputs(&reply)[0].3;
    let max = logits.iter().copied().fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    for class in multi["predictions"][0]["classes"].as_array().unwrap() {
        let i = class["index"].as_u64().unwrap() as usize;
        let p = (logits[i] - max).exp() / z;
        let served = class["score"].as_f64().unwrap();
        assert!(
            (p - served).abs() < 0.01,
            "class {i}: image path {served}, tensor path {p}"
        );
    }
}

fn small_cfg() -> ImageConfig {
    ImageConfig {
        resize_shorter: Some(32),
        mean: [127.0; 3],
        std: [128.0; 3],
        max_image_bytes: ByteSize(1 << 20),
        max_pixels: 1_000_000,
        max_images: 8,
        ..ImageConfig::new([24, 24])
    }
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn preprocessing_matches_the_reference_computation() {
    // A synthetic image through a small config...
    let img = RgbImage::from_fn(60, 45, |x, y| {
        Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
    });
    let t = ortserve::preprocess::preprocess(&png(&img), &small_cfg()).unwrap();
    assert_eq!(t.shape, vec![1, 3, 24, 24]);
    // Shorter side 45 -> 32, so 60 -> round(60 * 32 / 45) = 43; then the centre 24 × 24.
    let full = reference_resize(&img, 43, 32);
    let (left, top) = ((43 - 24) / 2, (32 - 24) / 2);
    let got = t.to_f32();
    let mut worst = 0f64;
    for c in 0..3 {
        for y in 0..24 {
            for x in 0..24 {
                let want = (full[(y + top) * 43 + x + left][c] - 127.0) / 128.0;
                worst = worst.max((got[(c * 24 + y) * 24 + x] as f64 - want).abs());
            }
        }
    }
    assert!(
        worst <= 2.0 / 128.0,
        "synthetic: largest difference {worst}"
    );
    // ...and a real photo through the EfficientNet config: within 2 levels of 8-bit pixels.
    let chelsea = photo("chelsea.png");
    let cfg = ImageConfig {
        size: [224, 224],
        resize_shorter: Some(256),
        max_image_bytes: ByteSize(1 << 20),
        max_pixels: 4_000_000,
        ..small_cfg()
    };
    let served = ortserve::preprocess::preprocess(&chelsea, &cfg)
        .unwrap()
        .to_f32();
    let reference =
        reference_preprocess(&image::load_from_memory(&chelsea).unwrap().into_rgb8()).to_f32();
    let worst = served
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 2.0 / 128.0 + 1e-6,
        "chelsea: largest difference {worst}"
    );
}

/// A valid PNG header declaring `w` × `h` pixels and almost no data.
fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    fn chunk(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut crc = !0u32;
        for &b in kind.iter().chain(body) {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out.extend_from_slice(&(!crc).to_be_bytes());
        out
    }
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    ));
    out.extend(chunk(b"IEND", &[]));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_refused_and_the_server_keeps_serving() {
    let (_state, router) = start(EFFNET).await;
    let chelsea = photo("chelsea.png");
    let expect = |what: &str, reply: Reply, status: u16, needle: &str| {
        let v = reply.json();
        assert_eq!(reply.status.as_u16(), status, "{what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{what}: {v}");
    };
    expect(
        "empty body",
        send(&router, raw("image/png", vec![])).await,
        400,
        "empty",
    );
    expect(
        "text as image/png",
        send(&router, raw("image/png", b"just some text".to_vec())).await,
        400,
        "not an image",
    );
    expect(
        "truncated",
        send(
            &router,
            raw("image/png", chelsea[..chelsea.len() / 3].to_vec()),
        )
        .await,
        400,
        "could not be decoded",
    );
    let mut corrupt = chelsea.clone();
    for b in &mut corrupt[100..4000] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    expect(
        "corrupt",
        send(&router, raw("image/png", corrupt)).await,
        400,
        "could not be decoded",
    );
    expect(
        "wrong content type",
        send(&router, raw("application/xml", b"<a/>".to_vec())).await,
        415,
        "application/xml",
    );
    expect(
        "unsupported image type",
        send(&router, raw("image/tiff", chelsea.clone())).await,
        415,
        "image/tiff",
    );
    let big = RgbImage::from_fn(1000, 800, |x, y| {
        Rgb([(x * 7 + y * 13) as u8, (x * y) as u8, (x ^ y) as u8])
    });
    let big = png(&big);
    assert!(
        big.len() > 1 << 20,
        "the test image must exceed max_image_bytes: {}",
        big.len()
    );
    expect(
        "image over max_image_bytes",
        send(&router, raw("image/png", big.clone())).await,
        413,
        "limit",
    );
    expect(
        "image over max_image_bytes (multipart)",
        send(&router, multipart(&[("image", &big)])).await,
        413,
        "limit",
    );
    let four: Vec<&[u8]> = vec![&chelsea; 4];
    expect(
        "too many images",
        post_json(&router, URI, &b64(&four)).await,
        413,
        "more than 3 images",
    );
    expect(
        "no image part",
        send(&router, multipart(&[("file", &chelsea)])).await,
        400,
        "no `image` part",
    );
    expect(
        "bad base64",
        post_json(&router, URI, &json!({"instances": [{"b64": "***"}]})).await,
        400,
        "base64",
    );
    expect(
        "not instances",
        post_json(&router, URI, &json!({"images": []})).await,
        400,
        "instances",
    );

    // A 50,000 × 50,000 bomb in a few dozen bytes: refused from its header.
    let bomb = bomb_png(50_000, 50_000);
    assert!(bomb.len() < 100);
    let before = ortserve::testing::process_rss().unwrap();
    expect(
        "decompression bomb",
        send(&router, raw("image/png", bomb.clone())).await,
        413,
        "50000 × 50000",
    );
    expect(
        "decompression bomb (b64)",
        post_json(&router, URI, &b64(&[&bomb])).await,
        413,
        "50000 × 50000",
    );
    let after = ortserve::testing::process_rss().unwrap();
    assert!(
        after < before + (200 << 20),
        "refusing the bomb allocated {} MiB",
        (after - before) >> 20
    );

    // Still serving.
    let ok = send(&router, raw("image/png", chelsea)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        get(&router, "/v2/health/ready").await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_models_take_tf_serving_instances() {
    let (_state, router) = start(EFFNET).await;
    let rows = [[1.0f32, 2.0, 3.0, 4.0], [0.5, 0.1, -1.0, 2.0]];
    let reply = post_json(
        &router,
        "/v1/models/mlp:predict",
        &json!({"instances": rows}),
    )
    .await;
    reply.assert_status(StatusCode::OK.as_u16());
    let got = reply.json();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let x = ortserve::tensor::Tensor::from_f32(vec![2, 4], &flat).unwrap();
    let want = run_reference(&mut reference("mlp.onnx"), &[x])[0].to_f32();
    for i in 0..2 {
        let row: Vec<f64> = got["predictions"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (j, v) in row.iter().enumerate() {
            assert!(
                (v - want[i * 3 + j] as f64).abs() < 1e-5,
                "row {i}: {row:?}"
            );
        }
    }
    let bad = post_json(
        &router,
        "/v1/models/mlp:predict",
        &json!({"instances": [[1, 2, 3]]}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let image_to_tensor_model = send(
        &router,
        Request::post("/v1/models/mlp:predict")
            .header("content-type", "image/png")
            .body(Body::from(photo("chelsea.png")))
            .unwrap(),
    )
    .await;
    assert_eq!(
        image_to_tensor_model.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        post_json(&router, "/v1/models/mlp:classify", &json!({}))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

/// PNGs are decoded by our own path (issue 24, finding 2): 16-bit samples to 8 bits row by row,
/// and a frame much larger than the model's input reduced by box averaging while it is decoded.
/// An Adam7-interlaced file gives the same tensor as the plain one, and both stay within three
/// 8-bit levels of the reference pipeline (which resizes the whole frame).
#[test]
fn sixteen_bit_and_interlaced_pngs_are_reduced_while_decoded_and_match_the_reference() {
    let (w, h) = (300u32, 200u32);
    let sample = |x: u32, y: u32, c: u32| -> u16 {
        let v = match c {
            0 => x * 65535 / w,
            1 => y * 65535 / h,
            _ => (x + y) * 65535 / (w + h),
        };
        v as u16
    };
    let px = |x, y| (0..3).flat_map(|c| sample(x, y, c).to_be_bytes()).collect();
    let plain = png_file((w, h), (2, 16), false, &[], px);
    let interlaced = png_file((w, h), (2, 16), true, &[], px);
    let cfg = small_cfg();
    let a = ortserve::preprocess::preprocess(&plain, &cfg).unwrap();
    let b = ortserve::preprocess::preprocess(&interlaced, &cfg).unwrap();
    assert_eq!(a.shape, vec![1, 3, 24, 24]);
    assert_eq!(a.to_f32(), b.to_f32(), "interlaced and plain differ");

    // The reference: the 8-bit image (high bytes) resized whole, shorter side 200 -> 32.
    let eight = RgbImage::from_fn(w, h, |x, y| {
        Rgb([0, 1, 2].map(|c| (sample(x, y, c) >> 8) as u8))
    });
    let rw = (300.0f64 * 32.0 / 200.0).round() as usize;
    let full = reference_resize(&eight, rw as u32, 32);
    let (left, top) = ((rw - 24) / 2, (32 - 24) / 2);
    let got = a.to_f32();
    let mut worst = 0f64;
    for c in 0..3 {
        for y in 0..24 {
            for x in 0..24 {
                let want = (full[(y + top) * rw + x + left][c] - 127.0) / 128.0;
                worst = worst.max((got[(c * 24 + y) * 24 + x] as f64 - want).abs());
            }
        }
    }
    assert!(worst <= 3.0 / 128.0, "largest difference {worst}");
}
