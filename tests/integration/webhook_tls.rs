//! The webhook over real TLS: HTTP/1.1 and HTTP/2 clients that trust only the
//! generated CA, real AdmissionReviews, malformed input, store updates, shutdown.

use crate::common::{data, store_in, tether};
use crate::hostile::patch_of;
use crate::tls::{client, client_config};
use serde_json::{Value, json};
use std::time::Duration;
use webhook::policy::Policy;
use webhook::run::{Running, ServeOptions, start};

struct Setup {
    _dir: tempfile::TempDir,
    store: String,
    ca: String,
    running: Running,
}

fn review(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(rel)).unwrap()).unwrap()
}

const CHECKOUT: &str = "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json";

async fn setup(policy: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("demo/shop-events.jsonl");
    tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    let pki = certs::generate::for_service("tether-webhook", "tether-system", &["localhost".into()], 1).unwrap();
    let pki_dir = dir.path().join("pki");
    pki.write(&pki_dir, false).unwrap();
    let running = start(ServeOptions {
        store: store.clone().into(),
        tls_cert: pki_dir.join("tls.crt"),
        tls_key: pki_dir.join("tls.key"),
        client_ca: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        policy: Policy::from_yaml(policy).unwrap(),
        request_timeout: Duration::from_secs(4),
        drain: Duration::from_secs(5),
        cert_poll: Duration::from_secs(1),
        store_poll: Duration::from_millis(300),
        decision_cache_entries: webhook::cache::DEFAULT_ENTRIES,
    })
    .await
    .unwrap();
    Setup {
        _dir: dir,
        store,
        ca: pki.ca_cert,
        running,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.running.addr.port())
    }

    /// An HTTP/2 client (ALPN h2) and an HTTP/1.1-only client.
    fn clients(&self) -> [(reqwest::Version, reqwest::Client); 2] {
        let mut h1 = client_config(&self.ca, None);
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        [
            (reqwest::Version::HTTP_2, client(client_config(&self.ca, None), true)),
            (reqwest::Version::HTTP_11, client(h1, true)),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_and_validate_over_http2_and_http1() {
    let s = setup("namespaces: {shop: {labels: {tether.dev/allow-exemptions: \"true\"}}}").await;
    for (version, c) in s.clients() {
        let r = review(CHECKOUT);
        let resp = c.post(s.url("/mutate")).json(&r).send().await.unwrap();
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        let res = &body["response"];
        assert_eq!(res["uid"], r["request"]["uid"]);
        let patch = patch_of(res).to_string();
        assert!(patch.contains("tether/shop/deployment/checkout/migrate-"), "{patch}");
        assert!(patch.contains("tether/shop/deployment/checkout/app-"), "{patch}");

        let mut unconfined = r.clone();
        unconfined["request"]["object"]["spec"]["containers"][0]["securityContext"] =
            json!({"seccompProfile": {"type": "Unconfined"}});
        let body: Value = c
            .post(s.url("/validate"))
            .json(&unconfined)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["response"]["allowed"], false);
        assert_eq!(body["response"]["uid"], r["request"]["uid"]);

        let exempt = review("admission/apiserver-1.35/pod-create-bare-exemption-annotation.json");
        let body: Value = c
            .post(s.url("/mutate"))
            .json(&exempt)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(patch_of(&body["response"]).to_string().contains("tether.dev~1exempted"));
    }
    let health = s.clients()[0].1.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = s.clients()[0].1.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.text().await.unwrap(), "ready\n");
    let metrics = s.clients()[0]
        .1
        .get(format!("http://{}/metrics", s.running.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tether_admission_requests_total{endpoint=\"mutate\",operation=\"CREATE\",mode=\"enforce\",decision=\"patched\"} 4",
        "tether_admission_requests_total{endpoint=\"validate\",operation=\"CREATE\",mode=\"enforce\",decision=\"denied\"} 2",
        "tether_admission_duration_seconds_bucket",
        "tether_injections_total{profile=\"Localhost\"}",
        "tether_exemptions_total{result=\"honored\"} 2",
        "tether_store_versions",
        "tether_index_age_seconds",
        "tether_tls_certificate_expiry_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors_and_the_server_keeps_answering() {
    let s = setup("{}").await;
    let [(_, h2), (_, h1)] = s.clients();
    let valid = review(CHECKOUT);
    let mut no_request = valid.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let mut v1beta1 = valid.clone();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut update = valid.clone();
    update["request"]["operation"] = json!("UPDATE");
    let mut no_containers = valid.clone();
    no_containers["request"]["object"]["spec"]["containers"] = json!([]);
    no_containers["request"]["object"]["spec"]["initContainers"] = json!([]);
    let mut configmap = valid.clone();
    configmap["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    configmap["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
    let huge = vec![b' '; 10 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", b"{nope".to_vec(), 400, "not JSON"),
        (
            "no request",
            serde_json::to_vec(&no_request).unwrap(),
            400,
            "no request",
        ),
        (
            "wrong apiVersion",
            serde_json::to_vec(&v1beta1).unwrap(),
            400,
            "admission.k8s.io/v1",
        ),
        ("10 MiB body", huge, 413, ""),
        ("UPDATE", serde_json::to_vec(&update).unwrap(), 200, "\"allowed\":true"),
        (
            "no containers",
            serde_json::to_vec(&no_containers).unwrap(),
            200,
            "\"allowed\":true",
        ),
        (
            "ConfigMap",
            serde_json::to_vec(&configmap).unwrap(),
            200,
            "\"allowed\":true",
        ),
    ];
    for c in [&h2, &h1] {
        for (what, body, status, text) in &cases {
            for endpoint in ["/mutate", "/validate"] {
                let resp = c
                    .post(s.url(endpoint))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{what} {endpoint}: connection error {e}"));
                assert_eq!(resp.status().as_u16(), *status, "{what} {endpoint}");
                let got = resp.text().await.unwrap();
                assert!(got.contains(text), "{what} {endpoint}: {got}");
                // The server answers a valid request right after.
                let ok = c.post(s.url("/mutate")).json(&valid).send().await.unwrap();
                assert_eq!(ok.status(), 200, "after {what}");
            }
        }
    }
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_picked_up_without_a_restart() {
    let s = setup("{}").await;
    let c = &s.clients()[0].1;
    let mut r = review(CHECKOUT);
    r["request"]["namespace"] = json!("fresh");
    let before: Value = c
        .post(s.url("/mutate"))
        .json(&r)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patch_of(&before["response"]), Value::Null);
    // A new namespace's workloads appear in the store.
    let events = std::fs::read_to_string(data("demo/shop-events.jsonl"))
        .unwrap()
        .replace("\"shop\"", "\"fresh\"");
    let file = s._dir.path().join("fresh.jsonl");
    std::fs::write(&file, events).unwrap();
    tether(&["build", "--from", file.to_str().unwrap(), "--store", &s.store]).expect_code(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let after: Value = c
            .post(s.url("/mutate"))
            .json(&r)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if patch_of(&after["response"])
            .to_string()
            .contains("tether/fresh/deployment/checkout/app-")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new profiles never reached admission"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_request_in_flight_and_then_refuses_connections() {
    let s = setup("{}").await;
    let c = s.clients()[0].1.clone();
    let body = serde_json::to_vec(&review(CHECKOUT)).unwrap();
    // A request whose body arrives slowly: in flight when shutdown starts.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let url = s.url("/mutate");
    let inflight = tokio::spawn(async move {
        let stream = tokio_stream_from(rx);
        c.post(url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
    });
    let (first, rest) = body.split_at(body.len() / 2);
    tx.send(Ok(first.to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = s.running.addr;
    let stop = tokio::spawn(s.running.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once shutdown began.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown began"
    );
    tx.send(Ok(rest.to_vec())).await.unwrap();
    drop(tx);
    let resp = inflight.await.unwrap().expect("the request in flight was dropped");
    assert_eq!(resp.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .unwrap()
        .unwrap();
}

/// An mpsc receiver as a `Stream`, for a streaming request body.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Guards the connection threads of `serve_tls`: every request of a connection
/// is answered on one thread (so no other thread is woken to steal its work),
/// and connections are spread over the threads instead of piling onto one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_stays_on_one_thread_and_connections_spread() {
    use axum::routing::get;
    let pki = certs::generate::for_service("tether-webhook", "tether-system", &["localhost".into()], 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path(), false).unwrap();
    let app = axum::Router::new().route(
        "/thread",
        get(|| async { std::thread::current().name().unwrap_or("unnamed").to_string() }),
    );
    let server = crate::tls::TlsApp::start(dir.path(), app).await;
    let port = server.port;
    let threads = webhook::server::connection_threads();
    let mut seen = Vec::new();
    for _ in 0..threads {
        // One client, one HTTP/2 connection: 20 concurrent requests on it. A first
        // request opens the connection alone (concurrent first requests can race
        // and open several).
        let c = client(client_config(&pki.ca_cert, None), true);
        let url = format!("https://localhost:{port}/thread");
        c.get(&url).version(reqwest::Version::HTTP_2).send().await.unwrap();
        let answers = futures_util::future::join_all((0..20).map(|_| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                let res = c.get(&url).version(reqwest::Version::HTTP_2).send().await.unwrap();
                assert_eq!(res.version(), reqwest::Version::HTTP_2);
                res.text().await.unwrap()
            }
        }))
        .await;
        let first = answers[0].clone();
        assert!(first.starts_with("tether-conn-"), "answered on {first}");
        assert!(
            answers.iter().all(|a| *a == first),
            "one connection, several threads: {answers:?}"
        );
        seen.push(first);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        threads,
        "{threads} connections should use {threads} threads"
    );
    server.shutdown().await;
}
