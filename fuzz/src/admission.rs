//! AdmissionReview bytes -> `Admission::mutate` / `::validate`.
//!
//! Besides "never panics", checks what the API server relies on: every answer
//! serializes with [`webhook::wire::to_vec`]; a patch is a JSON patch that applies
//! to the request's object; and mutating the patched object again yields no patch
//! (the API server re-invokes webhooks after other mutations, so a second patch
//! would be applied twice or loop with reinvocationPolicy: IfNeeded). And the
//! decision cache never changes an answer: each configuration runs twice, with
//! its cache (kept across inputs, so earlier inputs' results are there to be
//! wrongly matched) and without, and their answers must be the same bytes.

use profile_store::{Version, WorkloadKey};
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use webhook::cache::DecisionCache;
use webhook::index::{Entry, Index, SharedIndex};
use webhook::metrics::Metrics;
use webhook::{Admission, Policy};

/// A version made of one repeated hex digit.
fn version(hex: char) -> Version {
    match hex.to_string().repeat(12).parse() {
        Ok(v) => v,
        Err(e) => panic!("`{hex}` x 12 is a version: {e}"),
    }
}

fn entry(active: char, fallback: Option<&str>) -> Entry {
    let (a, log) = (version(active), version('f'));
    Entry {
        active: Some(a.clone()),
        log_variant: Some(log.clone()),
        fallback: fallback.map(str::to_string),
        known: [a, log].into_iter().collect(),
    }
}

/// The workloads of the committed fixtures (tests/data/admission), one of them in
/// fallback, so the fuzzer reaches injection, fallback and skip.
fn index() -> Index {
    let entries = [
        ("shop/deployment/checkout/migrate", entry('a', None)),
        ("shop/deployment/checkout/app", entry('b', None)),
        (
            "shop/deployment/checkout/envoy",
            entry('c', Some("crash loop after injection")),
        ),
        ("kubewarden/deployment/kubewarden-controller/manager", entry('d', None)),
        ("default/pod/busybox/busybox", entry('e', None)),
        (
            "default/pod/busybox/init-myservice",
            entry('a', Some("crash loop after injection")),
        ),
        ("demo/deployment/demo-crd-resource/demo-crd-resource", entry('b', None)),
        ("shop/pod/debug-shell/debug-shell", entry('c', None)),
    ];
    Index::from_entries(entries.into_iter().map(|(k, e)| {
        let key: WorkloadKey = match k.parse() {
            Ok(key) => key,
            Err(err) => panic!("{k}: {err}"),
        };
        (key, e)
    }))
}

/// Policies covering every mode, every on-missing choice, exemptions and Pod
/// Security `restricted` (which turns the Unconfined fallback into Log).
const POLICIES: [&str; 3] = [
    "{}",
    "onMissing: runtime-default
exemptionNamespaces: [default]
namespaces:
  shop:
    labels: {pod-security.kubernetes.io/enforce: restricted}
  kubewarden:
    labels: {tether.dev/mode: dry-run}
",
    "defaultMode: dry-run
onMissing: runtime-default
namespaces:
  shop:
    labels: {tether.dev/mode: enforce}
  default:
    labels: {tether.dev/mode: off}
",
];

/// Each policy's admission with its decision cache, and the same without one.
fn admissions() -> &'static [(Admission, Admission)] {
    static ADMISSIONS: OnceLock<Vec<(Admission, Admission)>> = OnceLock::new();
    ADMISSIONS.get_or_init(|| {
        POLICIES
            .iter()
            .map(|p| {
                let shared = Arc::new(SharedIndex::default());
                shared.set(index());
                let admission = |cache| Admission {
                    policy: match Policy::from_yaml(p) {
                        Ok(policy) => policy,
                        Err(e) => panic!("fuzz policy does not parse: {e}\n{p}"),
                    },
                    index: shared.clone(),
                    metrics: Metrics::default(),
                    cache,
                };
                (admission(DecisionCache::default()), admission(DecisionCache::new(0)))
            })
            .collect()
    })
}

/// Runs `data` through every admission configuration.
pub fn fuzz_one(data: &[u8]) {
    for (adm, uncached) in admissions() {
        if let Ok(answer) = adm.validate(data)
            && let Err(e) = webhook::wire::patch_of(&answer)
        {
            panic!("validate's answer does not read back: {e}");
        }
        let answer = adm.mutate(data);
        let fresh = uncached.mutate(data);
        let Ok(bytes) = answer else {
            assert!(fresh.is_err(), "mutate failed with its cache and answered without");
            continue;
        };
        match &fresh {
            Ok(fresh) if *fresh == bytes => {}
            other => panic!(
                "the decision cache changed the answer:\n cached {}\n fresh {:?}",
                String::from_utf8_lossy(&bytes),
                other.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
            ),
        }
        let patch = match webhook::wire::patch_of(&bytes) {
            Ok(Some(patch)) => patch,
            Ok(None) => continue,
            Err(e) => panic!("mutate's answer does not read back: {e}"),
        };
        let patch: json_patch::Patch = match serde_json::from_slice(&patch) {
            Ok(p) => p,
            Err(e) => panic!("the patch is not a JSON patch: {e}"),
        };
        // serde_json checks UTF-8 only in the strings it decodes, and admission
        // skips the fields it does not need (userInfo, oldObject, most of the
        // Pod): a body with invalid UTF-8 there is answered, but there is no JSON
        // value to apply the patch to. The API server always sends UTF-8.
        let Ok(mut body) = serde_json::from_slice::<Value>(data) else {
            continue;
        };
        let Some(object) = body.pointer_mut("/request/object") else {
            panic!("mutate patched a request without an object");
        };
        if let Err(e) = json_patch::patch(object, &patch) {
            panic!("the patch does not apply to the request's object: {e}\npatch: {patch:?}");
        }
        let again = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => panic!("the patched review does not serialize: {e}"),
        };
        match adm.mutate(&again).map(|second| webhook::wire::patch_of(&second)) {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(p))) => panic!(
                "mutate is not idempotent: second patch {}\nfirst patch {patch:?}",
                String::from_utf8_lossy(&p)
            ),
            Ok(Err(e)) => panic!("mutate's second answer does not read back: {e}"),
            Err(e) => panic!("mutate refuses its own output: {e}"),
        }
    }
}
