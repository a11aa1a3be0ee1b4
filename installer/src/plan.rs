//! The pure planning core: which files a node should hold ([`desired`]), which
//! files the pods on the node reference ([`referenced_by`]), and which files may
//! be removed, after how long ([`Gc`]). No I/O here.

use k8s_openapi::api::core::v1::{Pod, SeccompProfile};
use profile_store::crd::{CrdError, WorkloadProfile};
use profile_store::store::{NodeFile, node_files};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// What the plan keeps of each workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// How many of the newest versions are kept besides the active one: a pod
    /// admitted a moment before a new version became active still starts, and a
    /// rollback (`tether profiles activate OLD`) finds its file in place.
    pub keep_recent: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { keep_recent: 3 }
    }
}

/// The files a node should hold.
#[derive(Debug, Default)]
pub struct Desired {
    /// By `localhostProfile`.
    pub files: BTreeMap<String, NodeFile>,
    /// Objects or versions that could not be planned (an invalid key, a profile
    /// that does not hash to its version); their files are not written, and the
    /// installer reports them.
    pub problems: Vec<CrdError>,
}

/// The files for `profiles`: for each workload its active version and its
/// `keep_recent` newest versions, each with its Log-mode variant.
pub fn desired<'a>(profiles: impl IntoIterator<Item = &'a WorkloadProfile>, opts: PlanOptions) -> Desired {
    let mut out = Desired::default();
    for wp in profiles {
        let key = match wp.key() {
            Ok(k) => k,
            Err(e) => {
                out.problems.push(e);
                continue;
            }
        };
        let versions = &wp.spec.versions;
        let recent = versions.iter().skip(versions.len().saturating_sub(opts.keep_recent));
        // The active version may be among the recent ones: the map keeps one copy.
        for version in wp.spec.active().into_iter().chain(recent) {
            match wp.profile_of(version) {
                Ok(profile) => {
                    for file in node_files(&key, &profile) {
                        out.files.insert(file.localhost_profile.clone(), file);
                    }
                }
                Err(e) => out.problems.push(e),
            }
        }
    }
    out
}

/// The `localhostProfile`s under `tether/` that `pod` references (pod level and
/// every container, init and ephemeral ones included). A pod that finished
/// (`Succeeded`, `Failed`) starts no container again and references nothing.
pub fn referenced_by(pod: &Pod) -> impl Iterator<Item = &str> {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let spec = pod.spec.as_ref().filter(|_| !finished);
    let pod_level = spec
        .and_then(|s| s.security_context.as_ref())
        .and_then(|c| c.seccomp_profile.as_ref());
    let containers = spec.into_iter().flat_map(|s| {
        let main = s.containers.iter().map(|c| c.security_context.as_ref());
        let init = s.init_containers.iter().flatten().map(|c| c.security_context.as_ref());
        let ephemeral = s
            .ephemeral_containers
            .iter()
            .flatten()
            .map(|c| c.security_context.as_ref());
        main.chain(init).chain(ephemeral)
    });
    pod_level
        .into_iter()
        .chain(containers.flatten().filter_map(|c| c.seccomp_profile.as_ref()))
        .filter_map(localhost)
        .filter(|p| p.starts_with("tether/"))
}

fn localhost(p: &SeccompProfile) -> Option<&str> {
    (p.type_ == "Localhost").then_some(p.localhost_profile.as_deref()?)
}

/// Decides which present files may be removed: those neither desired nor
/// referenced by a pod on the node, once they have been so for the grace period
/// without interruption. A file that becomes desired or referenced again starts
/// over. The grace period covers a pod that was admitted with a version but is
/// not yet visible in the node's pod watch.
#[derive(Debug)]
pub struct Gc {
    grace: Duration,
    /// When each unneeded file was first seen unneeded.
    unneeded_since: HashMap<String, Instant>,
}

impl Gc {
    /// A collector with the given grace period.
    pub fn new(grace: Duration) -> Gc {
        Gc {
            grace,
            unneeded_since: HashMap::new(),
        }
    }

    /// The files of `present` to remove now.
    pub fn plan(
        &mut self,
        present: &BTreeSet<String>,
        desired: &BTreeSet<String>,
        referenced: &BTreeSet<String>,
        now: Instant,
    ) -> Vec<String> {
        let unneeded: BTreeSet<&String> = present
            .iter()
            .filter(|p| !desired.contains(*p) && !referenced.contains(*p))
            .collect();
        self.unneeded_since.retain(|p, _| unneeded.contains(p));
        let mut remove = Vec::new();
        for path in unneeded {
            let since = *self.unneeded_since.entry(path.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= self.grace {
                remove.push(path.clone());
            }
        }
        remove
    }

    /// Forgets a removed file.
    pub fn removed(&mut self, path: &str) {
        self.unneeded_since.remove(path);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use profile_store::crd::{ProfileVersion, VersionState, WorkloadProfileSpec, WorkloadRef};
    use profile_store::store::localhost_profile;
    use profile_store::{SeccompProfile as Oci, WorkloadKey};
    use rstest::rstest;
    use serde_json::json;

    /// A profile allowing `calls` (shared with the run tests).
    pub(crate) fn profile(calls: &[&str]) -> Oci {
        serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": calls, "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap()
    }

    /// A version holding [`profile`]`(calls)`.
    pub(crate) fn version(calls: &[&str], status: VersionState) -> ProfileVersion {
        let p = profile(calls);
        ProfileVersion {
            version: p.version().to_string(),
            created: "2026-11-30T00:00:00Z".into(),
            runtime: "runc@1.1".into(),
            arch: "x86_64".into(),
            status,
            needs_review: vec![],
            profile: serde_json::to_value(&p).unwrap(),
        }
    }

    /// `ns/deployment/api/app`'s WorkloadProfile.
    pub(crate) fn wp(ns: &str, versions: Vec<ProfileVersion>, active: Option<&str>) -> WorkloadProfile {
        let mut wp = WorkloadProfile::new(
            "deployment.api.app",
            WorkloadProfileSpec {
                workload: WorkloadRef {
                    kind: "deployment".into(),
                    name: "api".into(),
                    container: "app".into(),
                },
                baseline: Default::default(),
                versions,
                active_version: active.map(str::to_string),
                approvals: vec![],
            },
        );
        wp.metadata.namespace = Some(ns.into());
        wp
    }

    fn paths_of(calls: &[&str]) -> [String; 2] {
        let key: WorkloadKey = "prod/deployment/api/app".parse().unwrap();
        let p = profile(calls);
        [
            localhost_profile(&key, &p.version()),
            localhost_profile(&key, &p.log_variant().version()),
        ]
    }

    /// Five versions, newest last; which are planned with `keep_recent` and a pin.
    #[rstest]
    #[case::newest_two(2, None, &[3, 4])]
    #[case::pinned_old_one_is_kept_too(2, Some(0), &[0, 3, 4])]
    #[case::pinned_within_recent(2, Some(4), &[3, 4])]
    #[case::only_the_active(0, None, &[4])]
    #[case::more_than_there_are(10, None, &[0, 1, 2, 3, 4])]
    fn plans_the_active_and_recent_versions_with_their_log_variants(
        #[case] keep_recent: usize,
        #[case] pinned: Option<usize>,
        #[case] want: &[usize],
    ) {
        let calls: Vec<Vec<&str>> = (0..5)
            .map(|i| ["read", "write", "open", "close", "stat"][..=i].to_vec())
            .collect();
        let versions: Vec<_> = calls.iter().map(|c| version(c, VersionState::Draft)).collect();
        let pin = pinned.map(|i| versions[i].version.clone());
        let obj = wp("prod", versions, pin.as_deref());
        let plan = desired([&obj], PlanOptions { keep_recent });
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        let want: BTreeSet<String> = want.iter().flat_map(|&i| paths_of(&calls[i])).collect();
        let got: BTreeSet<String> = plan.files.keys().cloned().collect();
        assert_eq!(got, want);
        for (path, file) in &plan.files {
            assert!(path.ends_with(&format!("-{}.json", file.version)));
            assert_eq!(profile_store::Version::of(&file.bytes), file.version);
        }
    }

    #[test]
    fn the_log_variant_file_holds_the_log_mode_profile() {
        let obj = wp("prod", vec![version(&["read"], VersionState::Validated)], None);
        let plan = desired([&obj], PlanOptions { keep_recent: 0 });
        let [_, log] = paths_of(&["read"]);
        let file = &plan.files[&log];
        let parsed: Oci = serde_json::from_slice(&file.bytes).unwrap();
        assert_eq!(parsed.default_action, "SCMP_ACT_LOG");
    }

    #[test]
    fn an_altered_profile_and_an_invalid_key_are_problems_not_files() {
        let mut altered = version(&["read"], VersionState::Draft);
        altered.profile["syscalls"][0]["names"] = json!(["read", "ptrace"]);
        let good = version(&["write"], VersionState::Draft);
        let obj = wp("prod", vec![altered, good], None);
        let mut bad_key = wp("prod", vec![version(&["read"], VersionState::Draft)], None);
        bad_key.spec.workload.name = "../etc".into();
        let plan = desired([&obj, &bad_key], PlanOptions { keep_recent: 5 });
        assert_eq!(plan.files.len(), 2, "only the intact version and its variant");
        assert!(plan.files.contains_key(&paths_of(&["write"])[0]));
        assert_eq!(plan.problems.len(), 2);
        let text: Vec<String> = plan.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text[0].contains("prod/deployment.api.app") && text[0].contains("altered"),
            "{}",
            text[0]
        );
        assert!(matches!(plan.problems[1], CrdError::Key { .. }));
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn pods_reference_tether_files_at_pod_and_container_level() {
        let p = pod(json!({
            "metadata": {"name": "p", "namespace": "prod"},
            "spec": {
                "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "tether/prod/pod/p/x-000000000001.json"}},
                "initContainers": [{"name": "i", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "tether/prod/pod/p/i-000000000002.json"}}}],
                "containers": [
                    {"name": "a", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "tether/prod/pod/p/a-000000000003.json"}}},
                    {"name": "b", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "other/b.json"}}},
                    {"name": "c", "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}},
                    {"name": "d"}
                ]
            },
            "status": {"phase": "Running"}
        }));
        let got: BTreeSet<&str> = referenced_by(&p).collect();
        assert_eq!(
            got,
            BTreeSet::from([
                "tether/prod/pod/p/x-000000000001.json",
                "tether/prod/pod/p/i-000000000002.json",
                "tether/prod/pod/p/a-000000000003.json",
            ])
        );
        let mut done = p.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(referenced_by(&done).count(), 0);
    }

    #[test]
    fn gc_removes_only_after_the_grace_period_and_only_unneeded_files() {
        let grace = Duration::from_secs(60);
        let mut gc = Gc::new(grace);
        let set = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let present = set(&["a", "b", "c", "d"]);
        let desired = set(&["a"]);
        let t0 = Instant::now();
        let referenced = set(&["b"]);
        assert!(
            gc.plan(&present, &desired, &referenced, t0).is_empty(),
            "nothing before the grace period"
        );
        assert!(gc.plan(&present, &desired, &referenced, t0 + grace / 2).is_empty());
        // d is referenced again for a moment: its clock starts over.
        assert!(
            gc.plan(&present, &desired, &set(&["b", "d"]), t0 + grace / 2)
                .is_empty()
        );
        assert_eq!(gc.plan(&present, &desired, &referenced, t0 + grace), ["c"]);
        assert!(gc.plan(&present, &desired, &referenced, t0 + grace + grace / 4).len() == 1);
        gc.removed("c");
        let present = set(&["a", "b", "d"]);
        assert_eq!(gc.plan(&present, &desired, &referenced, t0 + grace * 2), ["d"]);
    }
}
