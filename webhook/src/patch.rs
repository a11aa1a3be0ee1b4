//! Turning a [`Decision`] into an RFC 6902 JSON patch, and into what dry-run says.

use crate::decide::{Action, Decision, Exemption, FallbackProfile};
use crate::policy::names;
use crate::slim::{PodView, Str};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::SeccompProfile;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The longest name part of an annotation key Kubernetes accepts.
const MAX_KEY_NAME: usize = 63;

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// The annotations tether sets on the pod for `decision` (values by key).
pub fn annotations(decision: &Decision) -> (BTreeMap<String, String>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut fallbacks = Vec::new();
    for c in &decision.containers {
        let value = match &c.action {
            Action::Inject { version, .. } => version.to_string(),
            Action::Fallback { reason, profile } => {
                fallbacks.push(format!("{}: {reason}", c.name));
                match profile {
                    FallbackProfile::Unconfined => "fallback:Unconfined".to_string(),
                    FallbackProfile::Log { version, .. } => format!("fallback:log:{version}"),
                    FallbackProfile::RuntimeDefault => "fallback:RuntimeDefault".to_string(),
                }
            }
            _ => continue,
        };
        let key = format!("{}{}", names::PROFILE_PREFIX, c.name);
        // `tether.dev/` is the prefix; the rest is limited to 63 characters.
        if key.len() - "tether.dev/".len() > MAX_KEY_NAME {
            warnings.push(format!(
                "container {}: name too long for the {}<container> annotation; see the audit annotations",
                c.name,
                names::PROFILE_PREFIX
            ));
            continue;
        }
        out.insert(key, value);
    }
    if !fallbacks.is_empty() {
        out.insert(names::FALLBACK.to_string(), fallbacks.join("; "));
    }
    if let Exemption::Honored { reason, .. } = &decision.exemption {
        out.insert(names::EXEMPTED.to_string(), reason.clone());
    }
    (out, warnings)
}

/// The patch that applies `decision` to `pod`: container-level `seccompProfile`s
/// and tether's annotations, creating `securityContext` and `annotations` where
/// absent. Empty when the pod already is what the decision wants (idempotence).
pub fn mutation_patch(pod: &PodView<'_>, decision: &Decision) -> (Patch, Vec<String>) {
    let mut ops = Vec::new();
    let spec = pod.spec.as_ref();
    for (c, profile) in decision.changes() {
        let list = if c.init { "initContainers" } else { "containers" };
        let container = spec.and_then(|s| {
            if c.init {
                s.init_containers.as_ref().and_then(|l| l.get(c.index))
            } else {
                s.containers.get(c.index)
            }
        });
        let index = c.index.to_string();
        let value = profile_value(profile);
        match container.and_then(|c| c.security_context.as_ref()) {
            Some(_) => ops.push(add(&["spec", list, &index, "securityContext", "seccompProfile"], value)),
            None => ops.push(add(
                &["spec", list, &index, "securityContext"],
                Value::Object(Map::from_iter([("seccompProfile".to_string(), value)])),
            )),
        }
    }
    let (wanted, warnings) = annotations(decision);
    let existing = pod.metadata.annotations.as_ref();
    let missing = wanted
        .into_iter()
        .filter(|(k, v)| existing.and_then(|e| e.get(k.as_str())).map(Str::as_str) != Some(v.as_str()));
    match existing {
        None => {
            let all: Map<String, Value> = missing.map(|(k, v)| (k, Value::String(v))).collect();
            if !all.is_empty() {
                ops.push(add(&["metadata", "annotations"], Value::Object(all)));
            }
        }
        Some(_) => {
            for (k, v) in missing {
                ops.push(add(&["metadata", "annotations", &k], Value::String(v)));
            }
        }
    }
    (Patch(ops), warnings)
}

/// `profile` as the JSON it serializes to, built directly: on every admission's
/// path, serde's `to_value` (a serializer that builds the map) cost ~0.4 µs
/// more per admission.
fn profile_value(profile: SeccompProfile) -> Value {
    let mut m = Map::new();
    if let Some(path) = profile.localhost_profile {
        m.insert("localhostProfile".into(), Value::String(path));
    }
    m.insert("type".into(), Value::String(profile.type_));
    Value::Object(m)
}

/// One line per change, as dry-run warnings say what enforce would do.
pub fn describe(decision: &Decision) -> Vec<String> {
    let kind = |c: &crate::decide::ContainerDecision| if c.init { "init container" } else { "container" };
    decision
        .changes()
        .map(|(c, p)| match p.localhost_profile {
            Some(path) => format!("would set {} {} to Localhost {path}", kind(c), c.name),
            None => format!("would set {} {} to {}", kind(c), c.name, p.type_),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression guard for the hand-built value: it is k8s-openapi's own
    /// serialization of the profile, for every kind tether sets.
    #[test]
    fn profile_values_are_k8s_openapis_serialization() {
        for (type_, path) in [
            (
                "Localhost",
                Some("tether/shop/deployment/checkout/app-0123456789ab.json"),
            ),
            ("RuntimeDefault", None),
            ("Unconfined", None),
        ] {
            let profile = SeccompProfile {
                type_: type_.into(),
                localhost_profile: path.map(str::to_string),
            };
            assert_eq!(profile_value(profile.clone()), serde_json::to_value(&profile).unwrap());
        }
    }
}
