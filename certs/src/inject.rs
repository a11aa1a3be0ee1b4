//! Writing the CA into the `caBundle` of webhook configurations, so the API server
//! trusts the webhook's serving certificate.

use crate::CertError;
use crate::load::parse_certs;
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;
use std::path::Path;

/// What was done to one webhook configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// `MutatingWebhookConfiguration` or `ValidatingWebhookConfiguration`.
    pub kind: &'static str,
    /// Webhooks whose `caBundle` was set.
    pub updated: Vec<String>,
    /// Webhooks that already carried this bundle.
    pub unchanged: Vec<String>,
}

/// Reads a PEM CA bundle and checks it holds at least one CA certificate.
pub fn read_ca_bundle(path: &Path) -> Result<Vec<u8>, CertError> {
    let pem = std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = parse_certs(path, &pem)?;
    let any_ca = certs.iter().any(|der| {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c.is_ca())
            .unwrap_or(false)
    });
    if !any_ca {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            reason: "holds no CA certificate (basicConstraints CA:TRUE); pass the ca.crt of `tether certs init`".into(),
        });
    }
    Ok(pem)
}

/// A JSON patch that sets `caBundle` on each webhook that lacks this bundle,
/// guarded by a `test` of each webhook's name at its index, so that a concurrent
/// reordering fails the patch instead of writing into the wrong webhook.
fn bundle_patch(
    webhooks: &[(String, Option<String>)],
    bundle_b64: &str,
) -> (json_patch::Patch, Vec<String>, Vec<String>) {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{AddOperation, PatchOperation, TestOperation};
    let mut ops = Vec::new();
    let (mut updated, mut unchanged) = (Vec::new(), Vec::new());
    for (i, (name, current)) in webhooks.iter().enumerate() {
        if current.as_deref() == Some(bundle_b64) {
            unchanged.push(name.clone());
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "name"]),
            value: Value::String(name.clone()),
        }));
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
            value: Value::String(bundle_b64.to_string()),
        }));
        updated.push(name.clone());
    }
    (json_patch::Patch(ops), updated, unchanged)
}

/// Sets `caBundle` (base64 of `ca_pem`) on every webhook of the Mutating and the
/// Validating webhook configuration named `name`. Configurations that do not exist
/// are skipped; when neither exists, that is an error.
pub async fn inject_ca_bundle(client: kube::Client, name: &str, ca_pem: &[u8]) -> Result<Vec<Injected>, CertError> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut done = Vec::new();

    let encode = |b: Option<k8s_openapi::ByteString>| b.map(|b| base64::engine::general_purpose::STANDARD.encode(b.0));
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(cfg) = mutating.get_opt(name).await? {
        let hooks = cfg
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, encode(w.client_config.ca_bundle)));
        done.push(patch_with(&mutating, "MutatingWebhookConfiguration", name, hooks.collect(), &b64).await?);
    }
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client);
    if let Some(cfg) = validating.get_opt(name).await? {
        let hooks = cfg
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, encode(w.client_config.ca_bundle)));
        done.push(
            patch_with(
                &validating,
                "ValidatingWebhookConfiguration",
                name,
                hooks.collect(),
                &b64,
            )
            .await?,
        );
    }
    if done.is_empty() {
        return Err(CertError::NoWebhook(name.to_string()));
    }
    Ok(done)
}

async fn patch_with<K>(
    api: &Api<K>,
    kind: &'static str,
    name: &str,
    hooks: Vec<(String, Option<String>)>,
    b64: &str,
) -> Result<Injected, CertError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let (patch, updated, unchanged) = bundle_patch(&hooks, b64);
    if !patch.0.is_empty() {
        api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await?;
    }
    Ok(Injected {
        kind,
        updated,
        unchanged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_script::Call;
    use http::Method;
    use serde_json::json;
    use std::time::Duration;

    const MUTATING: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tether";
    const VALIDATING: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/tether";

    /// Checks that a request is the JSON patch `want`.
    fn json_patch(want: Value) -> impl FnOnce(&api_script::Sent) + Send + 'static {
        move |sent| {
            assert_eq!(sent.content_type.as_deref(), Some("application/json-patch+json"));
            assert_eq!(sent.body, want);
        }
    }

    fn not_found(kind: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{kind} \"tether\" not found"), "reason": "NotFound",
               "details": {"name": "tether", "group": "admissionregistration.k8s.io", "kind": kind}, "code": 404})
    }

    fn config(kind: &str, hooks: &[(&str, Option<&str>)]) -> Value {
        let webhooks: Vec<Value> = hooks
            .iter()
            .map(|(name, bundle)| {
                let mut cc =
                    json!({"service": {"name": "tether-webhook", "namespace": "tether-system", "path": "/mutate"}});
                if let Some(b) = bundle {
                    cc["caBundle"] = json!(b);
                }
                json!({"name": name, "clientConfig": cc, "sideEffects": "None", "admissionReviewVersions": ["v1"]})
            })
            .collect();
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
               "metadata": {"name": "tether", "resourceVersion": "1"}, "webhooks": webhooks})
    }

    /// Runs `calls` as the API server; fails on any call out of script, and the
    /// client side fails (times out) on a call the script does not answer.
    async fn run(calls: Vec<Call>, bundle: &[u8]) -> Result<Vec<Injected>, CertError> {
        let (client, script) = api_script::serve(calls, "default");
        let result = tokio::time::timeout(Duration::from_secs(5), inject_ca_bundle(client, "tether", bundle))
            .await
            .expect("inject_ca_bundle made a call the scenario does not answer");
        script.finish().await;
        result
    }

    #[tokio::test]
    async fn patches_every_webhook_of_both_configurations_with_name_guards() {
        let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        let mutating = config("MutatingWebhookConfiguration", &[("mutate.tether.dev", None)]);
        let validating = config(
            "ValidatingWebhookConfiguration",
            &[("validate.tether.dev", Some("b2xk")), ("validate2.tether.dev", None)],
        );
        let calls = vec![
            Call::new(Method::GET, MUTATING, 200, mutating.clone()),
            Call::new(Method::PATCH, MUTATING, 200, mutating).check_request(json_patch(json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "mutate.tether.dev"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
            ]))),
            Call::new(Method::GET, VALIDATING, 200, validating.clone()),
            Call::new(Method::PATCH, VALIDATING, 200, validating).check_request(json_patch(json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "validate.tether.dev"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
                {"op": "test", "path": "/webhooks/1/name", "value": "validate2.tether.dev"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64},
            ]))),
        ];
        let done = run(calls, pem).await.unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].updated, ["validate.tether.dev", "validate2.tether.dev"]);
    }

    #[tokio::test]
    async fn a_missing_configuration_is_skipped_and_an_up_to_date_one_is_not_patched() {
        let pem = b"ca";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        let mutating = config("MutatingWebhookConfiguration", &[("mutate.tether.dev", Some(&b64))]);
        let calls = vec![
            Call::new(Method::GET, MUTATING, 200, mutating),
            Call::new(
                Method::GET,
                VALIDATING,
                404,
                not_found("validatingwebhookconfigurations"),
            ),
        ];
        let done = run(calls, pem).await.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].unchanged, ["mutate.tether.dev"]);
        assert!(done[0].updated.is_empty());
    }

    #[tokio::test]
    async fn neither_configuration_existing_is_an_error_saying_what_to_do() {
        let calls = vec![
            Call::new(Method::GET, MUTATING, 404, not_found("mutatingwebhookconfigurations")),
            Call::new(
                Method::GET,
                VALIDATING,
                404,
                not_found("validatingwebhookconfigurations"),
            ),
        ];
        let err = run(calls, b"ca").await.unwrap_err();
        assert!(matches!(err, CertError::NoWebhook(_)));
        assert!(err.to_string().contains("apply the webhook manifests"));
    }

    #[test]
    fn the_bundle_must_hold_a_ca_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::generate::for_service("s", "n", &[], 1).unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, &pki.ca_cert).unwrap();
        assert_eq!(read_ca_bundle(&ca).unwrap(), pki.ca_cert.as_bytes());
        let leaf = dir.path().join("tls.crt");
        std::fs::write(&leaf, &pki.cert).unwrap();
        let err = read_ca_bundle(&leaf).unwrap_err().to_string();
        assert!(err.contains("no CA certificate") && err.contains("tls.crt"), "{err}");
    }
}
