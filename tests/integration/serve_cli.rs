//! `tether serve` and `tether demo` as a user runs them.

use crate::common::{data, store_in, tether};
use crate::tls::{client, client_config};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

/// A `tether serve` on a store built from the demo events, with JSON logs at
/// info on a piped stderr; killed when dropped (a failing test leaves no server
/// behind holding the test's output pipes).
struct Serve {
    child: Child,
    /// The rest of stderr, after the line that gave the port.
    stderr: Option<BufReader<ChildStderr>>,
    port: u16,
    ca: String,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start() -> Serve {
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
        let mut serve = Serve {
            child,
            stderr: None,
            port: 0,
            ca: std::fs::read_to_string(pki.join("ca.crt")).unwrap(),
            _dir: dir,
        };
        let mut line = String::new();
        serve.port = loop {
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
        serve.stderr = Some(stderr);
        serve
    }

    /// Sends the Deployment pod review to `/mutate` over HTTP/2 and returns it;
    /// the answer must be allowed with a (base64) patch.
    async fn mutate(&self) -> serde_json::Value {
        let c = client(client_config(&self.ca, None), true);
        let review: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(data(
                "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json",
            ))
            .unwrap(),
        )
        .unwrap();
        let resp = c
            .post(format!("https://localhost:{}/mutate", self.port))
            .json(&review)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"]["patch"].is_string(), "the patch is base64: {body}");
        review
    }

    /// Sends SIGTERM and asserts a clean exit within 10 s.
    fn terminate(&mut self) {
        let start = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "serve did not exit within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{exit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_then_exits_cleanly_on_sigterm() {
    let mut serve = Serve::start();
    // Keep draining stderr (the JSON log lines) on a thread, passing each on.
    let stderr = serve.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            if lines_tx.send(l).is_err() {
                break;
            }
        }
    });
    let review = serve.mutate().await;

    // One structured line per admission, with uid, namespace, workload, mode,
    // decision, duration; written while serve runs (connection threads batch
    // their lines, and write them as soon as they are idle), not at exit.
    let mut seen = Vec::new();
    let admission = loop {
        match lines.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l)
                    && v["fields"]["message"] == "admission"
                {
                    break v;
                }
                seen.push(l);
            }
            Err(e) => panic!("no admission log line within 5 s of the answer ({e}); got {seen:?}"),
        }
    };
    let f = &admission["fields"];
    assert_eq!(f["uid"], review["request"]["uid"]);
    assert_eq!(f["namespace"], "shop");
    assert_eq!(f["workload"], "shop/deployment/checkout");
    assert_eq!(f["mode"], "enforce");
    assert_eq!(f["decision"], "patched");
    assert!(f["duration_us"].is_u64());
    serve.terminate();
}

/// Regression: when the reader of tether's stderr went away (a container's log
/// pipe closed), tracing-subscriber reported the failed write with `eprintln!`,
/// which panics without a stderr. Every admission was answered 500 (its handler
/// panicked at the log line) and SIGTERM was ignored (the task that waits for it
/// panicked at its own log line), so the pod hung until SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_answering_and_stops_on_sigterm_when_its_log_pipe_is_closed() {
    let mut serve = Serve::start();
    drop(serve.stderr.take());
    for _ in 0..3 {
        serve.mutate().await;
    }
    serve.terminate();
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
