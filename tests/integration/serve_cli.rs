//! `tether serve` and `tether demo` as a user runs them.

use crate::common::{data, store_in, tether};
use crate::tls::{client, client_config};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_then_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("demo/shop-events.jsonl");
    tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    let pki = dir.path().join("pki");
    tether(&["certs", "init", "--out", pki.to_str().unwrap(), "--san", "localhost"]).expect_code(0);
    let config = dir.path().join("policy.yaml");
    std::fs::write(
        &config,
        "onMissing: runtime-default\nnamespaces:\n  shop:\n    labels: {tether.dev/mode: enforce}\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "serve",
            "--store",
            &store,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(pki.join("tls.crt"))
        .arg("--tls-key")
        .arg(pki.join("tls.key"))
        .arg("--config")
        .arg(&config)
        .env("TETHER_LOG_FORMAT", "json")
        .env("TETHER_LOG_LEVEL", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "serve exited before listening"
        );
        if let Some(rest) = line.split("admission on https://").nth(1) {
            let addr = rest.split(',').next().unwrap();
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
    };
    // Keep draining stderr (the JSON log lines) on a thread.
    let logs = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());

    let ca = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let c = client(client_config(&ca, None), true);
    let review: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data(
            "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let resp = c
        .post(format!("https://localhost:{port}/mutate"))
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"]["patch"].is_string(), "the patch is base64: {body}");

    let start = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let logs = logs.join().unwrap();
    // One structured line per admission, with uid, namespace, workload, mode, decision, duration.
    let admission = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "admission")
        .unwrap_or_else(|| panic!("no admission log line in {logs:?}"));
    let f = &admission["fields"];
    assert_eq!(f["uid"], review["request"]["uid"]);
    assert_eq!(f["namespace"], "shop");
    assert_eq!(f["workload"], "shop/deployment/checkout");
    assert_eq!(f["mode"], "enforce");
    assert_eq!(f["decision"], "patched");
    assert!(f["duration_us"].is_u64());
}

#[test]
fn demo_runs_the_whole_path_and_exits_0() {
    let run = tether(&["demo"]).expect_code(0);
    for want in [
        "webhook listening on https://localhost:",
        "[HTTP/2.0, HTTP 200 OK]",
        "tether/shop/deployment/checkout/migrate-",
        "\"type\": \"Unconfined\"",
        "tether/payments/deployment/checkout/app-",
        "tether dry-run: would set container app",
        "audit exempted: incident 4411",
        "does not allow seccomp exemptions",
        "tether_admission_requests_total",
    ] {
        assert!(
            run.stdout.contains(want),
            "{want} missing from the demo output:\n{}",
            run.stdout
        );
    }
}
