//! `loadgen`: an HTTP/2 load generator for tether's admission webhook.
//!
//! It opens `--connections` TLS connections (rustls with ring, trusting only the
//! CA given with `--ca`, ALPN `h2` required), kept alive for the whole run, and
//! POSTs a body (`--body`, an AdmissionReview) to `--url` on every stream. With
//! `--body` given several times, the bodies are sent in turn (request `i` carries
//! body `i mod n`), so one run can mix different reviews, e.g. for a soak test.
//!
//! Two modes:
//!
//! - **closed loop** (no `--rate`): `--concurrency` workers per connection, each
//!   sending its next request when the previous answer is read in full. Measures
//!   the maximum throughput; latency is from send to the last byte of the answer.
//! - **open loop** (`--rate RPS`): requests are sent on a fixed schedule (request
//!   `i` at `start + i / RPS`, spread round-robin over the connections) whatever
//!   the server does. Latency is measured from the *scheduled* send time, so a
//!   stalled server or client is charged for every request it delayed (no
//!   coordinated omission); `service_*` fields are from the actual send time.
//!
//! Every answer must have the status `--expect-status` (200 unless told) with its
//! body read to the end; anything else is an error (`non_200` counts the subset
//! that got another status). `statuses` counts the answers by status, so a run of
//! invalid reviews with `--expect-status 400` shows what the server answered.
//! Requests started during `--warmup` are not counted. The result is one JSON line
//! on stdout.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The load generator's options.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// The URL to POST to, e.g. https://localhost:8443/mutate.
    #[arg(long)]
    url: http::Uri,
    /// The CA certificate (PEM) the server's certificate must chain to; nothing
    /// else is trusted.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// A request body (sent with content-type application/json). Give it several
    /// times to send the bodies in turn.
    #[arg(long, value_name = "FILE", required = true)]
    body: Vec<PathBuf>,
    /// The HTTP status every answer must have; any other is an error.
    #[arg(long, value_name = "CODE", default_value_t = 200)]
    expect_status: u16,
    /// HTTP/2 connections, each kept alive for the whole run.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Closed loop: concurrent streams per connection.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: total requests per second on a fixed schedule (no closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Worker threads of the client's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A label copied into the JSON result.
    #[arg(long, default_value = "")]
    label: String,
    /// Send one request per body, print each answer's body on stdout and exit
    /// (non-zero unless every status is the expected one).
    #[arg(long)]
    once: bool,
}

/// Longest latency the histograms hold, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;

/// How long to wait for answers still in flight when an open-loop run ends.
const GRACE: Duration = Duration::from_secs(5);

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| anyhow!("histogram: {e}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LATENCY_US)
}

/// What one worker saw.
struct Tally {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    ok: u64,
    errors: u64,
    non_200: u64,
    statuses: BTreeMap<u16, u64>,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

impl Tally {
    fn new() -> Result<Tally> {
        Ok(Tally {
            latency: histogram()?,
            service: histogram()?,
            ok: 0,
            errors: 0,
            non_200: 0,
            statuses: BTreeMap::new(),
            first_error: None,
            last_done: None,
        })
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.latency
            .add(&other.latency)
            .map_err(|e| anyhow!("histogram: {e}"))?;
        self.service
            .add(&other.service)
            .map_err(|e| anyhow!("histogram: {e}"))?;
        self.ok += other.ok;
        self.errors += other.errors;
        self.non_200 += other.non_200;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    /// Records one request that was due at `due`, sent at `sent` and answered
    /// (or failed) at `done`.
    fn record(&mut self, outcome: Outcome, due: Instant, sent: Instant, done: Instant) {
        self.last_done = Some(self.last_done.map_or(done, |l| l.max(done)));
        if let Outcome::Ok(status) | Outcome::Status(status) = outcome {
            *self.statuses.entry(status.as_u16()).or_default() += 1;
        }
        match outcome {
            Outcome::Ok(_) => {
                self.ok += 1;
                // Values are clamped into the histogram's range, so recording cannot fail.
                let _ = self.latency.record(micros(done - due));
                let _ = self.service.record(micros(done - sent));
            }
            Outcome::Status(status) => {
                self.errors += 1;
                self.non_200 += 1;
                self.first_error.get_or_insert_with(|| format!("HTTP status {status}"));
            }
            Outcome::Failed(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// One open-loop request, answered or failed.
struct Answered {
    outcome: Outcome,
    due: Instant,
    sent: Instant,
    done: Instant,
}

/// How one request ended: answered with the expected status, answered with
/// another, or not answered.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(http::StatusCode),
    Status(http::StatusCode),
    Failed(String),
}

/// Everything a request needs, shared by all workers.
struct Target {
    uri: http::Uri,
    /// Sent in turn; never empty (clap requires one `--body`).
    bodies: Vec<Bytes>,
    /// How many requests were built: picks the next body.
    sent: AtomicUsize,
    expect: http::StatusCode,
}

impl Target {
    /// The body of the next request: the bodies in turn.
    fn next_body(&self) -> Bytes {
        let i = self.sent.fetch_add(1, Ordering::Relaxed);
        self.bodies
            .get(i % self.bodies.len().max(1))
            .cloned()
            .unwrap_or_default()
    }

    fn request(&self) -> Result<http::Request<Full<Bytes>>> {
        http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.next_body()))
            .context("building the request")
    }

    /// Whether an answer with `status` is what the run expects.
    fn classify(&self, status: http::StatusCode) -> Outcome {
        if status == self.expect {
            Outcome::Ok(status)
        } else {
            Outcome::Status(status)
        }
    }

    /// Sends one request on `conn` and reads the answer to the end.
    async fn send(&self, conn: &mut SendRequest<Full<Bytes>>) -> (Outcome, Option<Bytes>) {
        let req = match self.request() {
            Ok(r) => r,
            Err(e) => return (Outcome::Failed(format!("{e:#}")), None),
        };
        if let Err(e) = conn.ready().await {
            return (Outcome::Failed(format!("connection not ready: {e}")), None);
        }
        let res = match conn.send_request(req).await {
            Ok(r) => r,
            Err(e) => return (Outcome::Failed(format!("request failed: {e}")), None),
        };
        let status = res.status();
        let body = match res.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return (Outcome::Failed(format!("reading the answer: {e}")), None),
        };
        (self.classify(status), Some(body))
    }
}

fn tls_config(ca: &PathBuf) -> Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| anyhow!("{}: unreadable PEM: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no CERTIFICATE block", ca.display());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(certs::load::provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens one kept-alive HTTP/2 connection over TLS.
async fn connect(uri: &http::Uri, tls: Arc<rustls::ClientConfig>) -> Result<SendRequest<Full<Bytes>>> {
    if uri.scheme_str() != Some("https") {
        bail!("{uri}: only https URLs are supported");
    }
    let host = uri.host().ok_or_else(|| anyhow!("{uri}: no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_string()).with_context(|| format!("{host}: not a server name"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {host}:{port}"))?;
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        bail!("{host}:{port} did not negotiate HTTP/2 (ALPN h2)");
    }
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("loadgen: connection ended: {e}");
        }
    });
    Ok(send)
}

/// Closed loop: `concurrency` workers per connection until `end`.
async fn closed_loop(
    target: Arc<Target>,
    conns: Vec<SendRequest<Full<Bytes>>>,
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<Tally> {
    let mut workers = Vec::new();
    for conn in &conns {
        for _ in 0..concurrency.max(1) {
            let (target, mut conn) = (target.clone(), conn.clone());
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::new()?;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let (outcome, _) = target.send(&mut conn).await;
                    if sent >= measure_from {
                        tally.record(outcome, sent, sent, Instant::now());
                    }
                }
                Ok::<_, anyhow::Error>(tally)
            }));
        }
    }
    let mut total = Tally::new()?;
    for w in workers {
        total.merge(w.await.context("worker panicked")??)?;
    }
    Ok(total)
}

/// Open loop: request `i` is due at `start + i / rate`. A dedicated thread keeps
/// the schedule with the OS timer (tokio's timer ticks in whole milliseconds,
/// which would itself add up to 1 ms to latencies measured from the schedule) and
/// spawns each request on the runtime when it is due.
async fn open_loop(
    target: Arc<Target>,
    conns: Vec<SendRequest<Full<Bytes>>>,
    rate: f64,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Result<(Tally, Duration)> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    let handle = tokio::runtime::Handle::current();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::task::JoinHandle<Answered>>();
    let scheduler = std::thread::spawn(move || -> Duration {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut max_lag = Duration::ZERO;
        let mut i: u32 = 0;
        loop {
            let due = start + interval * i;
            if due >= end {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                max_lag = max_lag.max(now - due);
            }
            let conn = conns[i as usize % conns.len()].clone();
            let target = target.clone();
            let task = handle.spawn(async move {
                let mut conn = conn;
                let sent = Instant::now();
                let (outcome, _) = target.send(&mut conn).await;
                Answered {
                    outcome,
                    due,
                    sent,
                    done: Instant::now(),
                }
            });
            if tx.send(task).is_err() {
                break;
            }
            i += 1;
        }
        max_lag
    });
    let mut total = Tally::new()?;
    let mut late = 0u64;
    while let Some(task) = rx.recv().await {
        let deadline = end.max(Instant::now()) + GRACE;
        match tokio::time::timeout_at(deadline.into(), task).await {
            Ok(joined) => {
                let a = joined.context("request task panicked")?;
                if a.due >= measure_from {
                    total.record(a.outcome, a.due, a.sent, a.done);
                }
            }
            Err(_) => late += 1,
        }
    }
    total.errors += late;
    if late > 0 {
        total
            .first_error
            .get_or_insert_with(|| format!("{late} requests unanswered {GRACE:?} after the end"));
    }
    let max_lag = scheduler.join().map_err(|_| anyhow!("the scheduler thread panicked"))?;
    Ok((total, max_lag))
}

/// CPU time this process has used (user + system), from `/proc/self/stat`
/// (Linux reports it in ticks of 1/100 s); `None` where that cannot be read.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

fn percentiles(prefix: &str, h: &Histogram<u64>, out: &mut serde_json::Map<String, serde_json::Value>) {
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)] {
        out.insert(format!("{prefix}{name}_us"), json!(h.value_at_quantile(q)));
    }
    out.insert(format!("{prefix}max_us"), json!(h.max()));
    out.insert(format!("{prefix}mean_us"), json!((h.mean() * 10.0).round() / 10.0));
}

async fn run(args: Args) -> Result<()> {
    let mut bodies = Vec::new();
    for path in &args.body {
        bodies.push(Bytes::from(
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        ));
    }
    let expect = http::StatusCode::from_u16(args.expect_status)
        .map_err(|e| anyhow!("--expect-status {}: {e}", args.expect_status))?;
    let tls = Arc::new(tls_config(&args.ca)?);
    let target = Arc::new(Target {
        uri: args.url.clone(),
        bodies,
        sent: AtomicUsize::new(0),
        expect,
    });

    if args.once {
        let mut conn = connect(&args.url, tls).await?;
        for path in &args.body {
            let (outcome, answer) = target.send(&mut conn).await;
            if let Some(answer) = answer {
                println!("{}", String::from_utf8_lossy(&answer));
            }
            match outcome {
                Outcome::Ok(_) => {}
                Outcome::Status(s) => bail!("{}: HTTP status {s}, expected {expect}", path.display()),
                Outcome::Failed(e) => bail!("{}: {e}", path.display()),
            }
        }
        return Ok(());
    }

    let mut conns = Vec::new();
    for _ in 0..args.connections.max(1) {
        conns.push(connect(&args.url, tls.clone()).await?);
    }
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let duration = Duration::from_secs_f64(args.duration.max(0.001));
    let start = Instant::now();
    let cpu_at_start = cpu_time();
    let measure_from = start + warmup;
    let end = measure_from + duration;

    let mut out = serde_json::Map::new();
    out.insert("label".into(), json!(args.label));
    out.insert("url".into(), json!(args.url.to_string()));
    out.insert("connections".into(), json!(conns.len()));
    let tally = match args.rate {
        Some(rate) => {
            let (tally, lag) = open_loop(target, conns, rate, start, measure_from, end).await?;
            out.insert("mode".into(), json!("open"));
            out.insert("rate".into(), json!(rate));
            out.insert("schedule_max_lag_us".into(), json!(micros(lag)));
            tally
        }
        None => {
            let tally = closed_loop(target, conns, args.concurrency, measure_from, end).await?;
            out.insert("mode".into(), json!("closed"));
            out.insert("concurrency".into(), json!(args.concurrency.max(1)));
            tally
        }
    };
    // The client's own CPU use over the whole run (warm-up included), in cores:
    // on a small machine it competes with the server.
    if let (Some(a), Some(b)) = (cpu_at_start, cpu_time()) {
        let cores = b.saturating_sub(a).as_secs_f64() / start.elapsed().as_secs_f64();
        out.insert("client_cpu_cores".into(), json!((cores * 100.0).round() / 100.0));
    }
    // Throughput over the measured window, up to the last answer of a request
    // started in it.
    let window = tally
        .last_done
        .map_or(duration, |l| l.saturating_duration_since(measure_from));
    let window = window.max(duration);
    let requests = tally.ok + tally.errors;
    out.insert(
        "duration_s".into(),
        json!((window.as_secs_f64() * 1000.0).round() / 1000.0),
    );
    out.insert("requests".into(), json!(requests));
    out.insert("errors".into(), json!(tally.errors));
    out.insert("non_200".into(), json!(tally.non_200));
    out.insert("expect_status".into(), json!(expect.as_u16()));
    out.insert("bodies".into(), json!(args.body.len()));
    let statuses: serde_json::Map<String, serde_json::Value> = tally
        .statuses
        .iter()
        .map(|(status, n)| (status.to_string(), json!(n)))
        .collect();
    out.insert("statuses".into(), serde_json::Value::Object(statuses));
    out.insert(
        "throughput_rps".into(),
        json!((tally.ok as f64 / window.as_secs_f64() * 10.0).round() / 10.0),
    );
    percentiles("", &tally.latency, &mut out);
    if args.rate.is_some() {
        percentiles("service_", &tally.service, &mut out);
    }
    if let Some(e) = &tally.first_error {
        out.insert("first_error".into(), json!(e));
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(bodies: &[&str], expect: u16) -> Target {
        Target {
            uri: http::Uri::from_static("https://localhost:8443/mutate"),
            bodies: bodies.iter().map(|b| Bytes::copy_from_slice(b.as_bytes())).collect(),
            sent: AtomicUsize::new(0),
            expect: http::StatusCode::from_u16(expect).unwrap(),
        }
    }

    #[test]
    fn several_bodies_are_sent_in_turn() {
        let t = target(&["a", "b", "c"], 200);
        let sent: Vec<String> = (0..7)
            .map(|_| String::from_utf8(collect(t.request().unwrap().into_body()).to_vec()).unwrap())
            .collect();
        assert_eq!(sent, ["a", "b", "c", "a", "b", "c", "a"]);
    }

    fn collect(body: Full<Bytes>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { body.collect().await.unwrap().to_bytes() })
    }

    #[test]
    fn expect_status_decides_which_answers_are_errors() {
        let t = target(&["x"], 400);
        assert_eq!(
            t.classify(http::StatusCode::BAD_REQUEST),
            Outcome::Ok(http::StatusCode::BAD_REQUEST)
        );
        assert_eq!(t.classify(http::StatusCode::OK), Outcome::Status(http::StatusCode::OK));
        let t = target(&["x"], 200);
        assert_eq!(t.classify(http::StatusCode::OK), Outcome::Ok(http::StatusCode::OK));
    }

    #[test]
    fn statuses_are_counted_for_every_answer() {
        let now = Instant::now();
        let mut a = Tally::new().unwrap();
        a.record(Outcome::Ok(http::StatusCode::BAD_REQUEST), now, now, now);
        a.record(Outcome::Status(http::StatusCode::OK), now, now, now);
        a.record(Outcome::Failed("reset".into()), now, now, now);
        let mut b = Tally::new().unwrap();
        b.record(Outcome::Ok(http::StatusCode::BAD_REQUEST), now, now, now);
        a.merge(b).unwrap();
        assert_eq!(a.statuses, BTreeMap::from([(200, 1), (400, 2)]));
        assert_eq!((a.ok, a.errors, a.non_200), (2, 2, 1));
    }

    #[test]
    fn body_is_required_and_repeatable() {
        assert!(Args::try_parse_from(["loadgen", "--url", "https://h/", "--ca", "c"]).is_err());
        let a = Args::try_parse_from([
            "loadgen",
            "--url",
            "https://h/",
            "--ca",
            "c",
            "--body",
            "a",
            "--body",
            "b",
            "--expect-status",
            "400",
        ])
        .unwrap();
        assert_eq!(a.body, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(a.expect_status, 400);
    }
}
