//! The installer's loop: reflectors on the cluster's `WorkloadProfile`s and on
//! the pods of this node feed [`Installer::reconcile`], which writes, checks and
//! removes files; every pass (on a change, and at least every heartbeat) ends
//! with the node's report.

use crate::node::{Installed, NodeDir, NodeError, Verified};
use crate::plan::{Gc, PlanOptions, desired, referenced_by};
use crate::report::{ReportError, Reporter};
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use profile_store::crd::{ProfileInstallationStatus, WorkloadProfile};
use profile_store::store::NodeFile;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How the installer runs (`tether install`).
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// This node's name (the pods watched are those with `spec.nodeName` = it,
    /// and it names the `ProfileInstallation`).
    pub node_name: String,
    /// The kubelet's root directory; files go to `<root>/seccomp/tether/`.
    pub kubelet_root: PathBuf,
    /// Where the `ProfileInstallation`s live.
    pub namespace: String,
    /// How long a file must be unneeded and unreferenced before it is removed.
    pub grace: Duration,
    /// What to keep of each workload.
    pub plan: PlanOptions,
    /// The longest time between two reports.
    pub heartbeat: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
}

/// Why the installer stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A watch ended for good (its store was dropped).
    #[error("the {0} watch stopped")]
    WatchEnded(&'static str),
}

/// The installer's metrics (prefix `tether_installer_`); cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Verified version files on the node.
    pub installed: Gauge,
    /// Files written.
    pub writes: Counter,
    /// Files removed.
    pub removals: Counter,
    /// Files that do not hash to their version.
    pub hash_mismatches: Gauge,
    /// Objects or versions that could not be planned.
    pub problems: Gauge,
    /// Passes that failed to write, check, remove or report.
    pub errors: Counter,
    /// Watch errors (the watch retries with backoff).
    pub watch_errors: Counter,
}

impl Metrics {
    /// A registry with every metric.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("tether_installer");
        r.register("files", "Verified profile files on this node", self.installed.clone());
        r.register("writes", "Profile files written", self.writes.clone());
        r.register("removals", "Profile files removed", self.removals.clone());
        r.register(
            "hash_mismatches",
            "Files on this node that do not hash to their version (altered; never rewritten)",
            self.hash_mismatches.clone(),
        );
        r.register(
            "plan_problems",
            "WorkloadProfile versions that cannot be installed (invalid key, altered profile)",
            self.problems.clone(),
        );
        r.register(
            "pass_errors",
            "Passes that failed to write, check, remove or report files",
            self.errors.clone(),
        );
        r.register(
            "watch_errors",
            "Watch errors (retried with backoff)",
            self.watch_errors.clone(),
        );
        r
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Every `localhostProfile` present and verified after the pass, sorted.
    pub installed: Vec<String>,
    /// Files written.
    pub written: Vec<String>,
    /// Files removed.
    pub removed: Vec<String>,
    /// Failures of this node (I/O, altered files).
    pub errors: Vec<NodeError>,
    /// Whether the tree was read, so that `installed` is what the node holds.
    /// Without it the pass has nothing true to report.
    pub scanned: bool,
    /// Versions that cannot be installed anywhere (bad objects), as messages.
    pub problems: Vec<String>,
}

/// The installer's state between passes.
#[derive(Debug)]
pub struct Installer {
    node: NodeDir,
    plan: PlanOptions,
    gc: Gc,
    verified: Verified,
    /// Each object's planned files and problems, by `namespace/name`, with the
    /// resourceVersion they were planned from: a pass re-plans (parses and
    /// hashes the inline profiles of) only objects that changed.
    planned: HashMap<String, Planned>,
}

#[derive(Debug)]
struct Planned {
    resource_version: String,
    files: Vec<NodeFile>,
    problems: Vec<String>,
}

impl Installer {
    /// An installer writing under `node`.
    pub fn new(node: NodeDir, plan: PlanOptions, grace: Duration) -> Installer {
        Installer {
            node,
            plan,
            gc: Gc::new(grace),
            verified: Verified::default(),
            planned: HashMap::new(),
        }
    }

    /// The files `profiles` need, by `localhostProfile`; problems are appended to
    /// `problems`.
    fn plan_of<'a>(
        &mut self,
        profiles: impl IntoIterator<Item = &'a WorkloadProfile>,
        problems: &mut Vec<String>,
    ) -> BTreeMap<String, NodeFile> {
        let mut seen = HashMap::new();
        let mut files = BTreeMap::new();
        for wp in profiles {
            let id = wp.display_name();
            let rv = wp.metadata.resource_version.clone();
            let planned = match (self.planned.remove(&id), rv) {
                (Some(p), Some(rv)) if p.resource_version == rv => p,
                (_, rv) => {
                    let d = desired([wp], self.plan);
                    Planned {
                        // Objects without one (tests) are planned on every pass.
                        resource_version: rv.unwrap_or_default(),
                        files: d.files.into_values().collect(),
                        problems: d.problems.iter().map(|p| p.to_string()).collect(),
                    }
                }
            };
            for f in &planned.files {
                files.insert(f.localhost_profile.clone(), f.clone());
            }
            problems.extend(planned.problems.iter().cloned());
            if !planned.resource_version.is_empty() {
                seen.insert(id, planned);
            }
        }
        self.planned = seen;
        files
    }

    /// One pass: write the desired files that are missing, verify what is
    /// there, and remove what has been unneeded and unreferenced for the grace
    /// period. Call it only with complete views (synced reflectors): an empty
    /// view would make every file look unneeded.
    pub fn reconcile<'a>(
        &mut self,
        profiles: impl IntoIterator<Item = &'a WorkloadProfile>,
        pods: impl IntoIterator<Item = &'a Pod>,
        now: Instant,
    ) -> Pass {
        let mut pass = Pass::default();
        let want = self.plan_of(profiles, &mut pass.problems);
        // Look first, then write only what is missing: an intact file is never
        // touched, and an altered one is reported by the scan, not rewritten.
        let mut scan = match self.node.scan(&mut self.verified) {
            Ok(s) => {
                pass.scanned = true;
                s
            }
            Err(e) => {
                pass.errors.push(e);
                return pass;
            }
        };
        for (path, file) in &want {
            if scan.verified.contains(path) || scan.altered.contains(path) {
                continue;
            }
            match self.node.install(file) {
                Ok(Installed::Written) => {
                    pass.written.push(path.clone());
                    scan.verified.insert(path.clone());
                }
                Ok(Installed::Present) => {
                    scan.verified.insert(path.clone());
                }
                Err(e) => pass.errors.push(e),
            }
        }
        pass.errors.extend(scan.mismatched);
        let referenced: BTreeSet<String> = pods.into_iter().flat_map(referenced_by).map(str::to_string).collect();
        let wanted: BTreeSet<String> = want.into_keys().collect();
        let mut installed = scan.verified;
        for path in self.gc.plan(&installed, &wanted, &referenced, now) {
            match self.node.remove(&path) {
                Ok(()) => {
                    self.gc.removed(&path);
                    installed.remove(&path);
                    pass.removed.push(path);
                }
                Err(e) => pass.errors.push(e),
            }
        }
        pass.installed = installed.into_iter().collect();
        pass
    }
}

/// The status a pass reports. `ready` says that `installed` is exactly what the
/// node holds: a file that could not be written or was altered is left out of
/// `installed` (so the webhook does not inject it), but does not make the report
/// untrue. A node reported not ready would be left out of install gating, and
/// pods could be admitted with versions it lacks.
pub fn status_of(pass: &Pass, now: jiff::Timestamp) -> ProfileInstallationStatus {
    ProfileInstallationStatus {
        ready: pass.scanned,
        heartbeat: Some(now.to_string()),
        installed: pass.installed.clone(),
    }
}

/// Runs the installer until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    opts: InstallOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = match opts.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?;
            let app = health_router(metrics.registry(), ready.clone());
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                let done = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(done).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            }))
        }
        None => None,
    };
    let result = tokio::select! {
        r = watch_and_install(client, &opts, &metrics, &ready) => r,
        () = shutdown => Ok(()),
    };
    let _ = stop_tx.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    result
}

async fn watch_and_install(
    client: kube::Client,
    opts: &InstallOptions,
    metrics: &Metrics,
    ready: &AtomicBool,
) -> Result<(), RunError> {
    let (profiles, profiles_writer) = reflector::store::<WorkloadProfile>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let profile_events = reflector(
        profiles_writer,
        watcher(Api::<WorkloadProfile>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|e| ("WorkloadProfile", e.map(|_| ())));
    let pod_events = reflector(
        pods_writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name)),
        ),
    )
    .default_backoff()
    .map(|e| ("Pod", e.map(|_| ())));
    let mut events = std::pin::pin!(futures_util::stream::select(profile_events, pod_events));
    let mut installer = Installer::new(NodeDir::new(&opts.kubelet_root), opts.plan, opts.grace);
    let mut reporter = Reporter::new(client, &opts.namespace, &opts.node_name);
    let mut tick = tokio::time::interval(opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some((_, Ok(()))) => {
                    dirty = true;
                    continue;
                }
                Some((what, Err(e))) => {
                    metrics.watch_errors.inc();
                    tracing::warn!(watch = what, error = %e, "watch error; retrying");
                    continue;
                }
                None => return Err(RunError::WatchEnded("WorkloadProfile and Pod")),
            },
            _ = tick.tick() => dirty = true,
            // Changes come in bursts (a build updates many profiles): let it
            // settle before a pass.
            _ = tokio::time::sleep(Duration::from_secs(1)), if dirty => {}
        }
        if !dirty {
            continue;
        }
        // Until both views are complete, a pass would take every file for
        // unneeded: wait for the first full lists.
        if profiles.wait_until_ready().now_or_never().is_none() || pods.wait_until_ready().now_or_never().is_none() {
            continue;
        }
        dirty = false;
        let profiles = profiles.state();
        let pods = pods.state();
        // Inline: a pass reads and writes a few KiB per version, and the loop has
        // nothing else to do meanwhile (the reflectors buffer their events).
        let pass = installer.reconcile(profiles.iter().map(|p| &**p), pods.iter().map(|p| &**p), Instant::now());
        record(&pass, metrics);
        if !pass.scanned {
            // Nothing true to report: the last report stands until its heartbeat
            // goes stale.
            ready.store(false, Ordering::Relaxed);
            continue;
        }
        let status = status_of(&pass, jiff::Timestamp::now());
        match reporter.report(&status).await {
            // The pod is ready (rollouts go on) only when every file is fine.
            Ok(()) => ready.store(pass.errors.is_empty(), Ordering::Relaxed),
            Err(e) => {
                metrics.errors.inc();
                ready.store(false, Ordering::Relaxed);
                log_report_error(&e);
            }
        }
    }
}

fn log_report_error(e: &ReportError) {
    tracing::error!(error = %e, "cannot report this node's profiles; the webhook will not inject new versions here");
}

fn record(pass: &Pass, metrics: &Metrics) {
    metrics.installed.set(pass.installed.len() as i64);
    metrics.writes.inc_by(pass.written.len() as u64);
    metrics.removals.inc_by(pass.removed.len() as u64);
    metrics.problems.set(pass.problems.len() as i64);
    let mismatches = pass
        .errors
        .iter()
        .filter(|e| matches!(e, NodeError::HashMismatch { .. }))
        .count();
    metrics.hash_mismatches.set(mismatches as i64);
    if !pass.errors.is_empty() {
        metrics.errors.inc();
    }
    for path in &pass.written {
        tracing::info!(file = %path, "installed");
    }
    for path in &pass.removed {
        tracing::info!(file = %path, "removed: no longer needed and no pod on this node references it");
    }
    for e in &pass.errors {
        tracing::error!(error = %e, "profile file problem on this node");
    }
    for p in &pass.problems {
        tracing::warn!(problem = %p, "version not installed");
    }
}

fn health_router(registry: Registry, ready: Arc<AtomicBool>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let registry = Arc::new(registry);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            text,
                        ),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain")],
                            e.to_string(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not caught up: watches not synced, a file could not be written or checked, or the report failed",
                        )
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use crate::plan::tests::version;
    use profile_store::crd::VersionState;
    use profile_store::{SeccompProfile, WorkloadKey};
    use serde_json::{Value, json};

    /// `prod/deployment/api/app` with a Validated version per list of calls.
    fn wp(versions: &[&[&str]]) -> WorkloadProfile {
        let versions = versions
            .iter()
            .map(|calls| version(calls, VersionState::Validated))
            .collect();
        plan::tests::wp("prod", versions, None)
    }

    fn pod_using(path: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "api-1", "namespace": "prod"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app",
                "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": path}}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    /// The whole pass against a real directory: a superseded version stays while
    /// a pod uses it, and goes only after the grace period once unused.
    #[test]
    fn a_superseded_version_is_removed_only_unreferenced_and_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(300);
        let mut installer = Installer::new(NodeDir::new(dir.path()), PlanOptions { keep_recent: 0 }, grace);
        let t0 = Instant::now();
        let v1 = wp(&[&["read"]]);
        let first = installer.reconcile([&v1], [], t0);
        assert_eq!(first.written.len(), 2, "the version and its Log-mode variant");
        assert_eq!(first.installed, first.written);
        assert!(first.errors.is_empty());
        let key: WorkloadKey = "prod/deployment/api/app".parse().unwrap();
        let old = profile_store::store::localhost_profile(&key, &v1.spec.versions[0].version.parse().unwrap());
        assert!(first.installed.contains(&old));

        // v2 becomes active; a pod still runs v1.
        let v2 = wp(&[&["read"], &["read", "write"]]);
        let pod = pod_using(&old);
        let second = installer.reconcile([&v2], [&pod], t0 + grace * 2);
        assert_eq!(second.written.len(), 2);
        assert_eq!(second.installed.len(), 4);
        assert!(second.removed.is_empty());
        // The pod is gone: v1's Log variant has been unneeded since t0 + 2 grace,
        // v1 itself from now on.
        let third = installer.reconcile([&v2], [], t0 + grace * 3);
        assert_eq!(
            third.removed.len(),
            1,
            "only the variant, unreferenced for a full grace period"
        );
        assert!(third.installed.contains(&old));
        let fourth = installer.reconcile([&v2], [], t0 + grace * 4);
        assert_eq!(fourth.removed, std::slice::from_ref(&old));
        assert!(!dir.path().join("seccomp").join(&old).exists());
        assert_eq!(fourth.installed.len(), 2);
        let status = status_of(&fourth, "2026-11-30T23:00:00Z".parse().unwrap());
        assert!(status.ready);
        assert_eq!(status.installed, fourth.installed);
    }

    #[test]
    fn an_altered_file_is_an_error_and_left_out_of_an_otherwise_true_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut installer = Installer::new(NodeDir::new(dir.path()), PlanOptions::default(), Duration::ZERO);
        let v1 = wp(&[&["read"]]);
        let first = installer.reconcile([&v1], [], Instant::now());
        std::fs::write(dir.path().join("seccomp").join(&first.installed[0]), b"{}").unwrap();
        let second = installer.reconcile([&v1], [], Instant::now());
        assert_eq!(second.errors.len(), 1, "{:?}", second.errors);
        assert_eq!(second.installed.len(), 1);
        assert!(!second.installed.contains(&first.installed[0]));
        let status = status_of(&second, jiff::Timestamp::now());
        assert!(status.ready, "the report is true: the altered file is not listed");
        assert_eq!(status.installed, second.installed);
        assert_eq!(
            std::fs::read(dir.path().join("seccomp").join(&first.installed[0])).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn an_unreadable_tree_gives_no_report() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("seccomp")).unwrap();
        std::fs::write(dir.path().join("seccomp/tether"), b"not a directory").unwrap();
        let mut installer = Installer::new(NodeDir::new(dir.path()), PlanOptions::default(), Duration::ZERO);
        let pass = installer.reconcile([&wp(&[&["read"]])], [], Instant::now());
        assert!(!pass.scanned);
        assert!(!pass.errors.is_empty());
        assert!(pass.installed.is_empty());
    }

    /// Objects are re-planned when their resourceVersion moves, and only then.
    #[test]
    fn an_object_is_replanned_when_its_resource_version_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut installer = Installer::new(
            NodeDir::new(dir.path()),
            PlanOptions::default(),
            Duration::from_secs(60),
        );
        let mut obj = wp(&[&["read"]]);
        obj.metadata.resource_version = Some("1".into());
        assert_eq!(installer.reconcile([&obj], [], Instant::now()).written.len(), 2);
        let mut changed = wp(&[&["read"], &["read", "write"]]);
        changed.metadata.resource_version = Some("1".into());
        assert!(
            installer.reconcile([&changed], [], Instant::now()).written.is_empty(),
            "same resourceVersion: the cached plan is used"
        );
        changed.metadata.resource_version = Some("2".into());
        assert_eq!(installer.reconcile([&changed], [], Instant::now()).written.len(), 2);
    }

    /// The whole loop against a scripted API server: the lists of
    /// WorkloadProfiles and of this node's pods (field selector) feed a pass that
    /// writes the files, and the node's ProfileInstallation is created and its
    /// status reports them. Watches are left pending; anything else fails.
    #[tokio::test]
    async fn the_loop_installs_what_the_lists_hold_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = wp(&[&["read"]]);
        let mut wp_json = serde_json::to_value(&v1).unwrap();
        wp_json["metadata"]["resourceVersion"] = json!("3");
        let (reported_tx, reported_rx) = tokio::sync::oneshot::channel::<Value>();
        let mut reported = Some(reported_tx);
        let (client, routes) = api_script::route("default", move |call| {
            match (call.method.as_str(), call.path.as_str()) {
                ("GET", "/apis/tether.dev/v1alpha1/workloadprofiles") => (
                    200,
                    json!({"apiVersion": "tether.dev/v1alpha1", "kind": "WorkloadProfileList",
                           "metadata": {"resourceVersion": "10"}, "items": [wp_json.clone()]}),
                ),
                ("GET", "/api/v1/pods") => {
                    assert!(
                        call.query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                        "{}",
                        call.query
                    );
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "11"}, "items": []}),
                    )
                }
                ("GET", "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations/node-a") => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "reason": "NotFound", "code": 404}),
                ),
                ("POST", "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations") => {
                    assert_eq!(call.body["spec"]["nodeName"], "node-a");
                    (201, call.body.clone())
                }
                ("PATCH", "/apis/tether.dev/v1alpha1/namespaces/tether-system/profileinstallations/node-a/status") => {
                    if let Some(tx) = reported.take() {
                        let _ = tx.send(call.body.clone());
                    }
                    (200, json!({}))
                }
                _ => panic!("unexpected call {} {}?{}", call.method, call.path, call.query),
            }
        });
        let opts = InstallOptions {
            node_name: "node-a".into(),
            kubelet_root: dir.path().to_path_buf(),
            namespace: "tether-system".into(),
            grace: Duration::from_secs(600),
            plan: PlanOptions::default(),
            heartbeat: Duration::from_secs(30),
            metrics_listen: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run(client, opts, async move {
            let _ = stop_rx.await;
        }));
        let sent = tokio::time::timeout(Duration::from_secs(10), reported_rx)
            .await
            .expect("no status report within 10 s")
            .unwrap();
        let key: WorkloadKey = "prod/deployment/api/app".parse().unwrap();
        let profile: SeccompProfile = serde_json::from_value(v1.spec.versions[0].profile.clone()).unwrap();
        let want: Vec<String> = profile_store::store::node_files(&key, &profile)
            .iter()
            .map(|f| f.localhost_profile.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(sent["status"]["installed"], json!(want));
        assert_eq!(sent["status"]["ready"], true);
        for path in &want {
            assert!(dir.path().join("seccomp").join(path).is_file(), "{path} not written");
        }
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the installer did not stop")
            .unwrap()
            .unwrap();
        routes.finish().await;
    }
}
