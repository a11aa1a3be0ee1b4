//! Admission answers for real and constructed AdmissionReviews, without a server:
//! golden patches, idempotence, modes, exemptions, fallback, validation.

use crate::index::{Entry, Index, SharedIndex};
use crate::metrics::Metrics;
use crate::policy::{Policy, names};
use crate::review::Admission;
use profile_store::{Version, WorkloadKey};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(rel)
}

/// A fixture as a full AdmissionReview (the request-only captures get the envelope).
pub(crate) fn review(rel: &str) -> Value {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(data(rel)).unwrap()).unwrap();
    if v.get("request").is_some() {
        v
    } else {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": v})
    }
}

pub(crate) fn v(hex: char) -> Version {
    hex.to_string().repeat(12).parse().unwrap()
}

pub(crate) fn entry(active: char, fallback: Option<&str>) -> Entry {
    let (a, log) = (v(active), v('f'));
    Entry {
        active: Some(a.clone()),
        log_variant: Some(log.clone()),
        fallback: fallback.map(str::to_string),
        known: [a, log].into_iter().collect(),
    }
}

pub(crate) fn key(s: &str) -> WorkloadKey {
    s.parse().unwrap()
}

fn admission(policy: &str, entries: Vec<(&str, Entry)>) -> Admission {
    let index = SharedIndex::default();
    index.set(Index::from_entries(entries.into_iter().map(|(k, e)| (key(k), e))));
    Admission {
        policy: Policy::from_yaml(policy).unwrap(),
        index: Arc::new(index),
        metrics: Metrics::default(),
        cache: Default::default(),
    }
}

/// The same admission without the decision cache: every answer computed afresh.
fn uncached(policy: &str, entries: Vec<(&str, Entry)>) -> Admission {
    Admission {
        cache: crate::cache::DecisionCache::new(0),
        ..admission(policy, entries)
    }
}

fn checkout() -> Vec<(&'static str, Entry)> {
    vec![
        ("shop/deployment/checkout/migrate", entry('a', None)),
        ("shop/deployment/checkout/app", entry('b', None)),
        ("shop/deployment/checkout/envoy", entry('c', None)),
    ]
}

/// (response, decoded patch or Null).
fn mutate(a: &Admission, review: &Value) -> (Value, Value) {
    let out = a.mutate(&serde_json::to_vec(review).unwrap()).unwrap();
    let res = serde_json::from_slice::<Value>(&out).unwrap()["response"].clone();
    let patch = match crate::wire::patch_of(&out).unwrap() {
        Some(bytes) => serde_json::from_slice(&bytes).unwrap(),
        None => Value::Null,
    };
    (res, patch)
}

fn validate(a: &Admission, review: &Value) -> Value {
    serde_json::from_slice::<Value>(&a.validate(&serde_json::to_vec(review).unwrap()).unwrap()).unwrap()["response"]
        .clone()
}

/// Compares with `tests/data/golden/admission/<name>.json`; `TETHER_UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, value: &Value) {
    let path = data(&format!("golden/admission/{name}.json"));
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("TETHER_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        text,
        want,
        "{} differs (TETHER_UPDATE_GOLDEN=1 after review)",
        path.display()
    );
}

/// Applies `patch` to the review's object, as the API server does.
fn patched(review: &Value, patch: &Value) -> Value {
    let mut out = review.clone();
    if patch.is_null() {
        return out;
    }
    let p: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
    json_patch::patch(&mut out["request"]["object"], &p).unwrap();
    out
}

#[test]
fn deployment_pod_with_init_containers_gets_profiles_and_keeps_explicit_ones() {
    let a = admission("{}", checkout());
    let r = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let (res, patch) = mutate(&a, &r);
    assert_eq!(res["allowed"], true);
    assert_eq!(res["uid"], r["request"]["uid"]);
    assert_eq!(res["patchType"], "JSONPatch");
    golden("checkout-initcontainers", &patch);
    let after = patched(&r, &patch);
    let obj = &after["request"]["object"];
    assert_eq!(
        obj["spec"]["initContainers"][0]["securityContext"]["seccompProfile"],
        json!({"type": "Localhost", "localhostProfile": "tether/shop/deployment/checkout/migrate-aaaaaaaaaaaa.json"})
    );
    assert_eq!(
        obj["spec"]["containers"][0]["securityContext"]["seccompProfile"]["localhostProfile"],
        "tether/shop/deployment/checkout/app-bbbbbbbbbbbb.json"
    );
    // envoy set RuntimeDefault itself: never weakened or replaced.
    assert_eq!(
        obj["spec"]["containers"][1]["securityContext"]["seccompProfile"],
        json!({"type": "RuntimeDefault"})
    );
    assert_eq!(obj["metadata"]["annotations"]["tether.dev/profile.app"], "bbbbbbbbbbbb");
    assert_eq!(
        res["auditAnnotations"]["injected"],
        "migrate=aaaaaaaaaaaa,app=bbbbbbbbbbbb"
    );
}

#[test]
fn a_second_call_on_our_own_output_returns_no_patch() {
    let a = admission("{}", checkout());
    for fixture in [
        "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json",
        "admission/01-pod-create-replicaset-owner-request-only.json",
        "admission/03-pod-create-2containers-2initcontainers-request-only.json",
    ] {
        let a2 = admission(
            "onMissing: runtime-default",
            checkout()
                .into_iter()
                .chain([("kubewarden/deployment/kubewarden-controller/manager", entry('d', None))])
                .collect(),
        );
        for adm in [&a, &a2] {
            let r = review(fixture);
            let (_, patch) = mutate(adm, &r);
            let again = patched(&r, &patch);
            let (res, second) = mutate(adm, &again);
            assert_eq!(second, Value::Null, "{fixture}: second patch {second}");
            assert_eq!(res["allowed"], true);
        }
    }
}

#[test]
fn request_only_capture_of_a_replicaset_pod_resolves_to_its_deployment() {
    let a = admission(
        "{}",
        vec![("kubewarden/deployment/kubewarden-controller/manager", entry('d', None))],
    );
    let (_, patch) = mutate(
        &a,
        &review("admission/01-pod-create-replicaset-owner-request-only.json"),
    );
    golden("kubewarden-manager-only", &patch);
}

#[test]
fn annotation_keys_are_escaped_and_absent_objects_created() {
    let a = admission(
        "onMissing: runtime-default",
        vec![("default/pod/busybox/busybox", entry('e', None))],
    );
    let (_, patch) = mutate(
        &a,
        &review("admission/03-pod-create-2containers-2initcontainers-request-only.json"),
    );
    let ops = patch.as_array().unwrap();
    // The pod has annotations: each of ours is added under an escaped key.
    assert!(
        ops.iter()
            .any(|o| o["path"] == "/metadata/annotations/tether.dev~1profile.busybox"),
        "{patch}"
    );
    // busybox2 and the init containers have no profile: RuntimeDefault, with a new securityContext.
    assert!(
        ops.iter().any(|o| o["path"] == "/spec/initContainers/1/securityContext"
            && o["value"] == json!({"seccompProfile": {"type": "RuntimeDefault"}})),
        "{patch}"
    );
    golden("busybox-on-missing-runtime-default", &patch);
}

#[test]
fn dry_run_namespace_patches_nothing_and_says_what_it_would_do() {
    let a = admission("namespaces: {shop: {labels: {tether.dev/mode: dry-run}}}", checkout());
    let (res, patch) = mutate(
        &a,
        &review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json"),
    );
    assert_eq!(patch, Value::Null);
    let warnings: Vec<&str> = res["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(warnings.contains(&"tether dry-run: would set init container migrate to Localhost tether/shop/deployment/checkout/migrate-aaaaaaaaaaaa.json"), "{warnings:?}");
    assert_eq!(warnings.len(), 2);
    assert!(
        res["auditAnnotations"]["dry-run"]
            .as_str()
            .unwrap()
            .contains("container app")
    );
}

#[test]
fn off_mode_leaves_pods_alone() {
    let a = admission("defaultMode: off", checkout());
    let (res, patch) = mutate(
        &a,
        &review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json"),
    );
    assert_eq!(
        (patch, res["allowed"].clone(), res.get("warnings").cloned()),
        (Value::Null, json!(true), None)
    );
}

#[test]
fn server_side_dry_run_requests_get_the_same_answer() {
    // `kubectl run --dry-run=server`: request.dryRun is true; tether has no side
    // effects, so the answer is the one a real create would get.
    let a = admission("{}", vec![("shop/pod/dry-probe/dry-probe", entry('a', None))]);
    let r = review("admission/apiserver-1.35/pod-create-bare-dryrun.json");
    assert_eq!(r["request"]["dryRun"], true);
    let (_, patch) = mutate(&a, &r);
    assert!(
        patch
            .to_string()
            .contains("tether/shop/pod/dry-probe/dry-probe-aaaaaaaaaaaa.json"),
        "{patch}"
    );
}

#[test]
fn exemption_is_honored_only_where_the_namespace_allows_it() {
    let r = review("admission/apiserver-1.35/pod-create-bare-exemption-annotation.json");
    let entries = || vec![("shop/pod/debug-shell/debug-shell", entry('a', None))];

    let allowed = admission(
        "namespaces: {shop: {labels: {tether.dev/allow-exemptions: \"true\"}}}",
        entries(),
    );
    let (res, patch) = mutate(&allowed, &r);
    let ops = patch.as_array().unwrap();
    assert!(!patch.to_string().contains("seccompProfile"), "{patch}");
    assert!(
        ops.iter()
            .any(|o| o["path"] == "/metadata/annotations/tether.dev~1exempted" && o["value"] == "incident 4411")
    );
    assert_eq!(res["auditAnnotations"]["exempted"], "incident 4411");
    assert!(validate(&allowed, &r)["allowed"].as_bool().unwrap());

    let refused = admission("{}", entries());
    let (res, patch) = mutate(&refused, &r);
    assert!(
        patch.to_string().contains("debug-shell-aaaaaaaaaaaa.json"),
        "injected anyway: {patch}"
    );
    assert!(
        res["warnings"][0]
            .as_str()
            .unwrap()
            .contains("kubectl label namespace shop tether.dev/allow-exemptions=true")
    );
    let denied = validate(&refused, &r);
    assert_eq!(denied["allowed"], false);
    assert!(
        denied["status"]["message"]
            .as_str()
            .unwrap()
            .contains("does not allow seccomp exemptions")
    );

    // The config allowlist works as the label does.
    let listed = admission("exemptionNamespaces: [shop]", entries());
    assert!(!mutate(&listed, &r).1.to_string().contains("seccompProfile"));
}

fn with_container_profile(mut r: Value, container: usize, profile: Value) -> Value {
    r["request"]["object"]["spec"]["containers"][container]["securityContext"] = json!({"seccompProfile": profile});
    r
}

#[test]
fn fallback_is_unconfined_or_the_log_variant_where_pod_security_forbids_unconfined() {
    let r = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let mut entries = checkout();
    entries[1].1 = entry(
        'b',
        Some("exit 159 (SIGSYS) in checkout-6c9d7b8f4d-x2x9z at 2026-11-30T10:00:00Z"),
    );
    let plain = admission("{}", entries.clone());
    let (res, patch) = mutate(&plain, &r);
    let after = patched(&r, &patch);
    assert_eq!(
        after["request"]["object"]["spec"]["containers"][0]["securityContext"]["seccompProfile"],
        json!({"type": "Unconfined"})
    );
    assert!(
        after["request"]["object"]["metadata"]["annotations"][names::FALLBACK]
            .as_str()
            .unwrap()
            .contains("SIGSYS")
    );
    assert!(
        res["auditAnnotations"]["fallback"]
            .as_str()
            .unwrap()
            .starts_with("app=Unconfined")
    );
    // The validator accepts what the mutator did for a workload in fallback.
    assert_eq!(validate(&plain, &after)["allowed"], true);

    let restricted = admission(
        "namespaces: {shop: {labels: {pod-security.kubernetes.io/enforce: restricted}}}",
        entries,
    );
    let (_, patch) = mutate(&restricted, &r);
    let after = patched(&r, &patch);
    assert_eq!(
        after["request"]["object"]["spec"]["containers"][0]["securityContext"]["seccompProfile"],
        json!({"type": "Localhost", "localhostProfile": "tether/shop/deployment/checkout/app-ffffffffffff.json"})
    );
    assert_eq!(validate(&restricted, &after)["allowed"], true);
    golden("checkout-app-fallback-restricted", &patch);
}

#[test]
fn validate_refuses_unauthorized_escapes_in_enforce_and_warns_in_dry_run() {
    let base = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let a = admission("{}", checkout());
    let unconfined = with_container_profile(base.clone(), 0, json!({"type": "Unconfined"}));
    let res = validate(&a, &unconfined);
    assert_eq!(res["allowed"], false);
    assert!(
        res["status"]["message"]
            .as_str()
            .unwrap()
            .contains("container app runs Unconfined"),
        "{res}"
    );

    let other = with_container_profile(
        base.clone(),
        0,
        json!({"type": "Localhost", "localhostProfile": "tether/shop/deployment/checkout/envoy-cccccccccccc.json"}),
    );
    assert!(
        validate(&a, &other)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("belongs to workload shop/deployment/checkout/envoy")
    );

    let unknown = with_container_profile(
        base.clone(),
        0,
        json!({"type": "Localhost", "localhostProfile": "tether/shop/deployment/checkout/app-0123456789ab.json"}),
    );
    assert!(
        validate(&a, &unknown)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not a version tether knows")
    );

    let traversal = with_container_profile(
        base.clone(),
        0,
        json!({"type": "Localhost", "localhostProfile": "tether/../../etc/shadow-bbbbbbbbbbbb.json"}),
    );
    assert!(
        validate(&a, &traversal)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("climbs with `..`")
    );

    // Regression: `./tether/...` opens the same file as `tether/...` on the
    // node, and was not checked at all.
    let dotted = with_container_profile(
        base.clone(),
        0,
        json!({"type": "Localhost", "localhostProfile": "./tether/shop/deployment/checkout/envoy-cccccccccccc.json"}),
    );
    assert!(
        validate(&a, &dotted)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("opens tether/shop/deployment/checkout/envoy-cccccccccccc.json")
    );

    // Outside tether/ is not tether's business.
    let own = with_container_profile(
        base.clone(),
        0,
        json!({"type": "Localhost", "localhostProfile": "profiles/audit.json"}),
    );
    assert_eq!(validate(&a, &own)["allowed"], true);

    // Pod-level Unconfined reaches the containers that do not set their own.
    let mut pod_level = base.clone();
    pod_level["request"]["object"]["spec"]["securityContext"] = json!({"seccompProfile": {"type": "Unconfined"}});
    let msg = validate(&a, &pod_level)["status"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("container app") && msg.contains("container migrate") && !msg.contains("container envoy"),
        "{msg}"
    );

    let dry = admission("namespaces: {shop: {labels: {tether.dev/mode: dry-run}}}", checkout());
    let res = validate(&dry, &unconfined);
    assert_eq!(res["allowed"], true);
    assert!(
        res["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("tether dry-run would deny")
    );
}

#[test]
fn annotations_written_by_the_user_do_not_authorize_anything() {
    let mut r = with_container_profile(
        review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json"),
        0,
        json!({"type": "Unconfined"}),
    );
    r["request"]["object"]["metadata"]["annotations"] = json!({
        names::FALLBACK: "trust me",
        names::EXEMPTED: "trust me",
        names::ALLOW_EXEMPTIONS: "true",
    });
    let a = admission("{}", checkout());
    assert_eq!(validate(&a, &r)["allowed"], false);
}

#[test]
fn exempt_containers_may_not_name_init_containers_or_strangers() {
    let mut r = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let a = admission("exemptionNamespaces: [shop]", checkout());
    for listed in ["migrate", "sidecar", " , "] {
        r["request"]["object"]["metadata"]["annotations"] = json!({names::EXEMPT_CONTAINERS: listed});
        let res = validate(&a, &r);
        assert_eq!(res["allowed"], false, "{listed}");
    }
    r["request"]["object"]["metadata"]["annotations"] = json!({names::EXEMPT_CONTAINERS: "app"});
    let (_, patch) = mutate(&a, &r);
    let after = patched(&r, &patch);
    assert!(
        after["request"]["object"]["spec"]["containers"][0]
            .get("securityContext")
            .is_none()
    );
    assert!(after["request"]["object"]["spec"]["initContainers"][0]["securityContext"].is_object());
}

#[test]
fn statefulset_and_bare_pods_resolve_to_their_keys() {
    let mut sts = review("admission/apiserver-1.35/pod-create-bare-exemption-annotation.json");
    let obj = &mut sts["request"]["object"];
    obj["metadata"]["annotations"] = json!({});
    obj["metadata"]["name"] = json!("ledger-db-0");
    obj["metadata"]["labels"] = json!({"statefulset.kubernetes.io/pod-name": "ledger-db-0"});
    obj["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ledger-db", "uid": "u", "controller": true}]);
    let a = admission(
        "{}",
        vec![
            ("shop/statefulset/ledger-db/debug-shell", entry('a', None)),
            ("shop/pod/debug-shell/debug-shell", entry('b', None)),
        ],
    );
    assert!(
        mutate(&a, &sts)
            .1
            .to_string()
            .contains("tether/shop/statefulset/ledger-db/debug-shell-aaaaaaaaaaaa.json")
    );
    let mut bare = review("admission/apiserver-1.35/pod-create-bare-exemption-annotation.json");
    bare["request"]["object"]["metadata"]["annotations"] = json!({});
    assert!(
        mutate(&a, &bare)
            .1
            .to_string()
            .contains("tether/shop/pod/debug-shell/debug-shell-bbbbbbbbbbbb.json")
    );
}

#[test]
fn requests_tether_does_not_handle_are_allowed_untouched() {
    let a = admission("{}", checkout());
    let base = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let mut update = base.clone();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = base["request"]["object"].clone();
    let mut deployment = base.clone();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["object"] = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "not even valid"}});
    let mut ephemeral = base.clone();
    ephemeral["request"]["subResource"] = json!("ephemeralcontainers");
    let mut no_containers = base.clone();
    no_containers["request"]["object"]["spec"]["containers"] = json!([]);
    no_containers["request"]["object"]["spec"]["initContainers"] = json!([]);
    for (what, r) in [
        ("UPDATE", update),
        ("Deployment", deployment),
        ("ephemeral", ephemeral),
        ("no containers", no_containers),
    ] {
        let (res, patch) = mutate(&a, &r);
        assert_eq!((res["allowed"].clone(), patch), (json!(true), Value::Null), "{what}");
        assert_eq!(res["uid"], base["request"]["uid"], "{what}");
        assert_eq!(validate(&a, &r)["allowed"], true, "{what}");
    }
}

#[test]
fn unreadable_requests_are_errors_that_say_why() {
    let a = admission("{}", checkout());
    let base = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let mut v1beta1 = base.clone();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_request = base.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let mut bad_pod = base.clone();
    bad_pod["request"]["object"]["spec"]["containers"] = json!("nope");
    // Invalid UTF-8 in a field admission skips: the whole body is checked.
    let mut bad_utf8 = base.clone();
    bad_utf8["request"]["object"]["spec"]["containers"][0]["image"] = json!("img-XX");
    let mut bad_utf8 = serde_json::to_vec(&bad_utf8).unwrap();
    let at = bad_utf8.windows(6).position(|w| w == b"img-XX").unwrap() + 4;
    bad_utf8[at] = 0xff;
    for (body, want) in [
        (b"not json".to_vec(), "not JSON"),
        (bad_utf8, "not UTF-8"),
        (serde_json::to_vec(&v1beta1).unwrap(), "admission.k8s.io/v1"),
        (serde_json::to_vec(&no_request).unwrap(), "no request"),
        (serde_json::to_vec(&bad_pod).unwrap(), "does not parse"),
    ] {
        let err = a.mutate(&body).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(a.validate(&body).is_err());
    }
}

/// The requests, injections and exemptions counted, as `/metrics` shows them.
fn counted(m: &Metrics) -> Vec<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry()).unwrap();
    let wanted = [
        "tether_admission_requests_total{",
        "tether_injections_total{",
        "tether_exemptions_total{",
    ];
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .map(str::to_string)
        .collect();
    lines.sort();
    assert!(!lines.is_empty(), "nothing counted:\n{text}");
    lines
}

/// The answer's bytes as the server sends them.
fn answer_bytes(a: &Admission, review: &Value) -> Vec<u8> {
    a.mutate(&serde_json::to_vec(review).unwrap()).unwrap()
}

fn with_uid(mut r: Value, uid: &str) -> Value {
    r["request"]["uid"] = json!(uid);
    r
}

#[test]
fn cached_answers_are_byte_for_byte_the_fresh_ones() {
    let fallback = || {
        let mut e = checkout();
        e[1].1 = entry('b', Some("exit 159 (SIGSYS) in checkout-6c9d7b8f4d-x2x9z"));
        e
    };
    let debug = || {
        checkout()
            .into_iter()
            .chain([
                ("shop/pod/debug-shell/debug-shell", entry('a', None)),
                ("kubewarden/deployment/kubewarden-controller/manager", entry('d', None)),
                ("default/pod/busybox/busybox", entry('e', None)),
            ])
            .collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Vec<(&str, Entry)>)> = vec![
        ("{}", debug()),
        ("onMissing: runtime-default", debug()),
        ("namespaces: {shop: {labels: {tether.dev/mode: dry-run}}}", debug()),
        (
            "namespaces: {shop: {labels: {tether.dev/allow-exemptions: \"true\"}}}",
            debug(),
        ),
        ("{}", fallback()),
        (
            "namespaces: {shop: {labels: {pod-security.kubernetes.io/enforce: restricted}}}",
            fallback(),
        ),
        ("namespaces: {shop: {labels: {tether.dev/mode: bogus}}}", debug()),
    ];
    let fixtures = [
        "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json",
        "admission/apiserver-1.35/pod-create-bare-exemption-annotation.json",
        "admission/apiserver-1.35/pod-create-bare-dryrun.json",
        "admission/01-pod-create-replicaset-owner-request-only.json",
        "admission/02-pod-create-replicaset-owner-v1-envelope.json",
        "admission/03-pod-create-2containers-2initcontainers-request-only.json",
        "admission/04-pod-create-kubectl-apply-full-envelope.json",
    ];
    let mut patched_answers = 0;
    for (policy, entries) in cases {
        let cached = admission(policy, entries.clone());
        let fresh = uncached(policy, entries);
        for fixture in fixtures {
            let first = review(fixture);
            let want = answer_bytes(&fresh, &first);
            assert_eq!(answer_bytes(&cached, &first), want, "{policy} {fixture}: first answer");
            // A second pod from the same template: its own uid, the rest the same.
            let second = with_uid(first.clone(), "0d5c4b1a-0000-4000-8000-000000000002");
            let hits = cached.metrics.decision_cache_hits.get();
            assert_eq!(
                answer_bytes(&cached, &second),
                answer_bytes(&fresh, &second),
                "{policy} {fixture}: answer from the cache"
            );
            assert_eq!(
                cached.metrics.decision_cache_hits.get(),
                hits + 1,
                "{policy} {fixture}: not a hit"
            );
            patched_answers += usize::from(String::from_utf8_lossy(&want).contains("\"patch\""));
        }
        assert_eq!(fresh.metrics.decision_cache_hits.get(), 0);
        assert_eq!(fresh.metrics.decision_cache_misses.get(), 0);
        // Answers from the cache count in the metrics as computed ones do
        // (their counters are kept with the cached result).
        let lines = counted(&cached.metrics);
        assert_eq!(lines, counted(&fresh.metrics), "{policy}");
        let requests: u64 = lines
            .iter()
            .filter(|l| l.starts_with("tether_admission_requests_total{endpoint=\"mutate\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(requests, 2 * fixtures.len() as u64, "{policy}: {lines:?}");
    }
    // The cases cover patches, not only allowed-untouched answers.
    assert!(patched_answers >= 10, "{patched_answers}");
}

#[test]
fn a_new_index_is_never_answered_from_the_cache() {
    let a = admission("{}", checkout());
    let r = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let (_, before) = mutate(&a, &r);
    assert!(before.to_string().contains("app-bbbbbbbbbbbb.json"), "{before}");
    let mut entries = checkout();
    entries[1].1 = entry('d', None);
    a.index
        .set(Index::from_entries(entries.into_iter().map(|(k, e)| (key(k), e))));
    let (_, after) = mutate(&a, &r);
    assert!(after.to_string().contains("app-dddddddddddd.json"), "{after}");
    assert_eq!(a.metrics.decision_cache_hits.get(), 0);
    assert_eq!(a.metrics.decision_cache_misses.get(), 2);
    // And the new result is kept for the next pod.
    mutate(&a, &r);
    assert_eq!(a.metrics.decision_cache_hits.get(), 1);
}

#[test]
fn pods_differing_in_a_field_admission_reads_get_their_own_answers() {
    let a = admission(
        "namespaces: {staging: {labels: {tether.dev/mode: dry-run}}, shop: {labels: {tether.dev/allow-exemptions: \"true\"}}}",
        checkout(),
    );
    let fresh = uncached(
        "namespaces: {staging: {labels: {tether.dev/mode: dry-run}}, shop: {labels: {tether.dev/allow-exemptions: \"true\"}}}",
        checkout(),
    );
    let base = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    let mut exempt = base.clone();
    exempt["request"]["object"]["metadata"]["annotations"] = json!({(names::EXEMPT): "incident 7"});
    let mut staging = base.clone();
    staging["request"]["namespace"] = json!("staging");
    // The ReplicaSet's hash no longer matches its name: the pod is keyed to
    // the ReplicaSet, which has no profile, not to the Deployment.
    let mut relabeled = base.clone();
    relabeled["request"]["object"]["metadata"]["labels"]["pod-template-hash"] = json!("0000000000");
    let variants = [
        base.clone(),
        with_container_profile(base.clone(), 0, json!({"type": "RuntimeDefault"})),
        with_container_profile(
            base.clone(),
            0,
            json!({"type": "Localhost", "localhostProfile": "tether/x.json"}),
        ),
        exempt,
        staging,
        relabeled,
    ];
    let answers: Vec<Vec<u8>> = variants.iter().map(|r| answer_bytes(&fresh, r)).collect();
    for (i, r) in variants.iter().enumerate() {
        assert_eq!(answer_bytes(&a, r), answers[i], "variant {i}, first");
    }
    // Every variant is kept apart: asked again in another order, each gets its own.
    for (i, r) in variants.iter().enumerate().rev() {
        assert_eq!(answer_bytes(&a, r), answers[i], "variant {i}, from the cache");
    }
    assert_eq!(a.metrics.decision_cache_hits.get(), variants.len() as u64);
    // Not a vacuous check: the variants' answers differ from the base's.
    assert!(answers[1..].iter().all(|x| *x != answers[0]));
}

#[test]
fn the_decision_cache_stays_within_its_bounds() {
    let a = Admission {
        cache: crate::cache::DecisionCache::new(3),
        ..admission("{}", checkout())
    };
    let base = review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json");
    for i in 0..10 {
        let mut r = base.clone();
        r["request"]["object"]["metadata"]["labels"]["example.com/revision"] = json!(format!("r{i}"));
        let (res, patch) = mutate(&a, &r);
        assert_eq!(res["allowed"], true);
        assert!(patch.to_string().contains("app-bbbbbbbbbbbb.json"));
        assert!(a.cache.len() <= 3, "{} kept after {i}", a.cache.len());
    }
    assert_eq!(a.metrics.decision_cache_misses.get(), 10);
    // A pod heavier than a key may be is answered, and not kept.
    let kept = a.cache.len();
    let mut heavy = base.clone();
    heavy["request"]["object"]["metadata"]["annotations"] =
        json!({"example.com/blob": "x".repeat(crate::cache::MAX_KEY_BYTES)});
    let (res, patch) = mutate(&a, &heavy);
    assert_eq!(res["allowed"], true);
    assert!(patch.to_string().contains("app-bbbbbbbbbbbb.json"));
    assert_eq!(a.cache.len(), kept);
    mutate(&a, &heavy);
    assert_eq!(a.metrics.decision_cache_hits.get(), 0);
}
