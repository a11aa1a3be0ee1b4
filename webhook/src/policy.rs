//! Policy: modes, exemptions, on-missing behaviour, and what the webhook knows
//! about namespaces.

use crate::gate::InstallGate;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

/// Label and annotation names under `tether.dev/`.
pub mod names {
    /// Namespace label: `enforce`, `dry-run` or `off`.
    pub const MODE: &str = "tether.dev/mode";
    /// Namespace label: `"true"` lets pods in the namespace be exempted.
    pub const ALLOW_EXEMPTIONS: &str = "tether.dev/allow-exemptions";
    /// Pod annotation: exempt the whole pod, with the reason as value.
    pub const EXEMPT: &str = "tether.dev/exempt";
    /// Pod annotation: exempt the listed containers (`a,b`).
    pub const EXEMPT_CONTAINERS: &str = "tether.dev/exempt-containers";
    /// Pod annotation written by tether: the version injected into a container
    /// (`tether.dev/profile.<container>`).
    pub const PROFILE_PREFIX: &str = "tether.dev/profile.";
    /// Pod annotation written by tether: why the pod runs under a fallback.
    pub const FALLBACK: &str = "tether.dev/fallback";
    /// Pod annotation written by tether: an honored exemption and its reason.
    pub const EXEMPTED: &str = "tether.dev/exempted";
    /// Pod Security Admission's enforce level label.
    pub const PSA_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
    /// The directory under the kubelet's seccomp root that tether owns.
    pub const LOCALHOST_ROOT: &str = "tether/";
}

/// What the webhook does in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Inject profiles, deny unauthorized escapes.
    Enforce,
    /// Change nothing; say in warnings and audit annotations what enforce would do.
    DryRun,
    /// Leave pods alone.
    Off,
}

impl Mode {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "dry-run" => Ok(Mode::DryRun),
            "off" => Ok(Mode::Off),
            _ => Err(format!("unknown mode `{s}`: use enforce, dry-run or off")),
        }
    }
}

/// What to do for a container without an active profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMissing {
    /// Leave the container as it is.
    Skip,
    /// Set `RuntimeDefault`.
    RuntimeDefault,
}

impl FromStr for OnMissing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(OnMissing::Skip),
            "runtime-default" => Ok(OnMissing::RuntimeDefault),
            _ => Err(format!("unknown on-missing `{s}`: use skip or runtime-default")),
        }
    }
}

/// A namespace as the config describes it (with the embedded store there is no API
/// server to read labels from).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The namespace's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The webhook's policy configuration (`--config FILE`, YAML or JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// The mode of namespaces without a `tether.dev/mode` label.
    #[serde(default = "default_mode")]
    pub default_mode: Mode,
    /// What to do for containers without a profile.
    #[serde(default = "default_on_missing")]
    pub on_missing: OnMissing,
    /// Namespaces whose pods may be exempted even without the
    /// `tether.dev/allow-exemptions` label.
    #[serde(default)]
    pub exemption_namespaces: BTreeSet<String>,
    /// Namespace labels, when they cannot come from the API server.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// When a version counts as installed on the nodes (`all-ready` or `none`);
    /// only the Kubernetes store has installer reports to gate on.
    #[serde(default)]
    pub install_gate: InstallGate,
    /// An installer whose heartbeat is older than this many seconds is not ready.
    #[serde(default = "default_installer_staleness")]
    pub installer_staleness_seconds: u64,
    /// Namespace labels from the API server (a reflector), consulted before
    /// `namespaces`; set by the Kubernetes-fed index, never by the config file.
    #[serde(skip)]
    pub live_namespaces: Option<LiveNamespaces>,
}

fn default_installer_staleness() -> u64 {
    120
}

/// The labels of every namespace as the API server last reported them (only the
/// ones tether reads), swapped whole by the reflector that feeds it, read by
/// admission without a call to the API server.
#[derive(Clone, Default)]
pub struct LiveNamespaces {
    labels: Arc<RwLock<HashMap<String, BTreeMap<String, String>>>>,
}

impl LiveNamespaces {
    /// The label keys tether reads; other labels are not kept.
    pub const KEYS: [&'static str; 3] = [names::MODE, names::ALLOW_EXEMPTIONS, names::PSA_ENFORCE];

    /// Replaces every namespace's labels (keeping only [`Self::KEYS`]).
    pub fn replace<'a>(&self, namespaces: impl IntoIterator<Item = (String, Option<&'a BTreeMap<String, String>>)>) {
        let map = namespaces
            .into_iter()
            .map(|(name, labels)| {
                let kept = labels
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| Self::KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (name, kept)
            })
            .collect();
        *self.labels.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Calls `f` with the labels of `namespace` (`None`: not seen by the reflector).
    fn with<T>(&self, namespace: &str, f: impl FnOnce(Option<&BTreeMap<String, String>>) -> T) -> T {
        let map = self.labels.read().unwrap_or_else(|e| e.into_inner());
        f(map.get(namespace))
    }

    /// How many namespaces it knows.
    pub fn len(&self) -> usize {
        self.labels.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether it knows no namespace.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for LiveNamespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveNamespaces")
            .field("namespaces", &self.len())
            .finish()
    }
}

// Two handles are equal when they share the same map (the policy derives Eq).
impl PartialEq for LiveNamespaces {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.labels, &other.labels)
    }
}

impl Eq for LiveNamespaces {}

fn default_mode() -> Mode {
    Mode::Enforce
}

fn default_on_missing() -> OnMissing {
    OnMissing::Skip
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_mode: default_mode(),
            on_missing: default_on_missing(),
            exemption_namespaces: BTreeSet::new(),
            namespaces: BTreeMap::new(),
            install_gate: InstallGate::default(),
            installer_staleness_seconds: default_installer_staleness(),
            live_namespaces: None,
        }
    }
}

/// What the policy says about one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespaceView {
    /// Its mode.
    pub mode: Mode,
    /// Whether exemptions are honored there.
    pub allow_exemptions: bool,
    /// Whether Pod Security Admission would reject `Unconfined` there
    /// (`pod-security.kubernetes.io/enforce` is `baseline` or `restricted`).
    pub psa_forbids_unconfined: bool,
    /// A problem with the labels (an unknown mode), said in warnings.
    pub label_problem: Option<String>,
}

impl Policy {
    /// Reads a policy file (YAML, or JSON which is YAML too).
    pub fn from_yaml(text: &str) -> Result<Policy, String> {
        let policy: Policy = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        if policy.installer_staleness_seconds == 0 {
            return Err("installerStalenessSeconds: 0 would count no installer as ready; use the seconds between heartbeats and some margin (default 120)".into());
        }
        Ok(policy)
    }

    /// The view of `namespace`, from its labels: `labels` when the caller has them,
    /// else the API server's (when [`Policy::live_namespaces`] is set and has seen
    /// the namespace), else the config's.
    pub fn namespace(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> NamespaceView {
        match (labels, &self.live_namespaces) {
            (None, Some(live)) => live.with(namespace, |live| self.view(namespace, live)),
            _ => self.view(namespace, labels),
        }
    }

    fn view(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> NamespaceView {
        // A namespace the reflector has not seen yet (created a moment ago) falls
        // back to the config, then to the defaults.
        let labels = labels.or_else(|| self.namespaces.get(namespace).map(|n| &n.labels));
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        let (mode, label_problem) = match label(names::MODE).map(str::parse::<Mode>) {
            Some(Ok(m)) => (m, None),
            // An unreadable mode label must not switch protection off: fall back to
            // the default and say so.
            Some(Err(e)) => (
                self.default_mode,
                Some(format!("namespace {namespace}: label {}: {e}", names::MODE)),
            ),
            None => (self.default_mode, None),
        };
        NamespaceView {
            mode,
            allow_exemptions: label(names::ALLOW_EXEMPTIONS) == Some("true")
                || self.exemption_namespaces.contains(namespace),
            psa_forbids_unconfined: matches!(label(names::PSA_ENFORCE), Some("baseline" | "restricted")),
            label_problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_view_from_labels_and_config() {
        let policy = Policy::from_yaml(
            r#"
defaultMode: enforce
onMissing: runtime-default
exemptionNamespaces: [ops]
namespaces:
  staging:
    labels: {tether.dev/mode: dry-run, pod-security.kubernetes.io/enforce: restricted}
  typo:
    labels: {tether.dev/mode: enforced}
"#,
        )
        .unwrap();
        assert_eq!(policy.on_missing, OnMissing::RuntimeDefault);
        let staging = policy.namespace("staging", None);
        assert_eq!(staging.mode, Mode::DryRun);
        assert!(staging.psa_forbids_unconfined);
        assert!(!staging.allow_exemptions);
        assert!(policy.namespace("ops", None).allow_exemptions);
        let typo = policy.namespace("typo", None);
        assert_eq!(typo.mode, Mode::Enforce);
        assert!(typo.label_problem.unwrap().contains("enforced"));
        let mut labels = BTreeMap::new();
        labels.insert(names::ALLOW_EXEMPTIONS.to_string(), "true".to_string());
        labels.insert(names::MODE.to_string(), "off".to_string());
        let live = policy.namespace("staging", Some(&labels));
        assert_eq!((live.mode, live.allow_exemptions), (Mode::Off, true));
    }

    #[test]
    fn install_gate_settings() {
        let default = Policy::from_yaml("{}").unwrap();
        assert_eq!(
            (default.install_gate, default.installer_staleness_seconds),
            (InstallGate::AllReady, 120)
        );
        let off = Policy::from_yaml("installGate: none\ninstallerStalenessSeconds: 300\n").unwrap();
        assert_eq!(
            (off.install_gate, off.installer_staleness_seconds),
            (InstallGate::None, 300)
        );
        assert!(Policy::from_yaml("installGate: some\n").is_err());
        let err = Policy::from_yaml("installerStalenessSeconds: 0\n").unwrap_err();
        assert!(err.contains("installerStalenessSeconds"), "{err}");
    }

    /// Live labels come first, only the labels tether reads are kept, and the
    /// config answers for namespaces the API server has not reported.
    #[test]
    fn live_namespace_labels_override_the_config() {
        let mut policy = Policy::from_yaml(
            "namespaces:\n  a: {labels: {tether.dev/mode: dry-run}}\n  b: {labels: {tether.dev/mode: dry-run}}\n",
        )
        .unwrap();
        let live = LiveNamespaces::default();
        let labels: BTreeMap<String, String> = [(names::MODE, "off"), ("team", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        live.replace([("a".to_string(), Some(&labels))]);
        policy.live_namespaces = Some(live.clone());
        assert_eq!(policy.namespace("a", None).mode, Mode::Off);
        assert_eq!(policy.namespace("b", None).mode, Mode::DryRun);
        assert_eq!(
            live.labels.read().unwrap()["a"].len(),
            1,
            "labels tether does not read were kept"
        );
        // The policy still compares equal to a clone sharing the same labels.
        assert_eq!(policy.clone(), policy);
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let err = Policy::from_yaml("defaultMod: enforce\n").unwrap_err();
        assert!(err.contains("defaultMod"), "{err}");
        assert!(Policy::from_yaml("defaultMode: sometimes\n").is_err());
    }
}
