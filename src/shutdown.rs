//! Signals and the drain sequence.
//!
//! On SIGTERM or SIGINT: readiness turns 503 at once; the server keeps serving for `drain_delay`
//! so load balancers stop sending; then it stops accepting, lets in-flight requests finish for up
//! to `shutdown_timeout`, closes the batchers (which run what is queued) and joins the device
//! threads.
//!
//! SIGHUP never ends the process (its default action would, at once and without a drain): it
//! is logged, and with `server.model_control: poll` it makes the poller check the model files
//! at once.

/// Resolves on the first SIGTERM or SIGINT. A second one ends the process at once (exit code
/// 130), for an operator who does not want to wait for the drain.
pub async fn signal() {
    one_signal().await;
    tokio::spawn(async {
        one_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

/// Takes SIGHUP from its default action (ending the process) for the rest of the process's
/// life: each one is logged and ignored. Call it inside the runtime before serving, so a hangup
/// that comes while models load is caught too.
pub fn ignore_hangups() {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP received (it never ends the process; with model_control: poll \
                         the model files are checked now; SIGTERM drains and stops)"
                    );
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP"),
    }
}

async fn one_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// With `server.model_control: poll`: each SIGHUP wakes the poller, which checks every model
/// file at once and reloads those that changed.
pub(crate) fn poll_on_hangup(state: &std::sync::Arc<ortserve_core::app::AppState>) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            let state = std::sync::Arc::downgrade(state);
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let Some(state) = state.upgrade() else { return };
                    ortserve_core::lifecycle::poll_now(&state);
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP"),
    }
}
