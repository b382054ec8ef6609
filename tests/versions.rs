//! Versioned model repositories (`NAME/VERSION/model.onnx`) with real ONNX Runtime sessions:
//! version policies and version routes, a new version swapped in under continuous load with
//! every answer naming the version that ran, a corrupt version, `swap: replace`, and the poller
//! applying changes to the config file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ortserve::config::Config;
use ortserve::tensor::Tensor;
use serde_json::{json, Value};

fn x() -> Tensor {
    Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap()
}

/// Puts a copy of fixture `fixture` in `repo/name/version/model.onnx` the way a sync would: all
/// of it written in a folder beside, then renamed into place.
fn add_version(repo: &Path, name: &str, version: u32, fixture: &str) -> PathBuf {
    let model = repo.join(name);
    std::fs::create_dir_all(&model).unwrap();
    let staging = model.join(format!(".tmp-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(fixtures().join(fixture), staging.join("model.onnx")).unwrap();
    let folder = model.join(version.to_string());
    std::fs::rename(&staging, &folder).unwrap();
    folder.join("model.onnx")
}

/// Writes `text` to `path` as a ConfigMap update lands: a new file renamed over the old.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts a server from a config file `yaml` written into `dir` (so the poller and the
/// repository API read it again from there).
async fn start_file(dir: &Path, yaml: &str) -> (Served, axum::Router, PathBuf) {
    let file = dir.join("config.yaml");
    write_atomically(&file, yaml);
    let config = Config::load(&file).expect("test config is valid");
    let (served, router) = start_config(&config).await;
    (served, router, file)
}

/// `model_control` settings for [`serve_m`].
const POLL: &str = "model_control: poll, poll_interval: 100ms";
const EXPLICIT: &str = "model_control: explicit";

/// A server whose model `m` is the versioned folder `repo/m`, holding the MLP as version 1, with
/// `server` settings and the model's `extra` settings. Returns the folder (keep it), the
/// repository's path, the state and the router.
async fn serve_m(server: &str, extra: &str) -> (tempfile::TempDir, PathBuf, Served, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "m", 1, "mlp.onnx");
    let (served, router, _) = start_file(
        dir.path(),
        &format!(
            "server: {{{server}}}\nmodels:\n  - {{name: m, path: repo/m, {extra}devices: cpu, batching: {{max_batch_size: 8}}}}"
        ),
    )
    .await;
    (dir, repo, served, router)
}

use common::post_empty as post;
use common::repository_index as index;

/// One inference (JSON, or the binary extension when `binary`) at `path`: the status and the
/// `model_version` the answer names.
async fn infer(router: &axum::Router, path: &str, binary: bool) -> (u16, Option<String>, Reply) {
    let reply = if binary {
        let (body, header_len) = v2_binary(&[("input", &x())]);
        send(
            router,
            Request::post(path)
                .header("inference-header-content-length", header_len)
                .header("content-type", "application/octet-stream")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    } else {
        post_json(router, path, &v2_json(&[("input", &x())], false)).await
    };
    let header_len = reply
        .headers
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(reply.body.len());
    let version = serde_json::from_slice::<Value>(&reply.body[..header_len])
        .ok()
        .and_then(|v| v["model_version"].as_str().map(str::to_string));
    (reply.status.as_u16(), version, reply)
}

async fn version_at(router: &axum::Router, path: &str) -> Option<String> {
    let (status, version, reply) = infer(router, path, false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply.body));
    version
}

fn states(index: &Value) -> Vec<(String, String, String)> {
    index
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["version"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn row(name: &str, version: &str, state: &str) -> (String, String, String) {
    (name.into(), version.into(), state.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_folder_serves_the_versions_its_policy_chooses() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    for v in [1, 2, 3] {
        add_version(&repo, "m", v, "mlp.onnx");
    }
    // Not versions: a folder whose name is not a positive whole number, or that has no model.
    add_version(&repo, "m", 0, "mlp.onnx");
    std::fs::create_dir_all(repo.join("m/04")).unwrap();
    std::fs::create_dir_all(repo.join("m/9")).unwrap();
    let (served, router, _) = start_file(
        dir.path(),
        "models:\n  - {name: m, path: repo/m, version_policy: {latest: 2}, devices: cpu, batching: {max_batch_size: 8}}",
    )
    .await;
    let meta = get(&router, "/v2/models/m").await;
    meta.assert_status(200);
    assert_eq!(meta.json()["versions"], json!(["2", "3"]));
    assert_eq!(
        version_at(&router, "/v2/models/m/infer").await.as_deref(),
        Some("3"),
        "without a version, the highest"
    );
    assert_eq!(
        version_at(&router, "/v2/models/m/versions/2/infer")
            .await
            .as_deref(),
        Some("2")
    );
    let (status, _, _) = infer(&router, "/v2/models/m/versions/1/infer", false).await;
    assert_eq!(status, 404, "version 1 is not chosen");
    get(&router, "/v2/models/m/versions/2/ready")
        .await
        .assert_status(200);
    get(&router, "/v2/models/m/versions/1/ready")
        .await
        .assert_status(404);
    assert_eq!(
        states(&index(&router).await),
        vec![row("m", "2", "READY"), row("m", "3", "READY")]
    );
    served.shutdown().await;
}

/// `--model-dir` with Triton's layout: `DIR/NAME/VERSION/model.onnx`, the model's settings
/// (here `version_policy: all` and `specific`) in `DIR/NAME/ortserve.yaml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_dir_in_the_triton_layout_serves_each_models_versions() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    for v in [1, 2] {
        add_version(repo, "every", v, "mlp.onnx");
    }
    for v in [1, 2, 3] {
        add_version(repo, "some", v, "mlp.onnx");
    }
    let settings = "devices: cpu\nbatching: {max_batch_size: 4}\n";
    std::fs::write(
        repo.join("every/ortserve.yaml"),
        format!("{settings}version_policy: all\n"),
    )
    .unwrap();
    std::fs::write(
        repo.join("some/ortserve.yaml"),
        format!("{settings}version_policy: {{specific: [1, 3, 7]}}\n"),
    )
    .unwrap();
    let config = Config::for_serve(None, Some(repo), None, None, None).unwrap();
    let (served, router) = start_config(&config).await;
    let versions = |m: &str| {
        served
            .registry()
            .versions(m)
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(versions("every"), ["1", "2"]);
    assert_eq!(versions("some"), ["1", "3"]);
    for (path, want) in [
        ("/v2/models/every/versions/1/infer", "1"),
        ("/v2/models/every/infer", "2"),
        ("/v2/models/some/versions/3/infer", "3"),
    ] {
        assert_eq!(version_at(&router, path).await.as_deref(), Some(want));
    }
    served.shutdown().await;
}

/// With `poll`, a new version that appears in the repository is loaded beside the served one,
/// takes the requests, and the old one is unloaded, while 16 clients (JSON and binary) send
/// requests back to back: every answer is 200 and names the version that ran it; each client
/// sees the old version, then the new, never back. The old version's model is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_swaps_in_a_new_version_under_load_and_every_answer_names_its_version() {
    let (_dir, repo, served, router) = serve_m(POLL, "").await;
    let old = Arc::downgrade(&served.registry().get("m", Some("1")).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16 {
        let (router, stop) = (router.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            // Each answer's version in order, and the first few bad answers.
            let (mut seen, mut bad) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let (status, version, reply) =
                    infer(&router, "/v2/models/m/infer", c % 2 == 1).await;
                if status != 200 {
                    bad.push((status, String::from_utf8_lossy(&reply.body).into_owned()));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                seen.push(version.unwrap_or_default());
            }
            (seen, bad)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    add_version(&repo, "m", 2, "mlp.onnx");
    eventually("version 1 is unloaded", async || {
        served.registry().versions("m") == ["2"]
            && states(&index(&router).await) == vec![row("m", "2", "READY")]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut switched = 0;
    for c in clients {
        let (seen, bad) = c.await.unwrap();
        assert!(
            bad.is_empty(),
            "non-200 answers: {:?}",
            &bad[..bad.len().min(3)]
        );
        let first_new = seen.iter().position(|v| v == "2").unwrap_or(seen.len());
        assert!(
            seen[..first_new].iter().all(|v| v == "1")
                && seen[first_new..].iter().all(|v| v == "2"),
            "a client saw versions out of order or unnamed: {seen:?}"
        );
        assert!(first_new < seen.len(), "a client never saw version 2");
        switched += usize::from(first_new > 0);
    }
    assert!(switched > 0, "no client was answered by version 1 first");
    assert_eq!(served.registry().versions("m"), ["2"]);
    eventually("version 1's model is dropped", async || {
        old.upgrade().is_none()
    })
    .await;
    let text = served.render_metrics().await;
    assert_eq!(
        metric(&text, "ortserve_model_unloads_total", &[("model", "m")]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "ortserve_model_state",
            &[("model", "m"), ("version", "2"), ("state", "READY")]
        ),
        1.0
    );
    served.shutdown().await;
}

/// A new version that does not load (a corrupt file) is reported and leaves the served version
/// serving; once the file is fixed it is served, and the old version is unloaded; once its
/// folder is removed, the old version is served again (a rollback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_version_leaves_the_served_one_serving() {
    let (_dir, repo, served, router) = serve_m(POLL, "").await;
    let bad = add_version(&repo, "m", 2, "mlp.onnx");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    eventually("version 2's failure shows", async || {
        index(&router).await.as_array().unwrap().iter().any(|e| {
            e["version"] == "2"
                && e["state"] == "UNAVAILABLE"
                && e["reason"].as_str().unwrap().contains("load failed")
        })
    })
    .await;
    assert_eq!(
        version_at(&router, "/v2/models/m/infer").await.as_deref(),
        Some("1")
    );
    // Not tried again while the file stays as it is.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let text = served.render_metrics().await;
    let failed = [("model", "m"), ("result", "failed")];
    assert_eq!(metric(&text, "ortserve_model_loads_total", &failed), 1.0);
    get(&router, "/v2/health/ready").await.assert_status(200);

    std::fs::write(&bad, &bytes).unwrap();
    eventually("version 2 serves", async || {
        version_at(&router, "/v2/models/m/infer").await.as_deref() == Some("2")
    })
    .await;
    eventually("version 1 is unloaded", async || {
        served.registry().versions("m") == ["2"]
    })
    .await;

    // Rolled back: with version 2's folder gone, version 1 is the latest again and is served.
    std::fs::remove_dir_all(repo.join("m/2")).unwrap();
    eventually("version 1 serves again", async || {
        served.registry().versions("m") == ["1"]
    })
    .await;
    assert_eq!(
        version_at(&router, "/v2/models/m/infer").await.as_deref(),
        Some("1")
    );
    served.shutdown().await;
}

/// `swap: replace` unloads the served version before loading the new one: requests meanwhile
/// get 503 with `Retry-After` (never another error), and a new version that fails leaves the
/// model unloaded, where `overlap` (above) keeps the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_replace_unloads_first_and_answers_503_meanwhile() {
    let (_dir, repo, served, router) = serve_m(EXPLICIT, "swap: replace, ").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (router, stop) = (router.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, version, reply) = infer(&router, "/v2/models/m/infer", false).await;
                let retry = reply.headers.contains_key("retry-after");
                answers.push((status, version, retry));
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    add_version(&repo, "m", 2, "mlp.onnx");
    post(&router, "/v2/repository/models/m/load")
        .await
        .assert_status(200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        for (status, version, retry) in c.await.unwrap() {
            assert!(
                (status == 200 && version.is_some()) || (status == 503 && retry),
                "{status} {version:?} retry-after {retry}"
            );
        }
    }
    assert_eq!(served.registry().versions("m"), ["2"]);

    // A version that fails: the served one was unloaded first, so nothing serves.
    let bad = add_version(&repo, "m", 3, "mlp.onnx");
    std::fs::write(&bad, b"not a model").unwrap();
    post(&router, "/v2/repository/models/m/load")
        .await
        .assert_status(400);
    assert!(served.registry().versions("m").is_empty());
    let (status, _, reply) = infer(&router, "/v2/models/m/infer", false).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&reply.body));
    served.shutdown().await;
}

/// An explicit load reads the repository again: a version added since is loaded, and the one
/// the policy no longer chooses is unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_load_picks_up_a_new_version() {
    let (_dir, repo, served, router) = serve_m(EXPLICIT, "").await;
    add_version(&repo, "m", 2, "mlp.onnx");
    // Nothing changes without the call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(served.registry().versions("m"), ["1"]);
    post(&router, "/v2/repository/models/m/load")
        .await
        .assert_status(200);
    assert_eq!(served.registry().versions("m"), ["2"]);
    assert_eq!(
        version_at(&router, "/v2/models/m/infer").await.as_deref(),
        Some("2")
    );
    served.shutdown().await;
}

/// With `poll`, the config file is read again: a model added to it is loaded, a changed
/// model's settings are applied by a reload, a removed model is unloaded, and a config that is
/// not valid changes nothing (counted in `ortserve_config_reads_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_applies_changes_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("mlp.onnx"), dir.path().join("mlp.onnx")).unwrap();
    std::fs::copy(fixtures().join("cnn.onnx"), dir.path().join("cnn.onnx")).unwrap();
    let head = "server: {model_control: poll, poll_interval: 100ms}\nmodels:\n  - {name: a, path: mlp.onnx, devices: cpu, batching: {max_batch_size: 8}}\n";
    let (served, router, file) = start_file(dir.path(), head).await;
    let max_batch = |router: axum::Router| async move {
        let reply = get(&router, "/v2/models/b").await;
        (reply.status == 200).then(|| {
            let v: Value = reply.json();
            v["max_batch_size"].as_u64()
        })
    };
    write_atomically(
        &file,
        &format!("{head}  - {{name: b, path: cnn.onnx, devices: cpu, batching: {{max_batch_size: 4}}}}\n"),
    );
    eventually("model b is served", async || {
        max_batch(router.clone()).await.is_some()
    })
    .await;

    // Not valid: nothing changes, and the server keeps serving both.
    write_atomically(
        &file,
        &format!("{head}  - {{name: b, path: cnn.onnx, devices: [}}\n"),
    );
    eventually("the invalid config is counted", async || {
        let text = served.render_metrics().await;
        metric(
            &text,
            "ortserve_config_reads_total",
            &[("result", "invalid")],
        ) >= 1.0
    })
    .await;
    assert!(max_batch(router.clone()).await.is_some());
    get(&router, "/v2/health/ready").await.assert_status(200);

    write_atomically(
        &file,
        &format!("{head}  - {{name: b, path: cnn.onnx, devices: cpu, batching: {{max_batch_size: 2}}}}\n"),
    );
    eventually("model b's new settings apply", async || {
        let reply = get(&router, "/v1/models/b/tuning").await;
        reply.status == 200 && reply.json()["devices"][0]["chosen"] == 2
    })
    .await;

    write_atomically(&file, head);
    eventually("model b is unloaded and gone from the index", async || {
        states(&index(&router).await) == vec![row("a", "1", "READY")]
    })
    .await;
    get(&router, "/v2/models/b").await.assert_status(404);
    let (status, _, _) = infer(&router, "/v2/models/a/infer", false).await;
    assert_eq!(status, 200);
    let text = served.render_metrics().await;
    assert_eq!(
        metric(
            &text,
            "ortserve_model_loads_total",
            &[("model", "a"), ("result", "ok")]
        ),
        0.0,
        "model a, unchanged, was never reloaded"
    );
    served.shutdown().await;
}
