//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the loop is turning),
//! `/readyz` (the first sync is done).
use std::time::{SystemTime, UNIX_EPOCH};

use crate::node::metrics::Metrics;

/// `/metrics` (Prometheus text), `/healthz` (the agent loop is turning), `/readyz` (first sync
/// done).
pub(crate) async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use axum::{Router, http::StatusCode, routing::get};
    let m = metrics.clone();
    let h = metrics.clone();
    let r = metrics;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = h.clone();
                async move {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    let last = h.last_beat();
                    // Before the first turn the loop is waiting for the lists: alive.
                    if last == 0 || now.saturating_sub(last) < 120 {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "agent loop stalled\n")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first sync\n")
                    }
                }
            }),
        )
        .into_make_service();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
