//! Tests against a real cluster, run only when `TETHER_E2E_KUBECONFIG` names a
//! kubeconfig (no API server can be installed on the CI machines).

use crate::common::tether_env;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

async fn cluster() -> Option<(kube::Client, String)> {
    let Ok(path) = std::env::var("TETHER_E2E_KUBECONFIG") else {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("this test");
        eprintln!("TETHER_E2E_KUBECONFIG is not set: skipping the real-cluster test {test}");
        return None;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Some((kube::Client::try_from(config).unwrap(), path))
}

/// A webhook that can never match anything: a namespace selector no namespace has.
fn webhook(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "clientConfig": {"service": {"name": "tether-e2e-absent", "namespace": "default", "path": "/x"}},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "namespaceSelector": {"matchLabels": {"tether.dev/e2e-never": "true"}},
        "failurePolicy": "Ignore",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_ca_sets_the_bundle_on_a_real_cluster() {
    let Some((client, kubeconfig)) = cluster().await else {
        return;
    };
    let name = format!("tether-e2e-{}", std::process::id());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let m: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name}, "webhooks": [webhook("mutate.e2e.tether.dev")]
    }))
    .unwrap();
    let v: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name}, "webhooks": [webhook("validate.e2e.tether.dev"), webhook("validate2.e2e.tether.dev")]
    }))
    .unwrap();
    mutating.create(&PostParams::default(), &m).await.unwrap();
    validating.create(&PostParams::default(), &v).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let pki = certs::generate::for_service("tether-webhook", "tether-system", &[], 1).unwrap();
    pki.write(&out, false).unwrap();
    let ca = out.join("ca.crt");
    let run = tether_env(
        &["certs", "inject-ca", "--webhook", &name, "--ca", ca.to_str().unwrap()],
        &[("KUBECONFIG", &kubeconfig)],
    );

    let got_m = mutating.get(&name).await.unwrap();
    let got_v = validating.get(&name).await.unwrap();
    let _ = mutating.delete(&name, &DeleteParams::default()).await;
    let _ = validating.delete(&name, &DeleteParams::default()).await;
    let run = run.expect_code(0);
    assert!(run.stdout.contains("set caBundle"), "{}", run.stdout);
    let bundles: Vec<Vec<u8>> = got_m
        .webhooks
        .unwrap()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.unwrap().0)
        .chain(
            got_v
                .webhooks
                .unwrap()
                .into_iter()
                .map(|w| w.client_config.ca_bundle.unwrap().0),
        )
        .collect();
    assert_eq!(bundles.len(), 3);
    assert!(bundles.iter().all(|b| b == pki.ca_cert.as_bytes()));
}

/// Runs `tether ARGS` against the cluster of `kubeconfig`.
fn tether_kube(kubeconfig: &str, args: &[&str]) -> crate::common::Run {
    tether_env(args, &[("KUBECONFIG", kubeconfig)])
}

/// The docs samples of namespace `default`, moved into `namespace`, so a build
/// writes only there.
fn fixture_in(namespace: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(crate::common::data("tetragon/docs-events.jsonl")).unwrap();
    let moved: String = text
        .lines()
        .filter(|l| l.contains("\"namespace\":\"default\""))
        .map(|l| l.replace("\"namespace\":\"default\"", &format!("\"namespace\":\"{namespace}\"")) + "\n")
        .collect();
    let path = dir.join("events.jsonl");
    std::fs::write(&path, moved).unwrap();
    path
}

/// `tether build --store kube://` and the `profiles` commands against a real API
/// server, in a fresh namespace (CRDs installed first when absent, and removed
/// again only if this test installed them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_and_profiles_work_against_the_kube_store() {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::core::CustomResourceExt;
    use profile_store::crd::WorkloadProfile;

    let Some((client, kubeconfig)) = cluster().await else {
        return;
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = WorkloadProfile::crd();
    let crd_name = crd.metadata.name.clone().unwrap();
    let installed_here = crds.get_opt(&crd_name).await.unwrap().is_none();
    if installed_here {
        crds.create(&PostParams::default(), &crd).await.unwrap();
        // Served once Established.
        for _ in 0..60 {
            let got = crds.get(&crd_name).await.unwrap();
            let established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    let ns = format!("tether-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.unwrap();

    let profiles: Api<WorkloadProfile> = Api::namespaced(client.clone(), &ns);
    let runtime = tokio::runtime::Handle::current();
    let steps = {
        let ns = ns.clone();
        tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let events = fixture_in(&ns, dir.path());
            let key = format!("{ns}/pod/xwing/spaceship");
            let build = tether_kube(
                &kubeconfig,
                &["build", "--from", events.to_str().unwrap(), "--store", "kube://"],
            )
            .expect_code(0);
            assert!(build.stdout.contains(&key), "{}", build.stdout);

            let list = tether_kube(&kubeconfig, &["profiles", "list", "--store", "kube://", "--json"]).expect_code(0);
            let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
            let row = list
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["key"] == key.as_str())
                .cloned()
                .unwrap_or_else(|| panic!("{key} not listed: {list}"));
            assert_eq!(row["versions"], 1);
            let first = row["active"]["version"].as_str().unwrap().to_string();

            let show = tether_kube(&kubeconfig, &["profiles", "show", &key, "--store", "kube://"]).expect_code(0);
            let profile: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
            let allowed: Vec<&str> = profile["syscalls"][0]["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(
                allowed.contains(&"setuid") && !allowed.contains(&"setns"),
                "{allowed:?}"
            );

            // A second version (setns approved), then the first pinned again.
            tether_kube(
                &kubeconfig,
                &["profiles", "approve", &key, "setns", "--store", "kube://"],
            )
            .expect_code(0);
            tether_kube(
                &kubeconfig,
                &["profiles", "activate", &key, &first, "--store", "kube://"],
            )
            .expect_code(0);
            tether_kube(
                &kubeconfig,
                &[
                    "profiles", "fallback", "set", &key, "--reason", "e2e", "--store", "kube://",
                ],
            )
            .expect_code(0);
            let object = runtime.block_on(profiles.get("pod.xwing.spaceship")).unwrap();
            assert_eq!(object.spec.versions.len(), 2);
            assert_eq!(object.spec.active_version.as_deref(), Some(first.as_str()));
            assert_eq!(object.spec.approvals, ["setns"]);
            assert_eq!(
                object.status.and_then(|s| s.fallback).map(|f| f.reason).as_deref(),
                Some("e2e")
            );

            tether_kube(
                &kubeconfig,
                &["profiles", "fallback", "clear", &key, "--store", "kube://"],
            )
            .expect_code(0);
            let object = runtime.block_on(profiles.get("pod.xwing.spaceship")).unwrap();
            assert_eq!(object.status.and_then(|s| s.fallback), None);
            let show =
                tether_kube(&kubeconfig, &["profiles", "show", &key, "--store", "kube://", "--json"]).expect_code(0);
            let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
            assert_eq!(shown["version"]["version"], first.as_str());
        })
        .await
    };

    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if installed_here {
        let _ = crds.delete(&crd_name, &DeleteParams::default()).await;
    }
    // A failed step panicked on its thread: fail here, after the cleanup.
    if let Err(e) = steps {
        std::panic::resume_unwind(e.into_panic());
    }
}

// ---------------------------------------------------------------------------
// The admission webhook and the crash watcher against a real API server.
//
// `tether serve --store kube://` runs here, as a local process; the test
// registers webhook configurations that send the API server to it by
// `url: https://HOST:PORT/{mutate,validate}` with the test's own CA as
// caBundle. HOST is `TETHER_E2E_WEBHOOK_HOST` (an IP or a DNS name the API
// server can reach this machine by), by default this machine's address on the
// route to the API server. The certificate has HOST as SAN (an IP SAN for an
// IP). The configurations select only the test's namespaces (label
// `tether.dev/e2e: <run>`), with `failurePolicy: Fail` so a webhook the API
// server cannot reach fails the test instead of passing it silently.
//
// Pods never run: they name a scheduler that does not exist
// (`schedulerName`), so no node binds them, no image is pulled, and no kubelet
// ever writes their status: the test writes it itself (status subresource).
// For the same reason the webhook runs with `installGate: none`: no node will
// ever need the profile files, and gating on a ProfileInstallation made up for
// a node that does not exist would test made-up data (the gate has its own
// tests against a scripted API server, webhook/src/kube_index.rs).
// ---------------------------------------------------------------------------

/// The local webhook's policy: `off` outside the labelled namespaces (even if
/// a selector were wrong), no install gate (see above).
const E2E_POLICY: &str = "defaultMode: off\nonMissing: skip\ninstallGate: none\n";

/// `tether serve` as the suite runs it: the kube store, the crash watcher's
/// Lease in `system`, admission on all interfaces at `port` (the API server
/// calls it from outside), metrics and `/readyz` on `metrics`.
fn serve_command(
    kubeconfig: &str,
    system: &str,
    run: &str,
    pki: &std::path::Path,
    port: u16,
    metrics: std::net::SocketAddr,
    policy: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args([
        "serve",
        "--store",
        "kube://",
        "--installer-namespace",
        system,
        "--replica-name",
        &format!("e2e-{run}"),
        "--tls-cert",
        pki.join("tls.crt").to_str().unwrap(),
        "--tls-key",
        pki.join("tls.key").to_str().unwrap(),
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--metrics-listen",
        &metrics.to_string(),
        "--config",
        policy.to_str().unwrap(),
        "--poll-seconds",
        "1",
        "--log-level",
        "info",
    ]);
    // The suite's own settings (TETHER_E2E_*) and a developer's TETHER_* must
    // not steer the webhook.
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("KUBECONFIG", kubeconfig).stdin(std::process::Stdio::null());
    cmd
}

/// The webhook configurations `deploy/` ships, parsed from
/// deploy/base/webhook/, so a change there (a failurePolicy, the selector's
/// bypasses) is what the suite tests.
fn deployed_configurations() -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let read = |file: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/base/webhook")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let m = serde_saphyr::from_str(&read("mutatingwebhookconfiguration.yaml")).unwrap();
    let v = serde_saphyr::from_str(&read("validatingwebhookconfiguration.yaml")).unwrap();
    (m, v)
}

/// The suite's webhook configurations `name`: `deploy/`'s (failure policies,
/// timeouts, rules, and the namespace selector's bypasses), but calling the
/// local webhook at `base` (`https://HOST:PORT`) trusted through `ca_pem`, and
/// only for the namespaces labelled `tether.dev/e2e=<run>` as well.
fn webhook_configurations(
    name: &str,
    run: &str,
    base: &str,
    ca_pem: &str,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    use k8s_openapi::api::admissionregistration::v1::WebhookClientConfig;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    let ca_bundle = k8s_openapi::ByteString(ca_pem.as_bytes().to_vec());
    let client = |path: &str| WebhookClientConfig {
        url: Some(format!("{base}{path}")),
        ca_bundle: Some(ca_bundle.clone()),
        service: None,
    };
    let only_this_run = |selector: &mut Option<LabelSelector>| {
        let selector = selector.get_or_insert_with(Default::default);
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert("tether.dev/e2e".into(), run.into());
    };
    let (mut m, mut v) = deployed_configurations();
    m.metadata = kube::api::ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    v.metadata = m.metadata.clone();
    for hook in m.webhooks.iter_mut().flatten() {
        hook.name = hook.name.replace(".tether.dev", ".e2e.tether.dev");
        hook.client_config = client("/mutate");
        only_this_run(&mut hook.namespace_selector);
    }
    for hook in v.webhooks.iter_mut().flatten() {
        hook.name = hook.name.replace(".tether.dev", ".e2e.tether.dev");
        hook.client_config = client("/validate");
        only_this_run(&mut hook.namespace_selector);
    }
    (m, v)
}

/// Makes the mutating webhooks of `m` fail closed: a test that expects an
/// injection then gets an error, not a pod silently admitted without one.
fn fail_closed(mut m: MutatingWebhookConfiguration) -> MutatingWebhookConfiguration {
    for hook in m.webhooks.iter_mut().flatten() {
        hook.failure_policy = Some("Fail".into());
    }
    m
}

/// The client configuration of `kubeconfig` (its server decides the webhook's host).
async fn config_of(kubeconfig: &str) -> kube::Config {
    let k = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    kube::Config::from_custom_kubeconfig(k, &Default::default())
        .await
        .unwrap()
}

/// A name for this run's objects, so runs (and leftovers of failed ones) never
/// share one.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:08x}", nanos ^ std::process::id())
}

/// Creates the namespaces `(name, labels)`, each also labelled
/// `tether.dev/e2e=<run>` (what the suite's webhooks select), recorded for clean-up.
async fn create_namespaces<const N: usize>(
    client: &kube::Client,
    cleanup: &mut Cleanup,
    run: &str,
    namespaces: [(&String, serde_json::Value); N],
) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    for (name, mut labels) in namespaces {
        labels["tether.dev/e2e"] = json!(run);
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        cleanup.namespaces.push(name.clone());
        api.create(&PostParams::default(), &ns).await.unwrap();
    }
}

/// Stores the profiles of `events` with `tether build --store kube://` and
/// returns the active version of `key`, which the build must have written.
async fn build_probe_profiles(
    kubeconfig: &str,
    events: std::path::PathBuf,
    key: &profile_store::WorkloadKey,
) -> String {
    let kubeconfig = kubeconfig.to_string();
    let key = key.to_string();
    tokio::task::spawn_blocking(move || {
        let build = tether_kube(
            &kubeconfig,
            &["build", "--from", events.to_str().unwrap(), "--store", "kube://"],
        )
        .expect_code(0);
        assert!(build.stdout.contains(&key), "{}", build.stdout);
        let list = tether_kube(&kubeconfig, &["profiles", "list", "--store", "kube://", "--json"]).expect_code(0);
        let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key.as_str())
            .and_then(|r| r["active"]["version"].as_str())
            .unwrap_or_else(|| panic!("{key} has no active version: {list}"))
            .to_string()
    })
    .await
    .unwrap()
}

/// A local `tether serve` the API server calls at `https://HOST:PORT`: its
/// serving certificate (for HOST), policy and log live in the test's directory,
/// so it can be stopped and started again on the same port.
struct LocalWebhook {
    kubeconfig: String,
    system: String,
    run: String,
    host: String,
    port: u16,
    metrics: std::net::SocketAddr,
    ca_pem: String,
    pki_dir: std::path::PathBuf,
    policy: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl LocalWebhook {
    /// Picks the ports and writes the certificates and the policy under `dir`.
    fn new(config: &kube::Config, kubeconfig: &str, system: &str, run: &str, dir: &std::path::Path) -> LocalWebhook {
        let host = webhook_host(config);
        let pki = certs::generate::for_service("tether-e2e", system, std::slice::from_ref(&host), 1).unwrap();
        let pki_dir = dir.join("pki");
        pki.write(&pki_dir, false).unwrap();
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, E2E_POLICY).unwrap();
        LocalWebhook {
            kubeconfig: kubeconfig.to_string(),
            system: system.to_string(),
            run: run.to_string(),
            host,
            port: free_port(),
            metrics: ([127, 0, 0, 1], free_port()).into(),
            ca_pem: pki.ca_cert,
            pki_dir,
            policy,
            log: dir.join("serve.log"),
        }
    }

    /// Starts `tether serve` (appending to its log), hands the process to
    /// `cleanup`, and waits until `/readyz` answers 200; fails at once, with the
    /// log, if it exits first (a port taken, a bad flag).
    async fn start(&self, cleanup: &mut Cleanup) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        cleanup.serve_log = Some(self.log.clone());
        let mut serve = serve_command(
            &self.kubeconfig,
            &self.system,
            &self.run,
            &self.pki_dir,
            self.port,
            self.metrics,
            &self.policy,
        );
        cleanup.serve = Some(
            serve
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap(),
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while !ready(self.metrics).await {
            if let Some(Ok(Some(status))) = cleanup.serve.as_mut().map(std::process::Child::try_wait) {
                panic!("tether serve exited ({status}) before it was ready");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tether serve not ready on {} after 60s",
                self.metrics
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// The name of this run's webhook configurations, `tether-e2e-<run>`.
    fn configuration_name(&self) -> String {
        format!("tether-e2e-{}", self.run)
    }

    /// The suite's webhook configurations calling this webhook.
    fn configurations(&self) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
        webhook_configurations(
            &self.configuration_name(),
            &self.run,
            &base_url(&self.host, self.port),
            &self.ca_pem,
        )
    }

    /// Creates `m` and `v` in the cluster, recorded for clean-up first.
    async fn register(
        &self,
        client: &kube::Client,
        cleanup: &mut Cleanup,
        m: &MutatingWebhookConfiguration,
        v: &ValidatingWebhookConfiguration,
    ) {
        cleanup.webhook_configurations.push(self.configuration_name());
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), m)
            .await
            .unwrap();
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), v)
            .await
            .unwrap();
    }
}

/// Waits until a dry-run create of the probe pod in `pods`' namespace comes
/// back with its profile: the API server has picked up the webhook
/// configurations and the webhook has indexed the stored profiles. A dry run
/// has no side effects (the webhooks declare none), so polling leaves nothing.
async fn injected_on_dry_run(pods: &Api<k8s_openapi::api::core::v1::Pod>) {
    let profile_annotation = format!("tether.dev/profile.{PROBE}");
    eventually(
        "the API server calling the webhook, and the profile indexed",
        60,
        || {
            let pods = pods.clone();
            let profile_annotation = profile_annotation.clone();
            async move {
                let dry_create = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                let pod = pods
                    .create(&dry_create, &probe_pod(json!({})))
                    .await
                    .map_err(|e| e.to_string())?;
                annotation(&pod, &profile_annotation)
                    .ok_or_else(|| format!("admitted without a profile: {:?}", tether_annotations(&pod)))
            }
        },
    )
    .await;
}

/// The container of the fixture's bare pod `dry-probe`: key
/// `<ns>/pod/dry-probe/dry-probe` for pods created with generateName `dry-probe-`.
const PROBE: &str = "dry-probe";

/// Everything a run created, deleted on drop, so a failed assertion (a panic)
/// still cleans up: webhook configurations first (nothing may call a webhook
/// that is going away), then the local webhook process, the namespaces (with
/// the WorkloadProfiles, pods, Events and the crash watcher's Lease in them), and
/// the CRDs only if this run installed them.
struct Cleanup {
    kubeconfig: String,
    webhook_configurations: Vec<String>,
    namespaces: Vec<String>,
    crds: Vec<String>,
    serve: Option<std::process::Child>,
    serve_log: Option<std::path::PathBuf>,
}

impl Cleanup {
    fn new(kubeconfig: &str) -> Cleanup {
        Cleanup {
            kubeconfig: kubeconfig.to_string(),
            webhook_configurations: Vec::new(),
            namespaces: Vec::new(),
            crds: Vec::new(),
            serve: None,
            serve_log: None,
        }
    }
}

impl Cleanup {
    /// Kills the local webhook and waits for it: tether is down.
    fn stop_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        use k8s_openapi::api::core::v1::Namespace;
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        // Drop may run on a runtime thread (unwinding from an assertion): the
        // deletes run on a thread of their own, with a client of their own.
        let kubeconfig = self.kubeconfig.clone();
        let configurations = std::mem::take(&mut self.webhook_configurations);
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = connect(&kubeconfig).await;
                let dp = DeleteParams::background();
                let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
                let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
                for name in &configurations {
                    report_delete("MutatingWebhookConfiguration", name, mutating.delete(name, &dp).await);
                    report_delete(
                        "ValidatingWebhookConfiguration",
                        name,
                        validating.delete(name, &dp).await,
                    );
                }
            })
        })
        .join();
        if deleted.is_err() {
            eprintln!("e2e cleanup: deleting the webhook configurations failed; delete them by hand");
        }
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let kubeconfig = self.kubeconfig.clone();
        let namespaces = std::mem::take(&mut self.namespaces);
        let crds = std::mem::take(&mut self.crds);
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = connect(&kubeconfig).await;
                let dp = DeleteParams::background();
                let api: Api<Namespace> = Api::all(client.clone());
                for name in &namespaces {
                    report_delete("Namespace", name, api.delete(name, &dp).await);
                }
                let api: Api<CustomResourceDefinition> = Api::all(client);
                for name in &crds {
                    report_delete("CustomResourceDefinition", name, api.delete(name, &dp).await);
                }
            })
        })
        .join();
        if deleted.is_err() {
            eprintln!("e2e cleanup: deleting the namespaces or CRDs failed; delete them by hand");
        }
        if std::thread::panicking()
            && let Some(log) = &self.serve_log
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- tether serve (last 40 lines) ---\n{}", tail.join("\n"));
        }
    }
}

fn report_delete<T>(kind: &str, name: &str, result: Result<T, kube::Error>) {
    match result {
        Ok(_) => eprintln!("e2e cleanup: deleted {kind} {name}"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => eprintln!("e2e cleanup: cannot delete {kind} {name}: {e}"),
    }
}

async fn connect(kubeconfig: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The address this machine has on the route to `api_server`: what the API
/// server can reach it by, unless the API server is on this machine's
/// loopback (kind and minikube publish theirs there), which the API server
/// cannot call back to: then `TETHER_E2E_WEBHOOK_HOST` must say.
fn host_towards(api_server: std::net::SocketAddr) -> Result<std::net::IpAddr, String> {
    if api_server.ip().is_loopback() {
        return Err(format!(
            "the API server is at {api_server}, on this machine's loopback, where it cannot reach a webhook on this machine: set TETHER_E2E_WEBHOOK_HOST to this machine's address as the cluster sees it (kind: the gateway of the `kind` docker network, `docker network inspect kind -f '{{{{(index .IPAM.Config 0).Gateway}}}}'`; minikube: `minikube ssh grep host.minikube.internal /etc/hosts`)"
        ));
    }
    let bind: std::net::SocketAddr = if api_server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A UDP connect sends nothing: it only makes the kernel pick the route.
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket
        .connect(api_server)
        .map_err(|e| format!("no route to the API server at {api_server}: {e}"))?;
    socket.local_addr().map(|a| a.ip()).map_err(|e| e.to_string())
}

/// `TETHER_E2E_WEBHOOK_HOST`, or [`host_towards`] the API server of `config`.
fn webhook_host(config: &kube::Config) -> String {
    if let Ok(host) = std::env::var("TETHER_E2E_WEBHOOK_HOST")
        && !host.is_empty()
    {
        return host;
    }
    use std::net::ToSocketAddrs;
    let url = &config.cluster_url;
    let host = url
        .host()
        .unwrap_or("localhost")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port_u16().unwrap_or(443);
    let addr = (host, port)
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve the API server {url}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("the API server {url} resolves to nothing"));
    host_towards(addr).unwrap_or_else(|e| panic!("{e}")).to_string()
}

/// `https://HOST:PORT` with an IPv6 HOST in brackets.
fn base_url(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `GET /readyz` on `addr` (plain HTTP) answers 200.
async fn ready(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    answer.starts_with(b"HTTP/1.1 200")
}

/// Polls `check` every half second until it gives a value, for up to `secs`;
/// a time-out names what was awaited and the last thing `check` said.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}; last: {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A pod of the fixture's `dry-probe` workload that no node ever runs.
fn probe_pod(annotations: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": {"generateName": format!("{PROBE}-"), "annotations": annotations},
        "spec": {
            "schedulerName": "tether-e2e-no-such-scheduler",
            "containers": [{"name": PROBE, "image": "registry.k8s.io/pause:3.10"}],
        },
    }))
    .unwrap()
}

fn seccomp_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<k8s_openapi::api::core::v1::SeccompProfile> {
    pod.spec.as_ref()?.containers[0]
        .security_context
        .as_ref()?
        .seccomp_profile
        .clone()
}

fn annotation(pod: &k8s_openapi::api::core::v1::Pod, key: &str) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get(key).cloned()
}

fn tether_annotations(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    pod.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("tether.dev/"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Installs the CRDs that are absent (recording them for clean-up) and waits
/// until they are served.
async fn install_crds(client: &kube::Client, cleanup: &mut Cleanup) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::core::CustomResourceExt;
    use profile_store::crd::{ProfileInstallation, WorkloadProfile};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [WorkloadProfile::crd(), ProfileInstallation::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        if crds.get_opt(&name).await.unwrap().is_some() {
            continue;
        }
        cleanup.crds.push(name.clone());
        crds.create(&PostParams::default(), &crd).await.unwrap();
        eventually(&format!("CRD {name} Established"), 60, || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let got = crds.get(&name).await.map_err(|e| e.to_string())?;
                got.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
                    .ok_or_else(|| "not Established yet".to_string())
            }
        })
        .await;
    }
}

/// The demo fixture's `dry-probe` lines, once per namespace in `namespaces`.
fn probe_fixture(namespaces: &[&str], dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(crate::common::data("demo/shop-events.jsonl")).unwrap();
    let mut out = String::new();
    for ns in namespaces {
        for line in text.lines().filter(|l| l.contains(&format!("\"name\":\"{PROBE}\""))) {
            out.push_str(&line.replace("\"namespace\":\"shop\"", &format!("\"namespace\":\"{ns}\"")));
            out.push('\n');
        }
    }
    assert!(!out.is_empty(), "the demo fixture has no {PROBE} lines");
    let path = dir.join("events.jsonl");
    std::fs::write(&path, out).unwrap();
    path
}

/// The whole admission path on a real cluster: profiles stored with `tether
/// build --store kube://`, injected by a local `tether serve` the API server
/// calls, dry-run and exemptions honored, and a container that exited 159 put
/// into fallback by the crash watcher, with the next pod getting the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_and_the_crash_watcher_falls_back_on_a_real_cluster() {
    use k8s_openapi::api::core::v1::{Event, Pod};
    use kube::api::{ListParams, Patch, PatchParams};
    use profile_store::WorkloadKey;
    use profile_store::crd::WorkloadProfile;

    let Some((client, kubeconfig)) = cluster().await else {
        return;
    };
    // Before the guard, so it outlives it: the guard prints the webhook's log
    // from here when a step failed.
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::new(&kubeconfig);
    let config = config_of(&kubeconfig).await;
    let run = run_id();
    let system = format!("tether-e2e-{run}-system");
    let enforce = format!("tether-e2e-{run}-enforce");
    let dry_run = format!("tether-e2e-{run}-dry-run");
    let exempting = format!("tether-e2e-{run}-exempting");

    install_crds(&client, &mut cleanup).await;
    create_namespaces(
        &client,
        &mut cleanup,
        &run,
        [
            (&system, json!({})),
            (&enforce, json!({"tether.dev/mode": "enforce"})),
            (&dry_run, json!({"tether.dev/mode": "dry-run"})),
            (
                &exempting,
                json!({"tether.dev/mode": "enforce", "tether.dev/allow-exemptions": "true"}),
            ),
        ],
    )
    .await;

    // Profiles, stored as `tether build` stores them.
    let events = probe_fixture(&[&enforce, &dry_run, &exempting], dir.path());
    let key = WorkloadKey::new(&enforce, "Pod", PROBE, PROBE).unwrap();
    let version = build_probe_profiles(&kubeconfig, events, &key).await;
    let injected = profile_store::store::localhost_profile(&key, &version.parse().unwrap());

    // The webhook, local, reachable by the API server at HOST:PORT.
    let local = LocalWebhook::new(&config, &kubeconfig, &system, &run, dir.path());
    local.start(&mut cleanup).await;

    let (m, v) = local.configurations();
    local.register(&client, &mut cleanup, &fail_closed(m), &v).await;

    let enforce_pods: Api<Pod> = Api::namespaced(client.clone(), &enforce);
    let dry_create = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let profile_annotation = format!("tether.dev/profile.{PROBE}");
    injected_on_dry_run(&enforce_pods).await;

    // enforce: the stored pod has the profile and says which version.
    let first = enforce_pods
        .create(&PostParams::default(), &probe_pod(json!({})))
        .await
        .unwrap();
    let first_name = first.metadata.name.clone().unwrap();
    let stored = enforce_pods.get(&first_name).await.unwrap();
    let profile = seccomp_of(&stored).expect("no seccompProfile on the enforce pod");
    assert_eq!(profile.type_, "Localhost");
    assert_eq!(profile.localhost_profile.as_deref(), Some(injected.as_str()));
    assert_eq!(
        annotation(&stored, &profile_annotation).as_deref(),
        Some(version.as_str())
    );
    assert_eq!(annotation(&stored, "tether.dev/fallback"), None);

    // enforce without the namespace's permission: an exemption is refused.
    let refused = enforce_pods
        .create(&PostParams::default(), &probe_pod(json!({"tether.dev/exempt": "e2e"})))
        .await
        .expect_err("an exemption in a namespace that does not allow them was admitted");
    assert!(
        refused.to_string().contains("does not allow seccomp exemptions"),
        "{refused}"
    );

    // dry-run: the profile exists, and nothing is changed.
    let dry_pods: Api<Pod> = Api::namespaced(client.clone(), &dry_run);
    let created = dry_pods
        .create(&PostParams::default(), &probe_pod(json!({})))
        .await
        .unwrap();
    let stored = dry_pods.get(created.metadata.name.as_deref().unwrap()).await.unwrap();
    assert_eq!(seccomp_of(&stored), None);
    assert!(
        tether_annotations(&stored).is_empty(),
        "{:?}",
        tether_annotations(&stored)
    );

    // exemptions allowed: an exempt pod keeps no profile and says why; a pod
    // without the annotation next to it gets its profile.
    let exempt_pods: Api<Pod> = Api::namespaced(client.clone(), &exempting);
    let created = exempt_pods
        .create(
            &PostParams::default(),
            &probe_pod(json!({"tether.dev/exempt": "e2e debugging"})),
        )
        .await
        .unwrap();
    let stored = exempt_pods
        .get(created.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(seccomp_of(&stored), None);
    assert_eq!(
        annotation(&stored, "tether.dev/exempted").as_deref(),
        Some("e2e debugging")
    );
    let created = exempt_pods
        .create(&PostParams::default(), &probe_pod(json!({})))
        .await
        .unwrap();
    let stored = exempt_pods
        .get(created.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    let exempting_key = WorkloadKey::new(&exempting, "Pod", PROBE, PROBE).unwrap();
    assert_eq!(
        seccomp_of(&stored).and_then(|p| p.localhost_profile),
        Some(profile_store::store::localhost_profile(
            &exempting_key,
            &version.parse().unwrap()
        ))
    );

    // The crash: the first enforce pod's container exited 159 (SIGSYS), as a
    // kubelet would report it.
    let status = json!({"status": {"containerStatuses": [{
        "name": PROBE,
        "image": "registry.k8s.io/pause:3.10",
        "imageID": "registry.k8s.io/pause@sha256:ee6521f290b2168b6e0935a181d4cff9be1ac3f505666ef0e3c98fae8199917a",
        "ready": false,
        "restartCount": 1,
        "started": false,
        "state": {"terminated": {"exitCode": 159, "reason": "Error"}},
    }]}});
    enforce_pods
        .patch_status(&first_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let profiles: Api<WorkloadProfile> = Api::namespaced(client.clone(), &enforce);
    let object = format!("pod.{PROBE}.{PROBE}");
    let fallback = eventually("the crash watcher to set the fallback", 60, || {
        let profiles = profiles.clone();
        let object = object.clone();
        async move {
            let wp = profiles.get(&object).await.map_err(|e| e.to_string())?;
            wp.status
                .and_then(|s| s.fallback)
                .ok_or_else(|| "no fallback yet".to_string())
        }
    })
    .await;
    assert!(
        fallback.reason.contains(&first_name) && fallback.reason.contains("159"),
        "{}",
        fallback.reason
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &enforce);
    let event = eventually("the fallback Event on the pod", 30, || {
        let events = events.clone();
        let first_name = first_name.clone();
        async move {
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={first_name}")))
                .await
                .map_err(|e| e.to_string())?;
            let reasons: Vec<Option<String>> = list.items.iter().map(|e| e.reason.clone()).collect();
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("SeccompFallback"))
                .ok_or_else(|| format!("events so far: {reasons:?}"))
        }
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));

    // The next pod of the workload gets the fallback, once the index has it.
    eventually("the webhook to serve the fallback", 60, || {
        let pods = enforce_pods.clone();
        let dry_create = dry_create.clone();
        async move {
            let pod = pods
                .create(&dry_create, &probe_pod(json!({})))
                .await
                .map_err(|e| e.to_string())?;
            annotation(&pod, "tether.dev/fallback").ok_or_else(|| format!("admitted as {:?}", tether_annotations(&pod)))
        }
    })
    .await;
    let next = enforce_pods
        .create(&PostParams::default(), &probe_pod(json!({})))
        .await
        .unwrap();
    let stored = enforce_pods.get(next.metadata.name.as_deref().unwrap()).await.unwrap();
    let why = annotation(&stored, "tether.dev/fallback").expect("no fallback annotation on the next pod");
    assert!(why.contains(&first_name), "{why}");
    let marker = annotation(&stored, &profile_annotation).unwrap_or_default();
    let profile = seccomp_of(&stored).expect("no seccompProfile on the next pod");
    match marker.as_str() {
        "fallback:Unconfined" => assert_eq!(profile.type_, "Unconfined"),
        "fallback:RuntimeDefault" => assert_eq!(profile.type_, "RuntimeDefault"),
        m if m.starts_with("fallback:log:") => {
            assert_eq!(profile.type_, "Localhost");
            assert_ne!(profile.localhost_profile.as_deref(), Some(injected.as_str()));
        }
        other => panic!("the next pod is not under a fallback: {other:?} {profile:?}"),
    }
    drop(cleanup);
}

/// What README "When tether is down" promises, on a real cluster, with
/// `deploy/`'s webhook configurations: while no webhook answers, pod creation
/// fails in a covered namespace (the validating webhook fails closed); labelling
/// the namespace `tether.dev/mode=off` lets pods in; deleting the validating
/// configuration lets them in everywhere, without a profile (the mutating
/// webhook fails open); and re-applying it with tether back restores injection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_creation_while_tether_is_down_follows_the_failure_policies_on_a_real_cluster() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{Patch, PatchParams};
    use profile_store::WorkloadKey;

    let Some((client, kubeconfig)) = cluster().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::new(&kubeconfig);
    let config = config_of(&kubeconfig).await;
    let run = run_id();
    let system = format!("tether-e2e-{run}-system");
    let covered = format!("tether-e2e-{run}-covered");
    let glass = format!("tether-e2e-{run}-glass");

    install_crds(&client, &mut cleanup).await;
    create_namespaces(
        &client,
        &mut cleanup,
        &run,
        [
            (&system, json!({})),
            (&covered, json!({"tether.dev/mode": "enforce"})),
            (&glass, json!({"tether.dev/mode": "enforce"})),
        ],
    )
    .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let events = probe_fixture(&[&covered, &glass], dir.path());
    let key = WorkloadKey::new(&covered, "Pod", PROBE, PROBE).unwrap();
    build_probe_profiles(&kubeconfig, events, &key).await;

    let local = LocalWebhook::new(&config, &kubeconfig, &system, &run, dir.path());
    local.start(&mut cleanup).await;
    let (m, v) = local.configurations();
    assert_eq!(
        (
            m.webhooks.as_ref().unwrap()[0].failure_policy.as_deref(),
            v.webhooks.as_ref().unwrap()[0].failure_policy.as_deref()
        ),
        (Some("Ignore"), Some("Fail")),
        "deploy/ changed its failure policies: README \"When tether is down\" and this test follow them"
    );
    local.register(&client, &mut cleanup, &m, &v).await;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let covered_pods: Api<Pod> = Api::namespaced(client.clone(), &covered);
    let glass_pods: Api<Pod> = Api::namespaced(client.clone(), &glass);
    injected_on_dry_run(&covered_pods).await;
    injected_on_dry_run(&glass_pods).await;

    // tether is down: the validating webhook cannot be called and fails closed.
    cleanup.stop_serve();
    for pods in [&covered_pods, &glass_pods] {
        let refused = pods
            .create(&PostParams::default(), &probe_pod(json!({})))
            .await
            .expect_err("a pod was created in a covered namespace while tether was down");
        let text = refused.to_string();
        assert!(
            text.contains("failed calling webhook") && text.contains("validate.e2e.tether.dev"),
            "not refused by the unreachable validating webhook: {text}"
        );
    }
    assert!(
        covered_pods.list(&Default::default()).await.unwrap().items.is_empty(),
        "a refused create left a pod"
    );

    // Smallest hammer: the namespace opts out, and only it.
    namespaces
        .patch(
            &glass,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tether.dev/mode": "off"}}})),
        )
        .await
        .unwrap();
    let pod = eventually("pods created in the namespace labelled off", 60, || {
        let pods = glass_pods.clone();
        async move {
            pods.create(&PostParams::default(), &probe_pod(json!({})))
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(seccomp_of(&pod), None);
    assert!(tether_annotations(&pod).is_empty(), "{:?}", tether_annotations(&pod));
    let opened = covered_pods.create(&PostParams::default(), &probe_pod(json!({}))).await;
    assert!(opened.is_err(), "labelling one namespace off opened another");

    // Larger hammer: no validating configuration; the mutating webhook is still
    // unreachable and fails open, so pods come in without a profile.
    validating
        .delete(&local.configuration_name(), &DeleteParams::default())
        .await
        .unwrap();
    let pod = eventually("pods created with the validating configuration deleted", 60, || {
        let pods = covered_pods.clone();
        async move {
            pods.create(&PostParams::default(), &probe_pod(json!({})))
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(seccomp_of(&pod), None, "a profile while tether was down");
    assert!(tether_annotations(&pod).is_empty(), "{:?}", tether_annotations(&pod));

    // Undo: tether back, the configuration re-applied; pods get profiles again
    // and an Unconfined set by hand is refused again.
    local.start(&mut cleanup).await;
    validating.create(&PostParams::default(), &v).await.unwrap();
    injected_on_dry_run(&covered_pods).await;
    let unconfined: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": format!("{PROBE}-")},
        "spec": {
            "schedulerName": "tether-e2e-no-such-scheduler",
            "containers": [{"name": PROBE, "image": "registry.k8s.io/pause:3.10",
                "securityContext": {"seccompProfile": {"type": "Unconfined"}}}],
        },
    }))
    .unwrap();
    eventually("the validating webhook to refuse Unconfined again", 60, || {
        let pods = covered_pods.clone();
        let unconfined = unconfined.clone();
        async move {
            let dry_create = PostParams {
                dry_run: true,
                ..Default::default()
            };
            match pods.create(&dry_create, &unconfined).await {
                Ok(_) => Err("Unconfined admitted".to_string()),
                Err(e) if e.to_string().contains("Unconfined") => Ok(()),
                Err(e) => Err(format!("refused, but not for Unconfined: {e}")),
            }
        }
    })
    .await;
    drop(cleanup);
}

#[test]
fn webhook_host_refuses_a_loopback_api_server_and_says_what_to_set() {
    let err = host_towards(([127, 0, 0, 1], 6443).into()).unwrap_err();
    assert!(err.contains("TETHER_E2E_WEBHOOK_HOST"), "{err}");
    let err = host_towards((std::net::Ipv6Addr::LOCALHOST, 6443).into()).unwrap_err();
    assert!(err.contains("TETHER_E2E_WEBHOOK_HOST"), "{err}");
}

#[test]
fn e2e_webhook_configurations_are_deploys_calling_the_local_url_for_the_run_only() {
    let pki = certs::generate::for_service("tether-e2e", "tether-e2e-x-system", &["192.0.2.1".into()], 1).unwrap();
    let (m, v) = webhook_configurations("tether-e2e-x", "x", "https://192.0.2.1:8443", &pki.ca_cert);
    let (deployed_m, deployed_v) = deployed_configurations();
    let m = m.webhooks.unwrap();
    let v = v.webhooks.unwrap();
    let deployed_m = deployed_m.webhooks.unwrap();
    let deployed_v = deployed_v.webhooks.unwrap();
    assert_eq!((m.len(), v.len()), (1, 1));
    assert_eq!(
        (m[0].name.as_str(), v[0].name.as_str()),
        ("mutate.e2e.tether.dev", "validate.e2e.tether.dev")
    );
    for (hook, path) in [(&m[0].client_config, "/mutate"), (&v[0].client_config, "/validate")] {
        assert_eq!(
            hook.url.as_deref(),
            Some(format!("https://192.0.2.1:8443{path}").as_str())
        );
        assert_eq!(hook.service, None);
        assert_eq!(hook.ca_bundle.as_ref().unwrap().0, pki.ca_cert.as_bytes());
    }
    // What the "tether down" test depends on is deploy/'s, unchanged.
    assert_eq!(m[0].failure_policy, deployed_m[0].failure_policy);
    assert_eq!(v[0].failure_policy, deployed_v[0].failure_policy);
    assert_eq!(m[0].rules, deployed_m[0].rules);
    assert_eq!(m[0].timeout_seconds, deployed_m[0].timeout_seconds);
    let selector = m[0].namespace_selector.as_ref().unwrap();
    assert_eq!(
        selector.match_expressions,
        deployed_m[0].namespace_selector.as_ref().unwrap().match_expressions
    );
    assert!(
        selector
            .match_expressions
            .iter()
            .flatten()
            .any(|e| e.key == "tether.dev/mode"
                && e.operator == "NotIn"
                && e.values.as_deref() == Some(&["off".to_string()][..])),
        "{selector:?}"
    );
    assert_eq!(
        selector
            .match_labels
            .as_ref()
            .unwrap()
            .get("tether.dev/e2e")
            .map(String::as_str),
        Some("x")
    );
    assert_eq!(v[0].namespace_selector, m[0].namespace_selector);
    assert_eq!(
        m[0].rules.as_ref().unwrap()[0].operations.as_deref(),
        Some(&["CREATE".to_string()][..])
    );
    // The injection test fails closed on the mutating webhook instead.
    let closed = fail_closed(MutatingWebhookConfiguration {
        webhooks: Some(m),
        ..Default::default()
    });
    assert_eq!(closed.webhooks.unwrap()[0].failure_policy.as_deref(), Some("Fail"));
}

#[test]
fn webhook_url_brackets_an_ipv6_host() {
    assert_eq!(base_url("192.168.49.1", 8443), "https://192.168.49.1:8443");
    assert_eq!(base_url("fd00::1", 8443), "https://[fd00::1]:8443");
    assert_eq!(
        base_url("host.minikube.internal", 8443),
        "https://host.minikube.internal:8443"
    );
}

/// The fixture the e2e suite stores holds the `dry-probe` workload, and its
/// namespace is rewritten for each test namespace.
#[test]
fn the_e2e_fixture_builds_one_dry_probe_profile_per_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let events = probe_fixture(&["tether-e2e-x-enforce", "tether-e2e-x-dry-run"], dir.path());
    let store = crate::common::store_in(dir.path());
    let build = crate::common::tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    for ns in ["tether-e2e-x-enforce", "tether-e2e-x-dry-run"] {
        assert!(
            build.stdout.contains(&format!("{ns}/pod/{PROBE}/{PROBE}")),
            "{}",
            build.stdout
        );
    }
    assert!(!build.stdout.contains("shop/"), "{}", build.stdout);
    // A pod created from generateName `dry-probe-` is this workload.
    let pod = probe_pod(json!({}));
    let key = webhook::decide::container_key(&webhook::slim::PodView::of(&pod), "tether-e2e-x-enforce", PROBE).unwrap();
    assert_eq!(key.to_string(), format!("tether-e2e-x-enforce/pod/{PROBE}/{PROBE}"));
    assert_eq!(
        key,
        profile_store::WorkloadKey::new("tether-e2e-x-enforce", "Pod", PROBE, PROBE).unwrap()
    );
}

#[test]
fn the_e2e_policy_turns_off_unlabelled_namespaces_and_the_install_gate() {
    use webhook::policy::{Mode, Policy};
    let policy = Policy::from_yaml(E2E_POLICY).unwrap();
    assert_eq!(policy.default_mode, Mode::Off);
    assert_eq!(policy.install_gate, webhook::gate::InstallGate::None);
}

/// The suite's `tether serve` command line is one `tether serve` takes: it gets
/// as far as reading the kubeconfig (a missing one here), not a usage error.
#[test]
fn the_e2e_serve_command_line_parses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate::for_service("tether-e2e", "tether-e2e-x-system", &["192.0.2.1".into()], 1).unwrap();
    pki.write(&dir.path().join("pki"), false).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, E2E_POLICY).unwrap();
    let missing = dir.path().join("no-kubeconfig");
    let out = serve_command(
        missing.to_str().unwrap(),
        "tether-e2e-x-system",
        "x",
        &dir.path().join("pki"),
        free_port(),
        ([127, 0, 0, 1], free_port()).into(),
        &policy,
    )
    // Not in a pod's environment either: no in-cluster configuration to fall back on.
    .env_remove("KUBERNETES_SERVICE_HOST")
    .env_remove("KUBERNETES_SERVICE_PORT")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-kubeconfig"),
        "did not get as far as the kubeconfig: {stderr}"
    );
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(
        !stderr.contains("unexpected argument") && !stderr.contains("Usage:"),
        "{stderr}"
    );
}
