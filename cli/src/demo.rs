//! `tether demo`: the whole path on one machine, from bundled data. Builds profiles
//! from sample Tetragon events into a temporary store, creates a development CA and
//! serving certificate, starts the webhook on 127.0.0.1, and sends real
//! AdmissionReviews over HTTPS with an HTTP/2 client that trusts only that CA.

use anyhow::{Context, Result, bail};
use profile_store::ingest::Ingest;
use profile_store::store::render_version;
use profile_store::{Arch, FsStore, IngestOptions, ProfileStore, RuntimeBase};
use serde_json::{Value, json};
use std::io::BufReader;
use std::time::Duration;
use webhook::policy::Policy;
use webhook::run::{ServeOptions, start};

const DOCS_EVENTS: &str = include_str!("../../tests/data/tetragon/docs-events.jsonl");
const SHOP_EVENTS: &str = include_str!("../../tests/data/demo/shop-events.jsonl");
const CHECKOUT: &str =
    include_str!("../../tests/data/admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
const EXEMPT: &str =
    include_str!("../../tests/data/admission/apiserver-1.35/pod-create-bare-exemption-annotation.json");
const DRY_RUN: &str = include_str!("../../tests/data/admission/apiserver-1.35/pod-create-bare-dryrun.json");

/// The demo's namespaces: shop enforces and allows exemptions, staging is dry-run,
/// payments enforces and allows none.
const POLICY: &str = r#"
defaultMode: enforce
onMissing: skip
namespaces:
  shop: {labels: {tether.dev/allow-exemptions: "true"}}
  staging: {labels: {tether.dev/mode: dry-run}}
  payments: {labels: {pod-security.kubernetes.io/enforce: restricted}}
"#;

fn build_store(dir: &std::path::Path) -> Result<FsStore> {
    let mut ingest = Ingest::new(IngestOptions::default());
    ingest.read_tetragon("docs-events.jsonl", &mut BufReader::new(DOCS_EVENTS.as_bytes()))?;
    ingest.read_tetragon("shop-events.jsonl", &mut BufReader::new(SHOP_EVENTS.as_bytes()))?;
    let (mut baselines, _) = ingest.finish();
    // The same shop workloads also run in the demo's other namespaces.
    let copies: Vec<profile_store::Baseline> = baselines
        .iter()
        .filter(|b| b.key.namespace() == "shop")
        .flat_map(|b| {
            ["staging", "payments"].into_iter().filter_map(move |ns| {
                let k = &b.key;
                let key = profile_store::WorkloadKey::new(ns, k.kind(), k.name(), k.container()).ok()?;
                Some(profile_store::Baseline { key, ..b.clone() })
            })
        })
        .collect();
    baselines.extend(copies);
    let store = FsStore::open_or_create(dir)?;
    let runtime = RuntimeBase::select("runc")?;
    let now = jiff::Timestamp::now();
    let mut built = 0;
    for b in baselines.iter().filter(|b| !b.syscalls.is_empty()) {
        store.update(&b.key, &mut |record| {
            record.baseline.merge(b);
            render_version(&store, record, &runtime, "runc", Arch::X86_64, now).map(|_| ())
        })?;
        built += 1;
    }
    println!(
        "built {built} profiles from the bundled Tetragon events into {}",
        dir.display()
    );
    Ok(store)
}

/// A real capture with its namespace moved, to show one pod under another policy.
fn in_namespace(review: &str, namespace: &str, uid: &str) -> Result<Value> {
    let mut v: Value = serde_json::from_str(review)?;
    v["request"]["namespace"] = json!(namespace);
    v["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    v["request"]["uid"] = json!(uid);
    Ok(v)
}

fn decode_patch(res: &Value) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(res["patch"].as_str()?)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(crate) fn run() -> Result<()> {
    let work = tempfile::Builder::new().prefix("tether-demo-").tempdir()?;
    let store_dir = work.path().join("store");
    let store = build_store(&store_dir)?;
    let pki = certs::generate::for_service("tether-webhook", "tether-system", &["localhost".into()], 1)?;
    let pki_dir = work.path().join("pki");
    pki.write(&pki_dir, false)?;
    println!(
        "created a development CA and serving certificate in {}",
        pki_dir.display()
    );

    // The checkout app has crashed with SIGSYS: put it in fallback.
    for ns in ["shop", "payments"] {
        let app_key = format!("{ns}/deployment/checkout/app").parse()?;
        store.update(&app_key, &mut |r| {
            r.state.fallback = Some(profile_store::store::Fallback {
                reason: "demo: exit 159 (SIGSYS) in checkout-6c9d7b8f4d-q7x2z".into(),
                since: jiff::Timestamp::now(),
            });
            Ok(())
        })?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let running = start(ServeOptions {
            store: store_dir.clone().into(),
            tls_cert: pki_dir.join("tls.crt"),
            tls_key: pki_dir.join("tls.key"),
            client_ca: None,
            listen: "127.0.0.1:0".parse()?,
            metrics_listen: "127.0.0.1:0".parse()?,
            policy: Policy::from_yaml(POLICY).map_err(anyhow::Error::msg)?,
            request_timeout: Duration::from_secs(4),
            drain: Duration::from_secs(5),
            cert_poll: Duration::from_secs(10),
            store_poll: Duration::from_secs(10),
            decision_cache_entries: webhook::cache::DEFAULT_ENTRIES,
        })
        .await?;
        let base = format!("https://localhost:{}", running.addr.port());
        println!("webhook listening on {base} (policy: shop allows exemptions, staging is dry-run, payments is PSA restricted)\n");
        let client = https_client(&pki.ca_cert)?;

        let cases: Vec<(&str, &str, Value)> = vec![
            ("mutate", "Deployment pod with an init container; app is in fallback (crashed with SIGSYS)", serde_json::from_str(CHECKOUT)?),
            ("mutate", "the same pod in payments, where Pod Security forbids Unconfined: the Log-mode variant", in_namespace(CHECKOUT, "payments", "demo-payments")?),
            ("mutate", "the same pod in the dry-run namespace staging", in_namespace(CHECKOUT, "staging", "demo-staging")?),
            ("mutate", "a bare pod with tether.dev/exempt in shop, which allows exemptions", serde_json::from_str(EXEMPT)?),
            ("validate", "the same exemption in payments, which does not allow them", in_namespace(EXEMPT, "payments", "demo-exempt-refused")?),
            ("mutate", "kubectl run --dry-run=server (request.dryRun: true)", serde_json::from_str(DRY_RUN)?),
        ];
        let mut failures = 0;
        for (endpoint, what, review) in cases {
            let resp = client
                .post(format!("{base}/{endpoint}"))
                .json(&review)
                .send()
                .await
                .with_context(|| format!("POST /{endpoint}"))?;
            let version = resp.version();
            let status = resp.status();
            let body: Value = resp.json().await?;
            let res = &body["response"];
            println!("== /{endpoint}: {what}  [{version:?}, HTTP {status}]");
            println!("   allowed: {}", res["allowed"]);
            if let Some(m) = res["status"]["message"].as_str().filter(|m| !m.is_empty()) {
                println!("   message: {m}");
            }
            for w in res["warnings"].as_array().into_iter().flatten() {
                println!("   warning: {}", w.as_str().unwrap_or_default());
            }
            if let Some(a) = res["auditAnnotations"].as_object() {
                for (k, v) in a {
                    println!("   audit {k}: {}", v.as_str().unwrap_or_default());
                }
            }
            match decode_patch(res) {
                Some(p) => println!("   patch: {}", serde_json::to_string_pretty(&p)?.replace('\n', "\n   ")),
                None => println!("   patch: none"),
            }
            println!();
            if !status.is_success() || res["uid"] != review["request"]["uid"] {
                failures += 1;
            }
        }
        let metrics = client
            .get(format!("http://{}/metrics", running.metrics_addr))
            .send()
            .await?
            .text()
            .await?;
        let requests: Vec<&str> = metrics.lines().filter(|l| l.starts_with("tether_admission_requests_total")).collect();
        println!("metrics (tether_admission_requests_total):\n   {}", requests.join("\n   "));
        running.shutdown().await;
        if failures > 0 {
            bail!("{failures} demo request(s) failed");
        }
        Ok(())
    })
}

fn https_client(ca_pem: &str) -> Result<reqwest::Client> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(certs::load::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .no_proxy()
        .build()?)
}
