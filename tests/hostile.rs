//! Hostile input: arbitrary bytes and mutated valid bodies into every parser a client reaches,
//! and into the config loader. Never a panic; always a 4xx (or a success) or a config error.
//! Case counts are bounded so the test command stays quick.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

const VALID_V2: &str = r#"{"id":"1","inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","data":[[1,2,3,4],[5,6,7,8]]}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}],"parameters":{"timeout":1000000}}"#;
const VALID_CONFIG: &str = "server: {http_addr: '127.0.0.1:0', max_body_bytes: 1MiB}\nmodels:\n  - name: m\n    path: mlp.onnx\n    devices: [cpu:0, {device: 'cpu:1', intra_op_threads: 1}]\n    batching: {max_batch_size: 8, max_queue_delay: 1ms}\n    tuning: {memory_headroom: 0.2}\n";

/// A valid body with a few bytes overwritten, inserted or cut.
fn mutated(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    prop::collection::vec((0..len, any::<u8>(), 0u8..3), 1..6).prop_map(move |edits| {
        let mut b = valid.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let at = at.min(b.len().saturating_sub(1));
            match kind {
                0 => b[at] = byte,
                1 => b.insert(at, byte),
                _ if !b.is_empty() => {
                    b.remove(at);
                }
                _ => {}
            }
        }
        b
    })
}

fn client_error_or_ok(status: u16) -> bool {
    status == 200 || (400..500).contains(&status)
}

#[test]
fn the_v2_parser_never_panics() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(300));
    let bodies = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        mutated(VALID_V2)
    ];
    runner
        .run(
            &(bodies, prop::option::of(0usize..600)),
            |(body, header_len)| {
                if let Err(e) = ortserve::http::parse_v2_request(&body, header_len) {
                    prop_assert!((400..500).contains(&e.0), "{e:?}");
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn the_binary_extension_parser_never_panics() {
    // A valid binary body: JSON header + 8 floats, then arbitrary header lengths and tails.
    let header = r#"{"inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","parameters":{"binary_data_size":32}}]}"#;
    let mut runner = TestRunner::new(RunnerConfig::with_cases(300));
    runner
        .run(
            &(0usize..200, prop::collection::vec(any::<u8>(), 0..80)),
            |(header_len, tail)| {
                let mut body = header.as_bytes().to_vec();
                body.extend_from_slice(&tail);
                if let Err(e) = ortserve::http::parse_v2_request(&body, Some(header_len)) {
                    prop_assert!((400..500).contains(&e.0), "{e:?}");
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn the_config_loader_never_panics() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(300));
    let texts = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        mutated(VALID_CONFIG),
    ];
    runner
        .run(&texts, |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(mut c) = ortserve::config::Config::from_yaml(&text) {
                c.resolve_paths(&fixtures());
                let _ = c.validate();
            }
            Ok(())
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_parsers_answer_hostile_bodies_with_4xx() {
    let (_state, router) = start(
        "server: {max_body_bytes: 64KiB}
models:
  - {name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}
  - name: img
    path: cnn.onnx
    devices: cpu
    batching: {max_batch_size: 4}
    image: {size: [64, 64], max_image_bytes: 32KiB, max_pixels: 1000000, max_images: 2}
    classification: {top_k: 3}",
    )
    .await;
    let png = {
        let img =
            image::RgbImage::from_fn(30, 20, |x, y| image::Rgb([x as u8 * 8, y as u8 * 12, 77]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let multipart_valid = {
        let mut b = b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
        b.extend_from_slice(&png);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    };
    let multipart_valid: &'static [u8] = Box::leak(multipart_valid.into_boxed_slice());
    let png: &'static [u8] = Box::leak(png.into_boxed_slice());
    let tf_valid: &'static str = r#"{"instances": [[1, 2, 3, 4], [0.5, 0.1, -1, 2]]}"#;

    // Generate the cases up front (proptest's runner is synchronous), then send them.
    let mut runner = TestRunner::new(RunnerConfig::with_cases(40));
    let mut cases: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    let strategies: [(&str, &str, BoxedStrategy<Vec<u8>>); 5] = [
        (
            "/v1/models/mlp:predict",
            "application/json",
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                mutated(tf_valid)
            ]
            .boxed(),
        ),
        (
            "/v2/models/mlp/infer",
            "application/json",
            mutated(VALID_V2).boxed(),
        ),
        (
            "/v1/models/img:predict",
            "multipart/form-data; boundary=XyZ",
            {
                let valid = multipart_valid;
                prop::collection::vec((0..valid.len(), any::<u8>()), 1..8)
                    .prop_map(move |edits| {
                        let mut b = valid.to_vec();
                        for (at, byte) in edits {
                            b[at] = byte;
                        }
                        b
                    })
                    .boxed()
            },
        ),
        ("/v1/models/img:predict", "image/png", {
            let valid = png;
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                prop::collection::vec((0..valid.len(), any::<u8>()), 1..8).prop_map(move |edits| {
                    let mut b = valid.to_vec();
                    for (at, byte) in edits {
                        b[at] = byte;
                    }
                    b
                }),
                (0..valid.len()).prop_map(move |cut| valid[..cut].to_vec()),
            ]
            .boxed()
        }),
        (
            "/v1/models/img:predict",
            "application/json",
            prop::collection::vec(any::<u8>(), 0..200)
                .prop_map(|b| {
                    let text: String = b.iter().map(|&c| (b'A' + c % 26) as char).collect();
                    format!(r#"{{"instances": [{{"b64": "{text}"}}]}}"#).into_bytes()
                })
                .boxed(),
        ),
    ];
    for (uri, ctype, strategy) in &strategies {
        for _ in 0..40 {
            let value = strategy.new_tree(&mut runner).unwrap().current();
            cases.push((uri, ctype, value));
        }
    }
    for (uri, ctype, body) in cases {
        let req = Request::post(uri)
            .header("content-type", ctype)
            .body(Body::from(body.clone()))
            .unwrap();
        let reply = send(&router, req).await;
        assert!(
            client_error_or_ok(reply.status.as_u16()),
            "{uri} ({ctype}) answered {} to {:?}: {}",
            reply.status,
            String::from_utf8_lossy(&body[..body.len().min(200)]),
            String::from_utf8_lossy(&reply.body)
        );
    }
    // Still serving.
    assert_eq!(get(&router, "/v2/health/ready").await.status.as_u16(), 200);
}
