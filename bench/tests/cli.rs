//! The `ortserve-bench` binary: a smoke run of the scenarios (lines, CPU split, summary; no
//! timing asserted) and bench_bounds.py on hand-worked numbers.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ortserve-bench");

/// The workspace root, where tests/fixtures and .ortserve are.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
}

fn bench(args: &[&str]) -> Output {
    let fixtures = root().join("tests/fixtures");
    Command::new(BIN)
        .args(args)
        .arg("--fixtures")
        .arg(fixtures)
        .output()
        .unwrap()
}

#[test]
fn bench_runs_a_scenario_twice_and_summarizes_both_runs() {
    // A smoke run of `ortserve-bench`, not a measurement: the numbers are not checked, only that
    // the lines, the CPU split and the summary of repeated runs are there and consistent.
    let out = tempfile::tempdir().unwrap();
    let o = bench(&[
        "--seconds",
        "0.3",
        "--warmup",
        "0.1",
        "--scenarios",
        "a",
        "--repeat",
        "2",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("run 2 of 2"), "{stdout}");
    assert!(
        stdout.contains(
            "| a | ortserve V2 JSON, mlp | 32 | ratio to requests/s of the bare axum handler |"
        ),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    // The machine's CPUs as /proc/stat counts them, which is what the split adds up to.
    let cpus = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as f64;
    for run in runs {
        let served = run
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["variant"] == "ortserve V2 JSON, mlp" && r["concurrency"] == 32)
            .expect("the 32-client ortserve line");
        assert_eq!(served["errors"], 0, "{served}");
        assert_eq!(served["non_200"], 0, "{served}");
        assert!(served["requests_per_second"].as_f64().unwrap() > 0.0);
        let cpu = &served["cpu"];
        let core = |k: &str| cpu[k].as_f64().unwrap();
        assert!(
            core("http") > 0.0,
            "the server's threads did the HTTP work: {cpu}"
        );
        assert!(core("loadgen") > 0.0, "{cpu}");
        let sum: f64 = ["http", "device", "loadgen", "idle", "others"]
            .iter()
            .map(|k| core(k))
            .sum();
        // 10 ms ticks over 0.3 s: a few ticks either way.
        assert!(
            (sum - cpus).abs() < 0.35 * cpus,
            "{sum} of {cpus} CPUs: {cpu}"
        );
    }
    let summary = json["summary"].as_array().unwrap();
    let line = summary
        .iter()
        .find(|s| s["variant"] == "ortserve V2 JSON, mlp" && s["concurrency"] == 32)
        .expect("a summary line");
    assert_eq!(line["values"].as_array().unwrap().len(), 2);
}

#[test]
fn bench_bounds_divides_each_lines_cores_by_what_it_served() {
    // bench_bounds.py on a results.json with round numbers, worked out by hand:
    // (b) 2 cores / 80,000 rows/s = 25 us a row in-process; the bare handler used 1.0 core of
    //     HTTP and 0.25 of load generator for 50,000 requests/s = 20 + 5 us; 2 s / 50 us =
    //     40,000 rows/s = 0.50 of the ceiling.
    // (c) two slots: 1.6 device cores / 4,000 rows/s = 400 us, 0.2 HTTP = 50 us, 0.08 load
    //     generator = 20 us: 2 s / 470 us = 4,255 rows/s = 1.70 x the one slot's 2,500; with the
    //     bare handler's 25 us instead: 2 s / 425 us = 4,706 = 1.88 x.
    let cpu = |http: f64, device: f64, loadgen: f64| serde_json::json!({"http": http, "device": device, "loadgen": loadgen, "idle": 0.1, "others": 0.0});
    let line =
        |scenario: &str, variant: &str, conc: u64, rps: f64, cpu: serde_json::Value, ratio: f64| {
            serde_json::json!({"scenario": scenario, "variant": variant, "concurrency": conc,
            "requests_per_second": rps, "rows_per_second": rps, "cpu": cpu, "ratio": ratio})
        };
    let run = serde_json::json!([
        line(
            "b",
            "in-process ceiling, cnn, 2 threads",
            0,
            80000.0,
            serde_json::Value::Null,
            0.0
        ),
        line(
            "b",
            "ortserve V2 binary, cnn",
            32,
            24000.0,
            cpu(0.8, 0.7, 0.3),
            0.30
        ),
        line(
            "b",
            "bare axum handler reading the same body",
            32,
            50000.0,
            cpu(1.0, 0.0, 0.25),
            0.62
        ),
        line(
            "c",
            "cnn_wide: cpu:0, 1 thread",
            32,
            2500.0,
            cpu(0.15, 1.0, 0.05),
            0.0
        ),
        line(
            "c",
            "cnn_wide: cpu:0 + cpu:1, 1 thread each",
            32,
            4000.0,
            cpu(0.2, 1.6, 0.08),
            1.6
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.json");
    std::fs::write(
        &path,
        serde_json::json!({"runs": [run], "summary": []}).to_string(),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench_bounds.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("at most 40000 rows/s = 0.50 of the ceiling; ortserve 0.30"),
        "{text}"
    );
    assert!(text.contains("at most 1.70 x one slot with these costs, 1.88 x with the bare handler's HTTP cost; ortserve 1.60 x"), "{text}");
}
