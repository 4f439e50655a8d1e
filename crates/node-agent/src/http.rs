//! The agent's HTTP endpoints, on `--metrics-addr` (loopback by default; the chart binds the
//! node's address so Prometheus can scrape it): `/metrics`, `/livez` (the process serves) and
//! `/healthz` (the device is configured). Nothing here holds a secret (see `metrics.rs`).

use std::net::SocketAddr;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Binds `addr` and serves in the background; `configured` is true once the agent has
/// programmed its device.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    configured: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        // Liveness: the process serves. Restarting an agent that cannot reach the controller
        // would not help, so "configured" is readiness (/healthz) only.
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/healthz",
            get(move || {
                let ok = *configured.borrow();
                async move {
                    if ok {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not configured yet")
                    }
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}
