//! Admission decisions as pure functions of the pod, the namespace's policy and the
//! index: what to inject into each container ([`decide`]), and which escapes to
//! refuse ([`validate`]). No I/O here.

use crate::index::{Entry, Lookup};
use crate::policy::{Mode, NamespaceView, OnMissing, names};
use crate::slim::{ContainerView, PodView, ProfileView, Str};
use k8s_openapi::api::core::v1::SeccompProfile;
use profile_store::key::{AdmittedPod, key_at_admission};
use profile_store::store::{localhost_profile, parse_localhost_profile};
use profile_store::{Version, WorkloadKey};
use std::collections::BTreeSet;

/// What happens to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set `Localhost` to the workload's active version.
    Inject {
        /// The version.
        version: Version,
        /// The `localhostProfile`.
        path: String,
    },
    /// The workload is in fallback.
    Fallback {
        /// Why.
        reason: String,
        /// What to set instead of the profile.
        profile: FallbackProfile,
    },
    /// No profile: `RuntimeDefault` (`--on-missing runtime-default`).
    RuntimeDefault,
    /// No profile: left alone (`--on-missing skip`).
    NoProfile,
    /// The pod's author set a profile on the container; it is never weakened.
    KeepExplicit {
        /// The type the author set.
        kind: String,
    },
    /// An honored exemption covers the container.
    Exempt,
    /// No workload key could be derived (should not happen for valid pods).
    NoKey {
        /// Why.
        reason: String,
    },
}

/// What a workload in fallback runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackProfile {
    /// No filter at all.
    Unconfined,
    /// The Log-mode variant of its profile: where Pod Security forbids Unconfined.
    Log {
        /// The variant's version.
        version: Version,
        /// Its `localhostProfile`.
        path: String,
    },
    /// Where Pod Security forbids Unconfined and there is no profile to log with.
    RuntimeDefault,
}

/// The decision for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDecision {
    /// The container's name.
    pub name: String,
    /// Whether it is an init container.
    pub init: bool,
    /// Its index in `containers` or `initContainers`.
    pub index: usize,
    /// Its workload key.
    pub key: Option<WorkloadKey>,
    /// What happens to it.
    pub action: Action,
}

/// What the pod asks to be exempted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exemption {
    /// No exemption annotation.
    None,
    /// Exempted, the namespace allowing it.
    Honored {
        /// The reason given (`tether.dev/exempt`), or the containers listed.
        reason: String,
        /// The containers it covers.
        containers: BTreeSet<String>,
    },
    /// Asked for, but not allowed (the namespace does not allow it, or it names
    /// containers it may not).
    Refused {
        /// Why, and how to get it authorized.
        message: String,
    },
}

/// The decision for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The namespace's mode.
    pub mode: Mode,
    /// Per container, init containers first.
    pub containers: Vec<ContainerDecision>,
    /// The exemption state.
    pub exemption: Exemption,
    /// Things the pod's author should know.
    pub warnings: Vec<String>,
}

impl Decision {
    /// The containers that get a profile set, with the profile.
    pub fn changes(&self) -> impl Iterator<Item = (&ContainerDecision, SeccompProfile)> {
        self.containers.iter().filter_map(|c| {
            let localhost = |path: &str| SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(path.to_string()),
            };
            let simple = |t: &str| SeccompProfile {
                type_: t.into(),
                localhost_profile: None,
            };
            let profile = match &c.action {
                Action::Inject { path, .. } => localhost(path),
                Action::Fallback { profile, .. } => match profile {
                    FallbackProfile::Unconfined => simple("Unconfined"),
                    FallbackProfile::Log { path, .. } => localhost(path),
                    FallbackProfile::RuntimeDefault => simple("RuntimeDefault"),
                },
                Action::RuntimeDefault => simple("RuntimeDefault"),
                _ => return None,
            };
            Some((c, profile))
        })
    }
}

/// The controller ownerReference of a pod: (kind, name).
fn controller<'p>(pod: &'p PodView<'_>) -> Option<(&'p str, &'p str)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.name.as_str()))
}

/// The key of `container` in `pod` (namespace from the request when the object
/// has none, as for pods created with generateName).
pub fn container_key(pod: &PodView<'_>, namespace: &str, container: &str) -> Result<WorkloadKey, String> {
    let labels = pod.metadata.labels.as_ref();
    key_at_admission(
        AdmittedPod {
            namespace,
            name: pod.metadata.name.as_deref(),
            generate_name: pod.metadata.generate_name.as_deref(),
            controller: controller(pod),
        },
        |k| labels.and_then(|l| l.get(k)).map(Str::as_str),
        container,
    )
    .map_err(|e| e.to_string())
}

fn annotation<'p>(pod: &'p PodView<'_>, key: &str) -> Option<&'p str> {
    pod.metadata.annotations.as_ref()?.get(key).map(Str::as_str)
}

/// Init containers then containers, with (init, index). Ephemeral containers are
/// never injected.
fn all_containers<'p, 'a>(pod: &'p PodView<'a>) -> impl Iterator<Item = (bool, usize, &'p ContainerView<'a>)> {
    let spec = pod.spec.as_ref();
    let init = spec.and_then(|s| s.init_containers.as_ref()).into_iter().flatten();
    let main = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    init.enumerate()
        .map(|(i, c)| (true, i, c))
        .chain(main.iter().enumerate().map(|(i, c)| (false, i, c)))
}

fn explicit_profile<'p, 'a>(c: &'p ContainerView<'a>) -> Option<&'p ProfileView<'a>> {
    c.security_context.as_ref()?.seccomp_profile.as_ref()
}

/// Reads the exemption annotations against the namespace's permission.
fn exemption(pod: &PodView<'_>, namespace: &str, ns: &NamespaceView) -> Exemption {
    let whole = annotation(pod, names::EXEMPT);
    let listed = annotation(pod, names::EXEMPT_CONTAINERS);
    if whole.is_none() && listed.is_none() {
        return Exemption::None;
    }
    if !ns.allow_exemptions {
        return Exemption::Refused {
            message: format!(
                "namespace {namespace} does not allow seccomp exemptions ({} or {}); its owner can allow them with `kubectl label namespace {namespace} {}=true`, or a tether operator can add it to exemptionNamespaces",
                names::EXEMPT,
                names::EXEMPT_CONTAINERS,
                names::ALLOW_EXEMPTIONS
            ),
        };
    }
    let regular: BTreeSet<&str> = all_containers(pod)
        .filter(|(init, _, _)| !init)
        .map(|(_, _, c)| c.name.as_str())
        .collect();
    if let Some(reason) = whole {
        let containers = all_containers(pod).map(|(_, _, c)| c.name.to_string()).collect();
        let reason = if reason.trim().is_empty() {
            "no reason given".to_string()
        } else {
            reason.to_string()
        };
        return Exemption::Honored { reason, containers };
    }
    let names_listed: BTreeSet<String> = listed
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = names_listed.iter().find(|n| !regular.contains(n.as_str())) {
        return Exemption::Refused {
            message: format!(
                "{} names `{bad}`, which is not a regular container of this pod (init containers cannot be exempted one by one; exempt the pod with {})",
                names::EXEMPT_CONTAINERS,
                names::EXEMPT
            ),
        };
    }
    if names_listed.is_empty() {
        return Exemption::Refused {
            message: format!("{} lists no container", names::EXEMPT_CONTAINERS),
        };
    }
    Exemption::Honored {
        reason: format!(
            "containers {}",
            names_listed.iter().cloned().collect::<Vec<_>>().join(",")
        ),
        containers: names_listed,
    }
}

/// Decides what `/mutate` does with a pod being created in `namespace`.
pub fn decide(
    pod: &PodView<'_>,
    namespace: &str,
    ns: &NamespaceView,
    on_missing: OnMissing,
    lookup: &dyn Lookup,
) -> Decision {
    let mut warnings: Vec<String> = ns.label_problem.iter().cloned().collect();
    let exemption = exemption(pod, namespace, ns);
    if let Exemption::Refused { message } = &exemption {
        warnings.push(format!("exemption ignored: {message}"));
    }
    let exempt: BTreeSet<String> = match &exemption {
        Exemption::Honored { containers, .. } => containers.clone(),
        _ => BTreeSet::new(),
    };
    let mut containers = Vec::new();
    for (init, index, c) in all_containers(pod) {
        let key = container_key(pod, namespace, &c.name);
        let action = if exempt.contains(c.name.as_str()) {
            Action::Exempt
        } else if let Some(p) = explicit_profile(c) {
            Action::KeepExplicit {
                kind: p.type_.to_string(),
            }
        } else {
            match &key {
                Err(reason) => Action::NoKey { reason: reason.clone() },
                Ok(key) => match lookup.entry(key) {
                    Some(entry) if entry.fallback.is_some() => {
                        let reason = entry.fallback.clone().unwrap_or_default();
                        let profile = match (&entry.log_variant, ns.psa_forbids_unconfined) {
                            (_, false) => FallbackProfile::Unconfined,
                            (Some(v), true) => FallbackProfile::Log {
                                path: localhost_profile(key, v),
                                version: v.clone(),
                            },
                            (None, true) => FallbackProfile::RuntimeDefault,
                        };
                        Action::Fallback { reason, profile }
                    }
                    Some(Entry {
                        active: Some(version), ..
                    }) => Action::Inject {
                        path: localhost_profile(key, version),
                        version: version.clone(),
                    },
                    _ => match on_missing {
                        OnMissing::Skip => Action::NoProfile,
                        OnMissing::RuntimeDefault => Action::RuntimeDefault,
                    },
                },
            }
        };
        containers.push(ContainerDecision {
            name: c.name.to_string(),
            init,
            index,
            key: key.ok(),
            action,
        });
    }
    Decision {
        mode: ns.mode,
        containers,
        exemption,
        warnings,
    }
}

/// Refusals `/validate` answers a pod with (empty: allowed).
pub fn validate(pod: &PodView<'_>, namespace: &str, ns: &NamespaceView, lookup: &dyn Lookup) -> Vec<String> {
    let mut problems = Vec::new();
    let exemption = exemption(pod, namespace, ns);
    let exempt: BTreeSet<String> = match &exemption {
        Exemption::Honored { containers, .. } => containers.clone(),
        Exemption::Refused { message } => {
            problems.push(message.clone());
            BTreeSet::new()
        }
        Exemption::None => BTreeSet::new(),
    };
    let pod_profile = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|sc| sc.seccomp_profile.as_ref());
    for (_, _, c) in all_containers(pod) {
        let key = container_key(pod, namespace, &c.name);
        let Some(profile) = explicit_profile(c).or(pod_profile) else {
            continue;
        };
        let in_fallback = key
            .as_ref()
            .ok()
            .and_then(|k| lookup.entry(k))
            .is_some_and(|e| e.fallback.is_some());
        match profile.type_.as_str() {
            "Unconfined" if !exempt.contains(c.name.as_str()) && !in_fallback => problems.push(format!(
                "container {} runs Unconfined without an honored exemption or a fallback; remove the seccompProfile, or ask for an exemption ({})",
                c.name,
                names::EXEMPT
            )),
            "Localhost" => {
                let path = profile.localhost_profile.as_deref().unwrap_or_default();
                if let Some(problem) = check_localhost(path, &c.name, key.as_ref().ok(), lookup) {
                    problems.push(problem);
                }
            }
            _ => {}
        }
    }
    problems
}

/// A `Localhost` profile under `tether/` must be a known version of this
/// container's own workload.
fn check_localhost(path: &str, container: &str, own: Option<&WorkloadKey>, lookup: &dyn Lookup) -> Option<String> {
    if path.starts_with('/') || path.split('/').any(|c| c == "..") || path.contains('\0') {
        return Some(format!(
            "container {container}: localhostProfile {path:?} is absolute or climbs with `..`; a Localhost profile is a relative path under the kubelet's seccomp directory"
        ));
    }
    // The kubelet cleans the path before opening it (`./tether/x` and
    // `tether//x` open `tether/x`): judge the file it will open, so another
    // spelling cannot reach another workload's profile unchecked.
    let opened = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/");
    if !format!("{opened}/").starts_with(names::LOCALHOST_ROOT) {
        return None;
    }
    if opened != path {
        return Some(format!(
            "container {container}: localhostProfile {path} opens {opened}, under tether/; tether's profiles are referenced only as tether sets them (tether/<namespace>/<kind>/<name>/<container>-<version>.json)"
        ));
    }
    let Some((key, version)) = parse_localhost_profile(path) else {
        return Some(format!(
            "container {container}: localhostProfile {path} is under tether/ but is not a tether profile path"
        ));
    };
    if Some(&key) != own {
        return Some(format!(
            "container {container}: localhostProfile {path} belongs to workload {key}, not to this container{}",
            own.map(|k| format!(" ({k})")).unwrap_or_default()
        ));
    }
    match lookup.entry(&key) {
        Some(e) if e.known.contains(&version) => None,
        _ => Some(format!(
            "container {container}: localhostProfile {path} is not a version tether knows for {key}; `tether profiles list` shows the versions"
        )),
    }
}
