//! The process server's local status listener (`metrics_listen`, plain HTTP, meant for
//! 127.0.0.1 or a monitoring network): `GET /metrics` (Prometheus text) and
//! `GET /status.json` (the current [`super::api::Heartbeat`], what `churnlog status
//! --config ps.toml` prints). Read-only; it serves the monitor's latest sample.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::metrics::PsMetrics;
use super::monitor::Snapshot;

pub const PATH_STATUS_JSON: &str = "/status.json";

#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {source}")]
pub struct StatusHttpError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<PsMetrics>,
    snapshot: Snapshot,
}

async fn get_metrics(State(s): State<AppState>) -> Response {
    match s.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn get_status(State(s): State<AppState>) -> Response {
    let hb = s.snapshot.read().clone();
    axum::Json(hb).into_response()
}

/// The running listener.
pub struct StatusHttp {
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StatusHttp {
    pub async fn start(
        addr: SocketAddr,
        metrics: Arc<PsMetrics>,
        snapshot: Snapshot,
    ) -> Result<StatusHttp, StatusHttpError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StatusHttpError { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| StatusHttpError { addr, source })?;
        let app = Router::new()
            .route(super::api::PATH_METRICS, get(get_metrics))
            .route(PATH_STATUS_JSON, get(get_status))
            .with_state(AppState { metrics, snapshot });
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.changed().await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "metrics listener ended");
            }
        });
        Ok(StatusHttp { local_addr, stop, task })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        // Graceful shutdown waits for open connections; a scraper holding one open does
        // not hold the server's stop for long.
        let mut task = self.task;
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut task).await.is_err() {
            task.abort();
        }
    }
}
