//! The Kubernetes-fed index against a scripted API server (tower-test): every
//! list and watch the reflectors make must be in the script, and every scripted
//! call must be made.

use super::*;
use crate::decide::{Action, decide};
use crate::index::Lookup;
use crate::policy::{Mode, OnMissing, Policy};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use profile_store::SeccompProfile;
use profile_store::render::SyscallRule;
use profile_store::store::localhost_profile;
use serde_json::{Value, json};
use std::collections::VecDeque;
use tokio::sync::mpsc;
use tower_test::mock::{Handle, SendResponse};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Res {
    Profiles,
    Installations,
    Namespaces,
}

/// What the API server does with the next call for a resource.
#[derive(Debug)]
enum Call {
    /// Expect a list; answer with these items.
    List(Vec<Value>),
    /// Expect a watch; answer with these events, then end the response (the
    /// watcher watches again from the last resourceVersion).
    Watch(Vec<Value>),
    /// Expect a watch; fail it with this HTTP status.
    WatchFails(u16),
    /// Expect a call and leave it open (a watch with nothing to say, or a list
    /// answered later with [`ApiServer::answer`]).
    Hold,
}

/// A scripted API server for the three resources the index watches.
struct ApiServer {
    answers: mpsc::UnboundedSender<(Res, Call)>,
    failures: Arc<Mutex<Vec<String>>>,
    left: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<HashMap<Res, usize>>>,
}

impl ApiServer {
    /// Starts serving `script` (per resource, in order).
    fn start(script: Vec<(Res, Vec<Call>)>) -> (kube::Client, ApiServer) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (answers, rx) = mpsc::unbounded_channel();
        let failures = Arc::new(Mutex::new(Vec::new()));
        let left = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let scripts = script.into_iter().map(|(r, calls)| (r, calls.into())).collect();
        tokio::spawn(serve(
            handle,
            scripts,
            rx,
            failures.clone(),
            left.clone(),
            calls.clone(),
        ));
        (
            client,
            ApiServer {
                answers,
                failures,
                left,
                calls,
            },
        )
    }

    /// How many calls for `res` have arrived.
    fn calls(&self, res: Res) -> usize {
        self.calls.lock().unwrap().get(&res).copied().unwrap_or(0)
    }

    /// Answers the call held open for `res` with `call`, or, when none is held,
    /// expects `call` as the next call for `res`.
    fn answer(&self, res: Res, call: Call) {
        self.answers.send((res, call)).unwrap();
    }

    /// Fails the test on any call out of script, and on scripted calls never made.
    async fn verify(&self) {
        // Let calls in flight reach the server.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let failures = self.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "unexpected calls: {failures:#?}");
        let left = self.left.lock().unwrap().clone();
        assert!(left.is_empty(), "scripted calls never made: {left:#?}");
    }
}

fn classify(req: &Request<Body>) -> Option<(Res, bool)> {
    let path = req.uri().path();
    let watch = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|p| p == "watch=true");
    let res = match path {
        "/apis/tether.dev/v1alpha1/workloadprofiles" => Res::Profiles,
        "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations" => Res::Installations,
        "/api/v1/namespaces" => Res::Namespaces,
        _ => return None,
    };
    (req.method() == http::Method::GET).then_some((res, watch))
}

fn list_kind(res: Res) -> (&'static str, &'static str) {
    match res {
        Res::Profiles => ("tether.dev/v1alpha1", "WorkloadProfileList"),
        Res::Installations => ("tether.dev/v1alpha1", "ProfileInstallationList"),
        Res::Namespaces => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
    }
}

fn respond(send: SendResponse<Response<Body>>, res: Res, watch: bool, call: Call) -> Result<(), String> {
    let json = |status: StatusCode, body: Vec<u8>| Response::builder().status(status).body(Body::from(body)).unwrap();
    match (call, watch) {
        (Call::List(items), false) => {
            let (api_version, kind) = list_kind(res);
            let list = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items});
            send.send_response(json(StatusCode::OK, serde_json::to_vec(&list).unwrap()));
        }
        (Call::Watch(events), true) => {
            let mut body = Vec::new();
            for e in events {
                body.extend(serde_json::to_vec(&e).unwrap());
                body.push(b'\n');
            }
            send.send_response(json(StatusCode::OK, body));
        }
        (Call::WatchFails(code), true) => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "workloadprofiles.tether.dev is forbidden", "reason": "Forbidden", "code": code});
            send.send_response(json(
                StatusCode::from_u16(code).unwrap(),
                serde_json::to_vec(&status).unwrap(),
            ));
        }
        (call, watch) => {
            return Err(format!(
                "{res:?}: a {} call, but the script says {call:?}",
                if watch { "watch" } else { "list" }
            ));
        }
    }
    Ok(())
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    mut scripts: HashMap<Res, VecDeque<Call>>,
    mut answers: mpsc::UnboundedReceiver<(Res, Call)>,
    failures: Arc<Mutex<Vec<String>>>,
    left: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<HashMap<Res, usize>>>,
) {
    let mut held: HashMap<Res, (bool, SendResponse<Response<Body>>)> = HashMap::new();
    let fail = |msg: String| failures.lock().unwrap().push(msg);
    let report_left = |scripts: &HashMap<Res, VecDeque<Call>>| {
        *left.lock().unwrap() = scripts
            .iter()
            .flat_map(|(r, calls)| calls.iter().map(move |c| format!("{r:?}: {c:?}")))
            .collect();
    };
    report_left(&scripts);
    loop {
        tokio::select! {
            request = handle.next_request() => {
                let Some((req, send)) = request else { return };
                let Some((res, watch)) = classify(&req) else {
                    fail(format!("{} {}", req.method(), req.uri()));
                    continue;
                };
                *calls.lock().unwrap().entry(res).or_default() += 1;
                match scripts.get_mut(&res).and_then(VecDeque::pop_front) {
                    None => fail(format!("{res:?}: an unscripted {} ({})", if watch { "watch" } else { "list" }, req.uri())),
                    Some(Call::Hold) => { held.insert(res, (watch, send)); }
                    Some(call) => if let Err(e) = respond(send, res, watch, call) { fail(e) },
                }
            }
            answer = answers.recv() => {
                let Some((res, call)) = answer else { return };
                match held.remove(&res) {
                    Some((watch, send)) => if let Err(e) = respond(send, res, watch, call) { fail(e) },
                    None => scripts.entry(res).or_default().push_back(call),
                }
            }
        }
        report_left(&scripts);
    }
}

// ---- objects ----

fn profile(extra: &str) -> SeccompProfile {
    SeccompProfile {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno_ret: Some(1),
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        syscalls: vec![SyscallRule {
            names: vec!["exit_group".into(), extra.into()],
            action: "SCMP_ACT_ALLOW".into(),
            errno_ret: None,
        }],
    }
}

fn key() -> WorkloadKey {
    "shop/deployment/api/app".parse().unwrap()
}

/// The WorkloadProfile of `key()`, with `versions` (oldest first, all Validated).
fn workload_profile(rv: &str, versions: &[&SeccompProfile], fallback: Option<&str>) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|p| {
            json!({"version": p.version().to_string(), "created": "2026-11-30T10:00:00Z", "runtime": "runc-1.1",
                   "arch": "x86_64", "status": "Validated", "needsReview": [], "profile": serde_json::to_value(p).unwrap()})
        })
        .collect();
    let mut wp = json!({"apiVersion": "tether.dev/v1alpha1", "kind": "WorkloadProfile",
        "metadata": {"name": "deployment.api.app", "namespace": "shop", "uid": "u-1", "resourceVersion": rv},
        "spec": {"workload": {"kind": "deployment", "name": "api", "container": "app"}, "versions": versions}});
    if let Some(reason) = fallback {
        wp["status"] = json!({"fallback": {"reason": reason, "since": "2026-11-30T11:00:00Z"}});
    }
    wp
}

/// The localhostProfiles of `p` and of its Log-mode variant.
fn files(p: &SeccompProfile) -> [String; 2] {
    [
        localhost_profile(&key(), &p.version()),
        localhost_profile(&key(), &p.log_variant().version()),
    ]
}

fn installation(node: &str, ready: bool, heartbeat_age_secs: i64, installed: &[&[String; 2]]) -> Value {
    let beat = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_secs(heartbeat_age_secs))
        .unwrap();
    let installed: Vec<&String> = installed.iter().flat_map(|f| f.iter()).collect();
    json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ProfileInstallation",
        "metadata": {"name": node, "namespace": "tether-system", "resourceVersion": "7"},
        "spec": {"nodeName": node},
        "status": {"ready": ready, "heartbeat": beat.to_string(), "installed": installed}})
}

fn namespace(name: &str, rv: &str, labels: Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}})
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

// ---- harness ----

struct Running {
    shared: Arc<SharedIndex>,
    live: LiveNamespaces,
    metrics: Metrics,
    server: ApiServer,
    _watch: KubeWatch,
}

fn options() -> KubeIndexOptions {
    KubeIndexOptions {
        installer_namespace: "tether-system".into(),
        gate: InstallGate::AllReady,
        staleness: Duration::from_secs(120),
        debounce: Duration::from_millis(5),
        recheck: Duration::from_secs(3600),
    }
}

fn start(script: Vec<(Res, Vec<Call>)>, opts: KubeIndexOptions) -> Running {
    let (client, server) = ApiServer::start(script);
    let shared = Arc::new(SharedIndex::default());
    let live = LiveNamespaces::default();
    let metrics = Metrics::default();
    let watch = watch_kube(client, shared.clone(), live.clone(), opts, metrics.clone());
    Running {
        shared,
        live,
        metrics,
        server,
        _watch: watch,
    }
}

/// Waits (up to 5 s) for `cond`.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The scripts of a first list of each resource, then open watches.
fn listed(profiles: Vec<Value>, installations: Vec<Value>, namespaces: Vec<Value>) -> Vec<(Res, Vec<Call>)> {
    vec![
        (Res::Profiles, vec![Call::List(profiles), Call::Hold]),
        (Res::Installations, vec![Call::List(installations), Call::Hold]),
        (Res::Namespaces, vec![Call::List(namespaces), Call::Hold]),
    ]
}

impl Running {
    async fn ready(&self) {
        until("the index is loaded", || self.shared.health().0).await;
    }

    fn entry(&self) -> Option<Entry> {
        self.shared.get().entry(&key()).cloned()
    }
}

// ---- scenarios ----

#[tokio::test]
async fn an_active_version_installed_on_every_ready_node_is_injected() {
    let (v1, v2) = (profile("read"), profile("write"));
    let r = start(
        listed(
            vec![workload_profile("10", &[&v1, &v2], None)],
            vec![
                installation("node-a", true, 5, &[&files(&v1), &files(&v2)]),
                installation("node-b", true, 30, &[&files(&v2)]),
                // Not ready, or silent for longer than the staleness: not waited for.
                installation("node-c", false, 5, &[]),
                installation("node-d", true, 600, &[]),
            ],
            vec![],
        ),
        options(),
    );
    r.ready().await;
    let entry = r.entry().expect("the workload is indexed");
    assert_eq!(entry.active, Some(v2.version()));
    assert_eq!(entry.log_variant, Some(v2.log_variant().version()));
    assert!(entry.known.contains(&v1.version()) && entry.known.contains(&v1.log_variant().version()));
    assert_eq!(r.metrics.ready_installers.get(), 2);
    assert_eq!(r.metrics.held_back_workloads.get(), 0);
    r.server.verify().await;
}

#[tokio::test]
async fn a_version_missing_on_a_node_falls_back_to_the_previous_installed_version() {
    let (v1, v2) = (profile("read"), profile("write"));
    let r = start(
        listed(
            vec![workload_profile("10", &[&v1, &v2], Some("SIGSYS in api-7d9f-x"))],
            vec![
                installation("node-a", true, 5, &[&files(&v1), &files(&v2)]),
                installation("node-b", true, 5, &[&files(&v1)]),
            ],
            vec![],
        ),
        options(),
    );
    r.ready().await;
    let entry = r.entry().unwrap();
    assert_eq!(entry.active, Some(v1.version()));
    assert_eq!(entry.log_variant, Some(v1.log_variant().version()));
    assert_eq!(entry.fallback.as_deref(), Some("SIGSYS in api-7d9f-x"));
    assert_eq!(r.metrics.held_back_workloads.get(), 1);

    // node-b catches up: the active version is injected from the next rebuild on.
    r.server.answer(
        Res::Installations,
        Call::Watch(vec![event(
            "MODIFIED",
            installation("node-b", true, 1, &[&files(&v1), &files(&v2)]),
        )]),
    );
    r.server.answer(Res::Installations, Call::Hold);
    until("node-b's report is seen", || {
        r.entry().and_then(|e| e.active) == Some(v2.version())
    })
    .await;
    assert_eq!(r.metrics.held_back_workloads.get(), 0);
    r.server.verify().await;
}

#[tokio::test]
async fn nothing_installed_means_on_missing() {
    let v1 = profile("read");
    let r = start(
        listed(
            vec![workload_profile("10", &[&v1], None)],
            vec![installation("node-a", true, 5, &[])],
            vec![],
        ),
        options(),
    );
    r.ready().await;
    let entry = r.entry().unwrap();
    assert_eq!((entry.active.clone(), entry.log_variant.clone()), (None, None));
    // decide() applies on-missing to such a workload.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "api-7d9f-", "labels": {"pod-template-hash": "7d9f"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7d9f", "uid": "x", "controller": true}]},
        "spec": {"containers": [{"name": "app", "image": "api"}]}
    }))
    .unwrap();
    let policy = Policy {
        on_missing: OnMissing::RuntimeDefault,
        ..Policy::default()
    };
    let view = policy.namespace("shop", None);
    let decision = decide(
        &crate::slim::PodView::of(&pod),
        "shop",
        &view,
        policy.on_missing,
        &*r.shared.get(),
    );
    assert_eq!(decision.containers[0].action, Action::RuntimeDefault);
    r.server.verify().await;
}

#[tokio::test]
async fn with_no_ready_installer_nothing_is_injectable_unless_gating_is_off() {
    let v1 = profile("read");
    let script = || {
        listed(
            vec![workload_profile("10", &[&v1], None)],
            vec![installation("node-a", true, 3600, &[&files(&v1)])],
            vec![],
        )
    };
    let gated = start(script(), options());
    gated.ready().await;
    assert_eq!(gated.entry().unwrap().active, None);
    assert_eq!(gated.metrics.ready_installers.get(), 0);
    gated.server.verify().await;

    let ungated = start(
        script(),
        KubeIndexOptions {
            gate: InstallGate::None,
            ..options()
        },
    );
    ungated.ready().await;
    assert_eq!(ungated.entry().unwrap().active, Some(v1.version()));
    ungated.server.verify().await;
}

#[tokio::test]
async fn a_namespace_labelled_dry_run_is_dry_run() {
    let r = start(
        listed(
            vec![],
            vec![],
            vec![
                namespace(
                    "staging",
                    "3",
                    json!({"tether.dev/mode": "dry-run", "pod-security.kubernetes.io/enforce": "restricted", "team": "x"}),
                ),
                namespace("shop", "4", json!({})),
            ],
        ),
        options(),
    );
    r.ready().await;
    let mut policy = Policy::from_yaml("namespaces:\n  shop:\n    labels: {tether.dev/mode: \"off\"}\n  new:\n    labels: {tether.dev/mode: \"off\"}\n").unwrap();
    policy.live_namespaces = Some(r.live.clone());
    let staging = policy.namespace("staging", None);
    assert_eq!(staging.mode, Mode::DryRun);
    assert!(staging.psa_forbids_unconfined);
    // The API server's labels win over the config's for a namespace it reported...
    assert_eq!(policy.namespace("shop", None).mode, Mode::Enforce);
    // ...and the config still answers for one the reflector has not seen yet.
    assert_eq!(policy.namespace("new", None).mode, Mode::Off);

    // A label change reaches admission without a restart.
    r.server.answer(
        Res::Namespaces,
        Call::Watch(vec![event(
            "MODIFIED",
            namespace("staging", "5", json!({"tether.dev/mode": "enforce"})),
        )]),
    );
    r.server.answer(Res::Namespaces, Call::Hold);
    until("the label change is seen", || {
        policy.namespace("staging", None).mode == Mode::Enforce
    })
    .await;
    assert!(!policy.namespace("staging", None).psa_forbids_unconfined);
    r.server.verify().await;
}

#[tokio::test]
async fn readiness_waits_for_every_reflector() {
    let r = start(
        vec![
            (Res::Profiles, vec![Call::List(vec![]), Call::Hold]),
            (Res::Installations, vec![Call::List(vec![]), Call::Hold]),
            // The namespace list is slow.
            (Res::Namespaces, vec![Call::Hold]),
        ],
        options(),
    );
    until("every reflector called", || {
        r.server.calls(Res::Profiles) >= 2
            && r.server.calls(Res::Installations) >= 2
            && r.server.calls(Res::Namespaces) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!r.shared.health().0, "ready before the namespaces were listed");
    r.server.answer(Res::Namespaces, Call::List(vec![]));
    r.server.answer(Res::Namespaces, Call::Hold);
    r.ready().await;
    r.server.verify().await;
}

#[tokio::test]
async fn a_watch_error_keeps_the_previous_index_and_readiness_says_stale() {
    let (v1, v2) = (profile("read"), profile("write"));
    let everywhere = [&files(&v1), &files(&v2)];
    let r = start(
        listed(
            vec![workload_profile("10", &[&v1], None)],
            vec![installation("node-a", true, 5, &everywhere)],
            vec![],
        ),
        options(),
    );
    r.ready().await;
    let before = r.shared.get();
    assert_eq!(before.entry(&key()).unwrap().active, Some(v1.version()));

    r.server.answer(Res::Profiles, Call::WatchFails(403));
    // The watcher retries (after its backoff) and the watch stays open.
    r.server.answer(Res::Profiles, Call::Hold);
    until("readiness reports the error", || r.shared.health().1.is_some()).await;
    let (loaded, error) = r.shared.health();
    assert!(loaded, "a watch error must not make the webhook unready");
    assert!(error.unwrap().contains("workloadprofiles.tether.dev"));
    assert!(Arc::ptr_eq(&before, &r.shared.get()), "the index in service changed");
    assert_eq!(r.metrics.index_load_failures.get(), 1);

    // The watch recovers: the next event clears the error and is indexed.
    until("the watcher retried", || r.server.calls(Res::Profiles) >= 3).await;
    r.server.answer(
        Res::Profiles,
        Call::Watch(vec![event("MODIFIED", workload_profile("11", &[&v1, &v2], None))]),
    );
    r.server.answer(Res::Profiles, Call::Hold);
    until("the update is indexed", || {
        r.entry().and_then(|e| e.active) == Some(v2.version())
    })
    .await;
    until("the error clears", || r.shared.health().1.is_none()).await;
    r.server.verify().await;
}

#[tokio::test]
async fn unchanged_entries_are_shared_and_tampered_versions_are_never_injected() {
    let (v1, v2) = (profile("read"), profile("write"));
    let mut tampered = workload_profile("10", &[&v1, &v2], None);
    // The newest version's profile was edited by hand: its content no longer
    // matches its version.
    tampered["spec"]["versions"][1]["profile"]["syscalls"][0]["names"] = json!(["exit_group", "ptrace"]);
    let other = {
        let mut o = workload_profile("20", &[&v1], None);
        o["metadata"]["name"] = json!("deployment.web.app");
        o["metadata"]["uid"] = json!("u-2");
        o["spec"]["workload"]["name"] = json!("web");
        o
    };
    let web: WorkloadKey = "shop/deployment/web/app".parse().unwrap();
    let r = start(
        listed(
            vec![tampered, other.clone()],
            vec![installation(
                "node-a",
                true,
                5,
                &[
                    &files(&v1),
                    &files(&v2),
                    &[
                        localhost_profile(&web, &v1.version()),
                        localhost_profile(&web, &v1.log_variant().version()),
                    ],
                ],
            )],
            vec![],
        ),
        options(),
    );
    r.ready().await;
    let entry = r.entry().unwrap();
    assert_eq!(entry.active, Some(v1.version()), "the tampered version was injected");
    assert!(!entry.known.contains(&v2.version()));
    let web_before = r.shared.get().entry(&web).cloned().unwrap();
    let shared_before = Arc::as_ptr(r.shared.get().shared_entry(&web).unwrap());

    // A change to the first workload only: the second one's entry is reused.
    r.server.answer(
        Res::Profiles,
        Call::Watch(vec![event("MODIFIED", workload_profile("12", &[&v1, &v2], None))]),
    );
    r.server.answer(Res::Profiles, Call::Hold);
    until("the change is indexed", || {
        r.entry().and_then(|e| e.active) == Some(v2.version())
    })
    .await;
    let index = r.shared.get();
    assert_eq!(index.entry(&web), Some(&web_before));
    assert_eq!(
        Arc::as_ptr(index.shared_entry(&web).unwrap()),
        shared_before,
        "an unchanged entry was rebuilt"
    );
    r.server.verify().await;
}
