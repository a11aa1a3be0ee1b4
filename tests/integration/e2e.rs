//! Tests against a real cluster, run only when `TETHER_E2E_KUBECONFIG` names a
//! kubeconfig (no API server can be installed on the CI machines).

use crate::common::tether_env;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

async fn cluster() -> Option<(kube::Client, String)> {
    let Ok(path) = std::env::var("TETHER_E2E_KUBECONFIG") else {
        eprintln!("TETHER_E2E_KUBECONFIG is not set: skipping the real-cluster test");
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
