//! docs/openapi.yaml against the router: the same paths and methods, each routed, and the
//! document valid OpenAPI 3 (openapi-spec-validator, from scripts/setup_tools.sh).

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_yaml_ng::Value;

/// (METHOD, path) of every operation in the document.
fn documented() -> BTreeSet<(String, String)> {
    let doc: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("docs/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap();
            if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&m) {
                out.insert((m.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    out
}

/// (METHOD, path) of every `.route(path, get(..)/post(..))` in crates/http/src/lib.rs, where the
/// router is built.
fn routed() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(root().join("crates/http/src/lib.rs")).unwrap();
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        // This call's arguments: up to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let call: String = rest
            .chars()
            .take_while(|&c| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth > 0
            })
            .collect();
        let Some(path) = call.split('"').nth(1) else {
            continue;
        };
        for m in ["get", "post", "put", "delete", "patch"] {
            if call.contains(&format!("{m}(routes::")) {
                out.insert((m.to_uppercase(), path.to_string()));
            }
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_has() {
    let (doc, router) = (documented(), routed());
    assert!(
        router.len() >= 15,
        "the route scan found too few: {router:?}"
    );
    assert_eq!(
        doc.difference(&router).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not routed"
    );
    assert_eq!(
        router.difference(&doc).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed but not documented"
    );
}

#[test]
fn the_document_is_valid_openapi() {
    let out = std::process::Command::new(tool("python"))
        .args(["-m", "openapi_spec_validator"])
        .arg(root().join("docs/openapi.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every documented operation is routed (no `not_found`, no 405), and the server serves the
/// document itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_the_document_is_served() {
    let (_s, router) = start_config(&config(
        "models: [{name: mlp, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 4}}]",
    ))
    .await;
    for (method, path) in documented() {
        let uri = path
            .replace("{model}", "mlp")
            .replace("{version}", "1")
            .replace("{target}", "mlp:predict");
        let req = axum::http::Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .header("content-type", "application/json")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let r = send(&router, req).await;
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            r.status != 405 && !body.contains("\"error_type\":\"not_found\""),
            "{method} {uri}: {} {body}",
            r.status
        );
    }
    let r = get(&router, "/openapi.yaml").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        std::fs::read(root().join("docs/openapi.yaml")).unwrap()
    );
}
