//! The one shutdown signal: SIGINT or SIGTERM, whichever comes first; a second one forces the exit.

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes). From then on, a second signal
/// ends the process at once (exit code 130), for when a graceful drain takes too long.
pub async fn shutdown_signal() {
    signal().await;
    tokio::spawn(async {
        signal().await;
        tracing::warn!("second signal: exiting now, without draining");
        std::process::exit(130);
    });
}

async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
