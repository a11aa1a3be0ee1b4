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
