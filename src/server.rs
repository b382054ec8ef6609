//! Serving: the HTTP front door over what `ortserve_core::startup` loads, and the drain
//! sequence on shutdown (README.md, "Operations").
//!
//! [`run`] serves at once (health answers, readiness is 503) while the models load; [`start`]
//! loads first and returns a [`Server`] to serve later (tests, the bench). Both build their state
//! with `new_state` and serve through [`serve_until`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use ortserve_core::app::AppState;
use ortserve_core::config::{Config, ModelControl, ServerConfig};
use ortserve_core::startup::{load_models, new_state, StartupError};
use ortserve_core::tuning::DeviceTuning;

/// Where the server listens: the data port; when `server.admin_addr` is set, the admin port
/// (liveness, readiness and metrics on a connection limit of their own); when
/// `server.grpc_addr` is set, the gRPC port. A bare `TcpListener` converts into one with the
/// HTTP port alone.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: Option<TcpListener>,
    pub grpc: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(http: TcpListener) -> Listeners {
        Listeners {
            http,
            admin: None,
            grpc: None,
        }
    }
}

/// A loaded server, not yet serving: its state (for a router), whose registry owns the models.
pub struct Server {
    state: Arc<AppState>,
    config: ServerConfig,
}

impl Server {
    /// The state handlers share (pass it to [`ortserve_http::router`]).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves HTTP on `listeners` until `shutdown` resolves, then drains and stops every model.
    /// Returns when the device threads are joined.
    pub async fn serve(
        self,
        listeners: impl Into<Listeners>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let served =
            serve_until(self.state.clone(), &self.config, listeners.into(), shutdown).await;
        self.state.stop_models().await;
        served
    }

    /// Stops every model without serving: admitted requests are answered, threads joined.
    pub async fn shutdown(self) {
        self.state.stop_models().await;
    }
}

/// Loads everything (see [`load_models`]) and returns the server, ready to serve.
pub async fn start(config: &Config) -> Result<Server, StartupError> {
    let state = new_state(config);
    let loaded = load_models(config, &state).await?;
    state.install(loaded);
    ortserve_core::lifecycle::start_poller(&state);
    Ok(Server {
        state,
        config: config.server.clone(),
    })
}

/// Serves at once (health answers, readiness is 503) while the models load and tune, then
/// serves them until `shutdown` resolves. A loading failure ends the server with the error.
pub async fn run(
    config: Config,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let state = new_state(&config);
    if config.server.model_control == ModelControl::Poll {
        crate::shutdown::poll_on_hangup(&state);
    }
    let serving = serve_until(state.clone(), &config.server, listeners.into(), shutdown);
    tokio::pin!(serving);
    let loading = load_models(&config, &state);
    tokio::pin!(loading);
    tokio::select! {
        loaded = &mut loading => {
            let loaded = loaded?;
            state.install(loaded);
            ortserve_core::lifecycle::start_poller(&state);
            tracing::info!("every model is loaded and tuned: ready");
            let served = serving.await;
            state.stop_models().await;
            served?;
        }
        served = &mut serving => served?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Probes every (model, device) batch size without serving, stops the models, and returns the
/// results by model name (`ortserve tune`).
pub async fn tune(config: &Config) -> Result<BTreeMap<String, Vec<DeviceTuning>>, StartupError> {
    let server = start(config).await?;
    let results = server
        .state
        .models()
        .iter()
        .map(|m| (m.name().to_string(), m.tuning().to_vec()))
        .collect();
    server.shutdown().await;
    Ok(results)
}

/// Serves HTTP (and gRPC) on `listeners` until `shutdown` resolves, then drains: readiness turns
/// 503 (NOT_SERVING) at once, requests are still served for `drain_delay` (so load balancers
/// deregister the pod), then the listeners close (gRPC connections get GOAWAY) and open
/// requests and calls get up to `shutdown_timeout` to finish. The admin port answers probes and
/// scrapes throughout and closes last.
async fn serve_until(
    state: Arc<AppState>,
    server: &ServerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listeners.http;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving HTTP");
    }
    // The admin port stops when the data port has: `admin_stop` is dropped on return.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = match listeners.admin {
        Some(l) => {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving probes and metrics on the admin port");
            }
            let stopped = async move {
                let _ = admin_stopped.await;
            };
            Some(ortserve_http::AdminPort::start(
                state.clone(),
                server,
                l,
                stopped,
            )?)
        }
        None => None,
    };
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    // Set when the drain delay is over: every listener stops accepting.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain_delay = server.drain_delay.0;
    let draining = state.clone();
    let graceful = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(?drain_delay, "draining: readiness is 503, still serving");
        tokio::time::sleep(drain_delay).await;
        tracing::info!("no longer accepting connections");
        let _ = stop_tx.send(true);
        let _ = drained_tx.send(());
    };
    let grpc = match listeners.grpc {
        Some(l) => {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving gRPC");
            }
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let grpc = ortserve_grpc::serve(state.clone(), server, l, stopped);
            Some(async move { grpc.await.map_err(std::io::Error::other) })
        }
        None => None,
    };
    let http = ortserve_http::serve(state, server, listener, graceful);
    let http = async move {
        match grpc {
            Some(grpc) => {
                let (h, g) = tokio::join!(http, grpc);
                h.and(g)
            }
            None => http.await,
        }
    };
    let shutdown_timeout = server.shutdown_timeout.0;
    let overdue = async move {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(shutdown_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = http => r,
        _ = overdue => {
            tracing::warn!(?shutdown_timeout, "in-flight requests did not finish in time");
            Ok(())
        }
    };
    drop(admin_stop);
    if let Some(admin) = admin {
        if let Err(e) = admin.join().await {
            tracing::warn!(error = %e, "the admin port ended with an error");
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use ortserve_core::config::Dur;
    use ortserve_core::metrics::Metrics;

    /// The drain sequence on tokio's paused clock: readiness turns 503 at the signal, serving
    /// goes on for exactly `drain_delay`, then it ends (no connection is open to wait for).
    #[tokio::test(start_paused = true)]
    async fn serving_goes_on_for_the_drain_delay_after_the_signal_then_ends() {
        let server = ServerConfig {
            drain_delay: Dur(Duration::from_secs(5)),
            ..ServerConfig::default()
        };
        let state = Arc::new(AppState::loading(
            Arc::new(Metrics::new()),
            &server,
            1,
            Vec::new(),
        ));
        state.install([]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn({
            let state = state.clone();
            async move {
                serve_until(state, &server, listener.into(), async {
                    let _ = signalled.await;
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            state.is_ready() && !serving.is_finished(),
            "serves until the signal"
        );

        let at = tokio::time::Instant::now();
        signal.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(state.is_draining() && !state.is_ready(), "503 at once");
        tokio::time::sleep(Duration::from_millis(4990)).await;
        assert!(
            !serving.is_finished(),
            "still serving within the drain delay"
        );
        serving.await.unwrap().unwrap();
        let took = at.elapsed();
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_millis(5050),
            "serving ended {took:?} after the signal"
        );
    }
}
