//! The `ortserve` command: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// Load the models and serve HTTP until SIGTERM or SIGINT.
    Serve {
        /// The YAML configuration file.
        #[arg(long, env = "ORTSERVE_CONFIG")]
        config: PathBuf,
    },
    /// Probe every (model, device) batch size without serving: print the tables, write an SVG plot.
    Tune {
        #[arg(long, env = "ORTSERVE_CONFIG")]
        config: PathBuf,
        /// Where to write the plot.
        #[arg(long, default_value = "tuning.svg")]
        plot: PathBuf,
        /// Use a cached result where one matches instead of probing again.
        #[arg(long)]
        use_cache: bool,
        /// Also write every result as JSON (as `GET /v1/models/{m}/tuning` serves it) to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Load and validate a configuration file, print it resolved, and exit.
    CheckConfig {
        #[arg(long, env = "ORTSERVE_CONFIG")]
        config: PathBuf,
    },
}

fn init_tracing(format: LogFormat, level: &str) {
    use std::io::IsTerminal;
    // RUST_LOG chooses; unset or empty means info, with ONNX Runtime's own chatter at warn.
    let default = format!("{level},{}", ortserve::device::RUNTIME_LOG_QUIET);
    let default = default.as_str();
    let wanted = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let filter = tracing_subscriber::EnvFilter::try_new(wanted.as_deref().unwrap_or(default))
        .unwrap_or_else(|e| {
            eprintln!("RUST_LOG: {e}; using {default}");
            tracing_subscriber::EnvFilter::new(default)
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: valid", config.display());
                println!("{}", serde_yaml_ng::to_string(&c).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Tune {
            config,
            plot,
            use_cache,
            json,
        } => {
            let mut config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            // The tables go to stdout; the log only says what went wrong.
            init_tracing(config.server.log_format, "warn");
            for m in &mut config.models {
                m.batching.max_batch_size = ortserve::config::MaxBatch::Auto;
                m.tuning.force = !use_cache;
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let metrics = std::sync::Arc::new(ortserve::metrics::Metrics::new());
                let loaded = match ortserve::load_models(&config, &metrics).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("ortserve tune: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let mut all = Vec::new();
                for (model, results) in &loaded.tuning {
                    for r in results {
                        println!("{}", ortserve::tuning::table(model, r));
                        all.push((model.clone(), r.clone()));
                    }
                }
                for m in &loaded.models {
                    m.shutdown().await;
                }
                if let Some(path) = &json {
                    let doc = serde_json::json!(loaded.tuning);
                    if let Err(e) = std::fs::write(path, doc.to_string()) {
                        eprintln!("ortserve tune: writing {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                match ortserve::tuning::plot::svg(&all)
                    .map_err(std::io::Error::other)
                    .and_then(|svg| std::fs::write(&plot, svg))
                {
                    Ok(()) => {
                        println!("plot: {}", plot.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ortserve tune: writing {}: {e}", plot.display());
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            init_tracing(config.server.log_format, "info");
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let listener = match tokio::net::TcpListener::bind(&config.server.http_addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(addr = %config.server.http_addr, error = %e, "cannot bind");
                        return ExitCode::FAILURE;
                    }
                };
                tracing::info!(addr = %config.server.http_addr, "bound; loading models");
                match ortserve::run(config, listener, ortserve::shutdown::signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "startup failed");
                        eprintln!("ortserve: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
