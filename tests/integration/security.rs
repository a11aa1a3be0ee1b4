//! Security of admission and of every name that reaches a file path: exemption
//! attempts that must be refused by /validate in enforce mode and not honored
//! by /mutate, Localhost paths aimed at other workloads or out of `tether/`,
//! path traversal through workload keys (pods, Tetragon events, the CLI, the
//! node installer), and the TLS port (no plaintext, no TLS 1.0/1.1).

use crate::certs_rotation::s_client;
use crate::common::{data, store_in, tether};
use crate::hostile::{CHECKOUT, Server, assert_no_panics, patch_of, review, serve};
use profile_store::key::WorkloadKey;
use profile_store::store::parse_localhost_profile;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `shop` does not allow exemptions; `open` does (the controls).
const POLICY: &str = "namespaces: {open: {labels: {tether.dev/allow-exemptions: \"true\"}}}";

/// The checkout review in `namespace`, edited.
fn pod(namespace: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut r = review(CHECKOUT);
    r["request"]["namespace"] = json!(namespace);
    r["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    edit(&mut r["request"]["object"]);
    r
}

async fn answer(s: &Server, endpoint: &str, r: &Value) -> Value {
    let (status, text) = s.post(endpoint, serde_json::to_vec(r).unwrap()).await;
    assert_eq!(status, 200, "{endpoint}: {text}");
    serde_json::from_str::<Value>(&text).unwrap()["response"].clone()
}

fn annotate(o: &mut Value, pairs: Value) {
    o["metadata"]["annotations"] = pairs;
}

fn set_profile(o: &mut Value, container: usize, profile: Value) {
    o["spec"]["containers"][container]["securityContext"] = json!({"seccompProfile": profile});
}

/// The active version of checkout's `app` container, as /mutate injects it.
async fn app_profile(s: &Server) -> String {
    let res = answer(s, "/mutate", &review(CHECKOUT)).await;
    let patch = patch_of(&res);
    patch
        .as_array()
        .unwrap()
        .iter()
        .find_map(|op| {
            op["value"]["seccompProfile"]["localhostProfile"]
                .as_str()
                .filter(|p| p.contains("/app-"))
                .map(str::to_string)
        })
        .unwrap()
}

/// Every exemption attempt of issue #8, in enforce mode: /validate denies with a
/// message saying how to get authorized, /mutate does not honor it (no
/// `tether.dev/exempted`, the profile still injected where one applies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemption_attempts_are_refused_by_validate_and_not_honored_by_mutate() {
    let s = serve(POLICY).await;
    let app = app_profile(&s).await;
    let unconfined = json!({"type": "Unconfined"});
    let other_workload = app.replace("/checkout/", "/cart/");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "exempt annotation in a namespace without the label",
            pod("shop", |o| annotate(o, json!({"tether.dev/exempt": "debugging"}))),
            "kubectl label namespace shop tether.dev/allow-exemptions=true",
        ),
        (
            "exempt-containers in a namespace without the label",
            pod("shop", |o| annotate(o, json!({"tether.dev/exempt-containers": "app"}))),
            "kubectl label namespace shop tether.dev/allow-exemptions=true",
        ),
        (
            "the allow-exemptions label on the pod itself",
            pod("shop", |o| {
                o["metadata"]["labels"]["tether.dev/allow-exemptions"] = json!("true");
                annotate(o, json!({"tether.dev/exempt": "mine"}));
            }),
            "kubectl label namespace shop tether.dev/allow-exemptions=true",
        ),
        (
            "the allow-exemptions label as a pod annotation",
            pod("shop", |o| {
                annotate(
                    o,
                    json!({"tether.dev/allow-exemptions": "true", "tether.dev/exempt": "mine"}),
                )
            }),
            "kubectl label namespace shop tether.dev/allow-exemptions=true",
        ),
        (
            "tether.dev/mode=off as a pod label, running Unconfined",
            pod("shop", |o| {
                o["metadata"]["labels"]["tether.dev/mode"] = json!("off");
                set_profile(o, 0, unconfined.clone());
            }),
            "ask for an exemption (tether.dev/exempt)",
        ),
        (
            "exempt-containers naming an init container",
            pod("open", |o| {
                annotate(o, json!({"tether.dev/exempt-containers": "migrate"}))
            }),
            "init containers cannot be exempted one by one; exempt the pod with tether.dev/exempt",
        ),
        (
            "exempt-containers naming a container the pod does not have",
            pod("open", |o| {
                annotate(o, json!({"tether.dev/exempt-containers": "app,ghost"}))
            }),
            "not a regular container of this pod",
        ),
        (
            "a fallback annotation written by the user, running Unconfined",
            pod("shop", |o| {
                annotate(o, json!({"tether.dev/fallback": "exit_code_159"}));
                set_profile(o, 0, unconfined.clone());
            }),
            "without an honored exemption or a fallback",
        ),
        (
            "tether's own exempted annotation written by the user, running Unconfined",
            pod("shop", |o| {
                annotate(
                    o,
                    json!({"tether.dev/exempted": "approved", "tether.dev/profile.app": "none"}),
                );
                set_profile(o, 0, unconfined.clone());
            }),
            "without an honored exemption or a fallback",
        ),
        (
            "Unconfined at pod level",
            pod("shop", |o| {
                o["spec"]["securityContext"] = json!({"seccompProfile": unconfined.clone()})
            }),
            "without an honored exemption or a fallback",
        ),
        (
            "envoy using app's profile (another container's)",
            pod("shop", |o| {
                set_profile(o, 1, json!({"type": "Localhost", "localhostProfile": app.clone()}))
            }),
            "belongs to workload shop/deployment/checkout/app, not to this container",
        ),
        (
            "app using another workload's profile",
            pod("shop", |o| {
                set_profile(
                    o,
                    0,
                    json!({"type": "Localhost", "localhostProfile": other_workload.clone()}),
                )
            }),
            "belongs to workload shop/deployment/cart/app",
        ),
        (
            "another workload's profile at pod level",
            pod(
                "shop",
                |o| {
                    o["spec"]["securityContext"] =
                        json!({"seccompProfile": {"type": "Localhost", "localhostProfile": other_workload.clone()}})
                },
            ),
            "belongs to workload shop/deployment/cart/app",
        ),
        (
            "envoy reaching app's profile through ./",
            pod("shop", |o| {
                set_profile(
                    o,
                    1,
                    json!({"type": "Localhost", "localhostProfile": format!("./{app}")}),
                )
            }),
            "tether's profiles are referenced only as tether sets them",
        ),
        (
            "envoy reaching app's profile through a double slash",
            pod("shop", |o| {
                set_profile(
                    o,
                    1,
                    json!({"type": "Localhost", "localhostProfile": app.replacen('/', "//", 1)}),
                )
            }),
            "tether's profiles are referenced only as tether sets them",
        ),
        (
            "a path climbing out of tether/",
            pod("shop", |o| {
                set_profile(
                    o,
                    0,
                    json!({"type": "Localhost", "localhostProfile": "tether/../../../etc/shadow.json"}),
                )
            }),
            "climbs with `..`",
        ),
        (
            "a path climbing into tether/",
            pod("shop", |o| {
                set_profile(
                    o,
                    1,
                    json!({"type": "Localhost", "localhostProfile": format!("profiles/../{app}")}),
                )
            }),
            "climbs with `..`",
        ),
        (
            "an absolute path",
            pod("shop", |o| {
                set_profile(
                    o,
                    1,
                    json!({"type": "Localhost", "localhostProfile": format!("/var/lib/kubelet/seccomp/{app}")}),
                )
            }),
            "is absolute",
        ),
        (
            "a NUL in the path",
            pod("shop", |o| {
                set_profile(
                    o,
                    0,
                    json!({"type": "Localhost", "localhostProfile": format!("{app}\u{0}.json")}),
                )
            }),
            "is absolute or climbs",
        ),
        (
            "a version tether does not know",
            pod("shop", |o| {
                set_profile(
                    o,
                    0,
                    json!({"type": "Localhost", "localhostProfile": "tether/shop/deployment/checkout/app-000000000000.json"}),
                )
            }),
            "`tether profiles list` shows the versions",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, r, how) in &cases {
        let v = answer(&s, "/validate", r).await;
        let message = v["status"]["message"].as_str().unwrap_or_default().to_string();
        if v["allowed"] != false || !message.contains(how) {
            wrong.push(format!(
                "{what}: /validate allowed={} message={message:?}",
                v["allowed"]
            ));
        }
        let m = answer(&s, "/mutate", r).await;
        let patch = patch_of(&m).to_string();
        if patch.contains("tether.dev~1exempted") {
            wrong.push(format!("{what}: /mutate honored it: {patch}"));
        }
        // Where app has no explicit profile, mutate still injects its own.
        let explicit = r["request"]["object"]["spec"]["containers"][0]["securityContext"].is_object();
        if !explicit && r["request"]["namespace"] == "shop" && !patch.contains(&app) {
            wrong.push(format!("{what}: /mutate did not inject app's profile: {patch}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    // The controls: in `open`, the same annotations are honored, so the refusals
    // above are the namespace's and the rules', not a blanket denial.
    let honored = pod("open", |o| {
        annotate(o, json!({"tether.dev/exempt": "debugging"}));
        set_profile(o, 0, json!({"type": "Unconfined"}));
    });
    assert_eq!(answer(&s, "/validate", &honored).await["allowed"], true);
    assert!(
        patch_of(&answer(&s, "/mutate", &honored).await)
            .to_string()
            .contains("tether.dev~1exempted")
    );
    let listed = pod("open", |o| annotate(o, json!({"tether.dev/exempt-containers": "app"})));
    assert_eq!(answer(&s, "/validate", &listed).await["allowed"], true);
    // A Localhost profile of the user's own outside tether/ stays allowed.
    let own = pod("shop", |o| {
        set_profile(
            o,
            0,
            json!({"type": "Localhost", "localhostProfile": "profiles/audit.json"}),
        )
    });
    assert_eq!(answer(&s, "/validate", &own).await["allowed"], true);
    let ok = pod("shop", |o| {
        set_profile(o, 0, json!({"type": "Localhost", "localhostProfile": app.clone()}))
    });
    assert_eq!(answer(&s, "/validate", &ok).await["allowed"], true);
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}

/// Names that must never become a path component.
fn hostile_names() -> Vec<String> {
    vec![
        "..".into(),
        ".".into(),
        "a/b".into(),
        "/etc".into(),
        "../etc".into(),
        "a\0b".into(),
        "a..b".into(),
        "".into(),
        "x".repeat(64),
        "UPPER".into(),
        "a\\b".into(),
        "~root".into(),
    ]
}

/// Every component of a workload key refuses traversal, separators, NUL and
/// overlong values, whether built from parts or parsed from `ns/kind/name/c`.
#[test]
fn workload_key_components_refuse_traversal_and_overlong_names() {
    for bad in hostile_names() {
        for (i, parts) in [
            [bad.as_str(), "deployment", "checkout", "app"],
            ["shop", bad.as_str(), "checkout", "app"],
            ["shop", "deployment", bad.as_str(), "app"],
            ["shop", "deployment", "checkout", bad.as_str()],
        ]
        .iter()
        .enumerate()
        {
            // Two are legal in one place: `UPPER` as a kind (lower-cased), 64
            // characters as a name (a DNS-1123 subdomain may be 253 long).
            if (i == 1 && bad == "UPPER") || (i == 2 && bad.len() == 64) {
                continue;
            }
            assert!(
                WorkloadKey::new(parts[0], parts[1], parts[2], parts[3]).is_err(),
                "{parts:?}"
            );
            assert!(parts.join("/").parse::<WorkloadKey>().is_err(), "{parts:?}");
        }
    }
    assert!(WorkloadKey::new("shop", "deployment", &"n".repeat(254), "app").is_err());
    assert!(WorkloadKey::new("shop", "deployment", "checkout", "app").is_ok());
}

/// `parse_localhost_profile` (admission, the installer) accepts only the exact
/// shape tether writes.
#[test]
fn localhost_profile_parsing_refuses_traversal() {
    let good = "tether/shop/deployment/checkout/app-0123456789ab.json";
    assert!(parse_localhost_profile(good).is_some());
    for bad in [
        "tether/../etc/deployment/checkout/app-0123456789ab.json",
        "tether/shop/../../checkout/app-0123456789ab.json",
        "tether/shop/deployment/checkout/../app-0123456789ab.json",
        "/tether/shop/deployment/checkout/app-0123456789ab.json",
        "./tether/shop/deployment/checkout/app-0123456789ab.json",
        "tether//shop/deployment/checkout/app-0123456789ab.json",
        "tether/shop/deployment/checkout/app-0123456789ab.json/..",
        "tether/shop/deployment/check\0out/app-0123456789ab.json",
        "tether/shop/deployment/checkout/sub/app-0123456789ab.json",
        "tether/shop/Deployment/checkout/app-0123456789ab.json",
        "tether/shop/deployment/checkout/app-../../x.json",
        "tether/shop/deployment/checkout/..-0123456789ab.json",
    ] {
        assert!(parse_localhost_profile(bad).is_none(), "{bad:?}");
    }
    let long = format!("tether/shop/deployment/{}/app-0123456789ab.json", "n".repeat(300));
    assert!(parse_localhost_profile(&long).is_none());
}

/// The node installer maps only canonical tether paths to files under its
/// seccomp directory.
#[test]
fn the_installer_refuses_paths_that_leave_its_directory() {
    let root = tempfile::tempdir().unwrap();
    let node = installer::node::NodeDir::new(root.path());
    let good = "tether/shop/deployment/checkout/app-0123456789ab.json";
    let (path, _) = node.path_of(good).unwrap();
    assert!(path.starts_with(root.path().join("seccomp/tether")), "{path:?}");
    for bad in [
        "../../etc/shadow",
        "/etc/shadow",
        "tether/../../etc/deployment/x/app-0123456789ab.json",
        "./tether/shop/deployment/checkout/app-0123456789ab.json",
        "tether//shop/deployment/checkout/app-0123456789ab.json",
        "tether/shop/deployment/checkout/app-0123456789ab.json\0",
    ] {
        assert!(node.path_of(bad).is_err(), "{bad:?}");
    }
}

/// `tether profiles ... KEY` refuses hostile keys before touching the store.
#[test]
fn profiles_commands_refuse_hostile_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("demo/shop-events.jsonl");
    tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    std::fs::write(dir.path().join("secret.json"), b"{}").unwrap();
    let before = tree(dir.path());
    for key in [
        "../../secret/x/y",
        "shop/deployment/../../../secret",
        "shop/deployment/checkout/../app",
        "/etc/deployment/checkout/app",
        "shop/deployment/checkout/app/extra",
        "shop/deployment/checkout",
        "shop/deployment/checkout/a\u{1}pp",
        &format!("shop/deployment/checkout/{}", "a".repeat(64)),
    ] {
        for args in [
            vec!["profiles", "show", key, "--store", &store],
            vec!["profiles", "fallback", "set", key, "--store", &store],
            vec!["profiles", "activate", key, "0123456789ab", "--store", &store],
            vec!["profiles", "approve", key, "ptrace", "--store", &store],
        ] {
            let run = tether(&args);
            assert_ne!(run.code, 0, "{args:?} succeeded:\n{}", run.stdout);
            assert!(
                run.stderr.contains("namespace/kind/name/container")
                    || run.stderr.contains(key)
                    || run.stderr.contains("invalid value"),
                "{args:?}: {}",
                run.stderr
            );
        }
    }
    assert_eq!(tree(dir.path()), before, "a refused command changed files");
}

/// Every file and directory under `dir`, relative.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Tetragon events whose pod namespace, workload or container name would climb
/// out of the store: nothing is written outside it, and no such key is stored.
#[test]
fn tetragon_events_with_hostile_names_write_nothing_outside_the_store() {
    let events = std::fs::read_to_string(data("demo/shop-events.jsonl")).unwrap();
    for (from, to) in [
        ("\"namespace\":\"shop\"", "\"namespace\":\"../../escape\""),
        ("\"workload\":\"checkout\"", "\"workload\":\"../../../escape\""),
        ("\"name\":\"app\"", "\"name\":\"../../escape\""),
        ("\"namespace\":\"shop\"", "\"namespace\":\"/tmp/escape\""),
    ] {
        assert!(events.contains(from), "{from}");
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let file = dir.path().join("events.jsonl");
        std::fs::write(&file, events.replace(from, to)).unwrap();
        let run = tether(&["build", "--from", file.to_str().unwrap(), "--store", &store]);
        let files = tree(dir.path());
        assert!(
            files
                .iter()
                .all(|f| f == "events.jsonl" || f == "store" || f.starts_with("store/")),
            "{to}: {files:?}"
        );
        assert!(
            !files.iter().any(|f| f.contains("escape")),
            "{to}: {files:?}\n{}",
            run.stderr
        );
        assert!(!std::path::Path::new("/tmp/escape").exists());
    }
}

/// Plaintext HTTP to the TLS port gets no HTTP answer, and TLS 1.0 and 1.1
/// are refused by the running webhook itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_port_speaks_no_plaintext_and_no_old_tls() {
    let s = serve("{}").await;
    for request in [
        &b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n"[..],
        &b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-length: 2\r\n\r\n{}"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(s.running.addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the connection stayed open");
        assert!(
            !String::from_utf8_lossy(&got).contains("HTTP/"),
            "plaintext answered: {got:?}"
        );
        // Whatever came back is a TLS record (an alert) or nothing.
        assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
    }
    let port = s.running.addr.port();
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1", "-tls1_1", "-tls1_2"]
            .iter()
            .map(|v| (*v, s_client(port, &[v, "-cipher", "DEFAULT@SECLEVEL=0"])))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (version, (ok, text)) in results {
        if version == "-tls1_2" {
            // The control: the same command with TLS 1.2 connects.
            assert!(ok, "TLS 1.2 failed:\n{text}");
            assert!(text.contains("TLSv1.2"), "{text}");
        } else {
            assert!(!ok, "{version} was accepted:\n{text}");
            assert!(
                text.contains("alert handshake failure") || text.contains("alert protocol version"),
                "{version} not refused by the server:\n{text}"
            );
        }
    }
    s.still_answers("plaintext and old TLS").await;
    assert_no_panics(&s).await;
    s.running.shutdown().await;
}
