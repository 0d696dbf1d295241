//! `/healthz` (the process answers), `/readyz` (200 only when warm and consuming) and `/metrics`
//! (OpenMetrics text, see [`crate::metrics`]), on the worker's health port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use heimdex_shared::fleet::WorkerState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::lifecycle::Lifecycle;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Health {
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
}

/// Binds `addr` and serves until `stop` is cancelled; returns the bound address (port 0 picks one).
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    addr: &str,
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Health { lifecycle, metrics });
    tokio::spawn(async move {
        let result = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(local)
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let state = h.lifecycle.state();
    let code = if state == WorkerState::Warm { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, format!("{}\n", state.as_str()))
}

async fn metrics_text(State(h): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], h.metrics.encode())
}
