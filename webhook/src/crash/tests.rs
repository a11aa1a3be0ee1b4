use super::*;
use api_script::Call;
use http::{Method, Request, Response};
use kube::client::Body;
use rstest::rstest;
use serde_json::{Value, json};

/// A Deployment's pod (ReplicaSet owner, pod-template-hash) with tether's
/// annotation on `app` unless `injected` is false, and `app`'s status.
fn pod(injected: bool, app_status: Value) -> Pod {
    let mut annotations = json!({});
    if injected {
        annotations["tether.dev/profile.app"] = json!("0123456789ab");
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": "api-7d9f8b6c5d-x2x9z", "generateName": "api-7d9f8b6c5d-", "namespace": "prod",
            "uid": "u-1",
            "labels": {"pod-template-hash": "7d9f8b6c5d"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7d9f8b6c5d",
                                 "uid": "rs", "controller": true}]
        },
        "spec": {"containers": [{"name": "app", "image": "x"}, {"name": "sidecar", "image": "y"}]},
        "status": {"phase": "Running", "containerStatuses": [
            app_status,
            {"name": "sidecar", "ready": true, "restartCount": 0, "image": "y", "imageID": "",
             "state": {"running": {"startedAt": "2026-11-30T22:00:00Z"}}}
        ]}
    }))
    .unwrap()
}

fn app(state: Value, last: Value) -> Value {
    json!({"name": "app", "ready": false, "restartCount": 3, "image": "x", "imageID": "",
           "state": state, "lastState": last})
}

fn terminated(exit: i32, signal: Option<i32>, reason: &str) -> Value {
    let mut t = json!({"exitCode": exit, "reason": reason, "startedAt": "2026-11-30T22:00:00Z",
                       "finishedAt": "2026-11-30T22:00:01Z"});
    if let Some(s) = signal {
        t["signal"] = json!(s);
    }
    json!({"terminated": t})
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

#[rstest]
#[case::exit_159(true, terminated(159, None, "Error"), json!({}), Some("exit_code_159"))]
#[case::exit_159_in_crash_loop(
    true,
    waiting("CrashLoopBackOff", "back-off 40s restarting failed container"),
    terminated(159, None, "Error"),
    Some("exit_code_159")
)]
#[case::sigsys_signal(true, terminated(0, Some(31), "Error"), json!({}), Some("sigsys"))]
#[case::create_container_error_about_seccomp(
    true,
    waiting(
        "CreateContainerError",
        "failed to generate security options for container \"app\": failed to generate seccomp spec opts: cannot load seccomp profile \"/var/lib/kubelet/seccomp/tether/prod/deployment/api/app-0123456789ab.json\": open ...: no such file or directory"
    ),
    json!({}),
    Some("seccomp_load_error")
)]
#[case::create_container_config_error_about_seccomp(
    true,
    waiting("CreateContainerConfigError", "Seccomp profile load failed"),
    json!({}),
    Some("seccomp_load_error")
)]
#[case::create_container_error_about_something_else(
    true,
    waiting("CreateContainerConfigError", "secret \"db\" not found"),
    json!({}),
    None
)]
#[case::oom_killed_137(true, terminated(137, Some(9), "OOMKilled"), json!({}), None)]
#[case::ordinary_failure(true, waiting("CrashLoopBackOff", "back-off"), terminated(1, None, "Error"), None)]
#[case::not_injected_by_tether(false, terminated(159, None, "Error"), json!({}), None)]
fn seccomp_crashes_of_a_pod(
    #[case] injected: bool,
    #[case] state: Value,
    #[case] last: Value,
    #[case] want: Option<&str>,
) {
    let p = pod(injected, app(state, last));
    let crashes = seccomp_crashes(&p);
    assert_eq!(
        crashes.iter().map(|c| c.cause.label()).collect::<Vec<_>>(),
        want.into_iter().collect::<Vec<_>>()
    );
    if let Some(c) = crashes.first() {
        assert_eq!(c.container, "app");
        assert_eq!(c.key.to_string(), "prod/deployment/api/app");
        assert_eq!(c.version, "0123456789ab");
        assert!(c.reason.contains("prod/api-7d9f8b6c5d-x2x9z"), "{}", c.reason);
    }
}

#[test]
fn a_container_already_under_its_fallback_is_not_a_seccomp_crash() {
    let mut p = pod(true, app(terminated(159, None, "Error"), json!({})));
    for value in [
        "fallback:Unconfined",
        "fallback:log:0123456789ab",
        "fallback:RuntimeDefault",
    ] {
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("tether.dev/profile.app".into(), value.into());
        assert!(seccomp_crashes(&p).is_empty(), "{value}");
    }
}

/// The watcher caches slimmed pods: slimming must keep every field the decision reads.
#[test]
fn a_slimmed_pod_gives_the_same_decision() {
    let mut p = crashed_pod();
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("kubectl.kubernetes.io/last-applied-configuration".into(), "{}".into());
    let before = seccomp_crashes(&p);
    assert_eq!(before.len(), 1);
    slim(&mut p);
    assert!(p.spec.is_none());
    assert_eq!(p.metadata.annotations.as_ref().unwrap().len(), 1);
    assert_eq!(seccomp_crashes(&p), before);
}

#[test]
fn a_bare_pod_from_generate_name_maps_to_the_key_admission_gave_it() {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "debug-abcde", "generateName": "debug-", "namespace": "ops",
                     "annotations": {"tether.dev/profile.sh": "0123456789ab"}},
        "spec": {"containers": [{"name": "sh"}]},
        "status": {"initContainerStatuses": [], "containerStatuses": [
            {"name": "sh", "ready": false, "restartCount": 0, "image": "", "imageID": "",
             "state": {"terminated": {"exitCode": 159}}}]}
    }))
    .unwrap();
    let crashes = seccomp_crashes(&p);
    assert_eq!(crashes.len(), 1);
    assert_eq!(crashes[0].key.to_string(), "ops/pod/debug/sh");
}

fn profile(active_created: &str, status: &str, fallback_since: Option<&str>) -> WorkloadProfile {
    let mut wp = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "WorkloadProfile",
        "metadata": {"name": "deployment.api.app", "namespace": "prod", "resourceVersion": "12"},
        "spec": {"workload": {"kind": "deployment", "name": "api", "container": "app"},
                 "versions": [
                    {"version": "0123456789ab", "created": "2026-11-30T20:00:00Z", "runtime": "runc@1.1",
                     "arch": "x86_64", "status": "Validated", "profile": {}},
                    {"version": "ba9876543210", "created": active_created, "runtime": "runc@1.1",
                     "arch": "x86_64", "status": status, "profile": {}}],
                 "activeVersion": "ba9876543210"},
        "status": {}
    });
    if let Some(since) = fallback_since {
        wp["status"]["fallback"] = json!({"reason": "crash", "since": since, "pod": "prod/api-1"});
    }
    serde_json::from_value(wp).unwrap()
}

#[rstest]
#[case::newer_validated_version_active("2026-11-30T23:00:00Z", "Validated", Some("2026-11-30T22:00:00Z"), true)]
#[case::newer_but_draft("2026-11-30T23:00:00Z", "Draft", Some("2026-11-30T22:00:00Z"), false)]
#[case::validated_but_older_than_the_crash("2026-11-30T21:00:00Z", "Validated", Some("2026-11-30T22:00:00Z"), false)]
#[case::no_fallback("2026-11-30T23:00:00Z", "Validated", None, false)]
fn when_a_fallback_ends(#[case] created: &str, #[case] status: &str, #[case] since: Option<&str>, #[case] ends: bool) {
    assert_eq!(fallback_ends(&profile(created, status, since)), ends);
}

const WP: &str = "/apis/tether.dev/v1alpha1/namespaces/prod/workloadprofiles/deployment.api.app";
const WP_STATUS: &str = "/apis/tether.dev/v1alpha1/namespaces/prod/workloadprofiles/deployment.api.app/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/prod/events";

/// Plays the API server for `calls` to what `f` drives; fails on any other call.
async fn scripted<F, Fut>(calls: Vec<Call>, f: F)
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (client, script) = api_script::serve(calls, "default");
    tokio::time::timeout(std::time::Duration::from_secs(5), f(client))
        .await
        .expect("the watcher made a call the scenario does not answer");
    script.finish().await;
}

/// The active version is the crashed pod's (`0123456789ab`).
fn crashed_profile(fallback: bool) -> Value {
    let mut wp = serde_json::to_value(profile("2026-11-30T23:00:00Z", "Validated", None)).unwrap();
    wp["spec"]["activeVersion"] = json!("0123456789ab");
    if fallback {
        wp["status"]["fallback"] = json!({"reason": "set by an operator", "since": "2026-11-30T21:00:00Z"});
    }
    wp
}

fn crashed_pod() -> Pod {
    pod(
        true,
        app(waiting("CrashLoopBackOff", "back-off"), terminated(159, None, "Error")),
    )
}

#[tokio::test]
async fn a_seccomp_crash_puts_the_workload_into_fallback_with_an_event_and_a_metric() {
    let calls = vec![
        Call::new(Method::GET, WP, 200, crashed_profile(false)),
        Call::new(Method::PATCH, WP_STATUS, 200, crashed_profile(false)).check(|b| {
            assert_eq!(b["metadata"]["resourceVersion"], "12", "a compare-and-swap");
            let f = &b["status"]["fallback"];
            assert_eq!(f["pod"], "prod/api-7d9f8b6c5d-x2x9z");
            assert!(f["reason"].as_str().unwrap().contains("exited with code 159"), "{f}");
            assert!(f["since"].as_str().unwrap().parse::<Timestamp>().is_ok(), "{f}");
        }),
        Call::new(
            Method::POST,
            EVENTS,
            201,
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "prod"},
                         "eventTime": "2026-11-30T23:00:00.000000Z"}),
        )
        .check(|b| {
            assert_eq!(b["type"], "Warning");
            assert_eq!(b["reason"], "SeccompFallback");
            assert_eq!(b["regarding"]["kind"], "Pod");
            assert_eq!(b["regarding"]["name"], "api-7d9f8b6c5d-x2x9z");
            assert_eq!(b["related"]["name"], "deployment.api.app");
            assert!(
                b["note"]
                    .as_str()
                    .unwrap()
                    .contains("tether profiles fallback clear prod/deployment/api/app")
            );
        }),
    ];
    let metrics = Metrics::default();
    let m = metrics.clone();
    scripted(calls, |client| async move {
        let mut watcher = Watcher::new(client, "webhook-0", m);
        let done = watcher.on_pod(&crashed_pod()).await;
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1.as_ref().unwrap(), &Outcome::FellBack);
        // The next status update of the same crash-looping pod does nothing.
        assert!(watcher.on_pod(&crashed_pod()).await.is_empty());
    })
    .await;
    let count = metrics
        .crash_fallbacks
        .get_or_create(&CrashLabels {
            reason: "exit_code_159",
        })
        .get();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn an_existing_fallback_is_not_overwritten() {
    let calls = vec![Call::new(Method::GET, WP, 200, crashed_profile(true))];
    scripted(calls, |client| async move {
        let mut watcher = Watcher::new(client, "webhook-0", Metrics::default());
        let done = watcher.on_pod(&crashed_pod()).await;
        assert_eq!(done[0].1.as_ref().unwrap(), &Outcome::AlreadyInFallback);
    })
    .await;
}

#[tokio::test]
async fn a_conflict_rereads_and_then_respects_a_fallback_set_meanwhile() {
    let calls = vec![
        Call::new(Method::GET, WP, 200, crashed_profile(false)),
        Call::new(
            Method::PATCH,
            WP_STATUS,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "reason": "Conflict", "message": "the object has been modified", "code": 409}),
        ),
        Call::new(Method::GET, WP, 200, crashed_profile(true)),
    ];
    scripted(calls, |client| async move {
        let mut watcher = Watcher::new(client, "webhook-0", Metrics::default());
        let done = watcher.on_pod(&crashed_pod()).await;
        assert_eq!(done[0].1.as_ref().unwrap(), &Outcome::AlreadyInFallback);
    })
    .await;
}

#[tokio::test]
async fn a_crash_of_a_version_no_longer_active_changes_nothing() {
    // Active is ba9876543210; the pod ran 0123456789ab.
    let active = serde_json::to_value(profile("2026-11-30T23:00:00Z", "Validated", None)).unwrap();
    let calls = vec![Call::new(Method::GET, WP, 200, active)];
    scripted(calls, |client| async move {
        let mut watcher = Watcher::new(client, "webhook-0", Metrics::default());
        let done = watcher.on_pod(&crashed_pod()).await;
        assert_eq!(done[0].1.as_ref().unwrap(), &Outcome::StaleVersion);
    })
    .await;
}

#[tokio::test]
async fn a_newer_validated_active_version_clears_the_fallback() {
    let calls = vec![
        Call::new(
            Method::PATCH,
            WP_STATUS,
            200,
            serde_json::to_value(profile("2026-11-30T23:00:00Z", "Validated", None)).unwrap(),
        )
        .check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"resourceVersion": "12"}, "status": {"fallback": null}})
            );
        }),
    ];
    scripted(calls, |client| async move {
        let watcher = Watcher::new(client, "webhook-0", Metrics::default());
        let in_fallback = profile("2026-11-30T23:00:00Z", "Validated", Some("2026-11-30T22:00:00Z"));
        assert!(watcher.on_profile(&in_fallback).await.unwrap());
        let draft = profile("2026-11-30T23:00:00Z", "Draft", Some("2026-11-30T22:00:00Z"));
        assert!(!watcher.on_profile(&draft).await.unwrap(), "no call for a draft");
    })
    .await;
}

/// `tether serve --store kube://` spawns the watcher and aborts its task at
/// shutdown: that must end every call to the API server, the Lease election's
/// included (a leaked election would go on holding the Lease for a replica that
/// no longer acts on crashes).
#[tokio::test]
async fn an_aborted_watcher_stops_its_election_too() {
    let wait = std::time::Duration::from_secs(5);
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let task = tokio::spawn(run_crash_watcher(
        client,
        CrashWatcherOptions {
            lease: crate::lease::LeaseConfig::crash_watcher("tether-system", "webhook-0"),
            metrics: Metrics::default(),
        },
    ));
    // Calls stay unanswered (their responders are held), so nothing finishes by
    // itself; wait until the election has made its first call.
    let mut pending = Vec::new();
    loop {
        let (req, send) = tokio::time::timeout(wait, handle.next_request())
            .await
            .expect("the election never read its Lease")
            .expect("the client went away before the election started");
        pending.push(send);
        if req.uri().path().ends_with("/leases/tether-crash-watcher") {
            break;
        }
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // Once every task holding the client is gone, the mock sees no client left.
    while let Some((_, send)) = tokio::time::timeout(wait, handle.next_request())
        .await
        .expect("a task of the aborted watcher still holds the client (the election leaked)")
    {
        pending.push(send);
    }
}

/// Plays the API server for the whole watcher, answering by path: the Lease
/// (held by `holder`, or absent), the lists of pods (one crashed) and
/// WorkloadProfiles, and the fallback calls; watches stay pending. Returns the
/// paths of the write calls made within `window`.
async fn whole_watcher(holder: Option<&'static str>, window: std::time::Duration) -> Vec<String> {
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = writes.clone();
    let pod_json = serde_json::to_value(crashed_pod()).unwrap();
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/tether-system/leases/tether-crash-watcher";
    let (client, routes) = api_script::route("default", move |call| {
        let (method, path) = (call.method.as_str(), call.path.as_str());
        if method != "GET" {
            seen.lock().unwrap().push(format!("{method} {path}"));
        }
        match (method, path) {
            ("GET", p) if p == lease_path => match holder {
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "reason": "NotFound", "code": 404}),
                ),
                Some(h) => (
                    200,
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "tether-crash-watcher", "namespace": "tether-system", "resourceVersion": "1"},
                    // Renewed "now" on every read: a live holder.
                    "spec": {"holderIdentity": h, "leaseDurationSeconds": 15,
                             "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}}),
                ),
            },
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/tether-system/leases") => (
                201,
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "tether-crash-watcher", "namespace": "tether-system", "resourceVersion": "2"}}),
            ),
            ("GET", "/api/v1/pods") => (
                200,
                json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "5"}, "items": [pod_json.clone()]}),
            ),
            ("GET", "/apis/tether.dev/v1alpha1/workloadprofiles") => (
                200,
                json!({
                "apiVersion": "tether.dev/v1alpha1", "kind": "WorkloadProfileList",
                "metadata": {"resourceVersion": "6"}, "items": [crashed_profile(false)]}),
            ),
            ("GET", WP) => (200, crashed_profile(false)),
            ("PATCH", WP_STATUS) => (200, crashed_profile(false)),
            ("POST", EVENTS) => (
                201,
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "e", "namespace": "prod"}, "eventTime": "2026-11-30T23:00:00.000000Z"}),
            ),
            _ => panic!("unexpected call {method} {path}?{}", call.query),
        }
    });
    let mut lease = crate::lease::LeaseConfig::crash_watcher("tether-system", "webhook-0");
    lease.retry = std::time::Duration::from_millis(50);
    let opts = CrashWatcherOptions {
        lease,
        metrics: Metrics::default(),
    };
    let _ = tokio::time::timeout(window, run_crash_watcher(client, opts)).await;
    routes.finish().await;
    writes.lock().unwrap().clone()
}

#[tokio::test]
async fn the_leader_puts_a_crashed_workload_into_fallback() {
    let writes = whole_watcher(None, std::time::Duration::from_millis(1500)).await;
    assert!(writes.contains(&format!("PATCH {WP_STATUS}")), "{writes:?}");
    assert!(writes.contains(&format!("POST {EVENTS}")), "{writes:?}");
    let patches = writes.iter().filter(|w| w.starts_with("PATCH")).count();
    assert_eq!(patches, 1, "acted once on the crash: {writes:?}");
}

#[tokio::test]
async fn a_follower_does_not_act() {
    let writes = whole_watcher(Some("webhook-1"), std::time::Duration::from_millis(1500)).await;
    assert!(writes.is_empty(), "{writes:?}");
}
