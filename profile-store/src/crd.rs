//! The custom resources of the Kubernetes store (group `tether.dev`, version
//! `v1alpha1`), and their CRDs as `deploy/base/crds/` holds them.
//!
//! The CRD YAML in `deploy/` is generated from these types (`tether crds`); a test
//! regenerates it and fails when the files differ, so the manifests cannot drift
//! from the code. [`KubeStore`](crate::kube_store::KubeStore) reads and writes
//! these objects; the shapes hold everything of the FsStore's
//! [`WorkloadRecord`](crate::store::WorkloadRecord) (conversions in
//! [`kube_store`](crate::kube_store)).

use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One workload container's profiles: a `WorkloadProfile` per
/// [`WorkloadKey`](crate::WorkloadKey), in the workload's namespace, named
/// `<kind>.<name>.<container>` (kind and container have no dots, so the first
/// and the last dot split the name even when the workload's name has dots).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "WorkloadProfile",
    namespaced,
    shortname = "wp",
    status = "WorkloadProfileStatus",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.workload.kind"}"#,
    printcolumn = r#"{"name":"Workload","type":"string","jsonPath":".spec.workload.name"}"#,
    printcolumn = r#"{"name":"Container","type":"string","jsonPath":".spec.workload.container"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".spec.activeVersion"}"#,
    printcolumn = r#"{"name":"Fallback","type":"string","jsonPath":".status.fallback.reason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadProfileSpec {
    /// The workload and container (the namespace is the object's).
    pub workload: WorkloadRef,
    /// What the baseline holds, summed over every observation.
    #[serde(default)]
    pub baseline: BaselineSummary,
    /// The last versions (10 by default), oldest first; each carries its profile
    /// inline (a few KiB). The Log-mode variant of each is derived, not stored.
    #[serde(default)]
    pub versions: Vec<ProfileVersion>,
    /// The version `tether profiles activate` pinned; without one the newest
    /// version is active. Never pruned from `versions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// Dangerous syscalls a reviewer approved (`tether profiles approve`).
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// Which workload container a profile is for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Controller kind, lower case: `deployment`, `statefulset`, `daemonset`,
    /// `job`, `cronjob` or `pod`.
    pub kind: String,
    /// Controller (or bare pod) name.
    pub name: String,
    /// Container or init container name.
    pub container: String,
}

/// The baseline: every counter and set of the [`Baseline`](crate::Baseline), so a
/// build that merges new observations into it loses nothing (the raw events are
/// never stored).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaselineSummary {
    /// Syscall events counted into `syscalls`.
    #[serde(default)]
    pub events: u64,
    /// Process starts observed.
    #[serde(default)]
    pub processes: u64,
    /// Process exits observed.
    #[serde(default)]
    pub exits: u64,
    /// Events of exec liveness/readiness probes (kept: probes run under the profile).
    #[serde(default)]
    pub exec_probe_events: u64,
    /// Events of processes entered from outside the container (`kubectl exec`),
    /// left out of the baseline.
    #[serde(default)]
    pub excluded_not_in_init_tree: u64,
    /// Events Tetragon reported dropped on the nodes the workload ran on: when
    /// non-zero, the baseline may be missing syscalls.
    #[serde(default)]
    pub dropped_on_nodes: u64,
    /// Per syscall name: how often and when it was seen.
    #[serde(default)]
    pub syscalls: BTreeMap<String, SyscallSummary>,
    /// ABIs the syscalls were made through (`x86_64`, `i386`, `aarch64`, `arm`).
    #[serde(default)]
    pub abis: Vec<String>,
    /// Pods (replicas) that contributed events.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Nodes that contributed events.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// First observation (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// Last observation (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// How often and when one syscall was observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyscallSummary {
    /// Calls observed.
    #[serde(default)]
    pub count: u64,
    /// First call (RFC 3339; absent for inputs without timestamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// Last call (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// A rendered, content-addressed profile version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileVersion {
    /// The first 12 hex digits of the sha256 of the canonical profile JSON.
    #[schemars(regex(pattern = r"^[0-9a-f]{12}$"))]
    pub version: String,
    /// When it was rendered (RFC 3339).
    pub created: String,
    /// The runtime base set it was rendered with, as the operator chose it (`runc`,
    /// `crun@1`).
    pub runtime: String,
    /// The node architecture it is for (`x86_64`, `aarch64`).
    pub arch: String,
    /// `Draft` until a staging replay passed, then `Validated`.
    pub status: VersionState,
    /// Observed dangerous syscalls it leaves out until a reviewer approves them.
    #[serde(default)]
    pub needs_review: Vec<String>,
    /// The OCI seccomp profile (the runtime-spec `linux.seccomp` object).
    #[schemars(schema_with = "preserve_unknown")]
    pub profile: serde_json::Value,
}

/// Why a version's inline profile cannot be used (callers add the object and
/// field: [`WorkloadProfile::profile_of`], the KubeStore's reader).
#[derive(Debug, thiserror::Error)]
pub enum InlineProfileError {
    /// `profile` is not an OCI seccomp profile.
    #[error("not a seccomp profile ({0})")]
    NotAProfile(#[source] serde_json::Error),
    /// `profile` hashes to another version: it was edited after rendering.
    #[error("it hashes to {actual}: it was altered")]
    Altered {
        /// The version its content hashes to.
        actual: crate::Version,
    },
}

impl ProfileVersion {
    /// The seccomp profile this version holds, verified against its version:
    /// the canonical JSON must hash to it, as a version file on a node must. The
    /// one check for every reader of inline profiles (KubeStore, installer,
    /// webhook index).
    pub fn verified_profile(&self) -> Result<crate::SeccompProfile, InlineProfileError> {
        let profile: crate::SeccompProfile =
            serde_json::from_value(self.profile.clone()).map_err(InlineProfileError::NotAProfile)?;
        let actual = profile.version();
        if actual.as_str() != self.version {
            return Err(InlineProfileError::Altered { actual });
        }
        Ok(profile)
    }
}

/// Review state of a version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VersionState {
    /// Rendered, not yet proven by a staging replay.
    Draft,
    /// A staging replay passed under it.
    Validated,
}

/// Why a `WorkloadProfile` cannot be used as it stands.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The object's namespace or `spec.workload` is not a valid workload key.
    #[error("WorkloadProfile {object}: spec.workload is not a valid workload key ({source}); fix or delete the object")]
    Key {
        /// The object, as `namespace/name`.
        object: String,
        /// What is wrong.
        source: crate::key::KeyError,
    },
    /// A version's inline profile is not a seccomp profile.
    #[error(
        "WorkloadProfile {object}: version {version}: spec.versions[].profile is not a seccomp profile ({source}); re-render it with `tether build`"
    )]
    Profile {
        /// The object, as `namespace/name`.
        object: String,
        /// The version.
        version: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A version's inline profile does not hash to its version: it was edited.
    #[error(
        "WorkloadProfile {object}: version {version} holds a profile that hashes to {actual}: it was altered; re-render it with `tether build`"
    )]
    Mismatch {
        /// The object, as `namespace/name`.
        object: String,
        /// The version named.
        version: String,
        /// The version its content hashes to.
        actual: crate::Version,
    },
}

impl WorkloadProfile {
    /// The object name of `key`'s profile: `<kind>.<name>.<container>`. Kind and
    /// container have no dots, so the first and the last dot split the name
    /// unambiguously even when the workload's name has dots
    /// ([`WorkloadProfile::key_of_name`]).
    pub fn object_name(key: &crate::WorkloadKey) -> String {
        format!("{}.{}.{}", key.kind(), key.name(), key.container())
    }

    /// The key a `WorkloadProfile` named `name` in `namespace` belongs to, read
    /// from the name alone (a metadata-only list has no spec); `None` for a name
    /// [`WorkloadProfile::object_name`] could not have produced.
    pub fn key_of_name(namespace: &str, name: &str) -> Option<crate::WorkloadKey> {
        let (kind, rest) = name.split_once('.')?;
        let (workload, container) = rest.rsplit_once('.')?;
        crate::WorkloadKey::new(namespace, kind, workload, container)
            .ok()
            .filter(|k| k.kind() == kind)
    }

    /// `namespace/name`, for messages.
    pub fn display_name(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// The workload key the object is for (the namespace is the object's), validated.
    pub fn key(&self) -> Result<crate::WorkloadKey, CrdError> {
        let w = &self.spec.workload;
        crate::WorkloadKey::new(
            self.metadata.namespace.as_deref().unwrap_or_default(),
            &w.kind,
            &w.name,
            &w.container,
        )
        .map_err(|source| CrdError::Key {
            object: self.display_name(),
            source,
        })
    }

    /// The seccomp profile `version` holds, verified against its version
    /// ([`ProfileVersion::verified_profile`]); the error names this object.
    pub fn profile_of(&self, version: &ProfileVersion) -> Result<crate::SeccompProfile, CrdError> {
        version.verified_profile().map_err(|e| match e {
            InlineProfileError::NotAProfile(source) => CrdError::Profile {
                object: self.display_name(),
                version: version.version.clone(),
                source,
            },
            InlineProfileError::Altered { actual } => CrdError::Mismatch {
                object: self.display_name(),
                version: version.version.clone(),
                actual,
            },
        })
    }
}

impl WorkloadProfileSpec {
    /// The position in `versions` of the active version: the pinned one
    /// (`activeVersion`), else the newest; the same rule as the FsStore's
    /// ([`active_position`](crate::store::active_position)). `None` when nothing
    /// was rendered, or the pinned version is no longer kept (admission then has
    /// nothing to inject).
    pub fn active_position(&self) -> Option<usize> {
        let pinned = self.active_version.as_deref();
        crate::store::active_position(&self.versions, pinned.map(|p| move |v: &ProfileVersion| v.version == p))
    }

    /// The active version (see [`WorkloadProfileSpec::active_position`]).
    pub fn active(&self) -> Option<&ProfileVersion> {
        self.active_position().map(|i| &self.versions[i])
    }
}

/// What the crash watcher and `tether profiles fallback` write.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadProfileStatus {
    /// Set while the workload runs under a fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackState>,
    /// The spec generation this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Why and since when a workload is in fallback.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackState {
    /// The reason (the crash seen, or the operator's text).
    pub reason: String,
    /// Since when (RFC 3339).
    pub since: String,
    /// The pod whose crash started it, as `namespace/name`, when the crash
    /// watcher set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// What one node's installer has written under the kubelet's seccomp root: one
/// object per node in `tether-system`, named after the node. The webhook injects
/// a version only once the installers report it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "ProfileInstallation",
    namespaced,
    status = "ProfileInstallationStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.heartbeat"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProfileInstallationSpec {
    /// The node this installer runs on.
    pub node_name: String,
}

/// The installer's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileInstallationStatus {
    /// Whether the installer is running and caught up.
    #[serde(default)]
    pub ready: bool,
    /// When it last reported (RFC 3339); a stale heartbeat means not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// Every installed `localhostProfile` (`tether/<ns>/<kind>/<name>/<container>-<version>.json`).
    #[serde(default)]
    pub installed: Vec<String>,
}

/// An object schema that keeps every field (the seccomp profile is validated by
/// tether, not by the API server).
fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The CRDs, as `(file name under deploy/base/crds, YAML)`, in a stable order.
///
/// Fails only if serialization fails, which the derived types never do.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_json::Error> {
    let header = "# Generated by `tether crds --out deploy/base/crds` from profile-store/src/crd.rs.\n# Do not edit: a test regenerates it and fails when it differs.\n";
    let yaml = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        // JSON is YAML: kubectl and kustomize read it, and it needs no YAML writer.
        serde_json::to_string_pretty(&crd).map(|json| format!("{header}{json}\n"))
    };
    Ok(vec![
        ("workloadprofiles.yaml", yaml(WorkloadProfile::crd())?),
        ("profileinstallations.yaml", yaml(ProfileInstallation::crd())?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn crds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/crds")
    }

    /// deploy/ is generated from these types; this fails when they drift apart.
    /// `cargo run -- crds --out deploy/base/crds` rewrites the files.
    #[test]
    fn deploy_crds_match_the_rust_types() {
        for (name, want) in crd_files().unwrap() {
            let path = crds_dir().join(name);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} differs from the CRD generated from profile-store/src/crd.rs; run `cargo run -- crds --out deploy/base/crds`",
                path.display()
            );
        }
    }

    #[test]
    fn a_workload_profile_round_trips_through_the_api_shape() {
        let wp = WorkloadProfile::new(
            "deployment.checkout.app",
            WorkloadProfileSpec {
                workload: WorkloadRef {
                    kind: "deployment".into(),
                    name: "checkout".into(),
                    container: "app".into(),
                },
                baseline: BaselineSummary::default(),
                versions: vec![],
                active_version: None,
                approvals: vec![],
            },
        );
        let json = serde_json::to_value(&wp).unwrap();
        assert_eq!(json["apiVersion"], "tether.dev/v1alpha1");
        assert_eq!(json["kind"], "WorkloadProfile");
        assert_eq!(json["spec"]["workload"]["container"], "app");
        let back: WorkloadProfile = serde_json::from_value(json).unwrap();
        assert_eq!(back.spec, wp.spec);
    }

    fn version(v: &str, status: VersionState) -> ProfileVersion {
        ProfileVersion {
            version: v.into(),
            created: "2026-11-30T00:00:00Z".into(),
            runtime: "runc@1.1".into(),
            arch: "x86_64".into(),
            status,
            needs_review: vec![],
            profile: serde_json::json!({}),
        }
    }

    /// Versions a (validated), b (validated), c (draft), newest last: the pinned
    /// one, else the newest, Draft or not (the FsStore's rule).
    #[rstest::rstest]
    #[case::newest_even_a_draft(&["00000000000a", "00000000000b", "00000000000c"], None, Some("00000000000c"))]
    #[case::pinned(&["00000000000a", "00000000000b", "00000000000c"], Some("00000000000a"), Some("00000000000a"))]
    #[case::pinned_but_pruned(&["00000000000a", "00000000000b", "00000000000c"], Some("00000000000f"), None)]
    #[case::no_versions(&[], None, None)]
    fn the_active_version_is_the_pinned_else_the_newest(
        #[case] versions: &[&str],
        #[case] pinned: Option<&str>,
        #[case] want: Option<&str>,
    ) {
        let states = [VersionState::Validated, VersionState::Validated, VersionState::Draft];
        let spec = WorkloadProfileSpec {
            workload: WorkloadRef {
                kind: "deployment".into(),
                name: "api".into(),
                container: "app".into(),
            },
            baseline: BaselineSummary::default(),
            versions: versions.iter().zip(states).map(|(v, s)| version(v, s)).collect(),
            active_version: pinned.map(str::to_string),
            approvals: vec![],
        };
        assert_eq!(spec.active().map(|v| v.version.as_str()), want);
        assert_eq!(spec.active_position().map(|i| spec.versions[i].version.as_str()), want);
    }

    #[test]
    fn an_inline_profile_is_verified_against_its_version() {
        let profile: crate::SeccompProfile = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap();
        let mut v = version(profile.version().as_str(), VersionState::Draft);
        v.profile = serde_json::to_value(&profile).unwrap();
        let mut wp = WorkloadProfile::new(
            "deployment.api.app",
            WorkloadProfileSpec {
                workload: WorkloadRef {
                    kind: "Deployment".into(),
                    name: "api".into(),
                    container: "app".into(),
                },
                baseline: BaselineSummary::default(),
                versions: vec![v.clone()],
                active_version: None,
                approvals: vec![],
            },
        );
        wp.metadata.namespace = Some("prod".into());
        assert_eq!(wp.key().unwrap().to_string(), "prod/deployment/api/app");
        assert_eq!(WorkloadProfile::object_name(&wp.key().unwrap()), "deployment.api.app");
        assert_eq!(wp.profile_of(&v).unwrap(), profile);
        v.profile["syscalls"][0]["names"] = serde_json::json!(["read", "ptrace"]);
        let err = wp.profile_of(&v).unwrap_err().to_string();
        assert!(
            err.contains("prod/deployment.api.app") && err.contains("altered"),
            "{err}"
        );
        v.profile = serde_json::json!({"defaultAction": 3});
        assert!(matches!(wp.profile_of(&v), Err(CrdError::Profile { .. })));
    }
}
