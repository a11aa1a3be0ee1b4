//! Install gating: which version of a workload's profile a pod may reference,
//! given what the node installers report.
//!
//! A pod must never reference a file its node lacks: the kubelet would fail to
//! create the container. The scheduler can put the pod on any node, so a version
//! is injectable only when every ready installer reports its `localhostProfile`
//! installed. Pure functions; the Kubernetes-fed index calls them on every
//! rebuild, never per request.

use profile_store::crd::ProfileInstallation;
use profile_store::store::localhost_profile;
use profile_store::{Version, WorkloadKey};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When a version counts as installed (policy `installGate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallGate {
    /// Once every ready installer reports it (the default).
    #[default]
    AllReady,
    /// Always: the operator puts the files on the nodes themselves (the embedded
    /// store has no installer reports and behaves like this whatever the policy says).
    None,
}

impl InstallGate {
    /// The policy value.
    pub fn as_str(self) -> &'static str {
        match self {
            InstallGate::AllReady => "all-ready",
            InstallGate::None => "none",
        }
    }
}

impl fmt::Display for InstallGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstallGate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all-ready" => Ok(InstallGate::AllReady),
            "none" => Ok(InstallGate::None),
            _ => Err(format!("unknown install gate `{s}`: use all-ready or none")),
        }
    }
}

/// What may be injected, as the gate sees the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Gating is off: every version counts as installed.
    Ungated,
    /// The `localhostProfile`s every ready installer reports (empty when no
    /// installer is ready: then nothing is injectable).
    Everywhere(HashSet<String>),
}

impl Installed {
    /// Whether `path` may be referenced by a pod on any node.
    pub fn has(&self, path: &str) -> bool {
        match self {
            Installed::Ungated => true,
            Installed::Everywhere(set) => set.contains(path),
        }
    }
}

/// Whether an installer counts: it says it is ready and its heartbeat is at most
/// `staleness` old at `now`. A missing or unreadable heartbeat does not count (an
/// installer that stopped reporting may have stopped installing too).
pub fn is_ready(installation: &ProfileInstallation, now: jiff::Timestamp, staleness: Duration) -> bool {
    let Some(status) = &installation.status else {
        return false;
    };
    let Some(beat) = status
        .heartbeat
        .as_deref()
        .and_then(|h| h.parse::<jiff::Timestamp>().ok())
    else {
        return false;
    };
    let age = now.duration_since(beat);
    status.ready && age.as_secs_f64() <= staleness.as_secs_f64()
}

/// The `localhostProfile`s every one of `ready` reports installed (empty for no installer).
pub fn installed_everywhere<'a>(ready: impl IntoIterator<Item = &'a ProfileInstallation>) -> HashSet<String> {
    let mut lists: Vec<&[String]> = ready
        .into_iter()
        .map(|i| i.status.as_ref().map(|s| s.installed.as_slice()).unwrap_or_default())
        .collect();
    // Start from the shortest list: the intersection is never larger.
    lists.sort_by_key(|l| l.len());
    let Some((first, rest)) = lists.split_first() else {
        return HashSet::new();
    };
    let rest: Vec<HashSet<&str>> = rest.iter().map(|l| l.iter().map(String::as_str).collect()).collect();
    first
        .iter()
        .filter(|p| rest.iter().all(|set| set.contains(p.as_str())))
        .cloned()
        .collect()
}

/// The newest of `candidates` (oldest first, the active one last) whose file is
/// installed everywhere: the active one when it is, else the newest older one, else
/// none (the caller applies on-missing).
pub fn pick<'v>(key: &WorkloadKey, candidates: &'v [Version], installed: &Installed) -> Option<&'v Version> {
    candidates
        .iter()
        .rev()
        .find(|v| installed.has(&localhost_profile(key, v)))
}

/// What the gate lets a workload's pods reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gated {
    /// The version to inject.
    pub version: Option<Version>,
    /// The Log-mode variant to use as fallback where Pod Security forbids Unconfined.
    pub log_variant: Option<Version>,
    /// Whether the active version itself is held back (an older one or none is
    /// injected until the installers catch up).
    pub held_back: bool,
}

/// Gates one workload: `versions` are its versions oldest first with the version
/// of each one's Log-mode variant, `active` the position of the active one. The
/// profile and its Log-mode variant are gated separately: the installer writes
/// them as separate files.
pub fn gate(key: &WorkloadKey, versions: &[(Version, Version)], active: Option<usize>, installed: &Installed) -> Gated {
    let Some(active) = active.filter(|&a| a < versions.len()) else {
        return Gated {
            version: None,
            log_variant: None,
            held_back: false,
        };
    };
    let upto = &versions[..=active];
    let profiles: Vec<Version> = upto.iter().map(|(v, _)| v.clone()).collect();
    let variants: Vec<Version> = upto.iter().map(|(_, l)| l.clone()).collect();
    let version = pick(key, &profiles, installed).cloned();
    Gated {
        held_back: version.as_ref() != profiles.last(),
        log_variant: pick(key, &variants, installed).cloned(),
        version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profile_store::crd::{ProfileInstallationSpec, ProfileInstallationStatus};
    use rstest::rstest;

    fn key() -> WorkloadKey {
        "shop/deployment/api/app".parse().unwrap()
    }

    /// Versions `a..`: profile `aaaaaaaaaaa0`, Log-mode variant `aaaaaaaaaaa1`, ...
    fn versions(n: usize) -> Vec<(Version, Version)> {
        ["a", "b", "c", "d"][..n]
            .iter()
            .map(|c| (v(c, false), v(c, true)))
            .collect()
    }

    /// The localhostProfiles of the named files: `a` is version a's profile, `a~`
    /// its Log-mode variant.
    fn files(names: &[&str]) -> HashSet<String> {
        let all = versions(4);
        names
            .iter()
            .map(|n| {
                let (c, log) = n.strip_suffix('~').map(|c| (c, true)).unwrap_or((n, false));
                let i = (c.as_bytes()[0] - b'a') as usize;
                localhost_profile(&key(), if log { &all[i].1 } else { &all[i].0 })
            })
            .collect()
    }

    fn v(c: &str, log: bool) -> Version {
        format!("{}{}", c.repeat(11), if log { 1 } else { 0 }).parse().unwrap()
    }

    #[rstest]
    // The active version installed on every ready node is injected, with its variant.
    #[case::active_everywhere(3, Some(2), Some(&["a", "b", "c", "c~"][..]), Some("c"), Some("c"), false)]
    // Active missing somewhere: the newest older version installed everywhere.
    #[case::falls_back_to_previous(3, Some(2), Some(&["a", "b", "b~"][..]), Some("b"), Some("b"), true)]
    // Skips an older version that is not everywhere either.
    #[case::skips_missing_older(3, Some(2), Some(&["a", "a~"][..]), Some("a"), Some("a"), true)]
    // Nothing installed: nothing injectable (on-missing applies).
    #[case::nothing_installed(3, Some(2), Some(&[][..]), None, None, true)]
    // Profile and variant are gated separately.
    #[case::variant_of_older(3, Some(2), Some(&["a", "b", "c", "a~"][..]), Some("c"), Some("a"), false)]
    // A pinned older version: newer versions are never injected, even installed.
    #[case::pinned_older(3, Some(0), Some(&["a", "b", "c"][..]), Some("a"), None, false)]
    #[case::pinned_older_missing(3, Some(1), Some(&["a", "c"][..]), Some("a"), None, true)]
    // No active version (no versions, or a pin to a pruned one).
    #[case::no_active(3, None, Some(&["a", "b", "c"][..]), None, None, false)]
    #[case::no_versions(0, Some(0), None, None, None, false)]
    // Gating off: the active version and its variant, installed or not.
    #[case::ungated(3, Some(2), None, Some("c"), Some("c"), false)]
    fn the_gate_injects_the_newest_version_installed_everywhere(
        #[case] n: usize,
        #[case] active: Option<usize>,
        #[case] installed: Option<&[&str]>,
        #[case] want: Option<&str>,
        #[case] want_log: Option<&str>,
        #[case] held_back: bool,
    ) {
        let installed = match installed {
            Some(names) => Installed::Everywhere(files(names)),
            None => Installed::Ungated,
        };
        let got = gate(&key(), &versions(n), active, &installed);
        assert_eq!(got.version, want.map(|c| v(c, false)));
        assert_eq!(got.log_variant, want_log.map(|c| v(c, true)));
        assert_eq!(got.held_back, held_back);
    }

    fn installation(name: &str, ready: bool, heartbeat: Option<&str>, installed: &[&str]) -> ProfileInstallation {
        let mut i = ProfileInstallation::new(
            name,
            ProfileInstallationSpec {
                node_name: name.to_string(),
            },
        );
        i.status = Some(ProfileInstallationStatus {
            ready,
            heartbeat: heartbeat.map(str::to_string),
            installed: installed.iter().map(|s| s.to_string()).collect(),
        });
        i
    }

    const NOW: &str = "2026-11-30T12:00:00Z";

    #[rstest]
    #[case::fresh(true, Some("2026-11-30T11:59:00Z"), true)]
    #[case::exactly_at_the_limit(true, Some("2026-11-30T11:58:00Z"), true)]
    #[case::stale(true, Some("2026-11-30T11:57:59Z"), false)]
    #[case::not_ready(false, Some("2026-11-30T11:59:59Z"), false)]
    #[case::no_heartbeat(true, None, false)]
    #[case::unreadable_heartbeat(true, Some("yesterday"), false)]
    // A clock ahead of ours is not stale.
    #[case::from_the_future(true, Some("2026-11-30T12:00:30Z"), true)]
    fn an_installer_counts_when_ready_with_a_fresh_heartbeat(
        #[case] ready: bool,
        #[case] heartbeat: Option<&str>,
        #[case] want: bool,
    ) {
        let i = installation("n1", ready, heartbeat, &[]);
        assert_eq!(is_ready(&i, NOW.parse().unwrap(), Duration::from_secs(120)), want);
    }

    #[test]
    fn an_installation_without_status_does_not_count() {
        let mut i = installation("n1", true, Some(NOW), &[]);
        i.status = None;
        assert!(!is_ready(&i, NOW.parse().unwrap(), Duration::from_secs(120)));
    }

    #[rstest]
    #[case::none(vec![], &[])]
    #[case::one(vec![&["x", "y"][..]], &["x", "y"])]
    #[case::intersection(vec![&["x", "y", "z"][..], &["z", "x"], &["x", "z", "w"]], &["x", "z"])]
    #[case::one_empty(vec![&["x"][..], &[]], &[])]
    fn installed_everywhere_is_the_intersection(#[case] lists: Vec<&[&str]>, #[case] want: &[&str]) {
        let installations: Vec<_> = lists
            .iter()
            .enumerate()
            .map(|(n, l)| installation(&format!("n{n}"), true, Some(NOW), l))
            .collect();
        let got = installed_everywhere(&installations);
        assert_eq!(got, want.iter().map(|s| s.to_string()).collect());
    }
}
