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

/// How long an HTTP/1.1 client may take to send a request's headers, and any
/// client to send its first bytes after the TLS handshake, before the
/// connection is closed. Without it (hyper applies none unless given a timer) a
/// client trickling header bytes, or sending none, holds a connection forever;
/// bodies are bounded by the per-request timeout instead (see [`guard`]).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn answer(result: Result<Vec<u8>, Unreadable>) -> Response {
    match result {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(Unreadable(reason)) => (StatusCode::BAD_REQUEST, reason).into_response(),
    }
}

/// Reads the body, keeping at most [`BODY_LIMIT`] bytes.
async fn read_body(body: Body) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let mut body = body;
    // A review usually arrives in one DATA frame (HTTP/2 frames carry 16 KiB):
    // that frame is kept as it is, and only a body in several frames is copied.
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")).into_response())?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= BODY_LIMIT {
                match first.take() {
                    None if joined.is_empty() => first = Some(data),
                    None => joined.extend_from_slice(&data),
                    Some(earlier) => {
                        joined.extend_from_slice(&earlier);
                        joined.extend_from_slice(&data);
                    }
                }
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
    Ok(first.unwrap_or_else(|| Bytes::from(joined)))
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

/// The admission routes without their layers: `POST /mutate`, `POST /validate`,
/// `GET /healthz`, `GET /readyz`. [`guard`] adds the layers.
pub fn admission_routes() -> Router<Arc<Admission>> {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The admission router: [`admission_routes`] behind [`guard`].
pub fn router(admission: Arc<Admission>, request_timeout: Duration) -> Router {
    guard(admission_routes(), admission, request_timeout)
}

/// Puts `routes` behind the admission server's layers: no axum body limit
/// (`read_body` answers 413 itself), a per-request timeout that also bounds the
/// body read (the body is read inside the handler, so a slow body is answered
/// 503 when the time is up), and, outermost, the panic boundary: a handler that
/// panics is answered HTTP 500, logged and counted in
/// `tether_handler_panics_total` instead of taking its connection down.
///
/// Public so that tests can put a route of their own (one that panics) behind
/// exactly the layers the server uses.
pub fn guard(routes: Router<Arc<Admission>>, admission: Arc<Admission>, request_timeout: Duration) -> Router {
    let panics = PanicAnswer {
        counter: admission.metrics.handler_panics.clone(),
    };
    routes
        // Bodies are limited by `read_body`, which answers 413 on a usable connection.
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panics))
        .with_state(admission)
}

/// Answers a caught handler panic: HTTP 500 with a plain message, a log line
/// with the panic's message, one more in `tether_handler_panics_total`.
#[derive(Clone)]
struct PanicAnswer {
    counter: prometheus_client::metrics::counter::Counter,
}

impl tower_http::catch_panic::ResponseForPanic for PanicAnswer {
    type ResponseBody = Body;

    fn response_for_panic(&mut self, err: Box<dyn std::any::Any + Send + 'static>) -> axum::http::Response<Body> {
        self.counter.inc();
        let message = err
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| err.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        tracing::error!(panic = message, "a request handler panicked; answered HTTP 500");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: tether's request handler failed (a bug, counted in tether_handler_panics_total); the API server applies the webhook's failurePolicy\n",
        )
            .into_response()
    }
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
///
/// Each accepted connection is handed, round-robin, to one of
/// [`connection_threads`] threads, each with its own single-threaded runtime: a
/// connection's TLS, HTTP/2 framing and every request on it run on one thread.
/// On tokio's shared multi-threaded runtime an admission's ~15 µs of work made
/// the other worker wake up, steal and hand frames back through h2's connection
/// lock (a futex wake or an eventfd write for every other request, and the
/// reschedule interrupts that go with them). A connection cannot use more than
/// one core this way; the API server's request rate to a webhook is far below
/// what one core answers, and several connections still spread over the threads.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Set when the drain is over: the threads then drop what is left.
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let mut threads = Vec::new();
    let mut senders = Vec::new();
    for n in 0..connection_threads() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, std::net::SocketAddr)>();
        let worker = ConnectionThread {
            acceptor: acceptor.clone(),
            app: app.clone(),
            closed: closed.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("tether-conn-{n}"))
            .spawn(move || worker.run(rx))
        {
            Ok(handle) => {
                threads.push(handle);
                senders.push(tx);
            }
            Err(e) => tracing::warn!(error = %e, "cannot start a connection thread"),
        }
    }
    if senders.is_empty() {
        tracing::error!("no connection thread could be started; not serving");
        return;
    }
    let mut next = 0usize;
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
        // Registered with the connection thread's runtime: hand over the socket.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand the connection over");
                continue;
            }
        };
        let sender = &senders[next % senders.len()];
        next = next.wrapping_add(1);
        if sender.send((tcp, peer)).is_err() {
            tracing::warn!(%peer, "a connection thread has stopped; connection dropped");
        }
    }
    // Closing the listening socket is what makes new connections fail fast.
    drop(listener);
    drop(senders);
    tracing::info!("shutting down: no new connections; draining requests in flight");
    let drained = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    tokio::pin!(drained);
    if tokio::time::timeout(drain, &mut drained).await.is_err() {
        tracing::warn!("drain timed out; closing the remaining connections");
        let _ = closed_tx.send(true);
        let _ = drained.await;
    }
}

/// How many connection threads [`serve_tls`] runs: one per available core.
pub fn connection_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One connection thread of [`serve_tls`].
struct ConnectionThread {
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    closed: tokio::sync::watch::Receiver<bool>,
}

impl ConnectionThread {
    /// Serves the connections `rx` hands over until it closes, then drains
    /// them: gracefully (HTTP/2 GOAWAY, HTTP/1.1 close after the response in
    /// flight) until every one has ended or `closed` is set.
    fn run(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, std::net::SocketAddr)>) {
        // This thread's log lines (one per admission) go out a batch at a time
        // (see `logbuf`); the batch's writer task runs on this thread's runtime.
        let log_batch = crate::logbuf::batch_this_thread(Box::new(std::io::stderr()));
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a connection thread's runtime");
                return;
            }
        };
        let ConnectionThread {
            acceptor,
            app,
            mut closed,
        } = self;
        let log_writer = log_batch.writer();
        runtime.block_on(async move {
            tokio::spawn(log_writer);
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            while let Some((tcp, peer)) = rx.recv().await {
                let tcp = match tokio::net::TcpStream::from_std(tcp) {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cannot register the connection");
                        continue;
                    }
                };
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
                    let tls = FirstByteDeadline::new(tls, HEADER_READ_TIMEOUT);
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            tokio::select! {
                () = graceful.shutdown() => {}
                _ = closed.wait_for(|c| *c) => {}
            }
        });
    }
}

/// A connection that must send its first bytes (the HTTP/2 preface or an
/// HTTP/1.1 request line) within a deadline after the TLS handshake, else reads
/// fail with `TimedOut` and the connection is closed. hyper's header timeout
/// starts with the first byte, so a client that handshakes and then sends
/// nothing held a connection (a descriptor and its buffers) forever. The API
/// server sends its request as soon as it has connected.
struct FirstByteDeadline<T> {
    io: T,
    /// Cleared once a byte has arrived.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl<T> FirstByteDeadline<T> {
    fn new(io: T, limit: Duration) -> Self {
        FirstByteDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            limit,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByteDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no request within {:?} of the TLS handshake", this.limit),
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByteDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    /// Reported as not vectored, on purpose. h2 copies a DATA frame into its
    /// write buffer only below 256 bytes when the transport is vectored, and
    /// below 1 KiB when it is not; a larger frame is written on its own, and
    /// through rustls that is a TLS record and a `writev` per answer. tether's
    /// answers (~900 bytes with a patch) are thus coalesced with the other
    /// answers of the same round, as the no-op server's 130-byte answers are.
    /// rustls encrypts what it is given into records either way, so nothing is
    /// lost by not vectoring.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` over plain HTTP until `shutdown` completes.
pub async fn serve_plain(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()> + Send + 'static) {
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frames: Vec<Vec<u8>>) -> Body {
        // One stream item is one DATA frame.
        Body::from_stream(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, std::io::Error>),
        ))
    }

    /// Regression guard for the one-frame shortcut: a body in any number of
    /// frames reads back byte for byte, and the limit still counts every frame.
    #[tokio::test]
    async fn a_body_in_several_frames_reads_back_whole() {
        let whole: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        for cuts in [vec![], vec![10], vec![1, 2, 3], vec![16_384, 32_768], vec![0, 49_999]] {
            let mut frames = Vec::new();
            let mut at = 0;
            for c in cuts.iter().copied().chain([whole.len()]) {
                frames.push(whole[at..c].to_vec());
                at = c;
            }
            let read = read_body(body_of(frames)).await.map_err(|r| r.status()).unwrap();
            assert_eq!(&read[..], &whole[..], "cut at {cuts:?}");
        }
        let big = vec![vec![b'x'; BODY_LIMIT / 2], vec![b'x'; BODY_LIMIT / 2], vec![b'x'; 2]];
        let refused = read_body(body_of(big)).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
