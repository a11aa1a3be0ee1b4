//! The admission index fed by the API server (`tether serve --store kube://`).
//!
//! kube-runtime reflectors cache `WorkloadProfile`s (every namespace),
//! `ProfileInstallation`s (the installers' namespace) and the metadata of
//! `Namespace`s. A rebuild task turns the caches into an immutable [`Index`] and
//! the namespace labels into [`LiveNamespaces`], debounced, off the request path:
//! admission never calls the API server. Versions pass the install gate
//! ([`crate::gate`]) before they are injectable.
//!
//! Readiness stays false until every reflector has listed once; a watch error
//! keeps the index in service, counts in `tether_index_load_failures_total` and
//! shows in `/readyz` until the watch recovers.

use crate::gate::{self, InstallGate, Installed};
use crate::index::{Entry, Index, SharedIndex};
use crate::metrics::Metrics;
use crate::policy::LiveNamespaces;
use futures_util::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ResourceExt};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use profile_store::crd::{CrdError, ProfileInstallation, ProfileVersion, WorkloadProfile};
use profile_store::store::node_files;
use profile_store::{Version, WorkloadKey};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the Kubernetes-fed index runs.
#[derive(Debug, Clone)]
pub struct KubeIndexOptions {
    /// Where the node installers write their `ProfileInstallation`s (the webhook's
    /// own namespace, `tether-system` by default).
    pub installer_namespace: String,
    /// When a version counts as installed.
    pub gate: InstallGate,
    /// An installer whose heartbeat is older than this is not ready.
    pub staleness: Duration,
    /// A burst of changes (a rollout touching many profiles) is rebuilt once,
    /// this long after its first change.
    pub debounce: Duration,
    /// How often heartbeats are re-checked without any change (an installer that
    /// stops reporting sends no event) and the index is confirmed fresh.
    pub recheck: Duration,
}

impl KubeIndexOptions {
    /// The options for `policy`, with the installers in `installer_namespace`.
    pub fn new(policy: &crate::Policy, installer_namespace: String, recheck: Duration) -> Self {
        KubeIndexOptions {
            installer_namespace,
            gate: policy.install_gate,
            staleness: Duration::from_secs(policy.installer_staleness_seconds),
            debounce: Duration::from_millis(200),
            recheck,
        }
    }
}

/// The resources the index watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Profiles = 0,
    Installations = 1,
    Namespaces = 2,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Profiles => "workloadprofiles.tether.dev",
            Source::Installations => "profileinstallations.tether.dev",
            Source::Namespaces => "namespaces",
        })
    }
}

/// What the watch tasks tell the rebuild task.
#[derive(Debug, Default)]
struct Progress {
    /// Listed at least once (the reflector's store is complete).
    synced: [bool; 3],
    /// Changed since the last rebuild.
    dirty: [bool; 3],
    /// The last watch error, until the next event.
    errors: [Option<String>; 3],
}

#[derive(Debug, Default)]
struct State {
    progress: Mutex<Progress>,
    wake: tokio::sync::Notify,
}

impl State {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps [`watch_kube`] running; dropping it stops the watches.
#[derive(Debug)]
pub struct KubeWatch {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the reflectors and the rebuild task: `shared` gets a new index after
/// every (debounced) change, `namespaces` the labels of every namespace. Must be
/// called inside a tokio runtime.
pub fn watch_kube(
    client: kube::Client,
    shared: Arc<SharedIndex>,
    namespaces: LiveNamespaces,
    opts: KubeIndexOptions,
    metrics: Metrics,
) -> KubeWatch {
    let state = Arc::new(State::default());
    let variants = VariantCache::default();

    let (profiles, writer) = reflector::store::<WorkloadProfile>();
    let cache = variants.clone();
    let profile_events = reflector::reflector(
        writer,
        watcher(Api::<WorkloadProfile>::all(client.clone()), watcher::Config::default())
            .map_ok(move |event| event.modify(|wp| compact_profile(wp, &cache)))
            .default_backoff(),
    );

    let (installations, writer) = reflector::store::<ProfileInstallation>();
    let installation_events = reflector::reflector(
        writer,
        watcher(
            Api::<ProfileInstallation>::namespaced(client.clone(), &opts.installer_namespace),
            watcher::Config::default(),
        )
        .map_ok(|event| event.modify(|i| i.metadata.managed_fields = None))
        .default_backoff(),
    );

    let (namespace_store, writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let namespace_events = reflector::reflector(
        writer,
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client),
            watcher::Config::default(),
        )
        .map_ok(|event| {
            event.modify(|ns| {
                // Only labels are read; annotations (last-applied-configuration)
                // and managed fields are most of a namespace's metadata.
                ns.metadata.managed_fields = None;
                ns.metadata.annotations = None;
            })
        })
        .default_backoff(),
    );

    let tasks = vec![
        tokio::spawn(drive(profile_events, Source::Profiles, state.clone(), metrics.clone())),
        tokio::spawn(drive(
            installation_events,
            Source::Installations,
            state.clone(),
            metrics.clone(),
        )),
        tokio::spawn(drive(
            namespace_events,
            Source::Namespaces,
            state.clone(),
            metrics.clone(),
        )),
        tokio::spawn(rebuild_loop(
            Stores {
                profiles,
                installations,
                namespaces: namespace_store,
            },
            state,
            variants,
            shared,
            namespaces,
            opts,
            metrics,
        )),
    ];
    KubeWatch { tasks }
}

/// Polls one reflector's event stream (which applies the events to its store)
/// and tells the rebuild task what happened.
async fn drive<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    source: Source,
    state: Arc<State>,
    metrics: Metrics,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        {
            let mut p = state.progress();
            let i = source as usize;
            match event {
                // The store is replaced at the end of a (re)list.
                Ok(watcher::Event::InitDone) => {
                    p.synced[i] = true;
                    p.dirty[i] = true;
                    p.errors[i] = None;
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    p.dirty[i] = true;
                    p.errors[i] = None;
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => {
                    metrics.index_load_failures.inc();
                    tracing::warn!(resource = %source, error = %e, "watch failed; the index in service stays, retrying with backoff");
                    p.errors[i] = Some(format!("watching {source}: {e}"));
                }
            }
        }
        state.wake.notify_one();
    }
    // A watcher retries for ever; should its stream end anyway, say so rather
    // than serve an index that silently stopped following the API server.
    tracing::error!(resource = %source, "watch ended; the index no longer follows it");
    state.progress().errors[source as usize] = Some(format!("watch of {source} ended"));
    state.wake.notify_one();
}

/// Log-mode variant versions of verified profile versions. Versions are content
/// addresses, so the variant of a version is the same in every object and forever:
/// each profile is parsed and hashed once, not on every update of its object.
#[derive(Debug, Clone, Default)]
struct VariantCache(Arc<Mutex<HashMap<Version, Version>>>);

impl VariantCache {
    /// The version of the Log-mode variant of `wp`'s version `v`: the second of the
    /// [`node_files`] the installer writes for it, so the webhook references exactly
    /// the files the nodes get. The inline profile is checked against its version
    /// first ([`WorkloadProfile::profile_of`]).
    fn variant(&self, wp: &WorkloadProfile, key: &WorkloadKey, v: &ProfileVersion) -> Result<Version, CrdError> {
        if let Ok(claimed) = v.version.parse::<Version>()
            && let Some(known) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&claimed)
        {
            return Ok(known.clone());
        }
        let profile = wp.profile_of(v)?;
        let [file, log] = node_files(key, &profile);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file.version, log.version.clone());
        Ok(log.version)
    }

    /// Forgets every version not in `keep`.
    fn retain(&self, keep: &HashSet<Version>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|v, _| keep.contains(v));
    }
}

/// Shrinks a `WorkloadProfile` to what the index reads before the reflector keeps
/// it. The inline profiles are most of an object (a few KiB per version, ten
/// versions per workload); the index needs only their Log-mode variants' versions,
/// so in the cached copy each version's `profile` holds that version as a JSON
/// string. A version whose profile does not match its version is dropped (with a
/// warning naming the object): it is never injected.
fn compact_profile(wp: &mut WorkloadProfile, variants: &VariantCache) {
    wp.metadata.managed_fields = None;
    wp.metadata.annotations = None;
    wp.spec.baseline = Default::default();
    let key = match wp.key() {
        Ok(key) => key,
        Err(e) => {
            // Nothing of it is injectable; the rebuild warns about the object.
            tracing::debug!(error = %e, "WorkloadProfile with an invalid key: versions dropped from the cache");
            wp.spec.versions.clear();
            return;
        }
    };
    let compacted: Vec<Option<Version>> = wp
        .spec
        .versions
        .iter()
        .map(|v| match variants.variant(wp, &key, v) {
            Ok(variant) => Some(variant),
            Err(e) => {
                tracing::warn!(error = %e, "spec.versions[] entry ignored: not injectable");
                None
            }
        })
        .collect();
    let mut compacted = compacted.into_iter();
    wp.spec.versions.retain_mut(|v| match compacted.next().flatten() {
        Some(variant) => {
            v.profile = serde_json::Value::String(variant.to_string());
            true
        }
        None => false,
    });
}

/// The Log-mode variant a compacted version carries (see [`compact_profile`]).
fn compacted_variant(v: &ProfileVersion) -> Option<Version> {
    v.profile.as_str()?.parse().ok()
}

struct Stores {
    profiles: Store<WorkloadProfile>,
    installations: Store<ProfileInstallation>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
}

/// What the rebuilds remember between runs.
#[derive(Default)]
struct Builder {
    /// The installers the last gate was computed from (sorted by name).
    ready: Vec<Arc<ProfileInstallation>>,
    /// What they have installed in common.
    installed: Option<Arc<Installed>>,
    /// Bumped when `installed` changes: part of every entry's stamp, so entries
    /// are reused only under the same gate.
    gate_generation: u64,
}

/// A rebuilt index and what the metrics say about it.
struct Built {
    index: Index,
    held_back: usize,
}

impl Builder {
    /// Re-reads the installers; true when what counts as installed changed.
    fn update_gate(
        &mut self,
        installations: &[Arc<ProfileInstallation>],
        now: jiff::Timestamp,
        opts: &KubeIndexOptions,
    ) -> bool {
        if opts.gate == InstallGate::None {
            let changed = self.installed.is_none();
            self.installed.get_or_insert_with(|| Arc::new(Installed::Ungated));
            return changed;
        }
        let mut ready: Vec<Arc<ProfileInstallation>> = installations
            .iter()
            .filter(|i| gate::is_ready(i, now, opts.staleness))
            .cloned()
            .collect();
        ready.sort_by_key(|i| i.name_any());
        let same = self.installed.is_some()
            && ready.len() == self.ready.len()
            && ready.iter().zip(&self.ready).all(|(a, b)| {
                Arc::ptr_eq(a, b)
                    || (a.name_any() == b.name_any()
                        && a.status.as_ref().map(|s| &s.installed) == b.status.as_ref().map(|s| &s.installed))
            });
        if !same {
            if ready.is_empty() {
                tracing::warn!(
                    namespace = %opts.installer_namespace,
                    staleness_seconds = opts.staleness.as_secs(),
                    "no node installer is ready with a fresh heartbeat: no profile is injectable, pods get the on-missing behaviour"
                );
            } else if self.ready.is_empty() {
                tracing::info!(
                    installers = ready.len(),
                    "node installers ready: profiles are injectable"
                );
            }
            self.installed = Some(Arc::new(Installed::Everywhere(gate::installed_everywhere(
                ready.iter().map(|i| &**i),
            ))));
            self.gate_generation += 1;
        }
        self.ready = ready;
        !same
    }

    /// An index of `profiles` under the current gate, sharing unchanged entries
    /// with `previous`.
    fn build(&self, profiles: &[Arc<WorkloadProfile>], previous: &Index) -> Built {
        let ungated = Installed::Ungated;
        let installed = self.installed.as_deref().unwrap_or(&ungated);
        let mut entries = HashMap::with_capacity(profiles.len());
        let mut held_back = 0;
        for wp in profiles {
            let object = || format!("{}/{}", wp.namespace().unwrap_or_default(), wp.name_any());
            let key = match wp.key() {
                Ok(key) => key,
                Err(e) => {
                    tracing::warn!(error = %e, "WorkloadProfile ignored");
                    continue;
                }
            };
            if entries.contains_key(&key) {
                tracing::warn!(workloadprofile = %object(), %key, "a second WorkloadProfile for the same workload; ignored (delete one)");
                continue;
            }
            let active = wp.spec.active().map(|v| &v.version);
            let stamp = format!(
                "{}/{}#{}",
                wp.uid().unwrap_or_default(),
                wp.resource_version().unwrap_or_default(),
                self.gate_generation
            );
            let entry = match previous.reusable(&key, &stamp) {
                Some(entry) => entry,
                None => Arc::new(entry_of(&key, wp, installed)),
            };
            if entry.active.as_ref().map(Version::as_str) != active.map(String::as_str) {
                held_back += 1;
            }
            entries.insert(key, (entry, stamp));
        }
        Built {
            index: Index::from_stamped(entries),
            held_back,
        }
    }
}

/// The entry of one (compacted) profile under `installed`.
fn entry_of(key: &WorkloadKey, wp: &WorkloadProfile, installed: &Installed) -> Entry {
    let versions: Vec<(Version, Version)> = wp
        .spec
        .versions
        .iter()
        .filter_map(|v| Some((v.version.parse().ok()?, compacted_variant(v)?)))
        .collect();
    let active = wp.spec.active_position().and_then(|i| {
        versions
            .iter()
            .position(|(v, _)| v.as_str() == wp.spec.versions[i].version)
    });
    let gated = gate::gate(key, &versions, active, installed);
    Entry {
        active: gated.version,
        log_variant: gated.log_variant,
        fallback: wp
            .status
            .as_ref()
            .and_then(|s| s.fallback.as_ref())
            .map(|f| f.reason.clone()),
        // Any stored version may be referenced by a running pod (one started
        // before a newer version was activated): /validate accepts them all.
        known: versions.into_iter().flat_map(|(v, l)| [v, l]).collect(),
    }
}

/// Rebuilds after changes (debounced) and on every `recheck`, once every
/// reflector has listed.
async fn rebuild_loop(
    stores: Stores,
    state: Arc<State>,
    variants: VariantCache,
    shared: Arc<SharedIndex>,
    namespaces: LiveNamespaces,
    opts: KubeIndexOptions,
    metrics: Metrics,
) {
    let mut builder = Builder::default();
    let mut tick = tokio::time::interval(opts.recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut built_once = false;
    loop {
        tokio::select! {
            _ = state.wake.notified() => tokio::time::sleep(opts.debounce).await,
            _ = tick.tick() => {}
        }
        let (dirty, errors) = {
            let mut p = state.progress();
            let synced = p.synced.iter().all(|s| *s);
            let errors: Vec<String> = p.errors.iter().flatten().cloned().collect();
            if !synced {
                // Not ready: keep the changes for the first build.
                drop(p);
                if !errors.is_empty() {
                    shared.fail(errors.join("; "));
                }
                continue;
            }
            (std::mem::take(&mut p.dirty), errors)
        };
        if dirty[Source::Namespaces as usize] || !built_once {
            let all = stores.namespaces.state();
            namespaces.replace(all.iter().map(|ns| (ns.name_any(), ns.metadata.labels.as_ref())));
        }
        let gate_changed = builder.update_gate(&stores.installations.state(), jiff::Timestamp::now(), &opts);
        metrics.ready_installers.set(builder.ready.len() as i64);
        if dirty[Source::Profiles as usize] || gate_changed || !built_once {
            let profiles = stores.profiles.state();
            let built = builder.build(&profiles, &shared.get());
            metrics.workloads_in_fallback.set(built.index.in_fallback() as i64);
            metrics.store_versions.set(built.index.versions as i64);
            metrics.held_back_workloads.set(built.held_back as i64);
            shared.set(built.index);
            built_once = true;
            let keep: HashSet<Version> = profiles
                .iter()
                .flat_map(|wp| wp.spec.versions.iter().filter_map(|v| v.version.parse().ok()))
                .collect();
            variants.retain(&keep);
        }
        if errors.is_empty() {
            shared.confirm();
        } else {
            shared.fail(errors.join("; "));
        }
    }
}

#[cfg(test)]
mod tests;
