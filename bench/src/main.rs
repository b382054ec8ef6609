//! `ortserve-bench`: ortserve under load on 127.0.0.1, each line next to the in-process ceiling
//! measured in the same run (the method and its results: docs/BENCHMARKS.md). A tool beside the
//! server, not part of it: it uses only the `ortserve` crate's public API, and nothing of it
//! ships in the server binary or the container image.
//!
//! - `scenarios`: the scenarios a–e, the in-process ceilings, results and plots.
//! - `client`: the keep-alive load generator (`sendfile(2)` for large requests).
//! - `grpc_client`: the gRPC load generator (unary `ModelInfer` calls over a few HTTP/2
//!   connections).
//! - `cpu`: where the CPU went during a line, from `/proc`.
//! - `hello`: a bare axum handler, the HTTP stack's own limit.
//! - `bare_h2`: three bare HTTP/2 responders (hyper's server, the h2 crate alone, and frames
//!   written by hand) for the one-caller comparison of the stacks.
//! - `pin`: `--server-cores` / `--client-cores`.

mod bare_h2;
mod client;
mod cpu;
mod grpc_client;
mod hello;
mod pin;
mod scenarios;
mod traces;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Benchmarks on 127.0.0.1: scenarios a (overhead), b (compute; REST and gRPC), c (scaling), d
/// (batching on and off), e (JPEG uploads), f (small requests beside multi-MB bodies), g (the
/// batch-size oracle: `auto` against every fixed cap), each next to its reference measured in the
/// same run.
#[derive(Parser)]
#[command(name = "ortserve-bench", version)]
struct Cli {
    /// Seconds of load per measured line.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of load before each measured line (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Which scenarios, e.g. `abcdef` (`g`, the oracle, takes minutes: run it on its own).
    #[arg(long, default_value = "abcdef")]
    scenarios: String,
    /// Folder for results.json and the SVG plots.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Run the scenarios this many times and print each line's ratio in every run and the
    /// median (this machine's runs differ by 20% or more).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// The fixture models (the repository's tests/fixtures).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// The folder scripts/setup_models.sh fills (EfficientNet-Lite0 and a photo, for scenario e).
    #[arg(long, default_value = ".ortserve")]
    setup_dir: PathBuf,
    /// Scenario g's models, e.g. `cnn,mlp` (default: mlp, cnn and cnn_wide).
    #[arg(long, value_delimiter = ',')]
    oracle_models: Vec<String>,
    /// Scenario g's fixed caps, e.g. `1,4` (default: 1, 2, 4, … up to the probe's largest
    /// good size). With `--oracle-clients 1`, a quick look at one-client latency.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=65_536))]
    oracle_caps: Vec<u64>,
    /// Scenario g's client counts: `1`, `32` or both (default: both).
    #[arg(long, value_delimiter = ',', value_parser = oracle_clients)]
    oracle_clients: Vec<usize>,
    /// Scenario g's rounds (each line's median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    oracle_rounds: u32,
    /// Scenario g's `runtime.cpu_threads` (ONNX Runtime's intra-op threads for the one model);
    /// 0 for `auto` (every core, or one fewer where the probe gives one to request handling).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    oracle_threads: u32,
    /// Pin the server (every thread it starts) and the in-process ceilings to these cores, e.g.
    /// `0` or `0-1`; needs --client-cores. Default: nothing is pinned.
    #[arg(long, requires = "client_cores")]
    server_cores: Option<String>,
    /// Traces on, sampling this ratio of requests (0 to 1), exported over OTLP/gRPC to a
    /// receiver in this process that counts them (the scenarios' servers are in-process).
    #[arg(long, value_parser = ratio)]
    traces: Option<f64>,
    /// Pin the load generator to these cores; needs --server-cores.
    #[arg(long, requires = "server_cores")]
    client_cores: Option<String>,
}

/// Runs the scenarios `repeat` times, printing each run's table as it ends, then the summary;
/// writes results.json with every run.
fn bench(opts: &scenarios::Options, repeat: usize) -> Result<(), String> {
    let mut runs = Vec::with_capacity(repeat);
    for i in 1..=repeat {
        let rows = scenarios::run(opts)?;
        if repeat > 1 {
            println!("run {i} of {repeat}\n");
        }
        println!("{}", scenarios::table(&rows));
        runs.push(rows);
    }
    let summary = scenarios::summarize(&runs);
    if repeat > 1 {
        println!("{}", scenarios::summary_table(&summary));
    }
    scenarios::write_results(&opts.out_dir, &runs, &summary)
}

/// The server's allocator, set up as the server sets it up, so the numbers are the shipped ones.
#[global_allocator]
static ALLOCATOR: ortserve::memory::Allocator = ortserve::memory::Allocator {};

fn main() -> ExitCode {
    ortserve::memory::return_freed_memory_promptly();
    let cli = Cli::parse();
    // The server's own log at warn, ONNX Runtime's as the server keeps it; RUST_LOG chooses
    // otherwise (`RUST_LOG=info` measures the spans the server makes at its own default level).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| format!("warn,{}", ortserve::device::RUNTIME_LOG_QUIET));
    let traces = match cli.traces {
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .init();
            None
        }
        Some(r) => match traces::Traces::start(r) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("ortserve-bench: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if let (Some(server), Some(client)) = (&cli.server_cores, &cli.client_cores) {
        let pinned = pin::parse(server)
            .and_then(|s| Ok((s, pin::parse(client)?)))
            .and_then(|(s, c)| pin::set(s, c));
        if let Err(e) = pinned {
            eprintln!("ortserve-bench: {e}");
            return ExitCode::from(2);
        }
    }
    let opts = scenarios::Options {
        seconds: cli.seconds,
        warmup: cli.warmup,
        scenarios: cli.scenarios.chars().collect(),
        out_dir: cli.out,
        fixtures: cli.fixtures,
        setup_dir: cli.setup_dir,
        oracle_models: cli.oracle_models,
        oracle_rounds: cli.oracle_rounds as usize,
        oracle_threads: cli.oracle_threads as usize,
        oracle_caps: cli.oracle_caps,
        oracle_clients: cli.oracle_clients,
    };
    let done = bench(&opts, cli.repeat as usize);
    if let Some(t) = traces {
        println!("{}", t.finish());
    }
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ortserve-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Scenario g measures one client and 32 clients.
fn oracle_clients(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "32" => Ok(32),
        _ => Err(format!("{s:?}: scenario g measures 1 or 32 clients")),
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio from 0 to 1")),
    }
}
