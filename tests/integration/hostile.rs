//! Hostile input against a running webhook over real TLS: malformed and
//! oversized bodies, wrong types, duplicate keys, invalid UTF-8, 10,000
//! containers, slow and abandoned requests, HTTP/2 stream resets. Every case
//! gets a clear answer or a closed connection (never a hang: every client call
//! has a timeout), and a valid AdmissionReview is answered with its patch right
//! after each. None of them may reach the panic boundary.

use crate::common::{data, store_in, tether};
use crate::tls::{client, client_config};
use base64::Engine;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webhook::policy::Policy;
use webhook::run::{Running, ServeOptions, start};

/// The per-request timeout the test servers run with.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest any single client call may take before the case fails as a hang.
const CALL: Duration = Duration::from_secs(20);

/// A `tether serve` with the demo store and its own CA.
pub struct Server {
    /// Holds the store and certificates for the server's lifetime.
    pub _dir: tempfile::TempDir,
    pub ca: String,
    pub running: Running,
}

/// The ReplicaSet pod of the demo store (containers app, envoy; init container migrate).
pub const CHECKOUT: &str = "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json";

pub fn review(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(rel)).unwrap()).unwrap()
}

/// Builds the demo store in `dir` and writes a server certificate for localhost.
pub fn store_and_pki(dir: &std::path::Path) -> (String, certs::generate::Pki) {
    let store = store_in(dir);
    let events = data("demo/shop-events.jsonl");
    tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    let pki = certs::generate::for_service("tether-webhook", "tether-system", &["localhost".into()], 1).unwrap();
    pki.write(&dir.join("pki"), false).unwrap();
    (store, pki)
}

pub async fn serve(policy: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (store, pki) = store_and_pki(dir.path());
    let pki_dir = dir.path().join("pki");
    let running = start(ServeOptions {
        store: store.into(),
        tls_cert: pki_dir.join("tls.crt"),
        tls_key: pki_dir.join("tls.key"),
        client_ca: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        policy: Policy::from_yaml(policy).unwrap(),
        request_timeout: REQUEST_TIMEOUT,
        drain: Duration::from_secs(2),
        cert_poll: Duration::from_secs(1),
        store_poll: Duration::from_millis(300),
        decision_cache_entries: webhook::cache::DEFAULT_ENTRIES,
    })
    .await
    .unwrap();
    Server {
        _dir: dir,
        ca: pki.ca_cert,
        running,
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.running.addr.port())
    }

    /// A fresh HTTP/2 client (ALPN h2) trusting only this server's CA.
    pub fn h2(&self) -> reqwest::Client {
        client(client_config(&self.ca, None), true)
    }

    /// Posts `body` to `path` and returns (status, body text).
    pub async fn post(&self, path: &str, body: Vec<u8>) -> (u16, String) {
        let resp = self
            .h2()
            .post(self.url(path))
            .header("content-type", "application/json")
            .timeout(CALL)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        self.h2()
            .get(format!("http://{}/metrics", self.running.metrics_addr))
            .timeout(CALL)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A valid AdmissionReview on a new connection gets its patch.
    pub async fn still_answers(&self, after: &str) {
        let (status, text) = self
            .post("/mutate", serde_json::to_vec(&review(CHECKOUT)).unwrap())
            .await;
        assert_eq!(status, 200, "after {after}: {text}");
        let patch = patch_of(&serde_json::from_str::<Value>(&text).unwrap()["response"]);
        assert!(
            patch.to_string().contains("tether/shop/deployment/checkout/app-"),
            "after {after}: {patch}"
        );
    }

    /// A TLS connection offering only `alpn`.
    pub async fn tls(&self, alpn: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut config = client_config(&self.ca, None);
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(self.running.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(CALL, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap()
    }
}

/// The JSON patch of an AdmissionResponse (Null when there is none).
pub fn patch_of(res: &Value) -> Value {
    let bytes: Vec<u8> = res["patch"]
        .as_str()
        .map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).unwrap())
        .unwrap_or_default();
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// What a body case must be answered with.
enum Expect {
    /// HTTP 400 whose message contains the text.
    Refused(&'static str),
    /// HTTP 413.
    TooLarge,
    /// HTTP 200, allowed, no patch.
    Untouched,
    /// HTTP 200, allowed, with a patch containing the text.
    Patched(&'static str),
}

fn with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut r = review(CHECKOUT);
    edit(&mut r);
    serde_json::to_vec(&r).unwrap()
}

/// The valid review with `needle` (a JSON fragment of it) replaced by `by`.
fn spliced(needle: &str, by: &str) -> Vec<u8> {
    let text = serde_json::to_string(&review(CHECKOUT)).unwrap();
    assert!(text.contains(needle), "{needle} not in the fixture");
    text.replacen(needle, by, 1).into_bytes()
}

fn body_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let valid = serde_json::to_vec(&review(CHECKOUT)).unwrap();
    let deep_array = spliced(
        "\"request\":",
        &format!(
            "\"x-unknown\":{}{},\"request\":",
            "[".repeat(1_000_000),
            "]".repeat(1_000_000)
        ),
    );
    let deep_label = {
        let nested = format!("{}1{}", "{\"a\":".repeat(5_000), "}".repeat(5_000));
        spliced("\"app\":\"checkout\"", &format!("\"app\":{nested}"))
    };
    let deep_unknown = {
        let nested = format!("{}1{}", "[".repeat(5_000), "]".repeat(5_000));
        spliced("\"dnsPolicy\"", &format!("\"x-unknown\":{nested},\"dnsPolicy\""))
    };
    let mut invalid_utf8_in_string = spliced("\"checkout-6c9d7b8f4d-\"", "\"checkout-XX\"");
    let at = invalid_utf8_in_string.windows(2).position(|w| w == b"XX").unwrap();
    invalid_utf8_in_string[at] = 0xff;
    invalid_utf8_in_string[at + 1] = 0xfe;
    let mut invalid_utf8_outside = valid.clone();
    invalid_utf8_outside.insert(1, 0xc3);
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend_from_slice(&valid);
    vec![
        ("empty body", Vec::new(), Expect::Refused("not JSON")),
        (
            "truncated JSON",
            valid[..valid.len() / 2].to_vec(),
            Expect::Refused("not JSON"),
        ),
        // Unknown envelope fields are skipped without recursion (serde_json's
        // ignore_value keeps its own stack): no limit is needed, the review is answered.
        (
            "1,000,000 nested arrays in an unknown envelope field",
            deep_array,
            Expect::Patched("tether/shop/deployment/checkout/app-"),
        ),
        (
            "5,000 nested objects as a label value",
            deep_label,
            Expect::Refused("expected a string"),
        ),
        // Fields of the Pod tether does not read are skipped the same way.
        (
            "5,000 nested arrays in an unknown Pod field",
            deep_unknown,
            Expect::Patched("tether/shop/deployment/checkout/app-"),
        ),
        ("a JSON array", b"[1,2,3]".to_vec(), Expect::Refused("does not parse")),
        ("JSON null", b"null".to_vec(), Expect::Refused("does not parse")),
        (
            "kind is a number",
            with(|r| r["kind"] = json!(7)),
            Expect::Refused("does not parse"),
        ),
        (
            "apiVersion is an object",
            with(|r| r["apiVersion"] = json!({})),
            Expect::Refused("does not parse"),
        ),
        (
            "request is a string",
            with(|r| r["request"] = json!("x")),
            Expect::Refused("does not parse"),
        ),
        (
            "uid is a number",
            with(|r| r["request"]["uid"] = json!(1)),
            Expect::Refused("does not parse"),
        ),
        // Regression: was answered "the body is not JSON".
        (
            "operation is a number",
            with(|r| r["request"]["operation"] = json!(1)),
            Expect::Refused("does not parse"),
        ),
        (
            "namespace is a list",
            with(|r| r["request"]["namespace"] = json!(["shop"])),
            Expect::Refused("does not parse"),
        ),
        (
            "dryRun is a string",
            with(|r| r["request"]["dryRun"] = json!("yes")),
            Expect::Refused("does not parse"),
        ),
        // Regression: serde read `[]` as an empty Pod, allowed untouched.
        (
            "object is an array",
            with(|r| r["request"]["object"] = json!([])),
            Expect::Refused("expected an object"),
        ),
        (
            "a ConfigMap object that is an array",
            with(|r| {
                r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
                r["request"]["object"] = json!(["x"]);
            }),
            Expect::Refused("expected an object"),
        ),
        (
            "containers is an object",
            with(|r| r["request"]["object"]["spec"]["containers"] = json!({"app": {}})),
            Expect::Refused("Pod"),
        ),
        (
            "a container name is a number",
            with(|r| r["request"]["object"]["spec"]["containers"][0]["name"] = json!(5)),
            Expect::Refused("Pod"),
        ),
        (
            "an annotation value is a number",
            with(|r| r["request"]["object"]["metadata"]["annotations"] = json!({"a": 1})),
            Expect::Refused("Pod"),
        ),
        (
            "seccompProfile type is a number",
            with(|r| {
                r["request"]["object"]["spec"]["containers"][0]["securityContext"] =
                    json!({"seccompProfile": {"type": 2}})
            }),
            Expect::Refused("Pod"),
        ),
        (
            "ownerReferences is a string",
            with(|r| r["request"]["object"]["metadata"]["ownerReferences"] = json!("rs")),
            Expect::Refused("Pod"),
        ),
        (
            "a duplicate kind key",
            spliced(
                "\"kind\":\"AdmissionReview\"",
                "\"kind\":\"AdmissionReview\",\"kind\":\"AdmissionReview\"",
            ),
            Expect::Refused("duplicate field `kind`"),
        ),
        (
            "a duplicate request uid key",
            spliced("\"uid\":\"9b6e3a6b-", "\"uid\":\"a\",\"uid\":\"9b6e3a6b-"),
            Expect::Refused("duplicate field `uid`"),
        ),
        (
            "invalid UTF-8 in a string",
            invalid_utf8_in_string,
            Expect::Refused("not UTF-8"),
        ),
        (
            "invalid UTF-8 outside strings",
            invalid_utf8_outside,
            Expect::Refused("not JSON"),
        ),
        (
            "a lone surrogate escape",
            spliced("\"checkout-6c9d7b8f4d-\"", "\"checkout-\\ud800\""),
            Expect::Refused("hex escape"),
        ),
        ("a byte order mark", bom, Expect::Refused("not JSON")),
        (
            "a number out of range",
            spliced("\"dryRun\":false", "\"dryRun\":1e999"),
            Expect::Refused("number out of range"),
        ),
        (
            "trailing garbage",
            {
                let mut v = valid.clone();
                v.extend_from_slice(b"}}");
                v
            },
            Expect::Refused("not JSON"),
        ),
        (
            "a 2.9 MB annotation value",
            with(|r| r["request"]["object"]["metadata"]["annotations"] = json!({"big": "x".repeat(2_900_000)})),
            Expect::Patched("tether/shop/deployment/checkout/app-"),
        ),
        (
            "a 4 MB body",
            with(|r| r["request"]["object"]["metadata"]["annotations"] = json!({"big": "x".repeat(4_000_000)})),
            Expect::TooLarge,
        ),
        (
            "a NUL in a container name",
            with(|r| r["request"]["object"]["spec"]["containers"][1]["name"] = json!("env\u{0}oy")),
            Expect::Patched("tether/shop/deployment/checkout/app-"),
        ),
        (
            "a container named ../../etc",
            with(|r| r["request"]["object"]["spec"]["containers"][1]["name"] = json!("../../etc")),
            Expect::Patched("tether/shop/deployment/checkout/app-"),
        ),
        (
            "an owner name with a slash",
            with(|r| {
                r["request"]["object"]["metadata"]["ownerReferences"][0]["name"] = json!("../checkout-6c9d7b8f4d")
            }),
            Expect::Untouched,
        ),
        (
            "a review for a ConfigMap of 10,000 keys",
            with(|r| {
                r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
                let data: serde_json::Map<String, Value> = (0..10_000).map(|i| (format!("k{i}"), json!("v"))).collect();
                r["request"]["object"] =
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": data});
            }),
            Expect::Untouched,
        ),
    ]
}

/// Guards every body case: a 400 naming the problem, a 413, or the right
/// admission answer; the server answers a valid review after each, on /mutate
/// and /validate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_clear_answers_and_the_server_keeps_answering() {
    let s = serve("{}").await;
    let cases = body_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for (what, body, expect) in cases {
        for endpoint in ["/mutate", "/validate"] {
            let (status, text) = s.post(endpoint, body.clone()).await;
            let shown = text.chars().take(300).collect::<String>();
            let answer: Option<Value> = serde_json::from_str(&text).ok();
            let allowed = answer.as_ref().map(|v| v["response"]["allowed"] == true);
            let ok = match (&expect, endpoint) {
                (Expect::Refused(needle), _) => status == 400 && text.contains(needle),
                (Expect::TooLarge, _) => status == 413,
                (Expect::Untouched | Expect::Patched(_), "/validate") => status == 200 && allowed == Some(true),
                (Expect::Untouched, _) => {
                    status == 200
                        && allowed == Some(true)
                        && answer.as_ref().is_some_and(|v| patch_of(&v["response"]).is_null())
                }
                (Expect::Patched(needle), _) => {
                    status == 200
                        && allowed == Some(true)
                        && answer
                            .as_ref()
                            .is_some_and(|v| patch_of(&v["response"]).to_string().contains(needle))
                }
            };
            if !ok {
                wrong.push(format!("{what} {endpoint}: {status} {shown}"));
            }
            s.still_answers(what).await;
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

pub async fn assert_no_panics(s: &Server) {
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("tether_handler_panics_total 0\n"),
        "a case reached the panic boundary:\n{metrics}"
    );
}

/// 10,000 containers: the known ones get their profiles, the patch applies to
/// the pod, and the answer comes within a bound (measured: see the report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_containers_are_answered_correctly_and_in_bounded_time() {
    let s = serve("{}").await;
    let mut r = review(CHECKOUT);
    let containers = r["request"]["object"]["spec"]["containers"].as_array_mut().unwrap();
    for i in 0..10_000 {
        containers.push(json!({"name": format!("side-{i}"), "image": "registry.example/side:1", "resources": {}}));
    }
    let object = r["request"]["object"].clone();
    let body = serde_json::to_vec(&r).unwrap();
    assert!(body.len() < webhook::server::BODY_LIMIT, "{} bytes", body.len());
    let started = Instant::now();
    let (status, text) = s.post("/mutate", body.clone()).await;
    let took = started.elapsed();
    eprintln!("10,000 containers ({} bytes): answered in {took:?}", body.len());
    assert_eq!(status, 200, "{}", text.chars().take(300).collect::<String>());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let patch = patch_of(&v["response"]);
    let mut patched = object.clone();
    json_patch::patch(
        &mut patched,
        &serde_json::from_value::<json_patch::Patch>(patch.clone()).unwrap(),
    )
    .unwrap();
    let spec = &patched["spec"];
    assert!(
        spec["containers"][0]["securityContext"]["seccompProfile"]["localhostProfile"]
            .as_str()
            .unwrap()
            .starts_with("tether/shop/deployment/checkout/app-")
    );
    assert!(
        spec["initContainers"][0]["securityContext"]["seccompProfile"]["localhostProfile"]
            .as_str()
            .unwrap()
            .starts_with("tether/shop/deployment/checkout/migrate-")
    );
    // The unknown side containers are left as they came.
    assert_eq!(spec["containers"][10_001], object["spec"]["containers"][10_001]);
    let (status, _) = s.post("/validate", body).await;
    assert_eq!(status, 200);
    s.still_answers("10,000 containers").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Annotation keys with `/` and `~` already on the pod: the patch escapes its
/// paths (RFC 6901) and applies, leaving those annotations as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_keys_with_slash_and_tilde_survive_the_patch() {
    let s = serve("{}").await;
    let odd = json!({"a~b/c": "1", "~1": "2", "/": "3", "~": "4", "tether.dev~1profile.app": "5"});
    let mut r = review(CHECKOUT);
    r["request"]["object"]["metadata"]["annotations"] = odd.clone();
    let object = r["request"]["object"].clone();
    let (status, text) = s.post("/mutate", serde_json::to_vec(&r).unwrap()).await;
    assert_eq!(status, 200, "{text}");
    let patch = patch_of(&serde_json::from_str::<Value>(&text).unwrap()["response"]);
    let mut patched = object;
    json_patch::patch(
        &mut patched,
        &serde_json::from_value::<json_patch::Patch>(patch.clone()).unwrap(),
    )
    .unwrap_or_else(|e| panic!("{e}: {patch}"));
    for (k, v) in odd.as_object().unwrap() {
        assert_eq!(&patched["metadata"]["annotations"][k], v, "{k} in {patch}");
    }
    assert!(
        patched["spec"]["containers"][0]["securityContext"]["seccompProfile"]["localhostProfile"]
            .as_str()
            .unwrap()
            .starts_with("tether/shop/deployment/checkout/app-")
    );
    s.still_answers("odd annotation keys").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Reads what the server sends until it closes the connection or `within`
/// passes; returns (what was read, whether it closed).
async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut R, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slowloris on the body (HTTP/1.1, one byte a second): the per-request
/// timeout covers the body read, so the server answers 503 and does not keep
/// the request forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http1_body_is_cut_off_by_the_request_timeout() {
    let s = serve("{}").await;
    let mut tls = s.tls(b"http/1.1").await;
    let started = Instant::now();
    tls.write_all(
        b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{",
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let (answer, _) = read_until_closed(&mut rd, REQUEST_TIMEOUT + Duration::from_secs(5)).await;
    let took = started.elapsed();
    trickle.abort();
    assert!(answer.starts_with("HTTP/1.1 503"), "after {took:?}: {answer:?}");
    assert!(
        took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    s.still_answers("slow HTTP/1.1 body").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Slowloris on the headers (HTTP/1.1): the connection is closed once
/// `HEADER_READ_TIMEOUT` passes, however slowly bytes keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http1_headers_are_cut_off_by_the_header_timeout() {
    let s = serve("{}").await;
    let tls = s.tls(b"http/1.1").await;
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        let _ = wr.write_all(b"POST /mutate HTTP/1.1\r\n").await;
        for i in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if wr.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let limit = webhook::server::HEADER_READ_TIMEOUT;
    let (answer, closed) = read_until_closed(&mut rd, limit + Duration::from_secs(5)).await;
    let took = started.elapsed();
    trickle.abort();
    assert!(closed, "still open after {took:?}: {answer:?}");
    assert!(
        took >= limit - Duration::from_secs(1),
        "closed early, after {took:?}: {answer:?}"
    );
    s.still_answers("slow HTTP/1.1 headers").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// A client that completes the TLS handshake and then sends nothing, with
/// either protocol: the connection is closed once `HEADER_READ_TIMEOUT` passes
/// (it was held open forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let s = serve("{}").await;
    let limit = webhook::server::HEADER_READ_TIMEOUT;
    let waits = [&b"http/1.1"[..], &b"h2"[..]].map(|alpn| {
        let s = &s;
        async move {
            let mut tls = s.tls(alpn).await;
            let started = Instant::now();
            let (answer, closed) = read_until_closed(&mut tls, limit + Duration::from_secs(5)).await;
            (
                String::from_utf8_lossy(alpn).into_owned(),
                started.elapsed(),
                closed,
                answer,
            )
        }
    });
    for (alpn, took, closed, answer) in futures_util::future::join_all(waits).await {
        assert!(closed, "{alpn}: still open after {took:?}: {answer:?}");
        assert!(
            took >= limit - Duration::from_secs(1),
            "{alpn}: closed early, after {took:?}"
        );
    }
    s.still_answers("silent connections").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Slowloris over HTTP/2: a body stream that never ends is answered 503 when
/// the request timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_body_is_cut_off_by_the_request_timeout() {
    let s = serve("{}").await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let feeder = tokio::spawn(async move {
        for _ in 0..60 {
            if tx.send(Ok(b" ".to_vec())).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let started = Instant::now();
    let resp = s
        .h2()
        .post(s.url("/mutate"))
        .timeout(CALL)
        .body(body)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    feeder.abort();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 503, "after {took:?}");
    assert!(took < REQUEST_TIMEOUT + Duration::from_secs(3), "{took:?}");
    s.still_answers("slow HTTP/2 body").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Connections abandoned at every stage: before the handshake ends, with
/// garbage instead of TLS, mid-headers, mid-body, with a Content-Length that
/// lies. The server answers a valid review after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_leave_the_server_answering() {
    let s = serve("{}").await;
    let body = serde_json::to_vec(&review(CHECKOUT)).unwrap();
    // TCP only, closed at once.
    drop(tokio::net::TcpStream::connect(s.running.addr).await.unwrap());
    s.still_answers("a TCP connect and close").await;
    // Garbage where a ClientHello belongs.
    let mut tcp = tokio::net::TcpStream::connect(s.running.addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(tcp);
    s.still_answers("a broken ClientHello").await;
    // Mid-headers.
    let mut tls = s.tls(b"http/1.1").await;
    tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: loc").await.unwrap();
    drop(tls);
    s.still_answers("a close mid-headers").await;
    // Mid-body, Content-Length promising more than is sent.
    let mut tls = s.tls(b"http/1.1").await;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len() * 2
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body[..body.len() / 2]).await.unwrap();
    tls.flush().await.unwrap();
    drop(tls);
    s.still_answers("a close mid-body").await;
    // A half-close after a short body: the server reads EOF and answers or closes.
    let mut tls = s.tls(b"http/1.1").await;
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body).await.unwrap();
    tls.shutdown().await.unwrap();
    let (answer, closed) = read_until_closed(&mut tls, CALL).await;
    assert!(closed, "{answer:?}");
    assert!(!answer.contains(" 500 "), "{answer:?}");
    s.still_answers("a Content-Length that lies").await;
    // Chunked in one-byte chunks: a clear, correct answer.
    let mut tls = s.tls(b"http/1.1").await;
    tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut chunked = Vec::new();
    for b in &body {
        chunked.extend_from_slice(b"1\r\n");
        chunked.push(*b);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    tls.write_all(&chunked).await.unwrap();
    let (answer, _) = read_until_closed(&mut tls, CALL).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        answer.chars().take(300).collect::<String>()
    );
    assert!(answer.contains("\"patch\""), "one-byte chunks");
    s.still_answers("one-byte chunks").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// HTTP/2 abuse with a raw h2 client: a stream reset mid-body (RST_STREAM
/// CANCEL), then a valid request on the same connection; a connection dropped
/// with streams open; a request to an unknown path and with a wrong method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_resets_and_dropped_connections_leave_the_server_answering() {
    let s = serve("{}").await;
    let body = bytes::Bytes::from(serde_json::to_vec(&review(CHECKOUT)).unwrap());
    let (mut h2c, conn) = h2::client::handshake(s.tls(b"h2").await).await.unwrap();
    let driver = tokio::spawn(conn);
    let request = |path: &str, method: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    // RST_STREAM mid-body.
    h2c = h2c.ready().await.unwrap();
    let (resp, mut stream) = h2c.send_request(request("/mutate", "POST"), false).unwrap();
    stream.send_data(body.slice(..body.len() / 2), false).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.send_reset(h2::Reason::CANCEL);
    assert!(tokio::time::timeout(CALL, resp).await.unwrap().is_err());
    // The same connection still serves.
    let answer = |h2c: h2::client::SendRequest<bytes::Bytes>,
                  path: &'static str,
                  method: &'static str,
                  body: bytes::Bytes| async move {
        let mut h2c = h2c.ready().await.unwrap();
        let (resp, mut stream) = h2c.send_request(request(path, method), body.is_empty()).unwrap();
        if !body.is_empty() {
            stream.send_data(body, true).unwrap();
        }
        let resp = tokio::time::timeout(CALL, resp).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        let mut recv = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(CALL, recv.data()).await.unwrap() {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        (status, String::from_utf8_lossy(&got).into_owned(), h2c)
    };
    let (status, text, h2c) = answer(h2c, "/mutate", "POST", body.clone()).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"patch\""), "{text}");
    let (status, _, h2c) = answer(h2c, "/nowhere", "POST", body.clone()).await;
    assert_eq!(status, 404);
    let (status, _, h2c) = answer(h2c, "/mutate", "GET", bytes::Bytes::new()).await;
    assert_eq!(status, 405);
    // Ten streams opened with half their bodies, then the connection dropped.
    let mut h2c = h2c;
    let mut open = Vec::new();
    for _ in 0..10 {
        h2c = h2c.ready().await.unwrap();
        let (resp, mut stream) = h2c.send_request(request("/validate", "POST"), false).unwrap();
        stream.send_data(body.slice(..body.len() / 2), false).unwrap();
        open.push((resp, stream));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    driver.abort();
    drop(open);
    drop(h2c);
    s.still_answers("an HTTP/2 connection dropped with streams open").await;
    // A SETTINGS frame of 4 bytes (a multiple of 6 is required): FRAME_SIZE_ERROR.
    let mut tls = s.tls(b"h2").await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x04\x00\x00\x00\x00\x00junk")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut tls, CALL).await;
    assert!(closed, "a broken HTTP/2 frame left the connection open");
    s.still_answers("a broken HTTP/2 frame").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// The panic boundary: a route that panics, behind exactly the server's
/// layers (`webhook::server::guard`) over real TLS, is answered HTTP 500 with a
/// clear message, counted in `tether_handler_panics_total`, and the same
/// server answers a valid review right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_500_counted_and_the_server_keeps_answering() {
    use axum::routing::post;
    let dir = tempfile::tempdir().unwrap();
    let (store, pki) = store_and_pki(dir.path());
    let index = Arc::new(webhook::index::SharedIndex::default());
    index
        .refresh(&profile_store::FsStore::open(std::path::Path::new(&store)).unwrap())
        .unwrap();
    let admission = Arc::new(webhook::review::Admission {
        policy: Policy::from_yaml("{}").unwrap(),
        index,
        metrics: webhook::metrics::Metrics::default(),
        cache: Default::default(),
    });
    let metrics = admission.metrics.clone();
    let routes = webhook::server::admission_routes().route(
        "/panic",
        post(|| async {
            // What a bug on outside data would do.
            let input: Option<u32> = std::hint::black_box(None);
            input.unwrap().to_string()
        }),
    );
    let app = webhook::server::guard(routes, admission, REQUEST_TIMEOUT);
    let server = crate::tls::TlsApp::start(&dir.path().join("pki"), app).await;
    let port = server.port;
    let c = client(client_config(&pki.ca_cert, None), true);
    for round in 1..=2u64 {
        let resp = c
            .post(format!("https://localhost:{port}/panic"))
            .timeout(CALL)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 500);
        let text = resp.text().await.unwrap();
        assert!(text.contains("tether_handler_panics_total"), "{text}");
        assert_eq!(metrics.handler_panics.get(), round);
        // A valid review on the same connection right after.
        let resp = c
            .post(format!("https://localhost:{port}/mutate"))
            .timeout(CALL)
            .json(&review(CHECKOUT))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert!(
            patch_of(&v["response"])
                .to_string()
                .contains("tether/shop/deployment/checkout/app-")
        );
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
    assert!(text.contains("tether_handler_panics_total 2\n"), "{text}");
    server.shutdown().await;
}
