//! The node's report: its `ProfileInstallation` (named after the node), created
//! when absent, whose status says which `localhostProfile`s the node holds.

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use profile_store::crd::{ProfileInstallation, ProfileInstallationSpec, ProfileInstallationStatus};

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The API server refused or failed a call.
    #[error("ProfileInstallation {namespace}/{node}: {action}: {source}{hint}")]
    Api {
        /// The namespace.
        namespace: String,
        /// The node (and object name).
        node: String,
        /// What was attempted.
        action: &'static str,
        /// The error.
        source: kube::Error,
        /// What to do about it, when known.
        hint: &'static str,
    },
}

fn hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            " (the installer's RBAC must allow get/create on profileinstallations and patch on profileinstallations/status: apply deploy/base)"
        }
        kube::Error::Api(s) if s.code == 404 => " (is the ProfileInstallation CRD installed? apply deploy/base/crds)",
        _ => "",
    }
}

/// Writes a node's `ProfileInstallation`.
#[derive(Clone)]
pub struct Reporter {
    api: Api<ProfileInstallation>,
    namespace: String,
    node: String,
    created: bool,
}

impl Reporter {
    /// A reporter for `node`'s object in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, node: &str) -> Reporter {
        Reporter {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            node: node.to_string(),
            created: false,
        }
    }

    fn err(&self, action: &'static str) -> impl FnOnce(kube::Error) -> ReportError + '_ {
        move |source| ReportError::Api {
            namespace: self.namespace.clone(),
            node: self.node.clone(),
            hint: hint(&source),
            action,
            source,
        }
    }

    /// Creates the object when it does not exist (once per process, and again
    /// when a status write finds it deleted).
    async fn ensure(&mut self) -> Result<(), ReportError> {
        if self.api.get_opt(&self.node).await.map_err(self.err("get"))?.is_none() {
            let object = ProfileInstallation::new(
                &self.node,
                ProfileInstallationSpec {
                    node_name: self.node.clone(),
                },
            );
            match self.api.create(&PostParams::default(), &object).await {
                Ok(_) => tracing::info!(node = %self.node, "created the node's ProfileInstallation"),
                // Another process (a previous pod of this DaemonSet) won the race.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(self.err("create")(e)),
            }
        }
        self.created = true;
        Ok(())
    }

    /// Replaces the status with `status` (a merge patch of the status
    /// subresource: the installer is the only writer of its node's object).
    pub async fn report(&mut self, status: &ProfileInstallationStatus) -> Result<(), ReportError> {
        if !self.created {
            self.ensure().await?;
        }
        let patch = serde_json::json!({ "status": status });
        match self
            .api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Deleted under us (kubectl delete): create it again and retry once.
                self.ensure().await?;
                self.api
                    .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(self.err("patch status"))
            }
            Err(e) => Err(self.err("patch status")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_script::Call;
    use http::Method;
    use serde_json::{Value, json};
    use std::time::Duration;

    const OBJECT: &str = "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations/node-a";
    const COLLECTION: &str = "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations";
    const STATUS: &str = "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations/node-a/status";

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "profileinstallations.tether.dev \"node-a\" not found", "reason": "NotFound", "code": 404})
    }

    fn object(status: Value) -> Value {
        json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ProfileInstallation",
               "metadata": {"name": "node-a", "namespace": "tether-system", "resourceVersion": "7"},
               "spec": {"nodeName": "node-a"}, "status": status})
    }

    fn status(installed: &[&str]) -> ProfileInstallationStatus {
        ProfileInstallationStatus {
            ready: true,
            heartbeat: Some("2026-11-30T23:00:00Z".into()),
            installed: installed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn creates_the_object_when_absent_then_writes_the_status() {
        let first = status(&["tether/prod/deployment/api/app-0123456789ab.json"]);
        let second = status(&[]);
        let calls = vec![
            Call::new(Method::GET, OBJECT, 404, not_found()),
            Call::new(Method::POST, COLLECTION, 201, object(json!({}))).expect_body(
                json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ProfileInstallation",
                                    "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}}),
            ),
            Call::new(
                Method::PATCH,
                STATUS,
                200,
                object(serde_json::to_value(&first).unwrap()),
            )
            .expect_body(json!({"status": {"ready": true, "heartbeat": "2026-11-30T23:00:00Z",
                                               "installed": ["tether/prod/deployment/api/app-0123456789ab.json"]}})),
            // The next heartbeat only patches the status.
            Call::new(
                Method::PATCH,
                STATUS,
                200,
                object(serde_json::to_value(&second).unwrap()),
            )
            .expect_body(json!({"status": {"ready": true, "heartbeat": "2026-11-30T23:00:00Z", "installed": []}})),
        ];
        let (client, script) = api_script::serve(calls, "tether-system");
        let mut reporter = Reporter::new(client, "tether-system", "node-a");
        tokio::time::timeout(Duration::from_secs(5), async {
            reporter.report(&first).await.unwrap();
            reporter.report(&second).await.unwrap();
        })
        .await
        .expect("the reporter made a call the scenario does not answer");
        script.finish().await;
    }

    #[tokio::test]
    async fn an_existing_object_is_not_created_again_and_a_deleted_one_is() {
        let s = status(&[]);
        let calls = vec![
            Call::new(Method::GET, OBJECT, 200, object(json!({}))),
            Call::new(Method::PATCH, STATUS, 404, not_found()),
            Call::new(Method::GET, OBJECT, 404, not_found()),
            Call::new(Method::POST, COLLECTION, 201, object(json!({}))),
            Call::new(Method::PATCH, STATUS, 200, object(json!({}))),
        ];
        let (client, script) = api_script::serve(calls, "tether-system");
        let mut reporter = Reporter::new(client, "tether-system", "node-a");
        tokio::time::timeout(Duration::from_secs(5), reporter.report(&s))
            .await
            .expect("the reporter made a call the scenario does not answer")
            .unwrap();
        script.finish().await;
    }

    #[tokio::test]
    async fn forbidden_says_which_rbac_is_missing() {
        let calls = vec![Call::new(
            Method::GET,
            OBJECT,
            403,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": "forbidden", "reason": "Forbidden", "code": 403}),
        )];
        let (client, script) = api_script::serve(calls, "tether-system");
        let mut reporter = Reporter::new(client, "tether-system", "node-a");
        let err = reporter.report(&status(&[])).await.unwrap_err().to_string();
        assert!(err.contains("node-a") && err.contains("RBAC"), "{err}");
        script.finish().await;
    }
}
