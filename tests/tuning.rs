//! Startup batch-size tuning on real CPU sessions. Each probe runs in a fresh `ortserve`
//! process, so memory readings are not disturbed by other tests in this process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::run_with_stdout_closed;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ortserve");

/// The probes measure time and memory: one test at a time in this file, so they do not load
/// the machine for each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    let yaml = yaml
        .replace("FIXTURES", common::fixtures().to_str().unwrap())
        .replace("CACHE", dir.join("cache").to_str().unwrap());
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Runs `ortserve tune`; returns (exit ok, stdout, stderr, JSON results by model).
fn tune(dir: &Path, yaml: &str) -> (bool, String, String, Value) {
    let cfg = write_config(dir, yaml);
    let json = dir.join("tuning.json");
    let _ = std::fs::remove_file(&json);
    let out = Command::new(BIN)
        .args([
            "tune",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .args(["--plot", dir.join("tuning.svg").to_str().unwrap()])
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    // The file is a list of {model, key, result}; grouped here by model.
    let results = std::fs::read_to_string(&json)
        .map(|t| {
            let mut by_model = serde_json::Map::new();
            for r in serde_json::from_str::<Vec<Value>>(&t).unwrap() {
                assert!(
                    r["key"].as_str().is_some_and(|k| k.contains("ortserve=")),
                    "{r}"
                );
                let list = by_model
                    .entry(r["model"].as_str().unwrap())
                    .or_insert_with(|| Value::Array(Vec::new()));
                list.as_array_mut().unwrap().push(r["result"].clone());
            }
            Value::Object(by_model)
        })
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        results,
    )
}

fn cnn(extra: &str) -> String {
    format!("models:\n  - name: cnn\n    path: FIXTURES/cnn.onnx\n    devices: cpu\n    tuning: {{cache_dir: CACHE{extra}}}\n")
}

/// `text` (stdout of `tune`, or the server log) has the table row of every probe in `device`.
/// A latency is a whole number of nanoseconds, so it can sit on a rounding boundary of the
/// table's three decimals (0.0905 ms); serde_json's parser may return the f64 next to the
/// server's, which rounds the other way. Either rounding counts.
fn assert_table_has_every_probe(text: &str, device: &Value) {
    for p in device["probes"].as_array().unwrap() {
        let latency = p["latency_ms"].as_f64().unwrap();
        let rows: Vec<String> = [latency - 1e-9, latency + 1e-9]
            .iter()
            .map(|l| {
                format!(
                    "{:>7}   {:<20} {:>8.3}",
                    p["batch"].as_u64().unwrap(),
                    "Ok",
                    l
                )
            })
            .collect();
        assert!(
            rows.iter().any(|row| text.contains(row)),
            "no row {rows:?} in\n{text}"
        );
    }
}

fn probe_of(device: &Value, batch: u64) -> &Value {
    device["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["batch"] == batch)
        .unwrap()
}

#[test]
fn the_cnn_probe_picks_more_than_one_on_cpu_and_impossible_budgets_fail() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr, results) = tune(dir.path(), &cnn(""));
    assert!(ok, "{stderr}");
    let d = &results["cnn"][0];
    assert_eq!(d["device"], "cpu:0");
    assert_eq!(d["source"], "probe");
    let chosen = d["chosen"].as_u64().unwrap();
    assert!(chosen > 1, "chose {chosen}: {stdout}");
    // The printed table has a row for every probed size, with the same figures as the JSON.
    assert_table_has_every_probe(&stdout, d);
    // Issue 25: each size is timed as served (run, split, replies, with the next batch
    // waiting), which costs more than the session run; the choice is a good size near the most
    // served rows/s, and the report says what serving adds to a batch. One model on `cpu` with
    // `cpu_threads: auto` has a thread per core, so request handling shares the device's cores
    // and the largest of the sizes within 3% is chosen; unless the probe found that the device
    // would not limit a loaded server with one thread fewer, and the session was opened again
    // with one fewer (the reason says so first): then cores are left for request handling, and
    // the smallest within 10% is chosen (or the largest within 3%, where this second probe
    // finds that the device does limit).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reason = d["reason"].as_str().unwrap();
    let fewer = format!(
        "{} intra-op thread(s), not {cores}:",
        cores.saturating_sub(1)
    );
    let larger = if reason.starts_with(&fewer) {
        assert!(cores >= 2, "{d}");
        d["prefer"] == "larger"
    } else {
        assert!(!reason.contains("intra-op thread(s), not"), "{d}");
        assert_eq!(d["prefer"], "larger", "{d}");
        true
    };
    let (tie, end) = if larger {
        (0.97, "the largest size")
    } else {
        assert_eq!(d["prefer"], "smaller", "{d}");
        (0.90, "the smallest size")
    };
    let served = |p: &Value| p["served_rows_per_second"].as_f64().unwrap();
    let good: Vec<&Value> = d["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["outcome"] == "ok")
        .collect();
    for p in &good {
        assert!(
            p["served_ms"].as_f64().unwrap() >= p["latency_ms"].as_f64().unwrap(),
            "{p}"
        );
    }
    let best = good.iter().map(|p| served(p)).fold(0.0, f64::max);
    assert!(served(probe_of(d, chosen)) >= best * tie, "{d}");
    assert!(
        good.iter().all(|p| {
            let batch = p["batch"].as_u64().unwrap();
            let beyond = if larger {
                batch > chosen
            } else {
                batch < chosen
            };
            !beyond || served(p) < best * tie
        }),
        "a size within the tie beyond the chosen one on its end was not chosen: {d}"
    );
    assert!(reason.contains(end), "{d}");
    assert!(d["fixed_cost_ms"].as_f64().unwrap() > 0.0, "{d}");
    assert!(d["max_good"].as_u64().unwrap() >= chosen, "{d}");
    assert!(stdout.contains("serving adds"), "{stdout}");
    let svg = std::fs::read_to_string(dir.path().join("tuning.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.trim_end().ends_with("</svg>")
            && svg.contains("rows per second")
    );

    // Budgets nothing can meet fail with the figures.
    let (ok, _, stderr, _) = tune(dir.path(), &cnn(", latency_budget: 1us"));
    assert!(!ok);
    assert!(
        stderr.contains("cnn on cpu:0: batch size 1 does not fit")
            && stderr.contains("over the latency budget of 0.001 ms"),
        "{stderr}"
    );
    let (ok, _, stderr, _) = tune(dir.path(), &cnn(", memory_budget: 1"));
    assert!(!ok);
    assert!(
        stderr.contains("over the memory budget: memory in use") && stderr.contains("MiB"),
        "{stderr}"
    );
}

/// A model whose run of b rows costs about b + 1 units on one thread (see
/// scripts/make_fixtures.py): batching gains, and a budget between the batch-1 and batch-2
/// latencies is about 20% from both.
#[test]
fn a_model_alone_whose_device_would_not_limit_the_server_leaves_a_core_to_request_handling() {
    // The MLP's row takes well under a microsecond at its best size, far under 3 times what
    // serving adds to a batch: with `cpu_threads: auto` its one session, given every core, is
    // opened again with one thread fewer, and the reason says so first. A thread count given in
    // the config is kept.
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let mlp = |runtime: &str| {
        format!("{runtime}models:\n  - name: mlp\n    path: FIXTURES/mlp.onnx\n    devices: cpu\n    tuning: {{cache_dir: CACHE, force: true}}\n")
    };
    let (ok, _, stderr, results) = tune(dir.path(), &mlp(""));
    assert!(ok, "{stderr}");
    let d = &results["mlp"][0];
    let reason = d["reason"].as_str().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 2 && d["fixed_cost_ms"].as_f64().unwrap() > 0.0 {
        let fewer = format!("{} intra-op thread(s), not {cores}:", cores - 1);
        assert!(reason.starts_with(&fewer), "{d}");
    } else {
        assert!(!reason.contains("intra-op thread(s), not"), "{d}");
    }
    let given = format!("runtime: {{cpu_threads: {cores}}}\n");
    let (ok, _, stderr, results) = tune(dir.path(), &mlp(&given));
    assert!(ok, "{stderr}");
    let reason = results["mlp"][0]["reason"].as_str().unwrap();
    assert!(!reason.contains("intra-op thread(s), not"), "{reason}");
}

fn matmul(extra: &str) -> String {
    format!(
        "models:\n  - name: mm\n    path: FIXTURES/matmul_chain.onnx\n    devices: {{device: cpu, intra_op_threads: 1}}\n    tuning: {{cache_dir: CACHE, max_batch_cap: 16{extra}}}\n"
    )
}

#[test]
fn a_latency_budget_below_the_batch_two_latency_picks_one() {
    // The budget bounds a batch's time as served. Latencies come from two separate `tune` runs on a shared 2-core machine, where another
    // tenant can slow one run by 20% or more. An attempt whose own measurements do not put the
    // budget between its batch-1 and batch-2 latencies says nothing about the rule, so it is
    // measured again (at most eight times: three were all slowed by 20-40% in a CI run); the
    // rule is then checked on what that run measured.
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (ok, _, stderr, free) = tune(dir.path(), &matmul(""));
        assert!(ok, "{stderr}");
        let d = &free["mm"][0];
        // One intra-op thread: on one core request handling shares it and the largest of the
        // tied sizes is chosen. With more, the rest handle requests, and the largest is chosen
        // only where the device will limit a loaded server: a row's run at the best size,
        // times those cores, is at least 3 times what serving adds to a batch (this model's
        // rows take 0.3 ms or so, so it is, on the development machine).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let served = |p: &Value| p["served_rows_per_second"].as_f64().unwrap();
        let top = d["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["outcome"] == "ok")
            .max_by(|a, b| served(a).total_cmp(&served(b)))
            .unwrap();
        let row_ms = top["latency_ms"].as_f64().unwrap() / top["batch"].as_f64().unwrap();
        let bound = row_ms * (cores - 1) as f64 >= 3.0 * d["fixed_cost_ms"].as_f64().unwrap();
        assert_eq!(
            d["prefer"],
            if cores == 1 || bound {
                "larger"
            } else {
                "smaller"
            },
            "{d}"
        );
        if cores > 1 && bound {
            assert!(
                d["reason"]
                    .as_str()
                    .unwrap()
                    .contains("the device will limit a loaded server"),
                "{d}"
            );
        }
        let (l1, l2) = (
            probe_of(d, 1)["served_ms"].as_f64().unwrap(),
            probe_of(d, 2)["served_ms"].as_f64().unwrap(),
        );
        assert!(d["chosen"].as_u64().unwrap() > 1, "{d}");
        let budget_us = ((l1 * l2).sqrt() * 1000.0) as u64;
        let (ok, _, stderr, tight) = tune(
            dir.path(),
            &matmul(&format!(", latency_budget: {budget_us}us")),
        );
        let budget_ms = budget_us as f64 / 1000.0;
        let t = &tight["mm"][0];
        let straddles = ok
            && probe_of(t, 1)["served_ms"].as_f64().unwrap() <= budget_ms
            && probe_of(t, 2)["served_ms"].as_f64().unwrap() > budget_ms;
        if !straddles {
            seen.push(format!(
                "free run {l1:.3}/{l2:.3} ms, budget {budget_ms:.3} ms, then: {} {t}",
                stderr.trim()
            ));
            continue;
        }
        assert_eq!(t["chosen"], 1, "latency budget {budget_us} µs: {t}");
        assert_eq!(probe_of(t, 2)["outcome"], "over_latency_budget");
        return;
    }
    panic!(
        "no attempt measured batch 1 under and batch 2 over the budget:\n{}",
        seen.join("\n")
    );
}

#[test]
fn a_small_memory_budget_picks_a_smaller_size() {
    // The sweep also stops when two sizes in a row serve more than 5% under the best; on a noisy
    // shared machine that can end a run before it reaches the sizes this test needs. Such an attempt
    // is measured again (at most three times); the budget rule is checked on one that got there.
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let grown = |t: &Value, b: u64| {
        probe_of(t, b)["memory_used_bytes"].as_u64().unwrap()
            - t["baseline_memory_bytes"].as_u64().unwrap()
    };
    let probed = |t: &Value, b: u64| {
        t["probes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["batch"] == b))
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (ok, _, stderr, free) = tune(dir.path(), &matmul(""));
        assert!(ok, "{stderr}");
        let d = &free["mm"][0];
        if !probed(d, 8) {
            seen.push(format!("free run stopped before 8 rows: {d}"));
            continue;
        }
        // Memory grows by about 0.3 MiB per row here, and varies by far less between runs.
        let (g4, g8) = (grown(d, 4), grown(d, 8));
        assert!(
            g8 > g4 + (512 << 10),
            "memory should grow with the batch: {d}"
        );
        let budget = (g4 + g8) / 2;
        let (ok, _, stderr, small) =
            tune(dir.path(), &matmul(&format!(", memory_budget: {budget}")));
        assert!(ok, "{stderr}");
        let s = &small["mm"][0];
        let chosen = s["chosen"].as_u64().unwrap();
        assert!(
            grown(s, chosen) <= budget,
            "the chosen size is over the budget: {s}"
        );
        let first_over = s["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["outcome"] == "over_memory_budget");
        let Some(first_over) = first_over else {
            seen.push(format!(
                "budget {budget}: the sweep ended before the budget: {s}"
            ));
            continue;
        };
        assert!(
            chosen < 16,
            "memory budget {budget}: chose {chosen}; 16 rows ran without the budget"
        );
        assert!(first_over["batch"].as_u64().unwrap() <= 16, "{s}");
        return;
    }
    panic!("no attempt reached the memory budget:\n{}", seen.join("\n"));
}

#[test]
fn two_slots_with_different_threads_get_their_own_rows_and_sizes() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let yaml = "models:
  - name: cnn
    path: FIXTURES/cnn.onnx
    devices: [{device: 'cpu:0', intra_op_threads: 2}, {device: 'cpu:1', intra_op_threads: 1}]
    tuning: {cache_dir: CACHE}";
    let (ok, _, stderr, results) = tune(dir.path(), yaml);
    assert!(ok, "{stderr}");
    let devices = results["cnn"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["device"], "cpu:0");
    assert_eq!(devices[1]["device"], "cpu:1");
    for d in devices {
        assert_eq!(d["source"], "probe");
        assert!(!d["probes"].as_array().unwrap().is_empty());
        let chosen = d["chosen"].as_u64().unwrap();
        assert!(d["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["batch"] == chosen && p["outcome"] == "ok"));
    }
    assert_ne!(
        devices[0]["probes"], devices[1]["probes"],
        "each slot is measured on its own"
    );
}

#[test]
fn the_probe_stays_within_max_duration() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    // 4 ms: the sweep left alone runs for longer than that here (it stops when the served rows/s
    // fall, which for this model cannot happen before size 8), and the runs of one size take 1-3 ms,
    // so the time limit is what stops it, on a faster machine too.
    let (ok, _, stderr, results) =
        tune(dir.path(), &cnn(", max_duration: 4ms, max_batch_cap: 4096"));
    assert!(ok, "{stderr}");
    let d = &results["cnn"][0];
    assert!(d["reason"].as_str().unwrap().contains("time limit"), "{d}");
    // No run starts after the limit; the one running then finishes and the one queued behind it
    // (or a size's warm-up and its first timed batch), and reading memory takes a little: at
    // most two served batches of the largest size, and
    // 5 ms for a busy machine's scheduling (7.2 ms against 5.4 ms allowed once, in a CI run
    // beside other tests). The sweep left alone would go on to sizes of hundreds of rows.
    let longest = d["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["served_ms"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        d["duration_ms"].as_f64().unwrap() <= 4.0 + 2.0 * longest + 5.0,
        "{d}"
    );
}

fn http(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ortserve serve`; returns once /v2/health/ready is 200, with every readiness status
/// seen before that and the server's log.
fn serve_until_ready(dir: &Path, yaml: &str) -> (Vec<u16>, Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        dir,
        &format!("server: {{http_addr: '127.0.0.1:{port}', drain_delay: 0s}}\n{yaml}"),
    );
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .env_remove("ORT_DYLIB_PATH")
            .env("ORTSERVE_ADMIN_ADDR", "127.0.0.1:0")
            .env("ORTSERVE_GRPC_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        if let Ok((status, _)) = http(port, "/v2/health/ready") {
            seen.push(status);
            if status == 200 {
                return (seen, server, port);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn readiness_waits_for_tuning_the_endpoint_matches_the_log_and_a_restart_uses_the_cache() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    // Four slots probed one after another: long enough to see readiness at 503 first.
    let yaml = "models:
  - name: cnn
    path: FIXTURES/cnn.onnx
    devices: [cpu:0, cpu:1, cpu:2, cpu:3]
    tuning: {cache_dir: CACHE}";
    let (seen, server, port) = serve_until_ready(dir.path(), yaml);
    assert_eq!(
        seen.first(),
        Some(&503),
        "readiness before tuning ended: {seen:?}"
    );
    assert_eq!(http(port, "/v2/health/live").unwrap().0, 200);
    let (status, body) = http(port, "/v1/models/cnn/tuning").unwrap();
    assert_eq!(status, 200, "{body}");
    let tuning: Value = serde_json::from_str(&body).unwrap();
    let devices = tuning["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 4);
    let (_, meta) = http(port, "/v2/models/cnn").unwrap();
    let meta: Value = serde_json::from_str(&meta).unwrap();
    let (_, metrics) = http(port, "/metrics").unwrap();
    drop(server);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d["source"], "probe");
        let chosen = d["chosen"].as_u64().unwrap();
        assert_eq!(
            meta["devices"][i]["max_batch_size"], chosen,
            "the batcher uses the tuned size"
        );
        let name = d["device"].as_str().unwrap();
        assert!(
            metrics.contains(&format!(
                "ortserve_tuned_max_batch_size{{device=\"{name}\",model=\"cnn\"}} {chosen}"
            )),
            "{metrics}"
        );
        assert!(
            log.contains(&format!("tuning cnn on {name}: chosen {chosen} (Probe;")),
            "{log}"
        );
        assert_table_has_every_probe(&log, d);
        // The cap now, and how it may move under load (nothing moved it: no load).
        assert_eq!(d["max_batch_size_now"], chosen, "{d}");
        let max_good = d["max_good"].as_u64().unwrap();
        if max_good > chosen {
            assert_eq!(d["refine"]["floor"], chosen, "{d}");
            assert_eq!(d["refine"]["ceiling"], max_good, "{d}");
            assert_eq!(d["refine"]["changes_total"], 0, "{d}");
        } else {
            assert!(d["refine"].is_null(), "{d}");
        }
    }

    // Same model, devices, runtime and settings: the restart reads the cache.
    let (_, server, port) = serve_until_ready(dir.path(), yaml);
    let (_, body) = http(port, "/v1/models/cnn/tuning").unwrap();
    drop(server);
    let again: Value = serde_json::from_str(&body).unwrap();
    for (a, b) in again["devices"].as_array().unwrap().iter().zip(devices) {
        assert_eq!(a["source"], "cache");
        assert_eq!(a["chosen"], b["chosen"]);
        assert_eq!(a["probes"], b["probes"]);
    }
    // `force` probes again.
    let forced = yaml.replace("cache_dir: CACHE}", "cache_dir: CACHE, force: true}");
    let (_, server, port) = serve_until_ready(dir.path(), &forced);
    let (_, body) = http(port, "/v1/models/cnn/tuning").unwrap();
    drop(server);
    let forced: Value = serde_json::from_str(&body).unwrap();
    assert!(forced["devices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["source"] == "probe"));
}

/// `ortserve tune --json` writes results another pod reuses through `tuning.results_file`: that
/// start is ready without probing (`source: shared`); a start whose key differs (here a tuning
/// setting) probes again and says why in its log.
#[test]
fn shared_tuning_results_skip_the_probe_when_the_key_matches() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr, results) = tune(dir.path(), &cnn(""));
    assert!(ok, "{stderr}");
    let tuned = results["cnn"][0].clone();
    let shared = dir.path().join("shared.json");
    std::fs::rename(dir.path().join("tuning.json"), &shared).unwrap();
    // Another pod: an empty cache of its own, the shared file.
    let pod = tempfile::tempdir().unwrap();
    let yaml = format!(
        "models:\n  - name: cnn\n    path: FIXTURES/cnn.onnx\n    devices: cpu\n    tuning: {{cache_dir: CACHE, results_file: {}}}\n",
        shared.display()
    );
    let (_, server, port) = serve_until_ready(pod.path(), &yaml);
    let (_, body) = http(port, "/v1/models/cnn/tuning").unwrap();
    drop(server);
    let served: Value = serde_json::from_str(&body).unwrap();
    let d = &served["devices"][0];
    assert_eq!(d["source"], "shared", "{d}");
    assert_eq!(
        (&d["chosen"], &d["probes"]),
        (&tuned["chosen"], &tuned["probes"])
    );
    // Where `cpu_threads: auto` went to one thread fewer, the result with every thread that
    // decided it came from the file too: nothing was probed (the CI run of f1a6fc8 probed it
    // again, decided otherwise, and served another size).
    assert_eq!(d["earlier"].is_null(), tuned["earlier"].is_null(), "{d}");
    if !d["earlier"].is_null() {
        assert_eq!(d["earlier"]["source"], "shared", "{d}");
        assert_eq!(d["earlier"]["probes"], tuned["earlier"]["probes"], "{d}");
    }
    let log = std::fs::read_to_string(pod.path().join("server.log")).unwrap();
    assert!(!log.contains("probing"), "{log}");

    let changed = yaml.replace("results_file:", "max_batch_cap: 16, results_file:");
    let pod = tempfile::tempdir().unwrap();
    let (_, server, port) = serve_until_ready(pod.path(), &changed);
    let (_, body) = http(port, "/v1/models/cnn/tuning").unwrap();
    drop(server);
    let served: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["devices"][0]["source"], "probe", "{served}");
    let log = std::fs::read_to_string(pod.path().join("server.log")).unwrap();
    assert!(
        log.contains("tuning.results_file has no result for this key"),
        "{log}"
    );
}

/// Issue 26, defect 1: while a configured model loads and tunes, its routes answer 503 with
/// `Retry-After` (clients and balancers retry it), never 404 (which they read as permanent);
/// names that are not configured stay 404, and a version the config does not have is 404.
#[test]
fn a_model_that_is_still_loading_is_503_with_retry_after_not_404() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Four slots probed one after another, from scratch: the loading lasts long enough to ask.
    let cfg = write_config(
        dir.path(),
        &format!(
            "server: {{http_addr: '127.0.0.1:{port}', drain_delay: 0s}}\nmodels:
  - name: cnn
    path: FIXTURES/cnn.onnx
    devices: [cpu:0, cpu:1, cpu:2, cpu:3]
    tuning: {{cache_dir: CACHE, force: true}}"
        ),
    );
    let _server = Server(
        Command::new(BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .env_remove("ORT_DYLIB_PATH")
            .env("ORTSERVE_ADMIN_ADDR", "127.0.0.1:0")
            .env("ORTSERVE_GRPC_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let raw = |request: &str| -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    };
    let get = |path: &str| {
        raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
    };
    let body = r#"{"inputs":[{"name":"input","shape":[1,3,64,64],"datatype":"FP32","data":[0]}]}"#;
    let infer = format!(
        "POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let mut loading = 0;
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "never ready");
        let Some(ready) = get("/v2/health/ready") else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        let answers = [
            get("/v2/models/cnn/ready"),
            get("/v2/models/cnn"),
            get("/v2/models/cnn/versions/1"),
            raw(&infer),
        ];
        let ready_now = get("/v2/health/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200"));
        if ready_now {
            break;
        }
        for a in answers.iter().flatten() {
            assert!(
                a.starts_with("HTTP/1.1 503") && a.to_ascii_lowercase().contains("retry-after: 1"),
                "{a}"
            );
            assert!(
                a.contains("\"error_type\":\"unavailable\"") && a.contains("is loading"),
                "{a}"
            );
        }
        loading += 1;
        // Unknown names and versions are 404 all along.
        let unknown = get("/v2/models/nope/ready").unwrap();
        assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
        let version = get("/v2/models/cnn/versions/7").unwrap();
        assert!(version.starts_with("HTTP/1.1 404"), "{version}");
    }
    assert!(loading > 0, "never saw the model loading");
    let ready = get("/v2/models/cnn/ready").unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

/// Issue 26, defect 4: `ortserve tune` writes files only when asked (`--plot`, `--json`); it
/// wrote `tuning.svg` into the current folder.
#[test]
fn tune_writes_no_file_it_was_not_asked_for() {
    let _one = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "models:\n  - {name: mlp, path: FIXTURES/mlp.onnx, devices: cpu, tuning: {cache_dir: CACHE, max_batch_cap: 8}}\n",
    );
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["tune", "--config", cfg.to_str().unwrap()])
        .current_dir(work.path())
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tuning mlp on cpu:0: chosen"));
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // And what it was asked to write is written even when its reader goes away early
    // (`ortserve tune --json r.json | head -1`).
    let json = work.path().join("r.json");
    let out = run_with_stdout_closed(
        Command::new(BIN)
            .args(["tune", "--config", cfg.to_str().unwrap(), "--json"])
            .arg(&json)
            .env_remove("ORT_DYLIB_PATH"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written[0]["model"], "mlp", "{written}");
}
