//! `/metrics`, `/healthz` and `/readyz`, on a TCP address and, for the kubelet's probes, on a
//! Unix socket in the pod's own scratch directory; and the client the probes run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::health::Health;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics_page(&state.registry)
}

/// The OpenMetrics page of `registry`.
pub fn metrics_page(registry: &Registry) -> impl IntoResponse + use<> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

/// 200 when ready; 503 with the reasons (one line each, with what to fix) otherwise.
async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// 200 unless the worker stalled (records wait and nothing progressed for the stall timeout).
async fn live(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.stalled() {
        None => (StatusCode::OK, "live\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Serves the endpoints on `address` in the background, and on the Unix socket `socket` when
/// given (a file left by an earlier run of the container is replaced); returns the bound address.
pub async fn serve(
    address: SocketAddr,
    socket: Option<&Path>,
    registry: Registry,
    health: Arc<Health>,
) -> anyhow::Result<SocketAddr> {
    let state = AppState {
        registry: Arc::new(registry),
        health,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(state);
    serve_app(app, address, socket, "VECTORPIPE_METRICS_ADDRESS").await
}

/// Serves `app` on `address` in the background, and on the Unix socket `socket` when given (a
/// file left by an earlier run of the container is replaced); returns the bound address.
/// `setting` names where the address comes from, for the error when the port is taken.
pub async fn serve_app(
    app: Router,
    address: SocketAddr,
    socket: Option<&Path>,
    setting: &str,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| {
        format!("cannot listen on {address}; is another process using the port? Set {setting} (port 0 picks a free one)")
    })?;
    let bound = listener.local_addr()?;
    if let Some(path) = socket {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot replace {}", path.display()));
            }
        }
        let unix = tokio::net::UnixListener::bind(path).with_context(|| {
            format!(
                "cannot create the admin socket {}; its directory must exist and be writable (VECTORPIPE_ADMIN_SOCKET)",
                path.display()
            )
        })?;
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(unix, app).await {
                tracing::error!(error = %e, "the admin socket stopped");
            }
        });
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}

/// `GET path` on the worker's admin socket: the status code and the body. What the kubelet's
/// exec probes run, so a probe needs no TCP port (two pods on the host network never clash).
pub async fn probe(socket: &Path, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let ask = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("the worker is not listening on {}", socket.display()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<hyper::body::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, ask)
        .await
        .with_context(|| format!("no answer from {} in {timeout:?}", socket.display()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_reach_the_endpoints_over_the_socket_and_see_not_ready() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let socket = dir.path().join("worker.sock");
        // A stale file from an earlier run of the container is replaced.
        std::fs::write(&socket, b"stale").expect("a stale file");
        let (metrics, registry) = crate::metrics::Metrics::new("probe-test");
        let health = Arc::new(Health::new(Arc::new(metrics), Duration::from_secs(300)));
        serve(
            "127.0.0.1:0".parse().expect("an address"),
            Some(&socket),
            registry,
            health.clone(),
        )
        .await
        .expect("serving");
        let timeout = Duration::from_secs(5);
        let (status, body) = probe(&socket, "/readyz", timeout).await.expect("an answer");
        assert_eq!(status, 503, "{body}");
        health
            .joined
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (status, _) = probe(&socket, "/readyz", timeout).await.expect("an answer");
        assert_eq!(status, 200);
        let (status, _) = probe(&socket, "/healthz", timeout)
            .await
            .expect("an answer");
        assert_eq!(status, 200);
        let (status, body) = probe(&socket, "/metrics", timeout)
            .await
            .expect("an answer");
        assert_eq!(status, 200);
        assert!(body.contains("vectorpipe_worker"), "{body}");
        let missing = dir.path().join("missing.sock");
        let error = probe(&missing, "/readyz", timeout)
            .await
            .expect_err("no worker");
        assert!(format!("{error:#}").contains("not listening"), "{error:#}");
    }
}
