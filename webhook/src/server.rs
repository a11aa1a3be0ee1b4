//! The HTTPS admission server (axum over rustls, HTTP/1.1 and HTTP/2) and the
//! plain-HTTP metrics server, with graceful shutdown.

use crate::review::{Admission, Unreadable};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;

/// The largest AdmissionReview accepted (the API server's own limit for objects is
/// about 1.5 MiB; reviews carry the object and the old object).
pub const BODY_LIMIT: usize = 3 * 1024 * 1024;

/// Bodies up to this size are read to the end even when over [`BODY_LIMIT`], so the
/// client gets its 413 on a connection that stays usable; beyond it the connection
/// is given up.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn answer(result: Result<kube::core::admission::AdmissionReview<kube::core::DynamicObject>, Unreadable>) -> Response {
    match result {
        Ok(review) => match crate::wire::to_vec(&review) {
            Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot serialize the response: {e}"),
            )
                .into_response(),
        },
        Err(Unreadable(reason)) => (StatusCode::BAD_REQUEST, reason).into_response(),
    }
}

/// Reads the body, keeping at most [`BODY_LIMIT`] bytes.
async fn read_body(body: Body) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut kept: Vec<u8> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")).into_response())?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= BODY_LIMIT {
                kept.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > BODY_LIMIT {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is {total} bytes or more; AdmissionReviews over {BODY_LIMIT} bytes are refused"),
        )
            .into_response());
    }
    Ok(Bytes::from(kept))
}

async fn mutate(State(a): State<Arc<Admission>>, body: Body) -> Response {
    match read_body(body).await {
        Ok(bytes) => answer(a.mutate(&bytes)),
        Err(r) => r,
    }
}

async fn validate(State(a): State<Arc<Admission>>, body: Body) -> Response {
    match read_body(body).await {
        Ok(bytes) => answer(a.validate(&bytes)),
        Err(r) => r,
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once an index is in service; a failed refresh keeps serving the
/// previous index, and readiness says so.
async fn readyz(State(a): State<Arc<Admission>>) -> Response {
    match a.index.health() {
        (false, err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no profile index loaded yet{}\n",
                err.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        )
            .into_response(),
        (true, Some(err)) => (StatusCode::OK, format!("ready, serving a stale profile index: {err}\n")).into_response(),
        (true, None) => (StatusCode::OK, "ready\n").into_response(),
    }
}

async fn metrics(State(a): State<Arc<Admission>>) -> Response {
    if let Some(at) = a.index.checked_at() {
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        a.metrics.index_age_seconds.set(age.as_secs_f64());
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &a.metrics.registry()) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The admission router: `POST /mutate`, `POST /validate`, `GET /healthz`,
/// `GET /readyz`, with the body limit and a per-request timeout.
pub fn router(admission: Arc<Admission>, request_timeout: Duration) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Bodies are limited by `read_body`, which answers 413 on a usable connection.
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .with_state(admission)
}

/// The metrics router: `GET /metrics`, `/healthz`, `/readyz`.
pub fn metrics_router(admission: Arc<Admission>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(admission)
}

/// Serves `app` over TLS on `listener` until `shutdown` completes, then stops
/// accepting and waits up to `drain` for requests in flight.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep going after a breath.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Closing the listening socket is what makes new connections fail fast.
    drop(listener);
    tracing::info!("shutting down: no new connections; draining requests in flight");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timed out; closing the remaining connections");
    }
}

/// Serves `app` over plain HTTP until `shutdown` completes.
pub async fn serve_plain(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()> + Send + 'static) {
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}
