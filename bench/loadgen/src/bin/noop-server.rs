//! `noop-server`: the baseline for tether's admission benchmark.
//!
//! It runs the same stack as `tether serve` — the certs crate's reloading
//! resolver and TLS configuration (rustls with ring, TLS 1.2/1.3, ALPN `h2` and
//! `http/1.1`), `webhook::server::serve_tls` (hyper-util's auto HTTP/1.1 + HTTP/2
//! connection builder, each connection on one of its connection threads) and an axum router with the
//! same timeout layer — but `POST /mutate` only reads the body and answers a fixed
//! allowed AdmissionReview. The difference between the two servers is what tether's
//! admission work (parse, decide, patch, serialize, metrics) costs.
//!
//! It prints the bound address (`127.0.0.1:PORT`) on stdout, one line, once it
//! accepts connections, and stops on SIGTERM or Ctrl-C.

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The fixed answer: allowed, no patch.
const ALLOWED: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"00000000-0000-0000-0000-000000000000","allowed":true}}"#;

/// A no-op admission server on tether's TLS and HTTP stack.
#[derive(Debug, Parser)]
#[command(name = "noop-server", version)]
struct Args {
    /// Address to listen on (HTTPS). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serving certificate (PEM chain).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// Serving key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// Per-request timeout in milliseconds (the same layer as tether's router).
    #[arg(long, default_value_t = 4000)]
    request_timeout_ms: u64,
    /// CPU time, in microseconds, each `POST /mutate` spends spinning before it
    /// answers: a stand-in handler of known cost, to measure what throughput the
    /// stack leaves for a given amount of admission work.
    #[arg(long, default_value_t = 0)]
    work_us: u64,
}

/// Spin iterations per request (from `--work-us`, calibrated at start): counted
/// iterations, not a clock, so a request preempted while it spins still costs
/// the same CPU.
static WORK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn spin(iterations: u64) {
    let mut x = 0u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    std::hint::black_box(x);
}

/// Iterations of [`spin`] that take `us` microseconds on this machine now.
fn calibrate(us: u64) -> u64 {
    if us == 0 {
        return 0;
    }
    let probe = 10_000_000;
    let best = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            spin(probe);
            t.elapsed()
        })
        .min()
        .unwrap_or_default();
    (probe as f64 * us as f64 / (best.as_secs_f64() * 1e6).max(1e-9)) as u64
}

async fn mutate(body: Bytes) -> impl IntoResponse {
    // The body is read in full by the extractor, as tether reads it.
    let _ = body.len();
    if let Some(&n) = WORK.get() {
        spin(n);
    }
    ([(header::CONTENT_TYPE, "application/json")], ALLOWED)
}

async fn ready() -> &'static str {
    "ready\n"
}

fn router(request_timeout: Duration) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(ready))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(webhook::server::BODY_LIMIT))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    WORK.get_or_init(|| calibrate(args.work_us));
    // The same runtime as `tether serve`: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let resolver = certs::ReloadingResolver::new(&args.tls_cert, &args.tls_key, certs::CertMetrics::default())
            .context("loading the serving certificate")?;
        let tls = Arc::new(certs::tls::server_config(resolver.clone(), None).context("TLS configuration")?);
        // tether watches its certificate too; keep that cost on both sides.
        let _cert_watch = resolver.watch(Duration::from_secs(10));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{addr}")?;
            out.flush()?;
        }
        webhook::server::serve_tls(
            listener,
            tls,
            router(Duration::from_millis(args.request_timeout_ms.max(1))),
            shutdown_signal(),
            Duration::from_secs(5),
        )
        .await;
        Ok(())
    })
}

// The same allocator as `tether serve`: part of the stack both servers share.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
