//! The crash watcher: when a container tether injected dies of its seccomp
//! profile, its workload goes into fallback (new pods get `Unconfined`, or the
//! Log-mode variant where Pod Security forbids that), with an Event on the pod
//! and a metric, until an operator clears it or a newer Validated version is
//! activated.
//!
//! [`seccomp_crashes`] and [`fallback_ends`] are the pure decisions; [`Watcher`]
//! acts on them against the API server; [`run_crash_watcher`] runs it on the
//! replica that holds the Lease ([`crate::lease`]).

use crate::lease::{Elector, LeaseConfig, run_election};
use crate::metrics::{CrashLabels, Metrics};
use crate::policy::names;
use futures_util::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use profile_store::WorkloadKey;
use profile_store::crd::{FallbackState, VersionState, WorkloadProfile};
use std::collections::HashSet;

/// `128 + SIGSYS`: the exit code of a process the kernel killed for a syscall
/// the filter answers with `SCMP_ACT_KILL*`, as runtimes report it.
pub const SIGSYS_EXIT_CODE: i32 = 159;
/// SIGSYS on Linux (x86_64 and arm64).
pub const SIGSYS: i32 = 31;

/// How a container died of its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It exited with code 159 (128 + SIGSYS).
    ExitCode159,
    /// The runtime reported SIGSYS as the terminating signal.
    Sigsys,
    /// It could not be created because the profile could not be loaded
    /// (`CreateContainerError` / `CreateContainerConfigError` about seccomp).
    SeccompLoadError {
        /// The waiting reason.
        reason: String,
    },
}

impl Cause {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Cause::ExitCode159 => "exit_code_159",
            Cause::Sigsys => "sigsys",
            Cause::SeccompLoadError { .. } => "seccomp_load_error",
        }
    }
}

/// One container of a pod that crashed under its tether profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompCrash {
    /// The container.
    pub container: String,
    /// Its workload key, as admission derived it.
    pub key: WorkloadKey,
    /// The version tether injected (`tether.dev/profile.<container>`).
    pub version: String,
    /// How it died.
    pub cause: Cause,
    /// The fallback reason: what happened, to whom.
    pub reason: String,
}

/// The containers of `pod` that crashed because of their seccomp profile. Only
/// containers tether injected with a version count (`tether.dev/profile.<container>`
/// holding a version, not a fallback); the
/// last termination counts as well as the current one, because a container in
/// CrashLoopBackOff is `waiting` with its SIGSYS death in `lastState`.
pub fn seccomp_crashes(pod: &Pod) -> Vec<SeccompCrash> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let annotations = pod.metadata.annotations.as_ref();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pod_name = format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or_default());
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    let mut out = Vec::new();
    for cs in statuses {
        let annotation = format!("{}{}", names::PROFILE_PREFIX, cs.name);
        // A version, not `fallback:…`: a container already under its fallback
        // (Unconfined, or a Log-mode profile that kills nothing) did not die of
        // tether's profile.
        let Some(version) = annotations
            .and_then(|a| a.get(&annotation))
            .filter(|v| v.parse::<profile_store::Version>().is_ok())
        else {
            continue;
        };
        let Some((cause, what)) = cause_of(cs) else {
            continue;
        };
        let key = match admitted_key(pod, namespace, &cs.name) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(pod = %pod_name, container = %cs.name, error = %e, "crashed under its profile, but no workload key");
                continue;
            }
        };
        out.push(SeccompCrash {
            reason: format!(
                "container {} of pod {pod_name} {what} under profile version {version}",
                cs.name
            ),
            container: cs.name.clone(),
            key,
            version: version.clone(),
            cause,
        });
    }
    out
}

/// The key admission derived for `container`: the pod as the API server showed
/// it then (a pod created from `generateName` had no name yet).
fn admitted_key(pod: &Pod, namespace: &str, container: &str) -> Result<WorkloadKey, String> {
    let mut admitted = crate::slim::PodView::of(pod);
    if admitted.metadata.generate_name.is_some() {
        admitted.metadata.name = None;
    }
    crate::decide::container_key(&admitted, namespace, container)
}

fn cause_of(cs: &ContainerStatus) -> Option<(Cause, String)> {
    let states = [cs.state.as_ref(), cs.last_state.as_ref()];
    for state in states.into_iter().flatten() {
        if let Some(t) = &state.terminated {
            if t.exit_code == SIGSYS_EXIT_CODE {
                return Some((Cause::ExitCode159, "exited with code 159 (SIGSYS)".into()));
            }
            if t.signal == Some(SIGSYS) {
                return Some((Cause::Sigsys, "was killed by SIGSYS".into()));
            }
        }
    }
    let waiting = cs.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    let message = waiting.message.as_deref().unwrap_or_default();
    let about_seccomp = message.to_ascii_lowercase().contains("seccomp");
    (matches!(reason, "CreateContainerError" | "CreateContainerConfigError") && about_seccomp).then(|| {
        (
            Cause::SeccompLoadError {
                reason: reason.to_string(),
            },
            format!("could not start ({reason}: {message})"),
        )
    })
}

/// Whether `wp`'s fallback has ended because a newer version was validated and
/// activated: the active version is Validated and was created after the
/// fallback began.
pub fn fallback_ends(wp: &WorkloadProfile) -> bool {
    let Some(fallback) = wp.status.as_ref().and_then(|s| s.fallback.as_ref()) else {
        return false;
    };
    let Some(active) = wp.spec.active() else {
        return false;
    };
    let (Ok(since), Ok(created)) = (fallback.since.parse::<Timestamp>(), active.created.parse::<Timestamp>()) else {
        return false;
    };
    active.status == VersionState::Validated && created > since
}

/// Why the crash watcher could not act.
#[derive(Debug, thiserror::Error)]
pub enum CrashError {
    /// An API call failed.
    #[error("{object}: {action}: {source}")]
    Api {
        /// The object (`namespace/name`).
        object: String,
        /// What was attempted.
        action: &'static str,
        /// The error.
        source: kube::Error,
    },
    /// The object changed under every attempt.
    #[error("{object}: changed under each of 3 attempts to set its fallback; the next crash event retries")]
    Contended {
        /// The object (`namespace/name`).
        object: String,
    },
    /// A watch ended for good.
    #[error("the {0} watch stopped")]
    WatchEnded(&'static str),
}

/// What [`Watcher::on_pod`] did about one crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The workload was put into fallback.
    FellBack,
    /// It already was (an earlier crash, or an operator): nothing overwritten.
    AlreadyInFallback,
    /// The pod runs a version that is no longer active: a newer one replaced
    /// it, so this crash says nothing about what new pods get.
    StaleVersion,
    /// No WorkloadProfile for the key (the pod was injected from another store).
    NoProfile,
}

/// Acts on crashes and on fallbacks that ended.
pub struct Watcher {
    client: kube::Client,
    recorder: Recorder,
    metrics: Metrics,
    /// Pod UID and container of crashes already acted on, so that every status
    /// update of a crash-looping pod does not act again.
    handled: HashSet<(String, String)>,
}

impl Watcher {
    /// A watcher posting Events as `tether-crash-watcher` (instance `identity`).
    pub fn new(client: kube::Client, identity: &str, metrics: Metrics) -> Watcher {
        let reporter = Reporter {
            controller: "tether-crash-watcher".into(),
            instance: Some(identity.to_string()),
        };
        Watcher {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            handled: HashSet::new(),
        }
    }

    /// Puts the workload of every seccomp crash in `pod` into fallback.
    pub async fn on_pod(&mut self, pod: &Pod) -> Vec<(SeccompCrash, Result<Outcome, CrashError>)> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut out = Vec::new();
        for crash in seccomp_crashes(pod) {
            let seen = (uid.clone(), crash.container.clone());
            if self.handled.contains(&seen) {
                continue;
            }
            let result = self.fall_back(pod, &crash).await;
            if result.is_ok() {
                self.handled.insert(seen);
            }
            out.push((crash, result));
        }
        out
    }

    /// Forgets a deleted pod.
    pub fn forget(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        self.handled.retain(|(u, _)| u != uid);
    }

    async fn fall_back(&self, pod: &Pod, crash: &SeccompCrash) -> Result<Outcome, CrashError> {
        let api: Api<WorkloadProfile> = Api::namespaced(self.client.clone(), crash.key.namespace());
        let name = WorkloadProfile::object_name(&crash.key);
        let object = format!("WorkloadProfile {}/{name}", crash.key.namespace());
        let err = |action| {
            let object = object.clone();
            move |source| CrashError::Api { object, action, source }
        };
        for _ in 0..3 {
            let Some(wp) = api.get_opt(&name).await.map_err(err("get"))? else {
                tracing::warn!(key = %crash.key, "a container crashed under its profile, but there is no WorkloadProfile {name}");
                return Ok(Outcome::NoProfile);
            };
            if wp.status.as_ref().and_then(|s| s.fallback.as_ref()).is_some() {
                return Ok(Outcome::AlreadyInFallback);
            }
            if wp.spec.active().map(|a| a.version.as_str()) != Some(crash.version.as_str()) {
                tracing::info!(key = %crash.key, version = %crash.version, "crash of a version that is no longer active; no fallback");
                return Ok(Outcome::StaleVersion);
            }
            let fallback = FallbackState {
                reason: crash.reason.clone(),
                since: Timestamp::now().to_string(),
                pod: Some(format!("{}/{}", crash.key.namespace(), pod.name_any())),
            };
            // The resourceVersion makes this a compare-and-swap: a fallback set
            // meanwhile (by an operator) is not overwritten.
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": wp.resource_version()},
                "status": {"fallback": fallback},
            });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(err("patch status")(e)),
            }
            self.metrics
                .crash_fallbacks
                .get_or_create(&CrashLabels {
                    reason: crash.cause.label(),
                })
                .inc();
            tracing::warn!(key = %crash.key, reason = %crash.reason, "workload put into fallback");
            let event = Event {
                type_: EventType::Warning,
                reason: "SeccompFallback".into(),
                note: Some(truncate(
                    &format!(
                        "{}; new pods of {} run under the fallback until `tether profiles fallback clear {}` or a newer validated version is activated",
                        crash.reason, crash.key, crash.key
                    ),
                    1024,
                )),
                action: "Fallback".into(),
                secondary: Some(wp.object_ref(&())),
            };
            // The fallback is set; a lost Event is logged, not retried.
            if let Err(e) = self.recorder.publish(&event, &pod.object_ref(&())).await {
                tracing::warn!(error = %e, pod = %pod.name_any(), "cannot post the fallback Event");
            }
            return Ok(Outcome::FellBack);
        }
        Err(CrashError::Contended { object })
    }

    /// Clears `wp`'s fallback when [`fallback_ends`] says so; returns whether it did.
    pub async fn on_profile(&self, wp: &WorkloadProfile) -> Result<bool, CrashError> {
        if !fallback_ends(wp) {
            return Ok(false);
        }
        let namespace = wp.namespace().unwrap_or_default();
        let api: Api<WorkloadProfile> = Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": wp.resource_version()},
            "status": {"fallback": null},
        });
        match api
            .patch_status(&wp.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(object = %wp.display_name(), "fallback ended: a newer validated version is active");
                Ok(true)
            }
            // Changed since this copy: the watch brings the new one.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(source) => Err(CrashError::Api {
                object: format!("WorkloadProfile {}", wp.display_name()),
                action: "clear fallback",
                source,
            }),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// How the crash watcher runs.
#[derive(Debug, Clone)]
pub struct CrashWatcherOptions {
    /// The Lease that elects the acting replica.
    pub lease: LeaseConfig,
    /// The webhook's metrics (the crash counter and the leader gauge are there).
    pub metrics: Metrics,
}

/// Runs the crash watcher: watches every Pod and WorkloadProfile, and on the
/// replica holding the Lease acts on seccomp crashes and on fallbacks that
/// ended. A replica that becomes leader first looks at everything its caches
/// hold, so crashes seen while another replica led are not missed.
///
/// Dropping the future (aborting its task at shutdown) stops the election too.
pub async fn run_crash_watcher(client: kube::Client, opts: CrashWatcherOptions) -> Result<(), CrashError> {
    let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
    let _election = AbortOnDrop(tokio::spawn(run_election(
        Elector::new(client.clone(), opts.lease.clone()),
        leading_tx,
    )));
    watch(client, &opts, &mut leading).await
}

/// A spawned task that is aborted when this is dropped: a background loop ends
/// with whatever owns it, whether that returns or is itself aborted.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn watch(
    client: kube::Client,
    opts: &CrashWatcherOptions,
    leading: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), CrashError> {
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (profiles, profiles_writer) = reflector::store::<WorkloadProfile>();
    let mut pod_events = std::pin::pin!(
        reflector(
            pods_writer,
            watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(slim)
        )
        .default_backoff()
    );
    let mut profile_events = std::pin::pin!(
        reflector(
            profiles_writer,
            watcher(Api::<WorkloadProfile>::all(client.clone()), watcher::Config::default())
        )
        .default_backoff()
        .applied_objects()
    );
    let mut acting = Watcher::new(client, &opts.lease.identity, opts.metrics.clone());
    loop {
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(CrashError::WatchEnded("Lease"));
                }
                let lead = *leading.borrow_and_update();
                opts.metrics.crash_watcher_leader.set(i64::from(lead));
                if lead {
                    for pod in pods.state() {
                        report(acting.on_pod(&pod).await);
                    }
                    for wp in profiles.state() {
                        if let Err(e) = acting.on_profile(&wp).await {
                            tracing::warn!(error = %e, "cannot clear a fallback");
                        }
                    }
                }
            }
            event = pod_events.next() => match event {
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    if *leading.borrow() {
                        report(acting.on_pod(&pod).await);
                    }
                }
                Some(Ok(watcher::Event::Delete(pod))) => acting.forget(&pod),
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch error; retrying"),
                None => return Err(CrashError::WatchEnded("Pod")),
            },
            event = profile_events.next() => match event {
                Some(Ok(wp)) => {
                    if *leading.borrow()
                        && let Err(e) = acting.on_profile(&wp).await
                    {
                        tracing::warn!(error = %e, "cannot clear a fallback");
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "WorkloadProfile watch error; retrying"),
                None => return Err(CrashError::WatchEnded("WorkloadProfile")),
            },
        }
    }
}

/// Keeps of a pod only what [`seccomp_crashes`] reads (identity, labels,
/// owners, tether's annotations, container statuses): the watcher caches every
/// pod of the cluster, and specs and managed fields are most of a pod's size.
pub fn slim(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    if let Some(a) = pod.metadata.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("tether.dev/"));
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.ephemeral_container_statuses = None;
        for cs in status
            .init_container_statuses
            .iter_mut()
            .flatten()
            .chain(status.container_statuses.iter_mut().flatten())
        {
            cs.volume_mounts = None;
            cs.resources = None;
            cs.allocated_resources = None;
        }
    }
}

fn report(results: Vec<(SeccompCrash, Result<Outcome, CrashError>)>) {
    for (crash, result) in results {
        if let Err(e) = result {
            tracing::error!(key = %crash.key, reason = %crash.reason, error = %e, "cannot put the workload into fallback");
        }
    }
}

#[cfg(test)]
mod tests;
