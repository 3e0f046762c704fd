//! The HTTP listener's app: llmd-openai's router (the OpenAI API, `/health` and `/metrics`)
//! over the daemon's served models, API keys and `[server]` options, with the GPU gauges of
//! llmd-telemetry appended to `/metrics`, and the connection loop that serves it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use llmd_openai::{ApiOptions, ApiState, ExtraMetrics, ModelRegistry, Phase, ServedModel};
use llmd_proto::DaemonState;
use llmd_telemetry::Telemetry;
use tokio::sync::watch;

use crate::control::Shared;
use crate::models::ServedTable;

/// The served models and the daemon's phase, as the HTTP layer reads them: `models` is the
/// model manager's published table (`ModelManager::served`), only read here.
#[derive(Debug)]
pub struct DaemonRegistry {
    pub models: watch::Receiver<ServedTable>,
    pub shared: Arc<Shared>,
}

impl ModelRegistry for DaemonRegistry {
    fn get(&self, name: &str) -> Option<ServedModel> {
        self.models.borrow().get(name).cloned()
    }

    fn list(&self) -> Vec<ServedModel> {
        let mut all: Vec<ServedModel> = self.models.borrow().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    fn phase(&self) -> Phase {
        phase_of(self.shared.state())
    }
}

/// `/health`'s phase for a daemon state: a reload keeps serving.
pub fn phase_of(state: DaemonState) -> Phase {
    match state {
        DaemonState::Starting => Phase::Starting,
        DaemonState::Ready | DaemonState::Reloading => Phase::Ready,
        DaemonState::Stopping => Phase::Stopping,
    }
}

/// The machine's host name for the `Hostname` label of the GPU gauges.
fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The whole HTTP app: the OpenAI API over `models` (the model manager's published table), keys
/// from `shared.api_keys` (swapped on SIGHUP), options from `[server]`, GPU gauges from
/// `telemetry` on `/metrics`.
pub fn router(shared: Arc<Shared>, models: watch::Receiver<ServedTable>, telemetry: Arc<Telemetry>) -> Router {
    let options = {
        let settings = shared.settings.read().unwrap_or_else(|e| e.into_inner());
        let server = &settings.config.server;
        ApiOptions {
            max_body_bytes: usize::try_from(server.max_body_bytes).unwrap_or(usize::MAX),
            allowed_origins: server.allowed_origins.clone(),
            metrics_require_auth: server.metrics_require_auth,
            health_require_auth: server.health_require_auth,
            request_timeout: None,
        }
    };
    let host = hostname();
    let gauges: ExtraMetrics = Arc::new(move || telemetry.dcgm_metrics(&host));
    let keys = shared.api_keys.clone();
    let registry = Arc::new(DaemonRegistry { models, shared });
    llmd_openai::router(ApiState::new(registry, keys, options).with_extra_metrics(gauges))
}

/// A client must send its whole request head within this time or the connection is closed
/// (slowloris). Request bodies and streamed responses are not limited by it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `stop` turns true, then stops accepting and waits for the
/// connections in flight to finish (the caller bounds that wait with its shutdown timeout).
///
/// hyper directly rather than `axum::serve`: `axum::serve` gives hyper no timer, so hyper can
/// enforce no header read timeout and a client that sends its headers a byte at a time holds a
/// connection forever.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;

    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Streamed tokens are small writes: with Nagle's algorithm the first chunk after
                // the headers waits for the client's delayed ACK (~40 ms on Linux; measured as
                // +29 ms time to first token on loopback).
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "HTTP connection closed with an error");
                    }
                });
            }
            // `map` drops the watch guard at once (it is not Send across the loop's awaits).
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloading_keeps_serving() {
        assert_eq!(phase_of(DaemonState::Starting), Phase::Starting);
        assert_eq!(phase_of(DaemonState::Ready), Phase::Ready);
        assert_eq!(phase_of(DaemonState::Reloading), Phase::Ready);
        assert_eq!(phase_of(DaemonState::Stopping), Phase::Stopping);
    }
}
