//! The `ortserve` command: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// See `ortserve::memory`.
#[global_allocator]
static ALLOCATOR: ortserve::memory::Allocator = ortserve::memory::Allocator {};
use ortserve::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "ortserve",
    version,
    about = "HTTP prediction server for ONNX models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the models and serve them (REST, gRPC and the admin port) until SIGTERM or SIGINT.
    Serve {
        /// The YAML configuration file (optional with --model-dir).
        #[arg(long, env = "ORTSERVE_CONFIG", required_unless_present = "model_dir")]
        config: Option<PathBuf>,
        /// A folder of models, as KServe fills /mnt/models: one .onnx file, NAME/model.onnx
        /// folders, or versioned NAME/VERSION/model.onnx folders, each model with an optional
        /// labels.txt and ortserve.yaml (that model's settings).
        /// Added to the config file's models, or served alone.
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// The name to serve a one-file --model-dir as; in a folder of models, the one to serve.
        #[arg(long, requires = "model_dir")]
        model_name: Option<String>,
        /// Serve HTTP on this port (the config's address keeps its host).
        #[arg(long)]
        http_port: Option<u16>,
        /// Serve gRPC on this port (the config's grpc_addr keeps its host).
        #[arg(long)]
        grpc_port: Option<u16>,
    },
    /// Probe every (model, device) batch size without serving: print the tables; with `--plot`,
    /// write an SVG plot.
    Tune {
        #[arg(long, env = "ORTSERVE_CONFIG")]
        config: PathBuf,
        /// Write the plot to this SVG file (nothing is written without it).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Use a cached result where one matches instead of probing again.
        #[arg(long)]
        use_cache: bool,
        /// Also write every result with its key to this JSON file, for other pods to reuse
        /// through `tuning.results_file` (a ConfigMap or a volume).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// GET a URL on this host and exit 0 on 200: a container health check with no shell or curl.
    Probe {
        #[arg(long, default_value = "http://127.0.0.1:8080/v2/health/ready")]
        url: String,
    },
    /// Load and validate a configuration file, print it resolved, and exit.
    CheckConfig {
        #[arg(long, env = "ORTSERVE_CONFIG")]
        config: PathBuf,
    },
}

/// The log subscriber alone (no traces), for the commands that do not serve.
fn init_tracing(format: LogFormat, level: &str) {
    let off = ortserve::config::TelemetryConfig::default();
    if let Err(e) = ortserve::telemetry::init(format, level, &off) {
        eprintln!("ortserve: {e}");
    }
}

/// A line to stdout. A reader that has gone (`ortserve check-config … | head -1`) ends the
/// output quietly: `println!` would panic on the closed pipe.
fn out(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(2)
    })
}

/// The server's runtime. Its blocking pool (loading and probing sessions, reading model files
/// and config, joining device threads) lets an idle thread go after 1 s, not tokio's 10 s: some
/// of what an unloaded session freed went back to the system only once the thread that had
/// opened it exited, and with 10 s RSS stayed up to 40 MiB high that long (docs/BENCHMARKS.md,
/// "Memory after an unload").
fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

fn main() -> ExitCode {
    ortserve::memory::return_freed_memory_promptly();
    let result = match Cli::parse().command {
        Command::CheckConfig { config } => load_config(&config).and_then(|c| {
            let report = ortserve::check(&c);
            for w in &report.warnings {
                eprintln!("{}: warning: {w}", config.display());
            }
            for e in &report.errors {
                eprintln!("{}: {e}", config.display());
            }
            if !report.errors.is_empty() {
                return Err(ExitCode::from(2));
            }
            out(&format!("{}: valid", config.display()));
            out(&serde_yaml_ng::to_string(&c).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }),
        Command::Tune {
            config,
            plot,
            use_cache,
            json,
        } => load_config(&config)
            .and_then(|config| tune(config, plot.as_deref(), use_cache, json.as_deref())),
        Command::Serve {
            config,
            model_dir,
            model_name,
            http_port,
            grpc_port,
        } => Config::for_serve(
            config.as_deref(),
            model_dir.as_deref(),
            model_name.as_deref(),
            http_port,
            grpc_port,
        )
        .map_err(|e| {
            match &config {
                Some(path) => eprintln!("{}: {e}", path.display()),
                None => eprintln!("ortserve: {e}"),
            }
            ExitCode::from(2)
        })
        .and_then(serve),
        Command::Probe { url } => Ok(probe(&url)),
    };
    result.unwrap_or_else(|code| code)
}

fn serve(config: Config) -> Result<ExitCode, ExitCode> {
    let runtime = async_runtime()?;
    // The trace exporter's gRPC channel runs on the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        ortserve::telemetry::init(config.server.log_format, "info", &config.telemetry)
    }
    .map_err(|e| {
        eprintln!("ortserve: {e}");
        ExitCode::from(2)
    })?;
    let code = runtime.block_on(async {
        ortserve::shutdown::ignore_hangups();
        let server = &config.server;
        let bind = |addr: &str| {
            let addr = addr.to_string();
            async move {
                ortserve::http::bind(&addr, server.listen_backlog)
                    .await
                    .map_err(|e| tracing::error!(%addr, error = %e, "cannot bind"))
            }
        };
        let Ok(http) = bind(&server.http_addr).await else {
            return ExitCode::FAILURE;
        };
        let admin = match &server.admin_addr {
            Some(addr) => match bind(addr).await {
                Ok(l) => Some(l),
                Err(()) => return ExitCode::FAILURE,
            },
            None => None,
        };
        let grpc = match &server.grpc_addr {
            Some(addr) => match bind(addr).await {
                Ok(l) => Some(l),
                Err(()) => return ExitCode::FAILURE,
            },
            None => None,
        };
        tracing::info!(addr = %config.server.http_addr, "bound; loading models");
        let listeners = ortserve::Listeners { http, admin, grpc };
        match ortserve::run(config, listeners, ortserve::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "startup failed");
                eprintln!("ortserve: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Drained: the spans still held are sent, within `telemetry.flush_timeout`.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    // Served, drained and every model stopped: a model load still running on a blocking thread
    // (a repository API call during the drain) is not waited for, as dropping the runtime would.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(code)
}

fn tune(
    mut config: Config,
    plot: Option<&std::path::Path>,
    use_cache: bool,
    json: Option<&std::path::Path>,
) -> Result<ExitCode, ExitCode> {
    // The tables go to stdout; the log only says what went wrong.
    init_tracing(config.server.log_format, "warn");
    for m in &mut config.models {
        m.batching.max_batch_size = ortserve::config::MaxBatch::Auto;
        m.tuning.force = !use_cache;
    }
    let runtime = async_runtime()?;
    let tuning = runtime.block_on(ortserve::tune(&config)).map_err(|e| {
        eprintln!("ortserve tune: {e}");
        ExitCode::FAILURE
    })?;
    let mut all = Vec::new();
    for (model, results) in &tuning {
        for r in results {
            all.push((model.clone(), r.clone()));
        }
    }
    let write = |path: &std::path::Path, text: String| {
        std::fs::write(path, text).map_err(|e| {
            eprintln!("ortserve tune: writing {}: {e}", path.display());
            ExitCode::FAILURE
        })
    };
    if let Some(path) = json {
        // What `tuning.results_file` reads back: every probed or cached result with its key
        // (and, inside a result opened with one thread fewer, the one that decided it).
        let shared: Vec<ortserve::tuning::SharedResult> = all
            .iter()
            .filter_map(|(model, r)| {
                Some(ortserve::tuning::SharedResult {
                    model: model.clone(),
                    key: r.key.clone()?,
                    result: r.clone(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&shared).unwrap_or_default();
        write(path, text)?;
    }
    if let Some(plot) = plot {
        let svg = ortserve::tuning::plot::svg(&all).map_err(|e| {
            eprintln!("ortserve tune: plotting: {e}");
            ExitCode::FAILURE
        })?;
        write(plot, svg)?;
    }
    // The files first: a reader that goes away early (`| head`) ends the printing, and with it
    // the process, but not what was asked to be written.
    for (model, r) in &all {
        out(&ortserve::tuning::table(model, r));
    }
    if let Some(plot) = plot {
        out(&format!("plot: {}", plot.display()));
    }
    Ok(ExitCode::SUCCESS)
}

/// A minimal HTTP/1.1 GET: `http://host:port/path` only (health checks stay on the host).
fn probe(url: &str) -> ExitCode {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("probe: only http:// URLs");
        return ExitCode::from(2);
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let result = (|| -> std::io::Result<u16> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))
    })();
    match result {
        Ok(200) => ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("probe: {url} answered {code}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("probe: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}
