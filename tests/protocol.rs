//! The protocol's edges (issue 24, findings 5 and 6): non-finite floats both ways, what an empty
//! `outputs` list means, and what the server refuses that it used to take leniently (a second
//! `Inference-Header-Content-Length`, a parameter given twice, an upper-case `BEARER`). The
//! `Host` header rules are checked on a real socket in tests/connections.rs.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use serde_json::json;

const DTYPES: &str = "models: [{name: dtypes, path: dtypes.onnx, devices: cpu}]";

/// A request for the identity model of every datatype: the float inputs carry `floats` as raw
/// JSON text, the others zeros.
fn every_dtype(floats: &str) -> String {
    let names = [
        "fp32", "fp64", "fp16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
        "uint64", "bool",
    ];
    let inputs: Vec<String> = names
        .iter()
        .map(|n| {
            let data = match *n {
                "fp32" | "fp64" | "fp16" => floats.to_string(),
                "bool" => "[false,true,false]".into(),
                _ => "[0,1,2]".into(),
            };
            format!(
                r#"{{"name":"x_{n}","shape":[1,3],"datatype":"{}","data":{data}}}"#,
                n.to_uppercase()
            )
        })
        .collect();
    format!(r#"{{"inputs":[{}]}}"#, inputs.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_infinities_are_read_and_written_as_triton_does() {
    let (_s, router) = start(DTYPES).await;
    let req = |body: String| {
        Request::post("/v2/models/dtypes/infer")
            .body(Body::from(body))
            .unwrap()
    };
    let reply = send(&router, req(every_dtype("[NaN,Infinity,-Infinity]"))).await;
    reply.assert_status(200);
    let text = String::from_utf8(reply.body.clone()).unwrap();
    for t in [
        "fp32\",\"datatype\":\"FP32",
        "fp64\",\"datatype\":\"FP64",
        "fp16\",\"datatype\":\"FP16",
    ] {
        let want = format!("y_{t}\",\"shape\":[1,3],\"data\":[NaN,Infinity,-Infinity]}}");
        assert!(text.contains(&want), "{want} not in {text}");
    }
    assert!(!text.contains("null"), "{text}");
    // The words are read wherever a float may stand: nested, after other values, data first.
    let reply = send(
        &router,
        req(every_dtype("[[1.5,-Infinity,NaN]]").replace(
            r#"{"name":"x_fp64","shape":[1,3],"datatype":"FP64","data":[[1.5,-Infinity,NaN]]}"#,
            r#"{"data":[-Infinity,2,NaN],"name":"x_fp64","shape":[1,3],"datatype":"FP64"}"#,
        )),
    )
    .await;
    reply.assert_status(200);
    let text = String::from_utf8(reply.body.clone()).unwrap();
    assert!(text.contains("\"data\":[1.5,-Infinity,NaN]"), "{text}");
    assert!(text.contains("\"data\":[-Infinity,2.0,NaN]"), "{text}");
    // A finite number too large for its type is still refused, and the words only stand for
    // floats, whole and alone.
    for (floats, says) in [
        ("[1e39,0,0]", "x_fp32"),
        ("[NaNa,0,0]", "expected"),
        ("[Inf,0,0]", ""),
        ("[nan,0,0]", ""),
    ] {
        send(&router, req(every_dtype(floats)))
            .await
            .assert_error(400, says);
    }
    let ints = every_dtype("[0,0,0]").replace(
        r#""datatype":"INT32","data":[0,1,2]"#,
        r#""datatype":"INT32","data":[NaN,1,2]"#,
    );
    send(&router, req(ints)).await.assert_status(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_outputs_list_asks_for_every_output() {
    let (_s, router) = start(DTYPES).await;
    let mut body: serde_json::Value = serde_json::from_str(&every_dtype("[1,2,3]")).unwrap();
    body["outputs"] = json!([]);
    let reply = post_json(&router, "/v2/models/dtypes/infer", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.json()["outputs"].as_array().unwrap().len(), 12);
    body["outputs"] = json!([{"name": "y_int8"}]);
    let reply = post_json(&router, "/v2/models/dtypes/infer", &body).await;
    assert_eq!(reply.json()["outputs"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_framing_and_parameters_are_refused() {
    let (_s, router) = start("models: [{name: mlp, path: mlp.onnx, devices: cpu}]").await;
    let header = br#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#;
    let body = [&header[..], &[0u8; 16][..]].concat();
    let binary = |lens: &[usize]| {
        let mut b = Request::post("/v2/models/mlp/infer")
            .header("content-type", "application/octet-stream");
        for l in lens {
            b = b.header("inference-header-content-length", *l);
        }
        b.body(Body::from(body.clone())).unwrap()
    };
    send(&router, binary(&[header.len()]))
        .await
        .assert_status(200);
    send(&router, binary(&[header.len(), header.len()]))
        .await
        .assert_error(400, "more than once");
    send(&router, binary(&[header.len(), 3]))
        .await
        .assert_error(400, "more than once");

    // A parameter given twice, at each level (as text: `json!` would keep one key).
    let dup_request = r#"{"parameters":{"timeout":1000000,"timeout":1},"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
    let dup_input = r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4],"parameters":{"a":1,"a":2}}]}"#;
    let dup_output = r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"outputs":[{"name":"logits","parameters":{"binary_data":true,"binary_data":false}}]}"#;
    for text in [dup_request, dup_input, dup_output] {
        let r = Request::post("/v2/models/mlp/infer")
            .body(Body::from(text))
            .unwrap();
        send(&router, r)
            .await
            .assert_error(400, "duplicate parameter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let mut c = config(
        "server: {auth: {tokens_env: T}}\nmodels: [{name: mlp, path: mlp.onnx, devices: cpu}]",
    );
    c.load_tokens(|k| (k == "T").then(|| "token-0123456789abcdef".to_string()))
        .unwrap();
    let (_s, router) = start_config(&c).await;
    for (value, status) in [
        ("Bearer token-0123456789abcdef", 200),
        ("BEARER token-0123456789abcdef", 200),
        ("bearer  token-0123456789abcdef", 200),
        ("Basic token-0123456789abcdef", 401),
        ("Bearertoken-0123456789abcdef", 401),
    ] {
        let r = Request::get("/v2/models/mlp")
            .header("authorization", value)
            .body(Body::empty())
            .unwrap();
        send(&router, r).await.assert_status(status);
    }
}
