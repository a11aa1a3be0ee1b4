//! `WorkloadKey`: which baseline an observation or a pod belongs to, and how it is
//! derived from a pod at admission and from a Tetragon event, so that the same
//! running pod resolves to the same key both ways.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Identifies a baseline: `namespace/kind/name/container`, kind in lower case
/// (`default/deployment/xwing/spaceship`).
///
/// Every component is validated on construction (DNS-1123 shapes, so no `/`, no
/// `..`), which makes a key safe to use as a relative path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    namespace: String,
    kind: String,
    name: String,
    container: String,
}

/// Why a string is not a valid workload key or key component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text does not have the four `/`-separated parts.
    #[error(
        "`{input}` is not a workload key: write namespace/kind/name/container, e.g. default/deployment/xwing/spaceship"
    )]
    Shape {
        /// The text given.
        input: String,
    },
    /// One component breaks the naming rules.
    #[error("workload key {part} `{value}` is invalid: {reason}")]
    Component {
        /// Which component (`namespace`, `kind`, `name`, `container`).
        part: &'static str,
        /// The offending value.
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
}

fn is_label(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("it is empty");
    }
    if v.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and `-` are allowed (DNS-1123 label)");
    }
    if v.starts_with('-') || v.ends_with('-') {
        return Err("it must start and end with a letter or digit (DNS-1123 label)");
    }
    Ok(())
}

fn is_subdomain(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("it is empty");
    }
    if v.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in v.split('.') {
        if label.is_empty() {
            return Err("it has an empty part between dots (DNS-1123 subdomain)");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only lower-case letters, digits, `-` and `.` are allowed (DNS-1123 subdomain)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("each part must start and end with a letter or digit (DNS-1123 subdomain)");
        }
    }
    Ok(())
}

fn check(part: &'static str, value: &str, rule: fn(&str) -> Result<(), &'static str>) -> Result<(), KeyError> {
    rule(value).map_err(|reason| KeyError::Component {
        part,
        value: value.to_string(),
        reason,
    })
}

impl WorkloadKey {
    /// Builds a key, lower-casing `kind` (`Deployment` -> `deployment`) and validating
    /// every component: namespace and container are DNS-1123 labels, name a DNS-1123
    /// subdomain, kind letters and digits.
    pub fn new(namespace: &str, kind: &str, name: &str, container: &str) -> Result<Self, KeyError> {
        let kind = kind.to_ascii_lowercase();
        check("namespace", namespace, is_label)?;
        check("kind", &kind, |k| {
            if k.is_empty() || k.len() > 63 || !k.bytes().all(|b| b.is_ascii_alphanumeric()) {
                Err("a kind is letters and digits, e.g. deployment")
            } else {
                Ok(())
            }
        })?;
        check("name", name, is_subdomain)?;
        check("container", container, is_label)?;
        Ok(WorkloadKey {
            namespace: namespace.to_string(),
            kind,
            name: name.to_string(),
            container: container.to_string(),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The workload kind, lower case (`deployment`, `statefulset`, `pod`, ...).
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The workload's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The container name.
    pub fn container(&self) -> &str {
        &self.container
    }

    /// The key as a relative path `namespace/kind/name/container`; safe because every
    /// component was validated.
    pub fn rel_path(&self) -> PathBuf {
        [&self.namespace, &self.kind, &self.name, &self.container]
            .iter()
            .collect()
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", self.namespace, self.kind, self.name, self.container)
    }
}

impl FromStr for WorkloadKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [ns, kind, name, container] => WorkloadKey::new(ns, kind, name, container),
            _ => Err(KeyError::Shape { input: s.to_string() }),
        }
    }
}

impl Serialize for WorkloadKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WorkloadKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Labels that Kubernetes controllers put on the pods they create and that tell
/// which workload a pod belongs to.
pub mod labels {
    /// Set by the Deployment controller on a ReplicaSet's pods.
    pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
    /// Set by the StatefulSet controller: the pod's own name.
    pub const STATEFULSET_POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
    /// Set by the StatefulSet controller (Kubernetes >= 1.28): the pod's ordinal.
    pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";
    /// Set by the DaemonSet controller.
    pub const POD_TEMPLATE_GENERATION: &str = "pod-template-generation";
    /// Set by the Job controller: the Job's name.
    pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";
    /// The older spelling of [`JOB_NAME`].
    pub const JOB_NAME_LEGACY: &str = "job-name";
}

/// The CronJob part of a Job name `<cronjob>-<8 to 10 digits>` (the scheduled time
/// suffix the CronJob controller appends), as Tetragon's heuristic and the admission
/// side both use it.
pub fn cronjob_of(job_name: &str) -> Option<&str> {
    let (prefix, digits) = job_name.rsplit_once('-')?;
    let ok = (8..=10).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    (ok && !prefix.is_empty()).then_some(prefix)
}

/// `name` without a trailing `-<ordinal>`, when it has one.
fn strip_ordinal(name: &str) -> Option<&str> {
    let (prefix, ordinal) = name.rsplit_once('-')?;
    (!ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()) && !prefix.is_empty()).then_some(prefix)
}

/// A pod's identity as the API server shows it at admission.
#[derive(Debug, Clone, Copy)]
pub struct AdmittedPod<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// `metadata.name`; absent for controller-created pods at admission.
    pub name: Option<&'a str>,
    /// `metadata.generateName`.
    pub generate_name: Option<&'a str>,
    /// Kind and name of the ownerReference with `controller: true`.
    pub controller: Option<(&'a str, &'a str)>,
}

/// Derives the key of `container` in a pod being admitted, from its controller
/// ownerReference: ReplicaSet -> Deployment (when the ReplicaSet's name ends in
/// `-<pod-template-hash>`), Job -> CronJob (by the scheduled-time suffix),
/// StatefulSet, DaemonSet and other controllers keep their kind; a bare pod is kind
/// `Pod`, named by `name` or else `generateName` without its trailing `-`.
pub fn key_at_admission<'a>(
    pod: AdmittedPod<'a>,
    label: impl Fn(&str) -> Option<&'a str>,
    container: &str,
) -> Result<WorkloadKey, KeyError> {
    let (kind, name) = match pod.controller {
        Some(("ReplicaSet", rs)) => {
            deployment_of(rs, label(labels::POD_TEMPLATE_HASH)).map_or(("ReplicaSet", rs), |d| ("Deployment", d))
        }
        Some(("Job", job)) => cronjob_of(job).map_or(("Job", job), |c| ("CronJob", c)),
        Some((kind, name)) => (kind, name),
        None => {
            let name = pod
                .name
                .filter(|n| !n.is_empty())
                .or_else(|| pod.generate_name.map(|g| g.trim_end_matches('-')))
                .unwrap_or_default();
            ("Pod", name)
        }
    };
    WorkloadKey::new(pod.namespace, kind, name, container)
}

fn deployment_of<'a>(replicaset: &'a str, hash: Option<&str>) -> Option<&'a str> {
    let hash = hash.filter(|h| !h.is_empty())?;
    replicaset
        .strip_suffix(hash)?
        .strip_suffix('-')
        .filter(|d| !d.is_empty())
}

/// A pod's identity as a Tetragon event shows it (`process.pod`).
#[derive(Debug, Clone, Copy)]
pub struct ObservedPod<'a> {
    /// `pod.namespace`.
    pub namespace: &'a str,
    /// `pod.name`: the pod's real (generated) name.
    pub name: &'a str,
    /// `pod.workload` (absent on older Tetragon).
    pub workload: Option<&'a str>,
    /// `pod.workload_kind` (absent on older Tetragon).
    pub workload_kind: Option<&'a str>,
}

/// Derives the key of `container` in a pod that Tetragon observed, normalizing
/// Tetragon's workload heuristic to match [`key_at_admission`]:
/// - kind `Pod` for a StatefulSet pod (Tetragon reports pods without
///   `generateName` that way) maps back to the StatefulSet when the pod carries the
///   StatefulSet labels and is named `<sts>-<ordinal>`;
/// - without `workload`/`workload_kind` (older Tetragon), the controller labels
///   decide: `pod-template-hash` (Deployment), `job-name` (Job, CronJob),
///   `pod-template-generation` (DaemonSet), StatefulSet labels; otherwise the pod.
pub fn key_from_observation<'a>(
    pod: ObservedPod<'a>,
    label: impl Fn(&str) -> Option<&'a str>,
    container: &str,
) -> Result<WorkloadKey, KeyError> {
    let reported = match (pod.workload_kind, pod.workload) {
        (Some(k), Some(w)) if !k.is_empty() && !w.is_empty() => Some((k, w)),
        _ => None,
    };
    let (kind, name) = match reported {
        Some((k, w)) if k.eq_ignore_ascii_case("Pod") => statefulset_of(pod.name, &label).unwrap_or(("Pod", w)),
        Some((k, w)) if k.eq_ignore_ascii_case("ReplicaSet") => {
            deployment_of(w, label(labels::POD_TEMPLATE_HASH)).map_or((k, w), |d| ("Deployment", d))
        }
        Some((k, w)) if k.eq_ignore_ascii_case("Job") => cronjob_of(w).map_or((k, w), |c| ("CronJob", c)),
        Some(kw) => kw,
        None => infer_from_labels(pod.name, &label),
    };
    WorkloadKey::new(pod.namespace, kind, name, container)
}

fn statefulset_of<'a>(pod_name: &'a str, label: &impl Fn(&str) -> Option<&'a str>) -> Option<(&'static str, &'a str)> {
    let named = label(labels::STATEFULSET_POD_NAME) == Some(pod_name);
    let indexed = label(labels::POD_INDEX).is_some_and(|i| pod_name.ends_with(&format!("-{i}")));
    if named || indexed {
        strip_ordinal(pod_name).map(|s| ("StatefulSet", s))
    } else {
        None
    }
}

fn infer_from_labels<'a>(pod_name: &'a str, label: &impl Fn(&str) -> Option<&'a str>) -> (&'static str, &'a str) {
    if let Some(sts) = statefulset_of(pod_name, label) {
        return sts;
    }
    // Generated names are `<generateName><5 random chars>`; the controller's name is
    // what stays when that suffix is cut.
    let generated_stem = pod_name.rsplit_once('-').map(|(stem, _)| stem);
    if let Some(deploy) = generated_stem.and_then(|rs| deployment_of(rs, label(labels::POD_TEMPLATE_HASH))) {
        return ("Deployment", deploy);
    }
    if let Some(job) = label(labels::JOB_NAME).or_else(|| label(labels::JOB_NAME_LEGACY)) {
        return cronjob_of(job).map_or(("Job", job), |c| ("CronJob", c));
    }
    if let Some(ds) = generated_stem.filter(|_| label(labels::POD_TEMPLATE_GENERATION).is_some()) {
        return ("DaemonSet", ds);
    }
    ("Pod", pod_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::collections::BTreeMap;

    #[test]
    fn display_and_parse_round_trip_with_lower_case_kind() {
        let k = WorkloadKey::new("default", "Deployment", "xwing", "spaceship").unwrap();
        assert_eq!(k.to_string(), "default/deployment/xwing/spaceship");
        assert_eq!("default/deployment/xwing/spaceship".parse::<WorkloadKey>().unwrap(), k);
        assert_eq!(k.rel_path(), PathBuf::from("default/deployment/xwing/spaceship"));
    }

    #[rstest]
    #[case("default/deployment/xwing")]
    #[case("a/b/c/d/e")]
    #[case("default/deployment/../spaceship")]
    #[case("default/deployment/x/Spaceship")]
    #[case("default/deploy-ment/x/c")]
    #[case("/deployment/x/c")]
    #[case("default/deployment/x./c")]
    #[case("default/deployment/-x/c")]
    fn rejects_unsafe_or_malformed_keys(#[case] input: &str) {
        assert!(input.parse::<WorkloadKey>().is_err(), "{input} accepted");
    }

    #[test]
    fn error_names_the_component() {
        let err = "default/deployment/x/Bad_Name".parse::<WorkloadKey>().unwrap_err();
        assert!(err.to_string().contains("container `Bad_Name`"), "{err}");
    }

    #[test]
    fn cronjob_suffix_rule() {
        assert_eq!(cronjob_of("backup-29000000"), Some("backup"));
        assert_eq!(cronjob_of("backup-2900000012"), Some("backup"));
        assert_eq!(cronjob_of("backup-1234567"), None);
        assert_eq!(cronjob_of("backup-12345678901"), None);
        assert_eq!(cronjob_of("migrate"), None);
    }

    /// One running pod, as admission saw it and as Tetragon reports it.
    struct Case {
        admission_controller: Option<(&'static str, &'static str)>,
        generate_name: Option<&'static str>,
        admission_name: Option<&'static str>,
        running_name: &'static str,
        labels: &'static [(&'static str, &'static str)],
        /// What Tetragon >= 1.x reports as (workload_kind, workload).
        tetragon: (&'static str, &'static str),
        expect: &'static str,
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                admission_controller: Some(("ReplicaSet", "deathstar-6f87496b94")),
                generate_name: Some("deathstar-6f87496b94-"),
                admission_name: None,
                running_name: "deathstar-6f87496b94-qdlh8",
                labels: &[("pod-template-hash", "6f87496b94"), ("class", "deathstar")],
                tetragon: ("Deployment", "deathstar"),
                expect: "default/deployment/deathstar/c",
            },
            Case {
                admission_controller: Some(("ReplicaSet", "bare-rs")),
                generate_name: Some("bare-rs-"),
                admission_name: None,
                running_name: "bare-rs-x7k2p",
                labels: &[],
                tetragon: ("ReplicaSet", "bare-rs"),
                expect: "default/replicaset/bare-rs/c",
            },
            Case {
                admission_controller: Some(("StatefulSet", "ledger-db")),
                generate_name: None,
                admission_name: Some("ledger-db-0"),
                running_name: "ledger-db-0",
                labels: &[
                    ("statefulset.kubernetes.io/pod-name", "ledger-db-0"),
                    ("apps.kubernetes.io/pod-index", "0"),
                ],
                tetragon: ("Pod", "ledger-db-0"),
                expect: "default/statefulset/ledger-db/c",
            },
            Case {
                admission_controller: Some(("DaemonSet", "node-agent")),
                generate_name: Some("node-agent-"),
                admission_name: None,
                running_name: "node-agent-5xj2q",
                labels: &[("pod-template-generation", "3"), ("controller-revision-hash", "7d9f")],
                tetragon: ("DaemonSet", "node-agent"),
                expect: "default/daemonset/node-agent/c",
            },
            Case {
                admission_controller: Some(("Job", "migrate")),
                generate_name: Some("migrate-"),
                admission_name: None,
                running_name: "migrate-9qz4t",
                labels: &[("batch.kubernetes.io/job-name", "migrate"), ("job-name", "migrate")],
                tetragon: ("Job", "migrate"),
                expect: "default/job/migrate/c",
            },
            Case {
                admission_controller: Some(("Job", "backup-29000000")),
                generate_name: Some("backup-29000000-"),
                admission_name: None,
                running_name: "backup-29000000-abcde",
                labels: &[("batch.kubernetes.io/job-name", "backup-29000000")],
                tetragon: ("CronJob", "backup"),
                expect: "default/cronjob/backup/c",
            },
            Case {
                admission_controller: None,
                generate_name: None,
                admission_name: Some("tiefighter"),
                running_name: "tiefighter",
                labels: &[("class", "tiefighter")],
                tetragon: ("Pod", "tiefighter"),
                expect: "default/pod/tiefighter/c",
            },
        ]
    }

    fn lookup(labels: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<&'static str> {
        let map: BTreeMap<&str, &str> = labels.iter().copied().collect();
        move |k| map.get(k).copied()
    }

    #[test]
    fn same_pod_resolves_to_the_same_key_at_admission_and_from_tetragon() {
        for case in cases() {
            let admitted = key_at_admission(
                AdmittedPod {
                    namespace: "default",
                    name: case.admission_name,
                    generate_name: case.generate_name,
                    controller: case.admission_controller,
                },
                lookup(case.labels),
                "c",
            )
            .unwrap();
            let observed = key_from_observation(
                ObservedPod {
                    namespace: "default",
                    name: case.running_name,
                    workload_kind: Some(case.tetragon.0),
                    workload: Some(case.tetragon.1),
                },
                lookup(case.labels),
                "c",
            )
            .unwrap();
            // Older Tetragon leaves workload fields out: the labels must get us there too.
            let from_labels = key_from_observation(
                ObservedPod {
                    namespace: "default",
                    name: case.running_name,
                    workload_kind: None,
                    workload: None,
                },
                lookup(case.labels),
                "c",
            )
            .unwrap();
            assert_eq!(admitted.to_string(), case.expect, "admission");
            assert_eq!(observed.to_string(), case.expect, "tetragon {:?}", case.tetragon);
            if case.expect != "default/replicaset/bare-rs/c" {
                assert_eq!(from_labels.to_string(), case.expect, "labels only");
            }
        }
    }

    #[test]
    fn statefulset_pods_need_the_labels_to_map_back() {
        let plain = key_from_observation(
            ObservedPod {
                namespace: "ns",
                name: "web-0",
                workload_kind: Some("Pod"),
                workload: Some("web-0"),
            },
            |_| None,
            "c",
        )
        .unwrap();
        assert_eq!(plain.to_string(), "ns/pod/web-0/c");
    }

    #[test]
    fn bare_pod_with_generate_name_uses_the_stem_at_admission() {
        let k = key_at_admission(
            AdmittedPod {
                namespace: "ns",
                name: None,
                generate_name: Some("debug-"),
                controller: None,
            },
            |_| None,
            "c",
        )
        .unwrap();
        assert_eq!(k.to_string(), "ns/pod/debug/c");
    }
}
