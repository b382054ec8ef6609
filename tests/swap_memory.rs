//! `swap: overlap` with too little memory for two versions: the load is refused with the reason
//! and the served version keeps serving. The memory limit is pretended
//! (`testing::pretend_cpu_memory_room`, process-wide, hence this test binary of its own); the
//! model, its sessions and the memory it adds are real.

mod common;

use common::*;
use ortserve::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlap_swap_that_does_not_fit_is_refused_and_the_old_version_serves() {
    let dir = tempfile::tempdir().unwrap();
    let effnet = root().join(".ortserve/models/efficientnet_lite0.onnx");
    let model = dir.path().join("repo/effnet");
    for v in ["1", "2"] {
        std::fs::create_dir_all(model.join(v)).unwrap();
    }
    std::os::unix::fs::symlink(&effnet, model.join("1/model.onnx")).unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        "server: {model_control: explicit}\nmodels:\n  - {name: effnet, path: repo/effnet, devices: cpu, batching: {max_batch_size: 4, buckets: on}, tuning: {memory_headroom: 0.0}}\n",
    )
    .unwrap();
    let (served, router) = start_config(&Config::load(&file).unwrap()).await;
    let load = || post_empty(&router, "/v2/repository/models/effnet/load");

    // Version 2 appears while only 8 MiB are left under the limit: EfficientNet-Lite0's
    // sessions took tens of MiB when version 1 loaded.
    std::os::unix::fs::symlink(&effnet, model.join("2/model.onnx")).unwrap();
    ortserve::testing::pretend_cpu_memory_room(Some(8 << 20));
    let refused = load().await;
    refused.assert_status(400);
    let text = String::from_utf8_lossy(&refused.body).into_owned();
    assert!(
        text.contains("it would need about") && text.contains("swap: replace"),
        "{text}"
    );
    assert_eq!(served.registry().versions("effnet"), ["1"]);
    let rows = repository_index(&router).await;
    let v2 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "2")
        .expect("version 2 in the index");
    assert_eq!(v2["state"], "UNAVAILABLE");
    assert!(
        v2["reason"].as_str().unwrap().contains("not loaded"),
        "{v2}"
    );
    get(&router, "/v2/models/effnet/versions/1/ready")
        .await
        .assert_status(200);

    // With room, the same call loads it and the swap happens.
    ortserve::testing::pretend_cpu_memory_room(None);
    load().await.assert_status(200);
    assert_eq!(served.registry().versions("effnet"), ["2"]);
    served.shutdown().await;
}
